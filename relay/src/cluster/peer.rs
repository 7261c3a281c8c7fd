//! The link between the relays of a cluster: QUIC, both ends authenticated by certificates
//! from the cluster's own CA (`peer_ca`, `peer_cert`, `peer_key`).
//!
//! A browser may reach any relay (DNS round-robin, an L4 balancer), but a session's agent
//! is connected to one. The relay that took the browser's TCP connection reads only the TLS
//! ClientHello's server name; when another relay holds that session, it opens one stream
//! to that relay, writes a [preamble](write_preamble) (the browser's address) and the
//! ClientHello bytes, and from then on copies bytes both ways. The owning relay terminates
//! TLS itself and serves the connection exactly as if the browser had dialled it: HTTP/1.1,
//! HTTP/2 and WebSockets unchanged, the same access checks, TLS end to end from the browser
//! to the relay that holds the session. No redirect: the URL never names a relay.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of the peer link (never offered to browsers or agents).
pub const PEER_ALPN: &[u8] = b"jobgate-peer/1";
/// A peer that stays silent this long is gone: its link is dropped and dialled again.
/// Relays sit in one machine room: a few seconds of silence is a dead relay, and every
/// browser connection forwarded to it meanwhile is lost.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive on an idle peer link, well inside its idle timeout.
pub const PEER_KEEP_ALIVE: Duration = Duration::from_millis(750);
/// How long a forwarded connection waits for the owning relay's first bytes (its TLS
/// ServerHello, normally within a millisecond) before the browser's connection is closed
/// (the browser retries; by then the routes may name another relay).
pub const PEER_FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(2);
/// How long dialling a peer may take before the browser's connection is given up.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest preamble (a socket address as text fits many times over).
pub const MAX_PREAMBLE: usize = 128;
/// Forwarded browser connections open at once from one relay to another.
pub const MAX_PEER_STREAMS: u32 = 65_536;

/// Why the peer link could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The CA, certificate or key could not be loaded.
    #[error("peer TLS: {0}")]
    Tls(String),
    /// The peer listener could not be bound.
    #[error("cannot listen for peers on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A peer could not be reached.
    #[error("relay {addr} unreachable over the peer link: {why}")]
    Unreachable {
        /// The peer's advertised address.
        addr: String,
        /// What failed.
        why: String,
    },
}

/// This relay's end of the peer link: its listener, and one connection per peer dialled.
#[derive(Debug)]
pub struct PeerLink {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// Peer address → the connection to it, reused by every forwarded browser connection.
    connections: Mutex<HashMap<String, quinn::Connection>>,
}

impl PeerLink {
    /// Binds `listen` with this relay's peer certificate; peers must show one from `ca`.
    /// `runtime` places the link's connection tasks (over the relay's cores).
    pub fn bind(
        listen: SocketAddr,
        ca: &Path,
        cert: &Path,
        key: &Path,
        runtime: Arc<crate::cores::SpreadRuntime>,
    ) -> Result<Self, PeerError> {
        let tls_err = |e: &dyn std::fmt::Display| PeerError::Tls(e.to_string());
        let roots = Arc::new(load_roots(ca)?);
        let own = crate::tls::load_certified_key(cert, key).map_err(|e| tls_err(&e))?;
        let provider = crate::tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| tls_err(&e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(own.chain.clone(), own.key.clone_key())
            .map_err(|e| tls_err(&e))?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        server.max_early_data_size = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(own.chain, own.key)
            .map_err(|e| tls_err(&e))?;
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];

        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(PEER_IDLE_TIMEOUT.try_into().ok())
            .keep_alive_interval(Some(PEER_KEEP_ALIVE))
            .max_concurrent_bidi_streams(MAX_PEER_STREAMS.into())
            .max_concurrent_uni_streams(0u32.into())
            .mtu_discovery_config(Some(jobgate_protocol::quic::mtu_discovery()));
        let transport = Arc::new(transport);
        let server = QuicServerConfig::try_from(server).map_err(|e| tls_err(&e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport.clone());
        let client = QuicClientConfig::try_from(client).map_err(|e| tls_err(&e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport);
        let bind_error = |source| PeerError::Bind {
            addr: listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(listen).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            jobgate_protocol::quic::endpoint_config(),
            Some(server),
            socket,
            runtime.clone(),
        )
        .map_err(bind_error)?;
        runtime.spread();
        Ok(Self {
            endpoint,
            client,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// Where the peer listener is bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The listener, for the accept loop.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Opens a stream to the relay at `addr` (`host:port`), dialling it if no live
    /// connection to it exists.
    pub async fn open(
        &self,
        addr: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        let unreachable = |why: String| PeerError::Unreachable {
            addr: addr.to_owned(),
            why,
        };
        let cached = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(addr)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        let connection = match cached {
            Some(connection) => connection,
            None => {
                let connection = tokio::time::timeout(PEER_CONNECT_TIMEOUT, self.dial(addr))
                    .await
                    .map_err(|_| unreachable(format!("no answer in {PEER_CONNECT_TIMEOUT:?}")))??;
                self.connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(addr.to_owned(), connection.clone());
                connection
            }
        };
        connection
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))
    }

    async fn dial(&self, addr: &str) -> Result<quinn::Connection, PeerError> {
        let unreachable = |why: String| PeerError::Unreachable {
            addr: addr.to_owned(),
            why,
        };
        let (host, _) = addr
            .rsplit_once(':')
            .ok_or_else(|| unreachable("not host:port".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let target = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        self.endpoint
            .connect_with(self.client.clone(), target, host)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))
    }
}

fn load_roots(ca: &Path) -> Result<rustls::RootCertStore, PeerError> {
    let pem = std::fs::read(ca)
        .map_err(|e| PeerError::Tls(format!("cannot read {}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| PeerError::Tls(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| PeerError::Tls(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(PeerError::Tls(format!(
            "{} holds no PEM certificate",
            ca.display()
        )));
    }
    Ok(roots)
}

/// Writes the preamble of a forwarded browser connection: its address, as text, after a
/// one-byte length.
pub async fn write_preamble<W: AsyncWrite + Unpin>(
    out: &mut W,
    client: SocketAddr,
) -> std::io::Result<()> {
    let text = client.to_string();
    let mut frame = Vec::with_capacity(1 + text.len());
    frame.push(text.len() as u8);
    frame.extend_from_slice(text.as_bytes());
    out.write_all(&frame).await
}

/// Reads a preamble written by [`write_preamble`].
pub async fn read_preamble<R: AsyncRead + Unpin>(input: &mut R) -> std::io::Result<SocketAddr> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let len = usize::from(input.read_u8().await?);
    if len == 0 || len > MAX_PREAMBLE {
        return Err(bad("bad preamble length"));
    }
    let mut text = vec![0u8; len];
    input.read_exact(&mut text).await?;
    std::str::from_utf8(&text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("preamble is no socket address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_preamble_round_trips_and_garbage_is_refused() {
        let client: SocketAddr = "[2001:db8::1]:54321".parse().unwrap();
        let mut buf = Vec::new();
        write_preamble(&mut buf, client).await.unwrap();
        assert_eq!(read_preamble(&mut buf.as_slice()).await.unwrap(), client);
        assert!(read_preamble(&mut [0u8].as_slice()).await.is_err());
        assert!(read_preamble(&mut [3u8, b'a', b'b', b'c'].as_slice())
            .await
            .is_err());
        assert!(read_preamble(&mut [9u8, b'1'].as_slice()).await.is_err());
    }
}
