//! Scenario 5: relay (and agent) memory per idle agent and per idle WebSocket.

use crate::report::{Report, Target};
use crate::setup::{start_backend, tcp_variant_name, use_tcp_transport, variant_name, Setup};
use crate::Opts;
use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use jobgate_harness::client::{ws_connect, Ws, WsTarget};
use jobgate_harness::stack::launch_agent;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The scenario's name in the report.
const SC: &str = "5 scale";
/// Longer than the relay's interval between writes of its state file.
const STATE_WRITE_WAIT: Duration =
    jobgate_relay::state::STATE_SAVE_INTERVAL.saturating_add(Duration::from_secs(1));
/// How long the relay's CPU is sampled while N agents idle.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(5);

/// Both measurements; an error is recorded in the report, the run goes on.
pub fn scenario_scale(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
) {
    let primary = report.primary.clone();
    if let Err(e) = scenario_scale_agents(opts, setup, runtime, report) {
        report
            .metric("scale.agent", SC, "relay RSS per idle agent", "KiB", false)
            .errors
            .push(format!("{primary}: {e:#}"));
    }
    for tcp in [false, true] {
        if tcp && !opts.tcp {
            continue;
        }
        if let Err(e) = scenario_scale_ws(opts, setup, runtime, report, tcp) {
            let variant = ws_variant(opts, tcp);
            report
                .metric("scale.ws", SC, "relay RSS per idle WebSocket", "KiB", false)
                .errors
                .push(format!("{variant}: {e:#}"));
        }
    }
}

/// With `JOBGATE_BENCH_CORES`, the scale relays serve on its first entry (`--cores`):
/// memory and re-admission of a relay on several cores.
fn cores_flags(opts: &Opts) -> Vec<String> {
    match opts.cores.first() {
        Some(cores) => vec!["--cores".into(), cores.to_string()],
        None => Vec::new(),
    }
}

/// The variant a WebSocket measurement counts for.
fn ws_variant(opts: &Opts, tcp: bool) -> String {
    if tcp {
        tcp_variant_name(opts.workers[0])
    } else {
        variant_name(opts.workers[0])
    }
}

/// Relay RSS per idle agent: N agents (QUIC connection + Hello each) from this process.
fn scenario_scale_agents(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
) -> Result<()> {
    let n = opts.agents;
    eprintln!("[scale] {n} idle agents on one relay");
    let limit = (n + 64).to_string();
    // One user opens every agent at once: lift the per-user rate of new sessions too.
    let mut relay_flags = vec![
        "--max-sessions-per-user",
        &limit,
        "--max-new-sessions-per-user-per-minute",
        "0",
    ];
    let cores = cores_flags(opts);
    relay_flags.extend(cores.iter().map(String::as_str));
    let relay = setup.start_relay(opts.workers[0], &relay_flags)?;
    let dial = jobgate_agent::dial::DialConfig {
        idle_timeout: Duration::from_secs(30),
        transport: jobgate_agent::dial::TransportChoice::Quic,
        ..jobgate_agent::dial::DialConfig::new(
            format!("127.0.0.1:{}", relay.quic_port),
            Some(setup.env.ca.clone()),
        )
    };
    let hello = jobgate_agent::dial::HelloParams {
        token: jobgate_protocol::Token(setup.token.clone()),
        access: Some(jobgate_protocol::AccessMode::Link),
        share: Default::default(),
        job: jobgate_protocol::JobInfo::default(),
        resume: None,
        reservation: None,
        moving: false,
    };
    let (per_agent, connect_s, idle_cpu_pct, readmit_s, relay, detail) = runtime.block_on(async {
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
        // What N idle agents cost the relay in CPU: keep-alives and their ACKs.
        let pid = relay.proc.pid();
        let cpu0 = jobgate_harness::process::cpu_ns(pid);
        tokio::time::sleep(IDLE_CPU_WINDOW).await;
        let idle_cpu_pct = (jobgate_harness::process::cpu_ns(pid).saturating_sub(cpu0)) as f64
            / IDLE_CPU_WINDOW.as_nanos() as f64
            * 100.0;
        eprintln!("  relay RSS {before} KiB → {after} KiB for {n} agents: {per:.1} KiB each; connected in {connect_s:.2} s; relay CPU while they idle {idle_cpu_pct:.1} % of a core");
        // A relay restart: killed, started again on the same ports; every agent comes
        // back with its resume ticket (32 at a time, as they connected) and must get its
        // old name.
        tokio::time::sleep(STATE_WRITE_WAIT).await;
        let tickets: Vec<(String, Option<jobgate_protocol::Token>)> = sessions
            .iter()
            .chain(&warm)
            .map(|s| (s.welcome.name.clone(), s.welcome.resume_ticket.clone()))
            .collect();
        relay.proc.signal(nix::sys::signal::Signal::SIGKILL);
        let (https_port, quic_port) = (relay.https_port, relay.quic_port);
        drop(relay);
        // Each agent here has its own QUIC endpoint in this one process: closing the old
        // connections now frees them (and their endpoints) before the new ones open,
        // instead of letting them wait out their idle timeout beside them. (A real agent
        // has one endpoint at a time.)
        for s in sessions.iter().chain(&warm) {
            s.connection
                .close(jobgate_protocol::CloseCode::Normal, b"relay gone");
        }
        drop(sessions);
        drop(warm);
        let relay = setup.start_relay_at(opts.workers[0], &relay_flags, https_port, quic_port)?;
        let start = Instant::now();
        let back: Vec<_> = futures_util::stream::iter(&tickets)
            .map(|(name, ticket)| {
                let hello = jobgate_agent::dial::HelloParams {
                    resume: ticket.clone(),
                    ..hello.clone()
                };
                let dial = &dial;
                async move {
                    let began = Instant::now();
                    let session = jobgate_agent::dial::open_session(dial, &hello).await?;
                    let took = began.elapsed().as_secs_f64();
                    anyhow::Ok((session.welcome.name == *name, session, took))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let readmit_s = start.elapsed().as_secs_f64();
        let back: Vec<_> = back.into_iter().collect::<Result<_, _>>()?;
        let same = back.iter().filter(|(same, ..)| *same).count();
        // The slowest single reconnect shows a tail (a lost handshake packet waits for
        // QUIC's retransmission timer) that the total would hide.
        let slowest = back.iter().map(|(.., took)| *took).fold(0.0, f64::max);
        eprintln!("  relay restarted: {same} of {} agents back under their old names in {readmit_s:.2} s (slowest reconnect {slowest:.2} s)", tickets.len());
        if same != tickets.len() {
            bail!("{} agents got another name after the restart", tickets.len() - same);
        }
        for (_, s, _) in &back {
            s.connection
                .close(jobgate_protocol::CloseCode::Normal, b"bench done");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, anyhow::Error>((
            per,
            connect_s,
            idle_cpu_pct,
            readmit_s,
            relay,
            json!({"agents": n, "relay_rss_before_kib": before, "relay_rss_after_kib": after, "connect_seconds": connect_s, "relay_idle_cpu_percent": idle_cpu_pct, "readmit_seconds": readmit_s, "slowest_reconnect_seconds": slowest}),
        ))
    })?;
    // A relay stopped before it saw every close saves the rest as parked sessions (to be
    // resumed after a restart): the next scenario's relay must not load them.
    drop(relay);
    let _ = std::fs::remove_file(setup.env.dir.join("jobgate-state.json"));
    let m = report.metric("scale.agent", SC, "relay RSS per idle agent", "KiB", false);
    m.samples
        .entry(variant_name(opts.workers[0]))
        .or_default()
        .push(per_agent);
    m.targets = vec![Target::Max(64.0)];
    m.detail.insert("run".into(), detail);
    let primary = variant_name(opts.workers[0]);
    for (id, metric, unit, value) in [
        (
            "scale.agent.connect",
            format!("{n} agents admitted (32 at a time)"),
            "s",
            connect_s,
        ),
        (
            "scale.agent.idle_cpu",
            format!("relay CPU, {n} idle agents"),
            "% core",
            idle_cpu_pct,
        ),
        (
            "scale.agent.readmit",
            format!("{n} agents back after a relay restart"),
            "s",
            readmit_s,
        ),
    ] {
        report
            .metric(id, SC, &metric, unit, false)
            .samples
            .entry(primary.clone())
            .or_default()
            .push(value);
    }
    Ok(())
}

/// Most idle WebSockets opened through a TCP-transport agent: the streams the relay lets
/// such an agent have at once, less the warm-up sockets and some room.
const TCP_MAX_WEBSOCKETS: usize = jobgate_relay::agents::TCP_AGENT_STREAMS - 56;

/// Relay RSS per idle WebSocket: N upgraded connections through one relay and agent,
/// the agent on QUIC or (`tcp`) on the TCP transport.
fn scenario_scale_ws(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
    tcp: bool,
) -> Result<()> {
    // A TCP-transport session carries fewer streams at once; per socket, fewer measure
    // the same.
    let n = if tcp {
        opts.websockets.min(TCP_MAX_WEBSOCKETS)
    } else {
        opts.websockets
    };
    let transport = if tcp { "TCP" } else { "QUIC" };
    eprintln!("[scale] {n} idle WebSockets through one relay (agent on {transport})");
    let (backend, backend_port) = start_backend(setup)?;
    let cores = cores_flags(opts);
    let cores: Vec<&str> = cores.iter().map(String::as_str).collect();
    let relay = setup.start_relay(opts.workers[0], &cores)?;
    let mut c = setup.agent_command(&relay, opts.workers[0]);
    if tcp {
        use_tcp_transport(&mut c, &relay);
    }
    c.arg("--to").arg(format!("127.0.0.1:{backend_port}"));
    let agent = launch_agent(c)?;
    let target = WsTarget::Relay {
        port: relay.https_port,
        tls: setup.client_tls(&[b"http/1.1"])?,
        session: agent.session()?,
    };
    let (per_ws, per_ws_agent, detail) = runtime.block_on(async {
        let open = |count: usize| {
            futures_util::stream::iter(0..count)
                .map(|_| ws_connect(&target, "/ws"))
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
    let primary = ws_variant(opts, tcp);
    let m = report.metric("scale.ws", SC, "relay RSS per idle WebSocket", "KiB", false);
    m.samples.entry(primary.clone()).or_default().push(per_ws);
    m.targets = vec![Target::Max(16.0)];
    m.detail.insert(format!("run {primary}"), detail);
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
