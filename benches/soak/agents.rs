//! The agents' side of the soak, run as a child process of the bench (`SOAK_ROLE=agents`):
//! agents built from the `jobgate-agent` library (each its own QUIC endpoint and connection,
//! like a job's agent), each forwarding to its own instance of the harness's backend app
//! (`jobgate_harness::app`), labelled with the agent's slot and generation (its `/id`) and
//! echoing WebSockets on `/ws`. A session ends with the library's own `RelaySession::bye`
//! (the job ended) or a close without `Bye` (a crash).
//!
//! Why a separate process: at the scale (5,000 client requests and WebSockets at
//! once) clients, agents and apps in one process need ~16,000 file descriptors, too close
//! to this machine's hard limit of 20,000. Apart, each side has headroom, and a failure is
//! the relay's or the agent's, never the bench's own descriptor table.
//!
//! Talk with the bench is line-based. Commands on stdin: `start` (spawn the churning
//! slots), `stop` (every churning agent says Bye; answers `stopped`), `quit` (the stable
//! agents say Bye too; answers `stopped`, then exits), `sync N` (answers `synced N`).
//! Events on stdout, in the order they happened: `up SLOT NAME KEY IDENT`, `blip SLOT`
//! (gone without Bye, reconnecting with the ticket), `back SLOT` (the same name again),
//! `down SLOT` (this generation is ending), `c COUNTER` (count one), `note TEXT`, `ready`
//! (every stable agent is up). An event is written before the action it announces (the
//! close), so once the bench has read `synced N`, sent after it saw a failure, it knows
//! whether the agent had begun to leave before that failure.

use crate::{chance, nap, rand_f64, rand_ms, Opts, CRASH_CODE};
use anyhow::{anyhow, Result};
use jobgate_agent::dial::{self, DialConfig, HelloParams, RelaySession};
use jobgate_agent::target::{Target, TargetPool};
use jobgate_protocol::{AccessMode, JobInfo, Token};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

/// Environment the bench passes to this process.
pub const ENV_ROLE: &str = "SOAK_ROLE";
const ENV_KIND: &str = "SOAK_KIND";
const ENV_RELAY: &str = "SOAK_RELAY";
const ENV_CA: &str = "SOAK_CA";
const ENV_TOKEN: &str = "SOAK_TOKEN_FILE";

/// How the bench starts one agents process.
pub struct Launch<'a> {
    /// Stable agents (up for the whole run) or churning ones.
    pub stable: bool,
    /// The relay's QUIC address.
    pub relay: String,
    /// The CA that signed the relay's certificate.
    pub ca: &'a std::path::Path,
    /// A file holding the agent token.
    pub token_file: &'a std::path::Path,
}

impl Launch<'_> {
    /// The command for this process: this same bench binary in the agents role.
    pub fn command(&self) -> Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.env(ENV_ROLE, "agents")
            .env(ENV_KIND, if self.stable { "stable" } else { "churn" })
            .env(ENV_RELAY, &self.relay)
            .env(ENV_CA, self.ca)
            .env(ENV_TOKEN, self.token_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        Ok(cmd)
    }
}

struct Agents {
    opts: Opts,
    stable: bool,
    dial: DialConfig,
    token: Token,
    events: UnboundedSender<String>,
    /// Ends the current phase's churning agents.
    phase_stop: AtomicBool,
    /// Ends the stable agents.
    all_stop: AtomicBool,
}

impl Agents {
    fn emit(&self, event: String) {
        let _ = self.events.send(event);
    }
    fn count(&self, counter: &str) {
        self.emit(format!("c {counter}"));
    }
    fn note(&self, text: String) {
        self.emit(format!("note {}", text.replace('\n', " ")));
    }
}

/// The agents process: runs until `quit` or until the bench closes stdin.
pub fn main(opts: Opts) -> Result<()> {
    let var = |name: &str| std::env::var(name).map_err(|_| anyhow!("{name} not set"));
    let stable = var(ENV_KIND)? == "stable";
    let token = std::fs::read_to_string(var(ENV_TOKEN)?)?.trim().to_owned();
    let dial = DialConfig {
        idle_timeout: Duration::from_secs(15),
        transport: jobgate_agent::dial::TransportChoice::Quic,
        ..DialConfig::new(var(ENV_RELAY)?, Some(PathBuf::from(var(ENV_CA)?)))
    };
    // This process holds thousands of sockets: lift the soft descriptor limit.
    jobgate_harness::process::raise_nofile()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (tx, rx) = unbounded_channel();
        let writer = tokio::spawn(write_events(rx));
        let agents = Arc::new(Agents {
            opts,
            stable,
            dial,
            token: Token(token),
            events: tx,
            phase_stop: AtomicBool::new(false),
            all_stop: AtomicBool::new(false),
        });
        let mut slots = Vec::new();
        if stable {
            slots = start_stable(&agents).await;
        }
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("start") => {
                    agents.phase_stop.store(false, Relaxed);
                    slots = (0..agents.opts.agents)
                        .map(|slot| {
                            let agents = agents.clone();
                            tokio::spawn(async move {
                                // Spread the first connections over 5 s.
                                tokio::time::sleep(rand_ms(5000)).await;
                                agent_slot(agents, slot, None).await
                            })
                        })
                        .collect();
                }
                Some(cmd @ ("stop" | "quit")) => {
                    agents.phase_stop.store(true, Relaxed);
                    if cmd == "quit" {
                        agents.all_stop.store(true, Relaxed);
                    }
                    for task in slots.drain(..) {
                        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
                    }
                    agents.emit("stopped".into());
                    if cmd == "quit" {
                        break;
                    }
                }
                Some("sync") => agents.emit(format!("synced {}", words.next().unwrap_or("0"))),
                _ => agents.note(format!("agents process: unknown command {line:?}")),
            }
        }
        drop(agents);
        let _ = writer.await;
        Ok(())
    })
}

/// Writes events to stdout in the order they were sent, flushing whenever none is waiting.
async fn write_events(mut rx: UnboundedReceiver<String>) {
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(line) = next {
            if out.write_all(line.as_bytes()).await.is_err() || out.write_all(b"\n").await.is_err()
            {
                return;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

/// Starts the stable agents and waits until every one is up; says `ready`.
async fn start_stable(agents: &Arc<Agents>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut readies = Vec::new();
    for slot in 0..agents.opts.stable {
        let (tx, rx) = tokio::sync::oneshot::channel();
        readies.push(rx);
        tasks.push(tokio::spawn(agent_slot(agents.clone(), slot, Some(tx))));
    }
    for rx in readies {
        let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
    }
    agents.emit("ready".into());
    tasks
}

// ---------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------

async fn open(agents: &Agents, resume: Option<Token>) -> Result<RelaySession> {
    let hello = HelloParams {
        token: agents.token.clone(),
        access: Some(AccessMode::Link),
        share: Default::default(),
        job: JobInfo::default(),
        resume,
        reservation: None,
        moving: false,
    };
    Ok(dial::open_session(&agents.dial, &hello).await?)
}

fn key_of(access_url: &str) -> String {
    access_url
        .split("jobgate_key=")
        .nth(1)
        .unwrap_or("")
        .split('&')
        .next()
        .unwrap_or("")
        .to_owned()
}

async fn crash(session: &RelaySession) {
    // A code the relay does not know: a connection lost, not a job's end.
    if let Some(quic) = session.connection.as_quic() {
        quic.close(quinn::VarInt::from_u32(CRASH_CODE), b"crash");
    }
    if let Some(endpoint) = &session.endpoint {
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    }
}

fn serve(session: &RelaySession, pool: &Arc<TargetPool>) -> JoinHandle<()> {
    let conn = session.connection.clone();
    let pool = pool.clone();
    tokio::spawn(async move {
        let _ = jobgate_agent::serve::serve_streams(conn, pool).await;
    })
}

/// One agent slot: generation after generation until the phase (or, stable, the run) ends.
async fn agent_slot(
    agents: Arc<Agents>,
    slot: usize,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let stable = agents.stable;
    let mut gen = 0u64;
    let stop = if stable {
        &agents.all_stop
    } else {
        &agents.phase_stop
    };
    while !stop.load(Relaxed) {
        gen += 1;
        let ident = format!(
            "{}slot={slot}/gen={gen}",
            if stable { "stable/" } else { "" }
        );
        let Ok((addr, backend)) = jobgate_harness::app::spawn_app(&ident).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let pool = Arc::new(TargetPool::new(Target::Tcp(addr)));
        let mut session = match open(&agents, None).await {
            Ok(s) => s,
            Err(e) => {
                agents.count("open_errors");
                agents.note(format!("agent slot {slot}: open failed: {e:#}"));
                backend.abort();
                nap(1.0, stop).await;
                continue;
            }
        };
        let name = session.welcome.name.clone();
        agents.count("sessions_opened");
        agents.emit(format!(
            "up {slot} {name} {} {ident}",
            key_of(&session.welcome.access_url)
        ));
        let mut ticket = session.welcome.resume_ticket.clone();
        let mut serving = serve(&session, &pool);
        if stable {
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
            while !stop.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        } else {
            let (lo, hi) = (
                agents.opts.life_min,
                agents.opts.life_max.max(agents.opts.life_min + 0.1),
            );
            nap(rand_f64(lo, hi), stop).await;
            // 15 % blip: gone without Bye, back at once with the ticket.
            if !stop.load(Relaxed) && chance(0.15) {
                agents.count("blips");
                agents.emit(format!("blip {slot}"));
                crash(&session).await;
                let _ = serving.await;
                match open(&agents, ticket.clone()).await {
                    Ok(s) if s.welcome.name == name => {
                        agents.count("blip_same_name");
                        session = s;
                        if let Some(t) = session.welcome.resume_ticket.clone() {
                            ticket = Some(t);
                        }
                        serving = serve(&session, &pool);
                        agents.emit(format!("back {slot}"));
                        nap(rand_f64(lo, hi) / 2.0, stop).await;
                    }
                    Ok(s) => {
                        agents.count("blip_new_name");
                        agents.note(format!("blip: {name} came back as {}", s.welcome.name));
                        session = s;
                        serving = serve(&session, &pool);
                    }
                    Err(e) => {
                        agents.count("open_errors");
                        agents.note(format!("blip: {name} could not reconnect: {e:#}"));
                        agents.emit(format!("down {slot}"));
                        backend.abort();
                        continue;
                    }
                }
            }
        }
        // The end of this generation: announced first, so clients stop picking it.
        agents.emit(format!("down {slot}"));
        // At the end of a phase everyone says Bye (quiesce); otherwise 25 % crash.
        if !stop.load(Relaxed) && chance(0.25) {
            agents.count("sessions_crashed");
            crash(&session).await;
        } else {
            agents.count("sessions_bye");
            // The agent library's own clean end, as `jobgate agent` says it when a job ends.
            session.bye("soak").await;
        }
        let _ = serving.await;
        drop(session);
        backend.abort();
    }
}
