//! User story for a centre with several relays: the agent is given all of them
//! (`--relay r1,r2`), takes whichever answers, and when its relay dies moves to another
//! with its resume ticket — same name, same URL, same link key.
//!
//! The two relays here share their resume key (one `--resume-key` file), which is what
//! makes a ticket from one good on the other; a cluster (`--cluster-etcd`) shares it
//! through etcd.

mod common;

use common::*;
use http::StatusCode;
use nix::sys::signal::Signal;
use std::process::Command;
use std::time::Duration;

/// How fast the agent notices a dead relay (its idle timeout): a cluster's agents use a
/// short one so that a relay's death costs seconds.
const AGENT_IDLE_SECS: &str = "3";
/// The promise: within this long of a relay's death the URL serves from another.
const FAILOVER: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_two_relays_moves_to_the_other_when_its_relay_dies_and_keeps_its_url() {
    let env = TestEnv::new("failover");
    let key = env.dir.join("shared-resume.key");
    let relay_args = |state: &str| -> Vec<String> {
        vec![
            "--resume-key".into(),
            key.display().to_string(),
            "--state-file".into(),
            env.dir.join(state).display().to_string(),
        ]
    };
    let args_a = relay_args("a.state");
    let args_b = relay_args("b.state");
    let a = start_relay(&env, &args_a.iter().map(String::as_str).collect::<Vec<_>>());
    let b = start_relay(&env, &args_b.iter().map(String::as_str).collect::<Vec<_>>());
    let token = env.token_file("alice");

    let url_file = env.dir.join("url");
    let mut command = Command::new(&env.bin);
    command
        .arg("agent")
        .arg("--relay")
        .arg(format!(
            "127.0.0.1:{},127.0.0.1:{}",
            a.quic_port, b.quic_port
        ))
        .arg("--relay-ca")
        .arg(&env.ca)
        .arg("--token-file")
        .arg(&token)
        .arg("--idle-timeout")
        .arg(AGENT_IDLE_SECS)
        .arg("--url-file")
        .arg(&url_file)
        .args(["--", &env.bin.to_string_lossy(), "demo-app"])
        .args(["--listen", "127.0.0.1:{port}", "--label", "ha"]);
    let agent = start_agent_command(command, &url_file);

    // The session lives on exactly one relay; which one answered first is the agent's pick.
    let on_a = status_of(&env, a.https_port, &agent, "/echo").await;
    let on_b = status_of(&env, b.https_port, &agent, "/echo").await;
    let (mut holder, survivor) = match (on_a, on_b) {
        (StatusCode::OK, StatusCode::NOT_FOUND) => (a, b),
        (StatusCode::NOT_FOUND, StatusCode::OK) => (b, a),
        other => panic!("the session must live on one relay: {other:?}"),
    };

    holder.proc.signal(Signal::SIGKILL);
    let _ = holder.proc.wait_exit(Duration::from_secs(10));
    let moved = eventually(FAILOVER, || async {
        status_of(&env, survivor.https_port, &agent, "/echo").await == StatusCode::OK
    })
    .await;
    assert!(
        moved.is_some(),
        "the URL did not come back on the surviving relay within {FAILOVER:?}:\n{}",
        agent.proc.stderr()
    );
    assert!(
        agent.proc.stderr().contains("the URL is unchanged"),
        "{}",
        agent.proc.stderr()
    );
    eprintln!("failover took {:?}", moved.unwrap_or_default());
}
