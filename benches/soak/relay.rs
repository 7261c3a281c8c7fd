//! The relay under test: a real `jobgate relay` process, and its figures from /proc.

use crate::{Opts, DOMAIN};
use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// CPU time (user + system) of a process, in seconds.
pub fn cpu_s(pid: u32) -> f64 {
    // utime + stime, fields 14 and 15 of /proc/pid/stat, in clock ticks (100/s here).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
            Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// The relay process; killed on drop.
pub struct Relay {
    child: Child,
    /// Its HTTPS port.
    pub https: u16,
    /// Its QUIC port.
    pub quic: u16,
    /// Its metrics listener.
    metrics: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
    pub fn fds(&self) -> u64 {
        fds(self.pid())
    }
    pub fn threads(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count() as u64)
            .unwrap_or(0)
    }
    pub fn cpu_s(&self) -> f64 {
        cpu_s(self.pid())
    }

    /// The relay's own account of what it holds, from `/metrics` (empty if unreachable).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        scrape(self.metrics).unwrap_or_default()
    }
}

/// `GET /metrics`, parsed into series → value.
fn scrape(addr: SocketAddr) -> std::io::Result<BTreeMap<String, f64>> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// Starts the relay with the certificate and tokens in `dir`.
pub fn start_relay(bin: &Path, dir: &Path, opts: &Opts) -> Result<Relay> {
    let mut child = Command::new(bin)
        .args([
            "relay",
            "--domain",
            DOMAIN,
            "--listen-https",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--tokens")
        .arg(dir.join("tokens.toml"))
        .args(["--resume-grace", &opts.grace.to_string()])
        .args(["--listen-metrics", "127.0.0.1:0"])
        .args([
            "--max-sessions-per-user",
            &(2 * (opts.agents + opts.stable) + 64).to_string(),
        ])
        // Every churning agent is the same user: no per-user rate of new sessions.
        .args(["--max-new-sessions-per-user-per-minute", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the relay")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = 0;
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if sent < 2 && (line.contains("agents (QUIC/UDP) on") || line.contains("metrics on")) {
                let _ = tx.send(line.clone());
                sent += 1;
            } else if line.contains("ERROR") || line.contains("panicked") {
                eprintln!("  relay: {line}");
            }
        }
    });
    let wait = || {
        rx.recv_timeout(Duration::from_secs(20))
            .context("the relay did not start")
    };
    let (line, metrics_line) = (wait()?, wait()?);
    let metrics: SocketAddr = metrics_line
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("no metrics address in {metrics_line:?}"))?;
    let port_after = |marker: &str| -> Result<u16> {
        let rest = line
            .split(marker)
            .nth(1)
            .ok_or_else(|| anyhow!("no {marker:?} in {line:?}"))?;
        let addr = rest.split([',', ' ']).find(|s| !s.is_empty()).unwrap_or("");
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {line:?}"))
    };
    let https = port_after("HTTPS on ")?;
    let quic = port_after("agents (QUIC/UDP) on ")?;
    Ok(Relay {
        child,
        https,
        quic,
        metrics,
    })
}

/// A TLS client trusting only `ca`, offering `alpn`.
pub fn tls_connector(ca: &Path, alpn: &[&[u8]]) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// What the relay holds at one moment: from /proc, and from its own `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// Live sessions (mappings).
    pub live: u64,
    /// Parked names (agents gone, within the resume grace).
    pub parked: u64,
    /// Requests waiting for an answer.
    pub in_flight: u64,
    /// WebSockets being piped.
    pub upgraded: u64,
    /// Client connections open on the front door.
    pub client_connections: u64,
    /// Tasks alive in the relay's runtime.
    pub tasks: u64,
}

impl Figures {
    /// The figures as JSON, for target/bench/soak.json.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "rss_kib": self.rss_kib, "fds": self.fds, "threads": self.threads,
            "sessions_live": self.live, "sessions_parked": self.parked,
            "requests_in_flight": self.in_flight, "websockets": self.upgraded,
            "client_connections": self.client_connections, "runtime_tasks": self.tasks,
        })
    }
}

/// The relay's figures once quiet: the median of five samples a second apart.
pub async fn settled(relay: &Relay) -> Figures {
    let mut rss = Vec::new();
    let mut fds = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..5 {
        rss.push(relay.rss_kib());
        fds.push(relay.fds());
        threads.push(relay.threads());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rss.sort();
    fds.sort();
    threads.sort();
    let m = relay.metrics();
    // A series the relay did not report reads as u64::MAX, so no check passes on it.
    let get = |series: &str| m.get(series).map_or(u64::MAX, |v| *v as u64);
    Figures {
        rss_kib: rss[2],
        fds: fds[2],
        threads: threads[2],
        live: get("jobgate_sessions{state=\"live\"}"),
        parked: get("jobgate_sessions{state=\"parked\"}"),
        in_flight: get("jobgate_requests_in_flight"),
        upgraded: get("jobgate_upgraded_connections"),
        client_connections: get("jobgate_client_connections"),
        tasks: get("jobgate_runtime_tasks"),
    }
}
