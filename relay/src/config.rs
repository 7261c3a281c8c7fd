//! Relay configuration: every field can come from `relay.toml` or a command-line flag.

use serde::{Deserialize, Serialize};
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

/// Everything the relay needs to run: one definition for the `jobgate relay` flags (clap)
/// and the `relay.toml` keys (serde). A field's name is its key; its flag is the same name
/// with `-` (`--idle-timeout` drops the `_secs`); its default is written once, in the
/// `#[arg]` attribute, and serde takes defaults from [`RelayConfig::default`], which asks
/// clap. Fields marked `skip` are file-only tuning keys with no flag.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Domain whose subdomains are sessions: <name>.<domain> (required).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub domain: String,
    /// PEM certificate chain for *.<domain> (required).
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub cert: PathBuf,
    /// PEM private key of that certificate (required).
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub key: PathBuf,
    /// Tokens file: user names and token hashes, see `jobgate token issue` (required).
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub tokens: PathBuf,
    /// HTTPS front door address.
    #[arg(long, default_value_t = default_https())]
    pub listen_https: SocketAddr,
    /// QUIC address for agents.
    #[arg(long, default_value_t = default_quic())]
    pub listen_quic: SocketAddr,
    /// Plain-HTTP front door, for use behind a TLS-terminating load balancer [default: off].
    #[arg(long)]
    pub listen_http: Option<SocketAddr>,
    /// Plain-HTTP listener for /metrics (Prometheus) and /healthz, e.g. 127.0.0.1:9464:
    /// keep it on loopback or an admin network [default: off].
    #[arg(long)]
    pub listen_metrics: Option<SocketAddr>,
    /// Cores to serve on: one single-threaded runtime per core, each with its own HTTPS
    /// listener (SO_REUSEPORT) and its share of the agents' connections. 1: everything
    /// on one runtime (measured faster on hosts with 2 cores); 0: one per core this
    /// process may use.
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// Port written into session URLs [default: the HTTPS port; omitted when 443].
    #[arg(long)]
    pub url_port: Option<u16>,
    /// Seconds of silence before an agent counts as gone.
    #[arg(long = "idle-timeout", value_name = "SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// Seconds between QUIC keep-alives.
    #[arg(skip = DEFAULT_KEEP_ALIVE_SECS)]
    pub keep_alive_secs: u64,
    /// Seconds an agent has to connect and say `Hello`.
    #[arg(skip = DEFAULT_HANDSHAKE_TIMEOUT_SECS)]
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send a complete request head (slowloris guard).
    #[arg(long = "header-read-timeout", value_name = "SECS", default_value_t = DEFAULT_HEADER_READ_TIMEOUT_SECS)]
    pub header_read_timeout_secs: u64,
    /// Largest request head in bytes.
    #[arg(skip = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Live sessions per user (a token entry may set its own).
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS_PER_USER)]
    pub max_sessions_per_user: usize,
    /// Live agents in total.
    #[arg(long, default_value_t = DEFAULT_MAX_AGENTS)]
    pub max_agents: usize,
    /// Requests in flight per session before the relay answers 503.
    #[arg(long, default_value_t = DEFAULT_MAX_STREAMS_PER_AGENT)]
    pub max_streams_per_agent: u32,
    /// New sessions (fresh names) a user may open per minute once their burst is spent;
    /// resumes do not count; 0 = no limit.
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_SESSIONS_PER_USER_PER_MINUTE)]
    pub max_new_sessions_per_user_per_minute: u32,
    /// New sessions a user may open at once before the per-minute rate applies.
    #[arg(long, default_value_t = DEFAULT_NEW_SESSIONS_BURST_PER_USER)]
    pub new_sessions_burst_per_user: u32,
    /// Let agents ask for public sessions: no access key, the app's own login is the only
    /// lock [default: off].
    #[arg(long)]
    pub allow_public: bool,
    /// Append JSON-lines audit records (sessions opened/closed, agents refused) to this
    /// file [default: none].
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Seconds a vanished agent's name is held (503) for it to reconnect.
    #[arg(long = "resume-grace", value_name = "SECS", default_value_t = DEFAULT_RESUME_GRACE_SECS)]
    pub resume_grace_secs: u64,
    /// Seconds a resume ticket is valid; live agents get a fresh one every third of it.
    #[arg(skip = DEFAULT_TICKET_LIFETIME_SECS)]
    pub ticket_lifetime_secs: u64,
    /// File holding the resume-ticket key [default: jobgate-resume.key beside the tokens file].
    #[arg(long)]
    pub resume_key: Option<PathBuf>,
    /// File keeping held and recently ended names across restarts [default:
    /// jobgate-state.json beside the tokens file].
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Seconds in-flight requests get when the relay drains on SIGTERM.
    #[arg(long = "drain-grace", value_name = "SECS", default_value_t = DEFAULT_DRAIN_GRACE_SECS)]
    pub drain_grace_secs: u64,
    /// Admin API on the metrics listener, with the bearer token in this file (made, 0600,
    /// if missing) [default: off].
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Seconds a client connection may sit with no request in flight before it is closed.
    #[arg(long = "client-idle-timeout", value_name = "SECS", default_value_t = DEFAULT_CLIENT_IDLE_TIMEOUT_SECS)]
    pub client_idle_timeout_secs: u64,
    /// Client connections open at once, in total (lowered to fit the open-files limit).
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENT_CONNECTIONS)]
    pub max_client_connections: usize,
    /// Client connections open at once from one IP address.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENT_CONNECTIONS_PER_IP)]
    pub max_client_connections_per_ip: usize,
    /// Agent connections waiting for their handshake and Hello; more are refused (and from
    /// half of it on, unvalidated addresses must first answer a QUIC Retry).
    #[arg(long, default_value_t = DEFAULT_MAX_PENDING_HANDSHAKES)]
    pub max_pending_handshakes: usize,
    /// MiB of memory agents may make the relay buffer in total (32 MiB per session while
    /// it lasts, then 1 MiB).
    #[arg(long, default_value_t = DEFAULT_MAX_BUFFERED_MIB)]
    pub max_buffered_mib: u64,
    /// Seconds an app has to send its response head before the client gets 504 (0: no limit).
    #[arg(long = "response-head-timeout", value_name = "SECS", default_value_t = DEFAULT_RESPONSE_HEAD_TIMEOUT_SECS)]
    pub response_head_timeout_secs: u64,
    /// Command that prints where a batch job is, as `scontrol show job -o` does; `{job}`
    /// is replaced by the job id (e.g. `scontrol show job -o {job}`, or through `ssh` to a
    /// login node). A reserved URL's page shows its job's state from it; unset: the page
    /// says the relay cannot see the queue.
    #[arg(long, value_name = "CMD")]
    pub slurm_status: Option<String>,
    /// Seconds a reserved URL keeps saying that its job failed or was cancelled before the
    /// name ends (404).
    #[arg(long = "queued-end-grace", value_name = "SECS", default_value_t = crate::queued::END_GRACE.as_secs())]
    pub queued_end_grace_secs: u64,
    /// Issuer URL of the site's OpenID Connect single sign-on (Keycloak, CILogon, ...).
    /// Set: `owner` sessions and `https://login.<domain>`; unset: no sign-on.
    #[arg(long, value_name = "URL")]
    pub oidc_issuer: Option<String>,
    /// The relay's client id at the issuer (its one redirect URI is
    /// `https://login.<domain>/callback`).
    #[arg(long, value_name = "ID")]
    pub oidc_client_id: Option<String>,
    /// File holding the client secret (the relay is a confidential client).
    #[arg(long, value_name = "FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// ID-token claim that holds the user name (compared with the tokens' user names).
    #[arg(long, value_name = "CLAIM", default_value = DEFAULT_OIDC_USERNAME_CLAIM)]
    pub oidc_username_claim: String,
    /// ID-token claim that holds the user's groups (for `--share-group`).
    #[arg(long, value_name = "CLAIM", default_value = DEFAULT_OIDC_GROUPS_CLAIM)]
    pub oidc_groups_claim: String,
    /// PEM CA certificate(s) trusted for the issuer besides the system roots.
    #[arg(long, value_name = "CA.pem")]
    pub oidc_ca: Option<PathBuf>,
    /// Access modes agents may ask for (`owner`, `link`, `public`). Unset: `link`,
    /// `owner` with sign-on, `public` with `allow_public`.
    #[arg(long, value_name = "MODE,...", value_delimiter = ',', value_parser = parse_access_mode)]
    pub allowed_access: Option<Vec<jobgate_protocol::AccessMode>>,
    /// How long a token minted by `jobgate login` works: seconds, or a number with `s`,
    /// `m`, `h` or `d`.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_LOGIN_TOKEN_TTL)]
    pub login_token_ttl: String,
    /// etcd endpoints (`http://host:port[,http://host:port…]`) shared by the relays of a
    /// cluster; unset: this relay works alone.
    #[arg(long, value_name = "URL,...")]
    pub cluster_etcd: Option<String>,
    /// This relay's name in the cluster (unique among its relays; the owner of its sessions).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// UDP address of the QUIC link other relays forward requests over.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,
    /// `host:port` other relays reach this relay's peer link at.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_advertise: Option<String>,
    /// CA certificate (PEM) that signs every relay's peer certificate.
    #[arg(long, value_name = "CA.pem")]
    pub peer_ca: Option<PathBuf>,
    /// This relay's peer certificate chain (PEM), signed by `peer_ca`.
    #[arg(long, value_name = "CERT.pem")]
    pub peer_cert: Option<PathBuf>,
    /// This relay's peer private key (PEM).
    #[arg(long, value_name = "KEY.pem")]
    pub peer_key: Option<PathBuf>,
}

/// Default lifetime of a `jobgate login` token: a month of jobs, then a new login.
pub const DEFAULT_LOGIN_TOKEN_TTL: &str = "30d";

/// An access mode as written on the wire and in `relay.toml`.
fn parse_access_mode(text: &str) -> Result<jobgate_protocol::AccessMode, String> {
    use jobgate_protocol::AccessMode;
    match text {
        "owner" => Ok(AccessMode::Owner),
        "link" => Ok(AccessMode::Link),
        "public" => Ok(AccessMode::Public),
        _ => Err(format!("{text:?}: expected owner, link or public")),
    }
}

/// Seconds in `text`: `3600`, `90s`, `45m`, `12h` or `30d`.
pub fn parse_duration_secs(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(scale)
}

/// Default ID-token claim for the user name: what Keycloak and most IdPs fill in.
pub const DEFAULT_OIDC_USERNAME_CLAIM: &str = "preferred_username";
/// Default ID-token claim for the user's groups.
pub const DEFAULT_OIDC_GROUPS_CLAIM: &str = "groups";

/// The settings that have no default: `jobgate relay` needs each as a flag or a key.
pub const REQUIRED_SETTINGS: [&str; 4] = ["domain", "cert", "key", "tokens"];

/// Paths as given, the empty "unset" default included (clap's own path parser refuses
/// an empty value, and [`REQUIRED_SETTINGS`] says what is missing more clearly).
fn any_path(value: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(value))
}

impl Default for RelayConfig {
    /// Every setting at the default its `#[arg]` gives; the required ones empty.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let command = Self::augment_args(clap::Command::new("relay").no_binary_name(true));
        // Parsing no arguments only reads the defaults written above; a default that does
        // not parse is a programming error that the unit tests catch.
        command
            .try_get_matches_from(std::iter::empty::<&str>())
            .and_then(|matches| Self::from_arg_matches(&matches))
            .unwrap_or_else(|e| panic!("the relay's own defaults do not parse: {e}"))
    }
}

/// The cores a relay serves on for the setting `cores`: 0 means one per core this process
/// may run on (its CPU affinity and cgroup quota).
pub fn serving_cores(cores: usize) -> usize {
    match cores {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(crate::cores::MAX_CORES)
}

fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_HTTPS_PORT))
}
fn default_quic() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_QUIC_PORT))
}

impl RelayConfig {
    /// The cores to serve on ([`serving_cores`] of `cores`).
    pub fn serving_cores(&self) -> usize {
        serving_cores(self.cores)
    }

    /// A configuration with every optional field at its default.
    pub fn new(domain: impl Into<String>, cert: PathBuf, key: PathBuf, tokens: PathBuf) -> Self {
        Self {
            domain: domain.into(),
            cert,
            key,
            tokens,
            ..Self::default()
        }
    }

    /// Checks what serde cannot: a usable domain and sane timeouts.
    pub fn validate(&self) -> Result<(), String> {
        for (name, path) in [
            ("cert", &self.cert),
            ("key", &self.key),
            ("tokens", &self.tokens),
        ] {
            if path.as_os_str().is_empty() {
                return Err(format!("{name} is required"));
            }
        }
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
        if self.cores > crate::cores::MAX_CORES {
            return Err(format!(
                "cores must be at most {} (0: one per core)",
                crate::cores::MAX_CORES
            ));
        }
        if self.max_header_bytes < 8 * 1024 {
            return Err("max_header_bytes must be at least 8192".into());
        }
        self.validate_sign_on()?;
        self.validate_cluster()
    }

    /// Sign-on needs all three of issuer, client id and secret, or none of them.
    fn validate_sign_on(&self) -> Result<(), String> {
        let given = [
            self.oidc_issuer.is_some(),
            self.oidc_client_id.is_some(),
            self.oidc_client_secret_file.is_some(),
        ];
        if given.iter().any(|g| *g) && !given.iter().all(|g| *g) {
            return Err(
                "single sign-on needs oidc_issuer, oidc_client_id and oidc_client_secret_file together"
                    .into(),
            );
        }
        if !matches!(self.login_token_ttl_secs(), Some(1..)) {
            return Err(format!(
                "login_token_ttl {:?}: expected a duration like 30d, 12h, 90m or 3600",
                self.login_token_ttl
            ));
        }
        let owner = jobgate_protocol::AccessMode::Owner;
        if let Some(allowed) = &self.allowed_access {
            if allowed.is_empty() {
                return Err("allowed_access must name at least one mode".into());
            }
            if allowed.contains(&owner) && self.oidc_issuer.is_none() {
                return Err(
                    "allowed_access names owner, which needs single sign-on (oidc_issuer)".into(),
                );
            }
        }
        Ok(())
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
        if self.oidc_issuer.is_some() {
            // Logins, passes and one-time tickets live in each relay's memory: a sign-in on
            // one relay would not open a session held by another. Refused rather than half
            // working; see docs/admin-guide.md.
            return Err("cluster_etcd and oidc_issuer together are not supported yet: single sign-on state is per relay (use link sessions with several relays)".into());
        }
        Ok(())
    }

    /// The lifetime of `jobgate login` tokens, in seconds (`None`: not a duration).
    pub fn login_token_ttl_secs(&self) -> Option<u64> {
        parse_duration_secs(&self.login_token_ttl)
    }

    /// Whether agents may ask for `mode`.
    pub fn access_allowed(&self, mode: jobgate_protocol::AccessMode) -> bool {
        use jobgate_protocol::AccessMode;
        if mode == AccessMode::Owner && self.oidc_issuer.is_none() {
            return false;
        }
        match &self.allowed_access {
            Some(allowed) => allowed.contains(&mode),
            None => mode != AccessMode::Public || self.allow_public,
        }
    }

    /// The mode of an agent that names none: `owner` where sign-on allows it, else `link`.
    pub fn default_access(&self) -> jobgate_protocol::AccessMode {
        use jobgate_protocol::AccessMode;
        [AccessMode::Owner, AccessMode::Link, AccessMode::Public]
            .into_iter()
            .find(|mode| self.access_allowed(*mode))
            .unwrap_or(AccessMode::Link)
    }

    /// The sign-on host, `login.<domain>`: never a session name (names are longer).
    pub fn login_host(&self) -> String {
        format!("login.{}", self.normalized_domain())
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

#[cfg(test)]
mod tests {
    use super::*;
    use jobgate_protocol::AccessMode;

    fn config() -> RelayConfig {
        RelayConfig::new("jobgate.test", "c".into(), "k".into(), "t".into())
    }

    fn with_sign_on() -> RelayConfig {
        let mut c = config();
        c.oidc_issuer = Some("https://idp.example.org".into());
        c.oidc_client_id = Some("jobgate".into());
        c.oidc_client_secret_file = Some("/etc/jobgate/oidc-secret".into());
        c
    }

    #[test]
    fn access_modes_follow_sign_on_and_the_allowed_list() {
        let plain = config();
        assert_eq!(plain.default_access(), AccessMode::Link);
        assert!(!plain.access_allowed(AccessMode::Owner));
        assert!(!plain.access_allowed(AccessMode::Public));
        let signed = with_sign_on();
        assert_eq!(signed.default_access(), AccessMode::Owner);
        assert!(signed.access_allowed(AccessMode::Link));
        let mut only_link = with_sign_on();
        only_link.allowed_access = Some(vec![AccessMode::Link]);
        assert_eq!(only_link.default_access(), AccessMode::Link);
        assert!(!only_link.access_allowed(AccessMode::Owner));
        assert!(signed.validate().is_ok());
    }

    #[test]
    fn inconsistent_sign_on_settings_are_refused() {
        let mut half = config();
        half.oidc_issuer = Some("https://idp.example.org".into());
        assert!(half.validate().is_err());
        let mut owner_without = config();
        owner_without.allowed_access = Some(vec![AccessMode::Owner]);
        assert!(owner_without.validate().is_err());
        let mut none = with_sign_on();
        none.allowed_access = Some(vec![]);
        assert!(none.validate().is_err());
        let mut ttl = with_sign_on();
        ttl.login_token_ttl = "soon".into();
        assert!(ttl.validate().is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_secs("3600"), Some(3600));
        assert_eq!(parse_duration_secs("90m"), Some(5400));
        assert_eq!(parse_duration_secs("12h"), Some(43_200));
        assert_eq!(parse_duration_secs("30d"), Some(2_592_000));
        assert_eq!(parse_duration_secs("30x"), None);
        assert_eq!(parse_duration_secs("d"), None);
    }
}
