//! Setup: the scratch PKI and payloads, the load tools found on this machine, nginx,
//! the backend app, and one relay + agents per jobgate variant.

use crate::Opts;
use anyhow::{Context, Result};
use jobgate_harness::app::{APP_FLAG, LISTENING, SMALL};
use jobgate_harness::process::{cpu_ns, free_port, wait_tcp, which, Proc};
use jobgate_harness::stack::{
    agent_command_for, launch_agent, launch_relay, relay_command, AgentProc, RelayProc, Session,
    TestEnv,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long nginx and the backend have to start listening.
const SERVER_START: Duration = Duration::from_secs(10);

/// CPU counters of the server-side processes of one variant.
#[derive(Clone, Default)]
pub struct CpuWatch {
    pub pids: Vec<(String, i32)>,
}

impl CpuWatch {
    pub fn snapshot(&self) -> Vec<u64> {
        self.pids.iter().map(|(_, p)| cpu_ns(*p)).collect()
    }

    /// Per process CPU µs between `before` and now, divided by `per`.
    pub fn per_unit(&self, before: &[u64], per: f64) -> BTreeMap<String, f64> {
        let after = self.snapshot();
        self.pids
            .iter()
            .zip(before.iter().zip(after))
            .map(|((name, _), (b, a))| (name.clone(), a.saturating_sub(*b) as f64 / 1e3 / per))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------

/// The external programs the scenarios drive; `None` = not installed (or switched off).
pub struct Tools {
    pub wrk: Option<PathBuf>,
    pub h2load: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub curl: Option<PathBuf>,
    pub versions: BTreeMap<String, String>,
}

/// Each tool, the package that has it (Debian/Ubuntu), and how it reports its version.
const TOOLS: [(&str, &str, &str); 4] = [
    ("wrk", "wrk", "-v"),
    ("h2load", "nghttp2-client", "--version"),
    ("nginx", "nginx-light", "-v"),
    ("curl", "curl", "--version"),
];

fn first_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

impl Tools {
    /// Looks the tools up on `$PATH`; `JOBGATE_BENCH_WITHOUT=nginx,wrk` acts as if those
    /// were missing. Installs nothing: names the packages of the missing ones.
    pub fn find() -> Self {
        let without = std::env::var("JOBGATE_BENCH_WITHOUT").unwrap_or_default();
        let mut found = BTreeMap::new();
        let mut versions = BTreeMap::new();
        let mut missing = Vec::new();
        for (tool, package, version_flag) in TOOLS {
            if without.split(',').any(|w| w.trim() == tool) {
                continue;
            }
            match which(tool) {
                Some(path) => {
                    versions.insert(tool.to_owned(), first_line(&path, &[version_flag]));
                    found.insert(tool, path);
                }
                None => missing.push(format!("{tool} (package {package})")),
            }
        }
        if !missing.is_empty() {
            eprintln!(
                "[setup] not installed: {}; the scenarios needing them are skipped \
                 (benches/install-tools.sh installs them)",
                missing.join(", ")
            );
        }
        Self {
            wrk: found.remove("wrk"),
            h2load: found.remove("h2load"),
            nginx: found.remove("nginx"),
            curl: found.remove("curl"),
            versions,
        }
    }
}

/// Why a scenario is skipped for want of `tool`: names the package to install.
pub fn missing(what: &str, tool: &str) -> String {
    let package = TOOLS
        .iter()
        .find(|(t, _, _)| *t == tool)
        .map_or(tool, |(_, p, _)| p);
    format!("{what}: {tool} is not installed (apt-get install {package})")
}

// ---------------------------------------------------------------------------------------
// Scratch directory
// ---------------------------------------------------------------------------------------

/// Scratch directory (PKI, token, payload files; removed on drop) and the binaries.
pub struct Setup {
    pub env: TestEnv,
    /// The jobgate binary measured.
    pub bin: PathBuf,
    /// This bench binary (re-executed as the backend app).
    pub exe: PathBuf,
    pub token_file: PathBuf,
    pub token: String,
    pub www: PathBuf,
    /// The bulk payload (sparse), and a quarter of it for the HTTP/2 rows.
    pub big: PathBuf,
    pub quarter: PathBuf,
    pub wrk_script: PathBuf,
}

impl Setup {
    pub fn new(opts: &Opts) -> Result<Self> {
        let bin = std::env::var_os("JOBGATE_BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_jobgate")));
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let env = TestEnv::create(&bin, "jobgate-bench")?;
        let (token, token_file) = env.issue_token("bench")?;
        let dir = &env.dir;
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("small"), [b'x'; SMALL])?;
        let big = sparse_file(&www.join("big"), opts.bulk_bytes)?;
        let quarter = sparse_file(&www.join("quarter"), opts.bulk_bytes / 4)?;
        let wrk_script = dir.join("report.lua");
        std::fs::write(&wrk_script, WRK_SCRIPT)?;
        Ok(Self {
            token_file,
            token,
            www,
            big,
            quarter,
            wrk_script,
            bin,
            exe,
            env,
        })
    }

    pub fn client_tls(&self, alpn: &[&[u8]]) -> Result<std::sync::Arc<rustls::ClientConfig>> {
        Ok(jobgate_harness::client::client_tls(&self.env.ca, alpn)?)
    }

    /// A relay of `bin` with `workers` runtime threads and `extra` flags.
    pub fn start_relay_of(&self, bin: &Path, workers: usize, extra: &[&str]) -> Result<RelayProc> {
        self.relay_on_ports(bin, workers, extra, 0, 0)
    }

    /// The measured binary's relay on given ports (a restart where the old one was).
    pub fn start_relay_at(
        &self,
        workers: usize,
        extra: &[&str],
        https_port: u16,
        quic_port: u16,
    ) -> Result<RelayProc> {
        self.relay_on_ports(&self.bin, workers, extra, https_port, quic_port)
    }

    /// Ports 0 pick free ones.
    fn relay_on_ports(
        &self,
        bin: &Path,
        workers: usize,
        extra: &[&str],
        https_port: u16,
        quic_port: u16,
    ) -> Result<RelayProc> {
        let mut command = relay_command(&[], bin, &self.env, https_port, quic_port);
        command
            .arg("--workers")
            .arg(workers.to_string())
            .args(extra);
        Ok(launch_relay(command, None)?)
    }

    /// A relay of the measured binary.
    pub fn start_relay(&self, workers: usize, extra: &[&str]) -> Result<RelayProc> {
        self.start_relay_of(&self.bin, workers, extra)
    }

    /// `bin agent` for `relay` with `workers` threads; add `--to` or `-- app`.
    pub fn agent_command_of(&self, bin: &Path, relay: &RelayProc, workers: usize) -> Command {
        let mut command = agent_command_for(bin, &self.env, relay, &self.token_file);
        command
            .arg("--workers")
            .arg(workers.to_string())
            .env("RUST_LOG", "warn");
        command
    }

    /// The measured binary's agent command.
    pub fn agent_command(&self, relay: &RelayProc, workers: usize) -> Command {
        self.agent_command_of(&self.bin, relay, workers)
    }
}

/// A sparse file of `len` bytes, read once so every variant finds it in the page cache
/// (reads are zeros from memory: no disk I/O, no setup time).
fn sparse_file(path: &Path, len: u64) -> Result<PathBuf> {
    std::fs::File::create(path)?.set_len(len)?;
    std::io::copy(&mut std::fs::File::open(path)?, &mut std::io::sink())?;
    Ok(path.to_owned())
}

/// wrk's summary as one JSON line (latencies in µs).
pub const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p99\":%d,\"mean\":%f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"#;

/// nginx serving the payload files: HTTP/1.1, cleartext HTTP/2 and TLS (h1 + h2).
pub struct Nginx {
    pub proc: Proc,
    pub h1: u16,
    pub h2c: u16,
    pub tls: u16,
}

pub fn start_nginx(setup: &Setup, nginx: &Path) -> Result<Nginx> {
    let (h1, h2c, tls) = (free_port()?, free_port()?, free_port()?);
    let d = setup.env.dir.display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/nginx-error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 65536; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  default_type application/octet-stream;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fastcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{tls} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    root {www};
  }}
  server {{
    listen 127.0.0.1:{h2c} http2;
    root {www};
  }}
}}
"#,
        cert = setup.env.cert.display(),
        key = setup.env.key.display(),
        www = setup.www.display(),
    );
    let path = setup.env.dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(&setup.env.dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(setup.env.dir.join("nginx-error.log"));
    let proc = Proc::start("nginx", command)?;
    wait_tcp(h1, SERVER_START).context("nginx did not start")?;
    Ok(Nginx { proc, h1, h2c, tls })
}

/// This bench binary as the backend app on a fresh port.
pub fn start_backend(setup: &Setup) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let mut command = Command::new(&setup.exe);
    command.arg(APP_FLAG).arg(format!("127.0.0.1:{port}"));
    let mut proc = Proc::start("backend", command)?;
    proc.wait_line(LISTENING, SERVER_START)?;
    Ok((proc, port))
}

// ---------------------------------------------------------------------------------------
// jobgate stacks
// ---------------------------------------------------------------------------------------

/// The relay + agents serving one jobgate variant.
pub struct JobgateStack {
    /// Variant name: `jobgate-wN`, or `cmp-wN` for the comparison binary.
    pub name: String,
    pub relay: RelayProc,
    /// Agent forwarding to the static backend (nginx, or the bench backend without it).
    pub static_agent: AgentProc,
    pub static_session: Session,
    /// Agent forwarding to the bench backend (upload, WebSocket).
    pub app_agent: AgentProc,
    pub app_session: Session,
    /// The relay's plain-HTTP front door (`--listen-http`, as behind a TLS-terminating
    /// balancer): the same crypto work as an L4 tunnel with TLS between its ends.
    pub http_port: u16,
    /// `hop-wN`: a second relay of the same cluster, which clients reach; it forwards
    /// every connection over the peer link to `relay`, which holds the sessions.
    pub front: Option<RelayProc>,
    /// The etcd of a `hop-wN` cluster (kept running as long as the stack).
    pub _etcd: Option<jobgate_harness::etcd::Etcd>,
}

/// How a jobgate variant's agents and clients reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// Agents over QUIC, clients to the relay holding the sessions.
    Quic,
    /// Agents over the TCP transport.
    Tcp,
    /// Two relays sharing names through etcd; clients go to the one without the agents.
    Hop,
    /// Agents over QUIC, the relay on this many cores (`--cores`).
    Cores(usize),
}

/// The flags that make relay `node` of the cluster on `etcd` (the bench's dev PKI for the
/// peer link).
fn cluster_args(setup: &Setup, etcd: &jobgate_harness::etcd::Etcd, node: &str) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    [
        "--cluster-etcd",
        &etcd.url,
        "--node-id",
        node,
        "--peer-listen",
        "127.0.0.1:0",
        "--peer-advertise",
        "127.0.0.1:0",
        "--peer-ca",
        &path(&setup.env.ca),
        "--peer-cert",
        &path(&setup.env.cert),
        "--peer-key",
        &path(&setup.env.key),
    ]
    .map(str::to_owned)
    .to_vec()
}

impl JobgateStack {
    /// A relay of `bin` and its two agents, to `static_port` and to `backend_port`; with
    /// `tcp`, the agents use the TCP transport (TLS to the relay's HTTPS port, yamux)
    /// instead of QUIC.
    pub fn start(
        setup: &Setup,
        name: String,
        bin: &Path,
        workers: usize,
        (static_port, backend_port): (u16, u16),
        kind: StackKind,
    ) -> Result<Self> {
        let http_port = free_port()?;
        let listen_http = format!("127.0.0.1:{http_port}");
        let etcd = match kind {
            StackKind::Hop => Some(jobgate_harness::etcd::Etcd::start()?),
            _ => None,
        };
        let mut relay_args = vec!["--listen-http".to_owned(), listen_http];
        if let StackKind::Cores(cores) = kind {
            relay_args.extend(["--cores".to_owned(), cores.to_string()]);
        }
        if let Some(etcd) = &etcd {
            relay_args.extend(cluster_args(setup, etcd, "holder"));
        }
        let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
        let relay = setup.start_relay_of(bin, workers, &relay_args)?;
        let agent_to = |port: u16| -> Result<AgentProc> {
            let mut command = setup.agent_command_of(bin, &relay, workers);
            if kind == StackKind::Tcp {
                use_tcp_transport(&mut command, &relay);
            }
            command.arg("--to").arg(format!("127.0.0.1:{port}"));
            Ok(launch_agent(command)?)
        };
        let static_agent = agent_to(static_port)?;
        let app_agent = agent_to(backend_port)?;
        let front = match &etcd {
            Some(etcd) => {
                let args = cluster_args(setup, etcd, "front");
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Some(setup.start_relay_of(bin, workers, &args)?)
            }
            None => None,
        };
        Ok(Self {
            name,
            static_session: static_agent.session()?,
            app_session: app_agent.session()?,
            relay,
            static_agent,
            app_agent,
            http_port,
            front,
            _etcd: etcd,
        })
    }
}

pub fn variant_name(workers: usize) -> String {
    format!("jobgate-w{workers}")
}

/// The variant whose agents use the TCP transport.
pub fn tcp_variant_name(workers: usize) -> String {
    format!("tcp-w{workers}")
}

/// Puts an agent command on the TCP transport (TLS to the relay's HTTPS port, yamux).
pub fn use_tcp_transport(command: &mut Command, relay: &RelayProc) {
    command
        .args(["--transport", "tcp", "--relay-tcp"])
        .arg(format!("127.0.0.1:{}", relay.https_port));
}
