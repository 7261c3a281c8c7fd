//! The clients' side of the soak, in the bench's own process: HTTP/1.1 and HTTP/2 loops
//! sending each request to a random live session over connections shared between sessions
//! (as a browser coalesces), WebSockets held on stable agents for the whole run, and
//! WebSockets on churning agents that must close when their agent goes. What is live comes
//! from the agents processes' events (see `agents.rs`).

use crate::agents::Launch;
use crate::{inc, nap, rand_f64, rand_ms, Counters, Opts, DOMAIN};
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jobgate_harness::client::{
    client_tls, connect_tls, ws_connect as open_websocket, Ws, WsTarget,
};
use jobgate_harness::stack::Session;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// How long a client waits for the agents processes to answer `sync`.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Live sessions
// ---------------------------------------------------------------------------------------

/// One agent generation as the clients see it.
pub struct LiveInfo {
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

type Slots = Vec<Mutex<Option<Arc<LiveInfo>>>>;

/// One agents process as the bench drives it.
pub struct AgentsProcess {
    child: Mutex<Option<Child>>,
    stdin: tokio::sync::Mutex<ChildStdin>,
    synced: watch::Receiver<u64>,
    stopped: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>,
    ready: tokio::sync::Mutex<watch::Receiver<bool>>,
    pid: u32,
}

impl AgentsProcess {
    /// Starts an agents process; its events update `ctx`.
    pub fn spawn(launch: &Launch<'_>, ctx: &Arc<Ctx>) -> Result<Arc<Self>> {
        let mut child = launch.command()?.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("agents process has no pid"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (synced_tx, synced) = watch::channel(0);
        let (ready_tx, ready) = watch::channel(false);
        let (stopped_tx, stopped) = tokio::sync::mpsc::unbounded_channel();
        let stable = launch.stable;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.split_once(' ').unwrap_or((line.as_str(), "")) {
                    ("synced", n) => {
                        let _ = synced_tx.send(n.parse().unwrap_or(0));
                    }
                    ("ready", _) => {
                        let _ = ready_tx.send(true);
                    }
                    ("stopped", _) => {
                        let _ = stopped_tx.send(());
                    }
                    (event, rest) => ctx.apply(stable, event, rest),
                }
            }
        });
        Ok(Arc::new(Self {
            child: Mutex::new(Some(child)),
            stdin: tokio::sync::Mutex::new(stdin),
            synced,
            stopped: tokio::sync::Mutex::new(stopped),
            ready: tokio::sync::Mutex::new(ready),
            pid,
        }))
    }

    /// The process id, for its figures in /proc.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    async fn send(&self, command: &str) -> Result<()> {
        let mut stdin = self.stdin.lock().await;
        stdin.write_all(format!("{command}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Waits until every stable agent is up.
    pub async fn ready(&self) -> Result<()> {
        let mut ready = self.ready.lock().await;
        tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r))
            .await
            .map_err(|_| anyhow!("the stable agents did not come up in 60 s"))??;
        Ok(())
    }

    /// Starts a phase of churn.
    pub async fn start(&self) -> Result<()> {
        self.send("start").await
    }

    /// Ends the phase (`stop`) or the run (`quit`): every agent concerned says Bye.
    pub async fn stop(&self, command: &str) -> Result<()> {
        self.send(command).await?;
        let mut stopped = self.stopped.lock().await;
        tokio::time::timeout(Duration::from_secs(90), stopped.recv())
            .await
            .map_err(|_| anyhow!("agents did not stop in 90 s"))?;
        if command == "quit" {
            let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut child) = child {
                let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            }
        }
        Ok(())
    }

    /// Waits until every event this process sent before now has been applied.
    async fn sync(&self, n: u64) -> Result<()> {
        self.send(&format!("sync {n}")).await?;
        let mut synced = self.synced.clone();
        tokio::time::timeout(SYNC_TIMEOUT, synced.wait_for(|s| *s >= n))
            .await
            .map_err(|_| anyhow!("no sync from the agents process in {SYNC_TIMEOUT:?}"))??;
        Ok(())
    }
}

/// Everything the clients share.
pub struct Ctx {
    pub opts: Opts,
    pub https_port: u16,
    /// TLS trusting the relay, offering HTTP/1.1 (and WebSockets) or HTTP/2.
    pub tls_h1: Arc<rustls::ClientConfig>,
    pub tls_h2: Arc<rustls::ClientConfig>,
    pub c: Counters,
    churn: Slots,
    stable: Slots,
    /// The agents processes, to sync with.
    pub procs: Mutex<Vec<Arc<AgentsProcess>>>,
    sync_seq: AtomicU64,
    /// Ends the current phase's client loops.
    pub phase_stop: AtomicBool,
    /// Ends the stable WebSockets.
    pub all_stop: AtomicBool,
    pub misroutes: Mutex<Vec<String>>,
    pub losses: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    /// Shared state for `opts`, with no agent live yet.
    pub fn new(opts: Opts, https_port: u16, ca: &std::path::Path) -> Result<Self> {
        Ok(Self {
            https_port,
            tls_h1: client_tls(ca, &[b"http/1.1"])?,
            tls_h2: client_tls(ca, &[b"h2"])?,
            c: Counters::default(),
            churn: (0..opts.agents).map(|_| Mutex::new(None)).collect(),
            stable: (0..opts.stable).map(|_| Mutex::new(None)).collect(),
            procs: Mutex::new(Vec::new()),
            sync_seq: AtomicU64::new(0),
            phase_stop: AtomicBool::new(false),
            all_stop: AtomicBool::new(false),
            misroutes: Mutex::new(Vec::new()),
            losses: Mutex::new(Vec::new()),
            opts,
        })
    }

    /// Applies one event from an agents process.
    fn apply(&self, stable: bool, event: &str, rest: &str) {
        let slots = if stable { &self.stable } else { &self.churn };
        let slot = |rest: &str| {
            rest.split(' ')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .and_then(|i| slots.get(i))
        };
        match event {
            "up" => {
                let mut words = rest.split(' ');
                let (Some(slot), Some(name), Some(key), Some(ident)) = (
                    words.next().and_then(|s| s.parse::<usize>().ok()),
                    words.next(),
                    words.next(),
                    words.next(),
                ) else {
                    return self.note(&self.losses, format!("bad event: up {rest}"));
                };
                if let Some(s) = slots.get(slot) {
                    *lock(s) = Some(Arc::new(LiveInfo {
                        name: name.to_owned(),
                        key: key.to_owned(),
                        ident: ident.to_owned(),
                        alive: AtomicBool::new(true),
                        epoch: AtomicU64::new(0),
                        ended_at: Mutex::new(None),
                    }));
                }
            }
            "blip" => {
                if let Some(info) = slot(rest).and_then(|s| lock(s).clone()) {
                    info.epoch.fetch_add(1, Relaxed);
                    info.alive.store(false, Relaxed);
                }
            }
            "back" => {
                if let Some(info) = slot(rest).and_then(|s| lock(s).clone()) {
                    info.alive.store(true, Relaxed);
                }
            }
            "down" => {
                if let Some(s) = slot(rest) {
                    let info = if stable {
                        lock(s).clone()
                    } else {
                        lock(s).take()
                    };
                    if let Some(info) = info {
                        info.alive.store(false, Relaxed);
                        *lock(&info.ended_at) = Some(Instant::now());
                    }
                }
            }
            "c" => match self.c.by_name(rest) {
                Some(counter) => inc(counter),
                None => self.note(&self.losses, format!("unknown counter {rest:?}")),
            },
            "note" => self.note(&self.losses, rest.to_owned()),
            _ => self.note(&self.losses, format!("unknown event {event} {rest}")),
        }
    }

    /// Whether `info` stayed up since `epoch`, once every event the agents processes sent
    /// before this call has been applied: a failure seen now was caused by (and so came
    /// after) any close that explains it, and that close was announced first.
    async fn still_up(&self, info: &LiveInfo, epoch: u64) -> bool {
        if !info.up_since(epoch) {
            return false;
        }
        let n = self.sync_seq.fetch_add(1, Relaxed) + 1;
        let procs = lock(&self.procs).clone();
        for p in procs {
            if let Err(e) = p.sync(n).await {
                self.note(&self.losses, format!("{e:#}"));
            }
        }
        info.up_since(epoch)
    }

    /// Live churning agents, as the clients know them.
    pub fn live_churn(&self) -> usize {
        self.churn.iter().filter(|s| lock(s).is_some()).count()
    }

    fn pick_churn(&self) -> Option<Arc<LiveInfo>> {
        let mut rng = rand::thread_rng();
        for _ in 0..16 {
            let slot = rng.gen_range(0..self.churn.len().max(1));
            if let Some(info) = self.churn.get(slot).and_then(|s| lock(s).clone()) {
                if info.alive.load(Relaxed) {
                    return Some(info);
                }
            }
        }
        None
    }

    fn pick_stable(&self, i: usize) -> Option<Arc<LiveInfo>> {
        let n = self.stable.len().max(1);
        self.stable.get(i % n).and_then(|s| lock(s).clone())
    }

    fn pick_any(&self) -> Option<Arc<LiveInfo>> {
        if rand::thread_rng().gen_bool(0.8) {
            if let Some(info) = self.pick_churn() {
                return Some(info);
            }
        }
        self.pick_stable(rand::thread_rng().gen_range(0..self.stable.len().max(1)))
    }

    /// Keeps the first 20 notes of a kind, and prints them as they come.
    pub fn note(&self, list: &Mutex<Vec<String>>, what: String) {
        let mut l = lock(list);
        if l.len() < 20 {
            eprintln!("  !! {what}");
            l.push(what);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

async fn tls_to_relay(
    ctx: &Ctx,
    config: &Arc<rustls::ClientConfig>,
    sni: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    Ok(connect_tls(config, ctx.https_port, sni).await?)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// Request loop: one connection (h1 or h2) for up to 200 requests to random sessions.
pub async fn request_loop(ctx: Arc<Ctx>, id: usize) {
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
            if ctx.still_up(&info, epoch).await {
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

/// A client's WebSocket through the relay to `info`'s `/ws`, the key in the query.
async fn ws_connect(ctx: &Ctx, info: &LiveInfo) -> Result<Ws> {
    let target = WsTarget::Relay {
        port: ctx.https_port,
        tls: ctx.tls_h1.clone(),
        session: Session {
            host: format!("{}.{DOMAIN}", info.name),
            cookie: String::new(),
        },
    };
    Ok(open_websocket(&target, &format!("/ws?jobgate_key={}", info.key)).await?)
}

/// Sends `text` and returns the next text message (the echo), skipping pings and pongs.
async fn echo(ws: &mut Ws, text: &str) -> Result<String> {
    ws.send(Message::Text(text.to_owned())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("unexpected {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed"),
        }
    }
}

/// A WebSocket on a stable agent for the whole run: a message every ~5 s, echo checked.
pub async fn stable_ws(ctx: Arc<Ctx>, id: usize) {
    let Some(info) = ctx.pick_stable(id) else {
        inc(&ctx.c.ws_stable_broken);
        return ctx.note(
            &ctx.losses,
            format!("stable WebSocket {id}: no stable agent"),
        );
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
        let echo = tokio::time::timeout(Duration::from_secs(30), echo(&mut ws, &text)).await;
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
pub async fn churn_ws(ctx: Arc<Ctx>, id: usize) {
    while !ctx.phase_stop.load(Relaxed) {
        let Some(info) = ctx.pick_churn() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let epoch = info.epoch.load(Relaxed);
        let Ok(mut ws) = ws_connect(&ctx, &info).await else {
            // Opening may race the agent's end; count only if it stayed up.
            if ctx.still_up(&info, epoch).await {
                inc(&ctx.c.ws_churn_lost);
                ctx.note(
                    &ctx.losses,
                    format!("churn WebSocket {id} to {} did not open", info.name),
                );
            }
            continue;
        };
        inc(&ctx.c.ws_opened);
        let mut seq = 0u64;
        loop {
            seq += 1;
            let text = format!("c{id}:{seq}");
            let echo = tokio::time::timeout(Duration::from_secs(15), echo(&mut ws, &text)).await;
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
                    if ctx.still_up(&info, epoch).await {
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
                        if let Some(t) = *lock(&info.ended_at) {
                            let ms = t.elapsed().as_millis() as u64;
                            ctx.c.ws_close_latency_max_ms.fetch_max(ms, Relaxed);
                        }
                    }
                    break;
                }
                Err(_) => {
                    if ctx.still_up(&info, epoch).await {
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
