//! QUIC glue shared by the relay and the agent (feature `quic`).
//!
//! Both ends do the same three things with a request stream: read its body as an HTTP
//! body, pump an HTTP body into it, and, after a `101`, splice it to an upgraded
//! connection. They also must agree on transport tuning. Those live here, once.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use quinn::{RecvStream, SendStream, VarInt};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::StreamCode;

/// Largest chunk handed out by one read of a stream body. Matches the flow-control
/// granularity we want on bulk transfers without holding big buffers.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Per-stream receive window: large enough for WAN bandwidth × RTT on one download.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// Per-connection receive window shared by all of a session's streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// Send window per connection (quinn's default is the receive window; keep them equal).
pub const SEND_WINDOW: u64 = 32 * 1024 * 1024;

/// Socket buffers requested for the UDP socket; the default drops bursts under load.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

impl From<StreamCode> for VarInt {
    /// A stream code as QUIC carries it (`RESET_STREAM`, `STOP_SENDING`).
    fn from(code: StreamCode) -> Self {
        VarInt::from_u32(code.as_u32())
    }
}

impl From<crate::CloseCode> for VarInt {
    /// A close code as QUIC carries it (`CONNECTION_CLOSE`).
    fn from(code: crate::CloseCode) -> Self {
        VarInt::from_u32(code.as_u32())
    }
}

/// Transport tuning both ends use.
///
/// `max_incoming_bidi` is how many streams the *peer* may open at once: the agent sets it
/// high (the relay opens one stream per request), the relay keeps it small (the agent only
/// opens the control stream).
pub fn transport_config(
    idle_timeout: Duration,
    keep_alive: Duration,
    max_incoming_bidi: u32,
) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    // An idle timeout of more than 2^62 ms cannot happen with our Durations; fall back to
    // quinn's default if conversion fails.
    if let Ok(timeout) = quinn::IdleTimeout::try_from(idle_timeout) {
        config.max_idle_timeout(Some(timeout));
    }
    config
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_incoming_bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW);
    config.datagram_receive_buffer_size(None); // no QUIC datagrams: nothing would read them
    Arc::new(config)
}

/// The relay's tuning: [`transport_config`], but every connection starts with a
/// connection-level receive window of `initial_receive_window` bytes, which the relay
/// raises once the agent is admitted (`quinn::Connection::set_receive_window`), and
/// streams get `stream_receive_window` bytes each.
pub fn relay_transport_config(
    idle_timeout: Duration,
    keep_alive: Duration,
    max_incoming_bidi: u32,
    initial_receive_window: u32,
    stream_receive_window: u32,
) -> Arc<quinn::TransportConfig> {
    let mut config = transport_config(idle_timeout, keep_alive, max_incoming_bidi);
    // Freshly made, so never shared yet: `get_mut` always succeeds.
    if let Some(config) = Arc::get_mut(&mut config) {
        config
            .receive_window(VarInt::from_u32(initial_receive_window))
            .stream_receive_window(VarInt::from_u32(stream_receive_window));
    }
    config
}

/// A QUIC receive stream as a streaming HTTP body, chunk by chunk, without copying.
pub struct QuicBody {
    recv: Option<RecvStream>,
}

impl QuicBody {
    /// Wraps the receive half of a request stream whose head frame was already read.
    pub fn new(recv: RecvStream) -> Self {
        Self { recv: Some(recv) }
    }

    /// A body with no data (a request whose stream is kept for an upgrade).
    pub fn empty() -> Self {
        Self { recv: None }
    }
}

impl Body for QuicBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(None);
        };
        // `read_chunk` is cancel-safe: a fresh future per poll loses nothing and keeps
        // the waker registration of the last poll.
        let result = {
            let read = pin!(recv.read_chunk(MAX_CHUNK, true));
            std::task::ready!(read.poll(cx))
        };
        match result {
            Ok(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk.bytes)))),
            Ok(None) => {
                self.recv = None;
                Poll::Ready(None)
            }
            Err(e) => {
                self.recv = None;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

use std::future::Future;

impl Drop for QuicBody {
    /// A body dropped before its end (the HTTP client went away) tells the sender why.
    /// A body whose end already arrived but was never read (hyper does not read a GET's
    /// empty body) is left alone: a `STOP_SENDING` there would cost a packet per request.
    fn drop(&mut self) {
        let Some(recv) = self.recv.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let at_end = matches!(
            pin!(recv.read_chunk(MAX_CHUNK, true)).poll(&mut cx),
            Poll::Ready(Ok(None))
        );
        if !at_end {
            let _ = recv.stop(VarInt::from(StreamCode::Cancelled));
        }
    }
}

/// How a body pump ended.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The HTTP side failed (client or app went away mid-body).
    #[error("body source failed: {0}")]
    Source(String),
    /// The QUIC side failed (peer stopped or reset the stream, connection lost).
    #[error("stream write failed: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Streams `body` into `send` with back-pressure (each chunk waits for flow-control
/// credit) and returns the byte count. Does not finish the stream: the caller decides
/// (a request that may be upgraded keeps it open).
pub async fn pump_body<B>(body: B, send: &mut SendStream) -> Result<u64, PumpError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = pin!(body);
    let mut total = 0u64;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| PumpError::Source(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            send.write_chunk(data).await?;
        }
    }
    Ok(total)
}

/// Resets `send` and stops `recv` with `code`: the request is abandoned both ways.
pub fn abandon(send: &mut SendStream, recv: &mut RecvStream, code: StreamCode) {
    let code = VarInt::from(code);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Smallest buffer for the upgraded → QUIC direction of a pipe: what an idle WebSocket
/// holds for hours. QUIC → upgraded reads need none (chunks are handed over as they are).
const PIPE_BUFFER_MIN: usize = 1024;
/// Largest buffer that direction grows to while data streams.
const PIPE_BUFFER_MAX: usize = 64 * 1024;

/// Splices an upgraded connection (WebSocket) to a QUIC stream pair until both
/// directions are closed. Each direction ends on EOF, which is passed on as a FIN/shutdown.
pub async fn pipe<T>(upgraded: T, mut send: SendStream, mut recv: RecvStream) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up_read, mut up_write) = tokio::io::split(upgraded);
    let quic_to_up = async {
        while let Some(chunk) = recv
            .read_chunk(MAX_CHUNK, true)
            .await
            .map_err(std::io::Error::other)?
        {
            up_write.write_all(&chunk.bytes).await?;
        }
        up_write.shutdown().await
    };
    let up_to_quic = async {
        // Adaptive: doubles while reads fill it, falls back to the minimum once traffic
        // turns sparse, so bulk transfers get big reads and idle sockets cost little.
        let mut buf = vec![0u8; PIPE_BUFFER_MIN];
        loop {
            let n = up_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n])
                .await
                .map_err(std::io::Error::other)?;
            if n == buf.len() && buf.len() < PIPE_BUFFER_MAX {
                buf = vec![0u8; buf.len() * 2];
            } else if n < PIPE_BUFFER_MIN && buf.len() > PIPE_BUFFER_MIN {
                buf = vec![0u8; PIPE_BUFFER_MIN];
            }
        }
        send.finish().map_err(std::io::Error::other)
    };
    // The first error ends both directions; dropping the streams stops/finishes them.
    tokio::try_join!(quic_to_up, up_to_quic).map(|_| ())
}
