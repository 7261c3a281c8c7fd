//! Soak test (issue 6): agents churning against one relay under client load.
//!
//!     cargo bench --bench soak                 # defaults below, ~4 min on 2 vCPUs
//!     SOAK_AGENTS=1000 SOAK_SECS=600 SOAK_WEBSOCKETS=5000 cargo bench --bench soak
//!
//! One real `jobgate relay` process; in this process, agents built from the
//! `jobgate-agent` library (each its own QUIC endpoint and connection, like a job's agent),
//! each forwarding to its own little backend that answers `/id` with the agent's slot and
//! generation and echoes WebSockets on `/ws`; and the clients: HTTP/1.1 and HTTP/2 loops
//! sending each request to a random live session over connections shared between sessions
//! (as a browser coalesces), WebSockets held on stable agents for the whole run, and
//! WebSockets on churning agents that must close when their agent goes.
//!
//! Agents live a random time, then end one of three ways: `Bye` (the job ended), a close
//! without `Bye` (a crash: the name is parked for --resume-grace), or a blip (close without
//! `Bye`, then reconnect with the resume ticket: the name must come back).
//!
//! Phases: warm-up churn → quiesce (churning agents gone, resume grace over) → baseline
//! relay RSS and file descriptors → the soak → quiesce → the same figures again.
//! Checks: no request misrouted (a 200 from the wrong agent), none lost (failed while its
//! agent stayed up), no stable WebSocket broken or answered wrongly, every WebSocket of a
//! departed agent closed promptly, every blip got its old name back, the relay's file
//! descriptors back to baseline, its RSS back near it. Prints a summary and writes
//! target/bench/soak.json; exits non-zero on a failed check.
//!
//! Knobs (environment): SOAK_AGENTS churning agents [300], SOAK_STABLE stable agents [20],
//! SOAK_SECS soak duration [180], SOAK_WARMUP_SECS [20], SOAK_CLIENTS request loops [48],
//! SOAK_WEBSOCKETS WebSockets on stable agents [500], SOAK_CHURN_WS WebSockets on churning
//! agents [40], SOAK_LIFE_MIN/SOAK_LIFE_MAX agent lifetime in seconds [5/40],
//! SOAK_GRACE the relay's --resume-grace [10], SOAK_RSS_SLACK_PCT allowed RSS growth [15].

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jobgate_agent::dial::{self, DialConfig, HelloParams, RelaySession};
use jobgate_agent::target::{Target, TargetPool};
use jobgate_protocol::{write_frame, AccessMode, CloseCode, ControlMessage, JobInfo, Token};
use rand::Rng;
use serde_json::json;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const DOMAIN: &str = "soak.test";
/// A close code the relay does not know: a crash-like end, the name is parked.
const CRASH_CODE: u32 = 1000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Debug)]
struct Opts {
    agents: usize,
    stable: usize,
    secs: u64,
    warmup: u64,
    clients: usize,
    websockets: usize,
    churn_ws: usize,
    life_min: f64,
    life_max: f64,
    grace: u64,
    rss_slack_pct: f64,
}

impl Opts {
    fn from_env() -> Self {
        Self {
            agents: env_or("SOAK_AGENTS", 300),
            stable: env_or("SOAK_STABLE", 20).max(1),
            secs: env_or("SOAK_SECS", 180),
            warmup: env_or("SOAK_WARMUP_SECS", 20),
            clients: env_or("SOAK_CLIENTS", 48),
            websockets: env_or("SOAK_WEBSOCKETS", 500),
            churn_ws: env_or("SOAK_CHURN_WS", 40),
            life_min: env_or("SOAK_LIFE_MIN", 5.0),
            life_max: env_or("SOAK_LIFE_MAX", 40.0),
            grace: env_or("SOAK_GRACE", 10),
            rss_slack_pct: env_or("SOAK_RSS_SLACK_PCT", 15.0),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        #[derive(Default)]
        struct Counters { $($field: AtomicU64,)* }
        impl Counters {
            fn snapshot(&self) -> BTreeMap<&'static str, u64> {
                let mut m = BTreeMap::new();
                $(m.insert(stringify!($field), self.$field.load(Relaxed));)*
                m
            }
        }
    };
}

counters!(
    sessions_opened,
    sessions_bye,
    sessions_crashed,
    blips,
    blip_same_name,
    blip_new_name,
    open_errors,
    req_ok,
    req_misrouted,
    req_lost,
    req_churn,
    req_h2,
    ws_opened,
    ws_msgs_ok,
    ws_stable_broken,
    ws_wrong_echo,
    ws_churn_closed,
    ws_churn_lost,
    ws_hung,
    ws_close_latency_max_ms,
);

fn rand_f64(lo: f64, hi: f64) -> f64 {
    rand::thread_rng().gen_range(lo..hi)
}

fn rand_ms(max: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..max))
}

fn chance(p: f64) -> bool {
    rand::thread_rng().gen_bool(p)
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

// ---------------------------------------------------------------------------------------
// Live sessions
// ---------------------------------------------------------------------------------------

/// One agent generation as the clients see it.
struct LiveInfo {
    name: String,
    key: String,
    ident: String,
    alive: AtomicBool,
    /// Bumped on every blip: a request spanning a blip may fail.
    epoch: AtomicU64,
    ended_at: Mutex<Option<Instant>>,
}

impl LiveInfo {
    fn host(&self, port: u16) -> String {
        format!("{}.{DOMAIN}:{port}", self.name)
    }
    /// Whether the agent stayed up, without a blip, since `epoch` was read.
    fn up_since(&self, epoch: u64) -> bool {
        self.alive.load(Relaxed) && self.epoch.load(Relaxed) == epoch
    }
}

struct Ctx {
    opts: Opts,
    https_port: u16,
    dial: DialConfig,
    token: Token,
    tls_h1: TlsConnector,
    tls_h2: TlsConnector,
    c: Counters,
    churn: Vec<Mutex<Option<Arc<LiveInfo>>>>,
    stable: Mutex<Vec<Arc<LiveInfo>>>,
    /// Ends the current phase's churning agents and client loops.
    phase_stop: AtomicBool,
    /// Ends the stable agents and their WebSockets.
    all_stop: AtomicBool,
    misroutes: Mutex<Vec<String>>,
    losses: Mutex<Vec<String>>,
}

impl Ctx {
    fn pick_churn(&self) -> Option<Arc<LiveInfo>> {
        let mut rng = rand::thread_rng();
        for _ in 0..16 {
            let slot = rng.gen_range(0..self.churn.len().max(1));
            if let Some(info) = self.churn.get(slot).and_then(|s| s.lock().unwrap().clone()) {
                if info.alive.load(Relaxed) {
                    return Some(info);
                }
            }
        }
        None
    }
    fn pick_any(&self) -> Option<Arc<LiveInfo>> {
        if rand::thread_rng().gen_bool(0.8) {
            if let Some(info) = self.pick_churn() {
                return Some(info);
            }
        }
        let stable = self.stable.lock().unwrap();
        if stable.is_empty() {
            return None;
        }
        Some(stable[rand::thread_rng().gen_range(0..stable.len())].clone())
    }
    fn note(&self, list: &Mutex<Vec<String>>, what: String) {
        let mut l = list.lock().unwrap();
        if l.len() < 20 {
            eprintln!("  !! {what}");
            l.push(what);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backend: one per agent generation, so a misrouted request shows
// ---------------------------------------------------------------------------------------

type BackendBody = Full<Bytes>;

async fn start_backend(ident: String) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let ident = Arc::new(ident);
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let ident = ident.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| backend(req, ident.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok((addr, task))
}

async fn backend(
    mut req: Request<Incoming>,
    ident: Arc<String>,
) -> Result<Response<BackendBody>, Infallible> {
    if req.uri().path() != "/ws" {
        return Ok(Response::new(Full::new(Bytes::from(
            ident.as_bytes().to_vec(),
        ))));
    }
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not a websocket\n")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(r);
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, "upgrade".parse().unwrap());
    h.insert(header::UPGRADE, "websocket".parse().unwrap());
    h.insert(
        "sec-websocket-accept",
        derive_accept_key(key.as_bytes()).parse().unwrap(),
    );
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------

async fn open(ctx: &Ctx, resume: Option<Token>) -> Result<RelaySession> {
    let hello = HelloParams {
        token: ctx.token.clone(),
        access: AccessMode::Link,
        job: JobInfo::default(),
        resume,
    };
    Ok(dial::open_session(&ctx.dial, &hello).await?)
}

fn key_of(access_url: &str) -> String {
    access_url
        .split("jobgate_key=")
        .nth(1)
        .unwrap_or("")
        .split('&')
        .next()
        .unwrap_or("")
        .to_owned()
}

async fn bye(session: &mut RelaySession) {
    let msg = ControlMessage::Bye {
        reason: "soak".into(),
    };
    let _ = write_frame(&mut session.control, &msg.to_payload()).await;
    let _ = session.control.finish();
    session
        .connection
        .close(quinn::VarInt::from_u32(CloseCode::Normal.as_u32()), b"bye");
    let _ = tokio::time::timeout(Duration::from_millis(500), session.endpoint.wait_idle()).await;
}

async fn crash(session: &RelaySession) {
    session
        .connection
        .close(quinn::VarInt::from_u32(CRASH_CODE), b"crash");
    let _ = tokio::time::timeout(Duration::from_millis(500), session.endpoint.wait_idle()).await;
}

/// Sleeps `secs`, or less if `stop` is set.
async fn nap(secs: f64, stop: &AtomicBool) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end && !stop.load(Relaxed) {
        tokio::time::sleep(
            Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

fn serve(session: &RelaySession, pool: &Arc<TargetPool>) -> JoinHandle<()> {
    let conn = session.connection.clone();
    let pool = pool.clone();
    tokio::spawn(async move {
        let _ = jobgate_agent::serve::serve_streams(conn, pool).await;
    })
}

/// One agent slot: generation after generation until the phase (or, stable, the run) ends.
async fn agent_slot(
    ctx: Arc<Ctx>,
    slot: usize,
    stable: bool,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut ready = ready;
    let mut gen = 0u64;
    let stop = if stable {
        &ctx.all_stop
    } else {
        &ctx.phase_stop
    };
    while !stop.load(Relaxed) {
        gen += 1;
        let ident = format!(
            "{}slot={slot} gen={gen}",
            if stable { "stable " } else { "" }
        );
        let Ok((addr, backend)) = start_backend(ident.clone()).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let pool = Arc::new(TargetPool::new(Target::Tcp(addr)));
        let mut session = match open(&ctx, None).await {
            Ok(s) => s,
            Err(e) => {
                inc(&ctx.c.open_errors);
                if ctx.c.open_errors.load(Relaxed) <= 5 {
                    eprintln!("  agent slot {slot}: open failed: {e:#}");
                }
                backend.abort();
                nap(1.0, stop).await;
                continue;
            }
        };
        inc(&ctx.c.sessions_opened);
        let info = Arc::new(LiveInfo {
            name: session.welcome.name.clone(),
            key: key_of(&session.welcome.access_url),
            ident,
            alive: AtomicBool::new(true),
            epoch: AtomicU64::new(0),
            ended_at: Mutex::new(None),
        });
        let mut ticket = session.welcome.resume_ticket.clone();
        let mut serving = serve(&session, &pool);
        if stable {
            ctx.stable.lock().unwrap().push(info.clone());
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
            while !stop.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        } else {
            *ctx.churn[slot].lock().unwrap() = Some(info.clone());
            let (lo, hi) = (
                ctx.opts.life_min,
                ctx.opts.life_max.max(ctx.opts.life_min + 0.1),
            );
            nap(rand_f64(lo, hi), stop).await;
            // 15 % blip: gone without Bye, back at once with the ticket.
            if !stop.load(Relaxed) && chance(0.15) {
                inc(&ctx.c.blips);
                info.epoch.fetch_add(1, Relaxed);
                info.alive.store(false, Relaxed);
                crash(&session).await;
                let _ = serving.await;
                match open(&ctx, ticket.clone()).await {
                    Ok(s) if s.welcome.name == info.name => {
                        inc(&ctx.c.blip_same_name);
                        session = s;
                        if let Some(t) = session.welcome.resume_ticket.clone() {
                            ticket = Some(t);
                        }
                        serving = serve(&session, &pool);
                        info.alive.store(true, Relaxed);
                        nap(rand_f64(lo, hi) / 2.0, stop).await;
                    }
                    Ok(s) => {
                        inc(&ctx.c.blip_new_name);
                        ctx.note(
                            &ctx.losses,
                            format!("blip: {} came back as {}", info.name, s.welcome.name),
                        );
                        session = s;
                        serving = serve(&session, &pool);
                    }
                    Err(e) => {
                        inc(&ctx.c.open_errors);
                        ctx.note(
                            &ctx.losses,
                            format!("blip: {} could not reconnect: {e:#}", info.name),
                        );
                        *ctx.churn[slot].lock().unwrap() = None;
                        *info.ended_at.lock().unwrap() = Some(Instant::now());
                        backend.abort();
                        continue;
                    }
                }
            }
        }
        // The end of this generation: clients stop picking it first.
        info.alive.store(false, Relaxed);
        *info.ended_at.lock().unwrap() = Some(Instant::now());
        if !stable {
            *ctx.churn[slot].lock().unwrap() = None;
        }
        // At the end of a phase everyone says Bye (quiesce); otherwise 25 % crash.
        if !stop.load(Relaxed) && chance(0.25) {
            inc(&ctx.c.sessions_crashed);
            crash(&session).await;
        } else {
            inc(&ctx.c.sessions_bye);
            bye(&mut session).await;
        }
        let _ = serving.await;
        drop(session);
        backend.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

async fn tls_to_relay(
    ctx: &Ctx,
    connector: &TlsConnector,
    sni: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", ctx.https_port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned())?;
    Ok(connector.connect(name, tcp).await?)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// Request loop: one connection (h1 or h2) for up to 200 requests to random sessions.
async fn request_loop(ctx: Arc<Ctx>, id: usize) {
    let h2 = id % 4 == 3;
    while !ctx.phase_stop.load(Relaxed) {
        let sni = ctx
            .pick_any()
            .map(|i| i.host(ctx.https_port))
            .unwrap_or_else(|| format!("x.{DOMAIN}"));
        let sni = sni.split(':').next().unwrap_or("").to_owned();
        let connector = if h2 { &ctx.tls_h2 } else { &ctx.tls_h1 };
        let tls = match tls_to_relay(&ctx, connector, &sni).await {
            Ok(t) => t,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut sender = if h2 {
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
            {
                Ok((s, conn)) => {
                    tokio::spawn(conn);
                    Sender::H2(s)
                }
                Err(_) => continue,
            }
        } else {
            match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
                Ok((s, conn)) => {
                    tokio::spawn(conn);
                    Sender::H1(s)
                }
                Err(_) => continue,
            }
        };
        for _ in 0..200 {
            if ctx.phase_stop.load(Relaxed) {
                break;
            }
            let Some(info) = ctx.pick_any() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let ready = match &mut sender {
                Sender::H1(s) => s.ready().await.is_ok(),
                Sender::H2(s) => s.ready().await.is_ok(),
            };
            if !ready {
                break; // the relay closed this connection (e.g. after an error page): reconnect
            }
            let epoch = info.epoch.load(Relaxed);
            let host = info.host(ctx.https_port);
            let path = format!("/id?jobgate_key={}", info.key);
            let result = tokio::time::timeout(Duration::from_secs(30), async {
                let resp = match &mut sender {
                    Sender::H1(s) => {
                        let req = Request::get(&path)
                            .header(header::HOST, &host)
                            .body(Empty::new())?;
                        s.send_request(req).await?
                    }
                    Sender::H2(s) => {
                        let req =
                            Request::get(format!("https://{host}{path}")).body(Empty::new())?;
                        s.send_request(req).await?
                    }
                };
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, anyhow::Error>((status, body))
            })
            .await;
            if h2 {
                inc(&ctx.c.req_h2);
            }
            let outcome = match result {
                Ok(Ok((StatusCode::OK, body))) => {
                    if body.as_ref() == info.ident.as_bytes() {
                        inc(&ctx.c.req_ok);
                        continue;
                    }
                    inc(&ctx.c.req_misrouted);
                    ctx.note(
                        &ctx.misroutes,
                        format!(
                            "MISROUTED: {} ({}) answered by {:?}",
                            info.name,
                            info.ident,
                            String::from_utf8_lossy(&body)
                        ),
                    );
                    continue;
                }
                Ok(Ok((status, body))) => format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(80)]).trim()
                ),
                Ok(Err(e)) => format!("error: {e:#}"),
                Err(_) => "no answer in 30 s".into(),
            };
            if info.up_since(epoch) {
                inc(&ctx.c.req_lost);
                ctx.note(
                    &ctx.losses,
                    format!(
                        "LOST: {} ({}) up throughout: {outcome}",
                        info.name, info.ident
                    ),
                );
            } else {
                inc(&ctx.c.req_churn);
            }
            if outcome.starts_with("error") {
                break;
            }
        }
    }
}

async fn ws_connect(
    ctx: &Ctx,
    info: &LiveInfo,
) -> Result<WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>> {
    let host = info.host(ctx.https_port);
    let tls = tls_to_relay(ctx, &ctx.tls_h1, host.split(':').next().unwrap_or("")).await?;
    let req = format!("wss://{host}/ws?jobgate_key={}", info.key).into_client_request()?;
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    Ok(ws)
}

/// A WebSocket on a stable agent for the whole run: a message every ~5 s, echo checked.
async fn stable_ws(ctx: Arc<Ctx>, id: usize) {
    let info = {
        let stable = ctx.stable.lock().unwrap();
        stable[id % stable.len()].clone()
    };
    tokio::time::sleep(rand_ms(5000)).await;
    let mut ws = match ws_connect(&ctx, &info).await {
        Ok(ws) => ws,
        Err(e) => {
            inc(&ctx.c.ws_stable_broken);
            ctx.note(
                &ctx.losses,
                format!("stable WebSocket {id} to {} did not open: {e:#}", info.name),
            );
            return;
        }
    };
    inc(&ctx.c.ws_opened);
    let mut seq = 0u64;
    while !ctx.all_stop.load(Relaxed) {
        seq += 1;
        let text = format!("{id}:{seq}:{}", info.ident);
        let echo = tokio::time::timeout(Duration::from_secs(30), async {
            ws.send(Message::Text(text.clone())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok::<_, anyhow::Error>(t),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(other)) => bail!("unexpected {other:?}"),
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("closed"),
                }
            }
        })
        .await;
        match echo {
            Ok(Ok(t)) if t == text => inc(&ctx.c.ws_msgs_ok),
            Ok(Ok(t)) => {
                inc(&ctx.c.ws_wrong_echo);
                ctx.note(
                    &ctx.misroutes,
                    format!("stable WebSocket {id}: sent {text:?}, got {t:?}"),
                );
                return;
            }
            Ok(Err(e)) => {
                inc(&ctx.c.ws_stable_broken);
                ctx.note(
                    &ctx.losses,
                    format!("stable WebSocket {id} to {} broke: {e:#}", info.name),
                );
                return;
            }
            Err(_) => {
                inc(&ctx.c.ws_stable_broken);
                ctx.note(
                    &ctx.losses,
                    format!("stable WebSocket {id} to {}: no echo in 30 s", info.name),
                );
                return;
            }
        }
        let pause = rand_f64(4.0, 6.0);
        nap(pause, &ctx.all_stop).await;
    }
    let _ = ws.close(None).await;
}

/// WebSockets on churning agents: each must work while its agent lives and close soon
/// after the agent goes.
async fn churn_ws(ctx: Arc<Ctx>, id: usize) {
    while !ctx.phase_stop.load(Relaxed) {
        let Some(info) = ctx.pick_churn() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let epoch = info.epoch.load(Relaxed);
        let Ok(mut ws) = ws_connect(&ctx, &info).await else {
            if info.up_since(epoch) {
                // Opening may race the agent's end; count only if it stayed up.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if info.up_since(epoch) {
                    inc(&ctx.c.ws_churn_lost);
                    ctx.note(
                        &ctx.losses,
                        format!("churn WebSocket {id} to {} did not open", info.name),
                    );
                }
            }
            continue;
        };
        inc(&ctx.c.ws_opened);
        let mut seq = 0u64;
        loop {
            seq += 1;
            let text = format!("c{id}:{seq}");
            let echo = tokio::time::timeout(Duration::from_secs(15), async {
                ws.send(Message::Text(text.clone())).await?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => return Ok::<_, anyhow::Error>(t),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(other)) => bail!("unexpected {other:?}"),
                        Some(Err(e)) => return Err(e.into()),
                        None => bail!("closed"),
                    }
                }
            })
            .await;
            match echo {
                Ok(Ok(t)) if t == text => {
                    inc(&ctx.c.ws_msgs_ok);
                    if ctx.phase_stop.load(Relaxed) {
                        let _ = ws.close(None).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                }
                Ok(Ok(t)) => {
                    inc(&ctx.c.ws_wrong_echo);
                    ctx.note(
                        &ctx.misroutes,
                        format!("churn WebSocket {id}: sent {text:?}, got {t:?}"),
                    );
                    break;
                }
                Ok(Err(e)) => {
                    if info.up_since(epoch) {
                        inc(&ctx.c.ws_churn_lost);
                        ctx.note(
                            &ctx.losses,
                            format!(
                                "churn WebSocket {id} to {} broke while it was up: {e:#}",
                                info.name
                            ),
                        );
                    } else {
                        inc(&ctx.c.ws_churn_closed);
                        if let Some(t) = *info.ended_at.lock().unwrap() {
                            let ms = t.elapsed().as_millis() as u64;
                            ctx.c.ws_close_latency_max_ms.fetch_max(ms, Relaxed);
                        }
                    }
                    break;
                }
                Err(_) => {
                    if info.up_since(epoch) {
                        inc(&ctx.c.ws_churn_lost);
                        ctx.note(
                            &ctx.losses,
                            format!(
                                "churn WebSocket {id} to {}: no echo in 15 s while up",
                                info.name
                            ),
                        );
                    } else {
                        inc(&ctx.c.ws_hung);
                        ctx.note(&ctx.losses, format!("churn WebSocket {id} to {}: still open, silent, 15 s after its agent ended", info.name));
                    }
                    break;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The relay process and its figures
// ---------------------------------------------------------------------------------------

struct Relay {
    child: Child,
    https: u16,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
    fn fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count() as u64)
            .unwrap_or(0)
    }
    fn threads(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count() as u64)
            .unwrap_or(0)
    }
    fn cpu_s(&self) -> f64 {
        // utime + stime, fields 14 and 15 of /proc/pid/stat, in clock ticks (100/s here).
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
                Some(
                    (rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?)
                        / 100.0,
                )
            })
            .unwrap_or(0.0)
    }
}

fn start_relay(bin: &Path, dir: &Path, opts: &Opts) -> Result<Relay> {
    let mut child = Command::new(bin)
        .args([
            "relay",
            "--domain",
            DOMAIN,
            "--listen-https",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--tokens")
        .arg(dir.join("tokens.toml"))
        .args(["--resume-grace", &opts.grace.to_string()])
        .args([
            "--max-sessions-per-user",
            &(2 * (opts.agents + opts.stable) + 64).to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the relay")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if !sent && line.contains("agents (QUIC/UDP) on") {
                let _ = tx.send(line.clone());
                sent = true;
            } else if sent && (line.contains("ERROR") || line.contains("panicked")) {
                eprintln!("  relay: {line}");
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .context("the relay did not start")?;
    let port_after = |marker: &str| -> Result<u16> {
        let rest = line
            .split(marker)
            .nth(1)
            .ok_or_else(|| anyhow!("no {marker:?} in {line:?}"))?;
        let addr = rest.split([',', ' ']).find(|s| !s.is_empty()).unwrap_or("");
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {line:?}"))
    };
    let https = port_after("HTTPS on ")?;
    let quic = port_after("agents (QUIC/UDP) on ")?;
    let relay = Relay { child, https };
    std::fs::write(dir.join("quic.port"), quic.to_string())?;
    Ok(relay)
}

fn tls_connector(ca: &Path, alpn: &[&[u8]]) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

/// The relay's figures once quiet: the median of five samples a second apart.
async fn settled(relay: &Relay) -> Figures {
    let mut rss = Vec::new();
    let mut fds = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..5 {
        rss.push(relay.rss_kib());
        fds.push(relay.fds());
        threads.push(relay.threads());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rss.sort();
    fds.sort();
    threads.sort();
    Figures {
        rss_kib: rss[2],
        fds: fds[2],
        threads: threads[2],
    }
}

fn live_churn(ctx: &Ctx) -> usize {
    ctx.churn
        .iter()
        .filter(|s| s.lock().unwrap().is_some())
        .count()
}

/// Runs one phase of churn and load for `secs`; returns the peak relay RSS and fds.
async fn phase(ctx: &Arc<Ctx>, relay: &Relay, secs: u64, label: &str) -> (u64, u64) {
    ctx.phase_stop.store(false, Relaxed);
    let mut tasks = Vec::new();
    for slot in 0..ctx.opts.agents {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            // Spread the first connections over 5 s.
            tokio::time::sleep(rand_ms(5000)).await;
            agent_slot(ctx, slot, false, None).await
        }));
    }
    for id in 0..ctx.opts.clients {
        tasks.push(tokio::spawn(request_loop(ctx.clone(), id)));
    }
    for id in 0..ctx.opts.churn_ws {
        tasks.push(tokio::spawn(churn_ws(ctx.clone(), id)));
    }
    let start = Instant::now();
    let mut peak = (0u64, 0u64);
    let mut last = (
        Instant::now(),
        ctx.c.req_ok.load(Relaxed) + ctx.c.req_churn.load(Relaxed),
    );
    let mut next_print = Instant::now() + Duration::from_secs(15);
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, fds) = (relay.rss_kib(), relay.fds());
        peak = (peak.0.max(rss), peak.1.max(fds));
        if Instant::now() >= next_print {
            next_print += Duration::from_secs(15);
            let reqs = ctx.c.req_ok.load(Relaxed) + ctx.c.req_churn.load(Relaxed);
            let rate = (reqs - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), reqs);
            eprintln!(
                "  [{label} {:>4.0} s] live agents {} + {} stable, sessions opened {}, req/s {:.0}, ok {} misrouted {} lost {} churn-failed {}, ws msgs {}, relay RSS {} MiB, fds {}, threads {}",
                start.elapsed().as_secs_f64(),
                live_churn(ctx),
                ctx.opts.stable,
                ctx.c.sessions_opened.load(Relaxed),
                rate,
                ctx.c.req_ok.load(Relaxed),
                ctx.c.req_misrouted.load(Relaxed),
                ctx.c.req_lost.load(Relaxed),
                ctx.c.req_churn.load(Relaxed),
                ctx.c.ws_msgs_ok.load(Relaxed),
                rss / 1024,
                fds,
                relay.threads(),
            );
        }
    }
    ctx.phase_stop.store(true, Relaxed);
    let t = Instant::now();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    eprintln!(
        "  [{label}] stopped: every churning agent said Bye, clients done, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    peak
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let opts = Opts::from_env();
    let hard = {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        hard
    };
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_jobgate"));
    let dir = std::env::temp_dir().join(format!("jobgate-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new(&bin)
            .args(args)
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("jobgate {args:?} failed");
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    let dirs = dir.to_str().ok_or_else(|| anyhow!("temp dir not UTF-8"))?;
    run(&["dev-cert", "--domain", DOMAIN, "--out", dirs])?;
    let tokens = dir.join("tokens.toml");
    let token = run(&[
        "token",
        "issue",
        "--user",
        "soak",
        "--tokens",
        tokens.to_str().unwrap_or_default(),
    ])?;
    let token_path = dir.join("token");
    std::fs::write(&token_path, &token)?;

    eprintln!(
        "soak: {} churning agents (life {}-{} s; 60 % Bye, 25 % crash, 15 % blip+resume) + {} stable, {} request loops (1/4 HTTP/2), {} WebSockets on stable agents, {} on churning ones; warm-up {} s, soak {} s, resume grace {} s; RLIMIT_NOFILE {hard}",
        opts.agents, opts.life_min, opts.life_max, opts.stable, opts.clients, opts.websockets, opts.churn_ws, opts.warmup, opts.secs, opts.grace
    );
    let relay = start_relay(&bin, &dir, &opts)?;
    let quic: u16 = std::fs::read_to_string(dir.join("quic.port"))?.parse()?;
    let ca = dir.join("ca.pem");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let ctx = Arc::new(Ctx {
            dial: DialConfig {
                relay: format!("127.0.0.1:{quic}"),
                relay_ca: Some(ca.clone()),
                idle_timeout: Duration::from_secs(15),
            },
            token: Token(token.clone()),
            https_port: relay.https,
            tls_h1: tls_connector(&ca, &[b"http/1.1"])?,
            tls_h2: tls_connector(&ca, &[b"h2"])?,
            c: Counters::default(),
            churn: (0..opts.agents).map(|_| Mutex::new(None)).collect(),
            stable: Mutex::new(Vec::new()),
            phase_stop: AtomicBool::new(false),
            all_stop: AtomicBool::new(false),
            misroutes: Mutex::new(Vec::new()),
            losses: Mutex::new(Vec::new()),
            opts: opts.clone(),
        });
        let start_figures = settled(&relay).await;

        // Stable agents and their WebSockets: there from before the baseline to the end.
        let mut stable_tasks = Vec::new();
        let mut readies = Vec::new();
        for slot in 0..opts.stable {
            let (tx, rx) = tokio::sync::oneshot::channel();
            readies.push(rx);
            stable_tasks.push(tokio::spawn(agent_slot(ctx.clone(), slot, true, Some(tx))));
        }
        for rx in readies {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        let mut ws_tasks = Vec::new();
        for id in 0..opts.websockets {
            ws_tasks.push(tokio::spawn(stable_ws(ctx.clone(), id)));
        }

        phase(&ctx, &relay, opts.warmup, "warm-up").await;
        eprintln!("  quiesce: waiting out the resume grace ({} s) and 5 s more", opts.grace);
        tokio::time::sleep(Duration::from_secs(opts.grace + 5)).await;
        let baseline = settled(&relay).await;
        let warm_counts = ctx.c.snapshot();
        eprintln!(
            "  baseline (after warm-up, {} stable agents, {} WebSockets open): relay RSS {} KiB, fds {}, threads {}",
            opts.stable, ctx.c.ws_opened.load(Relaxed), baseline.rss_kib, baseline.fds, baseline.threads
        );
        let cpu0 = relay.cpu_s();
        let t0 = Instant::now();
        let peak = phase(&ctx, &relay, opts.secs, "soak").await;
        let soak_wall = t0.elapsed().as_secs_f64();
        let cpu = relay.cpu_s() - cpu0;
        eprintln!("  quiesce: waiting out the resume grace ({} s) and 5 s more", opts.grace);
        tokio::time::sleep(Duration::from_secs(opts.grace + 5)).await;
        let after = settled(&relay).await;

        // Stable WebSockets: still answering after everything?
        ctx.all_stop.store(true, Relaxed);
        for t in ws_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(40), t).await;
        }
        for t in stable_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        tokio::time::sleep(Duration::from_secs(opts.grace.min(3) + 2)).await;
        let empty = settled(&relay).await;
        Ok::<_, anyhow::Error>((ctx, start_figures, baseline, peak, after, empty, warm_counts, cpu, soak_wall))
    });
    let (ctx, start_figures, baseline, peak, after, empty, warm_counts, cpu, soak_wall) = result?;
    drop(runtime);

    let c = ctx.c.snapshot();
    let soak_count = |k: &str| c[k] - warm_counts.get(k).copied().unwrap_or(0);
    let requests = soak_count("req_ok")
        + soak_count("req_churn")
        + soak_count("req_lost")
        + soak_count("req_misrouted");
    let rss_limit = baseline.rss_kib as f64 * (1.0 + opts.rss_slack_pct / 100.0);
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        c["req_misrouted"] == 0 && c["ws_wrong_echo"] == 0,
        format!(
            "{} requests and {} WebSocket messages misrouted",
            c["req_misrouted"], c["ws_wrong_echo"]
        ),
    );
    check(
        c["req_lost"] == 0,
        format!(
            "{} requests lost (failed while their agent stayed up)",
            c["req_lost"]
        ),
    );
    check(
        c["ws_stable_broken"] == 0,
        format!("{} stable WebSockets broke", c["ws_stable_broken"]),
    );
    check(
        c["ws_churn_lost"] == 0,
        format!(
            "{} WebSockets on churning agents broke while their agent was up",
            c["ws_churn_lost"]
        ),
    );
    check(
        c["ws_hung"] == 0,
        format!(
            "{} WebSockets stayed open after their agent left",
            c["ws_hung"]
        ),
    );
    check(
        c["blip_new_name"] == 0,
        format!("{} blips came back under a new name", c["blip_new_name"]),
    );
    check(
        after.fds <= baseline.fds,
        format!(
            "relay fds {} after the soak vs {} before",
            after.fds, baseline.fds
        ),
    );
    check(
        after.rss_kib as f64 <= rss_limit,
        format!(
            "relay RSS {} KiB after the soak vs {} KiB before (> +{}%)",
            after.rss_kib, baseline.rss_kib, opts.rss_slack_pct
        ),
    );

    println!();
    println!(
        "soak summary ({} churning + {} stable agents, {:.0} s soak)",
        opts.agents, opts.stable, soak_wall
    );
    println!("  sessions opened              {:>10}  ({:.1}/s during the soak; Bye {}, crash {}, blips {} → same name {})",
        c["sessions_opened"], soak_count("sessions_opened") as f64 / soak_wall, c["sessions_bye"], c["sessions_crashed"], c["blips"], c["blip_same_name"]);
    println!(
        "  requests (soak)              {:>10}  ({:.0}/s; {} over HTTP/2 in all)",
        requests,
        requests as f64 / soak_wall,
        c["req_h2"]
    );
    println!(
        "    answered by the right agent {:>9}",
        soak_count("req_ok")
    );
    println!(
        "    failed as their agent left {:>9}  (404/503/502 while ending or blipping: expected)",
        soak_count("req_churn")
    );
    println!("    misrouted                  {:>9}", c["req_misrouted"]);
    println!("    lost (agent up throughout) {:>9}", c["req_lost"]);
    println!(
        "  WebSockets opened            {:>10}  (messages echoed intact: {})",
        c["ws_opened"], c["ws_msgs_ok"]
    );
    println!(
        "    stable ones broken         {:>9}  of {}",
        c["ws_stable_broken"], opts.websockets
    );
    println!(
        "    closed with their agent    {:>9}  (latest close {:.1} s after the agent ended)",
        c["ws_churn_closed"],
        c["ws_close_latency_max_ms"] as f64 / 1000.0
    );
    println!(
        "    wrong echo / hung / lost   {:>3} / {:>3} / {:>3}",
        c["ws_wrong_echo"], c["ws_hung"], c["ws_churn_lost"]
    );
    println!("  agent connect errors         {:>10}", c["open_errors"]);
    println!(
        "  relay CPU during the soak    {:>10.1} s  ({:.0} % of one core)",
        cpu,
        100.0 * cpu / soak_wall
    );
    println!("  relay                          RSS KiB    fds  threads");
    println!(
        "    at start (no agents)       {:>9} {:>6} {:>8}",
        start_figures.rss_kib, start_figures.fds, start_figures.threads
    );
    println!(
        "    baseline (after warm-up)   {:>9} {:>6} {:>8}",
        baseline.rss_kib, baseline.fds, baseline.threads
    );
    println!("    peak during the soak       {:>9} {:>6}", peak.0, peak.1);
    println!(
        "    after the soak, quiet      {:>9} {:>6} {:>8}",
        after.rss_kib, after.fds, after.threads
    );
    println!(
        "    all agents gone            {:>9} {:>6} {:>8}",
        empty.rss_kib, empty.fds, empty.threads
    );
    for m in ctx
        .misroutes
        .lock()
        .unwrap()
        .iter()
        .chain(ctx.losses.lock().unwrap().iter())
    {
        println!("  note: {m}");
    }

    let out = json!({
        "opts": {
            "agents": opts.agents, "stable": opts.stable, "secs": opts.secs, "warmup": opts.warmup,
            "clients": opts.clients, "websockets": opts.websockets, "churn_ws": opts.churn_ws,
            "life_min": opts.life_min, "life_max": opts.life_max, "grace": opts.grace,
        },
        "counters": c,
        "soak_seconds": soak_wall,
        "soak_requests": requests,
        "relay_cpu_seconds": cpu,
        "relay": {
            "start": {"rss_kib": start_figures.rss_kib, "fds": start_figures.fds, "threads": start_figures.threads},
            "baseline": {"rss_kib": baseline.rss_kib, "fds": baseline.fds, "threads": baseline.threads},
            "peak": {"rss_kib": peak.0, "fds": peak.1},
            "after": {"rss_kib": after.rss_kib, "fds": after.fds, "threads": after.threads},
            "empty": {"rss_kib": empty.rss_kib, "fds": empty.fds, "threads": empty.threads},
        },
        "failures": failures,
    });
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out_dir);
    let _ = std::fs::write(
        out_dir.join("soak.json"),
        serde_json::to_string_pretty(&out)?,
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        for f in &failures {
            println!("soak: FAIL: {f}");
        }
        std::process::exit(1);
    }
}
