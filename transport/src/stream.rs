//! A stream's two halves over either transport, as tokio readers/writers.

use crate::split::{MuxRecv, MuxSend};
use bytes::{Bytes, BytesMut};
use jobgate_protocol::{decode_frame, ReadFrameError, StreamCode, FRAME_HEADER_LEN};
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What the first chunked read of a TCP-transport receive half asks for: a head and a
/// small body fit.
const TCP_READ_FIRST: usize = 4 * 1024;
/// Most a chunked read asks for: reads that get all they asked for double the next ask up
/// to this (bulk); a read of less than [`TCP_READ_SMALL`] drops the ask back to the first.
const TCP_READ_MAX: usize = 64 * 1024;
/// Below this, a read counts as small traffic (a keystroke on a WebSocket).
const TCP_READ_SMALL: usize = 1024;

/// The sending half of a bidirectional stream.
#[derive(Debug)]
pub enum SendStream {
    /// A QUIC stream.
    Quic(quinn::SendStream),
    /// A yamux stream.
    Tcp(MuxSend),
}

/// The receiving half of a bidirectional stream.
#[derive(Debug)]
pub struct RecvStream {
    inner: RecvInner,
    /// Bytes that arrived in the chunk of a head frame, after it: the next read hands them
    /// out before reading the stream again.
    unread: Option<Bytes>,
}

/// The transport under a [`RecvStream`].
#[derive(Debug)]
enum RecvInner {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// A yamux stream, with the buffer its chunked reads fill.
    Tcp(MuxRecv, TcpReadBuffer),
}

/// Where a yamux receive half's chunked reads land. yamux copies into an initialised
/// slice, so the buffer is zeroed once when taken (not before every read, as tokio's
/// `ReadBuf` path through `Compat` does) and chunks are split off its front. A buffer is
/// twice the current ask and is replaced when less than half an ask is left, so a read
/// gets room for what yamux holds (the chunk size sets how many writes the far side
/// makes) while zeroing stays within ~1.3× of what is read. At the first ask the buffer
/// is just the ask: a stream that only carried a head (an idle WebSocket) holds 4 KiB.
#[derive(Debug)]
struct TcpReadBuffer {
    /// Zeroed room; every byte of it is initialised (its length, not its capacity).
    room: BytesMut,
    /// What the next read asks for.
    ask: usize,
}

impl Default for TcpReadBuffer {
    fn default() -> Self {
        Self {
            room: BytesMut::new(),
            ask: TCP_READ_FIRST,
        }
    }
}

impl TcpReadBuffer {
    /// Reads at most `max` bytes from `recv` into the room; `None` at the end of the stream.
    fn poll_read(
        &mut self,
        recv: &MuxRecv,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        if self.room.len() < self.ask / 2 {
            // At the first ask, one ask: most streams carry a head and little else.
            let size = if self.ask == TCP_READ_FIRST {
                TCP_READ_FIRST
            } else {
                2 * self.ask
            };
            self.room = BytesMut::zeroed(size);
        }
        let want = self.room.len().min(self.ask).min(max);
        let n = std::task::ready!(recv.poll_read_slice(cx, &mut self.room[..want]))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        let chunk = self.room.split_to(n).freeze();
        if n == want {
            // More was probably waiting: ask for more next time.
            self.ask = (self.ask * 2).min(TCP_READ_MAX);
        } else if n < TCP_READ_SMALL && self.ask > TCP_READ_FIRST {
            // Traffic turned sparse: an idle stream should not keep a bulk-sized buffer.
            self.ask = TCP_READ_FIRST;
            if self.room.len() > self.ask {
                self.room = BytesMut::new();
            }
        }
        Poll::Ready(Ok(Some(chunk)))
    }
}

impl SendStream {
    /// Writes `data` (without a copy on QUIC), waiting for flow-control credit.
    pub async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.write_chunk(data).await.map_err(io::Error::from),
            SendStream::Tcp(s) => s.write_all(&data).await,
        }
    }

    /// Ends the stream cleanly once what was written is sent (QUIC `FIN`, yamux close).
    pub async fn finish(&mut self) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(io::Error::other),
            SendStream::Tcp(s) => s.shutdown().await,
        }
    }

    /// Waits until the peer has everything written (QUIC) — for a last frame that must
    /// arrive before the connection closes. TCP delivers in order and yamux flushes
    /// stream data before it closes, so there it returns at once.
    pub async fn stopped(&mut self) {
        if let SendStream::Quic(s) = self {
            let _ = s.stopped().await;
        }
    }

    /// Sends this stream's data ahead of others' (QUIC only; a TCP connection has one
    /// byte order).
    pub fn set_priority(&self, priority: i32) {
        if let SendStream::Quic(s) = self {
            let _ = s.set_priority(priority);
        }
    }

    /// Ends the stream abruptly. QUIC carries `code` to the peer; yamux resets carry no
    /// code, so on TCP the peer's read ends and the stream is dropped when both halves are.
    pub fn reset(&mut self, code: StreamCode) {
        match self {
            SendStream::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from(code));
            }
            SendStream::Tcp(_) => {
                // Nothing to send before the halves drop: the drop resets the yamux stream.
            }
        }
    }
}

impl RecvStream {
    /// The receiving half of a QUIC stream.
    pub(crate) fn quic(recv: quinn::RecvStream) -> Self {
        Self {
            inner: RecvInner::Quic(recv),
            unread: None,
        }
    }

    /// The receiving half of a yamux stream.
    pub(crate) fn tcp(recv: MuxRecv) -> Self {
        Self {
            inner: RecvInner::Tcp(recv, TcpReadBuffer::default()),
            unread: None,
        }
    }

    /// Reads one frame of at most `max` payload bytes: a request or response head.
    ///
    /// A frame that arrives within one chunk, as heads do, is handed out without a copy
    /// (a slice of the chunk, so a head decoded with `decode_shared` points into it); the
    /// bytes after it in that chunk (the body's first bytes) are kept for the next read.
    /// `Ok(None)`: the stream ended cleanly before a frame began.
    pub async fn read_frame(&mut self, max: usize) -> Result<Option<Bytes>, ReadFrameError> {
        // Only a frame split across chunks is gathered here.
        let mut gathered = BytesMut::new();
        loop {
            let Some(chunk) = self.read_chunk(usize::MAX).await? else {
                if gathered.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            };
            if gathered.is_empty() {
                if let Some((_, end)) = decode_frame(&chunk, max)? {
                    return Ok(Some(self.keep_after(chunk, end)));
                }
            }
            gathered.extend_from_slice(&chunk);
            if let Some((_, end)) = decode_frame(&gathered, max)? {
                return Ok(Some(self.keep_after(gathered.freeze(), end)));
            }
        }
    }

    /// The payload of the frame that ends at `end` in `bytes`; what follows it is kept as
    /// unread.
    fn keep_after(&mut self, bytes: Bytes, end: usize) -> Bytes {
        if end < bytes.len() {
            self.unread = Some(bytes.slice(end..));
        }
        bytes.slice(FRAME_HEADER_LEN..end)
    }

    /// Up to `max` of the bytes kept by [`read_frame`](Self::read_frame), if any remain.
    fn take_unread(&mut self, max: usize) -> Option<Bytes> {
        let unread = self.unread.as_mut()?;
        if unread.len() > max {
            return Some(unread.split_to(max));
        }
        self.unread.take()
    }

    /// Reads the next chunk of at most `max` bytes; `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_read_chunk(cx, max)).await
    }

    /// Polls for the next chunk of at most `max` bytes; `None` at the end of the stream.
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        if let Some(chunk) = self.take_unread(max) {
            return Poll::Ready(Ok(Some(chunk)));
        }
        match &mut self.inner {
            RecvInner::Quic(r) => {
                // `read_chunk` is cancel-safe: a fresh future per poll loses nothing and
                // keeps the waker registration of the last poll.
                let read = pin!(r.read_chunk(max, true));
                match std::task::ready!(read.poll(cx)) {
                    Ok(chunk) => Poll::Ready(Ok(chunk.map(|c| c.bytes))),
                    Err(e) => Poll::Ready(Err(io::Error::from(e))),
                }
            }
            RecvInner::Tcp(r, buf) => buf.poll_read(r, cx, max),
        }
    }

    /// Whether the stream's end has arrived with nothing left to read (checked without
    /// waiting).
    pub fn is_at_end(&mut self) -> bool {
        if self.unread.is_some() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match &mut self.inner {
            RecvInner::Quic(r) => matches!(
                pin!(r.read_chunk(usize::MAX, true)).poll(&mut cx),
                Poll::Ready(Ok(None))
            ),
            // A yamux stream has no stop to save: nothing to check.
            RecvInner::Tcp(..) => false,
        }
    }

    /// Tells the peer to stop sending. QUIC sends `STOP_SENDING` with `code`; yamux has no
    /// such frame: the stream is reset when both halves are dropped.
    pub fn stop(&mut self, code: StreamCode) {
        self.unread = None;
        if let RecvInner::Quic(r) = &mut self.inner {
            let _ = r.stop(quinn::VarInt::from(code));
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            SendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => AsyncWrite::poll_flush(Pin::new(s), cx),
            SendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => AsyncWrite::poll_shutdown(Pin::new(s), cx),
            SendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(chunk) = this.take_unread(buf.remaining()) {
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            RecvInner::Quic(r) => AsyncRead::poll_read(Pin::new(r), cx, buf),
            RecvInner::Tcp(r, _) => Pin::new(r).poll_read(cx, buf),
        }
    }
}
