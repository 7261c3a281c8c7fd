//! User stories for the operator: the relay's `/metrics` tells what is live and what
//! happened, `/healthz` tells a load balancer when the relay drains, and a job whose app
//! died is told apart from a job that is gone.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A relay with its metrics listener on an ephemeral loopback port.
fn start_relay_with_metrics(env: &TestEnv, extra: &[&str]) -> (RelayProc, SocketAddr) {
    let mut args = vec!["--listen-metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut relay = start_relay(env, &args);
    let addr = relay.metrics_addr().expect("metrics address");
    (relay, addr)
}

/// A plain-HTTP GET to the metrics listener.
async fn scrape(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    plain_http(addr, "GET", path, None).await
}

/// A WebSocket to the demo app's echo (`/ws`) of `agent`, through the relay's front door.
async fn open_websocket(
    env: &TestEnv,
    https_port: u16,
    agent: &AgentProc,
) -> tokio_tungstenite::WebSocketStream<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> {
    let host = agent.host();
    let tls = tls_connect(env, https_port, &host, &[b"http/1.1"]).await;
    let request = format!("wss://{host}:{https_port}{}", agent.path("/ws"))
        .into_client_request()
        .expect("request");
    let (ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("websocket handshake");
    ws
}

/// Waits until `series` has the value `want` (metrics move a moment after the event).
async fn wait_for_sample(addr: SocketAddr, series: &str, want: f64) {
    let reached = eventually(Duration::from_secs(10), || async {
        metric_sample(&scrape(addr, "/metrics").await.1, series) == want
    })
    .await;
    assert!(
        reached.is_some(),
        "{series} never became {want}:\n{}",
        scrape(addr, "/metrics").await.1
    );
}

#[tokio::test]
async fn metrics_follow_sessions_requests_websockets_and_pages() {
    let env = TestEnv::new("metrics");
    let token = env.token_file("alice");
    let (relay, metrics) = start_relay_with_metrics(&env, &[]);
    let (status, text) = scrape(metrics, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        metric_sample(&text, "jobgate_sessions{state=\"live\"}"),
        0.0
    );

    let mut agent = start_demo_agent(&env, &relay, &token, "one");
    for _ in 0..3 {
        let (status, _, _) = get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let unknown = format!("aaaaaaaaaaaaaaaa.{DOMAIN}");
    let (status, _, _) = get(&env, relay.https_port, &unknown, "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let text = scrape(metrics, "/metrics").await.1;
    assert_eq!(
        metric_sample(&text, "jobgate_sessions{state=\"live\"}"),
        1.0
    );
    assert_eq!(
        metric_sample(&text, "jobgate_sessions_opened_total{resumed=\"false\"}"),
        1.0
    );
    assert_eq!(
        metric_sample(&text, "jobgate_app_responses_total{class=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        metric_sample(
            &text,
            "jobgate_relay_pages_total{page=\"no_session\",code=\"404\"}"
        ),
        1.0
    );
    assert_eq!(metric_sample(&text, "jobgate_requests_total"), 4.0);
    assert_eq!(metric_sample(&text, "jobgate_requests_in_flight"), 0.0);
    assert!(metric_sample(&text, "jobgate_process_open_fds") > 0.0);
    assert!(metric_sample(&text, "jobgate_runtime_tasks") > 0.0);

    // A WebSocket counts while it is open, and not after.
    let mut ws = open_websocket(&env, relay.https_port, &agent).await;
    ws.send(Message::Text("ping".into())).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::Text("ping".into())
    );
    wait_for_sample(metrics, "jobgate_upgraded_connections", 1.0).await;
    ws.close(None).await.expect("close");
    drop(ws);
    wait_for_sample(metrics, "jobgate_upgraded_connections", 0.0).await;

    // The job ends: no live session, one closed, and nothing left in flight.
    agent.proc.signal(Signal::SIGTERM);
    agent.proc.wait_exit(Duration::from_secs(20));
    wait_for_sample(metrics, "jobgate_sessions{state=\"live\"}", 0.0).await;
    let text = scrape(metrics, "/metrics").await.1;
    assert_eq!(
        metric_sample(&text, "jobgate_sessions{state=\"parked\"}"),
        0.0
    );
    assert_eq!(metric_sample(&text, "jobgate_sessions_closed_total"), 1.0);

    let (status, body) = scrape(metrics, "/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let (status, _) = scrape(metrics, "/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_job_whose_app_stopped_gets_app_unreachable_not_a_bare_502() {
    let env = TestEnv::new("unreachable");
    let token = env.token_file("alice");
    let (relay, metrics) = start_relay_with_metrics(&env, &[]);
    let path = env.dir.join("app.sock");
    let listen = format!("unix:{}", path.display());
    let mut app = start_app(&listen, "app");
    app.wait_for_socket(&path);
    let agent = start_agent(&env, &relay, &token, &["--to", &listen]);
    let (status, _, _) = get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
    assert_eq!(status, StatusCode::OK);

    app.signal(Signal::SIGKILL);
    app.wait_exit(Duration::from_secs(10));
    // The agent may first try the pooled connection the app's death just closed; the
    // next request finds nothing listening.
    let reached = eventually(Duration::from_secs(10), || async {
        let (status, _, body) =
            get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
        status == StatusCode::BAD_GATEWAY
            && String::from_utf8_lossy(&body).contains("does not accept connections")
    })
    .await;
    assert!(reached.is_some(), "no 'app is not reachable' page");
    let text = scrape(metrics, "/metrics").await.1;
    assert!(
        metric_sample(
            &text,
            "jobgate_relay_pages_total{page=\"app_unreachable\",code=\"502\"}"
        ) >= 1.0
    );
    // The session itself is still live: the job has not ended.
    assert_eq!(
        metric_sample(&text, "jobgate_sessions{state=\"live\"}"),
        1.0
    );
}

#[tokio::test]
async fn healthz_says_draining_while_the_relay_drains() {
    let env = TestEnv::new("healthz");
    let token = env.token_file("alice");
    let (relay, metrics) = start_relay_with_metrics(&env, &["--drain-grace", "10"]);
    let agent = start_demo_agent(&env, &relay, &token, "one");
    assert_eq!(scrape(metrics, "/healthz").await.0, StatusCode::OK);

    // A slow request keeps the drain going for a few seconds.
    let mut sender = h1(&env, relay.https_port, &agent.host()).await;
    let request = http::Request::get(agent.path("/slow?ms=4000"))
        .header("host", agent.host())
        .body(empty())
        .expect("request");
    let in_flight = tokio::spawn(async move { sender.send_request(request).await });
    wait_for_sample(metrics, "jobgate_requests_in_flight", 1.0).await;

    relay.proc.signal(Signal::SIGTERM);
    let draining = eventually(Duration::from_secs(3), || async {
        scrape(metrics, "/healthz").await == (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
    })
    .await;
    assert!(draining.is_some(), "healthz never said draining");
    assert_eq!(
        metric_sample(&scrape(metrics, "/metrics").await.1, "jobgate_draining"),
        1.0
    );
    let response = in_flight
        .await
        .expect("task")
        .expect("the slow request finished");
    assert_eq!(response.status(), StatusCode::OK);
}

/// A relay told to use three cores runs one runtime per core: the kernel spreads client
/// connections over the cores' listeners, agents go one per core, and everything works as
/// on one: plain requests, a WebSocket, an agent on the TCP transport, a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_three_cores_spreads_clients_and_agents_and_serves_them_all() {
    let env = TestEnv::new("cores");
    let token = env.token_file("alice");
    let (mut relay, metrics) = start_relay_with_metrics(&env, &["--cores", "3"]);
    assert!(relay.proc.stderr().contains("serving on 3 cores"));
    let agents: Vec<AgentProc> = (0..3)
        .map(|i| start_demo_agent(&env, &relay, &token, &format!("app{i}")))
        .collect();
    let tcp_relay = format!("127.0.0.1:{}", relay.https_port);
    let tcp_agent = start_demo_agent_with(
        &env,
        &relay,
        &token,
        "tcp",
        &["--transport", "tcp", "--relay-tcp", &tcp_relay],
    );
    assert!(tcp_agent.proc.stderr().contains("connected over TCP/TLS"));

    // Each GET is a new client connection: 80 of them land on all three listeners.
    for agent in agents.iter().chain([&tcp_agent]) {
        for _ in 0..20 {
            let (status, _, body) =
                get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
            assert_eq!(status, StatusCode::OK);
            assert!(!body.is_empty());
        }
    }
    let text = scrape(metrics, "/metrics").await.1;
    for core in 0..3 {
        let clients = metric_sample(
            &text,
            &format!("jobgate_core_client_connections_total{{core=\"{core}\"}}"),
        );
        assert!(clients > 0.0, "core {core} accepted no client:\n{text}");
        let agents = metric_sample(
            &text,
            &format!("jobgate_core_agent_connections{{core=\"{core}\"}}"),
        );
        assert_eq!(agents, 1.0, "core {core}:\n{text}");
    }

    let mut ws = open_websocket(&env, relay.https_port, &agents[2]).await;
    for i in 0..10 {
        ws.send(Message::Text(format!("ping {i}")))
            .await
            .expect("send");
        assert_eq!(
            ws.next().await.expect("echo").expect("ok"),
            Message::Text(format!("ping {i}"))
        );
    }
    ws.close(None).await.expect("close");

    // An agent that leaves frees its place on its core.
    let mut leaving = agents.into_iter().next().expect("first agent");
    leaving.proc.signal(Signal::SIGTERM);
    leaving.proc.wait_exit(Duration::from_secs(20));
    wait_for_sample(metrics, "jobgate_core_agent_connections{core=\"0\"}", 0.0).await;

    relay.proc.signal(Signal::SIGTERM);
    assert_eq!(
        relay.proc.wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        relay.proc.stderr()
    );
}
