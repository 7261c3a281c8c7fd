//! Command-line interface: the subcommands and their dispatch. Each big subcommand has a
//! module of its own (`relay_cmd`, `agent_cmd`, `launch`, `status`); logging is in
//! `logging`.

use crate::agent_cmd::{run_agent, AgentArgs};
use crate::logging::{init_logging, LogFormat};
use crate::relay_cmd::{run_relay, RelayArgs};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use jobgate_relay::tokens::TokensFile;
use std::path::PathBuf;

/// Put a web app running inside an HPC batch job behind a private HTTPS URL.
#[derive(Debug, Parser)]
#[command(name = "jobgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Runtime worker threads (1 = a single-threaded runtime). Default: 1 on machines with
    /// at most 2 cores (measured faster there), else one per core.
    #[arg(long, global = true, env = "JOBGATE_WORKERS")]
    pub workers: Option<usize>,
    /// Log lines as human-readable text, or as one JSON object per line (for a log store;
    /// the relay's own status lines become JSON events too).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "JOBGATE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// Parses the command line, keeping clap's matches: they say which flags were typed
    /// (a relay flag's default must not hide a `relay.toml` key).
    pub fn parse_with_matches() -> (Self, clap::ArgMatches) {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().get_matches();
        match Self::from_arg_matches(&matches) {
            Ok(cli) => (cli, matches),
            Err(e) => e.exit(),
        }
    }

    /// Runtime worker threads as asked, or as the command needs: a relay serving on
    /// several cores runs its own runtime per core, and its main runtime only control
    /// work, so that one is single-threaded unless `--workers` says otherwise.
    pub fn workers(&self) -> Option<usize> {
        match &self.command {
            Command::Relay(args)
                if self.workers.is_none() && crate::relay_cmd::serves_on_cores(args) =>
            {
                Some(1)
            }
            _ => self.workers,
        }
    }

    /// For `__app-guard`: the agent's pid and the app's group. The guard must run before
    /// any runtime thread exists (it blocks signals on its one thread).
    pub fn app_guard(&self) -> Option<(i32, i32)> {
        match self.command {
            Command::AppGuard { parent, pgid } => Some((parent, pgid)),
            _ => None,
        }
    }
}

// Parsed once at start: the relay's many flags make its variant large, which costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the relay (DMZ host): HTTPS for *.<domain>, QUIC for agents.
    Relay(RelayArgs),
    /// Run the agent (inside the job): start/forward to the app, dial out to the relay.
    Agent(AgentArgs),
    /// Get an agent token through the site's single sign-on: prints an address to open in
    /// your browser, then writes the token (0600) where the agent looks for it.
    Login(crate::login_cmd::LoginArgs),
    /// Manage agent tokens in the relay's tokens file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Start a relay, an agent and a small web app on this machine, and print the URL.
    Demo(crate::demo::DemoArgs),
    /// Write a throw-away CA and a wildcard certificate for *.<domain> (testing only).
    DevCert {
        /// The relay's domain.
        #[arg(long)]
        domain: String,
        /// Directory for ca.pem, cert.pem and key.pem.
        #[arg(long)]
        out: PathBuf,
    },
    /// The demo's web app (echo, bytes, WebSocket echo); used by the demo and the tests.
    #[command(hide = true)]
    DemoApp(crate::demo_app::DemoAppArgs),
    /// The app's guard, started by the agent (see agent/src/guard.rs).
    #[command(name = jobgate_agent::guard::GUARD_SUBCOMMAND, hide = true)]
    AppGuard {
        /// The agent's pid.
        #[arg(long)]
        parent: i32,
        /// The app's process group.
        #[arg(long)]
        pgid: i32,
    },
    /// Submit a Slurm job running your app (or JupyterLab) behind the relay; print its URL.
    Launch(crate::launch::LaunchArgs),
    /// List your sessions in batch jobs: job id, state, URL, start, time left.
    Jobs(crate::launch::JobsArgs),
    /// Cancel a batch job and wait until it is gone (its URL dies with it).
    Cancel(crate::launch::CancelArgs),
    /// The relay's sessions (user, job, node, traffic) from its admin API, on the relay host.
    Status(crate::status::StatusArgs),
    /// Print the shell completion script for bash, zsh or fish (see the install section of
    /// docs/admin-guide.md).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page jobgate(1) (roff), or with --out-dir write one page per
    /// subcommand there (jobgate.1, jobgate-relay.1, ...).
    Man {
        /// Directory for all the pages.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Mint a token for a user (replacing any earlier one) and print it once.
    Issue {
        /// Tokens file.
        #[arg(long)]
        tokens: PathBuf,
        /// User name.
        #[arg(long)]
        user: String,
        /// Live sessions this user may hold (`--max-mappings` is its old name).
        #[arg(long, alias = "max-mappings")]
        max_sessions: Option<usize>,
    },
    /// Remove a user's token.
    Revoke {
        /// Tokens file.
        #[arg(long)]
        tokens: PathBuf,
        /// User name.
        #[arg(long)]
        user: String,
    },
    /// List users with a token, with where it came from and when it expires (never the
    /// tokens themselves).
    List {
        /// Tokens file.
        #[arg(long)]
        tokens: PathBuf,
    },
}

/// I/O events the single-threaded runtime takes from the kernel per tick: the relay's
/// cores use the same (why: its doc).
const IO_EVENTS_PER_TICK: usize = jobgate_relay::cores::IO_EVENTS_PER_TICK;

/// Builds the tokio runtime: single-threaded for `workers == 1`.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = workers.unwrap_or(if cores <= 2 { 1 } else { cores });
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .max_io_events_per_tick(IO_EVENTS_PER_TICK)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// Runs a subcommand and returns the process exit code.
pub async fn dispatch(cli: Cli, matches: clap::ArgMatches) -> i32 {
    let format = cli.log_format;
    let init_logging = |default: &str| init_logging(default, format);
    let result = match cli.command {
        Command::Relay(args) => {
            init_logging("info");
            let relay_matches = matches.subcommand_matches("relay").unwrap_or(&matches);
            run_relay(args, relay_matches).await
        }
        Command::Agent(args) => {
            init_logging("warn");
            return run_agent(args).await;
        }
        Command::Token(command) => run_token(command),
        Command::Login(args) => {
            init_logging("warn");
            crate::login_cmd::run_login(args).await
        }
        Command::Demo(args) => {
            init_logging("warn");
            crate::demo::run(args).await
        }
        Command::DevCert { domain, out } => crate::pki::write_dev_pki(&domain, &out).map(|pki| {
            println!("CA:          {}", pki.ca.display());
            println!("certificate: {}", pki.cert.display());
            println!("key:         {}", pki.key.display());
        }),
        Command::DemoApp(args) => {
            init_logging("warn");
            crate::demo_app::run(args).await
        }
        Command::AppGuard { parent, pgid } => return jobgate_agent::guard::run(parent, pgid),
        Command::Launch(args) => return crate::launch::run_launch(args).await,
        Command::Jobs(args) => return crate::launch::run_jobs(args).await,
        Command::Cancel(args) => return crate::launch::run_cancel(args).await,
        Command::Completions { shell } => {
            // Generated into memory first: clap_complete panics on a write error (a
            // closed pipe, `| head`), we report it instead.
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "jobgate", &mut script);
            write_stdout(&script).context("writing the completion script")
        }
        Command::Man { out_dir } => write_man(out_dir),
        Command::Status(args) => crate::status::run(args).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("jobgate: {e:#}");
            1
        }
    }
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`, `| grep -q`) is no
/// error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `jobgate man`: jobgate(1) on stdout, or every page into `out_dir`.
fn write_man(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let command = <Cli as clap::CommandFactory>::command();
    match out_dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut page)
                .context("rendering the manual page")?;
            write_stdout(&page).context("writing the manual page")
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?;
            eprintln!("jobgate: manual pages written to {}", dir.display());
            Ok(())
        }
    }
}

fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Issue {
            tokens,
            user,
            max_sessions,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // Locked read-modify-write: parallel `token issue` runs lose nobody.
            let token = TokensFile::update(&tokens, |file| file.issue(&user, max_sessions, now))?;
            eprintln!(
                "jobgate: token for {user} written to {} (hash only); it is shown once:",
                tokens.display()
            );
            println!("{token}");
        }
        TokenCommand::Revoke { tokens, user } => {
            if !TokensFile::update(&tokens, |file| Ok(file.revoke(&user)))? {
                bail!("{user} has no token in {}", tokens.display());
            }
            eprintln!("jobgate: revoked the token of {user}");
        }
        TokenCommand::List { tokens } => {
            let file = TokensFile::read(&tokens)?;
            for entry in &file.tokens {
                let limit = entry
                    .max_sessions
                    .map(|n| format!(" max_sessions={n}"))
                    .unwrap_or_default();
                // Admin-issued tokens keep the plain line scripts read; others say more.
                let origin = entry
                    .origin
                    .as_deref()
                    .map(|o| format!(" origin={o}"))
                    .unwrap_or_default();
                let expires = entry
                    .expires
                    .map(|at| format!(" expires={}", utc(at)))
                    .unwrap_or_default();
                println!("{}{limit}{origin}{expires}", entry.user);
            }
        }
    }
    Ok(())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod utc_tests {
    #[test]
    fn unix_seconds_print_as_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(1_796_000_000), "2026-11-30T00:53:20Z");
    }
}
