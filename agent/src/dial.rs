//! Dialing out to the relay: resolve, connect with the relay's certificate checked, then
//! `Hello` on the control stream and `Welcome` (or `Refused`) back.
//!
//! The connection is QUIC where UDP passes. Where it does not (`--transport auto`, the
//! default, waits [`QUIC_FALLBACK_AFTER`] for a QUIC answer), the agent connects over
//! TLS on TCP to the relay's HTTPS port instead, through an HTTP proxy if the environment
//! or `--proxy` names one; the streams above are the same on both.

use jobgate_protocol::quic::{transport_config, UDP_SOCKET_BUFFER};
use jobgate_protocol::{
    read_frame, write_frame, AccessMode, CloseCode, ControlMessage, JobInfo, RefusalCode,
    SessionLimits, Shares, Token, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use jobgate_transport::proxy::{Proxy, ProxyError};
use jobgate_transport::tcp::TcpDialError;
use jobgate_transport::{Connection, RecvStream, SendStream, TransportKind};
use quinn::Endpoint;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

use crate::{BYE_LINGER, CLOSE_LINGER};

/// How long the QUIC handshake may take before we call the relay unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay may take to answer `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default QUIC idle timeout: a dead relay is noticed after this long; longer than a
/// 10 s link cut, which then loses nothing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval, well under the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Most requests the relay may have in flight on our connection at once (the relay opens
/// the streams). A session starts with [`INITIAL_INCOMING_STREAMS`] and grows towards this
/// as its streams fill the allowance (see [`crate::serve::StreamAllowance`]).
pub const MAX_INCOMING_STREAMS: u32 = 16_384;
/// The relay's stream allowance when a session starts. quinn keeps a table entry for every
/// stream the peer may open, used or not, and looks a stream up there several times per
/// request: allowing all [`MAX_INCOMING_STREAMS`] from the start made those tables ~1.3 MiB,
/// past the core's cache, and the lookups ~3 % of the agent's CPU per request.
pub const INITIAL_INCOMING_STREAMS: u32 = 1_024;
/// How long `--transport auto` waits for a QUIC handshake before it connects over TCP.
pub const QUIC_FALLBACK_AFTER: Duration = jobgate_transport::tcp::QUIC_FALLBACK_AFTER;
/// While on TCP, how often `auto` tries QUIC again (and moves back when it answers).
pub const DEFAULT_QUIC_REPROBE: Duration = Duration::from_secs(30);
/// The relay's HTTPS port, where the TCP transport goes unless `--relay-tcp` says.
pub const DEFAULT_RELAY_TCP_PORT: u16 = 443;

/// Which transport carries the session (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC, or TLS over TCP when no QUIC handshake completes in 3 s (UDP blocked).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only (through a proxy where one is set).
    Tcp,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "unknown transport {other:?}: use auto, quic or tcp"
            )),
        }
    }
}

/// How to reach the relay.
#[derive(Debug, Clone)]
pub struct DialConfig {
    /// `HOST:PORT` of the relay's QUIC endpoint.
    pub relay: String,
    /// A CA file to trust instead of the system roots.
    pub relay_ca: Option<PathBuf>,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Which transport to use.
    pub transport: TransportChoice,
    /// `HOST:PORT` of the relay's TLS endpoint for the TCP transport; default: the
    /// `relay` host on port 443.
    pub relay_tcp: Option<String>,
    /// Proxy URL for the TCP transport; default: `HTTPS_PROXY`/`ALL_PROXY` and
    /// `NO_PROXY` from the environment, as curl reads them.
    pub proxy: Option<String>,
    /// While on TCP under `auto`, how often QUIC is tried again.
    pub quic_reprobe: Duration,
}

impl DialConfig {
    /// The relay at `relay` (`HOST:PORT` of its QUIC endpoint), every other setting at its
    /// default.
    pub fn new(relay: impl Into<String>, relay_ca: Option<PathBuf>) -> Self {
        Self {
            relay: relay.into(),
            relay_ca,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            transport: TransportChoice::Auto,
            relay_tcp: None,
            proxy: None,
            quic_reprobe: DEFAULT_QUIC_REPROBE,
        }
    }
}

/// Which transport a connection uses and why, for the job's output.
#[derive(Debug, Clone)]
pub struct Via {
    /// The transport.
    pub kind: TransportKind,
    /// The endpoint and, on TCP, why (`TCP/TLS to relay:443: no QUIC answer …`).
    pub detail: String,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Why no session could be opened.
#[derive(Debug, Error)]
pub enum DialError {
    /// `--relay` is not `HOST:PORT`, or the host does not resolve.
    #[error("cannot resolve relay address {0:?}: {1}")]
    Resolve(String, String),
    /// Trust anchors could not be loaded.
    #[error("cannot load relay CA: {0}")]
    Ca(String),
    /// The QUIC handshake failed (certificate, ALPN, refused).
    #[error("cannot connect to the relay at {addr}: {reason}")]
    Connect {
        /// Relay address.
        addr: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// No answer at all over UDP.
    #[error(
        "no answer from the relay at {0} over UDP within {1} s: is UDP to that port blocked by a firewall?"
    )]
    Unreachable(SocketAddr, u64),
    /// The relay refused the session.
    #[error("the relay refused this agent: {message}")]
    Refused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// The relay's explanation.
        message: String,
    },
    /// The control stream broke or carried nonsense.
    #[error("handshake with the relay failed: {0}")]
    Protocol(String),
    /// The TCP transport could not be set up (relay or proxy unreachable, proxy refused).
    #[error(transparent)]
    Tcp(#[from] TcpDialError),
    /// `auto`: QUIC did not answer and TCP failed too.
    #[error("{quic}; over TCP/TLS: {tcp}")]
    BothFailed {
        /// Why QUIC failed.
        quic: Box<DialError>,
        /// Why TCP failed.
        tcp: Box<DialError>,
    },
}

impl From<ProxyError> for DialError {
    fn from(error: ProxyError) -> Self {
        DialError::Tcp(TcpDialError::Proxy(error))
    }
}

/// What `Welcome` granted.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// The session name.
    pub name: String,
    /// The session's base URL.
    pub url: String,
    /// The URL to give to the user.
    pub access_url: String,
    /// Resume ticket, if the relay issued one.
    pub resume_ticket: Option<Token>,
    /// Session limits.
    pub limits: SessionLimits,
}

/// A live session with the relay.
pub struct RelaySession {
    /// The QUIC endpoint (kept so its socket lives as long as the connection); `None` on
    /// the TCP transport.
    pub endpoint: Option<Endpoint>,
    /// The connection.
    pub connection: Connection,
    /// Which transport it uses, and why.
    pub via: Via,
    /// Control stream, send half (for `Bye`).
    pub control: SendStream,
    /// Control stream, receive half (for `Ticket` and `Drain`); taken by its reader.
    pub control_recv: Option<RecvStream>,
    /// What the relay granted.
    pub welcome: Welcome,
}

impl RelaySession {
    /// Ends the session cleanly: `Bye` on the control stream (the relay retires the name
    /// at once instead of parking it for the resume grace), then the connection is closed
    /// with [`CloseCode::Normal`]. Waits at most 3 s (`BYE_LINGER`) for the relay to close
    /// and 0.5 s (`CLOSE_LINGER`) for the close to leave; errors are ignored (the relay may
    /// be gone already, and its idle timeout ends the session then). What `jobgate agent`
    /// does when the app exits or a signal arrives; a program built on the library (the
    /// soak bench) calls it to end a session the same way.
    pub async fn bye(&mut self, reason: &str) {
        let bye = ControlMessage::Bye {
            reason: reason.to_owned(),
        };
        // Bye goes ahead of any response data still queued, and the relay gets a moment to
        // take it and close: closing at once could lose both Bye and our close while a full
        // congestion window holds them back (then the name would wait out the resume grace).
        self.control.set_priority(i32::MAX);
        let said = async {
            let _ = write_frame(&mut self.control, &bye.to_payload()).await;
            let _ = self.control.finish().await;
            self.connection.closed().await
        };
        let _ = tokio::time::timeout(BYE_LINGER, said).await;
        self.connection.close(CloseCode::Normal, b"bye");
        match &self.endpoint {
            Some(endpoint) => {
                let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
            }
            None => {
                let _ = tokio::time::timeout(CLOSE_LINGER, self.connection.closed()).await;
            }
        }
    }
}

/// What to say in `Hello`.
#[derive(Debug, Clone)]
pub struct HelloParams {
    /// The user's token.
    pub token: Token,
    /// Requested access mode; `None`: the relay's default.
    pub access: Option<AccessMode>,
    /// Whom an `owner` session is shared with.
    pub share: Shares,
    /// Job metadata.
    pub job: JobInfo,
    /// The latest resume ticket, to get the same name back on reconnect.
    pub resume: Option<Token>,
    /// The reservation `jobgate launch` got for this job, presented on the first `Hello`
    /// so that the session gets the name the user was given at submit time.
    pub reservation: Option<Token>,
    /// This connection takes over the session from the agent's other, still live one
    /// (back to QUIC after TCP): its open streams are left to finish there.
    pub moving: bool,
}

fn client_crypto(config: &DialConfig) -> Result<rustls::ClientConfig, DialError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.relay_ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| DialError::Ca(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| DialError::Ca(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| DialError::Ca(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(DialError::Ca(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(DialError::Ca(
                    "no system root certificates found: use --relay-ca".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| DialError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![jobgate_protocol::ALPN.to_vec()];
    Ok(crypto)
}

/// Splits `HOST:PORT` (or `[v6]:PORT`) into the TLS server name and resolves it.
async fn resolve(relay: &str) -> Result<(String, Vec<SocketAddr>), DialError> {
    let bad = |why: &str| DialError::Resolve(relay.to_owned(), why.to_owned());
    let (host, _port) = relay
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| bad(&e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(bad("no address"));
    }
    Ok((host, addrs))
}

/// Connects to the relay and opens a session.
pub async fn open_session(
    config: &DialConfig,
    hello: &HelloParams,
) -> Result<RelaySession, DialError> {
    let dialed = connect(config).await?;
    say_hello(dialed, hello).await
}

/// A connection to the relay on which no session was asked for yet.
pub struct Dialed {
    endpoint: Option<Endpoint>,
    connection: Connection,
    via: Via,
}

impl Dialed {
    /// Which transport it uses, and why.
    pub fn via(&self) -> &Via {
        &self.via
    }
}

/// Connects to the relay (certificate checked) without asking for a session: the agent
/// does this while the app starts, so a relay problem shows at once. `auto` tries QUIC
/// first and falls back to TLS over TCP.
pub async fn connect(config: &DialConfig) -> Result<Dialed, DialError> {
    let crypto = client_crypto(config)?;
    match config.transport {
        TransportChoice::Quic => connect_quic_any(config, crypto, CONNECT_TIMEOUT).await,
        TransportChoice::Tcp => connect_tcp_any(config, &crypto, "").await,
        TransportChoice::Auto => {
            match connect_quic_any(config, crypto.clone(), QUIC_FALLBACK_AFTER).await {
                Err(quic @ (DialError::Unreachable(..) | DialError::Connect { .. })) => {
                    let why = match &quic {
                        DialError::Unreachable(..) => format!(
                            "no QUIC answer from {} in {} s",
                            config.relay,
                            QUIC_FALLBACK_AFTER.as_secs()
                        ),
                        other => other.to_string(),
                    };
                    connect_tcp_any(config, &crypto, &why)
                        .await
                        .map_err(|tcp| match tcp {
                            // A proxy's answer is what the user must act on.
                            proxy @ DialError::Tcp(TcpDialError::Proxy(_)) => proxy,
                            tcp => DialError::BothFailed {
                                quic: Box::new(quic),
                                tcp: Box::new(tcp),
                            },
                        })
                }
                other => other,
            }
        }
    }
}

/// Tries QUIC once, waiting at most [`QUIC_FALLBACK_AFTER`]: what `auto` does now and
/// then while on TCP.
pub async fn probe_quic(config: &DialConfig) -> Result<Dialed, DialError> {
    let crypto = client_crypto(config)?;
    connect_quic_any(config, crypto, QUIC_FALLBACK_AFTER).await
}

/// The relays' TLS endpoints for the TCP transport: `--relay-tcp` (a list, as
/// `--relay`), or each relay's host on port 443.
fn tcp_endpoints(config: &DialConfig) -> Result<Vec<(String, u16)>, DialError> {
    let given = config.relay_tcp.as_deref();
    relay_list(given.unwrap_or(&config.relay))
        .into_iter()
        .map(|text| {
            let bad = |why: &str| DialError::Resolve(text.to_owned(), why.to_owned());
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| bad("expected HOST:PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let port = match given {
                Some(_) => port.parse().map_err(|_| bad("bad port"))?,
                None => DEFAULT_RELAY_TCP_PORT,
            };
            Ok((host.to_owned(), port))
        })
        .collect()
}

/// Connects over TLS on TCP to the first relay that answers, in order; `why` says why
/// not QUIC.
async fn connect_tcp_any(
    config: &DialConfig,
    crypto: &rustls::ClientConfig,
    why: &str,
) -> Result<Dialed, DialError> {
    let mut last_error = DialError::Resolve(config.relay.clone(), "no relay given".into());
    for (host, port) in tcp_endpoints(config)? {
        match connect_tcp(config, crypto, &host, port, why).await {
            Ok(dialed) => return Ok(dialed),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// Connects over TLS on TCP to `host:port` (through the proxy, if any).
async fn connect_tcp(
    config: &DialConfig,
    crypto: &rustls::ClientConfig,
    host: &str,
    port: u16,
    why: &str,
) -> Result<Dialed, DialError> {
    let proxy = match &config.proxy {
        Some(url) => Some(Proxy::parse(url)?),
        None => Proxy::from_env(host)?,
    };
    let settings = jobgate_transport::MuxSettings {
        keep_alive: KEEP_ALIVE,
        idle_timeout: config.idle_timeout,
        ..Default::default()
    };
    let connection =
        jobgate_transport::tcp::dial(host, port, proxy.as_ref(), crypto, settings).await?;
    let through = proxy
        .map(|p| format!(" through proxy {p}"))
        .unwrap_or_default();
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(": {why}")
    };
    Ok(Dialed {
        endpoint: None,
        connection,
        via: Via {
            kind: TransportKind::Tcp,
            detail: format!("TCP/TLS to {host}:{port}{through}{why}"),
        },
    })
}

/// The relays of a list (`r1:7443,r2:7443`): a cluster's, in the order given.
fn relay_list(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect()
}

/// Connects over QUIC to whichever of the relays (and of each relay's addresses) answers
/// first, giving up after `timeout` without an answer: a dead relay of a cluster costs
/// nothing while another answers.
async fn connect_quic_any(
    config: &DialConfig,
    crypto: rustls::ClientConfig,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let relays = relay_list(&config.relay);
    let mut candidates = Vec::new();
    let mut last_error = None;
    for relay in relays.iter().copied() {
        match resolve(relay).await {
            Ok((server_name, addrs)) => candidates.extend(
                addrs
                    .into_iter()
                    .map(|addr| (relay, server_name.clone(), addr)),
            ),
            Err(e) => last_error = Some(e),
        }
    }
    let attempts: Vec<_> = candidates
        .into_iter()
        .map(|(relay, server_name, addr)| {
            Box::pin(connect_quic(
                config,
                relay,
                server_name,
                addr,
                crypto.clone(),
                timeout,
            ))
        })
        .collect();
    if attempts.is_empty() {
        return Err(last_error
            .unwrap_or_else(|| DialError::Resolve(config.relay.clone(), "no relay given".into())));
    }
    // The others are dropped (and with them their half-open connections).
    futures_util::future::select_ok(attempts)
        .await
        .map(|(dialed, _others)| dialed)
}

/// Connects over QUIC to `relay` at `addr`, giving up after `timeout` without an answer.
async fn connect_quic(
    config: &DialConfig,
    relay: &str,
    server_name: String,
    addr: SocketAddr,
    crypto: rustls::ClientConfig,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let quic_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| DialError::Ca(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic_crypto));
    client.transport_config(transport_config(
        config.idle_timeout,
        KEEP_ALIVE,
        INITIAL_INCOMING_STREAMS,
    ));

    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| DialError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        let _ = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    }
    let mut endpoint = Endpoint::new(
        jobgate_protocol::quic::endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| DialError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    endpoint.set_default_client_config(client);

    let connecting = endpoint
        .connect(addr, &server_name)
        .map_err(|e| DialError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let connection = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {
            return Err(DialError::Unreachable(addr, timeout.as_secs()))
        }
        Ok(Err(e)) => {
            return Err(DialError::Connect {
                addr,
                reason: e.to_string(),
            })
        }
    };

    Ok(Dialed {
        endpoint: Some(endpoint),
        connection: Connection::Quic(connection),
        via: Via {
            kind: TransportKind::Quic,
            detail: format!("QUIC to {relay}"),
        },
    })
}

/// Asks for a session on a connection from [`connect`].
pub async fn say_hello(dialed: Dialed, hello: &HelloParams) -> Result<RelaySession, DialError> {
    let Dialed {
        endpoint,
        connection,
        via,
    } = dialed;
    let (control, control_recv, welcome) =
        tokio::time::timeout(HELLO_TIMEOUT, hello_exchange(&connection, hello))
            .await
            .map_err(|_| DialError::Protocol("the relay did not answer Hello in time".into()))??;
    Ok(RelaySession {
        endpoint,
        connection,
        via,
        control,
        control_recv: Some(control_recv),
        welcome,
    })
}

async fn hello_exchange(
    connection: &Connection,
    params: &HelloParams,
) -> Result<(SendStream, RecvStream, Welcome), DialError> {
    let protocol = |e: &dyn std::fmt::Display| DialError::Protocol(e.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| protocol(&e))?;
    let hello = ControlMessage::Hello {
        version: PROTOCOL_VERSION,
        token: params.token.clone(),
        access: params.access,
        share: params.share.clone(),
        job: params.job.clone(),
        resume: params.resume.clone(),
        reservation: params.reservation.clone(),
        moving: params.moving,
    };
    write_frame(&mut send, &hello.to_payload())
        .await
        .map_err(|e| protocol(&e))?;
    let payload = match read_frame(&mut recv, MAX_CONTROL_FRAME).await {
        Ok(Some(payload)) => payload,
        Ok(None) => {
            return Err(DialError::Protocol(
                "the relay closed the control stream".into(),
            ))
        }
        Err(e) => {
            // A refused agent's connection may close right after the Refused frame.
            return Err(protocol(&e));
        }
    };
    match ControlMessage::from_payload(&payload).map_err(|e| protocol(&e))? {
        ControlMessage::Welcome {
            name,
            url,
            access_url,
            resume_ticket,
            limits,
        } => Ok((
            send,
            recv,
            Welcome {
                name,
                url,
                access_url,
                resume_ticket,
                limits,
            },
        )),
        ControlMessage::Refused { code, message } => Err(DialError::Refused { code, message }),
        other => Err(DialError::Protocol(format!(
            "unexpected first answer: {other:?}"
        ))),
    }
}

/// A name the relay holds for a queued job (see [`reserve`]).
#[derive(Debug, Clone)]
pub struct Reserved {
    /// The reserved name.
    pub name: String,
    /// The session's base URL.
    pub url: String,
    /// The URL to hand to the user.
    pub access_url: String,
    /// The signed reservation for the job's agent (a secret).
    pub reservation: Token,
}

/// Asks the relay to hold a name for batch job `job_id`, on a connection of its own.
pub async fn reserve(
    config: &DialConfig,
    token: Token,
    access: Option<AccessMode>,
    job_id: &str,
) -> Result<Reserved, DialError> {
    let protocol = |e: &dyn std::fmt::Display| DialError::Protocol(e.to_string());
    let dialed = connect(config).await?;
    let connection = dialed.connection.clone();
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| protocol(&e))?;
        let ask = ControlMessage::Reserve {
            version: PROTOCOL_VERSION,
            token,
            access,
            job_id: job_id.to_owned(),
        };
        write_frame(&mut send, &ask.to_payload())
            .await
            .map_err(|e| protocol(&e))?;
        let payload = read_frame(&mut recv, MAX_CONTROL_FRAME)
            .await
            .map_err(|e| protocol(&e))?
            .ok_or_else(|| DialError::Protocol("the relay closed the control stream".into()))?;
        match ControlMessage::from_payload(&payload).map_err(|e| protocol(&e))? {
            ControlMessage::Reserved {
                name,
                url,
                access_url,
                reservation,
            } => Ok(Reserved {
                name,
                url,
                access_url,
                reservation,
            }),
            ControlMessage::Refused { code, message } => Err(DialError::Refused { code, message }),
            other => Err(DialError::Protocol(format!(
                "unexpected answer to Reserve: {other:?}"
            ))),
        }
    };
    let answer = tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| DialError::Protocol("no answer to Reserve in time".into()))?;
    connection.close(CloseCode::Normal, b"reserved");
    match &dialed.endpoint {
        Some(endpoint) => endpoint.wait_idle().await,
        None => {
            let _ = tokio::time::timeout(CLOSE_LINGER, connection.closed()).await;
        }
    }
    answer
}
