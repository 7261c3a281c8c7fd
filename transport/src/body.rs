//! What both ends do with a request stream, over either transport: read it as a
//! streaming HTTP body, pump an HTTP body into it, and, after a `101`, splice it to an
//! upgraded connection.

use crate::{RecvStream, SendStream};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use jobgate_protocol::StreamCode;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest chunk handed out by one read of a stream body. Matches the flow-control
/// granularity we want on bulk transfers without holding big buffers.
pub const MAX_CHUNK: usize = jobgate_protocol::quic::MAX_CHUNK;

/// A request or response stream's receive half as a streaming HTTP body, chunk by chunk
/// (without copying on QUIC).
pub struct StreamBody {
    recv: Option<RecvStream>,
}

impl StreamBody {
    /// Wraps the receive half of a stream whose head frame was already read.
    pub fn new(recv: RecvStream) -> Self {
        Self { recv: Some(recv) }
    }

    /// A body with no data (a request whose stream is kept for an upgrade).
    pub fn empty() -> Self {
        Self { recv: None }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(None);
        };
        match std::task::ready!(recv.poll_read_chunk(cx, MAX_CHUNK)) {
            Ok(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Ok(None) => {
                self.recv = None;
                Poll::Ready(None)
            }
            Err(e) => {
                self.recv = None;
                Poll::Ready(Some(Err(e)))
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

impl Drop for StreamBody {
    /// A body dropped before its end (the HTTP client went away) tells the sender why.
    /// A body whose end already arrived but was never read (hyper does not read a GET's
    /// empty body) is left alone: a `STOP_SENDING` there would cost a packet per request.
    fn drop(&mut self) {
        let Some(recv) = self.recv.as_mut() else {
            return;
        };
        if !recv.is_at_end() {
            recv.stop(StreamCode::Cancelled);
        }
    }
}

/// How a body pump ended.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The HTTP side failed (client or app went away mid-body).
    #[error("body source failed: {0}")]
    Source(String),
    /// The stream failed (peer stopped or reset it, connection lost).
    #[error("stream write failed: {0}")]
    Stream(#[from] std::io::Error),
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
    send.reset(code);
    recv.stop(code);
}

/// Smallest buffer for the upgraded → stream direction of a pipe: what an idle WebSocket
/// holds for hours. Stream → upgraded reads need none on QUIC (chunks are handed over).
const PIPE_BUFFER_MIN: usize = 1024;
/// Largest buffer that direction grows to while data streams.
const PIPE_BUFFER_MAX: usize = 64 * 1024;

/// Most chunks gathered for one vectored write in a pipe.
const PIPE_BATCH_CHUNKS: usize = 16;

/// The chunks `recv` has ready now (without waiting), up to [`PIPE_BATCH_CHUNKS`], and
/// whether the stream's end was among them. Allocates only when there is one.
fn gather_ready(recv: &mut RecvStream) -> std::io::Result<(Vec<Bytes>, bool)> {
    // The chunk reads are polled with a waker that goes nowhere: a chunk not ready yet is
    // awaited properly by the pipe's next `read_chunk`, which registers the real waker.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut batch = Vec::new();
    while batch.len() < PIPE_BATCH_CHUNKS {
        match recv.poll_read_chunk(&mut cx, MAX_CHUNK) {
            Poll::Ready(Ok(Some(chunk))) => {
                if batch.is_empty() {
                    batch.reserve_exact(PIPE_BATCH_CHUNKS + 1);
                }
                batch.push(chunk);
            }
            Poll::Ready(Ok(None)) => return Ok((batch, true)),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok((batch, false))
}

/// Writes every chunk of `batch` in order, in as few vectored writes as the writer takes
/// (at most [`PIPE_BATCH_CHUNKS`] slices each).
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    // The slices are made afresh on each poll (cheap) rather than kept in the future,
    // which lives as long as the pipe.
    std::future::poll_fn(|cx| {
        while first < batch.len() {
            let mut slices = [std::io::IoSlice::new(&[]); PIPE_BATCH_CHUNKS];
            let count = (batch.len() - first).min(PIPE_BATCH_CHUNKS);
            for (slice, chunk) in slices.iter_mut().zip(&batch[first..]) {
                *slice = std::io::IoSlice::new(chunk);
            }
            let mut written = std::task::ready!(
                Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..count])
            )?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            while written > 0 {
                let chunk = &mut batch[first];
                if written >= chunk.len() {
                    written -= chunk.len();
                    first += 1;
                } else {
                    bytes::Buf::advance(chunk, written);
                    written = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// Splices an upgraded connection (WebSocket) to a stream pair until both directions
/// are closed. Each direction ends on EOF, which is passed on as a FIN/shutdown.
pub async fn pipe<T>(upgraded: T, mut send: SendStream, mut recv: RecvStream) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up_read, mut up_write) = tokio::io::split(upgraded);
    let stream_to_up = async {
        // A QUIC chunk is one packet's worth (a few KiB): what has arrived goes out in one
        // vectored write instead of a write per chunk. The batch lives only while it is
        // written, so an idle WebSocket holds no buffer for it.
        while let Some(chunk) = recv.read_chunk(MAX_CHUNK).await? {
            let (mut more, ended) = gather_ready(&mut recv)?;
            if more.is_empty() {
                up_write.write_all(&chunk).await?;
            } else {
                more.insert(0, chunk);
                write_all_chunks(&mut up_write, &mut more).await?;
            }
            if ended {
                break;
            }
        }
        up_write.shutdown().await
    };
    let up_to_stream = async {
        // Adaptive: doubles while reads fill it, falls back to the minimum once traffic
        // turns sparse, so bulk transfers get big reads and idle sockets cost little.
        let mut buf = vec![0u8; PIPE_BUFFER_MIN];
        loop {
            let n = up_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n]).await?;
            if n == buf.len() && buf.len() < PIPE_BUFFER_MAX {
                buf = vec![0u8; buf.len() * 2];
            } else if n < PIPE_BUFFER_MIN && buf.len() > PIPE_BUFFER_MIN {
                buf = vec![0u8; PIPE_BUFFER_MIN];
            }
        }
        send.finish().await
    };
    // The first error ends both directions; dropping the streams stops/finishes them.
    tokio::try_join!(stream_to_up, up_to_stream).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call and counts its calls.
    struct Narrow {
        written: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let mut room = this.limit;
            for buf in bufs {
                let n = buf.len().min(room);
                this.written.extend_from_slice(&buf[..n]);
                room -= n;
            }
            Poll::Ready(Ok(this.limit - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// More chunks than one vectored write takes, of uneven sizes.
    fn chunks() -> (Vec<Bytes>, Vec<u8>) {
        let batch: Vec<Bytes> = (0..=PIPE_BATCH_CHUNKS)
            .map(|i| Bytes::from(vec![i as u8; 1000 + 37 * i]))
            .collect();
        let joined = batch.concat();
        (batch, joined)
    }

    #[tokio::test]
    async fn a_batch_of_chunks_goes_out_in_vectored_writes_of_up_to_16() {
        let (mut batch, joined) = chunks();
        let mut out = Narrow {
            written: Vec::new(),
            limit: usize::MAX,
            calls: 0,
        };
        write_all_chunks(&mut out, &mut batch).await.expect("write");
        assert_eq!(out.written, joined);
        // 17 chunks: one write of 16 slices, one of the last.
        assert_eq!(out.calls, 2);
    }

    #[tokio::test]
    async fn partial_writes_resume_mid_chunk_in_order() {
        let (mut batch, joined) = chunks();
        let mut out = Narrow {
            written: Vec::new(),
            limit: 777, // ends most writes inside a chunk
            calls: 0,
        };
        write_all_chunks(&mut out, &mut batch).await.expect("write");
        assert_eq!(out.written, joined);
        assert_eq!(out.calls, joined.len().div_ceil(777));
    }
}
