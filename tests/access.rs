//! User stories for access control: only the holder of a session's link gets in.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

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

/// Opens `agent`'s printed link as a browser would; returns its cookie (`name=value`).
async fn browser_cookie(env: &TestEnv, port: u16, agent: &AgentProc) -> String {
    let host = agent.host();
    let mut sender = h1(env, port, &host).await;
    let request = Request::get(agent.path("/"))
        .header("host", &host)
        .header(NAVIGATE.0, NAVIGATE.1)
        .body(empty())
        .expect("request");
    let (status, headers, _) = collect(sender.send_request(request).await.expect("response")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set_cookie = headers["set-cookie"].to_str().expect("ascii");
    set_cookie.split(';').next().expect("pair").to_owned()
}

/// Sends `method /echo` to `agent` with `cookie` and `headers`; status, and the app's
/// label when the app answered (None: the relay answered itself).
async fn echo_with(
    env: &TestEnv,
    port: u16,
    agent: &AgentProc,
    target: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, String) {
    let host = agent.host();
    let mut sender = h1(env, port, &host).await;
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .header("host", &host);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(full("x=1")).expect("request");
    let (status, headers, body) =
        collect(sender.send_request(request).await.expect("response")).await;
    let label = headers
        .get("x-app-label")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, label, String::from_utf8_lossy(&body).into_owned())
}

/// A WebSocket handshake to `agent`'s `target` carrying `headers`: the status it got
/// (on 101, after checking that an echo comes back).
async fn websocket_with(
    env: &TestEnv,
    port: u16,
    agent: &AgentProc,
    target: &str,
    headers: &[(&str, &str)],
) -> StatusCode {
    let host = agent.host();
    let tls = tls_connect(env, port, &host, &[b"http/1.1"]).await;
    let mut request = format!("wss://{host}:{port}{target}")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).expect("header name");
        request
            .headers_mut()
            .append(name, v.parse().expect("header value"));
    }
    match tokio_tungstenite::client_async(request, tls).await {
        Ok((mut ws, response)) => {
            ws.send(Message::Text("ping".into())).await.expect("send");
            let echoed = ws.next().await.expect("message").expect("ok");
            assert_eq!(echoed, Message::Text("ping".into()));
            response.status()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status(),
        Err(e) => panic!("WebSocket handshake failed without an HTTP answer: {e}"),
    }
}

#[tokio::test]
async fn a_sibling_sessions_page_cannot_act_with_the_victims_cookie() {
    let env = TestEnv::new("xorigin");
    let alice = env.token_file("alice");
    let mallory = env.token_file("mallory");
    let relay = start_relay(&env, &[]);
    let victim = start_demo_agent(&env, &relay, &alice, "victim");
    let attacker = start_demo_agent(&env, &relay, &mallory, "attacker");
    let port = relay.https_port;
    let cookie = browser_cookie(&env, port, &victim).await;
    let own = victim.base();
    let sibling = attacker.base();
    assert!(own.ends_with(&format!(":{port}")), "{own}");

    // What Chromium sends when the attacker's page POSTs or fetches into the victim's
    // session: the cookie rides along (same site), the request must not reach the app.
    for (method, headers) in [
        (
            "POST",
            vec![
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "no-cors"),
                ("origin", sibling.as_str()),
            ],
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "cors"),
                ("origin", sibling.as_str()),
            ],
        ),
        // An older browser: no fetch metadata, only `Origin`.
        ("POST", vec![("origin", sibling.as_str())]),
        // A form POST navigation from the sibling's page.
        (
            "POST",
            vec![
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document"),
                ("origin", sibling.as_str()),
            ],
        ),
    ] {
        let mut headers = headers;
        headers.push(("cookie", cookie.as_str()));
        let (status, label, body) = echo_with(&env, port, &victim, "/echo", method, &headers).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{method} {headers:?}: {body}"
        );
        assert_eq!(label, None, "the victim's app saw {method} {headers:?}");
        assert!(
            body.contains("another site or another jobgate session"),
            "{body}"
        );
    }
    // The attacker's page opens a WebSocket into the victim's session: no 101.
    for headers in [
        vec![
            ("origin", sibling.as_str()),
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "websocket"),
        ],
        vec![("origin", sibling.as_str())],
        vec![("origin", "https://evil.example")],
    ] {
        let mut headers = headers;
        headers.push(("cookie", cookie.as_str()));
        assert_eq!(
            websocket_with(&env, port, &victim, "/ws", &headers).await,
            StatusCode::FORBIDDEN,
            "{headers:?}"
        );
    }

    // The victim's own page, the victim's address bar, a link from elsewhere, and
    // non-browser clients still work.
    let forwarded: [(&str, Vec<(&str, &str)>); 5] = [
        (
            "POST",
            vec![("sec-fetch-site", "same-origin"), ("origin", own.as_str())],
        ),
        (
            "GET",
            vec![("sec-fetch-site", "none"), ("sec-fetch-mode", "navigate")],
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document"),
            ],
        ),
        ("POST", vec![]),
        ("GET", vec![]),
    ];
    for (method, headers) in forwarded {
        let mut headers = headers;
        headers.push(("cookie", cookie.as_str()));
        let (status, label, body) = echo_with(&env, port, &victim, "/echo", method, &headers).await;
        assert_eq!(status, StatusCode::OK, "{method} {headers:?}: {body}");
        assert_eq!(label.as_deref(), Some("victim"));
    }
    let own_ws = [
        ("origin", own.as_str()),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "websocket"),
        ("cookie", cookie.as_str()),
    ];
    assert_eq!(
        websocket_with(&env, port, &victim, "/ws", &own_ws).await,
        StatusCode::SWITCHING_PROTOCOLS
    );

    // The key in the query is proof by itself: its rules do not change.
    let foreign = [
        ("sec-fetch-site", "same-site"),
        ("origin", sibling.as_str()),
    ];
    let (status, label, _) =
        echo_with(&env, port, &victim, &victim.path("/echo"), "POST", &foreign).await;
    assert_eq!((status, label.as_deref()), (StatusCode::OK, Some("victim")));
    assert_eq!(
        websocket_with(&env, port, &victim, &victim.path("/ws"), &foreign).await,
        StatusCode::SWITCHING_PROTOCOLS
    );
}
