//! The agents' door: a QUIC endpoint where each agent connects, says `Hello` on its
//! control stream, is given a name in `Welcome`, and keeps that name for exactly as long
//! as the connection lives — or, if the connection vanished without `Bye`, for a grace
//! period in which the agent may come back with its resume ticket.

use crate::access::SessionLock;
use crate::audit::AuditEvent;
use crate::config::RelayConfig;
use crate::limits::PRE_HELLO_WINDOW;
use crate::metrics::OwnedGaugeGuard;
use crate::names::SessionName;
use crate::routes::{InsertError, Session};
use crate::ticket::TicketClaims;
use crate::tokens::Identity;
use crate::Shared;
use jobgate_protocol::quic::{relay_transport_config, UDP_SOCKET_BUFFER};
use jobgate_protocol::{
    read_frame, write_frame, AccessMode, CloseCode, ControlMessage, JobInfo, RefusalCode,
    SessionLimits, Token, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use jobgate_transport::{Connection, ConnectionError, RecvStream, SendStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Streams an agent may open towards the relay: only its control stream.
const AGENT_OPENED_STREAMS: u32 = 1;
/// Streams open at once on an agent's TCP-transport connection (requests in flight plus
/// WebSockets): yamux guarantees each 256 KiB of receive window, so this caps what one
/// TCP agent can make the relay buffer at 72 MiB ((256 + 32) × 256 KiB; QUIC sessions:
/// the memory budget's window). Requests beyond it get 503 until streams end.
pub const TCP_AGENT_STREAMS: usize = 256;
/// How long a connection that a session moved away from may go on carrying the streams it
/// had (WebSockets): then they are cut, and browsers reconnect over the new one.
const MOVED_CONNECTION_GRACE: Duration = Duration::from_secs(600);
/// How often the relay checks whether such a connection has finished its streams.
const MOVED_CONNECTION_POLL: Duration = Duration::from_secs(1);
/// How long a `Refused` frame gets to reach the agent before the connection closes.
const REFUSED_LINGER: Duration = Duration::from_secs(1);
/// From this share (in percent) of `max_pending_handshakes` on, a new connection from
/// an address not yet validated gets a QUIC Retry first: a spoofed source cannot answer
/// it, so a flood of forged Initials costs one stateless packet each, while agents that
/// reconnect at once after a relay restart only pay one extra round trip.
const RETRY_FROM_PENDING_PERCENT: usize = 50;

/// The QUIC server configuration for agents (certificate from the shared resolver), with
/// `stream_window` bytes of receive window per stream.
pub(crate) fn server_config(
    config: &RelayConfig,
    shared_tls: Arc<rustls::ServerConfig>,
    stream_window: u32,
) -> std::io::Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(shared_tls)
        .map_err(std::io::Error::other)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // quinn restarts its idle timer on our own first send after the peer went silent, so
    // a dead agent is noticed up to one keep-alive late: aim that much earlier.
    let (idle, keep_alive) = (config.idle_timeout(), config.keep_alive());
    let effective_idle = if idle > keep_alive * 2 {
        idle - keep_alive
    } else {
        idle
    };
    // Until its `Hello` is admitted a connection may make the relay buffer only a small
    // window (QUIC counts out-of-order data with gaps against it too); admission raises
    // it (see `serve_agent`). The per-stream window is fixed at the handshake.
    server.transport_config(relay_transport_config(
        effective_idle,
        keep_alive,
        AGENT_OPENED_STREAMS,
        PRE_HELLO_WINDOW,
        stream_window,
    ));
    Ok(server)
}

/// Binds the agents' QUIC endpoint. Stateless resets are keyed from the resume key, so a
/// restarted relay resets the old process's connections at once.
pub(crate) fn bind_endpoint(
    config: &RelayConfig,
    server: quinn::ServerConfig,
    reset_key: ring::hmac::Key,
    cid_key: u64,
    runtime: Arc<dyn quinn::Runtime>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(config.listen_quic)?;
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        let _ = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    }
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    jobgate_protocol::quic::tune_endpoint(&mut endpoint_config);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)
}

/// Accepts agent connections until the endpoint closes. Connections waiting for their
/// handshake and `Hello` are capped: under load, unvalidated addresses get a QUIC Retry
/// first; at the cap, new connections are refused.
///
/// A connection that arrives while the memory budget is spent is accepted with
/// `small_windows` (small per-stream windows), so that a few stalled downloads cannot
/// fill its small connection window and stall the whole session.
pub(crate) async fn accept_agents(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    small_windows: Arc<quinn::ServerConfig>,
) {
    let cap = shared.config.max_pending_handshakes;
    let retry_from = cap * RETRY_FROM_PENDING_PERCENT / 100;
    while let Some(incoming) = endpoint.accept().await {
        let pending_now = usize::try_from(shared.metrics.pending_handshakes.get()).unwrap_or(0);
        if pending_now >= cap {
            shared
                .metrics
                .agent_handshakes_over_cap
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(remote = %incoming.remote_address(), "too many pending agent handshakes: refused");
            incoming.refuse();
            continue;
        }
        if pending_now >= retry_from && !incoming.remote_address_validated() && incoming.may_retry()
        {
            shared
                .metrics
                .agent_handshakes_retried
                .fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        // Counted here, in the accept loop, so the cap cannot be overrun by a burst.
        let pending = OwnedGaugeGuard::enter(shared.clone(), |m| &m.pending_handshakes);
        let shared = shared.clone();
        let remote = incoming.remote_address();
        let connecting = if shared.window_budget.has_room() {
            incoming.accept()
        } else {
            incoming.accept_with(small_windows.clone())
        };
        tokio::spawn(async move {
            let connection = match connecting {
                Ok(connecting) => connecting.await,
                Err(e) => Err(e),
            };
            match connection {
                Ok(connection) => serve_agent(Connection::Quic(connection), shared, pending).await,
                Err(e) => {
                    shared
                        .metrics
                        .agent_handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, "agent handshake failed: {e}");
                }
            }
        });
    }
}

/// Serves an agent that connected over TLS/TCP to the HTTPS listener (ALPN `jobgate/1`,
/// where UDP is blocked): the same session as over QUIC, under the same handshake cap.
pub(crate) async fn serve_tcp_agent<T>(tls: T, peer: std::net::SocketAddr, shared: Arc<Shared>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let pending_now = usize::try_from(shared.metrics.pending_handshakes.get()).unwrap_or(0);
    if pending_now >= shared.config.max_pending_handshakes {
        shared
            .metrics
            .agent_handshakes_over_cap
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "too many pending agent handshakes: TCP agent refused");
        return;
    }
    let pending = OwnedGaugeGuard::enter(shared.clone(), |m| &m.pending_handshakes);
    let settings = jobgate_transport::MuxSettings {
        keep_alive: shared.config.keep_alive(),
        idle_timeout: shared.config.idle_timeout(),
        max_streams: TCP_AGENT_STREAMS,
    };
    serve_agent(
        jobgate_transport::tcp::accept(tls, peer, settings),
        shared,
        pending,
    )
    .await
}

fn close(connection: &Connection, code: CloseCode, reason: &str) {
    connection.close(code, reason.as_bytes());
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a `Hello` (or `Reserve`) did not lead to a session.
pub(crate) struct Refusal {
    code: RefusalCode,
    message: String,
    /// The user, when the token was valid but something else was not.
    user: Option<String>,
}

impl Refusal {
    pub(crate) fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            user: None,
        }
    }

    pub(crate) fn for_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }
}

/// A session admitted from a `Hello`.
struct Admitted {
    session: Arc<Session>,
    /// The new access key (only for a fresh `link` session; a resumed one keeps its old).
    key: Option<String>,
    resumed: bool,
}

/// One agent connection, from handshake to close. `pending` counts it among the pending
/// handshakes until its `Hello` is answered.
async fn serve_agent(connection: Connection, shared: Arc<Shared>, pending: OwnedGaugeGuard) {
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
            shared
                .metrics
                .agent_handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            return close(
                &connection,
                CloseCode::ProtocolError,
                "expected a control stream with Hello",
            );
        }
        Err(_) => {
            shared
                .metrics
                .agent_handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            return close(&connection, CloseCode::HandshakeTimeout, "no Hello in time");
        }
    };

    if let Some(ControlMessage::Reserve {
        version,
        token,
        access,
        job_id,
    }) = hello
    {
        drop(pending);
        return answer_reserve(&shared, &connection, send, (version, token, access, job_id)).await;
    }
    let admitted = admit(&shared, &connection, hello);
    drop(pending);
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(&shared, &connection, send, refusal).await,
    };
    let session = admitted.session;
    // In a cluster the name is this relay's only once etcd says so.
    if let Err(refusal) = crate::cluster::claim_session(&shared, session.name).await {
        shared.routes.remove(&session);
        return refuse(&shared, &connection, send, refusal).await;
    }
    // The session's receive window, out of the relay-wide budget while it lasts; held
    // (and counted) until the session ends.
    let window = shared.window_budget.grant();
    connection.set_receive_window(window.window());
    let _full_window = window
        .is_full()
        .then(|| shared.metrics.sessions_full_window.enter());
    if !window.is_full() {
        shared
            .metrics
            .sessions_small_window
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(name = %session.name, "memory budget spent: session gets the small receive window");
    }
    let url = shared.config.session_url(session.name.as_str());
    let welcome = ControlMessage::Welcome {
        name: session.name.to_string(),
        url: url.clone(),
        access_url: match &admitted.key {
            Some(key) => format!("{url}?{}={key}", crate::access::KEY_PARAM),
            None => url,
        },
        resume_ticket: Some(ticket_for(&shared, &session)),
        limits: SessionLimits {
            max_streams: u64::from(shared.config.max_streams_per_agent),
            max_header_bytes: shared.config.max_header_bytes as u64,
        },
    };
    if write_frame(&mut send, &welcome.to_payload()).await.is_err() {
        shared.routes.remove(&session);
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
        resumed = admitted.resumed,
        transport = %connection.kind(),
        "session opened"
    );
    let opened = if admitted.resumed {
        &shared.metrics.sessions_resumed
    } else {
        &shared.metrics.sessions_opened
    };
    opened.fetch_add(1, Ordering::Relaxed);
    shared.audit.record(&AuditEvent::Opened {
        user: &session.user,
        name: session.name.as_str(),
        job_id: session.job.id.as_deref(),
        host: session.job.host.as_deref(),
        agent_addr: remote,
        access: access_word(session.access),
        transport: connection.kind().as_str(),
    });
    let _by_transport = shared
        .metrics
        .sessions_by_transport(connection.kind())
        .enter();

    let end = watch_session(&shared, &session, send, recv).await;
    let is_final = end.is_final() || session.revoked.load(Ordering::Relaxed);
    shared
        .metrics
        .sessions_closed
        .fetch_add(1, Ordering::Relaxed);
    let reason = end.describe();
    let (bytes_in, bytes_out) = connection.bytes();
    shared.audit.record(&AuditEvent::Closed {
        user: &session.user,
        name: session.name.as_str(),
        reason: &reason,
        duration_s: session.opened.elapsed().as_secs(),
        bytes_in,
        bytes_out,
        requests: session.requests.load(Ordering::Relaxed),
    });
    tracing::info!(name = %session.name, user = %session.user, "session closed: {reason}");
    end_session(&shared, &session, is_final).await;
    // The agent's `Bye` is acknowledged only now that its name's end is on disk.
    if matches!(end, End::Bye(_)) {
        close(&connection, CloseCode::Normal, "bye");
    }
}

async fn refuse(shared: &Shared, connection: &Connection, mut send: SendStream, refusal: Refusal) {
    let remote = connection.remote_address();
    tracing::info!(%remote, code = ?refusal.code, "agent refused: {}", refusal.message);
    shared
        .metrics
        .agents_refused
        .fetch_add(1, Ordering::Relaxed);
    let code = serde_json::to_value(refusal.code).ok();
    shared.audit.record(&AuditEvent::Refused {
        user: refusal.user.as_deref(),
        agent_addr: remote,
        code: code.as_ref().and_then(|c| c.as_str()).unwrap_or("unknown"),
    });
    // A first frame that is no `Hello` breaks the protocol rather than asking for
    // something the relay refuses: it closes with `ProtocolError` after `Refused`.
    let close_code = match refusal.code {
        RefusalCode::Malformed => CloseCode::ProtocolError,
        _ => CloseCode::Refused,
    };
    let refused = ControlMessage::Refused {
        code: refusal.code,
        message: refusal.message,
    };
    let _ = write_frame(&mut send, &refused.to_payload()).await;
    let _ = tokio::time::timeout(REFUSED_LINGER, async {
        let _ = send.finish().await;
        send.stopped().await;
    })
    .await;
    close(connection, close_code, "refused");
}

/// After the connection ended: a final end frees the name for good; otherwise the name
/// is parked for the resume grace period (503 meanwhile), then freed.
///
/// A final end is written to the state file before the name leaves the routing table:
/// once anyone can see that it ended (a 404, the agent's acknowledged `Bye`), a relay
/// killed at that moment still knows after its restart, so no ticket brings it back.
/// Marking it ended first also refuses any resume racing with the write.
async fn end_session(shared: &Arc<Shared>, session: &Arc<Session>, is_final: bool) {
    let grace = Duration::from_secs(shared.config.resume_grace_secs);
    if is_final || grace.is_zero() {
        if shared.routes.is_current(session) {
            mark_ended(shared, session.name);
            crate::state::save_now(shared).await;
            shared.routes.remove(session);
            crate::cluster::end_for_good(shared, session.name);
        }
        return;
    }
    let until = Instant::now() + grace;
    if !shared.routes.park(session, until) {
        return; // replaced by a newer connection already
    }
    // The agent may come back to another relay of the cluster: the name is free for it.
    crate::cluster::release(shared, session.name);
    expire_after_grace(shared, session.name, until);
}

/// Ends a parked name at `until` unless its agent came back by then.
pub(crate) fn expire_after_grace(shared: &Arc<Shared>, name: SessionName, until: Instant) {
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(until.into()).await;
        if crate::cluster::held_elsewhere(&shared, name.as_str()).is_some() {
            // Its agent came back to another relay of the cluster: it lives on there.
            shared.routes.expire(&name, until);
            return;
        }
        if shared.routes.expire(&name, until) {
            mark_ended(&shared, name);
            crate::cluster::end_for_good(&shared, name);
            // Nobody waits for an acknowledgement, but a ticket may still be out there:
            // write at once rather than at the next periodic save.
            crate::state::save_soon(&shared);
            tracing::info!(%name, "session ended: its agent did not come back within the grace period");
        }
    });
}

/// A name dead for good: remembered (also across restarts) until its last possible
/// ticket has expired, so no ticket brings it back.
pub(crate) fn mark_ended(shared: &Shared, name: SessionName) {
    let forget_after = unix_now().saturating_add(shared.config.ticket_lifetime_secs);
    shared.names.mark_ended_until(name, forget_after);
}

/// A signed resume ticket for `session`.
fn ticket_for(shared: &Shared, session: &Session) -> Token {
    let key_hash = match &session.lock {
        SessionLock::Link { key_hash } => Some(*key_hash),
        SessionLock::Public | SessionLock::Owner => None,
    };
    Token(shared.tickets.issue(&TicketClaims {
        name: session.name,
        user: session.user.clone(),
        key_hash,
        expires: unix_now() + shared.config.ticket_lifetime_secs,
    }))
}

/// Checks a `Hello` and registers the session it asks for (or gives back, on resume).
fn admit(
    shared: &Arc<Shared>,
    connection: &Connection,
    hello: Option<ControlMessage>,
) -> Result<Admitted, Refusal> {
    let Some(ControlMessage::Hello {
        version,
        token,
        access,
        share,
        job,
        resume,
        reservation,
        moving,
    }) = hello
    else {
        return Err(Refusal::new(
            RefusalCode::Malformed,
            "the first control frame must be Hello",
        ));
    };
    check_version(version)?;
    if *shared.draining.borrow() {
        return Err(Refusal::new(
            RefusalCode::Unavailable,
            "the relay is restarting: try again in a moment",
        ));
    }
    let identity = identify(shared, &token)?;

    // A reservation made for a mode decides it where the agent names none (`launch`
    // reserves before it knows what the job's agent will say).
    let named_access = access;
    let mut access = access.unwrap_or_else(|| shared.config.default_access());
    let resumed = resume
        .as_ref()
        .and_then(|ticket| usable_ticket(shared, ticket, &identity.user, access));
    if resume.is_some() && resumed.is_none() {
        tracing::info!(user = %identity.user, "resume ticket not accepted (expired, ended or foreign): new name");
    }
    let was_resumed = resumed.is_some();
    // A reservation counts only where no resume ticket gave the name back (the agent
    // keeps presenting it on reconnects), and a bad one is refused rather than quietly
    // swapped for a new name: the user holds the URL printed at submit time.
    let reserved = match (&resumed, &reservation) {
        (None, Some(reservation)) => Some(crate::reserve::check(
            shared,
            reservation,
            &identity.user,
            &job,
            named_access,
        )?),
        _ => None,
    };
    let (name, lock, key) = match resumed.or(reserved) {
        Some(claims) => {
            shared.names.claim(claims.name);
            let lock = match (claims.key_hash, access) {
                (Some(key_hash), _) => {
                    access = AccessMode::Link;
                    SessionLock::Link { key_hash }
                }
                (None, AccessMode::Owner) => SessionLock::Owner,
                (None, _) => SessionLock::Public,
            };
            (claims.name, lock, None)
        }
        None => {
            // Only a fresh name counts against the user's rate: it is what the relay must
            // remember for a ticket lifetime after it ends.
            if let Err(wait) = shared.new_sessions.try_take(&identity.user, Instant::now()) {
                return Err(rate_limited(shared, &identity.user, wait));
            }
            let (lock, key) = match access {
                _ if !shared.config.access_allowed(access) => {
                    return Err(Refusal::new(
                        RefusalCode::AccessModeNotAllowed,
                        not_allowed_message(shared, access),
                    )
                    .for_user(&identity.user))
                }
                AccessMode::Public => (SessionLock::Public, None),
                AccessMode::Owner => (SessionLock::Owner, None),
                AccessMode::Link => {
                    let (lock, key) = SessionLock::new_link();
                    (lock, Some(key))
                }
            };
            (shared.names.issue(), lock, key)
        }
    };
    let origin = shared.config.session_origin(name.as_str()).into_boxed_str();
    let mut session = new_session(name, &identity, job, access, lock, origin, connection);
    if let Some(fresh) = Arc::get_mut(&mut session) {
        fresh.shares = share;
    }
    let user_limit = identity
        .max_sessions
        .unwrap_or(shared.config.max_sessions_per_user);
    let replaced = shared
        .routes
        .insert(session.clone(), user_limit, shared.config.max_agents)
        .map_err(|e| {
            match e {
                InsertError::UserLimit(n) => Refusal::new(
                    RefusalCode::TooManySessions,
                    format!(
                        "user {} already has {n} live sessions, the most allowed: end one first",
                        identity.user
                    ),
                ),
                InsertError::GlobalLimit(_) | InsertError::NameTaken => Refusal::new(
                    RefusalCode::Unavailable,
                    "the relay is at capacity: try again later",
                ),
            }
            .for_user(&identity.user)
        })?;
    // A reserved name's page gives way to the session.
    shared.queued.remove(&session.name);
    if let Some(old) = replaced {
        if moving && was_resumed {
            tracing::info!(name = %old.name, from = %old.connection.kind(), to = %connection.kind(), "the agent moves its session to a new connection");
            retire_moved(old);
        } else {
            tracing::info!(name = %old.name, "a reconnected agent replaces a stale connection");
            close(
                &old.connection,
                CloseCode::Replaced,
                "replaced by a newer connection",
            );
        }
    }
    Ok(Admitted {
        session,
        key,
        resumed: was_resumed,
    })
}

/// Closes the connection a session moved away from once the streams it still carries
/// (open WebSockets, requests waiting for their answer) have ended, or after
/// [`MOVED_CONNECTION_GRACE`]: a move to QUIC does not cut a notebook's kernel WebSocket.
fn retire_moved(old: Arc<Session>) {
    tokio::spawn(async move {
        let until = Instant::now() + MOVED_CONNECTION_GRACE;
        while Instant::now() < until
            && (old.websockets.load(Ordering::Relaxed) > 0
                || old.in_flight.load(Ordering::Relaxed) > 0)
            && old.connection.close_reason().is_none()
        {
            tokio::time::sleep(MOVED_CONNECTION_POLL).await;
        }
        close(
            &old.connection,
            CloseCode::Replaced,
            "the session moved to a new connection",
        );
    });
}

/// Refuses a protocol version this relay does not speak.
fn check_version(version: u32) -> Result<(), Refusal> {
    if version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(Refusal::new(
        RefusalCode::UnsupportedVersion,
        format!("this relay speaks protocol version {PROTOCOL_VERSION}, the agent {version}: update jobgate"),
    ))
}

/// The identity behind an agent token, or the refusal for an unknown one.
fn identify(shared: &Arc<Shared>, token: &Token) -> Result<Identity, Refusal> {
    // A token issued a moment ago may not be loaded yet: a stat tells, cheaply.
    let identity = shared.tokens.verify(&token.0).or_else(|| {
        crate::reload_tokens(shared);
        shared.tokens.verify(&token.0)
    });
    identity.ok_or_else(|| {
        Refusal::new(
            RefusalCode::BadToken,
            "the relay does not know this token (mistyped, revoked or for another relay): ask your admin for a new one",
        )
    })
}

/// Answers a `Reserve` (a connection that only asks for a name for a queued job), then
/// closes the connection.
async fn answer_reserve(
    shared: &Arc<Shared>,
    connection: &Connection,
    mut send: SendStream,
    ask: (u32, Token, Option<AccessMode>, String),
) {
    let (version, token, access, job_id) = ask;
    let access = access.unwrap_or_else(|| shared.config.default_access());
    let answer = check_version(version)
        .and_then(|()| identify(shared, &token))
        .and_then(|identity| crate::reserve::reserve(shared, &identity, access, &job_id));
    match answer {
        Ok(reserved) => {
            let _ = write_frame(&mut send, &reserved.to_payload()).await;
            let _ = tokio::time::timeout(REFUSED_LINGER, async {
                let _ = send.finish().await;
                send.stopped().await;
            })
            .await;
            close(connection, CloseCode::Normal, "reserved");
        }
        Err(refusal) => refuse(shared, connection, send, refusal).await,
    }
}

/// The claims of `ticket` if it may give its name back to `user` now.
fn usable_ticket(
    shared: &Shared,
    ticket: &Token,
    user: &str,
    access: AccessMode,
) -> Option<TicketClaims> {
    let claims = shared.tickets.verify(&ticket.0)?;
    let fits_access = match (access, claims.key_hash) {
        (AccessMode::Link, Some(_)) => shared.config.access_allowed(access),
        (AccessMode::Public | AccessMode::Owner, None) => shared.config.access_allowed(access),
        _ => false,
    };
    (claims.user == user
        && claims.expires > unix_now()
        && fits_access
        && !shared.names.is_ended(&claims.name))
    .then_some(claims)
}

/// Why `access` is refused, and what the relay allows instead.
fn not_allowed_message(shared: &Shared, access: AccessMode) -> String {
    let allowed: Vec<&str> = [AccessMode::Owner, AccessMode::Link, AccessMode::Public]
        .into_iter()
        .filter(|mode| shared.config.access_allowed(*mode))
        .map(access_word)
        .collect();
    let why = match access {
        AccessMode::Owner if shared.config.oidc_issuer.is_none() => {
            " (owner needs single sign-on, which this relay does not have)"
        }
        _ => "",
    };
    format!(
        "this relay does not allow {} sessions{why}: use --access {}",
        access_word(access),
        allowed.join(" or --access ")
    )
}

/// The word for `mode` in flags and config files.
pub(crate) fn access_word(mode: AccessMode) -> &'static str {
    match mode {
        AccessMode::Owner => "owner",
        AccessMode::Link => "link",
        AccessMode::Public => "public",
    }
}

/// The refusal for a user over their rate of new sessions, saying when to retry.
pub(crate) fn rate_limited(shared: &Shared, user: &str, wait: Duration) -> Refusal {
    let config = &shared.config;
    Refusal::new(
        RefusalCode::RateLimited,
        format!(
            "user {user} opened new sessions faster than this relay allows ({} at once, then {} a minute): try again in {} s",
            config.new_sessions_burst_per_user,
            config.max_new_sessions_per_user_per_minute,
            wait.as_secs().max(1),
        ),
    )
    .for_user(user)
}

fn new_session(
    name: crate::names::SessionName,
    identity: &Identity,
    job: JobInfo,
    access: AccessMode,
    lock: SessionLock,
    origin: Box<str>,
    connection: &Connection,
) -> Arc<Session> {
    Arc::new(Session {
        name,
        user: identity.user.clone(),
        token_sha256: identity.token_sha256,
        job,
        access,
        lock,
        origin,
        connection: connection.clone(),
        agent_addr: connection.remote_address(),
        opened: Instant::now(),
        requests: Default::default(),
        in_flight: Default::default(),
        websockets: Default::default(),
        revoked: Default::default(),
        shares: Default::default(),
    })
}

/// How a session's connection ended.
enum End {
    /// The agent said `Bye`: the job is over.
    Bye(String),
    /// The connection closed or failed without a `Bye`.
    Lost(String),
    /// The agent broke the protocol.
    ProtocolError(String),
}

impl End {
    fn describe(&self) -> String {
        match self {
            Self::Bye(reason) => format!("agent said bye ({reason})"),
            Self::Lost(reason) => format!("connection lost ({reason})"),
            Self::ProtocolError(reason) => format!("protocol error ({reason})"),
        }
    }

    /// Whether the name dies now (no resume).
    fn is_final(&self) -> bool {
        matches!(self, Self::Bye(_) | Self::ProtocolError(_))
    }
}

/// Runs the control stream until the session ends: forwards `Drain`, renews the resume
/// ticket, and waits for `Bye` or the connection's end.
async fn watch_session(
    shared: &Shared,
    session: &Session,
    mut send: SendStream,
    mut recv: RecvStream,
) -> End {
    let connection = &session.connection;
    let mut draining = shared.draining.subscribe();
    let mut drain_open = true;
    let renew_every = Duration::from_secs((shared.config.ticket_lifetime_secs / 3).max(1));
    let mut renew = tokio::time::interval_at((Instant::now() + renew_every).into(), renew_every);
    let read = read_frame(&mut recv, MAX_CONTROL_FRAME);
    tokio::pin!(read);
    loop {
        tokio::select! {
            error = connection.closed() => return connection_ended(&error),
            message = &mut read => {
                return match message {
                    // A `Bye` is acknowledged (Normal close) by the caller, once the
                    // name's end is on disk.
                    Ok(Some(payload)) => match ControlMessage::from_payload(&payload) {
                        Ok(ControlMessage::Bye { reason }) => End::Bye(sanitize(&reason)),
                        _ => {
                            close(connection, CloseCode::ProtocolError, "unexpected control message");
                            End::ProtocolError("unexpected control message".into())
                        }
                    },
                    Ok(None) => End::Bye("control stream closed".into()),
                    // The stream failed because the whole connection did: not the agent's fault.
                    Err(_) if connection.close_reason().is_some() => {
                        connection_ended(&connection.closed().await)
                    }
                    Err(e) => {
                        close(connection, CloseCode::ProtocolError, "bad control frame");
                        End::ProtocolError(e.to_string())
                    }
                };
            }
            changed = draining.changed(), if drain_open => {
                if changed.is_err() {
                    drain_open = false; // the relay is going away; the connection closes with it
                } else if *draining.borrow() {
                    let drain = ControlMessage::Drain { reason: "relay restarting".into() };
                    let _ = write_frame(&mut send, &drain.to_payload()).await;
                }
            }
            _ = renew.tick() => {
                let ticket = ControlMessage::Ticket { resume_ticket: ticket_for(shared, session) };
                let _ = write_frame(&mut send, &ticket.to_payload()).await;
            }
        }
    }
}

/// How a connection's end counts: an agent that closed with code Normal ended its job
/// (its `Bye` may still be in flight behind the close), so the name dies now; anything
/// else may be a network blip, so the name waits for a resume.
fn connection_ended(error: &ConnectionError) -> End {
    match error.peer_close_code() {
        Some(CloseCode::Normal) => End::Bye("agent closed the connection".into()),
        _ => End::Lost(error.to_string()),
    }
}

/// Keeps agent-supplied text printable and short before it reaches a log line.
fn sanitize(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}
