//! User stories for surviving the network: the relay restarts, the agent reconnects and
//! keeps its URL; a vanished agent's name shows "reconnecting" before it ends.

mod common;

use common::*;
use http::StatusCode;
use nix::sys::signal::Signal;
use std::time::Duration;

async fn status(env: &TestEnv, port: u16, agent: &AgentProc) -> StatusCode {
    get(env, port, &agent.host(), &agent.path("/echo")).await.0
}

#[tokio::test]
async fn a_killed_and_restarted_relay_gives_agents_their_old_names_back() {
    let env = TestEnv::new("restart");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    assert_eq!(status(&env, https, &agent).await, StatusCode::OK);

    relay.proc.signal(Signal::SIGKILL);
    drop(relay);
    let relay = start_relay_at(&env, https, quic, &[]);
    let back = eventually(Duration::from_secs(20), || async {
        status(&env, relay.https_port, &agent).await == StatusCode::OK
    })
    .await;
    assert!(
        back.is_some(),
        "the old URL did not come back:\n{}",
        agent.proc.stderr()
    );
    assert!(
        agent.proc.stderr().contains("the URL is unchanged"),
        "{}",
        agent.proc.stderr()
    );
}

#[tokio::test]
async fn a_draining_relay_sends_agents_away_and_they_come_back() {
    let env = TestEnv::new("drain");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &["--drain-grace", "1"]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    assert_eq!(status(&env, https, &agent).await, StatusCode::OK);

    relay.proc.signal(Signal::SIGTERM);
    let mut relay = relay;
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
        status(&env, relay.https_port, &agent).await == StatusCode::OK
    })
    .await;
    assert!(
        back.is_some(),
        "the old URL did not come back:\n{}",
        agent.proc.stderr()
    );
}

#[tokio::test]
async fn a_vanished_agent_shows_reconnecting_then_the_name_ends() {
    let env = TestEnv::new("park");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &["--idle-timeout", "3", "--resume-grace", "3"]);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    assert_eq!(status(&env, relay.https_port, &agent).await, StatusCode::OK);
    agent.proc.signal(Signal::SIGKILL);

    let parked = eventually(Duration::from_secs(8), || async {
        status(&env, relay.https_port, &agent).await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(
        parked.is_some(),
        "no 503 while the name waits for its agent"
    );
    let (code, headers, body) = get(&env, relay.https_port, &agent.host(), &agent.path("/")).await;
    if code == StatusCode::SERVICE_UNAVAILABLE {
        assert!(headers.contains_key("retry-after"));
        assert!(String::from_utf8_lossy(&body).contains("Reconnecting"));
    }
    let ended = eventually(Duration::from_secs(8), || async {
        status(&env, relay.https_port, &agent).await == StatusCode::NOT_FOUND
    })
    .await;
    assert!(
        ended.is_some(),
        "the name never ended after the grace period"
    );
}

#[tokio::test]
async fn a_restarted_relay_answers_reconnecting_for_the_names_it_held_not_404() {
    let env = TestEnv::new("heldnames");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    assert_eq!(status(&env, https, &agent).await, StatusCode::OK);
    // The relay writes what it holds at most every 2 s; a SIGKILL loses no more than that.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The agent is frozen, so it cannot come back before we look.
    agent.proc.signal(Signal::SIGSTOP);
    relay.proc.signal(Signal::SIGKILL);
    drop(relay);
    let relay = start_relay_at(&env, https, quic, &[]);
    let (code, headers, body) =
        get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
    assert_eq!(
        code,
        StatusCode::SERVICE_UNAVAILABLE,
        "a name held before the restart must not look ended: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(headers.contains_key("retry-after"));
    assert!(String::from_utf8_lossy(&body).contains("Reconnecting"));

    agent.proc.signal(Signal::SIGCONT);
    let back = eventually(Duration::from_secs(30), || async {
        status(&env, relay.https_port, &agent).await == StatusCode::OK
    })
    .await;
    assert!(
        back.is_some(),
        "the old URL did not come back:\n{}",
        agent.proc.stderr()
    );
}
