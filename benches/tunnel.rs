//! The load harness: `cargo bench --bench tunnel` (issue 5, docs/performance.md).
//!
//! It starts the real `jobgate` binary as separate processes (relays, agents), a fast
//! local backend, and measures every scenario twice, **direct** (client → backend) and
//! **through jobgate** (client → relay HTTPS → QUIC → agent → backend), alternating the
//! variants within each repetition, and reports medians and ratios. It prints a table
//! and writes `target/bench/tunnel.json`.
//!
//! Backends: nginx from Debian (one worker) serves the static GETs (a 100 B file, a
//! sparse 1 GiB file); this bench binary re-executes itself as a small hyper server
//! (`--jobgate-bench-backend ADDR`) for the upload sink, the WebSocket echo/sink and the
//! lifecycle app. Load tools: `wrk` (HTTP/1.1), `h2load` (HTTP/2), `curl` (bulk), a Rust
//! tokio-tungstenite client (WebSocket), the `jobgate-agent` library (1,000 agents).
//! Missing tools are installed with apt-get when running as root (set
//! `JOBGATE_BENCH_NO_INSTALL=1` to forbid), otherwise the scenario is skipped with a note.
//!
//! Knobs (environment): `JOBGATE_BENCH_QUICK=1` (about a minute), `JOBGATE_BENCH_REPS`,
//! `JOBGATE_BENCH_SECS` (per load run), `JOBGATE_BENCH_BULK_MIB`, `JOBGATE_BENCH_AGENTS`,
//! `JOBGATE_BENCH_WEBSOCKETS`, `JOBGATE_BENCH_WORKERS` (e.g. `1,2`: runtimes to compare),
//! `JOBGATE_BENCH_ONLY` (comma list of latency,rps,bulk,ws,scale,lifecycle; positional
//! arguments after `--` work too), `JOBGATE_BENCH_WITHOUT` (e.g. `nginx,wrk`: behave as if
//! missing), `JOBGATE_BENCH_BIN` (benchmark another jobgate binary),
//! `JOBGATE_BENCH_COMPARE` (a second jobgate binary run side by side as variant `cmp-wN`,
//! for before/after numbers), `JOBGATE_BENCH_JSON` (output path).

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The relays' domain; nothing resolves it: clients connect to 127.0.0.1 and send the
/// session host as `Host`/`:authority` (and SNI where the client allows it).
const DOMAIN: &str = "jobgate.test";
/// Argument that turns this binary into the backend server.
const BACKEND_FLAG: &str = "--jobgate-bench-backend";
/// Size of the small GET body.
const SMALL: usize = 100;
/// Chunk of streamed bodies and WebSocket bulk messages.
const CHUNK: usize = 64 * 1024;
/// Payload of a WebSocket round trip.
const WS_RTT_BYTES: usize = 100;
/// Round trips thrown away before measuring.
const WS_WARMUP: usize = 200;
/// 1 MB, as in "MB/s" (decimal, like curl and wrk).
const MB: f64 = 1e6;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == BACKEND_FLAG) {
        if let Err(e) = backend_main(&args) {
            eprintln!("bench backend: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("tunnel bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    reps: usize,
    latency_secs: u64,
    load_secs: u64,
    bulk_bytes: u64,
    ws_rtt_samples: usize,
    ws_oneway_bytes: u64,
    agents: usize,
    websockets: usize,
    lifecycle_reps: usize,
    kill_idle_timeout: u64,
    workers: Vec<usize>,
    only: Option<Vec<String>>,
    install: bool,
    /// Another jobgate binary to run side by side (`cmp-wN` variant): before/after numbers.
    compare: Option<PathBuf>,
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
            ws_oneway_bytes: if quick { 64 << 20 } else { 256 << 20 },
            agents: env_or("JOBGATE_BENCH_AGENTS", if quick { 100 } else { 1000 }),
            websockets: env_or(
                "JOBGATE_BENCH_WEBSOCKETS",
                if quick { 1000 } else { 10_000 },
            ),
            lifecycle_reps: if quick { 1 } else { 3 },
            kill_idle_timeout: if quick { 3 } else { 5 },
            workers,
            only: (!only.is_empty()).then_some(only),
            install: std::env::var("JOBGATE_BENCH_NO_INSTALL").is_err(),
            compare: std::env::var_os("JOBGATE_BENCH_COMPARE").map(PathBuf::from),
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == scenario))
    }
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// A target from issue 5, checked against the primary jobgate variant.
#[derive(Debug, Clone)]
enum Target {
    /// median ≥ value
    Min(f64),
    /// median ≤ value
    Max(f64),
    /// median − direct median ≤ value
    AddedMax(f64),
    /// median / direct median ≥ value
    RatioMin(f64),
    /// median ≥ fraction × the median of another metric's only variant
    FractionOf(&'static str, f64),
}

#[derive(Debug, Default)]
struct Metric {
    id: String,
    scenario: String,
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    samples: BTreeMap<String, Vec<f64>>,
    targets: Vec<Target>,
    notes: Vec<String>,
    errors: Vec<String>,
    detail: serde_json::Map<String, Value>,
}

struct Report {
    metrics: Vec<Metric>,
    /// Variant column order.
    variants: Vec<String>,
    /// The jobgate variant the targets are checked against.
    primary: String,
    skipped: Vec<String>,
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Nearest-rank percentile of unsorted samples.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl Report {
    fn metric(
        &mut self,
        id: &str,
        scenario: &str,
        name: &str,
        unit: &'static str,
        higher_is_better: bool,
    ) -> &mut Metric {
        if let Some(i) = self.metrics.iter().position(|m| m.id == id) {
            return &mut self.metrics[i];
        }
        self.metrics.push(Metric {
            id: id.to_owned(),
            scenario: scenario.to_owned(),
            name: name.to_owned(),
            unit,
            higher_is_better,
            ..Default::default()
        });
        let last = self.metrics.len() - 1;
        &mut self.metrics[last]
    }

    fn get(&self, id: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.id == id)
    }

    fn med(&self, m: &Metric, variant: &str) -> Option<f64> {
        m.samples.get(variant).and_then(|s| median(s))
    }

    fn ratio(&self, m: &Metric) -> Option<f64> {
        let d = self.med(m, "direct")?;
        let j = self.med(m, &self.primary)?;
        (d != 0.0).then_some(j / d)
    }

    /// (target text, met?) for each target of `m`.
    fn verdicts(&self, m: &Metric) -> Vec<(String, Option<bool>)> {
        let primary = self.med(m, &self.primary);
        let direct = self.med(m, "direct");
        m.targets
            .iter()
            .map(|t| match t {
                Target::Min(v) => (
                    format!("≥ {} {}", fmt_num(*v, m.unit), m.unit),
                    primary.map(|p| p >= *v),
                ),
                Target::Max(v) => (
                    format!("≤ {} {}", fmt_num(*v, m.unit), m.unit),
                    primary.map(|p| p <= *v),
                ),
                Target::AddedMax(v) => {
                    let added = primary.zip(direct).map(|(p, d)| p - d);
                    (
                        format!(
                            "added ≤ {} {} (is {})",
                            fmt_num(*v, m.unit),
                            m.unit,
                            added.map_or("?".into(), |a| format!("{a:+.0}"))
                        ),
                        added.map(|a| a <= *v),
                    )
                }
                Target::RatioMin(v) => (format!("≥ {v}× direct"), self.ratio(m).map(|r| r >= *v)),
                Target::FractionOf(other, f) => {
                    let ceiling = self
                        .get(other)
                        .and_then(|o| o.samples.values().next())
                        .and_then(|s| median(s));
                    (
                        format!(
                            "≥ {f}× quinn ceiling ({})",
                            ceiling.map_or("?".into(), |c| format!("≥ {:.0}", c * f))
                        ),
                        primary.zip(ceiling).map(|(p, c)| p >= c * f),
                    )
                }
            })
            .collect()
    }

    fn print_table(&self) {
        let mut header = vec![
            "scenario".to_owned(),
            "metric".to_owned(),
            "unit".to_owned(),
        ];
        header.extend(self.variants.iter().cloned());
        header.extend([
            "ratio".to_owned(),
            "target".to_owned(),
            "verdict".to_owned(),
        ]);
        let mut rows = vec![header];
        for m in &self.metrics {
            let mut row = vec![m.scenario.clone(), m.name.clone(), m.unit.to_owned()];
            for v in &self.variants {
                row.push(match m.samples.get(v).and_then(|s| median(s)) {
                    Some(x) => fmt_num(x, m.unit),
                    None if m.errors.iter().any(|e| e.starts_with(&format!("{v}:"))) => {
                        "ERR".into()
                    }
                    None => "-".into(),
                });
            }
            row.push(self.ratio(m).map_or("-".into(), |r| format!("{r:.2}")));
            let verdicts = self.verdicts(m);
            row.push(
                verdicts
                    .iter()
                    .map(|(t, _)| t.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            row.push(verdict_word(&verdicts).to_owned());
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        println!();
        for (i, row) in rows.iter().enumerate() {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    let pad = w - cell.chars().count();
                    if c >= 3 && c < 3 + self.variants.len() + 1 {
                        format!("{}{cell}", " ".repeat(pad))
                    } else {
                        format!("{cell}{}", " ".repeat(pad))
                    }
                })
                .collect();
            println!("{}", line.join("  ").trim_end());
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                println!("{}", "-".repeat(total));
            }
        }
        for m in &self.metrics {
            for e in &m.errors {
                println!("error  {} {}: {e}", m.scenario, m.name);
            }
        }
        for s in &self.skipped {
            println!("skipped: {s}");
        }
    }

    fn to_json(&self) -> Value {
        let metrics: Vec<Value> = self
            .metrics
            .iter()
            .map(|m| {
                let variants: serde_json::Map<String, Value> = m
                    .samples
                    .iter()
                    .map(|(v, s)| (v.clone(), json!({"median": median(s), "samples": s})))
                    .collect();
                let verdicts = self.verdicts(m);
                json!({
                    "id": m.id,
                    "scenario": m.scenario,
                    "metric": m.name,
                    "unit": m.unit,
                    "higher_is_better": m.higher_is_better,
                    "variants": variants,
                    "ratio_vs_direct": self.ratio(m),
                    "targets": verdicts.iter().map(|(t, ok)| json!({"target": t, "met": ok})).collect::<Vec<_>>(),
                    "verdict": verdict_word(&verdicts),
                    "notes": m.notes,
                    "errors": m.errors,
                    "detail": m.detail,
                })
            })
            .collect();
        json!({
            "primary_variant": self.primary,
            "variants": self.variants,
            "metrics": metrics,
            "skipped": self.skipped,
        })
    }
}

fn verdict_word(verdicts: &[(String, Option<bool>)]) -> &'static str {
    if verdicts.is_empty() {
        ""
    } else if verdicts.iter().any(|(_, ok)| ok.is_none()) {
        "n/a"
    } else if verdicts.iter().all(|(_, ok)| *ok == Some(true)) {
        "met"
    } else {
        "MISSED"
    }
}

fn fmt_num(x: f64, unit: &str) -> String {
    match unit {
        "KiB" | "ratio" => format!("{x:.1}"),
        "ms" if x < 100.0 => format!("{x:.1}"),
        "s" => format!("{x:.2}"),
        _ if x.abs() >= 100.0 => format!("{x:.0}"),
        _ => format!("{x:.1}"),
    }
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

type Lines = Arc<Mutex<Vec<(SystemTime, String)>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process whose stderr lines are collected with their arrival time; killed on drop.
struct Proc {
    label: String,
    child: Child,
    lines: Lines,
}

impl Proc {
    fn spawn(label: &str, mut command: Command) -> Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {label}: {command:?}"))?;
        let pipe = child.stderr.take().context("no stderr pipe")?;
        let lines: Lines = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                let now = SystemTime::now();
                lock(&sink).push((now, line));
            }
        });
        Ok(Self {
            label: label.to_owned(),
            child,
            lines,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr_text(&self) -> String {
        lock(&self.lines)
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for a stderr line containing `needle`: (arrival time, line).
    fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<(SystemTime, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = lock(&self.lines)
                .iter()
                .find(|(_, l)| l.contains(needle))
                .cloned()
            {
                return Ok(found);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before printing {needle:?}:\n{}",
                    self.label,
                    self.stderr_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} printed no {needle:?} within {timeout:?}:\n{}",
                    self.label,
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    fn rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// CPU time consumed so far by all live threads of `pid`, in nanoseconds.
fn cpu_ns(pid: i32) -> u64 {
    let from_schedstat = || -> Option<u64> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let path = task.ok()?.path().join("schedstat");
            let text = std::fs::read_to_string(path).ok()?;
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(total)
    };
    from_schedstat().unwrap_or_else(|| {
        // utime + stime in USER_HZ (100/s on Linux).
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(
                    (f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
                        * 10_000_000,
                )
            })
            .unwrap_or(0)
    })
}

/// CPU counters of the server-side processes of one variant.
#[derive(Clone, Default)]
struct CpuWatch {
    pids: Vec<(String, i32)>,
}

impl CpuWatch {
    fn snapshot(&self) -> Vec<u64> {
        self.pids.iter().map(|(_, p)| cpu_ns(*p)).collect()
    }

    /// Per process CPU µs between `before` and now, divided by `per`.
    fn per_unit(&self, before: &[u64], per: f64) -> BTreeMap<String, f64> {
        let after = self.snapshot();
        self.pids
            .iter()
            .zip(before.iter().zip(after))
            .map(|((name, _), (b, a))| (name.clone(), a.saturating_sub(*b) as f64 / 1e3 / per))
            .collect()
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit (children inherit it).
fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

// ---------------------------------------------------------------------------------------
// Setup: certificates, tokens, tools, nginx, backend, relays, agents
// ---------------------------------------------------------------------------------------

struct Tools {
    wrk: Option<PathBuf>,
    h2load: Option<PathBuf>,
    nginx: Option<PathBuf>,
    curl: Option<PathBuf>,
    versions: BTreeMap<String, String>,
}

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

fn ensure_tools(opts: &Opts) -> Tools {
    let wanted = [
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
        ("curl", "curl"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty()
        && opts.install
        && nix::unistd::geteuid().is_root()
        && which("apt-get").is_some()
    {
        eprintln!("[setup] installing {} with apt-get", missing.join(" "));
        let install = |pkgs: &[&str]| {
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install(&missing) {
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(Stdio::null())
                .status();
            if !install(&missing) {
                eprintln!("[setup] apt-get install failed; scenarios needing them are skipped");
            }
        }
    }
    // `JOBGATE_BENCH_WITHOUT=nginx,wrk`: run as if those tools were missing.
    let without = std::env::var("JOBGATE_BENCH_WITHOUT").unwrap_or_default();
    let find = |tool: &str| {
        if without.split(',').any(|w| w.trim() == tool) {
            None
        } else {
            which(tool)
        }
    };
    let mut versions = BTreeMap::new();
    let wrk = find("wrk");
    let h2load = find("h2load");
    let nginx = find("nginx");
    let curl = find("curl");
    if let Some(p) = &wrk {
        versions.insert("wrk".into(), first_line(p, &["-v"]));
    }
    if let Some(p) = &h2load {
        versions.insert("h2load".into(), first_line(p, &["--version"]));
    }
    if let Some(p) = &nginx {
        versions.insert("nginx".into(), first_line(p, &["-v"]));
    }
    if let Some(p) = &curl {
        versions.insert("curl".into(), first_line(p, &["--version"]));
    }
    Tools {
        wrk,
        h2load,
        nginx,
        curl,
        versions,
    }
}

/// Scratch directory, PKI, token and payload files; removed on drop.
struct Setup {
    dir: PathBuf,
    bin: PathBuf,
    exe: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    tokens: PathBuf,
    token_file: PathBuf,
    token: String,
    www: PathBuf,
    /// The bulk payload (sparse), and a quarter of it for the HTTP/2 rows.
    big: PathBuf,
    quarter: PathBuf,
    wrk_script: PathBuf,
}

impl Setup {
    fn new(opts: &Opts) -> Result<Self> {
        let bin = std::env::var_os("JOBGATE_BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_jobgate")));
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let dir = std::env::temp_dir().join(format!("jobgate-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let status = Command::new(&bin)
            .args(["dev-cert", "--domain", DOMAIN, "--out"])
            .arg(&dir)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {} dev-cert", bin.display()))?;
        if !status.success() {
            bail!("jobgate dev-cert failed");
        }
        let tokens = dir.join("tokens.toml");
        let out = Command::new(&bin)
            .args(["token", "issue", "--user", "bench", "--tokens"])
            .arg(&tokens)
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("jobgate token issue failed");
        }
        let token = String::from_utf8(out.stdout)?.trim().to_owned();
        let token_file = dir.join("bench.token");
        std::fs::write(&token_file, &token)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;

        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("small"), [b'x'; SMALL])?;
        let big = www.join("big");
        // Sparse: reads are zeros from the page cache, no disk I/O, no setup time.
        std::fs::File::create(&big)?.set_len(opts.bulk_bytes)?;
        // Read it once so every variant finds it in the page cache.
        std::io::copy(&mut std::fs::File::open(&big)?, &mut std::io::sink())?;
        let quarter = www.join("quarter");
        std::fs::File::create(&quarter)?.set_len(opts.bulk_bytes / 4)?;
        std::io::copy(&mut std::fs::File::open(&quarter)?, &mut std::io::sink())?;
        let wrk_script = dir.join("report.lua");
        std::fs::write(&wrk_script, WRK_SCRIPT)?;
        Ok(Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            tokens,
            token_file,
            token,
            www,
            big,
            quarter,
            wrk_script,
            dir,
            bin,
            exe,
        })
    }

    fn client_tls(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&self.ca)?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// wrk's summary as one JSON line (latencies in µs).
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p99\":%d,\"mean\":%f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"#;

struct Nginx {
    proc: Proc,
    h1: u16,
    h2c: u16,
    tls: u16,
}

fn start_nginx(setup: &Setup, nginx: &Path) -> Result<Nginx> {
    let (h1, h2c, tls) = (free_port()?, free_port()?, free_port()?);
    let d = setup.dir.display();
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
        cert = setup.cert.display(),
        key = setup.key.display(),
        www = setup.www.display(),
    );
    let path = setup.dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(&setup.dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(setup.dir.join("nginx-error.log"));
    let proc = Proc::spawn("nginx", command)?;
    wait_tcp(h1, Duration::from_secs(10)).context("nginx did not start")?;
    Ok(Nginx { proc, h1, h2c, tls })
}

fn wait_tcp(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// This binary as the backend server on a fresh port.
fn start_backend(setup: &Setup) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let mut command = Command::new(&setup.exe);
    command.arg(BACKEND_FLAG).arg(format!("127.0.0.1:{port}"));
    let mut proc = Proc::spawn("backend", command)?;
    proc.wait_line("backend listening", Duration::from_secs(10))?;
    Ok((proc, port))
}

struct RelayProc {
    proc: Proc,
    https: u16,
    quic: u16,
}

fn start_relay(setup: &Setup, workers: usize, extra: &[&str]) -> Result<RelayProc> {
    start_relay_with(&setup.bin, setup, workers, extra)
}

fn start_relay_with(
    bin: &Path,
    setup: &Setup,
    workers: usize,
    extra: &[&str],
) -> Result<RelayProc> {
    let mut command = Command::new(bin);
    command
        .arg("--workers")
        .arg(workers.to_string())
        .args(["relay", "--domain", DOMAIN])
        .args([
            "--listen-https",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(&setup.cert)
        .arg("--key")
        .arg(&setup.key)
        .arg("--tokens")
        .arg(&setup.tokens)
        .args(extra);
    let mut proc = Proc::spawn("relay", command)?;
    let (_, line) = proc.wait_line("agents (QUIC/UDP) on", Duration::from_secs(20))?;
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
    Ok(RelayProc {
        https: port_after("HTTPS on ")?,
        quic: port_after("agents (QUIC/UDP) on ")?,
        proc,
    })
}

/// A session: what a client needs to reach it through the relay.
#[derive(Clone, Debug)]
struct SessionUrl {
    host: String,
    cookie: String,
}

impl SessionUrl {
    fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("not an https URL: {url}"))?;
        let host = rest
            .split([':', '/', '?'])
            .next()
            .unwrap_or_default()
            .to_owned();
        let name = host.split('.').next().unwrap_or_default();
        let key = url
            .split("jobgate_key=")
            .nth(1)
            .and_then(|k| k.split(['&', '#']).next())
            .ok_or_else(|| anyhow!("no access key in {url} (the bench uses link mode)"))?;
        Ok(Self {
            cookie: format!("__Host-jobgate-{name}={key}"),
            host,
        })
    }
}

struct AgentProc {
    proc: Proc,
    session: SessionUrl,
    url_at: SystemTime,
}

fn agent_command(setup: &Setup, relay: &RelayProc, workers: Option<usize>) -> Command {
    agent_command_with(&setup.bin, setup, relay, workers)
}

fn agent_command_with(
    bin: &Path,
    setup: &Setup,
    relay: &RelayProc,
    workers: Option<usize>,
) -> Command {
    let mut command = Command::new(bin);
    if let Some(w) = workers {
        command.arg("--workers").arg(w.to_string());
    }
    command
        .arg("agent")
        .arg("--relay")
        .arg(format!("127.0.0.1:{}", relay.quic))
        .arg("--relay-ca")
        .arg(&setup.ca)
        .arg("--token-file")
        .arg(&setup.token_file);
    command
}

fn start_agent(mut command: Command) -> Result<AgentProc> {
    let mut proc = Proc::spawn("agent", {
        command.env("RUST_LOG", "warn");
        command
    })?;
    let marker = "your app is at ";
    let (url_at, line) = proc.wait_line(marker, Duration::from_secs(30))?;
    let url = line.split(marker).nth(1).unwrap_or_default().trim();
    Ok(AgentProc {
        session: SessionUrl::parse(url)?,
        proc,
        url_at,
    })
}

// ---------------------------------------------------------------------------------------
// The backend (this binary re-executed)
// ---------------------------------------------------------------------------------------

type AppBody = BoxBody<Bytes, std::io::Error>;

fn backend_main(args: &[String]) -> Result<()> {
    let mut listen = None;
    let mut ready_file = None;
    let mut delay_ms = 0u64;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            BACKEND_FLAG => listen = it.next().cloned(),
            "--ready-file" => ready_file = it.next().map(PathBuf::from),
            "--delay-ms" => delay_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    let listen = listen.context("--jobgate-bench-backend needs ADDR")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        // Written right after listen(): from now on the app accepts connections.
        if let Some(path) = ready_file {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            std::fs::write(&path, format!("{nanos} {}\n", std::process::id()))?;
        }
        eprintln!("backend listening on {}", listener.local_addr()?);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_backend(stream));
                }
                Err(e) => {
                    eprintln!("backend accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn serve_backend(stream: tokio::net::TcpStream) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let _ = builder
        .serve_connection_with_upgrades(
            TokioIo::new(stream),
            hyper::service::service_fn(backend_handle),
        )
        .await;
}

fn full(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn with_status(code: StatusCode, text: &'static str) -> Response<AppBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
}

async fn backend_handle(
    req: Request<Incoming>,
) -> Result<Response<AppBody>, std::convert::Infallible> {
    Ok(match req.uri().path() {
        "/small" => Response::new(full(Bytes::from_static(&[b'x'; SMALL]))),
        "/bytes" => stream_bytes(&req),
        "/upload" => upload_sink(req).await,
        "/ws" => websocket(req, false),
        "/ws-sink" => websocket(req, true),
        _ => with_status(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn stream_bytes(req: &Request<Incoming>) -> Response<AppBody> {
    let n: u64 = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("n=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let block = Bytes::from(vec![0u8; CHUNK]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let block = block.clone();
        async move {
            if sent >= n {
                return None;
            }
            let len = (n - sent).min(CHUNK as u64) as usize;
            Some((
                Ok::<_, std::io::Error>(Frame::data(block.slice(..len))),
                sent + len as u64,
            ))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    response
}

async fn upload_sink(req: Request<Incoming>) -> Response<AppBody> {
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    n += data.len() as u64;
                }
            }
            Err(_) => return with_status(StatusCode::BAD_REQUEST, "body failed\n"),
        }
    }
    Response::new(full(format!("{n}\n")))
}

fn websocket(mut req: Request<Incoming>, sink: bool) -> Response<AppBody> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return with_status(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let mut received = 0u64;
        while let Some(Ok(message)) = ws.next().await {
            let reply = match message {
                Message::Close(_) => break,
                Message::Text(t) if sink && t == "end" => {
                    let n = std::mem::take(&mut received);
                    Some(Message::Text(n.to_string()))
                }
                Message::Binary(b) if sink => {
                    received += b.len() as u64;
                    None
                }
                m @ (Message::Text(_) | Message::Binary(_)) => Some(m),
                _ => None,
            };
            if let Some(reply) = reply {
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", accept);
    }
    response
}

// ---------------------------------------------------------------------------------------
// Load tools
// ---------------------------------------------------------------------------------------

/// How one variant is reached over HTTP.
#[derive(Clone)]
struct HttpVariant {
    name: String,
    /// `http://127.0.0.1:P` or `https://127.0.0.1:P` for HTTP/1.1 (wrk, curl).
    h1_base: String,
    /// Base URL for HTTP/2 (h2load, curl): h2c prior knowledge or TLS with ALPN.
    h2_base: String,
    /// Session host and cookie when going through a relay.
    session: Option<SessionUrl>,
    /// Relay port (curl --resolve).
    https_port: Option<u16>,
    cpu: CpuWatch,
}

struct LoadResult {
    rps: f64,
    requests: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: BTreeMap<String, f64>,
}

fn wrk(
    tools: &Tools,
    setup: &Setup,
    v: &HttpVariant,
    connections: usize,
    secs: u64,
) -> Result<LoadResult> {
    let wrk = tools.wrk.as_ref().context("wrk is not installed")?;
    let mut command = Command::new(wrk);
    command
        .args(["-t1", "-c"])
        .arg(connections.to_string())
        .arg("-d")
        .arg(format!("{secs}s"))
        .arg("-s")
        .arg(&setup.wrk_script)
        .arg(format!("{}/small", v.h1_base));
    if let Some(s) = &v.session {
        command
            .arg("-H")
            .arg(format!("Host: {}", s.host))
            .arg("-H")
            .arg(format!("Cookie: {}", s.cookie));
    }
    let before = v.cpu.snapshot();
    let out = command.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("WRKJSON "))
        .ok_or_else(|| {
            anyhow!(
                "wrk printed no summary: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let r: Value = serde_json::from_str(line)?;
    let num = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let requests = num("requests");
    let errors: f64 = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| num(k))
        .sum();
    if requests.is_nan() || requests <= 0.0 || errors > 0.0 {
        bail!("wrk: {requests} requests, errors {line}");
    }
    Ok(LoadResult {
        rps: requests / (num("duration_us") / 1e6),
        requests,
        p50_us: num("p50"),
        p99_us: num("p99"),
        cpu_us_per_req: v.cpu.per_unit(&before, requests),
    })
}

fn h2load(
    tools: &Tools,
    v: &HttpVariant,
    clients: usize,
    streams: usize,
    secs: u64,
) -> Result<LoadResult> {
    let h2load = tools.h2load.as_ref().context("h2load is not installed")?;
    let mut command = Command::new(h2load);
    command
        .args(["-t1", "-c"])
        .arg(clients.to_string())
        .arg("-m")
        .arg(streams.to_string())
        .arg("-D")
        .arg(secs.to_string())
        .arg(format!("{}/small", v.h2_base));
    if let Some(s) = &v.session {
        command
            .arg("-H")
            .arg(format!(":authority: {}", s.host))
            .arg("-H")
            .arg(format!("cookie: {}", s.cookie));
    }
    let before = v.cpu.snapshot();
    let out = command.output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |line_prefix: &str, suffix: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(line_prefix))?;
        line.trim_start_matches(line_prefix)
            .split(',')
            .find(|part| part.trim().ends_with(suffix))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let rps = field("finished in", "req/s").ok_or_else(|| anyhow!("h2load: no result: {text}"))?;
    let succeeded = field("requests:", "succeeded").unwrap_or(0.0);
    let failed =
        field("requests:", "failed").unwrap_or(0.0) + field("requests:", "errored").unwrap_or(0.0);
    let bad =
        field("status codes:", "4xx").unwrap_or(0.0) + field("status codes:", "5xx").unwrap_or(0.0);
    if succeeded <= 0.0 || failed > 0.0 || bad > 0.0 {
        bail!("h2load: {succeeded} succeeded, {failed} failed, {bad} 4xx/5xx:\n{text}");
    }
    Ok(LoadResult {
        rps,
        requests: succeeded,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        cpu_us_per_req: v.cpu.per_unit(&before, succeeded),
    })
}

struct Transfer {
    mb_s: f64,
    cpu_us_per_mb: BTreeMap<String, f64>,
}

/// What one bulk transfer moves.
struct Payload<'a> {
    bytes: u64,
    /// Path of a `bytes`-long download.
    download_path: &'a str,
    /// A `bytes`-long file to upload.
    upload_file: &'a Path,
}

/// One curl transfer: a download of `payload.download_path` or an upload to `/upload`.
fn curl_transfer(
    tools: &Tools,
    setup: &Setup,
    v: &HttpVariant,
    upload: bool,
    h2: bool,
    payload: &Payload,
) -> Result<Transfer> {
    let Payload {
        bytes,
        download_path,
        upload_file,
    } = *payload;
    let curl = tools.curl.as_ref().context("curl is not installed")?;
    let mut command = Command::new(curl);
    command.args(["-sS", "--max-time", "300", "-H", "Expect:"]);
    let base = if h2 { &v.h2_base } else { &v.h1_base };
    let direct_h2c = h2 && base.starts_with("http://");
    command.arg(if direct_h2c {
        "--http2-prior-knowledge"
    } else if h2 {
        "--http2"
    } else {
        "--http1.1"
    });
    let url_base = match (&v.session, v.https_port) {
        (Some(s), Some(port)) => {
            command
                .arg("--cacert")
                .arg(&setup.ca)
                .arg("--resolve")
                .arg(format!("{}:{port}:127.0.0.1", s.host))
                .arg("-H")
                .arg(format!("Cookie: {}", s.cookie));
            format!("https://{}:{port}", s.host)
        }
        _ => {
            if base.starts_with("https://") {
                command.arg("--cacert").arg(&setup.ca);
            }
            base.clone()
        }
    };
    let response_file = setup.dir.join("curl-response");
    let _ = std::fs::remove_file(&response_file);
    command.arg("-o").arg(&response_file);
    if upload {
        command
            .arg("-T")
            .arg(upload_file)
            .arg("-w")
            .arg("%{http_code} %{size_upload} %{time_total}")
            .arg(format!("{url_base}/upload"));
    } else {
        command
            .arg("-w")
            .arg("%{http_code} %{size_download} %{time_total}")
            .arg(format!("{url_base}{download_path}"));
    }
    let before = v.cpu.snapshot();
    let out = command.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (code, size, secs) = match fields.as_slice() {
        [c, s, t] => (
            c.parse::<u16>().unwrap_or(0),
            s.parse::<f64>().unwrap_or(0.0),
            t.parse::<f64>().unwrap_or(f64::NAN),
        ),
        _ => bail!(
            "curl: unexpected output {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    if code != 200 || size as u64 != bytes {
        bail!(
            "curl: HTTP {code}, {size} of {bytes} bytes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if upload {
        let received: u64 = std::fs::read_to_string(&response_file)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        if received != bytes {
            bail!("upload: the sink received {received} of {bytes} bytes");
        }
    }
    Ok(Transfer {
        mb_s: bytes as f64 / secs / MB,
        cpu_us_per_mb: v.cpu.per_unit(&before, bytes as f64 / MB),
    })
}

// ---------------------------------------------------------------------------------------
// Rust clients: WebSocket, HTTP/2 probes
// ---------------------------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;
type Ws = WebSocketStream<BoxIo>;

#[derive(Clone)]
struct WsVariant {
    name: String,
    port: u16,
    /// TLS config and session, when through the relay.
    via: Option<(Arc<rustls::ClientConfig>, SessionUrl)>,
}

async fn tls_connect(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    Ok(tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?)
}

async fn ws_connect(v: &WsVariant, path: &str) -> Result<Ws> {
    let (io, uri): (BoxIo, String) = match &v.via {
        Some((config, session)) => (
            Box::new(tls_connect(config, v.port, &session.host).await?),
            format!("wss://{}:{}{path}", session.host, v.port),
        ),
        None => {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", v.port)).await?;
            tcp.set_nodelay(true)?;
            (Box::new(tcp), format!("ws://127.0.0.1:{}{path}", v.port))
        }
    };
    let mut request = uri.into_client_request()?;
    if let Some((_, session)) = &v.via {
        let headers = request.headers_mut();
        headers.insert(header::COOKIE, HeaderValue::from_str(&session.cookie)?);
        // As a browser on the session's own page: the relay honours the cookie on a
        // WebSocket handshake only with the session's own `Origin`.
        let origin = format!("https://{}:{}", session.host, v.port);
        headers.insert(header::ORIGIN, HeaderValue::from_str(&origin)?);
    }
    let (ws, response) = tokio_tungstenite::client_async(request, io).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        bail!("WebSocket handshake answered {}", response.status());
    }
    Ok(ws)
}

/// Round-trip times of 100-byte messages, µs.
async fn ws_rtt(ws: &mut Ws, samples: usize) -> Result<Vec<f64>> {
    let payload = vec![0x5au8; WS_RTT_BYTES];
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + WS_WARMUP {
        let start = Instant::now();
        ws.send(Message::Binary(payload.clone())).await?;
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == WS_RTT_BYTES => {}
            other => bail!("unexpected echo: {other:?}"),
        }
        if i >= WS_WARMUP {
            out.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

/// 64 KiB messages one way into the sink; MB/s until the sink confirms the count.
async fn ws_oneway(ws: &mut Ws, total: u64) -> Result<f64> {
    let message = vec![0u8; CHUNK];
    let count = total / CHUNK as u64;
    let start = Instant::now();
    for _ in 0..count {
        ws.send(Message::Binary(message.clone())).await?;
    }
    ws.send(Message::Text("end".into())).await?;
    let got = match ws.next().await {
        Some(Ok(Message::Text(t))) => t.parse::<u64>().unwrap_or(0),
        other => bail!("sink did not confirm: {other:?}"),
    };
    let elapsed = start.elapsed().as_secs_f64();
    if got != count * CHUNK as u64 {
        bail!("sink received {got} of {} bytes", count * CHUNK as u64);
    }
    Ok(got as f64 / elapsed / MB)
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn h2_connect(config: &Arc<rustls::ClientConfig>, port: u16, host: &str) -> Result<H2Sender> {
    let tls = tls_connect(config, port, host).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

fn probe_request(port: u16, session: &SessionUrl) -> Result<Request<Empty<Bytes>>> {
    Ok(
        Request::get(format!("https://{}:{port}/small", session.host))
            .header(header::COOKIE, &session.cookie)
            .body(Empty::new())?,
    )
}

/// Times (ms after `t0`) of the first non-200 answer and of the first 404.
struct ProbeResult {
    first_other: Option<(f64, u16)>,
    first_404: f64,
}

/// How long one lifecycle probe may hang (a dead agent's requests hang until the idle
/// timeout) before it is given up; probes overlap, so none is missed.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Sends a probe every `interval` (each on its own HTTP/2 stream, so a hung request does
/// not delay the next) until one is answered 404.
async fn probe_until_404(
    sender: &H2Sender,
    port: u16,
    session: &SessionUrl,
    t0: Instant,
    interval: Duration,
    limit: Duration,
) -> Result<ProbeResult> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tick = tokio::time::interval(interval);
    let mut tasks = tokio::task::JoinSet::new();
    let mut first_other = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if t0.elapsed() > limit {
                    tasks.abort_all();
                    bail!("no 404 within {limit:?} (first other answer: {first_other:?})");
                }
                let mut sender = sender.clone();
                let request = probe_request(port, session)?;
                let tx = tx.clone();
                tasks.spawn(async move {
                    if let Ok(result) = tokio::time::timeout(PROBE_TIMEOUT, sender.send_request(request)).await {
                        let _ = tx.send((Instant::now(), result.map(|r| r.status())));
                    }
                });
            }
            Some((at, result)) = rx.recv() => {
                let ms = at.duration_since(t0).as_secs_f64() * 1e3;
                match result {
                    Ok(StatusCode::OK) => {}
                    Ok(status) => {
                        first_other.get_or_insert((ms, status.as_u16()));
                        if status == StatusCode::NOT_FOUND {
                            tasks.abort_all();
                            return Ok(ProbeResult { first_other, first_404: ms });
                        }
                    }
                    Err(e) => bail!("probe failed: {e}"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Quinn ceiling: one QUIC connection, one stream, jobgate's transport tuning, TLS.
// ---------------------------------------------------------------------------------------

fn udp_socket() -> Result<std::net::UdpSocket> {
    use jobgate_protocol::quic::UDP_SOCKET_BUFFER;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        let _ = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    }
    Ok(socket)
}

/// CPU time of the calling thread, µs.
fn thread_cpu_us() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let t = u.user_time() + u.system_time();
            t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64
        })
        .unwrap_or(f64::NAN)
}

/// One QUIC connection moving `bytes` on one stream between two threads: (MB/s, CPU µs
/// per MB of both ends).
fn quinn_ceiling(setup: &Setup, bytes: u64) -> Result<(f64, f64)> {
    use jobgate_protocol::quic::transport_config;
    let transport = || transport_config(Duration::from_secs(10), Duration::from_secs(2), 16);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_pem = std::fs::read(&setup.cert)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    let key_pem = std::fs::read(&setup.key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?.context("no key")?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server_tls.alpn_protocols = vec![jobgate_protocol::ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
    ));
    server.transport_config(transport());
    let server_socket = udp_socket()?;
    let server_addr = server_socket.local_addr()?;

    let server_thread = std::thread::spawn(move || -> Result<(u64, f64)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server),
                server_socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            let connection = endpoint.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = connection.accept_bi().await?;
            let cpu0 = thread_cpu_us();
            let mut n = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                n += chunk.bytes.len() as u64;
            }
            let cpu = thread_cpu_us() - cpu0;
            send.write_all(&n.to_be_bytes()).await?;
            send.finish()?;
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            Ok((n, cpu))
        })
    });

    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(&setup.ca)?;
    for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        roots.add(cert?)?;
    }
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![jobgate_protocol::ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    client.transport_config(transport());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rate = runtime.block_on(async move {
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            udp_socket()?,
            Arc::new(quinn::TokioRuntime),
        )?;
        endpoint.set_default_client_config(client);
        let connection = endpoint
            .connect(server_addr, &format!("ceiling.{DOMAIN}"))?
            .await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        let block = Bytes::from(vec![0u8; CHUNK]);
        let cpu0 = thread_cpu_us();
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            send.write_chunk(block.slice(..n)).await?;
            sent += n as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 8];
        recv.read_exact(&mut ack).await?;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = thread_cpu_us() - cpu0;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        if u64::from_be_bytes(ack) != bytes {
            bail!(
                "quinn ceiling: server received {} of {bytes}",
                u64::from_be_bytes(ack)
            );
        }
        Ok::<_, anyhow::Error>((bytes as f64 / elapsed / MB, cpu))
    })?;
    let (_, server_cpu) = server_thread
        .join()
        .map_err(|_| anyhow!("quinn ceiling server panicked"))??;
    Ok((rate.0, (rate.1 + server_cpu) / (bytes as f64 / MB)))
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// The relay + agents serving one jobgate variant.
struct JobgateStack {
    /// Variant name: `jobgate-wN`, or `cmp-wN` for the comparison binary.
    name: String,
    relay: RelayProc,
    /// Agent forwarding to the static backend (nginx, or the bench backend without it).
    static_agent: AgentProc,
    /// Agent forwarding to the bench backend (upload, WebSocket).
    app_agent: AgentProc,
}

fn variant_name(workers: usize) -> String {
    format!("jobgate-w{workers}")
}

fn run(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let opts = Opts::from_env(args);
    let nofile = raise_nofile().unwrap_or(0);
    let tools = ensure_tools(&opts);
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

    let (backend, backend_port) = start_backend(&setup)?;
    let nginx = match &tools.nginx {
        Some(path) => Some(start_nginx(&setup, path)?),
        None => None,
    };
    let static_port = nginx.as_ref().map_or(backend_port, |n| n.h1);
    let static_pid = nginx.as_ref().map_or(backend.pid(), |n| n.proc.pid());
    let static_name = if nginx.is_some() { "nginx" } else { "backend" };
    let download_path = if nginx.is_some() {
        "/big".to_owned()
    } else {
        format!("/bytes?n={}", opts.bulk_bytes)
    };

    let mut stacks = Vec::new();
    let mut builds: Vec<(String, PathBuf, usize)> = opts
        .workers
        .iter()
        .map(|&w| (variant_name(w), setup.bin.clone(), w))
        .collect();
    if let Some(other) = &opts.compare {
        builds.push((
            format!("cmp-w{}", opts.workers[0]),
            other.clone(),
            opts.workers[0],
        ));
    }
    for (name, bin, workers) in builds {
        let relay = start_relay_with(&bin, &setup, workers, &[])?;
        let mut c = agent_command_with(&bin, &setup, &relay, Some(workers));
        c.arg("--to").arg(format!("127.0.0.1:{static_port}"));
        let static_agent = start_agent(c)?;
        let mut c = agent_command_with(&bin, &setup, &relay, Some(workers));
        c.arg("--to").arg(format!("127.0.0.1:{backend_port}"));
        let app_agent = start_agent(c)?;
        stacks.push(JobgateStack {
            name,
            relay,
            static_agent,
            app_agent,
        });
    }

    // Variants for the static GETs and downloads.
    let mut http_variants = vec![HttpVariant {
        name: "direct".into(),
        h1_base: format!("http://127.0.0.1:{static_port}"),
        h2_base: format!(
            "http://127.0.0.1:{}",
            nginx.as_ref().map_or(backend_port, |n| n.h2c)
        ),
        session: None,
        https_port: None,
        cpu: CpuWatch {
            pids: vec![(static_name.into(), static_pid)],
        },
    }];
    if let Some(n) = &nginx {
        http_variants.push(HttpVariant {
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
    for s in &stacks {
        http_variants.push(HttpVariant {
            name: s.name.clone(),
            h1_base: format!("https://127.0.0.1:{}", s.relay.https),
            h2_base: format!("https://127.0.0.1:{}", s.relay.https),
            session: Some(s.static_agent.session.clone()),
            https_port: Some(s.relay.https),
            cpu: CpuWatch {
                pids: vec![
                    ("relay".into(), s.relay.proc.pid()),
                    ("agent".into(), s.static_agent.proc.pid()),
                    (static_name.into(), static_pid),
                ],
            },
        });
    }
    // Variants for uploads (the sink is the bench backend).
    let upload_variants: Vec<HttpVariant> = std::iter::once(HttpVariant {
        name: "direct".into(),
        h1_base: format!("http://127.0.0.1:{backend_port}"),
        h2_base: format!("http://127.0.0.1:{backend_port}"),
        session: None,
        https_port: None,
        cpu: CpuWatch {
            pids: vec![("backend".into(), backend.pid())],
        },
    })
    .chain(stacks.iter().map(|s| HttpVariant {
        name: s.name.clone(),
        h1_base: format!("https://127.0.0.1:{}", s.relay.https),
        h2_base: format!("https://127.0.0.1:{}", s.relay.https),
        session: Some(s.app_agent.session.clone()),
        https_port: Some(s.relay.https),
        cpu: CpuWatch {
            pids: vec![
                ("relay".into(), s.relay.proc.pid()),
                ("agent".into(), s.app_agent.proc.pid()),
                ("backend".into(), backend.pid()),
            ],
        },
    }))
    .collect();

    let mut variants: Vec<String> = http_variants.iter().map(|v| v.name.clone()).collect();
    variants.push("ceiling".into());
    let mut report = Report {
        metrics: Vec::new(),
        primary: variant_name(opts.workers[0]),
        variants,
        skipped: Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    if opts.wants("latency") {
        scenario_latency(&opts, &tools, &setup, &http_variants, &mut report);
    }
    if opts.wants("rps") {
        scenario_rps(&opts, &tools, &setup, &http_variants, &mut report);
    }
    if opts.wants("bulk") {
        scenario_bulk(
            &opts,
            &tools,
            &setup,
            &http_variants,
            &upload_variants,
            &download_path,
            &mut report,
        );
        for s in &stacks {
            if let Ok(hwm) = proc_status_kib(s.relay.proc.pid(), "VmHWM:") {
                report
                    .metric(
                        "bulk.relay_hwm",
                        "3 bulk",
                        "relay peak RSS (whole run so far)",
                        "MiB",
                        false,
                    )
                    .samples
                    .entry(s.name.clone())
                    .or_default()
                    .push(hwm as f64 / 1024.0);
            }
        }
    }
    if opts.wants("ws") {
        let tls = setup.client_tls(&[b"http/1.1"])?;
        let mut ws_variants = vec![WsVariant {
            name: "direct".into(),
            port: backend_port,
            via: None,
        }];
        ws_variants.extend(stacks.iter().map(|s| WsVariant {
            name: s.name.clone(),
            port: s.relay.https,
            via: Some((tls.clone(), s.app_agent.session.clone())),
        }));
        scenario_ws(&opts, &runtime, &ws_variants, &mut report);
    }
    drop(stacks);
    if opts.wants("scale") {
        let primary = report.primary.clone();
        if let Err(e) = scenario_scale_agents(&opts, &setup, &runtime, &mut report) {
            report
                .metric(
                    "scale.agent",
                    "5 scale",
                    "relay RSS per idle agent",
                    "KiB",
                    false,
                )
                .errors
                .push(format!("{primary}: {e:#}"));
        }
        if let Err(e) = scenario_scale_ws(&opts, &setup, &runtime, &mut report) {
            report
                .metric(
                    "scale.ws",
                    "5 scale",
                    "relay RSS per idle WebSocket",
                    "KiB",
                    false,
                )
                .errors
                .push(format!("{primary}: {e:#}"));
        }
    }
    if opts.wants("lifecycle") {
        scenario_lifecycle(&opts, &setup, &runtime, backend_port, &mut report);
    }
    drop(nginx);
    drop(backend);

    let stat_after = read_cpu_stat();
    let steal = stat_before.zip(stat_after).map(|((t0, s0), (t1, s1))| {
        100.0 * (s1.saturating_sub(s0)) as f64 / (t1.saturating_sub(t0)).max(1) as f64
    });
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

    let json_path = json_path();
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

fn json_path() -> PathBuf {
    if let Some(p) = std::env::var_os("JOBGATE_BENCH_JSON") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // target/<profile>/deps/tunnel-<hash>
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("tunnel.json")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (total jiffies, steal jiffies) from /proc/stat.
fn read_cpu_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((f.iter().sum(), *f.get(7)?))
}

fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "model": model,
        "kernel": kernel.trim(),
        "mem_total_kib": proc_meminfo("MemTotal:"),
        "loadavg_start": loadavg(),
    })
}

fn proc_meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` for each repetition over the variants, rotating their order each time so
/// no variant always runs first (or right after a heavy one).
fn alternate<V>(reps: usize, variants: &[V], mut f: impl FnMut(usize, &V)) {
    for rep in 0..reps {
        for i in 0..variants.len() {
            f(rep, &variants[(i + rep) % variants.len()]);
        }
    }
}

/// A metric's identity: (id, scenario, name, unit, higher is better).
type MetricKey<'a> = (&'a str, &'a str, &'a str, &'static str, bool);

fn record_error(report: &mut Report, key: MetricKey, variant: &str, e: &anyhow::Error) {
    let (id, scenario, name, unit, higher) = key;
    eprintln!("  {variant}: error: {e:#}");
    report
        .metric(id, scenario, name, unit, higher)
        .errors
        .push(format!("{variant}: {e:#}"));
}

fn add_cpu_detail(m: &mut Metric, variant: &str, cpu: &BTreeMap<String, f64>) {
    let entry = m
        .detail
        .entry(format!("cpu_{variant}"))
        .or_insert_with(|| json!([]));
    if let Some(list) = entry.as_array_mut() {
        list.push(json!(cpu));
    }
}

fn scenario_latency(
    opts: &Opts,
    tools: &Tools,
    setup: &Setup,
    variants: &[HttpVariant],
    report: &mut Report,
) {
    const SC: &str = "1 small GET, 1 conn";
    if tools.wrk.is_none() {
        report.skipped.push("latency: wrk is not installed".into());
        return;
    }
    eprintln!(
        "[latency] wrk -t1 -c1, {} s × {} reps",
        opts.latency_secs, opts.reps
    );
    for v in variants {
        let _ = wrk(tools, setup, v, 1, 1); // warm-up
    }
    alternate(opts.reps, variants, |rep, v| {
        match wrk(tools, setup, v, 1, opts.latency_secs) {
            Ok(r) => {
                eprintln!(
                    "  rep {rep} {}: p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s",
                    v.name, r.p50_us, r.p99_us, r.rps
                );
                let m = report.metric("latency.p50", SC, "p50 latency", "µs", false);
                m.samples.entry(v.name.clone()).or_default().push(r.p50_us);
                if m.targets.is_empty() {
                    m.targets.push(Target::AddedMax(150.0));
                }
                report
                    .metric("latency.p99", SC, "p99 latency", "µs", false)
                    .samples
                    .entry(v.name.clone())
                    .or_default()
                    .push(r.p99_us);
                let m = report.metric("latency.cpu", SC, "server CPU per request", "µs", false);
                m.samples
                    .entry(v.name.clone())
                    .or_default()
                    .push(r.cpu_us_per_req.values().sum());
                add_cpu_detail(m, &v.name, &r.cpu_us_per_req);
            }
            Err(e) => record_error(
                report,
                ("latency.p50", SC, "p50 latency", "µs", false),
                &v.name,
                &e,
            ),
        }
    });
}

fn scenario_rps(
    opts: &Opts,
    tools: &Tools,
    setup: &Setup,
    variants: &[HttpVariant],
    report: &mut Report,
) {
    const SC1: &str = "2 small GET, h1 50 conns";
    const SC2: &str = "2 small GET, h2 10×10";
    if tools.wrk.is_none() {
        report
            .skipped
            .push("req/s HTTP/1.1: wrk is not installed".into());
    } else {
        eprintln!(
            "[rps h1] wrk -t1 -c50, {} s × {} reps",
            opts.load_secs, opts.reps
        );
        for v in variants {
            let _ = wrk(tools, setup, v, 50, 1);
        }
        alternate(opts.reps, variants, |rep, v| {
            match wrk(tools, setup, v, 50, opts.load_secs) {
                Ok(r) => {
                    eprintln!(
                        "  rep {rep} {}: {:.0} req/s (cpu µs/req {:?})",
                        v.name, r.rps, r.cpu_us_per_req
                    );
                    let m = report.metric("rps.h1", SC1, "req/s", "req/s", true);
                    m.samples.entry(v.name.clone()).or_default().push(r.rps);
                    if m.targets.is_empty() {
                        m.targets = vec![Target::Min(20_000.0), Target::RatioMin(0.6)];
                    }
                    add_cpu_detail(m, &v.name, &r.cpu_us_per_req);
                    let total: f64 = r.cpu_us_per_req.values().sum();
                    report
                        .metric("rps.h1.cpu", SC1, "server CPU per request", "µs", false)
                        .samples
                        .entry(v.name.clone())
                        .or_default()
                        .push(total);
                    let _ = r.requests;
                }
                Err(e) => {
                    record_error(report, ("rps.h1", SC1, "req/s", "req/s", true), &v.name, &e)
                }
            }
        });
    }
    if tools.h2load.is_none() {
        report
            .skipped
            .push("req/s HTTP/2: h2load is not installed".into());
        return;
    }
    eprintln!(
        "[rps h2] h2load -t1 -c10 -m10, {} s × {} reps",
        opts.load_secs, opts.reps
    );
    for v in variants {
        let _ = h2load(tools, v, 10, 10, 1);
    }
    alternate(opts.reps, variants, |rep, v| {
        match h2load(tools, v, 10, 10, opts.load_secs) {
            Ok(r) => {
                eprintln!("  rep {rep} {}: {:.0} req/s", v.name, r.rps);
                let m = report.metric("rps.h2", SC2, "req/s", "req/s", true);
                m.samples.entry(v.name.clone()).or_default().push(r.rps);
                if m.targets.is_empty() {
                    m.notes.push("issue 5 states the req/s target for 50 connections (h1); h2 is reported against the same bar".into());
                    m.targets = vec![Target::Min(20_000.0), Target::RatioMin(0.6)];
                }
                add_cpu_detail(m, &v.name, &r.cpu_us_per_req);
                let total: f64 = r.cpu_us_per_req.values().sum();
                report
                    .metric("rps.h2.cpu", SC2, "server CPU per request", "µs", false)
                    .samples
                    .entry(v.name.clone())
                    .or_default()
                    .push(total);
            }
            Err(e) => record_error(report, ("rps.h2", SC2, "req/s", "req/s", true), &v.name, &e),
        }
    });
}

fn scenario_bulk(
    opts: &Opts,
    tools: &Tools,
    setup: &Setup,
    download_variants: &[HttpVariant],
    upload_variants: &[HttpVariant],
    download_path: &str,
    report: &mut Report,
) {
    let size = format!("{} MiB", opts.bulk_bytes >> 20);
    let sc = "3 bulk".to_owned();
    eprintln!("[bulk] quinn ceiling, {size} × {} reps", opts.reps);
    for rep in 0..opts.reps {
        match quinn_ceiling(setup, opts.bulk_bytes) {
            Ok((rate, cpu)) => {
                eprintln!("  rep {rep} quinn ceiling: {rate:.0} MB/s, {cpu:.0} µs CPU per MB");
                report
                    .metric(
                        "bulk.ceiling",
                        &sc,
                        &format!("quinn 1-stream ceiling ({size})"),
                        "MB/s",
                        true,
                    )
                    .samples
                    .entry("ceiling".into())
                    .or_default()
                    .push(rate);
                report
                    .metric(
                        "bulk.ceiling.cpu",
                        &sc,
                        "quinn ceiling CPU per MB (both ends)",
                        "µs",
                        false,
                    )
                    .samples
                    .entry("ceiling".into())
                    .or_default()
                    .push(cpu);
            }
            Err(e) => record_error(
                report,
                (
                    "bulk.ceiling",
                    &sc,
                    &format!("quinn 1-stream ceiling ({size})"),
                    "MB/s",
                    true,
                ),
                "ceiling",
                &e,
            ),
        }
    }
    if tools.curl.is_none() {
        report.skipped.push("bulk: curl is not installed".into());
        return;
    }
    // direct-tls is left out of bulk: nginx's TLS throughput is not what is compared.
    let down: Vec<HttpVariant> = download_variants
        .iter()
        .filter(|v| v.name != "direct-tls")
        .cloned()
        .collect();
    // HTTP/2 rows: a quarter of the size, one repetition, direct and the primary variant
    // only (time budget); the targets are checked on the HTTP/1.1 rows.
    let h2_down: Vec<HttpVariant> = down
        .iter()
        .filter(|v| v.name == "direct" || v.name == report.primary)
        .cloned()
        .collect();
    let h2_up: Vec<HttpVariant> = upload_variants
        .iter()
        .filter(|v| v.name == "direct" || v.name == report.primary)
        .cloned()
        .collect();
    let quarter_path = if download_path == "/big" {
        "/quarter".to_owned()
    } else {
        format!("/bytes?n={}", opts.bulk_bytes / 4)
    };
    let plans = [
        (
            false,
            "h1",
            opts.bulk_bytes,
            opts.reps,
            download_path,
            &setup.big,
            &down[..],
            upload_variants,
        ),
        (
            true,
            "h2",
            opts.bulk_bytes / 4,
            1,
            &quarter_path[..],
            &setup.quarter,
            &h2_down[..],
            &h2_up[..],
        ),
    ];
    for (h2, proto, bytes, reps, download, upload_file, down_variants, up_variants) in plans {
        for (upload, variants, what) in [
            (false, down_variants, "download"),
            (true, up_variants, "upload"),
        ] {
            let id = format!("bulk.{what}.{proto}");
            let name = format!("{what} ({proto}, {} MiB)", bytes >> 20);
            eprintln!("[bulk] curl {name} × {reps} reps");
            alternate(reps, variants, |rep, v| {
                match curl_transfer(
                    tools,
                    setup,
                    v,
                    upload,
                    h2,
                    &Payload {
                        bytes,
                        download_path: download,
                        upload_file,
                    },
                ) {
                    Ok(t) => {
                        eprintln!(
                            "  rep {rep} {}: {:.0} MB/s (cpu µs/MB {:?})",
                            v.name, t.mb_s, t.cpu_us_per_mb
                        );
                        let m = report.metric(&id, &sc, &name, "MB/s", true);
                        m.samples.entry(v.name.clone()).or_default().push(t.mb_s);
                        if m.targets.is_empty() && !h2 {
                            m.targets =
                                vec![Target::Min(400.0), Target::FractionOf("bulk.ceiling", 0.7)];
                        }
                        add_cpu_detail(m, &v.name, &t.cpu_us_per_mb);
                        if !h2 {
                            let total: f64 = t.cpu_us_per_mb.values().sum();
                            report
                                .metric(
                                    &format!("{id}.cpu"),
                                    &sc,
                                    &format!("{what} server CPU per MB"),
                                    "µs",
                                    false,
                                )
                                .samples
                                .entry(v.name.clone())
                                .or_default()
                                .push(total);
                        }
                    }
                    Err(e) => record_error(report, (&id, &sc, &name, "MB/s", true), &v.name, &e),
                }
            });
        }
    }
}

fn scenario_ws(
    opts: &Opts,
    runtime: &tokio::runtime::Runtime,
    variants: &[WsVariant],
    report: &mut Report,
) {
    const SC: &str = "4 WebSocket";
    eprintln!(
        "[ws] {} round trips of {WS_RTT_BYTES} B, {} MiB one way in 64 KiB messages, × {} reps",
        opts.ws_rtt_samples,
        opts.ws_oneway_bytes >> 20,
        opts.reps
    );
    alternate(opts.reps, variants, |rep, v| {
        let result = runtime.block_on(async {
            let mut ws = ws_connect(v, "/ws").await?;
            let rtt = ws_rtt(&mut ws, opts.ws_rtt_samples).await?;
            let _ = ws.close(None).await;
            let mut sink = ws_connect(v, "/ws-sink").await?;
            let rate = ws_oneway(&mut sink, opts.ws_oneway_bytes).await?;
            let _ = sink.close(None).await;
            Ok::<_, anyhow::Error>((rtt, rate))
        });
        match result {
            Ok((rtt, rate)) => {
                let (p50, p99) = (percentile(&rtt, 50.0), percentile(&rtt, 99.0));
                eprintln!(
                    "  rep {rep} {}: RTT p50 {p50:.0} µs p99 {p99:.0} µs, one way {rate:.0} MB/s",
                    v.name
                );
                let push = |report: &mut Report,
                            id: &str,
                            name: &str,
                            unit: &'static str,
                            higher: bool,
                            x: f64| {
                    report
                        .metric(id, SC, name, unit, higher)
                        .samples
                        .entry(v.name.clone())
                        .or_default()
                        .push(x);
                };
                push(report, "ws.rtt.p50", "RTT p50 (100 B)", "µs", false, p50);
                push(report, "ws.rtt.p99", "RTT p99 (100 B)", "µs", false, p99);
                push(
                    report,
                    "ws.oneway",
                    "64 KiB msgs one way",
                    "MB/s",
                    true,
                    rate,
                );
            }
            Err(e) => record_error(
                report,
                ("ws.rtt.p50", SC, "RTT p50 (100 B)", "µs", false),
                &v.name,
                &e,
            ),
        }
    });
}

/// Relay RSS per idle agent: N agents (QUIC connection + Hello each) from this process.
fn scenario_scale_agents(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
) -> Result<()> {
    const SC: &str = "5 scale";
    let n = opts.agents;
    eprintln!("[scale] {n} idle agents on one relay");
    let limit = (n + 64).to_string();
    // One user opens every agent at once: lift the per-user rate of new sessions too.
    let relay = start_relay(
        setup,
        opts.workers[0],
        &[
            "--max-sessions-per-user",
            &limit,
            "--max-new-sessions-per-user-per-minute",
            "0",
        ],
    )?;
    let dial = jobgate_agent::dial::DialConfig {
        relay: format!("127.0.0.1:{}", relay.quic),
        relay_ca: Some(setup.ca.clone()),
        idle_timeout: Duration::from_secs(30),
    };
    let hello = jobgate_agent::dial::HelloParams {
        token: jobgate_protocol::Token(setup.token.clone()),
        access: jobgate_protocol::AccessMode::Link,
        job: jobgate_protocol::JobInfo::default(),
        resume: None,
    };
    let (per_agent, detail) = runtime.block_on(async {
        let connect = |count: usize| {
            futures_util::stream::iter(0..count)
                .map(|_| jobgate_agent::dial::open_session(&dial, &hello))
                .buffer_unordered(32)
                .collect::<Vec<_>>()
        };
        // Warm-up agents: code paths, allocator arenas, tables.
        let warm: Vec<_> = connect(16).await.into_iter().collect::<Result<_, _>>()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = relay.proc.rss_kib()?;
        let start = Instant::now();
        let sessions: Vec<_> = connect(n).await.into_iter().collect::<Result<_, _>>()?;
        let connect_s = start.elapsed().as_secs_f64();
        // A few keep-alive rounds so every connection reaches its idle steady state.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = relay.proc.rss_kib()?;
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        eprintln!("  relay RSS {before} KiB → {after} KiB for {n} agents: {per:.1} KiB each; connected in {connect_s:.2} s");
        let code = quinn::VarInt::from_u32(jobgate_protocol::CloseCode::Normal.as_u32());
        for s in sessions.iter().chain(&warm) {
            s.connection.close(code, b"bench done");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, anyhow::Error>((
            per,
            json!({"agents": n, "relay_rss_before_kib": before, "relay_rss_after_kib": after, "connect_seconds": connect_s}),
        ))
    })?;
    let m = report.metric("scale.agent", SC, "relay RSS per idle agent", "KiB", false);
    m.samples
        .entry(report_primary(opts))
        .or_default()
        .push(per_agent);
    m.targets = vec![Target::Max(64.0)];
    m.detail.insert("run".into(), detail);
    Ok(())
}

fn report_primary(opts: &Opts) -> String {
    variant_name(opts.workers[0])
}

/// Relay RSS per idle WebSocket: N upgraded connections through one relay and agent.
fn scenario_scale_ws(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
) -> Result<()> {
    const SC: &str = "5 scale";
    let n = opts.websockets;
    eprintln!("[scale] {n} idle WebSockets through one relay");
    let (backend, backend_port) = start_backend(setup)?;
    let relay = start_relay(setup, opts.workers[0], &[])?;
    let mut c = agent_command(setup, &relay, Some(opts.workers[0]));
    c.arg("--to").arg(format!("127.0.0.1:{backend_port}"));
    let agent = start_agent(c)?;
    let v = WsVariant {
        name: report_primary(opts),
        port: relay.https,
        via: Some((setup.client_tls(&[b"http/1.1"])?, agent.session.clone())),
    };
    let (per_ws, per_ws_agent, detail) = runtime.block_on(async {
        let open = |count: usize| {
            futures_util::stream::iter(0..count)
                .map(|_| ws_connect(&v, "/ws"))
                .buffer_unordered(64)
                .collect::<Vec<_>>()
        };
        let mut warm: Vec<Ws> = open(32).await.into_iter().collect::<Result<_, _>>()?;
        for ws in &mut warm {
            ws.send(Message::Text("warm".into())).await?;
            let _ = ws.next().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let relay_before = relay.proc.rss_kib()?;
        let agent_before = agent.proc.rss_kib()?;
        let start = Instant::now();
        let mut sockets: Vec<Ws> = open(n).await.into_iter().collect::<Result<_, _>>()?;
        let open_s = start.elapsed().as_secs_f64();
        // One message each way on every socket, like a notebook's first kernel message.
        for ws in &mut sockets {
            ws.send(Message::Text("hello".into())).await?;
        }
        for ws in &mut sockets {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t == "hello" => {}
                other => bail!("no echo on an idle WebSocket: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let relay_after = relay.proc.rss_kib()?;
        let agent_after = agent.proc.rss_kib()?;
        let per = relay_after.saturating_sub(relay_before) as f64 / n as f64;
        let per_agent = agent_after.saturating_sub(agent_before) as f64 / n as f64;
        eprintln!(
            "  relay RSS {relay_before} → {relay_after} KiB: {per:.1} KiB per WebSocket (agent {per_agent:.1} KiB); opened in {open_s:.2} s"
        );
        drop(sockets);
        drop(warm);
        Ok::<_, anyhow::Error>((
            per,
            per_agent,
            json!({"websockets": n, "relay_rss_before_kib": relay_before, "relay_rss_after_kib": relay_after,
                   "agent_rss_before_kib": agent_before, "agent_rss_after_kib": agent_after, "open_seconds": open_s}),
        ))
    })?;
    drop(agent);
    drop(relay);
    drop(backend);
    let primary = report_primary(opts);
    let m = report.metric("scale.ws", SC, "relay RSS per idle WebSocket", "KiB", false);
    m.samples.entry(primary.clone()).or_default().push(per_ws);
    m.targets = vec![Target::Max(16.0)];
    m.detail.insert("run".into(), detail);
    report
        .metric(
            "scale.ws.agent",
            SC,
            "agent RSS per idle WebSocket",
            "KiB",
            false,
        )
        .samples
        .entry(primary)
        .or_default()
        .push(per_ws_agent);
    Ok(())
}

fn scenario_lifecycle(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    backend_port: u16,
    report: &mut Report,
) {
    const SC: &str = "6 lifecycle";
    let primary = report_primary(opts);
    let idle = opts.kill_idle_timeout;
    eprintln!(
        "[lifecycle] relay --idle-timeout {idle} --resume-grace 0; {} reps",
        opts.lifecycle_reps
    );
    let result = (|| -> Result<()> {
        let relay = start_relay(
            setup,
            opts.workers[0],
            &["--idle-timeout", &idle.to_string(), "--resume-grace", "0"],
        )?;
        let tls = setup.client_tls(&[b"h2"])?;
        for rep in 0..opts.lifecycle_reps {
            // App-ready → URL: the agent starts the app, which listens after 300 ms.
            let ready_file = setup.dir.join(format!("ready-{rep}"));
            let mut c = agent_command(setup, &relay, Some(opts.workers[0]));
            c.arg("--")
                .arg(&setup.exe)
                .arg(BACKEND_FLAG)
                .arg("127.0.0.1:{port}")
                .arg("--ready-file")
                .arg(&ready_file)
                .args(["--delay-ms", "300"]);
            let mut agent = start_agent(c)?;
            let text =
                std::fs::read_to_string(&ready_file).context("the app wrote no ready file")?;
            let ready_ns: u128 = text
                .split_whitespace()
                .next()
                .and_then(|t| t.parse().ok())
                .context("bad ready file")?;
            let url_ns = agent.url_at.duration_since(UNIX_EPOCH)?.as_nanos();
            let ms = (url_ns as f64 - ready_ns as f64) / 1e6;
            eprintln!("  rep {rep}: app ready → URL printed {ms:.1} ms");
            let m = report.metric("life.url", SC, "app ready → URL printed", "ms", false);
            m.samples.entry(primary.clone()).or_default().push(ms);
            m.targets = vec![Target::Max(50.0)];

            // Clean exit (SIGTERM, as at the end of a job) → 404.
            let session = agent.session.clone();
            let port = relay.https;
            let (probe, exit_ms) = runtime.block_on(async {
                let sender = h2_connect(&tls, port, &session.host).await?;
                let status = sender
                    .clone()
                    .send_request(probe_request(port, &session)?)
                    .await?
                    .status();
                if status != StatusCode::OK {
                    bail!("the session answered {status} before the exit");
                }
                let t0 = Instant::now();
                agent.proc.signal(nix::sys::signal::Signal::SIGTERM);
                let probe = probe_until_404(
                    &sender,
                    port,
                    &session,
                    t0,
                    Duration::from_millis(2),
                    Duration::from_secs(10),
                )
                .await?;
                let mut exit_ms = None;
                while t0.elapsed() < Duration::from_secs(15) {
                    if let Ok(Some(_)) = agent.proc.child.try_wait() {
                        exit_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok::<_, anyhow::Error>((probe, exit_ms))
            })?;
            eprintln!(
                "  rep {rep}: SIGTERM → 404 {:.1} ms (agent exited after {exit_ms:?} ms)",
                probe.first_404
            );
            let m = report.metric("life.clean", SC, "clean exit (SIGTERM) → 404", "ms", false);
            m.samples
                .entry(primary.clone())
                .or_default()
                .push(probe.first_404);
            m.targets = vec![Target::Max(1000.0)];
            if let Some(ms) = exit_ms {
                m.detail.entry("agent_exit_ms").or_insert_with(|| json!([]));
                if let Some(list) = m
                    .detail
                    .get_mut("agent_exit_ms")
                    .and_then(Value::as_array_mut)
                {
                    list.push(json!(ms));
                }
            }
        }

        // SIGKILL → 5xx/404 (detected by the QUIC idle timeout; no resume grace).
        let kills = opts.lifecycle_reps.min(2);
        for rep in 0..kills {
            let mut c = agent_command(setup, &relay, Some(opts.workers[0]));
            c.arg("--to").arg(format!("127.0.0.1:{backend_port}"));
            let agent = start_agent(c)?;
            let session = agent.session.clone();
            let port = relay.https;
            let probe = runtime.block_on(async {
                let sender = h2_connect(&tls, port, &session.host).await?;
                let status = sender
                    .clone()
                    .send_request(probe_request(port, &session)?)
                    .await?
                    .status();
                if status != StatusCode::OK {
                    bail!("the session answered {status} before the kill");
                }
                let t0 = Instant::now();
                agent.proc.signal(nix::sys::signal::Signal::SIGKILL);
                probe_until_404(
                    &sender,
                    port,
                    &session,
                    t0,
                    Duration::from_millis(10),
                    Duration::from_secs(idle + 15),
                )
                .await
            })?;
            drop(agent);
            eprintln!(
                "  kill {rep}: first answer {:?}, 404 after {:.0} ms (idle timeout {idle} s)",
                probe.first_other, probe.first_404
            );
            let m = report.metric("life.kill", SC, "SIGKILL → 404", "ms", false);
            m.samples
                .entry(primary.clone())
                .or_default()
                .push(probe.first_404);
            m.targets = vec![Target::Max(idle as f64 * 1000.0)];
            m.notes.push(format!(
                "relay --idle-timeout {idle} --resume-grace 0; probes every 10 ms"
            ));
            if let Some((ms, status)) = probe.first_other {
                let m = report.metric(
                    "life.kill.first",
                    SC,
                    "SIGKILL → first error answer",
                    "ms",
                    false,
                );
                m.samples.entry(primary.clone()).or_default().push(ms);
                m.notes.push(format!("status {status}"));
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        record_error(
            report,
            ("life.url", SC, "app ready → URL printed", "ms", false),
            &primary,
            &e,
        );
    }
}
