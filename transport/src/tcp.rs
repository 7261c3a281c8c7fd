//! Dialing and accepting the TCP transport: TLS 1.3 on TCP (optionally through a
//! `CONNECT` proxy), ALPN [`ALPN_TCP`], then yamux.
//!
//! The relay serves agents on its HTTPS listener: browsers offer `h2`/`http/1.1`, agents
//! offer only `jobgate/1`, and rustls picks the protocol at the handshake, so no new port
//! is needed (443 in production, which firewalls and proxies let through).

use crate::mux::{MuxConnection, MuxSettings, Role};
use crate::proxy::{Proxy, ProxyError};
use crate::{Connection, ALPN_TCP};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long `auto` waits for a QUIC handshake before it connects over TCP. QUIC answers
/// within one round trip when UDP passes; dropped UDP shows only as silence.
pub const QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// Bound on TCP connect plus TLS handshake to the relay (a proxy has its own bound).
pub const TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TCP transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TcpDialError {
    /// The proxy failed or refused.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// TCP connect to the relay failed.
    #[error("cannot reach {target} over TCP: {source}")]
    Connect {
        /// `host:port`.
        target: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {target} failed: {source}")]
    Tls {
        /// `host:port`.
        target: String,
        /// The TLS error.
        source: std::io::Error,
    },
    /// The server did not select `jobgate/1`: not a jobgate relay, an old one, or
    /// something in between (a TLS-inspecting proxy) that strips ALPN.
    #[error("{target} did not accept protocol jobgate/1 (not a jobgate relay, or TLS is intercepted on the way)")]
    NoAlpn {
        /// `host:port`.
        target: String,
    },
    /// Connect and handshake took too long.
    #[error("no TLS answer from {target} within {seconds} s")]
    TimedOut {
        /// `host:port`.
        target: String,
        /// The timeout.
        seconds: u64,
    },
}

/// Connects to the relay's TLS endpoint `host:port` (through `proxy` if given) and starts
/// the multiplexer as the dialing end. `tls` is the agent's client config; its ALPN list
/// is replaced by `jobgate/1`.
pub async fn dial(
    host: &str,
    port: u16,
    proxy: Option<&Proxy>,
    tls: &rustls::ClientConfig,
    settings: MuxSettings,
) -> Result<Connection, TcpDialError> {
    let target = format!("{host}:{port}");
    let tcp = match proxy {
        Some(proxy) => proxy.connect(host, port).await?,
        None => bounded(&target, TcpStream::connect((host, port)))
            .await?
            .map_err(|source| TcpDialError::Connect {
                target: target.clone(),
                source,
            })?,
    };
    // Small control frames and request heads must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().map_err(|source| TcpDialError::Connect {
        target: target.clone(),
        source,
    })?;
    let mut config = tls.clone();
    config.alpn_protocols = vec![ALPN_TCP.to_vec()];
    let name = ServerName::try_from(host.to_string()).map_err(|e| TcpDialError::Tls {
        target: target.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = bounded(&target, connector.connect(name, tcp))
        .await?
        .map_err(|source| TcpDialError::Tls {
            target: target.clone(),
            source,
        })?;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN_TCP) {
        return Err(TcpDialError::NoAlpn { target });
    }
    Ok(Connection::Tcp(MuxConnection::with_settings(
        stream,
        Role::Client,
        peer,
        settings,
    )))
}

async fn bounded<T>(
    target: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, TcpDialError> {
    tokio::time::timeout(TCP_HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| TcpDialError::TimedOut {
            target: target.to_string(),
            seconds: TCP_HANDSHAKE_TIMEOUT.as_secs(),
        })
}

/// Whether a TLS connection accepted on the HTTPS listener is an agent's (it negotiated
/// `jobgate/1`) rather than a browser's.
pub fn is_agent(alpn: Option<&[u8]>) -> bool {
    alpn == Some(ALPN_TCP)
}

/// The relay's side: starts the multiplexer on an accepted agent TLS connection.
pub fn accept<T>(tls: T, peer: std::net::SocketAddr, settings: MuxSettings) -> Connection
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Connection::Tcp(MuxConnection::with_settings(
        tls,
        Role::Server,
        peer,
        settings,
    ))
}
