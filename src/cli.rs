//! Command-line interface: flags, config merging, and the entry point of each subcommand.

use crate::config::ClientConfig;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jobgate_agent::{dial::DialConfig, exit, AgentOptions, AppSource};
use jobgate_protocol::AccessMode;
use jobgate_relay::tokens::TokensFile;
use jobgate_relay::{Relay, RelayConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    command: Command,
}

impl Cli {
    /// For `__app-guard`: the agent's pid and the app's group. The guard must run before
    /// any runtime thread exists (it blocks signals on its one thread).
    pub fn app_guard(&self) -> Option<(i32, i32)> {
        match self.command {
            Command::AppGuard { parent, pgid } => Some((parent, pgid)),
            _ => None,
        }
    }
}

/// How log events are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2026-12-04T22:53:00Z  INFO jobgate_relay::agents: session opened name=…`
    Text,
    /// `{"timestamp":…,"level":"INFO","fields":{"message":"session opened","name":…},"target":…}`
    Json,
}

/// Set once at start: whether status lines go out as JSON events.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A status line of the relay for its operator: plain on stderr, or a JSON event.
fn relay_says(message: std::fmt::Arguments<'_>) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(target: "jobgate::relay", "{message}");
    } else {
        eprintln!("jobgate relay: {message}");
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (DMZ host): HTTPS for *.<domain>, QUIC for agents.
    Relay(RelayArgs),
    /// Run the agent (inside the job): start/forward to the app, dial out to the relay.
    Agent(AgentArgs),
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

/// `jobgate relay`'s flags. Each one is a `relay.toml` key (serde names it): the flags given
/// are serialized over the file's table, so a setting needs its field here and in
/// `RelayConfig`, nothing else (a test checks that every flag is a key).
#[derive(Debug, Args, serde::Serialize)]
struct RelayArgs {
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
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Relay QUIC address, HOST:PORT [default: `relay` in the site's or your jobgate.toml].
    #[arg(long, env = "JOBGATE_RELAY")]
    relay: Option<String>,
    /// CA certificate (PEM) to trust for the relay instead of the system roots.
    #[arg(long, env = "JOBGATE_RELAY_CA")]
    relay_ca: Option<PathBuf>,
    /// File holding the token (mode 0600) [default: $JOBGATE_TOKEN_FILE, ~/.config/jobgate/token].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Write the URL to this file (one line), for scripts.
    #[arg(long)]
    url_file: Option<PathBuf>,
    /// Forward to an app that already listens: 127.0.0.1:PORT or unix:/path.
    #[arg(long, conflicts_with_all = ["jupyter", "jupyter_tcp"])]
    to: Option<jobgate_agent::target::Target>,
    /// Start JupyterLab set up for the relay (unix socket, token in the URL); arguments
    /// after `--` go to `jupyter lab`.
    #[arg(long)]
    jupyter: bool,
    /// Like --jupyter, but Jupyter listens on a free loopback port instead of a socket.
    #[arg(long, conflicts_with = "jupyter")]
    jupyter_tcp: bool,
    /// The `jupyter` program for --jupyter [default: `jupyter` on PATH].
    #[arg(long, env = "JOBGATE_JUPYTER", value_name = "PATH")]
    jupyter_program: Option<String>,
    /// How the URL is guarded: link (a private link with an access key) or public (the
    /// app's own login only, where the relay allows it) [default: link].
    #[arg(long, value_name = "link|public", value_parser = parse_access_mode)]
    access: Option<AccessMode>,
    /// Seconds the app has to accept connections [default: 300].
    #[arg(long)]
    ready_timeout: Option<u64>,
    /// Seconds of silence before the relay counts as gone [default: 30].
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Run the app inside this Apptainer/Singularity image (the agent stays outside).
    #[arg(long, value_name = "IMAGE", conflicts_with = "to")]
    sif: Option<String>,
    /// An option for `apptainer exec` with --sif, e.g. --sif-option=--nv (repeatable).
    #[arg(
        long,
        value_name = "OPTION",
        allow_hyphen_values = true,
        requires = "sif"
    )]
    sif_option: Vec<String>,
    /// Keep the URL and state in this job file [default: ~/.jobgate/jobs/$SLURM_JOB_ID.json
    /// inside a Slurm job, none elsewhere].
    #[arg(long, value_name = "PATH")]
    job_file: Option<PathBuf>,
    /// Write no job file, even in a Slurm job.
    #[arg(long, conflicts_with = "job_file")]
    no_job_file: bool,
    /// The app to start; `{port}` becomes a free loopback port, `{sock}` a private unix socket.
    /// With --jupyter: extra arguments for `jupyter lab`.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
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
    /// List users with a token (never the tokens themselves).
    List {
        /// Tokens file.
        #[arg(long)]
        tokens: PathBuf,
    },
}

/// Builds the tokio runtime: single-threaded for `workers == 1`.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = workers.unwrap_or(if cores <= 2 { 1 } else { cores });
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// Logging for one run: what the person running the agent must read (events with target
/// [`jobgate_agent::USER_TARGET`]) as plain `jobgate: …` lines, diagnostics by `RUST_LOG`
/// (default `default`) with time and level; or everything as JSON lines.
pub fn init_logging(default: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let user_target = jobgate_agent::USER_TARGET;
    // The user's lines have a layer of their own (text: `off` here) or are always on
    // in the one JSON stream (`info`).
    let diagnostics = |user_level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        match format!("{user_target}={user_level}").parse() {
            Ok(directive) => filter.add_directive(directive),
            Err(_) => filter,
        }
    };
    let for_user = tracing_subscriber::filter::filter_fn(move |meta| meta.target() == user_target);
    let _ = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(UserLine)
                    .with_filter(for_user),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(diagnostics("off")),
            )
            .try_init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_current_span(false)
                        .with_writer(std::io::stderr)
                        .with_filter(diagnostics("info")),
                )
                .try_init()
        }
    };
}

/// `jobgate: <message>` (`jobgate: warning: …` for warnings): the agent's lines for the
/// person who reads the job's output, as they always looked.
struct UserLine;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for UserLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let warning = *event.metadata().level() <= tracing::Level::WARN;
        write!(
            writer,
            "jobgate: {}",
            if warning { "warning: " } else { "" }
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Runs a subcommand and returns the process exit code.
pub async fn dispatch(cli: Cli) -> i32 {
    let format = cli.log_format;
    let init_logging = |default: &str| init_logging(default, format);
    let result = match cli.command {
        Command::Relay(args) => {
            init_logging("info");
            run_relay(args).await
        }
        Command::Agent(args) => {
            init_logging("warn");
            return run_agent(args).await;
        }
        Command::Token(command) => run_token(command),
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

async fn run_relay(args: RelayArgs) -> anyhow::Result<()> {
    let config = relay_config(args)?;
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

/// `--access`: the same words as the wire and the config files.
fn parse_access_mode(text: &str) -> Result<AccessMode, String> {
    match text {
        "link" => Ok(AccessMode::Link),
        "public" => Ok(AccessMode::Public),
        _ => Err(format!("{text:?}: expected link or public")),
    }
}

/// Fills what neither a flag nor its environment variable set from the config files.
fn agent_settings(mut args: AgentArgs) -> Result<AgentArgs, String> {
    let config = ClientConfig::load().map_err(|e| e.to_string())?;
    args.relay = args.relay.or(config.relay);
    args.relay_ca = args.relay_ca.or(config.relay_ca);
    if args.token_file.is_none() && std::env::var_os("JOBGATE_TOKEN_FILE").is_none() {
        args.token_file = config.token_file;
    }
    args.access = args.access.or(config.access);
    args.ready_timeout = args.ready_timeout.or(config.ready_timeout);
    args.idle_timeout = args.idle_timeout.or(config.idle_timeout);
    args.jupyter_program = args.jupyter_program.or(config.jupyter_program);
    if args.relay.is_none() {
        return Err(format!(
            "no relay: pass --relay HOST:PORT, set JOBGATE_RELAY, or put `relay = \"HOST:PORT\"` \
             in {} or ~/{} (your admins know it)",
            crate::config::SITE_CONFIG,
            crate::config::USER_CONFIG
        ));
    }
    Ok(args)
}

async fn run_agent(args: AgentArgs) -> i32 {
    let args = match agent_settings(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("jobgate: {e}");
            return exit::USAGE;
        }
    };
    let token = match jobgate_agent::token::load_token(args.token_file.clone()) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("jobgate: {e}");
            return exit::USAGE;
        }
    };
    let container = match args.sif.clone() {
        Some(image) => {
            match jobgate_agent::container::Container::find(image, args.sif_option.clone()) {
                Ok(container) => Some(container),
                Err(e) => {
                    eprintln!("jobgate: {e}");
                    return exit::USAGE;
                }
            }
        }
        None => None,
    };
    let job_file = match args.no_job_file {
        true => None,
        false => jobgate_agent::jobfile::JobFile::for_agent(args.job_file.clone()),
    };
    // Holds Jupyter's socket and token file until the agent is done.
    let mut jupyter_dir = None;
    let mut app_path = None;
    let app = if args.jupyter || args.jupyter_tcp {
        match jupyter_app(&args).await {
            Ok(launch) => {
                app_path = Some(launch.app_path);
                jupyter_dir = Some(launch.dir);
                AppSource::Command {
                    argv: launch.argv,
                    to: launch.to,
                    env: launch.env,
                }
            }
            Err(code) => return code,
        }
    } else {
        match (args.command.is_empty(), args.to) {
            (true, Some(target)) => AppSource::Existing(target),
            (true, None) => {
                eprintln!("jobgate: give --to ADDRESS, --jupyter, or a command after --");
                return exit::USAGE;
            }
            (false, to) => AppSource::Command {
                argv: args.command,
                to,
                env: Vec::new(),
            },
        }
    };
    let options = AgentOptions {
        dial: DialConfig {
            relay: args.relay.unwrap_or_default(),
            relay_ca: args.relay_ca,
            idle_timeout: args
                .idle_timeout
                .map(Duration::from_secs)
                .unwrap_or(jobgate_agent::dial::DEFAULT_IDLE_TIMEOUT)
                .max(Duration::from_secs(2)),
        },
        token,
        access: args.access.unwrap_or_default(),
        url_file: args.url_file,
        app,
        ready_timeout: args
            .ready_timeout
            .map(Duration::from_secs)
            .unwrap_or(jobgate_agent::DEFAULT_READY_TIMEOUT),
        stop_grace: jobgate_agent::DEFAULT_STOP_GRACE,
        container,
        job_file,
        app_guard: std::env::current_exe().ok(),
    };
    let code = match jobgate_agent::run_opening(options, app_path).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jobgate: {e}");
            e.exit_code()
        }
    };
    drop(jupyter_dir);
    code
}

/// Prepares `jupyter lab` for --jupyter/--jupyter-tcp, or returns the exit code.
async fn jupyter_app(args: &AgentArgs) -> Result<jobgate_agent::jupyter::JupyterLaunch, i32> {
    use jobgate_agent::jupyter::{self, Listen};
    let program = args
        .jupyter_program
        .clone()
        .unwrap_or_else(|| jupyter::DEFAULT_PROGRAM.to_owned());
    let mut listen = if args.jupyter_tcp {
        Listen::Tcp
    } else {
        Listen::Socket
    };
    if args.sif.is_some() {
        // Jupyter is inside the image: no probing from out here (images are recent enough
        // for the socket; --jupyter-tcp otherwise).
        return jupyter::prepare(&program, listen, &args.command).map_err(|e| {
            eprintln!("jobgate: cannot prepare Jupyter's private directory: {e}");
            exit::APP_FAILED
        });
    }
    match jupyter::probe_version(&program).await {
        Err(e) => {
            eprintln!("jobgate: {e}");
            return Err(exit::APP_FAILED);
        }
        Ok(Some(version)) if listen == Listen::Socket && !jupyter::supports_socket(version) => {
            eprintln!(
                "jobgate: jupyter_server {}.{} cannot listen on a unix socket (1.9 or later can): \
                 using a loopback port instead",
                version.0, version.1
            );
            listen = Listen::Tcp;
        }
        Ok(_) => {}
    }
    jupyter::prepare(&program, listen, &args.command).map_err(|e| {
        eprintln!("jobgate: cannot prepare Jupyter's private directory: {e}");
        exit::APP_FAILED
    })
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
                println!("{}{limit}", entry.user);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    l if l.starts_with("listen") => "127.0.0.1:1",
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
