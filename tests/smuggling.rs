//! User stories for the HTTP edge between browser, relay, agent and app (issue 11 items 1,
//! 3 and 10): an attacker must not be able to desynchronise the agent's keep-alive
//! connections to the app (request smuggling through a refused `Upgrade`), spoof where a
//! request came from, tunnel past the relay with `h2c`, or make the browser act on a
//! response header that reaches beyond the session's own origin.
//!
//! The app here is a real keep-alive HTTP/1.1 server (hyper) that behaves as nginx does:
//! it answers a request before reading its body, then reads exactly `Content-Length`
//! bytes of body before it parses the next request on the connection, and it refuses an
//! upgrade it does not speak with a plain `426` on the same connection. It records every
//! request it parses.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long a test waits for any one answer (a busy 2-core machine is slow, never this slow).
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// One request as the app parsed it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
}

/// The strict keep-alive app and what it saw.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path).collect()
    }

    fn find(&self, path: &str) -> Option<Seen> {
        self.seen().into_iter().find(|s| s.path == path)
    }
}

async fn start_backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, record.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Backend { addr, seen }
}

type AppBody = Full<Bytes>;

async fn answer(
    req: Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<AppBody>, Infallible> {
    let path = req.uri().path().to_owned();
    record.lock().expect("lock").push(Seen {
        method: req.method().to_string(),
        path: path.clone(),
        headers: req.headers().clone(),
    });
    let upgrade = req
        .headers()
        .get("upgrade")
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
    if upgrade.as_deref() == Some("websocket") {
        return Ok(accept_websocket(req));
    }
    // Answer at once and read the body afterwards, exactly `Content-Length` bytes, before
    // the next request on this connection is parsed (nginx's discarded body).
    let body = req.into_body();
    tokio::spawn(async move {
        let _ = body.collect().await;
    });
    let mut response = if upgrade.is_some() {
        let mut r = Response::new(Full::new(Bytes::from_static(b"no such upgrade\n")));
        *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
        r
    } else {
        Response::new(Full::new(Bytes::from(format!("path={path}\n"))))
    };
    if path == "/cross-origin" {
        let h = response.headers_mut();
        h.insert(
            "clear-site-data",
            "\"cookies\", \"storage\"".parse().expect("v"),
        );
        h.insert(
            "set-cookie2",
            "a=1; Domain=.jobgate.test".parse().expect("v"),
        );
        h.insert(
            "alt-svc",
            "h2=\"evil.example:443\"; ma=86400".parse().expect("v"),
        );
        h.insert("x-jobgate", "relay".parse().expect("v"));
        h.insert(
            "strict-transport-security",
            "max-age=60".parse().expect("v"),
        );
        h.insert("x-app-header", "kept".parse().expect("v"));
    }
    Ok(response)
}

/// A `101` for a WebSocket handshake, and an echo server on the upgraded connection.
fn accept_websocket(req: Request<Incoming>) -> Response<AppBody> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() || ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert("connection", "upgrade".parse().expect("v"));
    h.insert("upgrade", "websocket".parse().expect("v"));
    h.insert("sec-websocket-accept", key.parse().expect("v"));
    response
}

/// A relay, the strict app, and a public session (no access key: the attacker needs no
/// credentials) forwarding to it. Fields drop in order: agent, relay, directory.
struct Fixture {
    agent: AgentProc,
    relay: RelayProc,
    backend: Backend,
    env: TestEnv,
}

async fn fixture(name: &str) -> Fixture {
    let env = TestEnv::new(&format!("smuggle-{name}"));
    let token = env.token_file("alice");
    let relay = start_relay(&env, &["--allow-public"]);
    let backend = start_backend().await;
    let to = backend.addr.to_string();
    let agent = start_agent(&env, &relay, &token, &["--access", "public", "--to", &to]);
    Fixture {
        agent,
        relay,
        backend,
        env,
    }
}

impl Fixture {
    /// `request` on a fresh HTTP/1.1 connection through the relay: status, headers, body.
    async fn request(&self, request: Request<TestBody>) -> (StatusCode, HeaderMap, Bytes) {
        self.try_request(request)
            .await
            .unwrap_or_else(|| panic!("no answer within {ANSWER_WAIT:?}"))
    }

    /// Like `request`, but `None` if no answer came within `ANSWER_WAIT`.
    async fn try_request(
        &self,
        request: Request<TestBody>,
    ) -> Option<(StatusCode, HeaderMap, Bytes)> {
        let host = self.agent.host();
        let exchange = async {
            let mut sender = h1(&self.env, self.relay.https_port, &host).await;
            collect(sender.send_request(request).await.expect("response")).await
        };
        tokio::time::timeout(ANSWER_WAIT, exchange).await.ok()
    }

    fn authority(&self) -> String {
        format!("{}:{}", self.agent.host(), self.relay.https_port)
    }

    /// Writes raw bytes on a fresh TLS connection and reads what comes back until the
    /// relay closes it or `ANSWER_WAIT` passes.
    async fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let host = self.agent.host();
        let mut tls = tls_connect(&self.env, self.relay.https_port, &host, &[b"http/1.1"]).await;
        // The relay may close while the request is still being written: a fine answer.
        let _ = tls.write_all(bytes).await;
        let _ = tls.flush().await;
        read_until_closed(&mut tls, ANSWER_WAIT).await
    }
}

/// Reads until EOF, an error or `wait`.
async fn read_until_closed<R: AsyncRead + Unpin>(reader: &mut R, wait: Duration) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
        bytes.extend_from_slice(&buf[..n]);
    }
    bytes
}

/// The exact size of the head hyper writes for a request the app recorded as `seen`
/// (request line, one `name: value` line per field, blank line): the agent's HTTP/1.1
/// client writes field names in lowercase, as they are recorded.
fn head_len(seen: &Seen) -> usize {
    let line = seen.method.len() + 1 + seen.path.len() + " HTTP/1.1\r\n".len();
    let fields: usize = seen
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + fields + 2
}

/// A complete hidden request with attacker-chosen Host, client address and cookie,
/// padded to exactly `len` bytes (when `len` is big enough).
fn hidden_request(len: usize) -> String {
    let start = "GET /smuggled HTTP/1.1\r\nHost: evil.example\r\n\
                 X-Forwarded-For: 6.6.6.6\r\nCookie: session=attacker\r\nX-Pad: ";
    let pad = len.saturating_sub(start.len() + 4).max(1);
    format!("{start}{}\r\n\r\n", "p".repeat(pad))
}

/// The attack of issue 11 item 1, with the upgrade token `token`:
/// 1. learn the exact head the app gets for a POST whose body is a hidden request;
/// 2. send an upgrade request whose `Content-Length` covers exactly that head (its body, a
///    hidden request too, never reaches the app on the old code);
/// 3. send that POST: an app still waiting for the upgrade request's body takes the POST's
///    head as that body and runs the hidden request in the POST's body;
/// 4. poison once more and let an innocent client ask for its own page.
async fn assert_upgrade_with_body_never_smuggles(token: &str) {
    let fx = fixture(&format!("up-{token}")).await;
    let authority = fx.authority();
    let post = || {
        Request::post("/calibrate")
            .header("host", &authority)
            .body(full(hidden_request(0)))
            .expect("request")
    };
    let (status, _, _) = fx.request(post()).await;
    assert_eq!(status, StatusCode::OK, "calibration");
    let calibrated = fx.backend.find("/calibrate").expect("calibration recorded");
    let n = head_len(&calibrated);
    let poison = |path: &str| {
        let hidden = hidden_request(n);
        format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
             Upgrade: {token}\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        )
    };

    let first = fx.raw(poison("/poison-1").as_bytes()).await;
    let (follow_up, _, follow_up_body) = fx.request(post()).await;
    let second = fx.raw(poison("/poison-2").as_bytes()).await;
    let innocent = fx
        .try_request(
            Request::get("/innocent")
                .header("host", &authority)
                .body(empty())
                .expect("request"),
        )
        .await
        .map(|(status, _, body)| (status, body))
        .unwrap_or((
            StatusCode::GATEWAY_TIMEOUT,
            Bytes::from_static(b"(no answer)"),
        ));

    let paths = fx.backend.paths();
    let report = format!(
        "token {token:?}: the app parsed {paths:?}; first poison answered:\n{}\n\
         follow-up POST answered {follow_up} {:?}; innocent answered {} {:?}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&follow_up_body),
        innocent.0,
        String::from_utf8_lossy(&innocent.1),
    );
    assert!(
        !paths.iter().any(|p| p == "/smuggled"),
        "a hidden request reached the app: {report}"
    );
    assert_eq!(
        (innocent.0, &innocent.1[..]),
        (StatusCode::OK, &b"path=/innocent\n"[..]),
        "the innocent client got someone else's answer: {report}"
    );
    assert_eq!(
        (follow_up, &follow_up_body[..]),
        (StatusCode::OK, &b"path=/calibrate\n"[..]),
        "{report}"
    );
    // The relay itself refuses the upgrade with a body (its own 400, connection closed),
    // and the app never sees it.
    for answer in [&first, &second] {
        let text = String::from_utf8_lossy(answer);
        assert!(
            text.starts_with("HTTP/1.1 400") && text.contains("x-jobgate: relay"),
            "the relay must refuse an upgrade with a body itself: {report}"
        );
    }
    assert!(
        !paths.iter().any(|p| p.starts_with("/poison")),
        "an upgrade with a body reached the app: {report}"
    );
}

#[tokio::test]
async fn an_unknown_upgrade_with_a_body_never_smuggles_a_request_to_the_app() {
    assert_upgrade_with_body_never_smuggles("foo").await;
}

#[tokio::test]
async fn an_h2c_upgrade_with_a_body_never_smuggles_a_request_to_the_app() {
    assert_upgrade_with_body_never_smuggles("h2c").await;
}

#[tokio::test]
async fn a_websocket_upgrade_with_a_body_never_smuggles_a_request_to_the_app() {
    assert_upgrade_with_body_never_smuggles("websocket").await;
}

/// `h2c` would turn the app connection into an HTTP/2 tunnel past the relay's header
/// rewriting: the relay refuses it even without a body, and the app never sees it.
#[tokio::test]
async fn an_h2c_upgrade_is_refused_by_the_relay() {
    let fx = fixture("h2c").await;
    let authority = fx.authority();
    for (i, token) in ["h2c", "H2C", "websocket, h2c", "foo"].iter().enumerate() {
        let request = format!(
            "GET /h2c-{i} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: {token}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let answer = fx.raw(request.as_bytes()).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 400") && text.contains("x-jobgate: relay"),
            "upgrade {token:?} was not refused by the relay:\n{text}"
        );
    }
    let paths = fx.backend.paths();
    assert!(
        !paths.iter().any(|p| p.starts_with("/h2c")),
        "a non-WebSocket upgrade reached the app: {paths:?}"
    );
}

#[tokio::test]
async fn a_websocket_upgrade_still_works_end_to_end() {
    let fx = fixture("ws").await;
    let host = fx.agent.host();
    let tls = tls_connect(&fx.env, fx.relay.https_port, &host, &[b"http/1.1"]).await;
    let request = format!("wss://{}/ws", fx.authority())
        .into_client_request()
        .expect("request");
    let (mut ws, response) =
        tokio::time::timeout(ANSWER_WAIT, tokio_tungstenite::client_async(request, tls))
            .await
            .expect("handshake in time")
            .expect("websocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..10 {
        let text = format!("message {i}");
        ws.send(Message::Text(text.clone())).await.expect("send");
        let echoed = ws.next().await.expect("message").expect("ok");
        assert_eq!(echoed, Message::Text(text));
    }
    ws.close(None).await.expect("close");

    let seen = fx.backend.find("/ws").expect("handshake recorded");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert!(
        !seen.headers.contains_key("content-length")
            && !seen.headers.contains_key("transfer-encoding"),
        "an upgrade reaches the app without framing fields: {:?}",
        seen.headers
    );
    // The app connection that carried the WebSocket is not reused: a plain request after
    // it is answered correctly.
    let (status, _, body) = fx
        .request(
            Request::get("/after-ws")
                .header("host", fx.authority())
                .body(empty())
                .expect("request"),
        )
        .await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"path=/after-ws\n"[..])
    );
}

/// Fields a client could send to lie about its address, scheme, port or path; the app
/// (Tornado prefers `X-Scheme`, Werkzeug's ProxyFix reads `X-Forwarded-Port` and
/// `-Prefix`, others `True-Client-IP`...) must only see the relay's word.
#[tokio::test]
async fn spoofed_forwarding_headers_never_reach_the_app() {
    let fx = fixture("spoof").await;
    let spoofed = [
        ("x-scheme", "http"),
        ("x-forwarded-port", "80"),
        ("true-client-ip", "6.6.6.6"),
        ("x-forwarded-server", "evil.example"),
        ("x-forwarded-ssl", "off"),
        ("x-url-scheme", "http"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-client-ip", "6.6.6.6"),
        ("cf-connecting-ip", "6.6.6.6"),
        ("front-end-https", "off"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "evil.example"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6;proto=http"),
    ];
    let mut request = Request::get("/spoof").header("host", fx.authority());
    for (name, value) in spoofed {
        request = request.header(name, value);
    }
    let (status, _, _) = fx.request(request.body(empty()).expect("request")).await;
    assert_eq!(status, StatusCode::OK);
    let seen = fx.backend.find("/spoof").expect("recorded");
    let leaked: Vec<_> = spoofed
        .iter()
        .filter(|(name, value)| seen.headers.get(*name).is_some_and(|v| v == value))
        .collect();
    assert!(
        leaked.is_empty(),
        "client-sent fields reached the app: {leaked:?}"
    );
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-host"], fx.authority().as_str());
}

/// One session must not reach across origins through its response headers: all sessions
/// are siblings under one registrable domain, so `Clear-Site-Data: "cookies"` would erase
/// every session's access cookie in the browser.
#[tokio::test]
async fn cross_origin_response_headers_never_reach_the_browser() {
    let fx = fixture("cross").await;
    let (status, headers, _) = fx
        .request(
            Request::get("/cross-origin")
                .header("host", fx.authority())
                .body(empty())
                .expect("request"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for name in ["clear-site-data", "set-cookie2", "alt-svc", "x-jobgate"] {
        assert!(
            !headers.contains_key(name),
            "{name} from the app reached the browser: {headers:?}"
        );
    }
    // Headers that stay within the session's own origin pass.
    assert_eq!(headers["x-app-header"], "kept");
    assert_eq!(headers["strict-transport-security"], "max-age=60");
}
