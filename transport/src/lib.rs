//! One connection abstraction over the two transports an agent session can use.
//!
//! A session between relay and agent is a set of bidirectional streams (control, one per
//! request, WebSockets). Over UDP those are QUIC streams (quinn); where UDP is blocked they
//! are yamux streams on one TLS 1.3/TCP connection (ALPN [`ALPN_TCP`]). The code above
//! "open/accept a stream" takes a [`Connection`] and its [`SendStream`]/[`RecvStream`]
//! halves and does not care which is underneath. Dispatch is an enum (no boxing per stream),
//! so the QUIC path costs one match per poll.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
mod mux;
pub mod proxy;
mod split;
mod stream;
pub mod tcp;

pub use mux::{MuxConnection, MuxError, MuxSettings, Role};
pub use split::{MuxRecv, MuxSend};
pub use stream::{RecvStream, SendStream};

use std::net::SocketAddr;

/// ALPN protocol id the agent offers on the relay's HTTPS listener for the TCP transport;
/// browsers offer `h2`/`http/1.1`, so the relay tells the two apart at the TLS handshake.
/// The same id as on QUIC: the streams above mean the same on both.
pub const ALPN_TCP: &[u8] = jobgate_protocol::ALPN;

/// Which transport carries a session; shown in logs, the audit log, metrics and the admin list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// QUIC over UDP (quinn).
    Quic,
    /// yamux over TLS 1.3 over TCP (possibly through an HTTP CONNECT proxy).
    Tcp,
}

impl TransportKind {
    /// The name used in logs, metrics labels and the admin session list.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why opening or accepting a stream failed, or why the connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The QUIC connection ended.
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    /// The TCP multiplexed connection ended.
    #[error(transparent)]
    Tcp(#[from] MuxError),
}

impl ConnectionError {
    /// The jobgate close code the peer closed with, if it closed on purpose.
    pub fn peer_close_code(&self) -> Option<jobgate_protocol::CloseCode> {
        match self {
            ConnectionError::Quic(quinn::ConnectionError::ApplicationClosed(close)) => {
                jobgate_protocol::CloseCode::from_u64(close.error_code.into_inner())
            }
            ConnectionError::Tcp(MuxError::ApplicationClosed { code, .. }) => {
                jobgate_protocol::CloseCode::from_u64(u64::from(*code))
            }
            _ => None,
        }
    }

    /// Whether the connection went silent (no answer within the idle timeout) rather than
    /// being closed.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ConnectionError::Quic(quinn::ConnectionError::TimedOut)
        )
    }
}

/// A session's connection: QUIC or yamux-over-TLS/TCP.
#[derive(Clone, Debug)]
pub enum Connection {
    /// QUIC (quinn).
    Quic(quinn::Connection),
    /// yamux on TLS/TCP.
    Tcp(MuxConnection),
}

impl Connection {
    /// Which transport this is.
    pub fn kind(&self) -> TransportKind {
        match self {
            Connection::Quic(_) => TransportKind::Quic,
            Connection::Tcp(_) => TransportKind::Tcp,
        }
    }

    /// Opens a bidirectional stream. As with QUIC, the peer learns of it at the first write.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((SendStream::Quic(s), RecvStream::quic(r)))
            }
            Connection::Tcp(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((SendStream::Tcp(s), RecvStream::tcp(r)))
            }
        }
    }

    /// Waits for the peer's next bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((SendStream::Quic(s), RecvStream::quic(r)))
            }
            Connection::Tcp(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((SendStream::Tcp(s), RecvStream::tcp(r)))
            }
        }
    }

    /// Closes the connection with a jobgate close code and a short reason.
    pub fn close(&self, code: jobgate_protocol::CloseCode, reason: &[u8]) {
        match self {
            Connection::Quic(c) => c.close(quinn::VarInt::from(code), reason),
            Connection::Tcp(c) => c.close(code.as_u32(), reason),
        }
    }

    /// Waits until the connection has ended, and says why.
    pub async fn closed(&self) -> ConnectionError {
        match self {
            Connection::Quic(c) => ConnectionError::Quic(c.closed().await),
            Connection::Tcp(c) => ConnectionError::Tcp(c.closed().await),
        }
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match self {
            Connection::Quic(c) => c.close_reason().map(ConnectionError::Quic),
            Connection::Tcp(c) => c.close_reason().map(ConnectionError::Tcp),
        }
    }

    /// Sets the connection-wide receive window (QUIC; the TCP transport's windows are
    /// fixed per stream by yamux).
    pub fn set_receive_window(&self, bytes: u32) {
        if let Connection::Quic(c) = self {
            c.set_receive_window(quinn::VarInt::from_u32(bytes));
        }
    }

    /// Lets the peer have up to `count` bidirectional streams open at once (QUIC: a
    /// `MAX_STREAMS` frame goes out; the TCP transport's limit is fixed by yamux's settings).
    pub fn allow_incoming_streams(&self, count: u32) {
        if let Connection::Quic(c) = self {
            c.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(count));
        }
    }

    /// Bytes received and sent so far (UDP payloads on QUIC, TLS bytes on TCP).
    pub fn bytes(&self) -> (u64, u64) {
        match self {
            Connection::Quic(c) => {
                let stats = c.stats();
                (stats.udp_rx.bytes, stats.udp_tx.bytes)
            }
            Connection::Tcp(c) => c.bytes(),
        }
    }

    /// The QUIC connection underneath, if this is one (for QUIC-only tuning and stats).
    pub fn as_quic(&self) -> Option<&quinn::Connection> {
        match self {
            Connection::Quic(c) => Some(c),
            Connection::Tcp(_) => None,
        }
    }

    /// The peer's address as this end sees it (the proxy's, behind a CONNECT proxy).
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(c) => c.remote_address(),
            Connection::Tcp(c) => c.remote_address(),
        }
    }
}
