//! User stories for clusters where UDP does not get out: the agent falls back to TLS over
//! TCP on the relay's HTTPS port, through an HTTP proxy where that is the only way out,
//! and moves back to QUIC when UDP passes again — the URL never changes.
//!
//! A firewall that drops UDP is played by [`UdpGate`], a forwarder in front of the relay's
//! QUIC port that swallows every datagram while closed (tests/e2e/fallback.sh does the
//! same with real nftables rules in a network namespace).

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[path = "../transport/tests/support/mod.rs"]
mod proxy_support;

/// Bulk transfer each way.
const BULK: u64 = 64 * 1024 * 1024;
/// How long a test waits for the agent to move back to QUIC (it probes every second).
const MOVE_BACK: Duration = Duration::from_secs(30);

/// A UDP forwarder to the relay's QUIC port that drops every datagram while closed.
struct UdpGate {
    port: u16,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpGate {
    async fn closed_in_front_of(relay_quic: u16) -> Self {
        let outside = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let inside = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        inside
            .connect(("127.0.0.1", relay_quic))
            .await
            .expect("connect");
        let port = outside.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(false));
        let is_open = open.clone();
        let task = tokio::spawn(async move {
            // The latest sender gets the answers: each QUIC probe has a socket of its own.
            let client: Mutex<Option<SocketAddr>> = Mutex::new(None);
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = outside.recv_from(&mut up) => {
                        if is_open.load(Ordering::Relaxed) {
                            *client.lock().expect("lock") = Some(from);
                            let _ = inside.send(&up[..n]).await;
                        }
                    }
                    Ok(n) = inside.recv(&mut down) => {
                        let to = *client.lock().expect("lock");
                        if let (true, Some(to)) = (is_open.load(Ordering::Relaxed), to) {
                            let _ = outside.send_to(&down[..n], to).await;
                        }
                    }
                }
            }
        });
        Self { port, open, task }
    }

    fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
    }
}

/// `jobgate agent` running the demo app, dialing QUIC at `quic` and TLS/TCP at the relay's
/// HTTPS port, with `extra` flags; waits for its URL.
fn start_agent_via(
    env: &TestEnv,
    relay: &RelayProc,
    quic: u16,
    token: &Path,
    extra: &[&str],
    set_env: &[(&str, String)],
) -> AgentProc {
    let url_file = env.dir.join(format!("url-{}", rand::random::<u64>()));
    let mut command = Command::new(&env.bin);
    command
        .arg("agent")
        .arg("--relay")
        .arg(format!("127.0.0.1:{quic}"))
        .arg("--relay-ca")
        .arg(&env.ca)
        .arg("--token-file")
        .arg(token)
        .arg("--url-file")
        .arg(&url_file)
        .arg("--relay-tcp")
        .arg(format!("127.0.0.1:{}", relay.https_port))
        .args(extra)
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY");
    for (name, value) in set_env {
        command.env(name, value);
    }
    command.args(["--", &env.bin.to_string_lossy(), "demo-app"]);
    command.args(["--listen", "127.0.0.1:{port}", "--label", "behind-firewall"]);
    start_agent_command(command, &url_file)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn open_websocket(env: &TestEnv, relay: &RelayProc, agent: &AgentProc) -> Ws {
    let host = agent.host();
    let tls = tls_connect(env, relay.https_port, &host, &[b"http/1.1"]).await;
    let request = format!("wss://{host}:{}{}", relay.https_port, agent.path("/ws"))
        .into_client_request()
        .expect("request");
    let (ws, response) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn echo_on(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned())).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .expect("message")
        .expect("ok");
    assert_eq!(echoed, Message::Text(text.to_owned()));
}

async fn websocket_echo(env: &TestEnv, relay: &RelayProc, agent: &AgentProc, messages: usize) {
    let mut ws = open_websocket(env, relay, agent).await;
    for i in 0..messages {
        let text = format!("over tcp {i}");
        ws.send(Message::Text(text.clone())).await.expect("send");
        let echoed = ws.next().await.expect("message").expect("ok");
        assert_eq!(echoed, Message::Text(text));
    }
}

async fn sessions_by_transport(metrics: SocketAddr, transport: &str) -> f64 {
    let text = plain_http(metrics, "GET", "/metrics", None).await.1;
    metric_sample(
        &text,
        &format!("jobgate_sessions_by_transport{{transport=\"{transport}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_udp_is_dropped_the_agent_serves_everything_over_tcp() {
    let env = TestEnv::new("fallback");
    let mut relay = start_relay(&env, &["--listen-metrics", "127.0.0.1:0"]);
    let metrics = relay.metrics_addr().expect("metrics address");
    let gate = UdpGate::closed_in_front_of(relay.quic_port).await;
    let token = env.token_file("alice");

    let agent = start_agent_via(&env, &relay, gate.port, &token, &[], &[]);
    let said = agent.proc.stderr();
    assert!(
        said.contains(&format!(
            "connected over TCP/TLS to 127.0.0.1:{}: no QUIC answer from 127.0.0.1:{} in 3 s",
            relay.https_port, gate.port
        )),
        "the agent must say which transport it uses and why:\n{said}"
    );

    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
    // Far more requests than the relay lets a TCP session have open at once: each
    // request's stream must be gone once it is answered.
    let host = agent.host();
    let mut sender = h1(&env, relay.https_port, &host).await;
    for i in 0..600 {
        sender.ready().await.expect("connection ready");
        let request = Request::get(agent.path(&format!("/echo?i={i}")))
            .header("host", &host)
            .body(empty())
            .expect("request");
        let (status, _, _) = collect(sender.send_request(request).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
    }
    download_checked(&env, relay.https_port, &agent, BULK).await;
    upload_checked(&env, relay.https_port, &agent, BULK).await;
    websocket_echo(&env, &relay, &agent, 50).await;
    assert_eq!(sessions_by_transport(metrics, "tcp").await, 1.0);
    assert_eq!(sessions_by_transport(metrics, "quic").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_udp_passes_again_the_session_moves_back_to_quic_under_the_same_url() {
    let env = TestEnv::new("moveback");
    let mut relay = start_relay(&env, &["--listen-metrics", "127.0.0.1:0"]);
    let metrics = relay.metrics_addr().expect("metrics address");
    let gate = UdpGate::closed_in_front_of(relay.quic_port).await;
    let token = env.token_file("alice");
    let agent = start_agent_via(
        &env,
        &relay,
        gate.port,
        &token,
        &["--quic-reprobe", "1"],
        &[],
    );
    assert!(agent.proc.stderr().contains("connected over TCP/TLS"));
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
    // A notebook's kernel WebSocket, open over TCP across the move.
    let mut kernel = open_websocket(&env, &relay, &agent).await;
    echo_on(&mut kernel, "before the move").await;

    gate.open();
    let moved = eventually(MOVE_BACK, || async {
        agent
            .proc
            .stderr()
            .contains("QUIC answers again: moved to QUIC")
    })
    .await;
    assert!(
        moved.is_some(),
        "never moved back:\n{}",
        agent.proc.stderr()
    );
    assert!(
        agent.proc.stderr().contains("the URL is unchanged"),
        "{}",
        agent.proc.stderr()
    );
    // The same URL serves, now over QUIC; the TCP connection is gone.
    let serving = eventually(Duration::from_secs(10), || async {
        status_of(&env, relay.https_port, &agent, "/echo").await == StatusCode::OK
    })
    .await;
    assert!(serving.is_some(), "the URL stopped serving after the move");
    websocket_echo(&env, &relay, &agent, 10).await;
    // The WebSocket opened before the move still works: the old connection carries it.
    echo_on(&mut kernel, "after the move").await;
    assert_eq!(sessions_by_transport(metrics, "quic").await, 1.0);
    // Once it closes, the relay closes the connection the session moved away from.
    kernel.close(None).await.expect("close");
    while let Some(Ok(_)) = kernel.next().await {}
    drop(kernel);
    let counted = eventually(Duration::from_secs(10), || async {
        sessions_by_transport(metrics, "quic").await == 1.0
            && sessions_by_transport(metrics, "tcp").await == 0.0
    })
    .await;
    assert!(counted.is_some(), "the old TCP connection was never closed");
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_http_proxy_named_by_https_proxy() {
    let env = TestEnv::new("proxied");
    let relay = start_relay(&env, &[]);
    let proxy = proxy_support::tinyproxy("").await;
    let token = env.token_file("alice");
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let agent = start_agent_via(
        &env,
        &relay,
        relay.quic_port,
        &token,
        &["--transport", "tcp"],
        &[("HTTPS_PROXY", url.clone())],
    );
    assert!(
        agent.proc.stderr().contains(&format!(
            "connected over TCP/TLS to 127.0.0.1:{} through proxy {url}",
            relay.https_port
        )),
        "{}",
        agent.proc.stderr()
    );
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
    download_checked(&env, relay.https_port, &agent, 8 * 1024 * 1024).await;
    websocket_echo(&env, &relay, &agent, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_asks_for_credentials_stops_the_agent_with_a_clear_error() {
    let env = TestEnv::new("proxy407");
    let relay = start_relay(&env, &[]);
    let proxy = proxy_support::tinyproxy("BasicAuth jobs s3cret").await;
    let token = env.token_file("alice");
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let mut command = Command::new(&env.bin);
    command
        .args(["agent", "--transport", "tcp", "--relay"])
        .arg(format!("127.0.0.1:{}", relay.quic_port))
        .arg("--relay-tcp")
        .arg(format!("127.0.0.1:{}", relay.https_port))
        .arg("--relay-ca")
        .arg(&env.ca)
        .arg("--token-file")
        .arg(&token)
        .arg("--proxy")
        .arg(&url)
        .args(["--to", "127.0.0.1:9"]);
    let mut agent = Proc::start("agent", command).expect("start");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)),
        4,
        "{}",
        agent.stderr()
    );
    let said = agent.stderr();
    assert!(
        said.contains(&format!("proxy {url} refused CONNECT")) && said.contains("407"),
        "the error must name the proxy and its answer:\n{said}"
    );

    // With the credentials in the proxy URL, as curl takes them, it works.
    let with_credentials = format!("http://jobs:s3cret@127.0.0.1:{}", proxy.port);
    let agent = start_agent_via(
        &env,
        &relay,
        relay.quic_port,
        &token,
        &["--transport", "tcp", "--proxy", &with_credentials],
        &[],
    );
    assert!(
        !agent.proc.stderr().contains("s3cret"),
        "the proxy password must never be printed"
    );
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_an_agent_on_tcp_as_on_quic() {
    let env = TestEnv::new("tcprevoke");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let mut agent = start_agent_via(
        &env,
        &relay,
        relay.quic_port,
        &token,
        &["--transport", "tcp"],
        &[],
    );
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
    // Re-issuing alice's token revokes the old one: the relay closes with `Revoked`,
    // which the TCP transport must carry so that the agent stops instead of retrying.
    let _fresh = env.token_file("alice");
    assert_eq!(
        agent.proc.wait_exit(Duration::from_secs(60)),
        3,
        "{}",
        agent.proc.stderr()
    );
    assert!(
        agent.proc.stderr().contains("revoked or replaced"),
        "{}",
        agent.proc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_at_once_than_a_tcp_session_carries_get_503_and_the_session_lives_on() {
    let env = TestEnv::new("tcpcap");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let agent = start_agent_via(
        &env,
        &relay,
        relay.quic_port,
        &token,
        &["--transport", "tcp"],
        &[],
    );
    let host = agent.host();
    // Two HTTP/2 connections (the front door allows 256 streams each): 300 slow requests.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let sender = h2(&env, relay.https_port, &host).await;
        for _ in 0..150 {
            let mut sender = sender.clone();
            let uri = agent.uri("/slow?ms=3000");
            waiting.push(tokio::spawn(async move {
                let request = Request::get(uri).body(empty()).expect("request");
                match sender.send_request(request).await {
                    Ok(response) => response.status(),
                    Err(_) => StatusCode::BAD_GATEWAY,
                }
            }));
        }
    }
    let mut by_status = std::collections::BTreeMap::new();
    for answer in waiting {
        *by_status.entry(answer.await.expect("task")).or_insert(0) += 1;
    }
    assert_eq!(
        by_status.keys().copied().collect::<Vec<_>>(),
        vec![StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE],
        "{by_status:?}"
    );
    assert!(by_status[&StatusCode::OK] >= 200, "{by_status:?}");
    // The session lives on and serves again once the slow requests are done.
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );
    assert!(agent.proc.stderr().contains("connected over TCP/TLS"));
    assert!(!agent.proc.stderr().contains("lost the connection"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_sends_tcp_agents_away_and_they_come_back_over_tcp_at_once() {
    let env = TestEnv::new("tcpdrain");
    let relay = start_relay(&env, &["--drain-grace", "1"]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let gate = UdpGate::closed_in_front_of(quic).await;
    let token = env.token_file("alice");
    let agent = start_agent_via(&env, &relay, gate.port, &token, &[], &[]);
    assert!(agent.proc.stderr().contains("connected over TCP/TLS"));
    assert_eq!(
        status_of(&env, relay.https_port, &agent, "/echo").await,
        StatusCode::OK
    );

    let mut relay = relay;
    relay.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        relay.proc.wait_exit(Duration::from_secs(15)),
        0,
        "{}",
        relay.proc.stderr()
    );
    agent
        .proc
        .wait_for_stderr("the relay is going away", Duration::from_secs(5));

    let relay = start_relay_at(&env, https, quic, &[]);
    let back = eventually(Duration::from_secs(30), || async {
        status_of(&env, relay.https_port, &agent, "/echo").await == StatusCode::OK
    })
    .await;
    assert!(
        back.is_some(),
        "the old URL did not come back:\n{}",
        agent.proc.stderr()
    );
    let said = agent.proc.stderr();
    assert!(
        said.contains("reconnected; the URL is unchanged (over TCP/TLS"),
        "{said}"
    );
}
