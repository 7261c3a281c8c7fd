//! `jobgate relay`: its flags, merged over `relay.toml` into one typed `RelayConfig`, and
//! the run loop (SIGHUP reloads, SIGTERM drains).

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use jobgate_relay::{Relay, RelayConfig, REQUIRED_SETTINGS};
use std::path::PathBuf;

/// A status line of the relay for its operator: plain on stderr, or a JSON event.
pub(crate) fn relay_says(message: std::fmt::Arguments<'_>) {
    if crate::logging::json_logs() {
        tracing::info!(target: "jobgate::relay", "{message}");
    } else {
        eprintln!("jobgate relay: {message}");
    }
}

/// `jobgate relay`'s flags: `--config` plus every setting of [`RelayConfig`], which is
/// also the `relay.toml` schema, so a new setting is one field there and nothing here.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// TOML file with any of the settings below (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RelayConfig,
}

/// Whether the relay will serve on several cores (`--cores`, or `cores` in `--config`, is
/// 0 on a multi-core host or above 1): then the main runtime only runs control work and
/// is single-threaded. A file that cannot be read here is reported when the relay starts.
pub(crate) fn serves_on_cores(args: &RelayArgs) -> bool {
    let in_file = || {
        let table = crate::config::read_table(args.config.as_deref()?).ok()?;
        usize::try_from(table.get("cores")?.as_integer()?).ok()
    };
    let several = |setting: usize| jobgate_relay::config::serving_cores(setting) > 1;
    several(args.settings.cores) || in_file().is_some_and(several)
}

/// Merges `relay.toml` and the flags given (flags win) into a [`RelayConfig`], deserialized
/// once. `matches` are the `relay` subcommand's: they say which flags were typed, so a
/// flag's default never hides the file's key.
fn relay_config(args: RelayArgs, matches: &ArgMatches) -> anyhow::Result<RelayConfig> {
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
    // A field's name is both its key and its clap id; file-only keys have no id.
    let typed: Vec<&str> = matches
        .ids()
        .map(|id| id.as_str())
        .filter(|id| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .collect();
    let mut flags = toml::Table::try_from(&args.settings).context("relay flags")?;
    flags.retain(|key, _| typed.contains(&key));
    table.extend(flags);
    for required in REQUIRED_SETTINGS {
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

pub(crate) async fn run_relay(args: RelayArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let config = relay_config(args, matches)?;
    let relay = Relay::start(config).await?;
    // Handlers first, then the ready line: whoever stops the relay once it said it is
    // ready (systemd, a test) gets a drain, not the default action of SIGTERM.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    if let (Some(addr), Some(node)) = (relay.peer_addr, relay.node_id()) {
        relay_says(format_args!(
            "cluster node {node}: peer link (QUIC, mutual TLS) on {addr}"
        ));
    }
    relay_says(format_args!(
        "HTTPS on {}, agents (QUIC/UDP) on {}{}",
        relay.https_addr,
        relay.quic_addr,
        match relay.cores() {
            1 => String::new(),
            n => format!(", serving on {n} cores"),
        }
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
    use clap::{CommandFactory, FromArgMatches};

    fn parse(argv: &[&str]) -> (RelayArgs, ArgMatches) {
        let matches = Cli::command().try_get_matches_from(argv).expect("parse");
        let cli = Cli::from_arg_matches(&matches).expect("cli");
        let relay = matches.subcommand_matches("relay").expect("relay").clone();
        match cli.command {
            Command::Relay(args) => (args, relay),
            _ => panic!("not relay"),
        }
    }

    #[test]
    fn the_defaults_parse_and_validate() {
        let config = RelayConfig::new("example.org", "/c".into(), "/k".into(), "/t".into());
        config.validate().expect("defaults are valid");
        assert_eq!(
            config.idle_timeout_secs,
            jobgate_relay::config::DEFAULT_IDLE_TIMEOUT_SECS
        );
        assert!(!config.allow_public);
    }

    #[test]
    fn every_flag_sets_the_key_of_its_name() {
        let (args, matches) = parse(&[
            "jobgate",
            "relay",
            "--domain",
            "example.org",
            "--cert",
            "/c",
            "--key",
            "/k",
            "--tokens",
            "/t",
            "--idle-timeout",
            "45",
            "--max-buffered-mib",
            "7",
            "--allow-public",
        ]);
        let config = relay_config(args, &matches).expect("config");
        assert_eq!(config.idle_timeout_secs, 45);
        assert_eq!(config.max_buffered_mib, 7);
        assert!(config.allow_public);
    }

    #[test]
    fn a_missing_required_setting_is_named() {
        let (args, matches) = parse(&["jobgate", "relay", "--domain", "example.org"]);
        let error = relay_config(args, &matches).expect_err("no cert");
        assert!(error.to_string().contains("--cert is required"), "{error}");
    }

    #[test]
    fn flags_win_over_the_relay_toml() {
        let dir = std::env::temp_dir().join(format!("jobgate-relayargs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            "domain = \"file.example\"\ncert = \"/c\"\nkey = \"/k\"\ntokens = \"/t\"\nidle_timeout_secs = 40\nallow_public = true\nmax_agents = 5\nkeep_alive_secs = 3\n",
        )
        .expect("write");
        let (args, matches) = parse(&[
            "jobgate",
            "relay",
            "--config",
            file.to_str().expect("utf8"),
            "--idle-timeout",
            "50",
            "--domain",
            "flag.example",
        ]);
        let config = relay_config(args, &matches).expect("config");
        assert_eq!(config.domain, "flag.example");
        assert_eq!(config.idle_timeout_secs, 50);
        assert_eq!(config.max_agents, 5, "a key no flag gave stays");
        assert_eq!(config.keep_alive_secs, 3, "a file-only key is read");
        assert_eq!(
            config.max_sessions_per_user,
            jobgate_relay::config::DEFAULT_MAX_SESSIONS_PER_USER,
            "a key neither gave has its default"
        );
        assert!(
            config.allow_public,
            "an absent boolean flag must not turn the file's off"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_relay_on_several_cores_keeps_its_main_runtime_single_threaded() {
        let workers = |argv: &[&str]| {
            let matches = Cli::command().try_get_matches_from(argv).expect("parse");
            Cli::from_arg_matches(&matches).expect("cli").workers()
        };
        assert_eq!(workers(&["jobgate", "relay"]), None);
        assert_eq!(workers(&["jobgate", "relay", "--cores", "4"]), Some(1));
        assert_eq!(
            workers(&["jobgate", "--workers", "3", "relay", "--cores", "4"]),
            Some(3),
            "--workers wins"
        );
        assert_eq!(workers(&["jobgate", "agent", "--relay", "r:1"]), None);
        let many = std::thread::available_parallelism().map_or(1, |n| n.get()) > 1;
        assert_eq!(
            workers(&["jobgate", "relay", "--cores", "0"]),
            many.then_some(1),
            "0: one per core"
        );
        let mut config = RelayConfig::new("example.org", "/c".into(), "/k".into(), "/t".into());
        config.cores = jobgate_relay::cores::MAX_CORES + 1;
        assert!(
            config.validate().is_err(),
            "far more cores than any host has"
        );
        config.cores = 0;
        assert!(config.serving_cores() >= 1);

        let dir = std::env::temp_dir().join(format!("jobgate-cores-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("relay.toml");
        std::fs::write(&file, "cores = 8\n").expect("write");
        let path = file.to_str().expect("utf8");
        assert_eq!(workers(&["jobgate", "relay", "--config", path]), Some(1));
        std::fs::write(&file, "cores = 1\n").expect("write");
        assert_eq!(workers(&["jobgate", "relay", "--config", path]), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
