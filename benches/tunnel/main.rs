//! The load harness: `cargo bench --bench tunnel` (issue 5, docs/performance.md).
//!
//! It starts the real `jobgate` binary as separate processes (relays, agents), a fast
//! local backend, and measures every scenario twice, **direct** (client → backend) and
//! **through jobgate** (client → relay HTTPS → QUIC → agent → backend), alternating the
//! variants within each repetition, and reports medians and ratios. It prints a table
//! and writes `target/bench/tunnel.json`.
//!
//! Backends: nginx (one worker) serves the static GETs (a 100 B file, a sparse 1 GiB
//! file); this bench binary re-executes itself as the harness's backend app
//! (`jobgate_harness::app`, `--jobgate-bench-backend ADDR`) for the upload sink, the
//! WebSocket echo/sink and the lifecycle app. Load tools: `wrk` (HTTP/1.1), `h2load`
//! (HTTP/2), `curl` (bulk), a Rust tokio-tungstenite client (WebSocket), the
//! `jobgate-agent` library (1,000 agents). Nothing is installed from here: a missing tool
//! skips the scenarios that need it with a note naming its package
//! (`benches/install-tools.sh` installs them all).
//!
//! One file per scenario: `latency.rs`, `rps.rs`, `bulk.rs` (with `ceiling.rs`, the quinn
//! ceiling), `ws.rs`, `scale.rs`, `lifecycle.rs`; `setup.rs` starts the processes,
//! `tools.rs` drives wrk/h2load/curl, `report.rs` keeps the numbers and prints them.
//!
//! Knobs (environment): `JOBGATE_BENCH_QUICK=1` (about a minute), `JOBGATE_BENCH_REPS`,
//! `JOBGATE_BENCH_SECS` (per load run), `JOBGATE_BENCH_BULK_MIB`, `JOBGATE_BENCH_AGENTS`,
//! `JOBGATE_BENCH_WEBSOCKETS`, `JOBGATE_BENCH_WORKERS` (e.g. `1,2`: runtimes to compare),
//! `JOBGATE_BENCH_ONLY` (comma list of latency,rps,bulk,ws,scale,lifecycle; positional
//! arguments after `--` work too), `JOBGATE_BENCH_WITHOUT` (e.g. `nginx,wrk`: behave as if
//! missing), `JOBGATE_BENCH_BIN` (benchmark another jobgate binary),
//! `JOBGATE_BENCH_COMPARE` (a second jobgate binary run side by side as variant `cmp-wN`,
//! and `cmp-tcp-wN` beside `tcp-wN`, for before/after numbers), `JOBGATE_BENCH_TCP=0`
//! (leave out variant `tcp-wN`: the same binary with its agents on the TCP transport,
//! measured beside QUIC), `JOBGATE_BENCH_HOP=0`
//! (leave out variant `hop-wN`: two relays sharing names through a real etcd, clients sent
//! to the relay without the agents, so every connection crosses the peer link — the extra
//! hop of a cluster; needs `etcd` on `$PATH` or `$JOBGATE_ETCD`), `JOBGATE_BENCH_CORES`
//! (e.g. `2,4`: also variants `cores2-wN`, `cores4-wN`, the relay with `--cores`: one
//! runtime per core; `cmp-coresN-wM` with `JOBGATE_BENCH_COMPARE`; the scale scenario's
//! relays then serve on the first entry's cores),
//! `JOBGATE_BENCH_JSON` (output path).

mod bulk;
mod ceiling;
mod latency;
mod lifecycle;
mod rathole;
mod report;
mod rps;
mod scale;
mod setup;
mod tools;
mod ws;

use anyhow::Result;
use report::{loadavg, machine_info, read_cpu_stat, Report};
use serde_json::json;
use setup::{CpuWatch, JobgateStack, Setup, StackKind};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tools::HttpVariant;

/// Chunk of streamed bodies and WebSocket bulk messages.
const CHUNK: usize = 64 * 1024;
/// 1 MB, as in "MB/s" (decimal, like curl and wrk).
const MB: f64 = 1e6;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(e) = jobgate_harness::app::main_if_requested(&args) {
        eprintln!("bench backend: {e}");
        std::process::exit(1);
    }
    fix_malloc_mmap_threshold();
    if let Err(e) = run(&args) {
        eprintln!("tunnel bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// glibc's threshold for serving an allocation with its own `mmap`.
const MMAP_THRESHOLD: &str = "131072";

/// Runs the bench again with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_`).
///
/// Each agent the scale scenario drives has its own quinn endpoint in this one process,
/// and each endpoint allocates a ~13 MB receive buffer (packets up to 6,500 bytes × GRO
/// segments × batch), zeroed and touched only as packets arrive. glibc raises its
/// threshold to the size of any mmapped block that is freed; after the first endpoints
/// are gone, every new buffer comes from the heap and `calloc` zeroes all 13 MB of it:
/// re-admitting 1,016 agents after a relay restart took 38–45 s of this process's CPU
/// and 14 GB of memory instead of 3.5 s. A fixed threshold keeps each buffer in fresh
/// zero pages. (A real agent has one endpoint at a time.)
fn fix_malloc_mmap_threshold() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
        .exec();
    eprintln!("could not re-run the bench with a fixed mmap threshold ({error}); going on");
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// What to run and how long: from the environment (see the top of this file).
#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub reps: usize,
    pub latency_secs: u64,
    pub load_secs: u64,
    pub bulk_bytes: u64,
    pub ws_rtt_samples: usize,
    pub ws_oneway_bytes: u64,
    pub agents: usize,
    pub websockets: usize,
    pub lifecycle_reps: usize,
    pub kill_idle_timeout: u64,
    pub workers: Vec<usize>,
    pub only: Option<Vec<String>>,
    /// Another jobgate binary to run side by side (`cmp-wN` variant): before/after numbers.
    pub compare: Option<PathBuf>,
    /// Also run variant `tcp-wN` (agents on the TCP transport).
    pub tcp: bool,
    /// Also run variant `hop-wN` (two relays through etcd; clients reach the one without
    /// the agents: the extra hop of a cluster).
    pub hop: bool,
    /// Also run a variant `coresN-wM` per entry: the relay with `--cores N` (one runtime
    /// per core), its main runtime and agents with `M` workers.
    pub cores: Vec<usize>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Opts {
    fn from_env(args: &[String]) -> Self {
        let quick = std::env::var("JOBGATE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let workers = std::env::var("JOBGATE_BENCH_WORKERS")
            .ok()
            .map(|v| {
                v.split(',')
                    .filter_map(|w| w.trim().parse().ok())
                    .filter(|w| *w >= 1)
                    .collect::<Vec<usize>>()
            })
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| if quick { vec![1] } else { vec![1, 2] });
        let mut only: Vec<String> = std::env::var("JOBGATE_BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        // `cargo bench --bench tunnel -- bulk ws`: cargo adds `--bench`.
        only.extend(args.iter().skip(1).filter(|a| !a.starts_with('-')).cloned());
        Self {
            quick,
            reps: env_or("JOBGATE_BENCH_REPS", if quick { 1 } else { 3 }),
            latency_secs: env_or("JOBGATE_BENCH_SECS", if quick { 1 } else { 2 }),
            load_secs: env_or("JOBGATE_BENCH_SECS", if quick { 2 } else { 3 }),
            bulk_bytes: env_or("JOBGATE_BENCH_BULK_MIB", if quick { 256u64 } else { 1024 })
                * 1024
                * 1024,
            ws_rtt_samples: if quick { 500 } else { 2000 },
            ws_oneway_bytes: env_or("JOBGATE_BENCH_WS_MIB", if quick { 64u64 } else { 256 })
                * 1024
                * 1024,
            agents: env_or("JOBGATE_BENCH_AGENTS", if quick { 100 } else { 1000 }),
            websockets: env_or(
                "JOBGATE_BENCH_WEBSOCKETS",
                if quick { 1000 } else { 10_000 },
            ),
            lifecycle_reps: if quick { 1 } else { 3 },
            kill_idle_timeout: if quick { 3 } else { 5 },
            workers,
            only: (!only.is_empty()).then_some(only),
            compare: std::env::var_os("JOBGATE_BENCH_COMPARE").map(PathBuf::from),
            tcp: std::env::var("JOBGATE_BENCH_TCP").map_or(true, |v| v != "0"),
            hop: std::env::var("JOBGATE_BENCH_HOP").map_or(true, |v| v != "0"),
            cores: std::env::var("JOBGATE_BENCH_CORES")
                .unwrap_or_default()
                .split(',')
                .filter_map(|n| n.trim().parse().ok())
                .filter(|n| *n > 1)
                .collect(),
        }
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == scenario))
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// The servers every variant reaches: the backend app, nginx if installed, and one
/// relay + agents per jobgate variant.
struct Servers {
    backend: jobgate_harness::Proc,
    backend_port: u16,
    nginx: Option<setup::Nginx>,
    /// rathole with its TLS transport in front of nginx (variant `rathole-tls`).
    rathole: Option<rathole::Rathole>,
    /// Why a variant is missing, for the report.
    notes: Vec<String>,
    stacks: Vec<JobgateStack>,
}

impl Servers {
    fn start(opts: &Opts, tools: &setup::Tools, setup: &Setup) -> Result<Self> {
        let (backend, backend_port) = setup::start_backend(setup)?;
        let nginx = match &tools.nginx {
            Some(path) => Some(setup::start_nginx(setup, path)?),
            None => None,
        };
        let mut notes = Vec::new();
        // Outside every timed part: built once, then started.
        let rathole = match (&nginx, rathole::find_or_build()) {
            (Some(n), Ok(bin)) => match rathole::start(setup, &bin, (n.h1, n.h2c)) {
                Ok(r) => Some(r),
                Err(e) => {
                    notes.push(format!("rathole-tls: did not start: {e}"));
                    None
                }
            },
            (None, _) => {
                notes.push("rathole-tls: needs nginx as its backend".into());
                None
            }
            (_, Err(why)) => {
                notes.push(why);
                None
            }
        };
        let static_port = nginx.as_ref().map_or(backend_port, |n| n.h1);
        let mut builds: Vec<(String, PathBuf, usize, StackKind)> = opts
            .workers
            .iter()
            .map(|&w| {
                (
                    setup::variant_name(w),
                    setup.bin.clone(),
                    w,
                    StackKind::Quic,
                )
            })
            .collect();
        if let Some(other) = &opts.compare {
            builds.push((
                format!("cmp-w{}", opts.workers[0]),
                other.clone(),
                opts.workers[0],
                StackKind::Quic,
            ));
        }
        if opts.tcp {
            builds.push((
                setup::tcp_variant_name(opts.workers[0]),
                setup.bin.clone(),
                opts.workers[0],
                StackKind::Tcp,
            ));
            if let Some(other) = &opts.compare {
                builds.push((
                    format!("cmp-{}", setup::tcp_variant_name(opts.workers[0])),
                    other.clone(),
                    opts.workers[0],
                    StackKind::Tcp,
                ));
            }
        }
        for &cores in &opts.cores {
            let name = format!("cores{cores}-w{}", opts.workers[0]);
            if let Some(other) = &opts.compare {
                builds.push((
                    format!("cmp-{name}"),
                    other.clone(),
                    opts.workers[0],
                    StackKind::Cores(cores),
                ));
            }
            builds.push((
                name,
                setup.bin.clone(),
                opts.workers[0],
                StackKind::Cores(cores),
            ));
        }
        let etcd_found = std::env::var_os("JOBGATE_ETCD").is_some()
            || jobgate_harness::process::which("etcd").is_some();
        if opts.hop && !etcd_found {
            notes.push("hop-w1: needs etcd (Debian's etcd-server)".into());
        }
        if opts.hop && etcd_found {
            builds.push((
                format!("hop-w{}", opts.workers[0]),
                setup.bin.clone(),
                opts.workers[0],
                StackKind::Hop,
            ));
        }
        let stacks = builds
            .into_iter()
            .map(|(name, bin, workers, kind)| {
                JobgateStack::start(
                    setup,
                    name,
                    &bin,
                    workers,
                    (static_port, backend_port),
                    kind,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            backend,
            backend_port,
            nginx,
            rathole,
            notes,
            stacks,
        })
    }

    /// Who serves the static GETs and downloads: nginx, or the backend app without it.
    fn static_server(&self) -> (&'static str, u16, i32) {
        match &self.nginx {
            Some(n) => ("nginx", n.h1, n.proc.pid()),
            None => ("backend", self.backend_port, self.backend.pid()),
        }
    }

    /// Variants for the static GETs and downloads.
    fn http_variants(&self) -> Vec<HttpVariant> {
        let (static_name, static_port, static_pid) = self.static_server();
        let h2c_port = self.nginx.as_ref().map_or(self.backend_port, |n| n.h2c);
        let mut variants = vec![HttpVariant {
            name: "direct".into(),
            h1_base: format!("http://127.0.0.1:{static_port}"),
            h2_base: format!("http://127.0.0.1:{h2c_port}"),
            session: None,
            https_port: None,
            cpu: CpuWatch {
                pids: vec![(static_name.into(), static_pid)],
            },
        }];
        if let Some(n) = &self.nginx {
            variants.push(HttpVariant {
                name: "direct-tls".into(),
                h1_base: format!("https://127.0.0.1:{}", n.tls),
                h2_base: format!("https://127.0.0.1:{}", n.tls),
                session: None,
                https_port: None,
                cpu: CpuWatch {
                    pids: vec![("nginx".into(), n.proc.pid())],
                },
            });
        }
        if let Some(r) = &self.rathole {
            variants.push(HttpVariant {
                name: rathole::VARIANT.into(),
                h1_base: format!("http://127.0.0.1:{}", r.h1),
                h2_base: format!("http://127.0.0.1:{}", r.h2c),
                session: None,
                https_port: None,
                cpu: CpuWatch {
                    pids: vec![
                        ("rathole-server".into(), r.server.pid()),
                        ("rathole-client".into(), r.client.pid()),
                        (static_name.into(), static_pid),
                    ],
                },
            });
        }
        variants.extend(self.stacks.iter().map(|s| {
            relay_variant(
                s,
                &s.static_agent,
                &s.static_session,
                (static_name, static_pid),
            )
        }));
        // The primary stack once more through its plain-HTTP front door (`http-wN`).
        if let Some(s) = self.stacks.first() {
            let mut plain = relay_variant(
                s,
                &s.static_agent,
                &s.static_session,
                (static_name, static_pid),
            );
            plain.name = s.name.replacen("jobgate-", "http-", 1);
            plain.h1_base = format!("http://127.0.0.1:{}", s.http_port);
            plain.h2_base = plain.h1_base.clone();
            plain.https_port = None;
            variants.push(plain);
        }
        variants
    }

    /// Variants for uploads (the sink is the backend app).
    fn upload_variants(&self) -> Vec<HttpVariant> {
        let backend = ("backend", self.backend.pid());
        std::iter::once(HttpVariant {
            name: "direct".into(),
            h1_base: format!("http://127.0.0.1:{}", self.backend_port),
            h2_base: format!("http://127.0.0.1:{}", self.backend_port),
            session: None,
            https_port: None,
            cpu: CpuWatch {
                pids: vec![(backend.0.into(), backend.1)],
            },
        })
        .chain(
            self.stacks
                .iter()
                .map(|s| relay_variant(s, &s.app_agent, &s.app_session, backend)),
        )
        .collect()
    }
}

/// A jobgate variant: through `stack`'s relay to `agent`, which forwards to `server`.
fn relay_variant(
    stack: &JobgateStack,
    agent: &jobgate_harness::AgentProc,
    session: &jobgate_harness::stack::Session,
    server: (&str, i32),
) -> HttpVariant {
    // A cluster's clients reach the relay without the agents (`hop-wN`).
    let entry = stack.front.as_ref().unwrap_or(&stack.relay);
    let base = format!("https://127.0.0.1:{}", entry.https_port);
    let mut pids = vec![
        ("relay".into(), stack.relay.proc.pid()),
        ("agent".into(), agent.proc.pid()),
        (server.0.into(), server.1),
    ];
    if let Some(front) = &stack.front {
        pids.insert(0, ("front relay".into(), front.proc.pid()));
    }
    HttpVariant {
        name: stack.name.clone(),
        h1_base: base.clone(),
        h2_base: base,
        session: Some(session.clone()),
        https_port: Some(entry.https_port),
        cpu: CpuWatch { pids },
    }
}

fn run(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let opts = Opts::from_env(args);
    let nofile = jobgate_harness::process::raise_nofile().unwrap_or(0);
    let tools = setup::Tools::find();
    let setup = Setup::new(&opts)?;
    let machine = machine_info();
    let stat_before = read_cpu_stat();
    eprintln!(
        "[setup] {} ({}), {} reps, workers {:?}, RLIMIT_NOFILE {nofile}",
        setup.bin.display(),
        if opts.quick { "quick" } else { "full" },
        opts.reps,
        opts.workers
    );
    let mut servers = Servers::start(&opts, &tools, &setup)?;
    let (static_name, _, _) = servers.static_server();
    let http_variants = servers.http_variants();
    let mut variants: Vec<String> = http_variants.iter().map(|v| v.name.clone()).collect();
    variants.push("ceiling".into());
    let mut report = Report {
        metrics: Vec::new(),
        primary: setup::variant_name(opts.workers[0]),
        variants,
        skipped: std::mem::take(&mut servers.notes),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    run_scenarios(&opts, &tools, &setup, &mut servers, &runtime, &mut report)?;
    drop(servers);

    let stat_after = read_cpu_stat();
    let steal = stat_before
        .zip(stat_after)
        .map(|(before, after)| before.percent(after, |t| t.steal));
    report.print_table();
    println!(
        "\nprimary variant: {} (targets are checked against it); direct = client → backend \
         without TLS; direct-tls = nginx with the relay's certificate; ceiling = one quinn \
         connection, one stream, jobgate's transport tuning, in this process.",
        report.primary
    );
    println!(
        "machine: {} × {}, load average at the end {}, CPU steal during the run {}; total {:.0} s",
        machine["cpus"],
        machine["model"].as_str().unwrap_or("?"),
        loadavg(),
        steal.map_or("?".into(), |s| format!("{s:.1}%")),
        started.elapsed().as_secs_f64()
    );

    let json_path = report::json_path();
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = report.to_json();
    out["machine"] = machine;
    out["machine"]["cpu_steal_percent"] = json!(steal);
    out["machine"]["loadavg_end"] = json!(loadavg());
    out["tools"] = json!(tools.versions);
    out["jobgate_binary"] = json!(setup.bin.display().to_string());
    out["compare_binary"] = json!(opts.compare.as_ref().map(|p| p.display().to_string()));
    out["options"] = json!({
        "quick": opts.quick, "reps": opts.reps, "latency_secs": opts.latency_secs,
        "load_secs": opts.load_secs, "bulk_bytes": opts.bulk_bytes,
        "ws_rtt_samples": opts.ws_rtt_samples, "ws_oneway_bytes": opts.ws_oneway_bytes,
        "agents": opts.agents, "websockets": opts.websockets, "workers": opts.workers,
        "lifecycle_reps": opts.lifecycle_reps, "kill_idle_timeout_s": opts.kill_idle_timeout,
        "backend_static": static_name, "access_mode": "link (cookie)",
    });
    out["unix_time"] = json!(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0));
    out["total_seconds"] = json!(started.elapsed().as_secs_f64());
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)?;
    println!("wrote {}", json_path.display());
    Ok(())
}

/// Runs the scenarios `opts` wants, in order.
fn run_scenarios(
    opts: &Opts,
    tools: &setup::Tools,
    setup: &Setup,
    servers: &mut Servers,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
) -> Result<()> {
    let http_variants = servers.http_variants();
    if opts.wants("latency") {
        latency::scenario_latency(opts, tools, setup, &http_variants, report);
    }
    if opts.wants("rps") {
        rps::scenario_rps(opts, tools, setup, &http_variants, report);
    }
    if opts.wants("bulk") {
        let download_path = if servers.nginx.is_some() {
            "/big".to_owned()
        } else {
            format!("/bytes?n={}", opts.bulk_bytes)
        };
        bulk::scenario_bulk(
            opts,
            tools,
            setup,
            &http_variants,
            &servers.upload_variants(),
            &download_path,
            report,
        );
        bulk::record_relay_peaks(&servers.stacks, report);
    }
    if opts.wants("ws") {
        let ws_variants = ws::variants(
            setup,
            servers.backend_port,
            &servers.stacks,
            &servers.upload_variants(),
        )?;
        ws::scenario_ws(opts, runtime, &ws_variants, report);
    }
    // Scale and lifecycle start relays of their own: the shared stacks go first.
    servers.stacks.clear();
    if opts.wants("scale") {
        scale::scenario_scale(opts, setup, runtime, report);
    }
    if opts.wants("lifecycle") {
        lifecycle::scenario_lifecycle(opts, setup, runtime, servers.backend_port, report);
    }
    Ok(())
}
