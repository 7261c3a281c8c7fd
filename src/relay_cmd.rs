//! `jobgate relay`: its flags, merged over `relay.toml` into one typed `RelayConfig`, and
//! the run loop (SIGHUP reloads, SIGTERM drains).

use anyhow::{bail, Context};
use clap::Args;
use jobgate_relay::{Relay, RelayConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A status line of the relay for its operator: plain on stderr, or a JSON event.
pub(crate) fn relay_says(message: std::fmt::Arguments<'_>) {
    if crate::logging::json_logs() {
        tracing::info!(target: "jobgate::relay", "{message}");
    } else {
        eprintln!("jobgate relay: {message}");
    }
}

/// `jobgate relay`'s flags. Each one is a `relay.toml` key (serde names it): the flags given
/// are serialized over the file's table, so a setting needs its field here and in
/// `RelayConfig`, nothing else (a test checks that every flag is a key).
#[derive(Debug, Args, serde::Serialize)]
pub(crate) struct RelayArgs {
    /// TOML file with any of the settings below (flags win).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Domain whose subdomains are sessions (<name>.<domain>).
    #[arg(long)]
    domain: Option<String>,
    /// PEM certificate chain for *.<domain>.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Tokens file (see `jobgate token issue`).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// HTTPS front door address [default: 0.0.0.0:8443].
    #[arg(long)]
    listen_https: Option<SocketAddr>,
    /// QUIC address for agents [default: 0.0.0.0:7443].
    #[arg(long)]
    listen_quic: Option<SocketAddr>,
    /// Plain-HTTP front door, for use behind a TLS-terminating load balancer [default: off].
    #[arg(long)]
    listen_http: Option<SocketAddr>,
    /// Plain-HTTP listener for /metrics (Prometheus) and /healthz, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long)]
    listen_metrics: Option<SocketAddr>,
    /// Port written into session URLs [default: the HTTPS port; omitted when 443].
    #[arg(long)]
    url_port: Option<u16>,
    /// Seconds of silence before an agent counts as gone [default: 30].
    #[arg(long)]
    #[serde(rename = "idle_timeout_secs")]
    idle_timeout: Option<u64>,
    /// Live sessions per user [default: 16].
    #[arg(long)]
    max_sessions_per_user: Option<usize>,
    /// Seconds a vanished agent's name is held (503) for it to reconnect [default: 60].
    #[arg(long)]
    #[serde(rename = "resume_grace_secs")]
    resume_grace: Option<u64>,
    /// File holding the resume-ticket key [default: jobgate-resume.key beside the tokens file].
    #[arg(long)]
    resume_key: Option<PathBuf>,
    /// File keeping held and recently ended names across restarts [default: jobgate-state.json beside the tokens file].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Seconds in-flight requests get when the relay drains on SIGTERM [default: 10].
    #[arg(long)]
    #[serde(rename = "drain_grace_secs")]
    drain_grace: Option<u64>,
    /// Seconds a client has to send a complete request head (slowloris guard) [default: 30].
    #[arg(long)]
    #[serde(rename = "header_read_timeout_secs")]
    header_read_timeout: Option<u64>,
    /// Append JSON-lines audit records to this file [default: none].
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Requests in flight per session before the relay answers 503 [default: 16384].
    #[arg(long)]
    max_streams_per_agent: Option<u32>,
    /// Admin API on the metrics listener, with the bearer token in this file (made, 0600,
    /// if missing) [default: off].
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Live agents in total [default: 20000].
    #[arg(long)]
    max_agents: Option<usize>,
    /// New sessions (fresh names) a user may open per minute once their burst is spent;
    /// resumes do not count; 0 = no limit [default: 60].
    #[arg(long)]
    max_new_sessions_per_user_per_minute: Option<u32>,
    /// New sessions a user may open at once before the per-minute rate applies [default: 120].
    #[arg(long)]
    new_sessions_burst_per_user: Option<u32>,
    /// Let agents ask for public sessions (no access key) [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    allow_public: bool,
    /// Seconds a client connection may sit with no request in flight before it is closed [default: 60].
    #[arg(long)]
    #[serde(rename = "client_idle_timeout_secs")]
    client_idle_timeout: Option<u64>,
    /// Client connections open at once, in total (lowered to fit the open-files limit) [default: 20000].
    #[arg(long)]
    max_client_connections: Option<usize>,
    /// Client connections open at once from one IP address [default: 2048].
    #[arg(long)]
    max_client_connections_per_ip: Option<usize>,
    /// Agent connections waiting for their handshake and Hello; more are refused [default: 1024].
    #[arg(long)]
    max_pending_handshakes: Option<usize>,
    /// MiB of memory agents may make the relay buffer in total (32 MiB per session while it lasts, then 1 MiB) [default: 1024].
    #[arg(long)]
    max_buffered_mib: Option<u64>,
    /// Seconds an app has to send its response head before the client gets 504 (0: no limit) [default: 300].
    #[arg(long)]
    #[serde(rename = "response_head_timeout_secs")]
    response_head_timeout: Option<u64>,
    /// etcd endpoints shared by a cluster of relays, http://host:port[,http://host:port] [default: off: this relay works alone].
    #[arg(long)]
    cluster_etcd: Option<String>,
    /// This relay's unique name in the cluster (with --cluster-etcd).
    #[arg(long)]
    node_id: Option<String>,
    /// UDP address of the QUIC link between relays (with --cluster-etcd).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// HOST:PORT other relays reach this relay's peer link at (with --cluster-etcd).
    #[arg(long)]
    peer_advertise: Option<String>,
    /// CA (PEM) that signs every relay's peer certificate (with --cluster-etcd).
    #[arg(long)]
    peer_ca: Option<PathBuf>,
    /// This relay's peer certificate chain (PEM), signed by --peer-ca.
    #[arg(long)]
    peer_cert: Option<PathBuf>,
    /// This relay's peer private key (PEM).
    #[arg(long)]
    peer_key: Option<PathBuf>,
}

/// Merges `relay.toml` and flags (flags win) into a [`RelayConfig`], deserialized once.
fn relay_config(args: RelayArgs) -> anyhow::Result<RelayConfig> {
    // The file gets the same strict reading as the agent's: no group/other-writable file,
    // every key a setting (a typo names the nearest one), types checked with its name.
    let mut table = match &args.config {
        Some(path) => {
            let table = crate::config::read_table(path)?;
            crate::config::check_keys::<RelayConfig>(path, &table, &[])?;
            table
        }
        None => toml::Table::new(),
    };
    // Flags win: the ones given (serde skips the rest) replace the file's keys.
    let flags = toml::Table::try_from(&args).context("relay flags")?;
    table.extend(flags);
    for required in ["domain", "cert", "key", "tokens"] {
        if !table.contains_key(required) {
            bail!("--{required} is required (as a flag or in --config)");
        }
    }
    let config: RelayConfig = match &args.config {
        Some(path) => crate::config::typed(path, table)?,
        None => table.try_into().context("invalid relay configuration")?,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    Ok(config)
}

pub(crate) async fn run_relay(args: RelayArgs) -> anyhow::Result<()> {
    let config = relay_config(args)?;
    if config.cluster_etcd.is_some() {
        // The etcd client and the settings are in; admission, forwarding between relays
        // and moves are not yet. Refusing beats a relay that looks clustered and is not.
        bail!("--cluster-etcd: clustering is not complete in this build (settings only); start the relay without it");
    }
    let relay = Relay::start(config).await?;
    // Handlers first, then the ready line: whoever stops the relay once it said it is
    // ready (systemd, a test) gets a drain, not the default action of SIGTERM.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    relay_says(format_args!(
        "HTTPS on {}, agents (QUIC/UDP) on {}",
        relay.https_addr, relay.quic_addr
    ));
    if let Some(addr) = relay.metrics_addr {
        relay_says(format_args!(
            "metrics on http://{addr}/metrics, health on http://{addr}/healthz"
        ));
    }
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                relay_says(format_args!("SIGHUP: reloading the certificate and tokens"));
                relay.reload();
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    relay_says(format_args!(
        "draining (agents will reconnect; a second signal stops at once)"
    ));
    tokio::select! {
        _ = relay.drain() => {}
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    relay_says(format_args!("stopped"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    /// Every `jobgate relay` flag, with a value.
    fn every_relay_flag() -> Vec<String> {
        let command = <Cli as clap::CommandFactory>::command();
        let relay = command
            .find_subcommand("relay")
            .expect("relay subcommand")
            .clone();
        let mut argv = vec!["jobgate".to_owned(), "relay".to_owned()];
        for arg in relay.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "config" {
                continue;
            }
            argv.push(format!("--{long}"));
            if arg.get_action().takes_values() {
                let value = match long {
                    l if l.starts_with("listen") || l == "peer-listen" => "127.0.0.1:1",
                    "domain" => "example.org",
                    l if l.ends_with("file")
                        || l.ends_with("log")
                        || ["cert", "key", "tokens"].contains(&l)
                        || l.starts_with("resume-key") =>
                    {
                        "/tmp/x"
                    }
                    _ => "7",
                };
                argv.push(value.to_owned());
            }
        }
        argv
    }

    fn relay_args(argv: &[String]) -> RelayArgs {
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Relay(args) => args,
            _ => panic!("not relay"),
        }
    }

    #[test]
    fn every_relay_flag_is_a_relay_toml_key() {
        let argv = every_relay_flag();
        let table = toml::Table::try_from(relay_args(&argv)).expect("serialize");
        let keys = crate::config::field_names::<RelayConfig>();
        assert!(table.len() > 25, "{table:?}");
        for key in table.keys() {
            assert!(
                keys.contains(&key.as_str()),
                "--{key} has no relay.toml key"
            );
        }
    }

    #[test]
    fn flags_win_over_the_relay_toml() {
        let dir = std::env::temp_dir().join(format!("jobgate-relayargs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            "domain = \"file.example\"\ncert = \"/c\"\nkey = \"/k\"\ntokens = \"/t\"\nidle_timeout_secs = 40\nallow_public = true\nmax_agents = 5\n",
        )
        .expect("write");
        let argv: Vec<String> = [
            "jobgate",
            "relay",
            "--config",
            file.to_str().expect("utf8"),
            "--idle-timeout",
            "50",
            "--domain",
            "flag.example",
        ]
        .map(str::to_owned)
        .to_vec();
        let config = relay_config(relay_args(&argv)).expect("config");
        assert_eq!(config.domain, "flag.example");
        assert_eq!(config.idle_timeout_secs, 50);
        assert_eq!(config.max_agents, 5, "a key no flag gave stays");
        assert!(
            config.allow_public,
            "an absent boolean flag must not turn the file's off"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
