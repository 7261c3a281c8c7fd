//! The agents' door: a QUIC endpoint where each agent connects, says `Hello` on its
//! control stream, is given a name in `Welcome`, and keeps that name for exactly as long
//! as the connection lives.

use crate::audit::AuditEvent;
use crate::config::RelayConfig;
use crate::routes::{InsertError, Session};
use crate::tls::CertifiedKey;
use crate::Shared;
use jobgate_protocol::quic::{transport_config, UDP_SOCKET_BUFFER};
use jobgate_protocol::{
    read_frame, write_frame, AccessMode, CloseCode, ControlMessage, RefusalCode, SessionLimits,
    Token, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Streams an agent may open towards the relay: only its control stream.
const AGENT_OPENED_STREAMS: u32 = 1;

/// Binds the agents' QUIC endpoint.
pub(crate) fn bind_endpoint(
    config: &RelayConfig,
    certified: &CertifiedKey,
) -> std::io::Result<quinn::Endpoint> {
    let tls = crate::tls::quic_server_config(certified).map_err(std::io::Error::other)?;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config(
        config.idle_timeout(),
        config.keep_alive(),
        AGENT_OPENED_STREAMS,
    ));
    let socket = std::net::UdpSocket::bind(config.listen_quic)?;
    set_buffers(&socket);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Asks for larger UDP buffers; the kernel may cap them, which is not an error.
fn set_buffers(socket: &std::net::UdpSocket) {
    let state = quinn::udp::UdpSocketState::new(socket.into());
    if let Ok(state) = state {
        let _ = state.set_recv_buffer_size(socket.into(), UDP_SOCKET_BUFFER);
        let _ = state.set_send_buffer_size(socket.into(), UDP_SOCKET_BUFFER);
    }
}

/// Accepts agent connections until the endpoint closes.
pub(crate) async fn accept_agents(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_agent(connection, shared).await,
                Err(e) => tracing::debug!(%remote, "agent handshake failed: {e}"),
            }
        });
    }
}

fn close(connection: &Connection, code: CloseCode, reason: &str) {
    connection.close(VarInt::from_u32(code.as_u32()), reason.as_bytes());
}

/// Why a `Hello` did not lead to a session.
struct Refusal {
    code: RefusalCode,
    message: String,
    /// The user, when the token was valid but something else was not.
    user: Option<String>,
}

impl Refusal {
    fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            user: None,
        }
    }

    fn for_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }
}

/// One agent connection, from handshake to close.
async fn serve_agent(connection: Connection, shared: Arc<Shared>) {
    let remote = connection.remote_address();
    let handshake = Duration::from_secs(shared.config.handshake_timeout_secs);
    let control = tokio::time::timeout(handshake, async {
        let (send, mut recv) = connection.accept_bi().await.ok()?;
        let payload = read_frame(&mut recv, MAX_CONTROL_FRAME).await.ok()??;
        Some((send, recv, ControlMessage::from_payload(&payload).ok()))
    })
    .await;
    let (mut send, recv, hello) = match control {
        Ok(Some(control)) => control,
        Ok(None) => {
            return close(
                &connection,
                CloseCode::ProtocolError,
                "expected a control stream with Hello",
            )
        }
        Err(_) => return close(&connection, CloseCode::HandshakeTimeout, "no Hello in time"),
    };

    let (session, key) = match admit(&shared, &connection, hello) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            tracing::info!(%remote, code = ?refusal.code, "agent refused: {}", refusal.message);
            let code = serde_json::to_value(refusal.code).ok();
            shared.audit.record(&AuditEvent::Refused {
                user: refusal.user.as_deref(),
                agent_addr: remote,
                code: code.as_ref().and_then(|c| c.as_str()).unwrap_or("unknown"),
            });
            let refused = ControlMessage::Refused {
                code: refusal.code,
                message: refusal.message,
            };
            let _ = write_frame(&mut send, &refused.to_payload()).await;
            let _ = send.finish();
            // Give the Refused frame a moment to reach the agent before closing.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            return close(&connection, CloseCode::Refused, "refused");
        }
    };
    let guard = SessionGuard {
        shared: shared.clone(),
        session: session.clone(),
    };

    let url = shared.config.session_url(session.name.as_str());
    let welcome = ControlMessage::Welcome {
        name: session.name.to_string(),
        url: url.clone(),
        access_url: match &key {
            Some(key) => format!("{url}?{}={key}", crate::access::KEY_PARAM),
            None => url,
        },
        resume_ticket: None::<Token>,
        limits: SessionLimits {
            max_streams: u64::from(shared.config.max_streams_per_agent),
            max_header_bytes: shared.config.max_header_bytes as u64,
        },
    };
    if write_frame(&mut send, &welcome.to_payload()).await.is_err() {
        return close(
            &connection,
            CloseCode::ProtocolError,
            "control stream failed",
        );
    }
    tracing::info!(
        name = %session.name,
        user = %session.user,
        job = session.job.id.as_deref().unwrap_or("-"),
        host = session.job.host.as_deref().unwrap_or("-"),
        agent = %remote,
        "session opened"
    );

    shared.audit.record(&AuditEvent::Opened {
        user: &session.user,
        name: session.name.as_str(),
        job_id: session.job.id.as_deref(),
        host: session.job.host.as_deref(),
        agent_addr: remote,
        access: match session.access {
            AccessMode::Link => "link",
            AccessMode::Public => "public",
        },
    });

    let reason = watch_session(&connection, send, recv).await;
    drop(guard);
    let stats = connection.stats();
    shared.audit.record(&AuditEvent::Closed {
        user: &session.user,
        name: session.name.as_str(),
        reason: &reason,
        duration_s: session.opened.elapsed().as_secs(),
        bytes_in: stats.udp_rx.bytes,
        bytes_out: stats.udp_tx.bytes,
        requests: session.requests.load(std::sync::atomic::Ordering::Relaxed),
    });
    tracing::info!(
        name = %session.name,
        user = %session.user,
        duration_s = session.opened.elapsed().as_secs(),
        "session closed: {reason}"
    );
}

/// Checks a `Hello` and registers the session it asks for.
fn admit(
    shared: &Shared,
    connection: &Connection,
    hello: Option<ControlMessage>,
) -> Result<(Arc<Session>, Option<String>), Refusal> {
    let Some(ControlMessage::Hello {
        version,
        token,
        access,
        job,
        resume: _,
    }) = hello
    else {
        return Err(Refusal::new(
            RefusalCode::Malformed,
            "the first control frame must be Hello",
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            RefusalCode::UnsupportedVersion,
            format!("this relay speaks protocol version {PROTOCOL_VERSION}, the agent {version}: update jobgate"),
        ));
    }
    // A token issued a moment ago may not be loaded yet: a stat tells, cheaply.
    let identity = shared.tokens.verify(&token.0).or_else(|| {
        crate::reload_tokens(shared);
        shared.tokens.verify(&token.0)
    });
    let Some(identity) = identity else {
        return Err(Refusal::new(
            RefusalCode::BadToken,
            "the relay does not know this token (mistyped, revoked or for another relay): ask your admin for a new one",
        ));
    };
    let (guard, key) = match access {
        AccessMode::Public if !shared.config.allow_public => {
            return Err(Refusal::new(
                RefusalCode::AccessModeNotAllowed,
                "this relay does not allow public sessions: use the default private link (--access link)",
            )
            .for_user(&identity.user))
        }
        AccessMode::Public => (crate::access::Access::Public, None),
        AccessMode::Link => {
            let (guard, key) = crate::access::Access::new_link();
            (guard, Some(key))
        }
    };
    let session = Arc::new(Session {
        name: shared.names.issue(),
        user: identity.user,
        job,
        access,
        guard,
        connection: connection.clone(),
        agent_addr: connection.remote_address(),
        opened: Instant::now(),
        requests: Default::default(),
    });
    let user_limit = identity
        .max_mappings
        .unwrap_or(shared.config.max_sessions_per_user);
    shared
        .routes
        .insert(session.clone(), user_limit, shared.config.max_agents)
        .map_err(|e| match e {
            InsertError::UserLimit(n) => Refusal::new(
                RefusalCode::TooManySessions,
                format!(
                    "user {} already has {n} live sessions, the most allowed: end one first",
                    session.user
                ),
            )
            .for_user(&session.user),
            InsertError::GlobalLimit(_) => Refusal::new(
                RefusalCode::Unavailable,
                "the relay is at capacity: try again later",
            )
            .for_user(&session.user),
        })?;
    Ok((session, key))
}

/// Waits until the session ends: the connection closes (agent exit, crash, idle
/// timeout) or the agent says `Bye`. Returns why.
async fn watch_session(connection: &Connection, _send: SendStream, mut recv: RecvStream) -> String {
    tokio::select! {
        error = connection.closed() => format!("connection closed ({error})"),
        message = read_frame(&mut recv, MAX_CONTROL_FRAME) => match message {
            Ok(Some(payload)) => match ControlMessage::from_payload(&payload) {
                Ok(ControlMessage::Bye { reason }) => {
                    close(connection, CloseCode::Normal, "bye");
                    format!("agent said bye ({})", sanitize(&reason))
                }
                _ => {
                    close(connection, CloseCode::ProtocolError, "unexpected control message");
                    "protocol error on the control stream".to_owned()
                }
            },
            Ok(None) => {
                close(connection, CloseCode::Normal, "control stream closed");
                "control stream closed".to_owned()
            }
            Err(e) => {
                close(connection, CloseCode::ProtocolError, "bad control frame");
                format!("control stream failed ({e})")
            }
        },
    }
}

/// Keeps agent-supplied text printable and short before it reaches a log line.
fn sanitize(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// Removes the session from the routing table however the task ends.
struct SessionGuard {
    shared: Arc<Shared>,
    session: Arc<Session>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.shared.routes.remove(&self.session);
    }
}
