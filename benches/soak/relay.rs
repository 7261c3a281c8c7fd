//! The relay under test: a real `jobgate relay` process (started by the harness), and its
//! figures from /proc and from its own `/metrics`.

use crate::Opts;
use anyhow::Result;
use jobgate_harness::process::{cpu_s, fd_count, proc_status_kib, thread_count};
use jobgate_harness::stack::{launch_relay, relay_command, RelayProc, TestEnv};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a `/metrics` scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resident memory of a process, in KiB (0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid as i32, "VmRSS:").unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> u64 {
    fd_count(pid as i32)
}

/// The relay process (killed on drop) and its metrics listener.
pub struct Relay {
    proc: RelayProc,
    /// Its HTTPS port.
    pub https: u16,
    /// Its QUIC port.
    pub quic: u16,
    /// Its metrics listener.
    metrics: SocketAddr,
}

impl Relay {
    fn pid(&self) -> u32 {
        self.proc.proc.pid() as u32
    }
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
    pub fn fds(&self) -> u64 {
        fds(self.pid())
    }
    pub fn threads(&self) -> u64 {
        thread_count(self.pid() as i32)
    }
    pub fn cpu_s(&self) -> f64 {
        cpu_s(self.pid() as i32)
    }

    /// The relay's own account of what it holds, from `/metrics` (empty if unreachable).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        scrape(self.metrics).unwrap_or_default()
    }
}

/// `GET /metrics`, parsed into series → value.
fn scrape(addr: SocketAddr) -> std::io::Result<BTreeMap<String, f64>> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
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

/// The relay's errors and panics are shown as they happen; the rest stays collected.
fn is_alarm(line: &str) -> bool {
    line.contains("ERROR") || line.contains("panicked")
}

/// Starts the relay with `env`'s certificate and tokens, limits lifted for one user's
/// many agents, and a metrics listener.
pub fn start_relay(env: &TestEnv, opts: &Opts) -> Result<Relay> {
    let mut command = relay_command(&[], &env.bin, env, 0, 0);
    command
        .args(["--resume-grace", &opts.grace.to_string()])
        .args(["--cores", &opts.relay_cores.to_string()])
        .args(["--listen-metrics", "127.0.0.1:0"])
        .args([
            "--max-sessions-per-user",
            &(2 * (opts.agents + opts.stable) + 64).to_string(),
        ])
        // Every churning agent is the same user: no per-user rate of new sessions.
        .args(["--max-new-sessions-per-user-per-minute", "0"])
        .env("RUST_LOG", "warn");
    let mut proc = launch_relay(command, Some(is_alarm))?;
    let metrics = proc.metrics_addr()?;
    Ok(Relay {
        https: proc.https_port,
        quic: proc.quic_port,
        proc,
        metrics,
    })
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
