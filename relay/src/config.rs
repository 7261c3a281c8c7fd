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
/// Default new sessions (fresh names) a user may open per minute once their burst is
/// spent: one a second sustained, far above any real workflow (a job array's agents
/// start within seconds and stay up for hours), far below the ~345 a second that grew
/// the state file past its restore cap. Resumes do not count. 0 turns the limit off.
pub const DEFAULT_MAX_NEW_SESSIONS_PER_USER_PER_MINUTE: u32 = 60;
/// Default new sessions a user may open at once before the per-minute rate applies:
/// a 100-task job array whose agents all start within seconds fits, with room for a
/// few interactive sessions beside it.
pub const DEFAULT_NEW_SESSIONS_BURST_PER_USER: u32 = 120;
/// Default time a client connection may sit with no request in flight before it is
/// closed (HTTP/2: GOAWAY). Long enough that a browser moving between tabs keeps its
/// connection (no new TLS handshake per click), short enough that idle connections do
/// not pile up file descriptors. An idle HTTP/1.1 keep-alive connection is closed after
/// the shorter of this and `header_read_timeout_secs` (hyper's header timer also runs
/// between keep-alive requests).
pub const DEFAULT_CLIENT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default client connections open at once, in total. Each costs one file descriptor and
/// some kernel and TLS buffers (tens of KiB): 20,000 fit a small DMZ host and match
/// `max_agents`. The relay lowers it further if its open-files limit is too low.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 20_000;
/// Default client connections open at once from one IP address. A whole campus may reach
/// the relay from one NAT address: 2,048 is ~500 busy browsers at 4 connections each
/// (HTTP/2 coalescing usually makes it 1–2), and leaves room for the benchmarks (256
/// connections from 127.0.0.1), while one address can take at most a tenth of the total.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS_PER_IP: usize = 2_048;
/// Default QUIC connections between their first packet and an admitted `Hello`. Each
/// costs connection state plus a pre-`Hello` receive window (64 KiB): 1,024 of them
/// cost ~64 MiB at most, and far more than agents reconnecting at once after a relay
/// restart need (they also get Retry'd, not refused, below the cap).
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1_024;
/// Default relay-wide budget for data agents may make the relay buffer (QUIC receive
/// windows of admitted sessions), in MiB. Each session takes its full 32 MiB window out
/// of it while there is room (32 sessions at full WAN speed by default), later ones get a
/// 1 MiB window (they work, bulk transfers are slower over long paths).
pub const DEFAULT_MAX_BUFFERED_MIB: u64 = 1_024;
/// Default time an app has to send its response head. Jupyter's own slow endpoints
/// (kernels, terminals, events) are WebSockets and its REST calls answer in
/// milliseconds, but an app may compute a large download (an export, a zip of a
/// directory) before it sends the head: 5 minutes is 3× the usual proxy limit (100 s,
/// which users of other tunnels complained about) and still frees a request an agent
/// never answers. 0 turns it off.
pub const DEFAULT_RESPONSE_HEAD_TIMEOUT_SECS: u64 = 300;

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
    /// New sessions (fresh names) a user may open per minute after their burst; resumes
    /// do not count; 0 = no limit.
    #[serde(default = "default_new_sessions_per_minute")]
    pub max_new_sessions_per_user_per_minute: u32,
    /// New sessions a user may open at once before the per-minute rate applies.
    #[serde(default = "default_new_sessions_burst")]
    pub new_sessions_burst_per_user: u32,
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
    /// File holding the admin API's bearer token (made with a fresh token, 0600, if
    /// missing). Unset: the admin API is off. Needs `listen_metrics` (the admin listener).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Seconds a client connection may sit with no request in flight before it is closed.
    #[serde(default = "default_client_idle")]
    pub client_idle_timeout_secs: u64,
    /// Client connections open at once, in total (more are closed before TLS).
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// Client connections open at once from one IP address.
    #[serde(default = "default_max_client_connections_per_ip")]
    pub max_client_connections_per_ip: usize,
    /// QUIC connections waiting for their handshake and `Hello`; more are refused (and
    /// from half of it on, unvalidated addresses must first answer a QUIC Retry).
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// MiB of relay memory that agents' sessions may fill with buffered data in total.
    #[serde(default = "default_max_buffered_mib")]
    pub max_buffered_mib: u64,
    /// Seconds an app has to send its response head before the client gets `504` (0: no limit).
    #[serde(default = "default_response_head_timeout")]
    pub response_head_timeout_secs: u64,
    /// etcd endpoints (`http://host:port[,http://host:port…]`) shared by the relays of a
    /// cluster; unset: this relay works alone.
    #[serde(default)]
    pub cluster_etcd: Option<String>,
    /// This relay's name in the cluster (unique among its relays; the owner of its sessions).
    #[serde(default)]
    pub node_id: Option<String>,
    /// UDP address of the QUIC link other relays forward requests over.
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,
    /// `host:port` other relays reach this relay's peer link at.
    #[serde(default)]
    pub peer_advertise: Option<String>,
    /// CA certificate (PEM) that signs every relay's peer certificate.
    #[serde(default)]
    pub peer_ca: Option<PathBuf>,
    /// This relay's peer certificate chain (PEM), signed by `peer_ca`.
    #[serde(default)]
    pub peer_cert: Option<PathBuf>,
    /// This relay's peer private key (PEM).
    #[serde(default)]
    pub peer_key: Option<PathBuf>,
}

fn default_client_idle() -> u64 {
    DEFAULT_CLIENT_IDLE_TIMEOUT_SECS
}
fn default_max_client_connections() -> usize {
    DEFAULT_MAX_CLIENT_CONNECTIONS
}
fn default_max_client_connections_per_ip() -> usize {
    DEFAULT_MAX_CLIENT_CONNECTIONS_PER_IP
}
fn default_max_pending_handshakes() -> usize {
    DEFAULT_MAX_PENDING_HANDSHAKES
}
fn default_max_buffered_mib() -> u64 {
    DEFAULT_MAX_BUFFERED_MIB
}
fn default_response_head_timeout() -> u64 {
    DEFAULT_RESPONSE_HEAD_TIMEOUT_SECS
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
fn default_new_sessions_per_minute() -> u32 {
    DEFAULT_MAX_NEW_SESSIONS_PER_USER_PER_MINUTE
}
fn default_new_sessions_burst() -> u32 {
    DEFAULT_NEW_SESSIONS_BURST_PER_USER
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
            max_new_sessions_per_user_per_minute: DEFAULT_MAX_NEW_SESSIONS_PER_USER_PER_MINUTE,
            new_sessions_burst_per_user: DEFAULT_NEW_SESSIONS_BURST_PER_USER,
            allow_public: false,
            audit_log: None,
            resume_grace_secs: DEFAULT_RESUME_GRACE_SECS,
            ticket_lifetime_secs: DEFAULT_TICKET_LIFETIME_SECS,
            resume_key: None,
            state_file: None,
            drain_grace_secs: DEFAULT_DRAIN_GRACE_SECS,
            admin_token_file: None,
            client_idle_timeout_secs: DEFAULT_CLIENT_IDLE_TIMEOUT_SECS,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
            max_client_connections_per_ip: DEFAULT_MAX_CLIENT_CONNECTIONS_PER_IP,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_buffered_mib: DEFAULT_MAX_BUFFERED_MIB,
            response_head_timeout_secs: DEFAULT_RESPONSE_HEAD_TIMEOUT_SECS,
            cluster_etcd: None,
            node_id: None,
            peer_listen: None,
            peer_advertise: None,
            peer_ca: None,
            peer_cert: None,
            peer_key: None,
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
        if self.max_new_sessions_per_user_per_minute > 0 && self.new_sessions_burst_per_user == 0 {
            return Err("new_sessions_burst_per_user must be at least 1".into());
        }
        if self.client_idle_timeout_secs == 0 {
            return Err("client_idle_timeout_secs must be at least 1".into());
        }
        if self.max_client_connections == 0
            || self.max_client_connections_per_ip == 0
            || self.max_pending_handshakes == 0
        {
            return Err("max_client_connections, max_client_connections_per_ip and max_pending_handshakes must be at least 1".into());
        }
        if self.max_header_bytes < 8 * 1024 {
            return Err("max_header_bytes must be at least 8192".into());
        }
        self.validate_cluster()
    }

    /// A cluster needs a node id, a peer link and its three PEM files; a lone relay none.
    fn validate_cluster(&self) -> Result<(), String> {
        let peer_files = [&self.peer_ca, &self.peer_cert, &self.peer_key];
        let Some(etcd) = &self.cluster_etcd else {
            let stray = self.node_id.is_some()
                || self.peer_listen.is_some()
                || self.peer_advertise.is_some()
                || peer_files.iter().any(|f| f.is_some());
            return match stray {
                true => Err("node_id and the peer_* settings need cluster_etcd".into()),
                false => Ok(()),
            };
        };
        crate::cluster::etcd::EtcdClient::new(etcd).map_err(|e| e.to_string())?;
        match &self.node_id {
            Some(id) if crate::cluster::valid_node_id(id) => {}
            _ => return Err("cluster_etcd needs node_id: 1-63 letters, digits, '-' or '_'".into()),
        }
        if self.peer_listen.is_none() || self.peer_advertise.is_none() {
            return Err("cluster_etcd needs peer_listen and peer_advertise".into());
        }
        if peer_files.iter().any(|f| f.is_none()) {
            return Err("cluster_etcd needs peer_ca, peer_cert and peer_key (relays authenticate each other)".into());
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

    /// How long an app may take to send its response head (`None`: no limit).
    pub fn response_head_timeout(&self) -> Option<Duration> {
        (self.response_head_timeout_secs > 0)
            .then(|| Duration::from_secs(self.response_head_timeout_secs))
    }

    /// QUIC keep-alive interval.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_secs)
    }
}
