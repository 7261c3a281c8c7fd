//! Dialing out to the relay: resolve, QUIC connect with the relay's certificate checked,
//! then `Hello` on the control stream and `Welcome` (or `Refused`) back.

use jobgate_protocol::quic::{transport_config, UDP_SOCKET_BUFFER};
use jobgate_protocol::{
    read_frame, write_frame, AccessMode, CloseCode, ControlMessage, JobInfo, RefusalCode,
    SessionLimits, Shares, Token, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
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
/// Requests the relay may have in flight on our connection (the relay opens the streams).
pub const MAX_INCOMING_STREAMS: u32 = 16_384;

/// How to reach the relay.
#[derive(Debug, Clone)]
pub struct DialConfig {
    /// `HOST:PORT` of the relay's QUIC endpoint.
    pub relay: String,
    /// A CA file to trust instead of the system roots.
    pub relay_ca: Option<PathBuf>,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
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
        "no answer from the relay at {0} over UDP within {secs} s: is UDP to that port blocked by a firewall?",
        secs = CONNECT_TIMEOUT.as_secs()
    )]
    Unreachable(SocketAddr),
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
    /// The QUIC endpoint (kept so its socket lives as long as the connection).
    pub endpoint: Endpoint,
    /// The connection.
    pub connection: Connection,
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
        let _ = self.control.set_priority(i32::MAX);
        let _ = write_frame(&mut self.control, &bye.to_payload()).await;
        let _ = self.control.finish();
        let _ = tokio::time::timeout(BYE_LINGER, self.connection.closed()).await;
        self.connection
            .close(quinn::VarInt::from_u32(CloseCode::Normal.as_u32()), b"bye");
        let _ = tokio::time::timeout(CLOSE_LINGER, self.endpoint.wait_idle()).await;
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

/// A QUIC connection to the relay on which no session was asked for yet.
pub struct Dialed {
    endpoint: Endpoint,
    connection: Connection,
}

/// Connects to the relay (QUIC and TLS, certificate checked) without asking for a
/// session: the agent does this while the app starts, so a relay problem shows at once.
pub async fn connect(config: &DialConfig) -> Result<Dialed, DialError> {
    let crypto = client_crypto(config)?;
    let (server_name, addrs) = resolve(&config.relay).await?;
    let addr = addrs[0];
    let quic_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| DialError::Ca(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic_crypto));
    client.transport_config(transport_config(
        config.idle_timeout,
        KEEP_ALIVE,
        MAX_INCOMING_STREAMS,
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
        quinn::EndpointConfig::default(),
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
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {
            return Err(DialError::Unreachable(addr))
        }
        Ok(Err(e)) => {
            return Err(DialError::Connect {
                addr,
                reason: e.to_string(),
            })
        }
    };

    Ok(Dialed {
        endpoint,
        connection,
    })
}

/// Asks for a session on a connection from [`connect`].
pub async fn say_hello(dialed: Dialed, hello: &HelloParams) -> Result<RelaySession, DialError> {
    let Dialed {
        endpoint,
        connection,
    } = dialed;
    let (control, control_recv, welcome) =
        tokio::time::timeout(HELLO_TIMEOUT, hello_exchange(&connection, hello))
            .await
            .map_err(|_| DialError::Protocol("the relay did not answer Hello in time".into()))??;
    Ok(RelaySession {
        endpoint,
        connection,
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
    access: AccessMode,
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
    connection.close(0u32.into(), b"reserved");
    dialed.endpoint.wait_idle().await;
    answer
}
