//! `jobgate status`: the relay's sessions as a table (or JSON), read from its admin API on
//! the relay host. Where the API is and its token come from the relay's own config
//! (`--config`, default `/etc/jobgate/relay.toml` when it exists), or from flags.

use crate::config::{check_keys, read_table, typed};
use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jobgate_relay::RelayConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The relay's config file read when `--config` is not given (if it exists).
const DEFAULT_RELAY_CONFIG: &str = "/etc/jobgate/relay.toml";
/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (a listing of 20,000 sessions is a few MiB).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// `jobgate status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The relay's admin listener, HOST:PORT [default: listen_metrics from the config].
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// File with the admin token [default: admin_token_file from the config].
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// The relay's config file [default: /etc/jobgate/relay.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only this user's sessions.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
}

/// One row of the listing, as `GET /api/sessions` gives it.
#[derive(Debug, serde::Deserialize)]
struct SessionRow {
    name: String,
    user: String,
    state: String,
    job_id: Option<String>,
    node: Option<String>,
    transport: Option<String>,
    access: Option<String>,
    /// In a cluster: the relay holding the session.
    #[serde(default)]
    relay: Option<String>,
    seconds: u64,
    bytes_in: u64,
    bytes_out: u64,
    requests: u64,
    #[serde(default)]
    websockets: u64,
}

/// Runs `jobgate status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let (admin, token_file) = endpoint(&args)?;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the admin token {}", token_file.display()))?;
    let path = match &args.user {
        Some(user) => format!("/api/sessions?user={user}"),
        None => "/api/sessions".to_owned(),
    };
    let body = tokio::time::timeout(API_TIMEOUT, get(admin, &path, token.trim()))
        .await
        .with_context(|| format!("the relay's admin API at {admin} did not answer in time"))??;
    if args.json {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let rows: Vec<SessionRow> =
        serde_json::from_slice(&body).context("the admin API answered something else")?;
    print_table(&rows);
    Ok(())
}

/// The admin listener's address and the token file: flags first, then the config.
fn endpoint(args: &StatusArgs) -> anyhow::Result<(SocketAddr, PathBuf)> {
    let config_path = args.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_RELAY_CONFIG);
        default.exists().then_some(default)
    });
    let (mut admin, mut token_file) = (args.admin, args.admin_token_file.clone());
    if let Some(path) = config_path.filter(|_| admin.is_none() || token_file.is_none()) {
        let table = read_table(&path)?;
        check_keys::<RelayConfig>(&path, &table, &[])?;
        let config: PartialRelay = typed(&path, table)?;
        admin = admin.or(config.listen_metrics.map(loopback_if_any));
        token_file = token_file.or(config.admin_token_file);
    }
    let Some(admin) = admin else {
        bail!("no admin listener: pass --admin HOST:PORT or --config with listen_metrics set");
    };
    let Some(token_file) = token_file else {
        bail!("no admin token: pass --admin-token-file FILE or --config with admin_token_file set");
    };
    Ok((admin, token_file))
}

/// The two settings `status` needs from a relay config (the rest is checked, not used).
#[derive(serde::Deserialize)]
struct PartialRelay {
    listen_metrics: Option<SocketAddr>,
    admin_token_file: Option<PathBuf>,
}

/// A listener bound to every address is reached on loopback.
fn loopback_if_any(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr {
            SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

/// One authenticated `GET` on the admin listener: the body of a `200`.
async fn get(admin: SocketAddr, path: &str, token: &str) -> anyhow::Result<Bytes> {
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("connecting to the relay's admin listener {admin}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake with the admin listener")?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, admin.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender.send_request(request).await.context("admin API")?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the admin API's answer: {e}"))?
        .to_bytes();
    match status {
        http::StatusCode::OK => Ok(body),
        http::StatusCode::UNAUTHORIZED => bail!("the relay refused the admin token (401)"),
        http::StatusCode::NOT_FOUND => {
            bail!("the relay's admin API is off (no admin_token_file in its config) or {path} is unknown")
        }
        other => bail!(
            "the admin API answered {other}: {}",
            String::from_utf8_lossy(&body).trim()
        ),
    }
}

fn print_table(rows: &[SessionRow]) {
    if rows.is_empty() {
        eprintln!("jobgate: no sessions");
        return;
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut table = vec![[
        "NAME",
        "USER",
        "STATE",
        "JOB",
        "NODE",
        "TRANSPORT",
        "RELAY",
        "ACCESS",
        "AGE",
        "IN",
        "OUT",
        "REQS",
        "WS",
    ]
    .map(str::to_owned)];
    for row in rows {
        table.push([
            row.name.clone(),
            row.user.clone(),
            row.state.clone(),
            dash(&row.job_id),
            dash(&row.node),
            dash(&row.transport),
            dash(&row.relay),
            dash(&row.access),
            if row.state == "live" {
                duration(row.seconds)
            } else {
                format!("{} left", duration(row.seconds))
            },
            bytes(row.bytes_in),
            bytes(row.bytes_out),
            row.requests.to_string(),
            row.websockets.to_string(),
        ]);
    }
    let mut widths = [0usize; 13];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `3d4h`, `2h05m`, `4m10s`, `12s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// `512 B`, `1.5 KiB`, `20.0 MiB`, `3.2 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(duration(12), "12s");
        assert_eq!(duration(250), "4m10s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
    }

    #[test]
    fn a_wildcard_listener_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:9464".parse().expect("addr");
        assert_eq!(loopback_if_any(any).to_string(), "127.0.0.1:9464");
        let one: SocketAddr = "10.1.2.3:9464".parse().expect("addr");
        assert_eq!(loopback_if_any(one), one);
    }
}
