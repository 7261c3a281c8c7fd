//! The demo's web app: a page with a WebSocket echo, plus endpoints the tests use.
//!
//! * `GET /` — an HTML page that opens a WebSocket to `/ws` and echoes what you type;
//! * `GET|POST /echo` — JSON with the method, target, headers and the body's length and
//!   SHA-256 (the body is streamed, never held);
//! * `GET /bytes?n=N` — N bytes of a repeating pattern, streamed;
//! * `GET /ws` — WebSocket echo; the first offered subprotocol is accepted;
//! * `GET /slow?ms=N` — answers after N milliseconds;
//! * `GET /set-cookie` — sets a cookie with a `Domain=` attribute (the relay strips it).
//!
//! Every response carries `x-app-label` so tests can tell apps apart.

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// Size of each chunk `/bytes` sends.
const CHUNK: usize = 64 * 1024;

/// Flags of the hidden `demo-app` subcommand.
#[derive(Debug, Args)]
pub struct DemoAppArgs {
    /// Where to listen: 127.0.0.1:PORT or unix:/path.
    #[arg(long)]
    pub listen: String,
    /// Label echoed in `x-app-label`.
    #[arg(long, default_value = "demo")]
    pub label: String,
}

type AppBody = BoxBody<Bytes, std::io::Error>;

/// Runs the app until the process is stopped.
pub async fn run(args: DemoAppArgs) -> anyhow::Result<()> {
    let label = Arc::new(args.label);
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener =
            tokio::net::UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(serve(stream, label.clone()));
        }
    } else {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        serve_tcp(listener, label).await
    }
}

/// Serves the app on an already bound TCP listener.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    label: Arc<String>,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, label.clone()));
    }
}

async fn serve<S>(stream: S, label: Arc<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(req, label.clone()));
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

fn full(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn handle(
    req: Request<Incoming>,
    label: Arc<String>,
) -> Result<Response<AppBody>, Infallible> {
    let mut response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => html(PAGE),
        (_, "/echo") => echo(req).await,
        (&Method::GET, "/bytes") => bytes(&req),
        (&Method::GET, "/ws") => websocket(req),
        (&Method::GET, "/slow") => {
            // Answers after `ms` milliseconds (at most 60 s): for tests of requests in flight.
            let ms: u64 = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000)
                .min(60_000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            status(StatusCode::OK, "slow\n")
        }
        (&Method::GET, "/set-cookie") => {
            // Tries to plant a cookie on the whole domain: the relay must make it host-only.
            let mut response = status(StatusCode::OK, "cookie set\n");
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static("planted=1; Domain=.jobgate.test; Path=/; Secure"),
            );
            response
        }
        _ => status(StatusCode::NOT_FOUND, "not found\n"),
    };
    if let Ok(value) = HeaderValue::from_str(&label) {
        response.headers_mut().insert("x-app-label", value);
    }
    Ok(response)
}

fn status(code: StatusCode, text: &'static str) -> Response<AppBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
}

fn html(page: &'static str) -> Response<AppBody> {
    let mut response = Response::new(full(page));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

async fn echo(req: Request<Incoming>) -> Response<AppBody> {
    let (parts, mut body) = req.into_parts();
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    length += data.len() as u64;
                    hasher.update(&data);
                }
            }
            Err(_) => return status(StatusCode::BAD_REQUEST, "body failed\n"),
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "target": parts.uri.to_string(),
        "headers": headers,
        "body_bytes": length,
        "body_sha256": digest,
    });
    let mut response = Response::new(full(json.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The byte at `offset` of every `/bytes` body: a pattern tests can check cheaply.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn bytes(req: &Request<Incoming>) -> Response<AppBody> {
    let n: u64 = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("n=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // One 251-aligned block repeated: every chunk is a cheap slice of the same buffer.
    let block: Bytes = (0..(CHUNK as u64 / 251 + 1) * 251)
        .map(pattern_byte)
        .collect::<Vec<_>>()
        .into();
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let block = block.clone();
        async move {
            if sent >= n {
                return None;
            }
            let len = (n - sent).min((CHUNK as u64 / 251) * 251) as usize;
            let start = (sent % 251) as usize;
            let chunk = block.slice(start..start + len);
            Some((
                Ok::<_, std::io::Error>(Frame::data(chunk)),
                sent + len as u64,
            ))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

fn websocket(mut req: Request<Incoming>) -> Response<AppBody> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return status(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let protocol = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", accept);
    }
    if let Some(protocol) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert("sec-websocket-protocol", protocol);
    }
    response
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>jobgate demo</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em}
#log{background:#f4f4f4;padding:1em;min-height:6em;white-space:pre-wrap}</style></head>
<body><h1>It works: this page came through jobgate</h1>
<p>Your browser spoke HTTPS to the relay; the relay sent the request over QUIC to the agent,
which asked this app. Below, a WebSocket takes the same path both ways.</p>
<form id="f"><input id="msg" value="hello through the tunnel" size="30"> <button>Send over WebSocket</button></form>
<div id="log"></div>
<script>
const log = (t) => document.getElementById('log').textContent += t + "\n";
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws', ['demo']);
ws.onopen = () => log('WebSocket open (subprotocol: ' + ws.protocol + ')');
ws.onmessage = (e) => log('echo: ' + e.data);
ws.onclose = () => log('WebSocket closed');
document.getElementById('f').onsubmit = (e) => { e.preventDefault(); ws.send(document.getElementById('msg').value); };
</script></body></html>
"#;
