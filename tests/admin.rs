//! The admin API and `jobgate status`: who is connected, from where, how much; closing one
//! session without restarting the relay. Only with the admin token, never on the public port.

mod common;

use common::*;
use http::StatusCode;
use std::process::Command;
use std::time::Duration;

/// The admin listener's address, from the relay's status line.
fn admin_addr(relay: &mut RelayProc) -> std::net::SocketAddr {
    relay.metrics_addr().expect("admin listener address")
}

/// A plain HTTP/1.1 call to the admin listener: status and body.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    plain_http(addr, method, path, token).await
}

fn status_command(
    addr: std::net::SocketAddr,
    token_file: &std::path::Path,
    extra: &[&str],
) -> (i32, String) {
    let out = Command::new(bin())
        .args(["status", "--admin", &addr.to_string(), "--admin-token-file"])
        .arg(token_file)
        .args(extra)
        .output()
        .expect("run status");
    assert!(
        out.status.success() || !extra.is_empty(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sees_every_session_and_closes_one() {
    let env = TestEnv::new("admin-api");
    let token_file = env.dir.join("admin.token");
    let mut relay = start_relay(
        &env,
        &[
            "--listen-metrics",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().expect("utf8"),
        ],
    );
    let addr = admin_addr(&mut relay);
    let admin_token = std::fs::read_to_string(&token_file).expect("minted token");
    let admin_token = admin_token.trim();
    let alice = start_demo_agent(&env, &relay, &env.token_file("alice"), "alice");
    let mut bob = start_demo_agent(&env, &relay, &env.token_file("bob"), "bob");
    let bob_name = bob.host().split('.').next().expect("name").to_owned();
    // Some traffic, so the counters have something to show, and a WebSocket kept open.
    let (status, _, _) = get(&env, relay.https_port, &alice.host(), &alice.path("/echo")).await;
    assert_eq!(status, StatusCode::OK);
    let tls = tls_connect(&env, relay.https_port, &alice.host(), &[b"http/1.1"]).await;
    let request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "wss://{}:{}{}",
            alice.host(),
            relay.https_port,
            alice.path("/ws")
        ))
        .expect("request");
    let (websocket, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("websocket");

    // No token, or a wrong one: 401 and nothing else.
    for token in [None, Some("not-the-admin-token")] {
        let (status, body) = call(addr, "GET", "/api/sessions", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, "unauthorized\n");
    }

    let (status, body) = call(addr, "GET", "/api/sessions", Some(admin_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sessions = json(body.as_bytes());
    let list = sessions.as_array().expect("array");
    assert_eq!(list.len(), 2, "{body}");
    let alice_row = list
        .iter()
        .find(|s| s["user"] == "alice")
        .expect("alice's session");
    assert_eq!(alice_row["state"], "live");
    assert_eq!(alice_row["transport"], "quic");
    assert_eq!(alice_row["access"], "link");
    assert!(alice_row["requests"].as_u64().expect("requests") >= 1);
    assert!(alice_row["bytes_in"].as_u64().expect("bytes") > 0);
    assert!(alice_row["node"].is_string(), "{alice_row}");
    assert_eq!(alice_row["websockets"], 1, "{alice_row}");
    // Never a key or cookie.
    assert!(!body.contains(&alice.key()) && !body.contains("jobgate_key"));

    let (status, body) = call(
        addr,
        "GET",
        &format!("/api/sessions/{bob_name}"),
        Some(admin_token),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(body.as_bytes())["user"], "bob");
    let (status, _) = call(
        addr,
        "GET",
        "/api/sessions/aaaaaaaaaaaaaaaa",
        Some(admin_token),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = call(addr, "GET", "/api/users", Some(admin_token)).await;
    assert_eq!(status, StatusCode::OK);
    let users = json(body.as_bytes());
    let alice_user = users
        .as_array()
        .expect("array")
        .iter()
        .find(|u| u["user"] == "alice")
        .expect("alice");
    assert_eq!(alice_user["live"], 1);
    assert_eq!(alice_user["max_sessions"], 16);

    // `jobgate status`: a table, JSON, one user.
    let (_, table) = status_command(addr, &token_file, &[]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains(&bob_name) && table.contains("alice"),
        "{table}"
    );
    let (_, only_bob) = status_command(addr, &token_file, &["--json", "--user", "bob"]);
    let only_bob = json(only_bob.as_bytes());
    assert_eq!(only_bob.as_array().expect("array").len(), 1);
    assert_eq!(only_bob[0]["name"], bob_name.as_str());
    let wrong = env.dir.join("wrong.token");
    std::fs::write(&wrong, "nope\n").expect("write");
    let (code, _) = status_command(addr, &wrong, &["--json"]);
    assert_ne!(code, 0, "a wrong admin token must fail");

    // The API is not on the public HTTPS port: not on the relay's own name, and on a
    // session's name the path belongs to the app.
    let (status, _, body) = get(&env, relay.https_port, DOMAIN, "/api/sessions").await;
    assert_ne!(status, StatusCode::OK);
    assert!(!String::from_utf8_lossy(&body).contains("bytes_in"));
    let (_, _, body) = get(
        &env,
        relay.https_port,
        &alice.host(),
        &alice.path("/api/sessions"),
    )
    .await;
    assert!(!String::from_utf8_lossy(&body).contains("bytes_in"));

    drop(websocket);
    let closed = eventually(Duration::from_secs(10), || async {
        let (_, body) = call(addr, "GET", "/api/sessions", Some(admin_token)).await;
        json(body.as_bytes())
            .as_array()
            .is_some_and(|l| l.iter().all(|s| s["websockets"] == 0))
    })
    .await;
    assert!(closed.is_some(), "the closed WebSocket is still counted");

    // Closing bob's session: the agent is told why and exits 3; the URL is dead.
    let (status, _) = call(
        addr,
        "DELETE",
        &format!("/api/sessions/{bob_name}"),
        Some(admin_token),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bob.proc.wait_exit(Duration::from_secs(20)), 3);
    assert!(
        bob.proc.stderr().contains("admin closed this session"),
        "{}",
        bob.proc.stderr()
    );
    let gone = eventually(Duration::from_secs(10), || async {
        get(&env, relay.https_port, &bob.host(), &bob.path("/"))
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert!(gone.is_some(), "bob's URL still answers");
    let (status, _) = call(
        addr,
        "DELETE",
        &format!("/api/sessions/{bob_name}"),
        Some(admin_token),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Alice is untouched.
    let (status, _, _) = get(&env, relay.https_port, &alice.host(), &alice.path("/echo")).await;
    assert_eq!(status, StatusCode::OK);
}

/// Without `--admin-token-file` the API does not exist.
#[tokio::test]
async fn without_an_admin_token_file_the_api_is_off() {
    let env = TestEnv::new("admin-off");
    let mut relay = start_relay(&env, &["--listen-metrics", "127.0.0.1:0"]);
    let addr = admin_addr(&mut relay);
    let (status, _) = call(addr, "GET", "/api/sessions", Some("anything")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(addr, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK, "metrics stay open");
}

/// An admin token file others can read is refused at start.
#[test]
fn an_exposed_admin_token_file_stops_the_relay() {
    let env = TestEnv::new("admin-exposed");
    let token_file = env.dir.join("admin.token");
    std::fs::write(&token_file, "secret\n").expect("write");
    set_mode(&token_file, 0o644);
    let out = Command::new(bin())
        .args(["relay", "--domain", DOMAIN])
        .args([
            "--listen-https",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
        ])
        .args(["--listen-metrics", "127.0.0.1:0", "--admin-token-file"])
        .arg(&token_file)
        .arg("--cert")
        .arg(&env.cert)
        .arg("--key")
        .arg(&env.key)
        .arg("--tokens")
        .arg(&env.tokens)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("readable by group or others"), "{stderr}");
}
