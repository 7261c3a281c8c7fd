//! The backend app of the benches and the soak: ONE implementation of what they need
//! behind an agent, served in-process ([`spawn_app`], the soak: one per agent) or as its
//! own process ([`main_if_requested`], the tunnel bench re-executing itself, so its CPU
//! is counted apart). HTTP/1.1 and cleartext HTTP/2 on one port.
//!
//! * `GET /small` — 100 bytes;
//! * `GET /bytes?n=N` — N zero bytes, streamed in 64 KiB chunks;
//! * `POST|PUT /upload` — reads the body, answers its length;
//! * `GET /id` — the app's label (the soak tells agents apart by it);
//! * `GET /ws` — WebSocket echo (text and binary);
//! * `GET /ws-sink` — WebSocket sink: counts binary bytes, answers the count to `"end"`.
//!
//! (`jobgate demo-app`, the product's demo page that the tests run, is separate: the
//! binary cannot depend on this test crate.)

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Size of the `/small` body.
pub const SMALL: usize = 100;
/// Chunk of streamed bodies.
const CHUNK: usize = 64 * 1024;
/// The argument that turns a bench binary into this app: `--jobgate-bench-backend ADDR
/// [--ready-file PATH] [--delay-ms N]`.
pub const APP_FLAG: &str = "--jobgate-bench-backend";
/// What the standalone app prints once it listens.
pub const LISTENING: &str = "backend listening on ";
/// Back-off after a failed accept (e.g. out of descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// What the sink WebSocket takes as "tell me the count".
pub const SINK_END: &str = "end";

type AppBody = BoxBody<Bytes, std::io::Error>;

/// Serves the app on `listener` until the task is dropped; `label` answers `/id`.
pub async fn serve_app(listener: TcpListener, label: Arc<str>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, label.clone()));
            }
            Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
        }
    }
}

/// Binds 127.0.0.1 on a free port and serves the app there in a task.
pub async fn spawn_app(label: &str) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(serve_app(listener, label.into()))))
}

async fn serve_connection(stream: tokio::net::TcpStream, label: Arc<str>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let service = hyper::service::service_fn(move |req| handle(req, label.clone()));
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

async fn handle(req: Request<Incoming>, label: Arc<str>) -> Result<Response<AppBody>, Infallible> {
    Ok(match req.uri().path() {
        "/small" => Response::new(full(Bytes::from_static(&[b'x'; SMALL]))),
        "/bytes" => stream_zeros(query_u64(&req, "n=").unwrap_or(0)),
        "/upload" => upload_sink(req).await,
        "/id" => Response::new(full(label.as_bytes().to_vec())),
        "/ws" => websocket(req, WsMode::Echo),
        "/ws-sink" => websocket(req, WsMode::Sink),
        _ => with_status(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn full(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn with_status(code: StatusCode, text: &'static str) -> Response<AppBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
}

/// The number after `key` (e.g. `"n="`) in the query.
fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key))?
        .parse()
        .ok()
}

fn stream_zeros(n: u64) -> Response<AppBody> {
    // One zeroed block; every chunk is a cheap slice of it.
    let block = Bytes::from(vec![0u8; CHUNK]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let block = block.clone();
        async move {
            if sent >= n {
                return None;
            }
            let len = (n - sent).min(CHUNK as u64) as usize;
            Some((
                Ok::<_, std::io::Error>(Frame::data(block.slice(..len))),
                sent + len as u64,
            ))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    response
}

async fn upload_sink(req: Request<Incoming>) -> Response<AppBody> {
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    n += data.len() as u64;
                }
            }
            Err(_) => return with_status(StatusCode::BAD_REQUEST, "body failed\n"),
        }
    }
    Response::new(full(format!("{n}\n")))
}

/// What a WebSocket does with what it receives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WsMode {
    /// Sends every text and binary message back.
    Echo,
    /// Counts binary bytes; answers the count (and restarts it) on a text [`SINK_END`].
    Sink,
}

fn websocket(mut req: Request<Incoming>, mode: WsMode) -> Response<AppBody> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return with_status(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            run_websocket(ws, mode).await;
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
    response
}

async fn run_websocket<S>(mut ws: WebSocketStream<S>, mode: WsMode)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut received = 0u64;
    while let Some(Ok(message)) = ws.next().await {
        let reply = match (mode, message) {
            (_, Message::Close(_)) => break,
            (WsMode::Sink, Message::Text(t)) if t == SINK_END => {
                Some(Message::Text(std::mem::take(&mut received).to_string()))
            }
            (WsMode::Sink, Message::Binary(b)) => {
                received += b.len() as u64;
                None
            }
            (_, m @ (Message::Text(_) | Message::Binary(_))) => Some(m),
            _ => None,
        };
        if let Some(reply) = reply {
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// As its own process
// ---------------------------------------------------------------------------------------

/// If `args` hold [`APP_FLAG`], runs the app until killed and returns the error that
/// ended it (`Some`); otherwise `None` (the caller goes on with its own work).
///
/// `--ready-file PATH` gets `<unix nanos> <pid>` written right after `listen()` (the
/// moment the app accepts connections); `--delay-ms N` waits first, like an app that
/// takes a while to start.
pub fn main_if_requested(args: &[String]) -> Option<std::io::Error> {
    let mut it = args.iter();
    let mut listen = None;
    let mut ready_file = None;
    let mut delay_ms = 0u64;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            APP_FLAG => listen = it.next().cloned(),
            "--ready-file" => ready_file = it.next().map(PathBuf::from),
            "--delay-ms" => delay_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    if !args.iter().any(|a| a == APP_FLAG) {
        return None;
    }
    let Some(listen) = listen else {
        return Some(std::io::Error::other(format!("{APP_FLAG} needs ADDR")));
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Some(e),
    };
    runtime
        .block_on(standalone(listen, ready_file, delay_ms))
        .err()
}

async fn standalone(
    listen: String,
    ready_file: Option<PathBuf>,
    delay_ms: u64,
) -> std::io::Result<()> {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let listener = TcpListener::bind(&listen).await?;
    // Written right after listen(): from now on the app accepts connections.
    if let Some(path) = ready_file {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::fs::write(&path, format!("{nanos} {}\n", std::process::id()))?;
    }
    eprintln!("{LISTENING}{}", listener.local_addr()?);
    serve_app(listener, "backend".into()).await;
    Ok(())
}
