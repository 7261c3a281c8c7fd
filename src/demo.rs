//! `jobgate demo`: a relay, an agent and the demo app on this machine, no configuration.

use crate::pki::write_dev_pki;
use anyhow::Context;
use clap::Args;
use jobgate_agent::{dial::DialConfig, AgentOptions, AppSource};
use jobgate_protocol::AccessMode;
use jobgate_relay::tokens::TokensFile;
use jobgate_relay::{Relay, RelayConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The demo's domain: every `*.localhost` name resolves to loopback without DNS, and a
/// wildcard one level below `localhost` is one that curl and browsers accept.
pub const DEMO_DOMAIN: &str = "jobgate.localhost";

/// Flags of `jobgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// HTTPS port of the demo relay.
    #[arg(long, default_value_t = 8443)]
    https_port: u16,
    /// QUIC (UDP) port of the demo relay.
    #[arg(long, default_value_t = 7443)]
    quic_port: u16,
    /// Directory for the demo's certificate, key and tokens [default: a fresh temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs the demo until Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("jobgate-demo-{}", std::process::id()))
    });
    let pki = write_dev_pki(DEMO_DOMAIN, &dir)?;
    let tokens_path = dir.join("tokens.toml");
    let mut tokens = TokensFile::default();
    let token = tokens.issue("demo", None, 0)?;
    tokens.write(&tokens_path)?;

    let mut config = RelayConfig::new(DEMO_DOMAIN, pki.cert.clone(), pki.key.clone(), tokens_path);
    config.listen_https = SocketAddr::from(([127, 0, 0, 1], args.https_port));
    config.listen_quic = SocketAddr::from(([127, 0, 0, 1], args.quic_port));
    let relay = Relay::start(config)
        .await
        .context("starting the demo relay (is the port free? try --https-port)")?;

    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    tokio::spawn(crate::demo_app::serve_tcp(
        app_listener,
        Arc::new("demo".into()),
    ));

    let url_file = dir.join("url");
    let _ = std::fs::remove_file(&url_file);
    let options = AgentOptions {
        dial: DialConfig::new(
            format!("127.0.0.1:{}", relay.quic_addr.port()),
            Some(pki.ca.clone()),
        ),
        token: jobgate_protocol::Token(token),
        reservation: None,
        reserved_url: None,
        access: Some(AccessMode::Link),
        share: Default::default(),
        url_file: Some(url_file.clone()),
        app: AppSource::Existing(jobgate_agent::target::Target::Tcp(app_addr)),
        ready_timeout: jobgate_agent::DEFAULT_READY_TIMEOUT,
        stop_grace: jobgate_agent::DEFAULT_STOP_GRACE,
        container: None,
        job_file: None,
        app_guard: None, // the demo's app is in-process
    };
    let agent = tokio::spawn(jobgate_agent::run(options));
    let url = wait_for_url(&url_file).await?;
    let (base, query) = url.split_once('?').unwrap_or((&url, ""));
    let echo = format!("{base}echo?{query}");
    println!();
    println!("jobgate demo is running: a relay, an agent and a small web app on this machine.");
    println!();
    println!("  URL:   {url}");
    println!("  Try:   curl --cacert {} '{echo}'", pki.ca.display());
    println!(
        "  Page:  open the URL in a browser that trusts {} (it has a WebSocket echo)",
        pki.ca.display()
    );
    println!();
    println!("Press Ctrl-C to stop; the URL dies with the agent.");

    let code = agent.await.context("agent task failed")??;
    relay.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    if code != 0 && code != 130 && code != 143 {
        anyhow::bail!("the demo agent ended with code {code}");
    }
    Ok(())
}

async fn wait_for_url(path: &std::path::Path) -> anyhow::Result<String> {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return Ok(text.trim().to_owned());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the demo agent did not get a URL within 10 s")
}
