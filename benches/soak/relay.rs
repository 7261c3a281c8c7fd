//! The relay under test: a real `jobgate relay` process, and its figures from /proc.

use crate::{Opts, DOMAIN};
use anyhow::{anyhow, Context, Result};
use std::io::{BufRead, BufReader};
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
        .args([
            "--max-sessions-per-user",
            &(2 * (opts.agents + opts.stable) + 64).to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the relay")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if !sent && line.contains("agents (QUIC/UDP) on") {
                let _ = tx.send(line.clone());
                sent = true;
            } else if sent && (line.contains("ERROR") || line.contains("panicked")) {
                eprintln!("  relay: {line}");
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .context("the relay did not start")?;
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
    Ok(Relay { child, https, quic })
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

#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
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
    Figures {
        rss_kib: rss[2],
        fds: fds[2],
        threads: threads[2],
    }
}
