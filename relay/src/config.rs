//! Relay configuration: every field can come from `relay.toml` or a command-line flag.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default QUIC port for agents.
pub const DEFAULT_QUIC_PORT: u16 = 7443;
/// Default HTTPS port in development; production puts the front door on 443.
pub const DEFAULT_HTTPS_PORT: u16 = 8443;
/// Default QUIC idle timeout: how long a silent agent keeps its connection. A link cut
/// must stay well under it to lose nothing: a sender whose congestion window is full
/// (mid-download) only probes again on its backed-off retransmit timer, ~2× the cut
/// (measured in tests/e2e/netns.sh: 15 s lost a 10 s cut about half the time).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;
/// Default time a vanished agent's name waits (503) for the agent to reconnect.
pub const DEFAULT_RESUME_GRACE_SECS: u64 = 60;
/// Default lifetime of a resume ticket (renewed every third of it while connected).
pub const DEFAULT_TICKET_LIFETIME_SECS: u64 = 3600;
/// Default time in-flight requests get when the relay drains.
pub const DEFAULT_DRAIN_GRACE_SECS: u64 = 10;
/// Default keep-alive interval on agent connections (well under the idle timeout).
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 2;
/// Default time an agent has to connect and say `Hello`.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default time a client has to send a complete request head (slowloris guard).
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 30;
/// Default time a client has to finish its TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default largest request head (request line plus headers).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default live sessions one user may hold.
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 16;
/// Default live agents in total.
pub const DEFAULT_MAX_AGENTS: usize = 20_000;
/// Default requests in flight per session (streams the relay opens to one agent).
pub const DEFAULT_MAX_STREAMS_PER_AGENT: u32 = 16_384;

/// Everything the relay needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The domain whose subdomains are sessions: `<name>.<domain>`.
    pub domain: String,
    /// PEM certificate chain for `*.<domain>`.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// The tokens file (user names and token hashes).
    pub tokens: PathBuf,
    /// HTTPS front door address.
    #[serde(default = "default_https")]
    pub listen_https: SocketAddr,
    /// QUIC endpoint address for agents.
    #[serde(default = "default_quic")]
    pub listen_quic: SocketAddr,
    /// Optional plain-HTTP front door, for a TLS-terminating load balancer in front.
    #[serde(default)]
    pub listen_http: Option<SocketAddr>,
    /// Optional plain-HTTP listener for `/metrics` (Prometheus) and `/healthz`: keep it on
    /// loopback or an admin network.
    #[serde(default)]
    pub listen_metrics: Option<SocketAddr>,
    /// Port written into session URLs. Default: the HTTPS port, omitted when it is 443.
    #[serde(default)]
    pub url_port: Option<u16>,
    /// Seconds of silence after which an agent connection is dead.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// Seconds between QUIC keep-alives.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Seconds an agent has to connect and say `Hello`.
    #[serde(default = "default_handshake")]
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send a full request head.
    #[serde(default = "default_header_read")]
    pub header_read_timeout_secs: u64,
    /// Largest request head in bytes.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// Live sessions per user (a token entry may set its own).
    #[serde(default = "default_per_user")]
    pub max_sessions_per_user: usize,
    /// Live agents in total.
    #[serde(default = "default_max_agents")]
    pub max_agents: usize,
    /// Requests in flight per session.
    #[serde(default = "default_streams")]
    pub max_streams_per_agent: u32,
    /// Whether agents may ask for `public` sessions (no access key; the app's own login
    /// is the only lock).
    #[serde(default)]
    pub allow_public: bool,
    /// Append-only JSON-lines audit log (sessions opened/closed, agents refused).
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Seconds a vanished agent's name is held (503) for it to reconnect.
    #[serde(default = "default_grace")]
    pub resume_grace_secs: u64,
    /// Seconds a resume ticket is valid; live agents get a fresh one every third of it.
    #[serde(default = "default_ticket_lifetime")]
    pub ticket_lifetime_secs: u64,
    /// File holding the resume-ticket key [default: `jobgate-resume.key` beside the tokens file].
    #[serde(default)]
    pub resume_key: Option<PathBuf>,
    /// File where the relay keeps the names it holds and recently ended names across
    /// restarts [default: `jobgate-state.json` beside the tokens file].
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Seconds in-flight requests get to finish when the relay drains (SIGTERM).
    #[serde(default = "default_drain")]
    pub drain_grace_secs: u64,
}

fn default_grace() -> u64 {
    DEFAULT_RESUME_GRACE_SECS
}
fn default_ticket_lifetime() -> u64 {
    DEFAULT_TICKET_LIFETIME_SECS
}
fn default_drain() -> u64 {
    DEFAULT_DRAIN_GRACE_SECS
}
fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_HTTPS_PORT))
}
fn default_quic() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_QUIC_PORT))
}
fn default_idle() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_keep_alive() -> u64 {
    DEFAULT_KEEP_ALIVE_SECS
}
fn default_handshake() -> u64 {
    DEFAULT_HANDSHAKE_TIMEOUT_SECS
}
fn default_header_read() -> u64 {
    DEFAULT_HEADER_READ_TIMEOUT_SECS
}
fn default_max_header() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn default_per_user() -> usize {
    DEFAULT_MAX_SESSIONS_PER_USER
}
fn default_max_agents() -> usize {
    DEFAULT_MAX_AGENTS
}
fn default_streams() -> u32 {
    DEFAULT_MAX_STREAMS_PER_AGENT
}

impl RelayConfig {
    /// A configuration with every optional field at its default.
    pub fn new(domain: impl Into<String>, cert: PathBuf, key: PathBuf, tokens: PathBuf) -> Self {
        Self {
            domain: domain.into(),
            cert,
            key,
            tokens,
            listen_https: default_https(),
            listen_quic: default_quic(),
            listen_http: None,
            listen_metrics: None,
            url_port: None,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            keep_alive_secs: DEFAULT_KEEP_ALIVE_SECS,
            handshake_timeout_secs: DEFAULT_HANDSHAKE_TIMEOUT_SECS,
            header_read_timeout_secs: DEFAULT_HEADER_READ_TIMEOUT_SECS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
            max_agents: DEFAULT_MAX_AGENTS,
            max_streams_per_agent: DEFAULT_MAX_STREAMS_PER_AGENT,
            allow_public: false,
            audit_log: None,
            resume_grace_secs: DEFAULT_RESUME_GRACE_SECS,
            ticket_lifetime_secs: DEFAULT_TICKET_LIFETIME_SECS,
            resume_key: None,
            state_file: None,
            drain_grace_secs: DEFAULT_DRAIN_GRACE_SECS,
        }
    }

    /// Checks what serde cannot: a usable domain and sane timeouts.
    pub fn validate(&self) -> Result<(), String> {
        let domain = self.domain.trim_end_matches('.');
        if domain.is_empty()
            || !domain
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(format!("domain {:?} is not a DNS name", self.domain));
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs >= self.idle_timeout_secs {
            return Err("keep_alive_secs must be at least 1 and below idle_timeout_secs".into());
        }
        if self.max_header_bytes < 8 * 1024 {
            return Err("max_header_bytes must be at least 8192".into());
        }
        Ok(())
    }

    /// The domain, lower-case, without a trailing dot.
    pub fn normalized_domain(&self) -> String {
        self.domain.trim_end_matches('.').to_ascii_lowercase()
    }

    /// The base URL of a session.
    pub fn session_url(&self, name: &str) -> String {
        format!("{}/", self.session_origin(name))
    }

    /// A session's web origin as browsers write it in `Origin`: `https://<name>.<domain>`,
    /// plus `:<port>` when the public port is not 443.
    pub fn session_origin(&self, name: &str) -> String {
        let port = self.url_port.unwrap_or(self.listen_https.port());
        let domain = self.normalized_domain();
        if port == 443 {
            format!("https://{name}.{domain}")
        } else {
            format!("https://{name}.{domain}:{port}")
        }
    }

    /// QUIC idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// Where the resume-ticket key lives.
    pub fn resume_key_path(&self) -> PathBuf {
        self.resume_key
            .clone()
            .unwrap_or_else(|| self.tokens.with_file_name("jobgate-resume.key"))
    }

    /// The state file's path.
    pub fn state_file_path(&self) -> PathBuf {
        self.state_file
            .clone()
            .unwrap_or_else(|| self.tokens.with_file_name("jobgate-state.json"))
    }

    /// QUIC keep-alive interval.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_secs)
    }
}
