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
//! A mapping lives exactly as long as the agent's connection. Start one with
//! [`Relay::start`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod agents;
pub mod audit;
mod body;
pub mod config;
pub mod forward;
pub mod front;
mod headers;
pub mod names;
mod pages;
pub mod routes;
pub mod tls;
pub mod tokens;

pub use config::RelayConfig;

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
}

/// A running relay: its bound addresses and its tasks.
pub struct Relay {
    /// Where the HTTPS front door listens.
    pub https_addr: SocketAddr,
    /// Where the QUIC endpoint for agents listens.
    pub quic_addr: SocketAddr,
    /// Where the optional plain-HTTP front door listens.
    pub http_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Loads certificates and tokens, binds every listener and starts serving.
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        config.validate().map_err(RelayError::Config)?;
        let certified = tls::load_certified_key(&config.cert, &config.key)?;
        let tokens = tokens::TokenStore::load(&config.tokens)?;
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
        let https = bind(config.listen_https).await?;
        let http = match config.listen_http {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let endpoint =
            agents::bind_endpoint(&config, &certified).map_err(|source| RelayError::Bind {
                addr: config.listen_quic,
                source,
            })?;
        let https_addr = local_addr(&https, config.listen_https)?;
        let http_addr = match &http {
            Some(l) => Some(local_addr(
                l,
                l.local_addr().unwrap_or(config.listen_https),
            )?),
            None => None,
        };
        let quic_addr = endpoint.local_addr().map_err(|source| RelayError::Bind {
            addr: config.listen_quic,
            source,
        })?;

        let front_tls = tls::front_server_config(&certified)?;
        let mut config = config;
        // URLs carry the port actually bound (matters when the config said port 0).
        config.url_port.get_or_insert(https_addr.port());
        let shared = Arc::new(Shared {
            routes: routes::RoutingTable::default(),
            tokens,
            names: names::NameRegistry::default(),
            audit,
            domain: config.normalized_domain(),
            config,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(front::serve_https(https, front_tls, shared.clone()));
        if let Some(http) = http {
            tasks.spawn(front::serve_http(http, shared.clone()));
        }
        tasks.spawn(agents::accept_agents(endpoint.clone(), shared.clone()));
        tasks.spawn(watch_tokens(shared.clone()));
        tracing::info!(
            domain = %shared.config.domain,
            https = %https_addr,
            quic = %quic_addr,
            "relay listening"
        );
        Ok(Self {
            https_addr,
            quic_addr,
            http_addr,
            shared,
            endpoint,
            tasks,
        })
    }

    /// How many sessions are live right now.
    pub fn live_sessions(&self) -> usize {
        self.shared.routes.len()
    }

    /// Closes every agent connection and stops listening.
    pub async fn shutdown(mut self) {
        self.endpoint.close(
            quinn::VarInt::from_u32(jobgate_protocol::CloseCode::Draining.as_u32()),
            b"relay shutting down",
        );
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.endpoint.wait_idle().await;
    }
}

/// How often the tokens file is checked for changes.
const TOKENS_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Re-reads the tokens file when it changes; a user whose token is gone loses their live
/// sessions at once.
async fn watch_tokens(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(TOKENS_POLL_INTERVAL).await;
        reload_tokens(&shared);
    }
}

/// Reloads tokens now (also on SIGHUP) and closes the sessions of revoked users.
pub(crate) fn reload_tokens(shared: &Shared) {
    match shared.tokens.reload_if_changed() {
        Ok(false) => {}
        Ok(true) => {
            tracing::info!("tokens file reloaded");
            for session in shared.routes.all() {
                if !shared.tokens.has_user(&session.user) {
                    tracing::info!(name = %session.name, user = %session.user, "token revoked: closing session");
                    session.connection.close(
                        quinn::VarInt::from_u32(jobgate_protocol::CloseCode::Revoked.as_u32()),
                        b"token revoked",
                    );
                }
            }
        }
        Err(e) => tracing::warn!("tokens file not reloaded, previous tokens stay in force: {e}"),
    }
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, RelayError> {
    listener.local_addr().map_err(|source| RelayError::Bind {
        addr: asked,
        source,
    })
}
