//! User stories for the tunnel itself: a request goes in at the relay's HTTPS front door,
//! crosses QUIC to the agent, reaches the app, and the answer comes back.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use jobgate_harness::client::{client_tls, ws_connect, Ws, WsTarget};
use jobgate_harness::process::raise_nofile;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn get_and_post_reach_the_app_with_forwarding_headers() {
    let env = TestEnv::new("getpost");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let agent = start_demo_agent(&env, &relay, &token, "app-a");
    let host = agent.host();
    let authority = format!("{host}:{}", relay.https_port);

    let mut sender = h1(&env, relay.https_port, &host).await;
    let request = Request::get(agent.path("/echo?x=1"))
        .header("host", &authority)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .body(empty())
        .expect("request");
    let (status, headers, body) =
        collect(sender.send_request(request).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-app-label"], "app-a");
    let echo = json(&body);
    assert_eq!(echo["target"], "/echo?x=1");
    assert_eq!(
        echo["headers"]["host"],
        authority.as_str(),
        "the browser's Host is kept"
    );
    assert_eq!(
        echo["headers"]["x-forwarded-for"], "127.0.0.1",
        "client-sent XFF is replaced"
    );
    assert_eq!(echo["headers"]["x-forwarded-host"], authority.as_str());
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    // Same keep-alive connection: a POST with a body.
    let request = Request::post(agent.path("/echo"))
        .header("host", &authority)
        .body(full(Bytes::from_static(b"hello, notebook")))
        .expect("request");
    let (status, _, body) = collect(sender.send_request(request).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body_bytes"], 15);
}

#[tokio::test]
async fn http2_routes_each_request_by_its_own_authority() {
    let env = TestEnv::new("h2");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let a = start_demo_agent(&env, &relay, &token, "app-a");
    let b = start_demo_agent(&env, &relay, &token, "app-b");

    // One h2 connection (SNI of a), both names on it: browsers coalesce like this.
    let mut sender = h2(&env, relay.https_port, &a.host()).await;
    for (agent, label) in [(&a, "app-a"), (&b, "app-b"), (&a, "app-a")] {
        let uri = agent.uri("/echo");
        let request = Request::post(uri)
            .body(full(Bytes::from_static(b"h2 body")))
            .expect("request");
        let (status, headers, body) =
            collect(sender.send_request(request).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-app-label"], label);
        let echo = json(&body);
        assert_eq!(echo["body_bytes"], 7);
        assert_eq!(
            echo["headers"]["host"],
            format!("{}:{}", agent.host(), relay.https_port).as_str()
        );
    }
}

#[tokio::test]
async fn websocket_echo_with_subprotocol() {
    let env = TestEnv::new("ws");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let agent = start_demo_agent(&env, &relay, &token, "ws");
    let host = agent.host();

    let tls = tls_connect(&env, relay.https_port, &host, &[b"http/1.1"]).await;
    let mut request = format!("wss://{host}:{}{}", relay.https_port, agent.path("/ws"))
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "v1.kernel.websocket.jupyter.org, other"
            .parse()
            .expect("value"),
    );
    let (mut ws, response) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "v1.kernel.websocket.jupyter.org"
    );

    for i in 0..50 {
        ws.send(Message::Text(format!("message {i}")))
            .await
            .expect("send");
        let echoed = ws.next().await.expect("message").expect("ok");
        assert_eq!(echoed, Message::Text(format!("message {i}")));
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::Binary(big.clone())).await.expect("send");
    assert_eq!(
        ws.next().await.expect("message").expect("ok"),
        Message::Binary(big)
    );
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn three_agents_300_concurrent_requests_each_answered_by_its_own_app() {
    let env = TestEnv::new("many");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let agents: Vec<_> = (0..3)
        .map(|i| start_demo_agent(&env, &relay, &token, &format!("app-{i}")))
        .collect();

    let mut senders = Vec::new();
    for agent in &agents {
        senders.push(h2(&env, relay.https_port, &agent.host()).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300usize {
        let which = (i * 7) % 3;
        let mut sender = senders[i % senders.len()].clone();
        let uri = agents[which].uri(&format!("/echo?i={i}"));
        tasks.spawn(async move {
            let request = Request::get(uri).body(empty()).expect("request");
            let (status, headers, body) =
                collect(sender.send_request(request).await.expect("response")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                headers["x-app-label"],
                format!("app-{which}").as_str(),
                "misrouted request {i}"
            );
            assert_eq!(json(&body)["target"], format!("/echo?i={i}").as_str());
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.expect("request task");
        done += 1;
    }
    assert_eq!(done, 300);
}

const BIG: u64 = 256 * 1024 * 1024;
const WARMUP: u64 = 16 * 1024 * 1024;
/// Peak RSS may grow by flow-control windows and allocator slack, never by body size.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

#[tokio::test]
async fn a_256_mib_upload_and_download_stream_with_bounded_memory() {
    let env = TestEnv::new("big");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let agent = start_demo_agent(&env, &relay, &token, "big");
    download_checked(&env, relay.https_port, &agent, WARMUP).await;
    upload_checked(&env, relay.https_port, &agent, WARMUP).await;
    let relay_before = peak_rss_kib(relay.proc.pid());
    let agent_before = peak_rss_kib(agent.proc.pid());

    download_checked(&env, relay.https_port, &agent, BIG).await;
    upload_checked(&env, relay.https_port, &agent, BIG).await;
    let relay_after = peak_rss_kib(relay.proc.pid());
    let agent_after = peak_rss_kib(agent.proc.pid());
    eprintln!("peak RSS KiB: relay {relay_before} -> {relay_after}, agent {agent_before} -> {agent_after}");
    // The kernel records the peak lazily: read while resident memory was above the recorded
    // peak, `VmHWM` shows that, and a later read after the allocator returned pages can show
    // less. A smaller "after" is no growth.
    let (relay_grew, agent_grew) = (
        relay_after.saturating_sub(relay_before),
        agent_after.saturating_sub(agent_before),
    );
    assert!(relay_grew < MAX_GROWTH_KIB, "relay grew {relay_grew} KiB");
    assert!(agent_grew < MAX_GROWTH_KIB, "agent grew {agent_grew} KiB");
}

/// The suite a TLS client gets from the relay's front door when it offers `suites`.
async fn negotiated_suite(
    env: &TestEnv,
    port: u16,
    suites: Option<&[rustls::CipherSuite]>,
) -> rustls::CipherSuite {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(only) = suites {
        provider.cipher_suites.retain(|s| only.contains(&s.suite()));
    }
    let config =
        jobgate_harness::client::client_tls_with(&env.ca, &[b"http/1.1"], provider).expect("tls");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from(format!("x.{DOMAIN}")).expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.get_ref()
        .1
        .negotiated_cipher_suite()
        .expect("suite")
        .suite()
}

#[tokio::test]
async fn the_relay_picks_aes_128_gcm_unless_the_client_offers_only_aes_256() {
    let env = TestEnv::new("suites");
    let relay = start_relay(&env, &[]);
    // rustls (like curl and OpenSSL) lists AES-256-GCM first; the relay's order wins.
    assert_eq!(
        negotiated_suite(&env, relay.https_port, None).await,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    let only_256 = [rustls::CipherSuite::TLS13_AES_256_GCM_SHA384];
    assert_eq!(
        negotiated_suite(&env, relay.https_port, Some(&only_256)).await,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
}

/// More WebSockets at once than an agent first lets the relay open streams for.
const MANY_SOCKETS: usize = 1_300;
/// WebSocket handshakes (or echoes) in flight at once while the test sets them up.
const OPENING_AT_ONCE: usize = 64;

#[tokio::test]
async fn one_agent_holds_more_websockets_at_once_than_its_first_stream_allowance() {
    // The agent starts by letting the relay open INITIAL_INCOMING_STREAMS streams and
    // raises that as they fill; were it stuck there, the sockets past it would wait for
    // stream credit that never comes and their handshakes would time out.
    assert!(MANY_SOCKETS > jobgate_agent::dial::INITIAL_INCOMING_STREAMS as usize);
    raise_nofile().unwrap_or_else(|e| panic!("{e}"));
    let env = TestEnv::new("allowance");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let agent = start_demo_agent(&env, &relay, &token, "sockets");
    let target = WsTarget::Relay {
        port: relay.https_port,
        tls: client_tls(&env.ca, &[b"http/1.1"]).unwrap_or_else(|e| panic!("{e}")),
        session: agent.session().unwrap_or_else(|e| panic!("{e}")),
    };

    let opening = futures_util::stream::iter(0..MANY_SOCKETS)
        .map(|_| ws_connect(&target, "/ws"))
        .buffer_unordered(OPENING_AT_ONCE)
        .collect::<Vec<_>>();
    let opened = tokio::time::timeout(std::time::Duration::from_secs(60), opening)
        .await
        .expect("every WebSocket opens");
    let mut sockets: Vec<Ws> = opened
        .into_iter()
        .map(|ws| ws.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(sockets.len(), MANY_SOCKETS);

    // All of them open at once, and each still echoes on its own stream.
    let echoes = futures_util::stream::iter(sockets.iter_mut().enumerate())
        .map(|(i, ws)| async move {
            ws.send(Message::Text(format!("socket {i}")))
                .await
                .expect("send");
            let echoed = ws.next().await.expect("message").expect("ok");
            assert_eq!(echoed, Message::Text(format!("socket {i}")));
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .count();
    let echoed = tokio::time::timeout(std::time::Duration::from_secs(60), echoes)
        .await
        .expect("every WebSocket echoes");
    assert_eq!(echoed, MANY_SOCKETS);
}
