//! What strangers can make the relay hold (issue #11, items 5 and 6): file descriptors
//! through idle client connections, pending agent handshakes, and memory through QUIC
//! flow control by an agent that never answers. Real relay binary, real TLS and QUIC.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use jobgate_protocol::{
    read_frame, AccessMode, ControlMessage, JobInfo, ResponseHead, StreamCode, Token,
    MAX_HEAD_FRAME, PROTOCOL_VERSION,
};
use quinn::{Connection, ConnectionError};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// --- Helpers ---------------------------------------------------------------------------

/// The metrics address a relay started with `--listen-metrics 127.0.0.1:0` printed.
fn metrics_addr(relay: &mut RelayProc) -> SocketAddr {
    relay.metrics_addr().expect("metrics address")
}

/// The relay's `/metrics` text.
async fn scrape(addr: SocketAddr) -> String {
    plain_http(addr, "GET", "/metrics", None).await.1
}

/// A TLS connection to the front door from the loopback address `source`.
async fn tls_connect_from(
    env: &TestEnv,
    source: [u8; 4],
    port: u16,
    host: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&env.ca)?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?).map_err(std::io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Slack on top of a timeout: timers, a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(8);

// --- Front door: file descriptors ---------------------------------------------------------

/// The red team's attack: 230 idle HTTP/2 connections from one address against a relay
/// whose open-files limit is 256. Before: every one was kept, the relay ran out of
/// descriptors, logged "accept failed" every 100 ms and a keyed request from elsewhere
/// timed out. Now: connections past the per-address cap are closed before TLS, and the
/// relay keeps descriptors for everyone else.
#[tokio::test]
async fn idle_connections_past_the_per_ip_cap_are_closed_and_others_still_served() {
    let env = TestEnv::new("limits-fd");
    let token = env.token_file("alice");
    let mut relay = start_relay_via(
        &["prlimit", "--nofile=256:256"],
        &env,
        0,
        0,
        &[
            "--max-client-connections-per-ip",
            "100",
            "--listen-metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_addr(&mut relay);
    let good = start_demo_agent(&env, &relay, &token, "good");

    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..230 {
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            tls_connect_from(
                &env,
                [127, 0, 0, 1],
                relay.https_port,
                &good.host(),
                &[b"h2"],
            ),
        )
        .await;
        match attempt {
            Ok(Ok(tls)) => open.push(tls),
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("a TLS handshake hung: the relay neither served nor closed it"),
        }
    }
    assert_eq!(open.len(), 100, "the per-address cap did not hold");
    assert_eq!(refused, 130);
    let text = scrape(metrics).await;
    assert_eq!(
        metric_sample(
            &text,
            "jobgate_client_connections_refused_total{cap=\"per_ip\"}"
        ),
        130.0
    );

    // A user elsewhere (127.0.0.2) is served at once, with its key.
    let request = async {
        let tls = tls_connect_from(
            &env,
            [127, 0, 0, 2],
            relay.https_port,
            &good.host(),
            &[b"h2"],
        )
        .await
        .expect("TLS from another address");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let request = Request::get(good.uri("/echo"))
            .body(empty())
            .expect("request");
        collect(sender.send_request(request).await.expect("response")).await
    };
    let (status, headers, _) = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the keyed request was not served within 10 s");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-app-label"], "good");
    let accept_failures = relay.proc.stderr().matches("accept failed").count();
    assert!(
        accept_failures <= 2,
        "accept failures logged {accept_failures} times:\n{}",
        relay.proc.stderr()
    );
    drop(open);
}

/// An HTTP/2 connection kept after its request used to live forever. Now it is closed
/// (GOAWAY) after the idle timeout, while connections with a download in flight or a
/// response being computed, and open WebSockets, are not idle.
#[tokio::test]
async fn idle_h2_connection_is_closed_but_busy_connections_are_not() {
    let env = TestEnv::new("limits-idle");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &["--client-idle-timeout", "2"]);
    let good = start_demo_agent(&env, &relay, &token, "good");
    let port = relay.https_port;
    let get = |path: &str| Request::get(good.uri(path)).body(empty()).expect("request");

    // Idle after one request.
    let mut idle = h2(&env, port, &good.host()).await;
    let (status, _, _) = collect(idle.send_request(get("/echo")).await.expect("echo")).await;
    assert_eq!(status, StatusCode::OK);

    // A download whose body the client leaves unread for a while.
    let mut downloading = h2(&env, port, &good.host()).await;
    let size = 8 * 1024 * 1024;
    let download = downloading
        .send_request(get(&format!("/bytes?n={size}")))
        .await
        .expect("download head");
    // An answer that takes longer than the idle timeout to come.
    let mut waiting = h2(&env, port, &good.host()).await;
    let slow = tokio::spawn(waiting.send_request(get("/slow?ms=5000")));
    // An open WebSocket.
    let host = good.host();
    let tls = tls_connect(&env, port, &host, &[b"http/1.1"]).await;
    let ws_request = format!("wss://{host}:{port}{}", good.path("/ws"))
        .into_client_request()
        .expect("request");
    let (mut ws, _) = tokio_tungstenite::client_async(ws_request, tls)
        .await
        .expect("websocket handshake");

    let closed_after = eventually(Duration::from_secs(2) + SLACK, || {
        let closed = idle.is_closed();
        async move { closed }
    })
    .await;
    assert!(
        closed_after.is_some(),
        "the idle HTTP/2 connection is still open"
    );
    // The others are older than the idle timeout by now, and still work.
    let (status, _, _) = collect(slow.await.expect("join").expect("slow answer")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!downloading.is_closed());
    let body = download.into_body().collect().await.expect("download body");
    assert_eq!(body.to_bytes().len(), size);
    ws.send(Message::Text("still here".into()))
        .await
        .expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::Text("still here".into())
    );
    drop(waiting);
}

// --- QUIC: pending handshakes and memory ---------------------------------------------------

fn client_config(env: &TestEnv) -> quinn::ClientConfig {
    agent_quic_config(&env.ca, Duration::from_secs(20)).expect("QUIC client config")
}

/// A QUIC connection to the relay (the handshake's result), nothing sent on it.
async fn dial(
    env: &TestEnv,
    endpoint: &quinn::Endpoint,
    relay: &RelayProc,
) -> Result<Connection, ConnectionError> {
    let addr = ([127, 0, 0, 1], relay.quic_port).into();
    let connecting = endpoint
        .connect_with(client_config(env), addr, "localhost")
        .expect("connect");
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("QUIC handshake answered in time")
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint")
}

/// Connections that never say `Hello` used to be uncapped (each held for the handshake
/// timeout). Now, from half the cap on, new ones must answer a QUIC Retry, and past the
/// cap they are refused; once the pending ones go, agents get in again.
#[tokio::test]
async fn pending_handshakes_over_the_cap_are_refused() {
    let env = TestEnv::new("limits-pending");
    let token = env.token_file("alice");
    let mut relay = start_relay(
        &env,
        &[
            "--max-pending-handshakes",
            "4",
            "--listen-metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_addr(&mut relay);
    let endpoint = client_endpoint();
    let mut pending = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        match dial(&env, &endpoint, &relay).await {
            Ok(connection) => pending.push(connection),
            Err(ConnectionError::ConnectionClosed(close))
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                refused += 1
            }
            Err(e) => panic!("unexpected handshake failure: {e}"),
        }
    }
    assert_eq!((pending.len(), refused), (4, 4));
    let text = scrape(metrics).await;
    assert_eq!(
        metric_sample(&text, "jobgate_agent_handshakes_pending"),
        4.0
    );
    assert_eq!(
        metric_sample(&text, "jobgate_agent_handshakes_retried_total"),
        2.0
    );
    assert_eq!(
        metric_sample(&text, "jobgate_agent_handshakes_refused_total"),
        4.0
    );

    for connection in &pending {
        connection.close(0u32.into(), b"gone");
    }
    let drained = eventually(Duration::from_secs(10), || async {
        metric_sample(&scrape(metrics).await, "jobgate_agent_handshakes_pending") == 0.0
    })
    .await;
    assert!(drained.is_some(), "pending handshakes not released");
    let good = start_demo_agent(&env, &relay, &token, "good");
    assert_serves(
        &env,
        relay.https_port,
        &good,
        "after the pending handshakes",
    )
    .await;
}

/// A hand-made agent with a valid token: it answers request streams on its own terms.
struct EvilSession {
    _endpoint: quinn::Endpoint,
    connection: Connection,
    host: String,
    key_query: String,
}

async fn evil_session(env: &TestEnv, relay: &RelayProc, token: &str) -> EvilSession {
    let endpoint = client_endpoint();
    let connection = dial(env, &endpoint, relay).await.expect("QUIC handshake");
    let hello = ControlMessage::Hello {
        version: PROTOCOL_VERSION,
        token: Token(token.to_owned()),
        access: Some(AccessMode::Link),
        share: Default::default(),
        job: JobInfo::default(),
        resume: None,
        reservation: None,
        moving: false,
    };
    let session = hand_made_session(&connection, &hello)
        .await
        .expect("Welcome");
    let key_query = session.key_query();
    let host = format!("{}.{DOMAIN}", session.name);
    // The control stream stays open for the session's life.
    tokio::spawn(async move {
        let _keep = session.control;
        std::future::pending::<()>().await
    });
    EvilSession {
        _endpoint: endpoint,
        connection,
        host,
        key_query,
    }
}

/// Serves `connection`'s request streams: `/never` gets no answer (the code the relay
/// stopped the stream with goes to `stopped`); anything else gets a `200` head and then
/// a flood of body the client never reads (`flooded` counts what the relay let in).
async fn evil_agent(connection: Connection, flooded: Arc<AtomicU64>, stopped: Arc<AtomicU64>) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let flooded = flooded.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let head = read_frame(&mut recv, MAX_HEAD_FRAME).await;
            let Ok(Some(head)) = head else {
                return;
            };
            if String::from_utf8_lossy(&head).contains("/never") {
                if let Ok(Some(code)) = send.stopped().await {
                    stopped.store(code.into_inner(), Ordering::Relaxed);
                }
                return;
            }
            let head = ResponseHead {
                status: StatusCode::OK,
                headers: http::HeaderMap::new(),
            };
            if send.write_all(&head.to_frame()).await.is_err() {
                return;
            }
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            while send.write_chunk(chunk.clone()).await.is_ok() {
                flooded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
    }
}

/// With a token, an agent whose answers the relay has to buffer (here: bodies nobody
/// reads) pinned the 32 MiB connection window per session (4 sessions × 4 requests:
/// +128 MiB and more). With the memory budget spent (0 MiB here) every session gets the
/// small window: the relay stays within a few MiB per session. And a request it never
/// answers gets `504` after the response-head timeout, its stream reset with `Cancelled`.
#[tokio::test]
async fn unanswered_and_unread_agent_data_is_bounded_and_times_out() {
    let env = TestEnv::new("limits-memory");
    let evil_file = env.token_file("mallory");
    let token = std::fs::read_to_string(evil_file)
        .expect("token")
        .trim()
        .to_owned();
    let relay = start_relay(
        &env,
        &[
            "--max-buffered-mib",
            "0",
            "--response-head-timeout",
            "3",
            "--max-sessions-per-user",
            "8",
        ],
    );
    let pid = relay.proc.pid();
    let flooded = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicU64::new(0));
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let session = evil_session(&env, &relay, &token).await;
        tokio::spawn(evil_agent(
            session.connection.clone(),
            flooded.clone(),
            stopped.clone(),
        ));
        sessions.push(session);
    }
    let before_kib = rss_kib(pid);

    // Four downloads per session on one HTTP/2 connection each; the bodies stay unread.
    let (mut held, mut senders) = (Vec::new(), Vec::new());
    for session in &sessions {
        let mut sender = h2(&env, relay.https_port, &session.host).await;
        for i in 0..4 {
            let uri = format!(
                "https://{}:{}/flood/{i}?{}",
                session.host, relay.https_port, session.key_query
            );
            let request = Request::get(uri).body(empty()).expect("request");
            let response = sender.send_request(request).await.expect("flood head");
            assert_eq!(response.status(), StatusCode::OK);
            held.push(response);
        }
        senders.push(sender);
    }
    // Wait until the relay lets no more in (its windows are full).
    let mut last = u64::MAX;
    let settled = eventually(Duration::from_secs(30), || {
        let now = flooded.load(Ordering::Relaxed);
        let same = now == last;
        last = now;
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            same
        }
    })
    .await;
    assert!(settled.is_some(), "the agents' data kept flowing in");
    let grown_mib = rss_kib(pid).saturating_sub(before_kib) / 1024;
    assert!(
        grown_mib < 32,
        "relay memory grew by {grown_mib} MiB holding 16 unread answers (flooded {} MiB)",
        flooded.load(Ordering::Relaxed) >> 20
    );

    // A request the agent never answers: 504 after the head timeout, stream cancelled.
    let session = &sessions[0];
    let started = Instant::now();
    let path = format!("/never?{}", session.key_query);
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(3) + SLACK,
        get(&env, relay.https_port, &session.host, &path),
    )
    .await
    .expect("no answer within the head timeout");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let cancelled = eventually(Duration::from_secs(10), || {
        let code = stopped.load(Ordering::Relaxed);
        async move { code == u64::from(StreamCode::Cancelled.as_u32()) }
    })
    .await;
    assert!(
        cancelled.is_some(),
        "the stream was not stopped with Cancelled"
    );
    drop((held, senders));
}
