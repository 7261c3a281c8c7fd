//! Soak test (issue 6): agents churning against one relay under client load.
//!
//!     cargo bench --bench soak                 # defaults below, ~4 min on 2 vCPUs
//!     SOAK_AGENTS=1000 SOAK_CLIENTS=1000 SOAK_WEBSOCKETS=4000 SOAK_SECS=600 cargo bench --bench soak
//!
//! Three kinds of process: one real `jobgate relay`; two agents processes (this same binary
//! with `SOAK_ROLE=agents`, see `agents.rs`), one for the stable agents and one for the
//! churning ones, each agent with its own QUIC endpoint and its own little backend; and
//! this process, the clients (`clients.rs`), which learns from the agents processes' events
//! which sessions are live and checks that every answer comes from the right one.
//!
//! Agents live a random time, then end one of three ways: `Bye` (the job ended), a close
//! without `Bye` (a crash: the name is parked for --resume-grace), or a blip (close without
//! `Bye`, then reconnect with the resume ticket: the name must come back).
//!
//! Phases: warm-up churn → quiesce (churning agents gone, resume grace over) → baseline
//! relay RSS and file descriptors → the soak → quiesce → the same figures again.
//! Checks: no request misrouted (a 200 from the wrong agent), none lost (failed while its
//! agent stayed up), no stable WebSocket broken or answered wrongly, every WebSocket of a
//! departed agent closed promptly, every blip got its old name back, the relay's file
//! descriptors back to baseline, its RSS back near it, and its own account (`/metrics`) of
//! sessions, parked names, requests in flight, WebSockets and runtime tasks back to
//! baseline after the soak and to its start once everyone is gone. Prints a summary and writes
//! target/bench/soak.json; exits non-zero on a failed check.
//!
//! Knobs (environment): SOAK_AGENTS churning agents [300], SOAK_STABLE stable agents [20],
//! SOAK_SECS soak duration [180], SOAK_WARMUP_SECS [20], SOAK_CLIENTS request loops [48],
//! SOAK_WEBSOCKETS WebSockets on stable agents [500], SOAK_CHURN_WS WebSockets on churning
//! agents [40], SOAK_LIFE_MIN/SOAK_LIFE_MAX agent lifetime in seconds [5/40],
//! SOAK_GRACE the relay's --resume-grace [10], SOAK_RSS_SLACK_PCT allowed RSS growth [15],
//! SOAK_RELAY_CORES the relay's --cores [1].

mod agents;
mod clients;
mod relay;

use anyhow::{anyhow, Result};
use clients::{AgentsProcess, Ctx};
use jobgate_harness::stack::TestEnv;
use rand::Rng;
use relay::{settled, start_relay, Relay};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The relay's domain.
pub use jobgate_harness::DOMAIN;
/// A close code the relay does not know: a crash-like end, the name is parked.
const CRASH_CODE: u32 = 1000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Debug)]
pub struct Opts {
    agents: usize,
    stable: usize,
    secs: u64,
    warmup: u64,
    clients: usize,
    websockets: usize,
    churn_ws: usize,
    life_min: f64,
    life_max: f64,
    grace: u64,
    rss_slack_pct: f64,
    /// The relay's `--cores` (one runtime per core).
    relay_cores: usize,
}

impl Opts {
    fn from_env() -> Self {
        Self {
            agents: env_or("SOAK_AGENTS", 300),
            stable: env_or("SOAK_STABLE", 20).max(1),
            secs: env_or("SOAK_SECS", 180),
            warmup: env_or("SOAK_WARMUP_SECS", 20),
            clients: env_or("SOAK_CLIENTS", 48),
            websockets: env_or("SOAK_WEBSOCKETS", 500),
            churn_ws: env_or("SOAK_CHURN_WS", 40),
            life_min: env_or("SOAK_LIFE_MIN", 5.0),
            life_max: env_or("SOAK_LIFE_MAX", 40.0),
            grace: env_or("SOAK_GRACE", 10),
            rss_slack_pct: env_or("SOAK_RSS_SLACK_PCT", 15.0),
            relay_cores: env_or("SOAK_RELAY_CORES", 1),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        /// Every count the soak keeps; agents processes report theirs by name.
        #[derive(Default)]
        pub struct Counters { $(pub $field: AtomicU64,)* }
        impl Counters {
            /// The counter called `name`.
            pub fn by_name(&self, name: &str) -> Option<&AtomicU64> {
                match name {
                    $(stringify!($field) => Some(&self.$field),)*
                    _ => None,
                }
            }
            fn snapshot(&self) -> BTreeMap<&'static str, u64> {
                let mut m = BTreeMap::new();
                $(m.insert(stringify!($field), self.$field.load(Relaxed));)*
                m
            }
        }
    };
}

counters!(
    sessions_opened,
    sessions_bye,
    sessions_crashed,
    blips,
    blip_same_name,
    blip_new_name,
    open_errors,
    req_ok,
    req_misrouted,
    req_lost,
    req_churn,
    req_h2,
    ws_opened,
    ws_msgs_ok,
    ws_stable_broken,
    ws_wrong_echo,
    ws_churn_closed,
    ws_churn_lost,
    ws_hung,
    ws_close_latency_max_ms,
);

fn rand_f64(lo: f64, hi: f64) -> f64 {
    rand::thread_rng().gen_range(lo..hi)
}

fn rand_ms(max: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..max))
}

fn chance(p: f64) -> bool {
    rand::thread_rng().gen_bool(p)
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

async fn nap(secs: f64, stop: &AtomicBool) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end && !stop.load(Relaxed) {
        tokio::time::sleep(
            Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

/// Runs one phase of churn and load for `secs`; returns the peak relay RSS and fds.
async fn phase(
    ctx: &Arc<Ctx>,
    relay: &Relay,
    churners: &AgentsProcess,
    peaks: &mut ProcPeaks,
    secs: u64,
    label: &str,
) -> Result<(u64, u64)> {
    ctx.phase_stop.store(false, Relaxed);
    churners.start().await?;
    let mut tasks = Vec::new();
    for id in 0..ctx.opts.clients {
        tasks.push(tokio::spawn(clients::request_loop(ctx.clone(), id)));
    }
    for id in 0..ctx.opts.churn_ws {
        tasks.push(tokio::spawn(clients::churn_ws(ctx.clone(), id)));
    }
    let start = Instant::now();
    let mut peak = (0u64, 0u64);
    let mut last = (
        Instant::now(),
        ctx.c.req_ok.load(Relaxed) + ctx.c.req_churn.load(Relaxed),
    );
    let mut next_print = Instant::now() + Duration::from_secs(15);
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, fds) = (relay.rss_kib(), relay.fds());
        peak = (peak.0.max(rss), peak.1.max(fds));
        peaks.sample();
        if Instant::now() >= next_print {
            next_print += Duration::from_secs(15);
            let reqs = ctx.c.req_ok.load(Relaxed) + ctx.c.req_churn.load(Relaxed);
            let rate = (reqs - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), reqs);
            eprintln!(
                "  [{label} {:>4.0} s] live agents {} + {} stable, sessions opened {}, req/s {:.0}, ok {} misrouted {} lost {} churn-failed {}, ws msgs {}, relay RSS {} MiB, fds {}, threads {}",
                start.elapsed().as_secs_f64(),
                ctx.live_churn(),
                ctx.opts.stable,
                ctx.c.sessions_opened.load(Relaxed),
                rate,
                ctx.c.req_ok.load(Relaxed),
                ctx.c.req_misrouted.load(Relaxed),
                ctx.c.req_lost.load(Relaxed),
                ctx.c.req_churn.load(Relaxed),
                ctx.c.ws_msgs_ok.load(Relaxed),
                rss / 1024,
                fds,
                relay.threads(),
            );
        }
    }
    ctx.phase_stop.store(true, Relaxed);
    let t = Instant::now();
    churners.stop("stop").await?;
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    eprintln!(
        "  [{label}] stopped: every churning agent said Bye, clients done, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(peak)
}

/// Peak descriptors and memory of the bench's own processes: the figures that show the
/// load generator itself had room to spare.
#[derive(Default)]
struct ProcPeaks {
    pids: Vec<(&'static str, u32)>,
    peaks: BTreeMap<&'static str, (u64, u64)>,
}

impl ProcPeaks {
    fn sample(&mut self) {
        for (label, pid) in &self.pids {
            let (fds, rss) = (relay::fds(*pid), relay::rss_kib(*pid));
            let e = self.peaks.entry(label).or_default();
            *e = (e.0.max(fds), e.1.max(rss));
        }
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let opts = Opts::from_env();
    if std::env::var(agents::ENV_ROLE).as_deref() == Ok("agents") {
        return agents::main(opts);
    }
    let hard = jobgate_harness::process::raise_nofile()?;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_jobgate"));
    let env = TestEnv::create(&bin, "jobgate-soak")?;
    let (_, token_path) = env.issue_token("soak")?;

    eprintln!(
        "soak: {} churning agents (life {}-{} s; 60 % Bye, 25 % crash, 15 % blip+resume) + {} stable, {} request loops (1/4 HTTP/2), {} WebSockets on stable agents, {} on churning ones; warm-up {} s, soak {} s, resume grace {} s; RLIMIT_NOFILE {hard}",
        opts.agents, opts.life_min, opts.life_max, opts.stable, opts.clients, opts.websockets, opts.churn_ws, opts.warmup, opts.secs, opts.grace
    );
    let relay = start_relay(&env, &opts)?;
    let ca = env.ca.clone();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let ctx = Arc::new(Ctx::new(opts.clone(), relay.https, &ca)?);
        let start_figures = settled(&relay).await;
        let launch = |stable| agents::Launch {
            stable,
            relay: format!("127.0.0.1:{}", relay.quic),
            ca: &ca,
            token_file: &token_path,
        };
        let stable = AgentsProcess::spawn(&launch(true), &ctx)?;
        let churners = AgentsProcess::spawn(&launch(false), &ctx)?;
        ctx.procs
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .extend([stable.clone(), churners.clone()]);
        let mut peaks = ProcPeaks {
            pids: vec![
                ("clients (this process)", std::process::id()),
                ("stable agents + apps", stable.pid()),
                ("churning agents + apps", churners.pid()),
            ],
            ..Default::default()
        };

        // Stable agents and their WebSockets: there from before the baseline to the end.
        stable.ready().await?;
        let mut ws_tasks = Vec::new();
        for id in 0..opts.websockets {
            ws_tasks.push(tokio::spawn(clients::stable_ws(ctx.clone(), id)));
        }

        phase(&ctx, &relay, &churners, &mut peaks, opts.warmup, "warm-up").await?;
        eprintln!("  quiesce: waiting out the resume grace ({} s) and 5 s more", opts.grace);
        tokio::time::sleep(Duration::from_secs(opts.grace + 5)).await;
        let baseline = settled(&relay).await;
        let warm_counts = ctx.c.snapshot();
        eprintln!(
            "  baseline (after warm-up, {} stable agents, {} WebSockets open): relay RSS {} KiB, fds {}, threads {}",
            opts.stable, ctx.c.ws_opened.load(Relaxed), baseline.rss_kib, baseline.fds, baseline.threads
        );
        let cpu0 = relay.cpu_s();
        let t0 = Instant::now();
        let peak = phase(&ctx, &relay, &churners, &mut peaks, opts.secs, "soak").await?;
        let soak_wall = t0.elapsed().as_secs_f64();
        let cpu = relay.cpu_s() - cpu0;
        eprintln!("  quiesce: waiting out the resume grace ({} s) and 5 s more", opts.grace);
        tokio::time::sleep(Duration::from_secs(opts.grace + 5)).await;
        let after = settled(&relay).await;

        // Stable WebSockets: still answering after everything?
        ctx.all_stop.store(true, Relaxed);
        for t in ws_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(40), t).await;
        }
        stable.stop("quit").await?;
        churners.stop("quit").await?;
        tokio::time::sleep(Duration::from_secs(opts.grace.min(3) + 2)).await;
        let empty = settled(&relay).await;
        Ok::<_, anyhow::Error>((ctx, start_figures, baseline, peak, after, empty, warm_counts, cpu, soak_wall, peaks))
    });
    let (ctx, start_figures, baseline, peak, after, empty, warm_counts, cpu, soak_wall, peaks) =
        result?;
    drop(runtime);

    let c = ctx.c.snapshot();
    let soak_count = |k: &str| c[k] - warm_counts.get(k).copied().unwrap_or(0);
    let requests = soak_count("req_ok")
        + soak_count("req_churn")
        + soak_count("req_lost")
        + soak_count("req_misrouted");
    let rss_limit = baseline.rss_kib as f64 * (1.0 + opts.rss_slack_pct / 100.0);
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        c["req_misrouted"] == 0 && c["ws_wrong_echo"] == 0,
        format!(
            "{} requests and {} WebSocket messages misrouted",
            c["req_misrouted"], c["ws_wrong_echo"]
        ),
    );
    check(
        c["req_lost"] == 0,
        format!(
            "{} requests lost (failed while their agent stayed up)",
            c["req_lost"]
        ),
    );
    check(
        c["ws_stable_broken"] == 0,
        format!("{} stable WebSockets broke", c["ws_stable_broken"]),
    );
    check(
        c["ws_churn_lost"] == 0,
        format!(
            "{} WebSockets on churning agents broke while their agent was up",
            c["ws_churn_lost"]
        ),
    );
    check(
        c["ws_hung"] == 0,
        format!(
            "{} WebSockets stayed open after their agent left",
            c["ws_hung"]
        ),
    );
    check(
        c["blip_new_name"] == 0,
        format!("{} blips came back under a new name", c["blip_new_name"]),
    );
    check(
        after.fds <= baseline.fds,
        format!(
            "relay fds {} after the soak vs {} before",
            after.fds, baseline.fds
        ),
    );
    // The relay's own account: the mappings, streams and tasks of the churn are all gone.
    let stable = opts.stable as u64;
    check(
        after.live == stable && after.parked == 0 && after.in_flight == 0,
        format!(
            "after the soak the relay holds {} live sessions ({} stable agents), {} parked, {} requests in flight",
            after.live, stable, after.parked, after.in_flight
        ),
    );
    check(
        after.upgraded <= baseline.upgraded && after.tasks <= baseline.tasks,
        format!(
            "relay WebSockets {} and runtime tasks {} after the soak vs {} and {} before",
            after.upgraded, after.tasks, baseline.upgraded, baseline.tasks
        ),
    );
    check(
        empty.live == 0
            && empty.parked == 0
            && empty.upgraded == 0
            && empty.client_connections == 0
            && empty.fds <= start_figures.fds
            && empty.tasks <= start_figures.tasks,
        format!(
            "with every agent and client gone the relay still holds {} sessions, {} parked, {} WebSockets, {} client connections, {} fds (at start {}), {} tasks (at start {})",
            empty.live, empty.parked, empty.upgraded, empty.client_connections, empty.fds, start_figures.fds, empty.tasks, start_figures.tasks
        ),
    );
    check(
        after.rss_kib as f64 <= rss_limit,
        format!(
            "relay RSS {} KiB after the soak vs {} KiB before (> +{}%)",
            after.rss_kib, baseline.rss_kib, opts.rss_slack_pct
        ),
    );

    println!();
    println!(
        "soak summary ({} churning + {} stable agents, {:.0} s soak)",
        opts.agents, opts.stable, soak_wall
    );
    println!("  sessions opened              {:>10}  ({:.1}/s during the soak; Bye {}, crash {}, blips {} → same name {})",
        c["sessions_opened"], soak_count("sessions_opened") as f64 / soak_wall, c["sessions_bye"], c["sessions_crashed"], c["blips"], c["blip_same_name"]);
    println!(
        "  requests (soak)              {:>10}  ({:.0}/s; {} over HTTP/2 in all)",
        requests,
        requests as f64 / soak_wall,
        c["req_h2"]
    );
    println!(
        "    answered by the right agent {:>9}",
        soak_count("req_ok")
    );
    println!(
        "    failed as their agent left {:>9}  (404/503/502 while ending or blipping: expected)",
        soak_count("req_churn")
    );
    println!("    misrouted                  {:>9}", c["req_misrouted"]);
    println!("    lost (agent up throughout) {:>9}", c["req_lost"]);
    println!(
        "  WebSockets opened            {:>10}  (messages echoed intact: {})",
        c["ws_opened"], c["ws_msgs_ok"]
    );
    println!(
        "    stable ones broken         {:>9}  of {}",
        c["ws_stable_broken"], opts.websockets
    );
    println!(
        "    closed with their agent    {:>9}  (latest close {:.1} s after the agent ended)",
        c["ws_churn_closed"],
        c["ws_close_latency_max_ms"] as f64 / 1000.0
    );
    println!(
        "    wrong echo / hung / lost   {:>3} / {:>3} / {:>3}",
        c["ws_wrong_echo"], c["ws_hung"], c["ws_churn_lost"]
    );
    println!(
        "  agent connect errors         {:>10}  ({} during the soak; each agent retried and got in)",
        c["open_errors"],
        soak_count("open_errors")
    );
    println!(
        "  relay CPU during the soak    {:>10.1} s  ({:.0} % of one core)",
        cpu,
        100.0 * cpu / soak_wall
    );
    println!("  relay                          RSS KiB    fds  threads   live parked  in-flight  websockets  client-conns  tasks");
    let row = |label: &str, f: &relay::Figures| {
        println!(
            "    {label:<26} {:>9} {:>6} {:>8} {:>6} {:>6} {:>10} {:>11} {:>13} {:>6}",
            f.rss_kib,
            f.fds,
            f.threads,
            f.live,
            f.parked,
            f.in_flight,
            f.upgraded,
            f.client_connections,
            f.tasks
        )
    };
    row("at start (no agents)", &start_figures);
    row("baseline (after warm-up)", &baseline);
    println!("    peak during the soak       {:>9} {:>6}", peak.0, peak.1);
    row("after the soak, quiet", &after);
    row("all agents gone", &empty);
    println!("  load generator (peaks)       fds   RSS KiB   of RLIMIT_NOFILE {hard}");
    for (label, (fds, rss)) in &peaks.peaks {
        println!("    {label:<26} {fds:>6} {rss:>9}");
    }
    let notes = |m: &std::sync::Mutex<Vec<String>>| m.lock().map(|l| l.clone()).unwrap_or_default();
    for m in notes(&ctx.misroutes)
        .iter()
        .chain(notes(&ctx.losses).iter())
    {
        println!("  note: {m}");
    }

    let out = json!({
        "opts": {
            "agents": opts.agents, "stable": opts.stable, "secs": opts.secs, "warmup": opts.warmup,
            "clients": opts.clients, "websockets": opts.websockets, "churn_ws": opts.churn_ws,
            "life_min": opts.life_min, "life_max": opts.life_max, "grace": opts.grace,
        },
        "counters": c,
        "soak_seconds": soak_wall,
        "soak_requests": requests,
        "relay_cpu_seconds": cpu,
        "relay": {
            "start": start_figures.json(),
            "baseline": baseline.json(),
            "peak": {"rss_kib": peak.0, "fds": peak.1},
            "after": after.json(),
            "empty": empty.json(),
        },
        "load_generator_peaks": peaks.peaks.iter().map(|(k, (fds, rss))| (k.to_string(), json!({"fds": fds, "rss_kib": rss}))).collect::<serde_json::Map<_, _>>(),
        "failures": failures,
    });
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out_dir);
    let _ = std::fs::write(
        out_dir.join("soak.json"),
        serde_json::to_string_pretty(&out)?,
    );
    drop(relay);
    drop(env);
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        for f in &failures {
            println!("soak: FAIL: {f}");
        }
        std::process::exit(1);
    }
}
