//! Scenario 6: the lifecycle of a session: app ready → URL printed, clean exit (SIGTERM)
//! → 404, SIGKILL → 404 (found by the relay's idle timeout).

use crate::report::{record_error, Report, Target};
use crate::setup::{variant_name, Setup};
use crate::Opts;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use jobgate_harness::app::APP_FLAG;
use jobgate_harness::client::{connect_tls, h2_handshake};
use jobgate_harness::stack::{launch_agent, Session, URL_MARKER};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

pub type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

pub async fn h2_connect(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    host: &str,
) -> Result<H2Sender> {
    Ok(h2_handshake(connect_tls(config, port, host).await?).await?)
}

pub fn probe_request(port: u16, session: &Session) -> Result<Request<Empty<Bytes>>> {
    Ok(
        Request::get(format!("https://{}:{port}/small", session.host))
            .header(header::COOKIE, &session.cookie)
            .body(Empty::new())?,
    )
}

/// Times (ms after `t0`) of the first non-200 answer and of the first 404.
pub struct ProbeResult {
    pub first_other: Option<(f64, u16)>,
    pub first_404: f64,
}

/// How long one lifecycle probe may hang (a dead agent's requests hang until the idle
/// timeout) before it is given up; probes overlap, so none is missed.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Sends a probe every `interval` (each on its own HTTP/2 stream, so a hung request does
/// not delay the next) until one is answered 404.
pub async fn probe_until_404(
    sender: &H2Sender,
    port: u16,
    session: &Session,
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

pub fn scenario_lifecycle(
    opts: &Opts,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    backend_port: u16,
    report: &mut Report,
) {
    const SC: &str = "6 lifecycle";
    let primary = variant_name(opts.workers[0]);
    let idle = opts.kill_idle_timeout;
    eprintln!(
        "[lifecycle] relay --idle-timeout {idle} --resume-grace 0; {} reps",
        opts.lifecycle_reps
    );
    let result = (|| -> Result<()> {
        let relay = setup.start_relay(
            opts.workers[0],
            &["--idle-timeout", &idle.to_string(), "--resume-grace", "0"],
        )?;
        let tls = setup.client_tls(&[b"h2"])?;
        for rep in 0..opts.lifecycle_reps {
            // App-ready → URL: the agent starts the app, which listens after 300 ms.
            let ready_file = setup.env.dir.join(format!("ready-{rep}"));
            let mut c = setup.agent_command(&relay, opts.workers[0]);
            c.arg("--")
                .arg(&setup.exe)
                .arg(APP_FLAG)
                .arg("127.0.0.1:{port}")
                .arg("--ready-file")
                .arg(&ready_file)
                .args(["--delay-ms", "300"]);
            let mut agent = launch_agent(c)?;
            let text =
                std::fs::read_to_string(&ready_file).context("the app wrote no ready file")?;
            let ready_ns: u128 = text
                .split_whitespace()
                .next()
                .and_then(|t| t.parse().ok())
                .context("bad ready file")?;
            let (url_at, _) = agent
                .proc
                .find_line(URL_MARKER)
                .context("the agent's URL line")?;
            let url_ns = url_at.duration_since(UNIX_EPOCH)?.as_nanos();
            let ms = (url_ns as f64 - ready_ns as f64) / 1e6;
            eprintln!("  rep {rep}: app ready → URL printed {ms:.1} ms");
            let m = report.metric("life.url", SC, "app ready → URL printed", "ms", false);
            m.samples.entry(primary.clone()).or_default().push(ms);
            m.targets = vec![Target::Max(50.0)];

            // Clean exit (SIGTERM, as at the end of a job) → 404.
            let session = agent.session()?;
            let port = relay.https_port;
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
            let mut c = setup.agent_command(&relay, opts.workers[0]);
            c.arg("--to").arg(format!("127.0.0.1:{backend_port}"));
            let agent = launch_agent(c)?;
            let session = agent.session()?;
            let port = relay.https_port;
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
