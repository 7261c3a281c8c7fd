//! The jobgate relay.
//!
//! It runs on a DMZ host and has two doors:
//!
//! * a **QUIC endpoint** ([`agents`]) where agents inside batch jobs dial in, authenticate
//!   with their user's token and are given a fresh random name;
//! * an **HTTPS front door** ([`front`]) for `*.<domain>` that routes every request by its
//!   host name through the [`routes::RoutingTable`] and forwards it ([`forward`]) as a new
//!   QUIC stream over the right agent's connection.
//!
//! A session lives exactly as long as the agent's connection. Start one with
//! [`Relay::start`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod agents;
pub mod audit;
mod body;
pub mod cluster;
pub mod config;
pub mod cores;
pub mod forward;
pub mod front;
mod headers;
pub mod limits;
pub mod metrics;
pub mod names;
mod pages;
pub mod queued;
pub mod ratelimit;
pub mod reserve;
pub mod routes;
pub mod signon;
pub mod state;
pub mod ticket;
pub mod tls;
pub mod tokens;

pub use config::{RelayConfig, REQUIRED_SETTINGS};

use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Why the relay could not start.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The tokens file could not be loaded.
    #[error(transparent)]
    Tokens(#[from] tokens::TokensError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// State shared by every task of one relay.
pub(crate) struct Shared {
    pub config: RelayConfig,
    /// The domain, lower-case, no trailing dot: compared on every request.
    pub domain: String,
    pub routes: routes::RoutingTable,
    pub tokens: tokens::TokenStore,
    pub names: names::NameRegistry,
    pub audit: audit::AuditLog,
    pub tickets: ticket::TicketKey,
    pub certs: Arc<tls::CertStore>,
    /// Flips to `true` when the relay drains; session tasks tell their agents.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// Requests between arrival and response head.
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Counters for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Coalesces writes of the state file.
    pub saver: state::Saver,
    /// Per-user rate of new sessions.
    pub new_sessions: ratelimit::NewSessionLimiter,
    /// The admin API's key (`--admin-token-file`); `None`: the API is off.
    pub admin: Option<admin::AdminKey>,
    /// Client connections open, in total and per address.
    pub client_caps: Arc<limits::ConnectionCaps>,
    /// The relay-wide budget for agents' receive windows.
    pub window_budget: Arc<limits::WindowBudget>,
    /// Single sign-on (`oidc_issuer`), if configured.
    pub signon: Option<signon::SignOn>,
    /// Reserved names whose job has no session yet (their status page).
    pub queued: queued::QueuedNames,
    /// The cluster this relay is part of (`cluster_etcd`), if any.
    pub cluster: Option<cluster::Cluster>,
    /// What each core carries (`cores`), for `/metrics`.
    pub core_load: Arc<cores::CoreLoad>,
}

/// A running relay: its bound addresses and its tasks.
pub struct Relay {
    /// Where the HTTPS front door listens.
    pub https_addr: SocketAddr,
    /// Where the QUIC endpoint for agents listens.
    pub quic_addr: SocketAddr,
    /// Where the optional plain-HTTP front door listens.
    pub http_addr: Option<SocketAddr>,
    /// Where the optional metrics and health listener listens.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the peer link listens (in a cluster).
    pub peer_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    /// The front door's accept loops (stopped first on drain).
    front: JoinSet<()>,
    tasks: JoinSet<()>,
    /// The cores' runtimes (`cores` > 1). Last: dropped after everything that runs on them.
    _cores: cores::Cores,
}

impl Relay {
    /// Loads certificates, tokens and the resume key, binds every listener and starts
    /// serving.
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        config.validate().map_err(RelayError::Config)?;
        let certs = Arc::new(tls::CertStore::load(&config.cert, &config.key)?);
        let signon = signon::SignOn::from_config(&config).map_err(RelayError::Config)?;
        let tokens = tokens::TokenStore::load(&config.tokens)?;
        let serving_cores = config.serving_cores();
        let cores = cores::Cores::start(serving_cores)
            .map_err(|e| RelayError::Config(format!("cannot start {serving_cores} cores: {e}")))?;
        let cluster = join_cluster(&config, &cores).await?;
        let tickets = match &cluster {
            // One key for every relay of the cluster: a ticket from one is good on all.
            Some(cluster) => {
                let mut fresh = [0u8; ticket::KEY_BYTES];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut fresh);
                let key =
                    cluster::node::ClusterNode::shared_resume_key(cluster.node.etcd(), &fresh)
                        .await
                        .map_err(|e| {
                            RelayError::Config(format!(
                                "cannot read the cluster's resume key from etcd: {e}"
                            ))
                        })?;
                ticket::TicketKey::from_bytes(key)
            }
            None => ticket::TicketKey::load_or_create(&config.resume_key_path())
                .map_err(|e| RelayError::Config(e.to_string()))?,
        };
        let admin = match &config.admin_token_file {
            Some(_) if config.listen_metrics.is_none() => {
                return Err(RelayError::Config(
                    "the admin API (admin_token_file) is served on the admin listener: set listen_metrics too".into(),
                ))
            }
            Some(path) => Some(
                admin::AdminKey::load_or_create(path)
                    .map_err(|e| RelayError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let audit = match &config.audit_log {
            Some(path) => audit::AuditLog::open(path).map_err(|e| {
                RelayError::Config(format!("cannot open audit log {}: {e}", path.display()))
            })?,
            None => audit::AuditLog::default(),
        };
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RelayError::Bind { addr, source })
        };
        // One listener per core (SO_REUSEPORT), or one on this runtime.
        let bind_front = |addr: SocketAddr| {
            cores
                .bind_each(addr)
                .map_err(|source| RelayError::Bind { addr, source })
        };
        let https = bind_front(config.listen_https)?;
        let http = config.listen_http.map(bind_front).transpose()?;
        let metrics_listener = match config.listen_metrics {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let quic_error = |source| RelayError::Bind {
            addr: config.listen_quic,
            source,
        };
        let quic_tls = tls::quic_server_config(certs.clone())?;
        let server = agents::server_config(&config, quic_tls.clone(), limits::FULL_STREAM_WINDOW)
            .map_err(quic_error)?;
        let small_windows = Arc::new(
            agents::server_config(&config, quic_tls, limits::SMALL_STREAM_WINDOW)
                .map_err(quic_error)?,
        );
        // With one core, the spreading runtime is quinn's tokio runtime.
        let quic_runtime = cores.quic_runtime();
        let endpoint = agents::bind_endpoint(
            &config,
            server,
            tickets.reset_key(),
            tickets.cid_key(),
            quic_runtime.clone(),
        )
        .map_err(quic_error)?;
        quic_runtime.spread();
        let first = |listeners: &[TcpListener]| match listeners.first() {
            Some(listener) => local_addr(listener, config.listen_https),
            None => Err(RelayError::Config("no listener bound".into())),
        };
        let https_addr = first(&https)?;
        let http_addr = match &http {
            Some(l) => Some(first(l)?),
            None => None,
        };
        let quic_addr = endpoint.local_addr().map_err(quic_error)?;
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(local_addr(l, config.listen_https)?),
            None => None,
        };

        let front_tls = tls::front_server_config(certs.clone())?;
        let peer_addr = match &cluster {
            Some(cluster) => {
                Some(
                    cluster
                        .link
                        .local_addr()
                        .map_err(|source| RelayError::Bind {
                            addr: config.peer_listen.unwrap_or(config.listen_quic),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let client_caps = Arc::new(client_caps(&config));
        let mut config = config;
        // URLs carry the port actually bound (matters when the config said port 0).
        config.url_port.get_or_insert(https_addr.port());
        let shared = Arc::new(Shared {
            routes: routes::RoutingTable::default(),
            tokens,
            names: names::NameRegistry::default(),
            audit,
            tickets,
            certs,
            draining: tokio::sync::watch::Sender::new(false),
            in_flight: Default::default(),
            metrics: Default::default(),
            saver: Default::default(),
            new_sessions: ratelimit::NewSessionLimiter::new(
                config.max_new_sessions_per_user_per_minute,
                config.new_sessions_burst_per_user,
            ),
            admin,
            client_caps,
            window_budget: Arc::new(limits::WindowBudget::new(config.max_buffered_mib)),
            signon,
            queued: Default::default(),
            cluster,
            core_load: cores.load(),
            domain: config.normalized_domain(),
            config,
        });
        state::restore(&shared);
        let mut front = JoinSet::new();
        for (core, listener) in https.into_iter().enumerate() {
            let serve = front::serve_https(listener, core, front_tls.clone(), shared.clone());
            cores.spawn_on(&mut front, core, serve);
        }
        for (core, listener) in http.into_iter().flatten().enumerate() {
            cores.spawn_on(
                &mut front,
                core,
                front::serve_http(listener, core, shared.clone()),
            );
        }
        if shared.cluster.is_some() {
            front.spawn(front::serve_peers(front_tls.clone(), shared.clone()));
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(agents::accept_agents(
            endpoint.clone(),
            shared.clone(),
            small_windows,
        ));
        tasks.spawn(watch_files(shared.clone()));
        tasks.spawn(state::keep_saved(shared.clone()));
        tasks.spawn(cluster::follow_lease(shared.clone()));
        if let Some(listener) = metrics_listener {
            tasks.spawn(metrics::serve(listener, shared.clone()));
        }
        tracing::info!(domain = %shared.config.domain, https = %https_addr, quic = %quic_addr, "relay listening");
        Ok(Self {
            https_addr,
            quic_addr,
            http_addr,
            metrics_addr,
            peer_addr,
            shared,
            endpoint,
            front,
            tasks,
            _cores: cores,
        })
    }

    /// This relay's node id, in a cluster.
    pub fn node_id(&self) -> Option<&str> {
        Some(self.shared.cluster.as_ref()?.node.node_id())
    }

    /// Cores the relay serves on (`cores`): one runtime each, or 1 for the caller's.
    pub fn cores(&self) -> usize {
        self.shared.core_load.cores()
    }

    /// How many sessions are live right now.
    pub fn live_sessions(&self) -> usize {
        self.shared.routes.len()
    }

    /// Every metric, in the Prometheus text format (what `GET /metrics` answers).
    pub fn metrics_text(&self) -> String {
        metrics::render(&self.shared)
    }

    /// Re-reads the certificate and the tokens file now (SIGHUP). Live connections keep
    /// their TLS sessions; new ones get the new certificate.
    pub fn reload(&self) {
        match self.shared.certs.reload() {
            Ok(()) => tracing::info!("certificate reloaded"),
            Err(e) => tracing::warn!("certificate not reloaded, the current one stays: {e}"),
        }
        match self.shared.tokens.reload() {
            Ok(_) => close_sessions_of_stale_tokens(&self.shared),
            Err(e) => tracing::warn!("tokens not reloaded: {e}"),
        }
    }

    /// Graceful stop (SIGTERM): stop accepting clients and agents, tell agents to
    /// reconnect later (`Drain`), give in-flight requests up to the drain grace to
    /// finish, then close everything.
    pub async fn drain(mut self) {
        self.front.abort_all();
        self.shared.draining.send_replace(true);
        let grace = std::time::Duration::from_secs(self.shared.config.drain_grace_secs);
        let start = tokio::time::Instant::now();
        let deadline = start + grace;
        let in_flight = || {
            self.shared
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        // Wait at least long enough for the Drain frames to reach the agents.
        while (in_flight() > 0 || start.elapsed() < DRAIN_MIN)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        self.shutdown().await;
    }

    /// Closes every agent connection and stops listening at once.
    pub async fn shutdown(mut self) {
        // In a cluster, every name held here is free for the relay its agent moves to.
        if let Some(cluster) = &self.shared.cluster {
            if let Err(e) = cluster.node.leave().await {
                tracing::warn!(error = %e, "cannot end this relay's etcd lease: its names lapse with its TTL");
            }
            cluster
                .link
                .endpoint()
                .close(0u32.into(), b"relay shutting down");
        }
        // Every name still held is parked by the next relay process until its agent is back.
        let _ = state::save(&self.shared);
        self.endpoint.close(
            quinn::VarInt::from(jobgate_protocol::CloseCode::Draining),
            b"relay shutting down",
        );
        // Agents on the TCP transport are not the QUIC endpoint's: close each one.
        for session in self.shared.routes.all() {
            if session.connection.kind() == jobgate_transport::TransportKind::Tcp {
                session.connection.close(
                    jobgate_protocol::CloseCode::Draining,
                    b"relay shutting down",
                );
            }
        }
        self.front.abort_all();
        self.tasks.abort_all();
        while self.front.join_next().await.is_some() {}
        while self.tasks.join_next().await.is_some() {}
        let _ = tokio::time::timeout(SHUTDOWN_LINGER, self.endpoint.wait_idle()).await;
    }
}

/// Joins the cluster named by `cluster_etcd`: the lease, the routes, the peer link.
async fn join_cluster(
    config: &RelayConfig,
    cores: &cores::Cores,
) -> Result<Option<cluster::Cluster>, RelayError> {
    let Some(urls) = &config.cluster_etcd else {
        return Ok(None);
    };
    let missing = |what: &str| RelayError::Config(format!("cluster_etcd needs {what}"));
    let node_id = config.node_id.clone().ok_or_else(|| missing("node_id"))?;
    let listen = config.peer_listen.ok_or_else(|| missing("peer_listen"))?;
    let advertise = config
        .peer_advertise
        .clone()
        .ok_or_else(|| missing("peer_advertise"))?;
    let (Some(ca), Some(cert), Some(key)) = (&config.peer_ca, &config.peer_cert, &config.peer_key)
    else {
        return Err(missing("peer_ca, peer_cert and peer_key"));
    };
    let runtime = cores.peer_quic_runtime();
    let link =
        cluster::peer::PeerLink::bind(listen, ca, cert, key, runtime).map_err(|e| match e {
            cluster::peer::PeerError::Bind { addr, source } => RelayError::Bind { addr, source },
            other => RelayError::Config(other.to_string()),
        })?;
    // The port actually bound, where the config said 0 (tests).
    let advertise = match (advertise.rsplit_once(':'), link.local_addr()) {
        (Some((host, "0")), Ok(bound)) => format!("{host}:{}", bound.port()),
        _ => advertise,
    };
    let etcd =
        cluster::etcd::EtcdClient::new(urls).map_err(|e| RelayError::Config(e.to_string()))?;
    let node = cluster::node::ClusterNode::join(etcd, node_id, advertise)
        .await
        .map_err(|e| RelayError::Config(format!("cannot join the cluster through etcd: {e}")))?;
    tracing::info!(node = %node.node_id(), "joined the cluster");
    Ok(Some(cluster::Cluster {
        node,
        link: std::sync::Arc::new(link),
    }))
}

/// Shortest drain: time for `Drain` to reach every agent before the close.
const DRAIN_MIN: std::time::Duration = std::time::Duration::from_millis(300);
/// How often drain checks for in-flight requests.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// How long shutdown waits for agents to acknowledge the close.
const SHUTDOWN_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the tokens file and the certificate are checked for changes.
const FILES_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Re-reads the tokens file and the certificate when they change.
async fn watch_files(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(FILES_POLL_INTERVAL).await;
        reload_tokens(&shared);
        match shared.certs.reload_if_changed() {
            Ok(true) => tracing::info!("certificate changed on disk: reloaded"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "certificate changed but could not be loaded, the current one stays: {e}"
            ),
        }
    }
}

/// Reloads tokens if the file changed, and closes the sessions of revoked or replaced
/// tokens.
pub(crate) fn reload_tokens(shared: &Arc<Shared>) {
    match shared.tokens.reload_if_changed() {
        Ok(false) => {}
        Ok(true) => {
            tracing::info!("tokens file reloaded");
            close_sessions_of_stale_tokens(shared);
        }
        Err(e) => tracing::warn!("tokens file not reloaded, previous tokens stay in force: {e}"),
    }
}

/// Closes every live session whose token is no longer in the tokens file: revoked, or
/// replaced by `jobgate token issue` for the same user (the answer to a leaked token, so
/// it must evict whoever used the old one). Each name ends for good (its tickets cannot
/// bring it back), durably: the connections close only once the state file says so.
fn close_sessions_of_stale_tokens(shared: &Arc<Shared>) {
    let stale: Vec<Arc<routes::Session>> = shared
        .routes
        .all()
        .into_iter()
        .filter(|session| {
            !session.revoked.load(std::sync::atomic::Ordering::Relaxed)
                && !shared.tokens.holds_hash(&session.token_sha256)
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    for session in &stale {
        tracing::info!(name = %session.name, user = %session.user, "token revoked or replaced: closing the session");
        shared.audit.record(&audit::AuditEvent::Revoked {
            user: &session.user,
            name: session.name.as_str(),
        });
        session
            .revoked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        agents::mark_ended(shared, session.name);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        state::save_now(&shared).await;
        for session in stale {
            session.connection.close(
                jobgate_protocol::CloseCode::Revoked,
                b"token revoked or replaced",
            );
        }
    });
}

/// Raises the open-files limit and sizes the client-connection caps to fit it.
fn client_caps(config: &RelayConfig) -> limits::ConnectionCaps {
    let fd_limit = limits::raise_fd_limit();
    let max_total = limits::client_cap_for_fd_limit(config.max_client_connections, fd_limit);
    match fd_limit {
        Some(limit) if max_total < config.max_client_connections => tracing::warn!(
            "open-files limit {limit} is too low for max_client_connections = {} (+{} kept in reserve): \
             at most {max_total} client connections; raise LimitNOFILE (systemd) or ulimit -n",
            config.max_client_connections,
            limits::FD_RESERVE
        ),
        Some(limit) => tracing::info!(
            "open-files limit {limit}: up to {max_total} client connections, {} per address",
            config.max_client_connections_per_ip
        ),
        None => tracing::warn!("open-files limit unknown: client connections are capped at {max_total}"),
    }
    limits::ConnectionCaps::new(max_total, config.max_client_connections_per_ip)
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, RelayError> {
    listener.local_addr().map_err(|source| RelayError::Bind {
        addr: asked,
        source,
    })
}
