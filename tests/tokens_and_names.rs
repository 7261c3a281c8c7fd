//! Tokens, sessions and names over time (issue #11 items 4, 7, 8, 9): a re-issued token
//! evicts the sessions opened with the old one; new sessions are rate-limited per user;
//! concurrent `jobgate token issue` runs lose nothing; a relay killed right after a `Bye`
//! does not hand the ended name back.

mod common;

use common::*;
use http::StatusCode;
use jobgate_agent::dial::{self, DialError, RelaySession};
use jobgate_protocol::RefusalCode;
use nix::sys::signal::Signal;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

async fn status(env: &TestEnv, port: u16, agent: &AgentProc) -> StatusCode {
    get(env, port, &agent.host(), &agent.path("/echo")).await.0
}

fn read_token(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("token file")
        .trim()
        .to_owned()
}

/// A hand-made agent's session (no app behind it: only its name and tickets matter).
async fn open(env: &TestEnv, relay: &RelayProc, token: &str) -> Result<RelaySession, DialError> {
    dial::open_session(&dial_config(env, relay), &link_hello(token, None)).await
}

#[tokio::test]
async fn reissuing_a_token_closes_the_sessions_opened_with_the_old_one() {
    let env = TestEnv::new("reissue");
    let alice = env.token_file("alice");
    let bob = env.token_file("bob");
    let relay = start_relay(&env, &[]);
    let mut leaked = start_demo_agent(&env, &relay, &alice, "leaked");
    let other = start_demo_agent(&env, &relay, &bob, "bob");
    assert_eq!(
        status(&env, relay.https_port, &leaked).await,
        StatusCode::OK
    );

    // The admin's answer to a leaked token: issue alice a new one (same user).
    let fresh = env.token_file("alice");
    let gone = eventually(Duration::from_secs(15), || async {
        status(&env, relay.https_port, &leaked).await == StatusCode::NOT_FOUND
    })
    .await;
    assert!(
        gone.is_some(),
        "the session opened with the replaced token still serves:\n{}",
        leaked.proc.stderr()
    );
    assert_eq!(leaked.proc.wait_exit(Duration::from_secs(30)), 3);
    assert!(
        leaked.proc.stderr().contains("revoked or replaced"),
        "{}",
        leaked.proc.stderr()
    );
    assert_eq!(
        status(&env, relay.https_port, &other).await,
        StatusCode::OK,
        "another user's session must not be touched"
    );
    let renewed = start_demo_agent(&env, &relay, &fresh, "renewed");
    assert_eq!(
        status(&env, relay.https_port, &renewed).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn new_sessions_beyond_the_users_burst_are_refused_with_when_to_retry() {
    let env = TestEnv::new("ratelimit");
    let alice = read_token(&env.token_file("alice"));
    let bob = read_token(&env.token_file("bob"));
    // One new session a minute after a burst of two: the third in a row is refused.
    let relay = start_relay(
        &env,
        &[
            "--max-new-sessions-per-user-per-minute",
            "1",
            "--new-sessions-burst-per-user",
            "2",
        ],
    );
    let mut kept = Vec::new();
    for _ in 0..2 {
        kept.push(open(&env, &relay, &alice).await.expect("within the burst"));
    }
    match open(&env, &relay, &alice).await {
        Err(DialError::Refused { code, message }) => {
            assert_eq!(code, RefusalCode::RateLimited, "{message}");
            assert!(message.contains("try again in"), "{message}");
        }
        Err(e) => panic!("expected a rate-limit refusal, got {e}"),
        Ok(session) => panic!("a third session opened at once: {}", session.welcome.name),
    }
    // Resuming a live name is no new session: it is not counted.
    let ticket = kept[0].welcome.resume_ticket.clone();
    let resumed = dial::open_session(&dial_config(&env, &relay), &link_hello(&alice, ticket))
        .await
        .expect("a resume is not rate-limited");
    assert_eq!(resumed.welcome.name, kept[0].welcome.name);
    // Other users have their own buckets.
    open(&env, &relay, &bob)
        .await
        .expect("bob is not limited by alice");
}

#[tokio::test]
async fn an_agent_refused_for_the_rate_limit_waits_and_retries() {
    let env = TestEnv::new("ratewait");
    let token = env.token_file("alice");
    // A burst of one, then one new session every 6 s: long enough that the agent's first
    // Hello comes before the refill even on a busy machine, short enough for its backoff
    // (0.2 s doubling) to get in well within start_demo_agent's 30 s.
    let relay = start_relay(
        &env,
        &[
            "--max-new-sessions-per-user-per-minute",
            "10",
            "--new-sessions-burst-per-user",
            "1",
        ],
    );
    let _first = open(&env, &relay, &read_token(&token))
        .await
        .expect("the burst");
    let agent = start_demo_agent(&env, &relay, &token, "patient");
    assert!(
        agent.proc.stderr().contains("retrying in"),
        "the agent got its URL without waiting:\n{}",
        agent.proc.stderr()
    );
    assert_eq!(status(&env, relay.https_port, &agent).await, StatusCode::OK);
}

#[test]
fn concurrent_token_issues_lose_no_user() {
    let env = TestEnv::new("issuerace");
    let runs: Vec<_> = (0..20)
        .map(|i| {
            Command::new(bin())
                .args(["token", "issue", "--user", &format!("user{i}"), "--tokens"])
                .arg(&env.tokens)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("token issue")
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = Command::new(bin())
        .args(["token", "list", "--tokens"])
        .arg(&env.tokens)
        .output()
        .expect("token list");
    let listed = String::from_utf8(list.stdout).expect("utf8");
    let mut users: Vec<&str> = listed.lines().collect();
    users.sort_unstable();
    let mut want: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    want.sort_unstable();
    assert_eq!(users, want, "entries were lost");

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env.tokens)
        .expect("tokens file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let leftovers: Vec<String> = std::fs::read_dir(&env.dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[tokio::test]
async fn a_relay_killed_right_after_bye_does_not_give_the_ended_name_back() {
    let env = TestEnv::new("byekill");
    let token = read_token(&env.token_file("alice"));
    let relay = start_relay(&env, &[]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let mut session = open(&env, &relay, &token).await.expect("session");
    let name = session.welcome.name.clone();
    let ticket = session.welcome.resume_ticket.clone();
    assert!(ticket.is_some(), "the relay gives resume tickets");
    // Let the periodic save record the name as held (the worst case on the old code:
    // restored as parked, hence resumable).
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The job ends: Bye, and the relay acknowledges by closing the connection.
    say_bye(&mut session).await;
    let host = format!("{name}.{DOMAIN}");
    let ended = eventually(Duration::from_secs(10), || async {
        get(&env, https, &host, "/").await.0 == StatusCode::NOT_FOUND
    })
    .await;
    assert!(ended.is_some(), "the name did not end after Bye");
    relay.proc.signal(Signal::SIGKILL);
    drop(relay);
    drop(session);

    let relay = start_relay_at(&env, https, quic, &[]);
    let back = dial::open_session(&dial_config(&env, &relay), &link_hello(&token, ticket))
        .await
        .expect("a new session");
    assert_ne!(
        back.welcome.name, name,
        "the old ticket brought an ended name back after a restart"
    );
}
