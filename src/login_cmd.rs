//! `jobgate login`: get an agent token through the site's single sign-on. The command
//! asks the relay for a code and a URL, the user opens the URL in their own browser and
//! signs in, and the command collects the token the relay mints for that user name and
//! writes it (mode 0600) where the agent looks for it.

use anyhow::{bail, Context};
use clap::Args;
use jobgate_relay::signon::idp_http::IdpHttp;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The relay's HTTPS port when `--relay` names none.
const DEFAULT_HTTPS_PORT: u16 = 443;
/// Longest a login waits for the browser (the relay forgets it after 10 minutes too).
const LOGIN_WAIT: Duration = Duration::from_secs(10 * 60);
/// Shortest pause between polls, whatever the relay says.
const MIN_POLL: Duration = Duration::from_secs(1);

/// `jobgate login`'s flags.
#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    /// The relay's HTTPS host, HOST[:PORT] [default port: 443].
    #[arg(long, env = "JOBGATE_LOGIN_RELAY")]
    relay: String,
    /// PEM CA that signed the relay's certificate, besides the system roots [default: the
    /// site config's relay_ca].
    #[arg(long, value_name = "CA.pem")]
    relay_ca: Option<PathBuf>,
    /// Where to write the token [default: $JOBGATE_TOKEN_FILE, ~/.config/jobgate/token].
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
}

/// Runs `jobgate login`.
pub(crate) async fn run_login(args: LoginArgs) -> anyhow::Result<()> {
    let config = crate::config::ClientConfig::load().map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca = args.relay_ca.or(config.relay_ca);
    let token_file = args
        .token_file
        .or_else(|| std::env::var_os("JOBGATE_TOKEN_FILE").map(PathBuf::from))
        .or(config.token_file)
        .or_else(|| Some(PathBuf::from(std::env::var_os("HOME")?).join(".config/jobgate/token")))
        .context("no place for the token: pass --token-file or set HOME")?;
    let http = IdpHttp::new(ca.as_deref())?;
    let base = match args.relay.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => format!("https://{}", args.relay),
        _ => format!("https://{}:{DEFAULT_HTTPS_PORT}", args.relay),
    };
    let (status, started) = post(&http, &format!("{base}/__jobgate/login/start"), None).await?;
    if status != http::StatusCode::OK {
        bail!(
            "the relay at {base} refused to start a login ({status}): does it have single sign-on?"
        );
    }
    let text = |key: &str| started[key].as_str().unwrap_or_default().to_owned();
    let (url, code, poll) = (text("url"), text("code"), text("poll"));
    let interval = Duration::from_secs(started["interval"].as_u64().unwrap_or(2)).max(MIN_POLL);
    eprintln!("jobgate login: open this address in your browser and sign in:\n\n    {url}\n\nand check that the page shows the code {code}. Waiting...");
    let deadline = Instant::now() + LOGIN_WAIT;
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() > deadline {
            bail!(
                "no sign-in within {} minutes: run jobgate login again",
                LOGIN_WAIT.as_secs() / 60
            );
        }
        let (status, answer) =
            match post(&http, &format!("{base}/__jobgate/login/poll"), Some(&poll)).await {
                Ok(answer) => answer,
                // The relay restarting or a network blip: keep waiting.
                Err(e) => {
                    tracing::debug!("poll failed: {e}");
                    continue;
                }
            };
        match status {
            http::StatusCode::ACCEPTED => continue,
            http::StatusCode::OK => {
                let token = answer["token"].as_str().unwrap_or_default();
                if token.is_empty() {
                    bail!("the relay sent no token");
                }
                write_token(&token_file, token)?;
                eprintln!("jobgate login: token written to {}", token_file.display());
                return Ok(());
            }
            other => bail!(
                "the login ended ({other}): {}",
                answer["error"]
                    .as_str()
                    .unwrap_or("run jobgate login again")
            ),
        }
    }
}

async fn post(
    http: &IdpHttp,
    url: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(http::StatusCode, serde_json::Value)> {
    let mut request = http::Request::post(url);
    if let Some(secret) = bearer {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {secret}"));
    }
    let request = request.body(Vec::new()).context("request")?;
    let response = http
        .send(request)
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let value = serde_json::from_slice(response.body()).unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

/// Writes the token, mode 0600, in a private directory (the agent refuses looser files).
fn write_token(path: &std::path::Path, token: &str) -> anyhow::Result<()> {
    // A missing directory is made private; an existing one is left as it is.
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        jobgate_files::ensure_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    jobgate_files::write_atomically(path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
