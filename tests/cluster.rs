//! User stories of a centre running several relays that share their names through a real
//! etcd: a browser reaching any relay is served, wherever the session's agent is; the
//! death (kill -9) or freeze (SIGSTOP) of the relay holding a session moves it to another
//! in seconds with its URL; live sessions ride out an etcd outage while new ones wait; two
//! agents racing to resume one name get one winner; a name ended on one relay never
//! comes back on another. The etcd client itself is tested in relay/tests/etcd.rs.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use jobgate_agent::dial::{self, DialError};
use jobgate_harness::client::{client_tls, ws_connect, WsTarget};
use jobgate_harness::etcd::Etcd;
use jobgate_protocol::RefusalCode;
use nix::sys::signal::Signal;
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The agents' idle timeout here: how fast an agent notices a dead relay.
const AGENT_IDLE_SECS: &str = "3";
/// The promise: within this long of a relay's death the URL serves from the others.
const FAILOVER: Duration = Duration::from_secs(10);
/// How long a change in etcd may take to reach every relay's copy.
const PROPAGATION: Duration = Duration::from_secs(5);

const BASE: [&str; 9] = [
    "relay",
    "--domain",
    "example.org",
    "--cert",
    "/nonexistent/c",
    "--key",
    "/nonexistent/k",
    "--tokens",
    "/nonexistent/t",
];

fn relay_with(extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(BASE)
        .args(extra)
        .output()
        .expect("run jobgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cluster_settings_go_together() {
    let (code, stderr) = relay_with(&["--node-id", "r1"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("need cluster_etcd"), "{stderr}");

    let (code, stderr) =
        relay_with(&["--cluster-etcd", "http://127.0.0.1:2379", "--node-id", "r1"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("peer_listen and peer_advertise"),
        "{stderr}"
    );
}

/// Three relays of one cluster, and the etcd they share.
struct Cluster {
    env: TestEnv,
    etcd: Etcd,
    relays: Vec<RelayProc>,
}

impl Cluster {
    fn start(name: &str, size: usize) -> Self {
        let env = TestEnv::new(name);
        let etcd = Etcd::start().unwrap_or_else(|e| panic!("{e}"));
        let relays = (1..=size)
            .map(|i| clustered_relay(&env, &etcd, i))
            .collect();
        Self { env, etcd, relays }
    }

    /// Every relay's QUIC address, as an agent's `--relay` list.
    fn relay_list(&self) -> String {
        self.relays
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.quic_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// An agent with a demo app, given the relays `relays` (a `--relay` list).
    fn agent(&self, relays: &str, label: &str) -> AgentProc {
        let token = self.env.token_file(label);
        let url_file = self.env.dir.join(format!("{label}.url"));
        start_agent_command(
            self.agent_command(relays, &token, &url_file, label),
            &url_file,
        )
    }

    fn agent_command(
        &self,
        relays: &str,
        token: &std::path::Path,
        url_file: &std::path::Path,
        label: &str,
    ) -> Command {
        self.agent_command_with(relays, token, url_file, label, &[])
    }

    /// [`Cluster::agent_command`] with `extra` agent flags.
    fn agent_command_with(
        &self,
        relays: &str,
        token: &std::path::Path,
        url_file: &std::path::Path,
        label: &str,
        extra: &[&std::ffi::OsStr],
    ) -> Command {
        let mut command = Command::new(&self.env.bin);
        command
            .args(["agent", "--relay", relays, "--relay-ca"])
            .arg(&self.env.ca)
            .arg("--token-file")
            .arg(token)
            .args(["--idle-timeout", AGENT_IDLE_SECS, "--transport", "quic"])
            .arg("--url-file")
            .arg(url_file)
            .args(extra)
            .args(["--", &self.env.bin.to_string_lossy(), "demo-app"])
            .args(["--listen", "127.0.0.1:{port}", "--label", label]);
        command
    }

    /// Which relay (index) says it opened a session under `agent`'s name last.
    fn holder(&self, agent: &AgentProc) -> usize {
        let name = session_name(agent);
        let holders: Vec<usize> = (0..self.relays.len())
            .filter(|i| {
                self.relays[*i]
                    .proc
                    .stderr()
                    .lines()
                    .any(|l| l.contains("session opened") && l.contains(&name))
            })
            .collect();
        assert_eq!(holders.len(), 1, "one relay opened {name}: {holders:?}");
        holders[0]
    }

    /// Asserts that every relay in `alive` serves `agent`'s URL (within `within`).
    async fn assert_served_by(&self, alive: &[usize], agent: &AgentProc, within: Duration) {
        for i in alive {
            let port = self.relays[*i].https_port;
            let served = eventually(within, || async {
                status_of(&self.env, port, agent, "/echo").await == StatusCode::OK
            })
            .await;
            let last = status_of(&self.env, port, agent, "/echo").await;
            assert!(
                served.is_some(),
                "relay {} does not serve {} within {within:?} (now: {last})\nagent:\n{}\nrelay:\n{}",
                i + 1,
                agent.url,
                agent.proc.stderr(),
                self.relays[*i].proc.stderr()
            );
        }
    }
}

fn session_name(agent: &AgentProc) -> String {
    agent
        .host()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Relay `r<i>` of the cluster: its own ports, the shared etcd, the dev PKI for the peer
/// link (the wildcard leaf has no EKU, so it serves as client and server certificate).
fn clustered_relay(env: &TestEnv, etcd: &Etcd, i: usize) -> RelayProc {
    let (ca, cert, key) = (
        env.ca.display().to_string(),
        env.cert.display().to_string(),
        env.key.display().to_string(),
    );
    let node = format!("r{i}");
    let state = env.dir.join(format!("r{i}.state")).display().to_string();
    // r2 serves on two cores: the browsers other relays forward to it (and its own) are
    // spread over two runtimes, and every story below must hold all the same.
    let cores = if i == 2 { "2" } else { "1" };
    start_relay(
        env,
        &[
            "--cores",
            cores,
            "--cluster-etcd",
            &etcd.url,
            "--node-id",
            &node,
            "--peer-listen",
            "127.0.0.1:0",
            "--peer-advertise",
            "127.0.0.1:0",
            "--peer-ca",
            &ca,
            "--peer-cert",
            &cert,
            "--peer-key",
            &key,
            "--state-file",
            &state,
            "--listen-metrics",
            "127.0.0.1:0",
            // One URL for every relay, as behind one DNS name (their test ports differ).
            "--url-port",
            "443",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_serves_every_session_and_a_killed_owner_moves_it_in_seconds() {
    let mut c = Cluster::start("cluster-serve", 3);
    let everywhere = c.relay_list();
    // Agents spread over the relays: one given all three, two pinned to one each.
    let roaming = c.agent(&everywhere, "roaming");
    let on_r2 = c.agent(&format!("127.0.0.1:{}", c.relays[1].quic_port), "pinned2");
    let on_r3 = c.agent(&format!("127.0.0.1:{}", c.relays[2].quic_port), "pinned3");
    assert_eq!(c.holder(&on_r2), 1);
    assert_eq!(c.holder(&on_r3), 2);
    for agent in [&roaming, &on_r2, &on_r3] {
        c.assert_served_by(&[0, 1, 2], agent, PROPAGATION).await;
    }

    // Through a relay that does not hold the session: a WebSocket, and a body streamed.
    let session = on_r2.session().unwrap_or_else(|e| panic!("{e}"));
    let target = WsTarget::Relay {
        port: c.relays[0].https_port,
        tls: client_tls(&c.env.ca, &[b"http/1.1"]).unwrap_or_else(|e| panic!("{e}")),
        session,
    };
    // The key in the query (no cookie, no Origin): each test relay has its own port, so a
    // browser's origin would differ per relay here, unlike behind one DNS name and port.
    let mut ws = ws_connect(&target, &on_r2.path("/ws"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ws.send(Message::text("through r1 to r2"))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an echo in time")
        .expect("an echo")
        .expect("a message");
    assert_eq!(
        echoed.into_text().expect("text").as_str(),
        "through r1 to r2"
    );
    download_checked(&c.env, c.relays[0].https_port, &on_r2, 16 << 20).await;
    upload_checked(&c.env, c.relays[2].https_port, &on_r2, 16 << 20).await;

    // Every relay's metrics say who holds what; the one that forwarded counts it.
    let metrics = c.relays[0].metrics_addr().unwrap_or_else(|e| panic!("{e}"));
    let (_, text) = plain_http(metrics, "GET", "/metrics", None).await;
    assert!(
        metric_sample(&text, "jobgate_cluster_sessions{relay=\"r2\"}") >= 1.0,
        "{text}"
    );
    assert!(
        metric_sample(&text, "jobgate_cluster_sessions{relay=\"r3\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric_sample(&text, "jobgate_cluster_node{relay=\"r1\"}"),
        1.0
    );
    assert!(
        metric_sample(&text, "jobgate_peer_forwarded_connections_total") >= 2.0,
        "{text}"
    );

    // kill -9 the relay that holds the roaming session: it comes back on another.
    let holder = c.holder(&roaming);
    c.relays[holder].proc.signal(Signal::SIGKILL);
    let _ = c.relays[holder].proc.wait_exit(Duration::from_secs(10));
    let survivors: Vec<usize> = (0..3).filter(|i| *i != holder).collect();
    let started = std::time::Instant::now();
    c.assert_served_by(&survivors, &roaming, FAILOVER).await;
    eprintln!(
        "failover after kill -9: URL back on every survivor in {:?}",
        started.elapsed()
    );
    assert!(
        roaming
            .proc
            .stderr()
            .contains("reconnected; the URL is unchanged"),
        "{}",
        roaming.proc.stderr()
    );
    drop(c.etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_loses_its_names_and_when_it_wakes_serves_them_from_their_new_relay() {
    let c = Cluster::start("cluster-stop", 2);
    let agent = c.agent(&c.relay_list(), "frozen");
    c.assert_served_by(&[0, 1], &agent, PROPAGATION).await;
    let holder = c.holder(&agent);
    let other = 1 - holder;

    c.relays[holder].proc.signal(Signal::SIGSTOP);
    c.assert_served_by(&[other], &agent, FAILOVER + Duration::from_secs(5))
        .await;
    c.relays[holder].proc.signal(Signal::SIGCONT);
    // Awake, its lease is gone: it must not serve the name from the dead connection, but
    // hand its browsers to the relay that holds the session now.
    let woke = eventually(Duration::from_secs(15), || async {
        c.relays[holder].proc.stderr().contains("etcd lease lost")
    })
    .await;
    assert!(woke.is_some(), "{}", c.relays[holder].proc.stderr());
    c.assert_served_by(&[holder, other], &agent, PROPAGATION)
        .await;
    let name = session_name(&agent);
    let reopened = c.relays[other]
        .proc
        .stderr()
        .lines()
        .any(|l| l.contains("session opened") && l.contains(&name));
    assert!(reopened, "{}", c.relays[other].proc.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_live_sessions_keep_serving_and_new_ones_wait_until_it_is_back() {
    let mut c = Cluster::start("cluster-etcd-down", 2);
    let live = c.agent(&format!("127.0.0.1:{}", c.relays[0].quic_port), "live");
    c.assert_served_by(&[0, 1], &live, PROPAGATION).await;

    c.etcd.kill();
    // Through its own relay and through the other (its copy of the routes): still served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.assert_served_by(&[0, 1], &live, PROPAGATION).await;

    // A new agent waits, and says why.
    let token = c.env.token_file("newcomer");
    let url_file = c.env.dir.join("newcomer.url");
    let relay = format!("127.0.0.1:{}", c.relays[1].quic_port);
    let waiting = spawn(c.agent_command(&relay, &token, &url_file, "newcomer"));
    let said = eventually(Duration::from_secs(20), || async {
        waiting.stderr().contains("shared store is unreachable")
    })
    .await;
    assert!(said.is_some(), "{}", waiting.stderr());
    assert!(!url_file.exists(), "no URL while etcd is away");
    // Longer than a lease: the relays' leases lapse meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.assert_served_by(&[0, 1], &live, PROPAGATION).await;

    c.etcd.restart().unwrap_or_else(|e| panic!("{e}"));
    // The agent retries with a backoff of up to 30 s.
    let url = eventually(Duration::from_secs(60), || async { url_file.exists() }).await;
    assert!(
        url.is_some(),
        "no URL after etcd came back:\n{}",
        waiting.stderr()
    );
    // Nothing lost: the old session serves from both relays again, under its old URL.
    c.assert_served_by(&[0, 1], &live, Duration::from_secs(20))
        .await;
    drop(waiting);
}

fn token_of(env: &TestEnv, user: &str) -> String {
    std::fs::read_to_string(env.token_file(user))
        .expect("token file")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_racing_to_resume_one_name_on_two_relays_get_exactly_one_winner() {
    let mut c = Cluster::start("cluster-race", 3);
    let token = token_of(&c.env, "alice");
    let first = dial::open_session(
        &dial_config(&c.env, &c.relays[0]),
        &link_hello(&token, None),
    )
    .await
    .expect("a session on r1");
    let name = first.welcome.name.clone();
    let ticket = first.welcome.resume_ticket.clone();
    // Its relay dies; two connections present the same ticket to the two others at once.
    c.relays[0].proc.signal(Signal::SIGKILL);
    let _ = c.relays[0].proc.wait_exit(Duration::from_secs(10));
    let (to_r2, to_r3) = (
        dial_config(&c.env, &c.relays[1]),
        dial_config(&c.env, &c.relays[2]),
    );
    let resume = link_hello(&token, ticket);
    let (on_r2, on_r3) = tokio::join!(
        dial::open_session(&to_r2, &resume),
        dial::open_session(&to_r3, &resume),
    );
    let (winner, loser) = match (on_r2, on_r3) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (Ok(_), Ok(_)) => panic!("both relays gave {name} back"),
        (Err(a), Err(b)) => panic!("nobody won: {a}; {b}"),
    };
    assert_eq!(winner.welcome.name, name, "the winner resumed the name");
    match loser {
        DialError::Refused {
            code: RefusalCode::TryAgain,
            message,
        } => assert!(
            message.contains(&name) && message.contains("relay r"),
            "{message}"
        ),
        other => panic!("expected a clear refusal, got {other}"),
    }
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_ended_on_one_relay_never_comes_back_on_another() {
    let c = Cluster::start("cluster-ended", 2);
    let token = token_of(&c.env, "alice");
    let mut session = dial::open_session(
        &dial_config(&c.env, &c.relays[0]),
        &link_hello(&token, None),
    )
    .await
    .expect("a session on r1");
    let name = session.welcome.name.clone();
    let ticket = session.welcome.resume_ticket.clone();
    say_bye(&mut session).await;
    let host = format!("{name}.{DOMAIN}");
    let ended = eventually(Duration::from_secs(10), || async {
        get(&c.env, c.relays[1].https_port, &host, "/").await.0 == StatusCode::NOT_FOUND
            && get(&c.env, c.relays[0].https_port, &host, "/").await.0 == StatusCode::NOT_FOUND
    })
    .await;
    assert!(ended.is_some(), "the ended name still answers");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let again = dial::open_session(
        &dial_config(&c.env, &c.relays[1]),
        &link_hello(&token, ticket.clone()),
    )
    .await;
    match again {
        Err(DialError::Refused { message, .. }) => {
            assert!(message.contains("has ended"), "{message}")
        }
        Ok(s) => panic!("r2 gave back {} (asked for {name})", s.welcome.name),
        Err(e) => panic!("unexpected: {e}"),
    }
    // The next try with the same ticket gets a new name.
    let fresh = dial::open_session(
        &dial_config(&c.env, &c.relays[1]),
        &link_hello(&token, ticket),
    )
    .await
    .expect("a new session");
    assert_ne!(fresh.welcome.name, name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_url_answers_on_every_relay_and_its_agent_may_come_to_any() {
    let c = Cluster::start("cluster-reserve", 2);
    let token_file = c.env.token_file("alice");
    let token = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .to_owned();
    // `jobgate launch` reserves on r1 at submit time.
    let reserved = dial::reserve(
        &dial_config(&c.env, &c.relays[0]),
        jobgate_protocol::Token(token),
        Some(jobgate_protocol::AccessMode::Link),
        "4242",
    )
    .await
    .expect("a reservation");
    let host = format!("{}.{DOMAIN}", reserved.name);
    let key = reserved
        .access_url
        .split("jobgate_key=")
        .nth(1)
        .expect("a key in the reserved link")
        .to_owned();
    let status = format!("/.jobgate/status?jobgate_key={key}");
    // Through r2 too: the status r1 keeps for the waiting job (its page polls it), not 404.
    for relay in &c.relays {
        let port = relay.https_port;
        let waiting = eventually(PROPAGATION, || async {
            let (code, _, body) = get(&c.env, port, &host, &status).await;
            code == StatusCode::OK && json(&body).get("state").is_some()
        })
        .await;
        assert!(
            waiting.is_some(),
            "relay on {port} does not answer for the waiting job: {:?}",
            get(&c.env, port, &host, &status).await
        );
    }

    // The job starts; its agent reaches r2 (not the relay that reserved): same URL.
    let file = write_reservation_file(&c.env.dir, "4242", &reserved);
    let url_file = c.env.dir.join("held.url");
    let relay = format!("127.0.0.1:{}", c.relays[1].quic_port);
    let flags = ["--reservation-file".as_ref(), file.as_os_str()];
    let mut command = c.agent_command_with(&relay, &token_file, &url_file, "held", &flags);
    command.env("SLURM_JOB_ID", "4242");
    let agent = start_agent_command(command, &url_file);
    assert_eq!(
        agent.url, reserved.access_url,
        "the reserved link, key included"
    );
    assert_eq!(c.holder(&agent), 1);
    c.assert_served_by(&[0, 1], &agent, PROPAGATION).await;
}
