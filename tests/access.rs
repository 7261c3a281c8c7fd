//! User stories for access control: only the holder of a session's link gets in.

mod common;

use common::*;
use http::{Request, StatusCode};
use std::time::Duration;

const NAVIGATE: (&str, &str) = ("sec-fetch-mode", "navigate");

#[tokio::test]
async fn the_printed_link_logs_a_browser_in_with_a_host_only_cookie() {
    let env = TestEnv::new("link");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    let host = agent.host();
    let key = agent.key();
    assert!(key.len() >= 32, "access key must carry >= 160 bits: {key}");

    // The browser opens the printed link: 303 to the same URL without the key + cookie.
    let mut sender = h1(&env, relay.https_port, &host).await;
    let request = Request::get(agent.path("/echo?x=1"))
        .header("host", &host)
        .header(NAVIGATE.0, NAVIGATE.1)
        .body(empty())
        .expect("request");
    let (status, headers, _) = collect(sender.send_request(request).await.expect("response")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/echo?x=1");
    let set_cookie = headers["set-cookie"].to_str().expect("ascii").to_owned();
    for attr in [
        "__Host-jobgate-",
        "Secure",
        "HttpOnly",
        "SameSite=Lax",
        "Path=/",
    ] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    assert!(
        !set_cookie.to_ascii_lowercase().contains("domain="),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("pair").to_owned();

    // With the cookie it reaches the app, which sees neither the cookie nor the key.
    let request = Request::get("/echo?x=1")
        .header("host", &host)
        .header("cookie", format!("_xsrf=abc; {cookie}"))
        .body(empty())
        .expect("request");
    let (status, _, body) = collect(sender.send_request(request).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&body);
    assert_eq!(echo["headers"]["cookie"], "_xsrf=abc");
    assert!(
        !body.windows(key.len()).any(|w| w == key.as_bytes()),
        "the app saw the key"
    );

    // An API client may carry the key in place; the app never sees it.
    let (status, _, body) = get(&env, relay.https_port, &host, &agent.path("/echo?y=2")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["target"], "/echo?y=2");
}

#[tokio::test]
async fn no_key_a_wrong_key_or_another_sessions_credentials_get_401() {
    let env = TestEnv::new("deny");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let a = start_demo_agent(&env, &relay, &token, "a");
    let b = start_demo_agent(&env, &relay, &token, "b");
    let port = relay.https_port;

    let denied = |status: StatusCode| assert_eq!(status, StatusCode::UNAUTHORIZED);
    denied(get(&env, port, &a.host(), "/echo").await.0);
    denied(
        get(
            &env,
            port,
            &a.host(),
            "/echo?jobgate_key=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )
        .await
        .0,
    );
    denied(get(&env, port, &a.host(), &b.path("/echo")).await.0);

    // b's cookie presented to a (under a's cookie name and under b's).
    let mut sender = h1(&env, port, &a.host()).await;
    for cookie in [
        format!(
            "__Host-jobgate-{}={}",
            a.host().split('.').next().expect("name"),
            b.key()
        ),
        format!(
            "__Host-jobgate-{}={}",
            b.host().split('.').next().expect("name"),
            b.key()
        ),
    ] {
        let request = Request::get("/echo")
            .header("host", a.host())
            .header("cookie", cookie)
            .body(empty())
            .expect("request");
        let (status, _, body) =
            collect(sender.send_request(request).await.expect("response")).await;
        denied(status);
        assert!(String::from_utf8_lossy(&body).contains("private"));
    }
    // WebSocket upgrades follow the same rule.
    let tls = tls_connect(&env, port, &a.host(), &[b"http/1.1"]).await;
    let url = format!("wss://{}:{port}/ws", a.host());
    let refused = tokio_tungstenite::client_async(url, tls).await;
    assert!(
        refused.is_err(),
        "a WebSocket without the key must be refused"
    );
    // And the rightful owner still gets in.
    assert_eq!(
        get(&env, port, &a.host(), &a.path("/echo")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn public_sessions_need_the_relays_permission() {
    let env = TestEnv::new("public");
    let token = env.token_file("alice");
    let strict = start_relay(&env, &[]);
    let mut command = agent_command(&env, &strict, &token, &env.dir.join("url"));
    command.args(["--access", "public", "--to", "127.0.0.1:9"]);
    let mut agent = spawn(command);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), 3);
    assert!(
        agent.stderr().contains("does not allow public sessions"),
        "{}",
        agent.stderr()
    );

    let open = start_relay(&env, &["--allow-public"]);
    let agent = start_agent(
        &env,
        &open,
        &token,
        &[
            "--access",
            "public",
            "--",
            bin(),
            "demo-app",
            "--listen",
            "127.0.0.1:{port}",
        ],
    );
    assert!(
        agent.key().is_empty(),
        "a public URL carries no key: {}",
        agent.url
    );
    assert_eq!(
        get(&env, open.https_port, &agent.host(), "/echo").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_apps_cookie_cannot_reach_other_sessions() {
    let env = TestEnv::new("cookiedomain");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    let (status, headers, _) = get(
        &env,
        relay.https_port,
        &agent.host(),
        &agent.path("/set-cookie"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["set-cookie"], "planted=1; Path=/; Secure");
}

#[tokio::test]
async fn revoking_a_token_closes_the_users_sessions_and_limits_hold() {
    let env = TestEnv::new("revoke");
    let alice = env.token_file("alice");
    let bob = env.token_file("bob");
    let audit = env.dir.join("audit.jsonl");
    let audit_arg = audit.to_string_lossy().into_owned();
    let relay = start_relay(
        &env,
        &["--max-sessions-per-user", "1", "--audit-log", &audit_arg],
    );
    let a = start_demo_agent(&env, &relay, &alice, "alice");
    let b = start_demo_agent(&env, &relay, &bob, "bob");

    // Over the limit: a clear refusal.
    let mut command = agent_command(&env, &relay, &alice, &env.dir.join("url2"));
    command.args(["--to", "127.0.0.1:9"]);
    let mut second = spawn(command);
    assert_eq!(second.wait_exit(Duration::from_secs(20)), 3);
    assert!(
        second.stderr().contains("live sessions"),
        "{}",
        second.stderr()
    );

    let status = std::process::Command::new(bin())
        .args(["token", "revoke", "--user", "alice", "--tokens"])
        .arg(&env.tokens)
        .status()
        .expect("revoke");
    assert!(status.success());
    let gone = eventually(Duration::from_secs(10), || async {
        get(&env, relay.https_port, &a.host(), &a.path("/echo"))
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert!(gone.is_some(), "alice's session survived the revocation");
    assert_eq!(
        get(&env, relay.https_port, &b.host(), &b.path("/echo"))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn relay_limits_answer_clearly_instead_of_hanging() {
    let env = TestEnv::new("limits");
    let alice = env.token_file("alice");
    let bob = env.token_file("bob");
    let relay = start_relay(&env, &["--max-streams-per-agent", "2", "--max-agents", "1"]);
    let agent = start_demo_agent(&env, &relay, &alice, "a");

    // Two slow requests fill the session; the third is told at once.
    let port = relay.https_port;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut sender = h1(&env, port, &agent.host()).await;
        let request = Request::get(agent.path("/slow?ms=3000"))
            .header("host", agent.host())
            .body(empty())
            .expect("request");
        slow.push(tokio::spawn(async move {
            sender.send_request(request).await.map(|r| r.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let (status, headers, _) = get(&env, port, &agent.host(), &agent.path("/echo")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the busy answer must not wait"
    );
    for task in slow {
        assert_eq!(task.await.expect("task").expect("response"), StatusCode::OK);
    }

    // The relay is full: another user's agent is refused with a clear message.
    let mut command = agent_command(&env, &relay, &bob, &env.dir.join("url-bob"));
    command.args(["--to", "127.0.0.1:9"]);
    let mut refused = spawn(command);
    assert_eq!(refused.wait_exit(Duration::from_secs(20)), 3);
    assert!(
        refused.stderr().contains("capacity"),
        "{}",
        refused.stderr()
    );
}
