//! `jobgate agent`: its flags, filled from the site's and the user's config files, and the
//! glue that turns them into the agent library's options (the Jupyter preset included).

use crate::config::ClientConfig;
use clap::Args;
use jobgate_agent::{dial::DialConfig, exit, AgentOptions, AppSource};
use jobgate_protocol::Token;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Settings a site or user may also give in jobgate.toml.
    #[command(flatten)]
    settings: ClientConfig,
    /// File (mode 0600) holding the reservation `jobgate launch` got for this job, so the
    /// session gets the URL printed at submit time.
    #[arg(long, env = "JOBGATE_RESERVATION_FILE")]
    reservation_file: Option<PathBuf>,
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
    /// With --access owner: users who may open the URL too (comma-separated user names
    /// of the site's single sign-on).
    #[arg(long, value_name = "USER,...", value_delimiter = ',')]
    share: Vec<String>,
    /// With --access owner: groups whose members may open the URL too (comma-separated).
    #[arg(long, value_name = "GROUP,...", value_delimiter = ',')]
    share_group: Vec<String>,
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

/// Fills what neither a flag nor its environment variable set from the config files.
fn agent_settings(mut args: AgentArgs) -> Result<AgentArgs, String> {
    let mut config = ClientConfig::load().map_err(|e| e.to_string())?;
    if std::env::var_os("JOBGATE_TOKEN_FILE").is_some() {
        // The variable outranks the files (a flag outranks it in turn).
        config.token_file = None;
    }
    args.settings = args.settings.over(config).map_err(|e| e.to_string())?;
    if args.settings.relay.is_none() {
        return Err(format!(
            "no relay: pass --relay HOST:PORT, set JOBGATE_RELAY, or put `relay = \"HOST:PORT\"` \
             in {} or ~/{} (your admins know it)",
            crate::config::SITE_CONFIG,
            crate::config::USER_CONFIG
        ));
    }
    Ok(args)
}

pub(crate) async fn run_agent(args: AgentArgs) -> i32 {
    let args = match agent_settings(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("jobgate: {e}");
            return exit::USAGE;
        }
    };
    let token = match jobgate_agent::token::load_token(args.settings.token_file.clone()) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("jobgate: {e}");
            return exit::USAGE;
        }
    };
    // A reservation file is as secret as the token: the same private-file checks apply.
    let reservation_file = args.reservation_file.clone().or_else(launched_reservation);
    let (reservation, reserved_url) = match reservation_file {
        // The file holds the reservation, then the access URL `launch` printed.
        Some(path) => match jobgate_agent::token::load_token(Some(path)) {
            Ok(Token(text)) => {
                let mut lines = text.lines().map(str::trim);
                let reservation = lines.next().map(|r| Token(r.to_owned()));
                (reservation, lines.next().map(str::to_owned))
            }
            Err(e) => {
                eprintln!("jobgate: reservation: {e}");
                return exit::USAGE;
            }
        },
        None => (None, None),
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
            relay: args.settings.relay.unwrap_or_default(),
            relay_ca: args.settings.relay_ca,
            idle_timeout: seconds_or(
                args.settings.idle_timeout,
                jobgate_agent::dial::DEFAULT_IDLE_TIMEOUT,
                2,
            ),
            transport: args.settings.transport.unwrap_or_default(),
            relay_tcp: args.settings.relay_tcp,
            proxy: args.settings.proxy,
            quic_reprobe: seconds_or(
                args.settings.quic_reprobe,
                jobgate_agent::dial::DEFAULT_QUIC_REPROBE,
                1,
            ),
        },
        token,
        reservation,
        reserved_url,
        access: args.settings.access,
        share: jobgate_protocol::Shares {
            users: args.share,
            groups: args.share_group,
        },
        url_file: args.url_file,
        app,
        ready_timeout: args
            .settings
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
        .settings
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

/// The reservation `jobgate launch` stored for this job (see `launch::reserve`), if any.
fn launched_reservation() -> Option<PathBuf> {
    let job_id = std::env::var("SLURM_JOB_ID").ok()?;
    let dir = jobgate_agent::jobfile::jobs_dir()?;
    jobgate_agent::jobfile::JobFile::in_dir(&dir, &job_id)?;
    let path = crate::launch::reserve::reservation_path(&dir, &job_id);
    path.exists().then_some(path)
}

/// A setting in seconds, its default where unset, and never below `min_secs`.
fn seconds_or(setting: Option<u64>, default: Duration, min_secs: u64) -> Duration {
    setting
        .map(Duration::from_secs)
        .unwrap_or(default)
        .max(Duration::from_secs(min_secs))
}
