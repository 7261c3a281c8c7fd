//! A stream's two halves over either transport, as tokio readers/writers.

use crate::split::{MuxRecv, MuxSend};
use jobgate_protocol::StreamCode;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
pub enum RecvStream {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// A yamux stream.
    Tcp(MuxRecv),
}

impl SendStream {
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
    /// Tells the peer to stop sending. QUIC sends `STOP_SENDING` with `code`; yamux has no
    /// such frame: the stream is reset when both halves are dropped.
    pub fn stop(&mut self, code: StreamCode) {
        if let RecvStream::Quic(r) = self {
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
        match self.get_mut() {
            RecvStream::Quic(r) => AsyncRead::poll_read(Pin::new(r), cx, buf),
            RecvStream::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}
