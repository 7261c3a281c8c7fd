//! Scenario 4: WebSocket round trips (100 B echoes) and one-way throughput (64 KiB
//! messages into a sink), direct to the backend app and through each jobgate variant.

use crate::report::{add_cpu_detail, alternate, cpu_us, percentile, record_error, Report};
use crate::setup::{CpuWatch, JobgateStack, Setup};
use crate::tools::HttpVariant;
use crate::{Opts, CHUNK, MB};
use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use jobgate_harness::app::SINK_END;
use jobgate_harness::client::{ws_connect, Ws, WsTarget};
use nix::sys::resource::UsageWho;
use std::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Payload of a WebSocket round trip.
const WS_RTT_BYTES: usize = 100;
/// Round trips thrown away before measuring.
const WS_WARMUP: usize = 200;

/// One way to reach the backend's WebSockets.
pub struct WsVariant {
    pub name: String,
    pub target: WsTarget,
    /// The processes serving it (the backend, and a stack's relay and agent).
    pub cpu: CpuWatch,
}

/// The variants: direct to the backend app on `backend_port`, and each stack's app agent;
/// `servers` are the upload variants, which watch the same processes.
pub fn variants(
    setup: &Setup,
    backend_port: u16,
    stacks: &[JobgateStack],
    servers: &[HttpVariant],
) -> Result<Vec<WsVariant>> {
    let tls = setup.client_tls(&[b"http/1.1"])?;
    let cpu = |name: &str| {
        servers
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.cpu.clone())
            .unwrap_or(CpuWatch { pids: Vec::new() })
    };
    let mut variants = vec![WsVariant {
        name: "direct".into(),
        target: WsTarget::Direct(backend_port),
        cpu: cpu("direct"),
    }];
    variants.extend(stacks.iter().map(|s| WsVariant {
        name: s.name.clone(),
        cpu: cpu(&s.name),
        target: WsTarget::Relay {
            port: s.relay.https_port,
            tls: tls.clone(),
            session: s.app_session.clone(),
        },
    }));
    Ok(variants)
}

/// Round-trip times of 100-byte messages, µs.
pub async fn ws_rtt(ws: &mut Ws, samples: usize) -> Result<Vec<f64>> {
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
pub async fn ws_oneway(ws: &mut Ws, total: u64) -> Result<f64> {
    let message = vec![0u8; CHUNK];
    let count = total / CHUNK as u64;
    let start = Instant::now();
    for _ in 0..count {
        ws.send(Message::Binary(message.clone())).await?;
    }
    ws.send(Message::Text(SINK_END.into())).await?;
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

pub fn scenario_ws(
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
            let mut ws = ws_connect(&v.target, "/ws").await?;
            let rtt = ws_rtt(&mut ws, opts.ws_rtt_samples).await?;
            let _ = ws.close(None).await;
            let mut sink = ws_connect(&v.target, "/ws-sink").await?;
            // A line to start a profiler on (perf record/sched for the one-way run only).
            eprintln!("  rep {rep} {}: one way starts", v.name);
            let before = v.cpu.snapshot();
            let client_before = cpu_us(UsageWho::RUSAGE_SELF);
            let rate = ws_oneway(&mut sink, opts.ws_oneway_bytes).await?;
            let mb = opts.ws_oneway_bytes as f64 / MB;
            let cpu = v.cpu.per_unit(&before, mb);
            // The bench process is the client here (WebSocket masking, and TLS through a
            // relay): its share of the two cores is part of what the rate is made of.
            let client = (cpu_us(UsageWho::RUSAGE_SELF) - client_before) / mb;
            let _ = sink.close(None).await;
            Ok::<_, anyhow::Error>((rtt, rate, cpu, client))
        });
        match result {
            Ok((rtt, rate, cpu, client)) => {
                let (p50, p99) = (percentile(&rtt, 50.0), percentile(&rtt, 99.0));
                eprintln!(
                    "  rep {rep} {}: RTT p50 {p50:.0} µs p99 {p99:.0} µs, one way {rate:.0} MB/s (cpu µs/MB {cpu:?}, client {client:.0})",
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
                let m = report.metric(
                    "ws.oneway.cpu",
                    SC,
                    "one way: server CPU per MB",
                    "µs",
                    false,
                );
                add_cpu_detail(m, &v.name, &cpu);
                m.samples
                    .entry(v.name.clone())
                    .or_default()
                    .push(cpu.values().sum());
                push(
                    report,
                    "ws.oneway.client_cpu",
                    "one way: client CPU per MB",
                    "µs",
                    false,
                    client,
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
