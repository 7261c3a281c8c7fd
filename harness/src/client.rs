//! Clients of the relay's front door: TLS trusting the dev CA, HTTP/1.1 and HTTP/2 over
//! hyper, WebSockets over tokio-tungstenite; and small helpers for tests.

use crate::error::{Error, Result};
use crate::stack::{AgentProc, TestEnv};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

/// The body type of test requests.
pub type TestBody = BoxBody<Bytes, std::io::Error>;
/// How often [`eventually`] checks.
const EVENTUALLY_POLL: Duration = Duration::from_millis(50);
/// How long [`assert_serves`] gives the good session to answer.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS client configuration trusting only `ca`, offering `alpn`.
pub fn client_tls(ca: &Path, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    client_tls_with(ca, alpn, rustls::crypto::ring::default_provider())
}

/// [`client_tls`] with a chosen crypto provider (to offer other cipher suites).
pub fn client_tls_with(
    ca: &Path,
    alpn: &[&[u8]],
    provider: rustls::crypto::CryptoProvider,
) -> Result<Arc<rustls::ClientConfig>> {
    let tls = |e: &dyn std::fmt::Display| Error::Tls(format!("{}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| tls(&e))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The QUIC client configuration of a hand-made agent (tests of what a broken or
/// malicious agent can do to the relay): TLS trusting `ca`, the agents' ALPN, and the
/// agents' transport settings with `idle` as the idle timeout.
pub fn agent_quic_config(ca: &Path, idle: Duration) -> Result<quinn::ClientConfig> {
    let tls = client_tls(ca, &[jobgate_protocol::ALPN])?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(format!("QUIC TLS: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(jobgate_protocol::quic::transport_config(
        idle,
        Duration::from_secs(2),
        1024,
    ));
    Ok(config)
}

/// How long a hand-made agent waits for the relay's answer to its `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// A hand-made agent's session: its control stream, kept open for the session's life,
/// and what the relay's `Welcome` said.
pub struct HandMadeSession {
    /// The control stream (send, receive halves).
    pub control: (quinn::SendStream, quinn::RecvStream),
    /// The session's name.
    pub name: String,
    /// The URL with its access key, as the relay gave it.
    pub access_url: String,
}

impl HandMadeSession {
    /// The access key's query (`jobgate_key=...`), empty for a public session.
    pub fn key_query(&self) -> String {
        self.access_url
            .split_once('?')
            .map(|(_, q)| q.to_owned())
            .unwrap_or_default()
    }
}

/// Opens the control stream on `connection`, says `hello` and reads the relay's answer,
/// which must be `Welcome`, as an honest agent would.
pub async fn hand_made_session(
    connection: &quinn::Connection,
    hello: &jobgate_protocol::ControlMessage,
) -> Result<HandMadeSession> {
    use jobgate_protocol::{read_frame, write_frame, ControlMessage, MAX_CONTROL_FRAME};
    let agent = |e: &dyn std::fmt::Display| Error::Agent(e.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| agent(&e))?;
    write_frame(&mut send, &hello.to_payload())
        .await
        .map_err(|e| agent(&e))?;
    let payload = tokio::time::timeout(WELCOME_TIMEOUT, read_frame(&mut recv, MAX_CONTROL_FRAME))
        .await
        .map_err(|_| agent(&"no answer to Hello in time"))?
        .map_err(|e| agent(&e))?
        .ok_or_else(|| agent(&"the relay closed the control stream"))?;
    match ControlMessage::from_payload(&payload) {
        Ok(ControlMessage::Welcome {
            name, access_url, ..
        }) => Ok(HandMadeSession {
            control: (send, recv),
            name,
            access_url,
        }),
        _ => Err(agent(&format!(
            "expected Welcome, got {}",
            String::from_utf8_lossy(&payload)
        ))),
    }
}

/// A TLS connection to 127.0.0.1:`port` with SNI `host` (TCP_NODELAY on).
pub async fn connect_tls(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    host: &str,
) -> Result<TlsStream<TcpStream>> {
    let tcp = connect_tcp(port).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Error::Tls(format!("server name {host:?}: {e}")))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| Error::Tls(format!("handshake with {host} on port {port}: {e}")))
}

/// A TCP connection to 127.0.0.1:`port` with TCP_NODELAY.
pub async fn connect_tcp(port: u16) -> Result<TcpStream> {
    let what = || format!("connecting to 127.0.0.1:{port}");
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(Error::io(what()))?;
    tcp.set_nodelay(true).map_err(Error::io(what()))?;
    Ok(tcp)
}

/// A TLS connection to the relay's front door for `host` (SNI), offering `alpn`.
pub async fn tls_connect(
    env: &TestEnv,
    port: u16,
    host: &str,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let config = client_tls(&env.ca, alpn).unwrap_or_else(|e| panic!("{e}"));
    connect_tls(&config, port, host)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An empty body.
pub fn empty() -> TestBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A body of `data`.
pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An HTTP/1.1 connection to `host` through the relay (upgrades enabled).
pub async fn h1(
    env: &TestEnv,
    port: u16,
    host: &str,
) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let tls = tls_connect(env, port, host, &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    sender
}

/// An HTTP/2 connection to the relay, SNI `host` (other names may share it).
pub async fn h2(
    env: &TestEnv,
    port: u16,
    host: &str,
) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tls = tls_connect(env, port, host, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "relay must offer h2"
    );
    h2_handshake(tls).await.unwrap_or_else(|e| panic!("{e}"))
}

/// HTTP/2 over an established connection; the connection task is spawned.
pub async fn h2_handshake<B>(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
) -> Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| Error::Http(format!("h2 handshake: {e}")))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A GET over a fresh HTTP/1.1 connection; returns status, headers and the whole body.
pub async fn get(
    env: &TestEnv,
    port: u16,
    host: &str,
    path: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut sender = h1(env, port, host).await;
    let request = Request::get(path)
        .header("host", host)
        .body(empty())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    collect(response).await
}

/// The status of a GET of `path` (the access key added) on `agent`'s session through the
/// relay's front door at `port`; `502` when the connection itself fails (a relay that
/// is restarting, a session on its way to another relay).
pub async fn status_of(env: &TestEnv, port: u16, agent: &AgentProc, path: &str) -> StatusCode {
    let host = agent.host();
    let Ok(config) = client_tls(&env.ca, &[b"http/1.1"]) else {
        return StatusCode::BAD_GATEWAY;
    };
    let Ok(tls) = connect_tls(&config, port, &host).await else {
        return StatusCode::BAD_GATEWAY;
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tls)).await
    else {
        return StatusCode::BAD_GATEWAY;
    };
    tokio::spawn(connection);
    let request = Request::get(agent.path(path))
        .header("host", &host)
        .body(empty())
        .expect("request");
    match sender.send_request(request).await {
        Ok(response) => response.status(),
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

/// The byte at `offset` of the demo app's `/bytes?n=N` body.
pub fn demo_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Downloads `/bytes?n=N` from `agent`'s session through the relay and checks every byte
/// and the length.
pub async fn download_checked(env: &TestEnv, port: u16, agent: &AgentProc, n: u64) {
    let host = agent.host();
    let mut sender = h1(env, port, &host).await;
    let request = Request::get(agent.path(&format!("/bytes?n={n}")))
        .header("host", &host)
        .body(empty())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut offset = 0u64;
    while let Some(frame) = body.frame().await {
        let data = frame.expect("body frame").into_data().unwrap_or_default();
        for (i, byte) in data.iter().enumerate() {
            if *byte != demo_byte(offset + i as u64) {
                panic!("byte {} differs", offset + i as u64);
            }
        }
        offset += data.len() as u64;
    }
    assert_eq!(offset, n, "download length");
}

/// Uploads `n` bytes (a streamed body, 64 KiB chunks) to `/echo` of `agent`'s session
/// and checks that the app got all of them.
pub async fn upload_checked(env: &TestEnv, port: u16, agent: &AgentProc, n: u64) {
    use futures_util::StreamExt;
    let host = agent.host();
    let mut sender = h1(env, port, &host).await;
    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
    let chunks = n / chunk.len() as u64;
    let stream = futures_util::stream::iter(0..chunks)
        .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone())));
    let request = Request::post(agent.path("/echo"))
        .header("host", &host)
        .header("content-length", n)
        .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
        .expect("request");
    let (status, _, body) = collect(sender.send_request(request).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["body_bytes"], n, "upload length");
}

/// One plain-HTTP/1.1 request to a listener without TLS (the relay's admin and metrics
/// listener): `method path`, with `Authorization: Bearer <bearer>` if given; the status
/// and the body as text.
pub async fn plain_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the plain-HTTP listener");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(empty()).expect("request"))
        .await
        .expect("response");
    let (status, _, body) = collect(response).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of one Prometheus sample (`name` with its labels, exactly as exposed).
pub fn metric_sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Status, headers and the whole body of a response.
pub async fn collect(
    response: Response<hyper::body::Incoming>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

/// `body` as JSON; panics with the body if it is not.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Polls `check` until it is true or `timeout` passes; returns the time it took.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(EVENTUALLY_POLL).await;
    }
    None
}

/// The well-behaved session `good` (demo app labelled "good") answers a fresh request:
/// 200 from its own app, which saw exactly the request sent (no smuggled prefix from an
/// earlier attack, nothing confused by a misbehaving neighbour).
pub async fn assert_serves(env: &TestEnv, port: u16, good: &AgentProc, context: &str) {
    let probe = format!("/echo?probe={:016x}", rand::random::<u64>());
    let (host, path) = (good.host(), good.path(&probe));
    let request = get(env, port, &host, &path);
    let Ok((status, headers, body)) = tokio::time::timeout(SERVE_TIMEOUT, request).await else {
        panic!("{context}: the good session did not answer within {SERVE_TIMEOUT:?}");
    };
    assert_eq!(status, StatusCode::OK, "{context}: the good session failed");
    assert_eq!(
        headers.get("x-app-label").map(|v| v.as_bytes()),
        Some(&b"good"[..]),
        "{context}: answered by the wrong app"
    );
    assert_eq!(json(&body)["target"], probe.as_str(), "{context}");
}

// ---------------------------------------------------------------------------------------
// WebSockets
// ---------------------------------------------------------------------------------------

/// Any byte stream a WebSocket can run over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A WebSocket over plain TCP or TLS.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Where a WebSocket client connects.
#[derive(Clone)]
pub enum WsTarget {
    /// Straight to an app on 127.0.0.1:port.
    Direct(u16),
    /// Through a relay's front door: its port, TLS (ALPN http/1.1), the session.
    Relay {
        /// The relay's HTTPS port.
        port: u16,
        /// Trusts the relay's certificate.
        tls: Arc<rustls::ClientConfig>,
        /// The session's host; its cookie is sent unless `path` carries the key.
        session: crate::stack::Session,
    },
}

/// Opens a WebSocket to `path` (with its query) at `target`; fails unless the answer is
/// 101.
pub async fn ws_connect(target: &WsTarget, path: &str) -> Result<Ws> {
    let ws_err = |e: &dyn std::fmt::Display| Error::WebSocket(format!("{path}: {e}"));
    let (io, uri, cookie): (Box<dyn Io>, String, Option<(&str, String)>) = match target {
        WsTarget::Direct(port) => (
            Box::new(connect_tcp(*port).await?),
            format!("ws://127.0.0.1:{port}{path}"),
            None,
        ),
        WsTarget::Relay { port, tls, session } => (
            Box::new(connect_tls(tls, *port, &session.host).await?),
            format!("wss://{}:{port}{path}", session.host),
            (!path.contains("jobgate_key=")).then(|| {
                (
                    session.cookie.as_str(),
                    format!("https://{}:{port}", session.host),
                )
            }),
        ),
    };
    let mut request = uri.into_client_request().map_err(|e| ws_err(&e))?;
    if let Some((cookie, origin)) = cookie {
        // As a browser on the session's own page: the relay honours the cookie on a
        // WebSocket handshake only with the session's own `Origin`.
        let value = http::HeaderValue::from_str(cookie).map_err(|e| ws_err(&e))?;
        request.headers_mut().insert(http::header::COOKIE, value);
        let origin = http::HeaderValue::from_str(&origin).map_err(|e| ws_err(&e))?;
        request.headers_mut().insert(http::header::ORIGIN, origin);
    }
    let (ws, response) = tokio_tungstenite::client_async(request, io)
        .await
        .map_err(|e| ws_err(&e))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(ws_err(&format!("handshake answered {}", response.status())));
    }
    Ok(ws)
}
