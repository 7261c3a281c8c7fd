//! The URL at submit time (issue #16, item 1): `jobgate launch` reserves the session's
//! name for a queued job; only its owner's agent in that job gets it, only while the job
//! lasts, and a forged reservation gets nothing.

mod common;

use common::*;
use http::StatusCode;
use jobgate_agent::dial::{self, DialError, HelloParams, Reserved};
use jobgate_protocol::{AccessMode, JobInfo, RefusalCode, Token};
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;

fn read_token(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("token file")
        .trim()
        .to_owned()
}

fn hello(token: &str, job: &str, reservation: &Token) -> HelloParams {
    HelloParams {
        token: Token(token.to_owned()),
        access: Some(AccessMode::Link),
        share: Default::default(),
        job: JobInfo {
            id: Some(job.to_owned()),
            ..JobInfo::default()
        },
        resume: None,
        reservation: Some(reservation.clone()),
        moving: false,
    }
}

async fn reserve(env: &TestEnv, relay: &RelayProc, token: &str, job: &str) -> Reserved {
    dial::reserve(
        &dial_config(env, relay),
        Token(token.to_owned()),
        Some(AccessMode::Link),
        job,
    )
    .await
    .expect("the relay reserves a name")
}

/// The refusal message for a `Hello` with `reservation`, failing the test if admitted.
async fn refused(env: &TestEnv, relay: &RelayProc, params: &HelloParams) -> String {
    match dial::open_session(&dial_config(env, relay), params).await {
        Err(DialError::Refused { code, message }) => {
            assert_eq!(code, RefusalCode::BadReservation, "{message}");
            message
        }
        Err(e) => panic!("expected a reservation refusal, got {e}"),
        Ok(session) => panic!("admitted with name {}", session.welcome.name),
    }
}

#[tokio::test]
async fn the_reserved_url_serves_the_app_of_the_agent_in_that_job() {
    let env = TestEnv::new("reserve-url");
    let token_file = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let reserved = reserve(&env, &relay, &read_token(&token_file), "4242").await;
    assert!(reserved.access_url.starts_with(&reserved.url));
    assert!(reserved.url.contains(&reserved.name));

    // The real binary, as in a job: the reservation file is private like a token.
    let file = write_reservation_file(&env.dir, "4242", &reserved);
    let url_file = env.dir.join("url");
    let bin = env.bin.to_string_lossy().into_owned();
    let mut command = agent_command(&env, &relay, &token_file, &url_file);
    command
        .env("SLURM_JOB_ID", "4242")
        .arg("--reservation-file")
        .arg(&file);
    command.args(demo_app_command(&bin, "held"));
    let agent = jobgate_harness::stack::launch_agent(command).unwrap_or_else(|e| panic!("{e}"));
    // The agent announces the very link printed at submit time, access key included.
    assert_eq!(
        agent.url, reserved.access_url,
        "the agent's URL is not the reserved one"
    );
    // That link opens the app; without the key the app stays locked.
    let answered = eventually(Duration::from_secs(20), || async {
        get(&env, relay.https_port, &agent.host(), &agent.path("/echo"))
            .await
            .0
            == StatusCode::OK
    })
    .await;
    assert!(
        answered.is_some(),
        "reserved URL does not serve:\n{}",
        agent.proc.stderr()
    );
    let locked = get(&env, relay.https_port, &agent.host(), "/echo").await.0;
    assert_ne!(
        locked,
        StatusCode::OK,
        "the reserved URL serves without its key"
    );
}

#[tokio::test]
async fn forged_foreign_wrong_job_and_replayed_reservations_are_refused() {
    let env = TestEnv::new("reserve-refused");
    let alice = read_token(&env.token_file("alice"));
    let bob = read_token(&env.token_file("bob"));
    let relay = start_relay(&env, &[]);
    let reserved = reserve(&env, &relay, &alice, "77").await;

    let message = refused(&env, &relay, &hello(&bob, "77", &reserved.reservation)).await;
    assert!(message.contains("another user"), "{message}");

    let message = refused(&env, &relay, &hello(&alice, "78", &reserved.reservation)).await;
    assert!(message.contains("job 77"), "{message}");

    let mut forged: Vec<char> = reserved.reservation.0.chars().collect();
    forged[4] = if forged[4] == 'a' { 'b' } else { 'a' };
    let forged = Token(forged.into_iter().collect());
    let message = refused(&env, &relay, &hello(&alice, "77", &forged)).await;
    assert!(message.contains("not one this relay signed"), "{message}");

    // The owner's agent in the job gets the name; once the job says Bye it is over.
    let mut session = dial::open_session(
        &dial_config(&env, &relay),
        &hello(&alice, "77", &reserved.reservation),
    )
    .await
    .expect("the owner's agent is admitted");
    assert_eq!(session.welcome.name, reserved.name);
    session.bye("job ended").await;
    // The relay takes the Bye a moment later: retry until the replay is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let message = loop {
        let replay = hello(&alice, "77", &reserved.reservation);
        match dial::open_session(&dial_config(&env, &relay), &replay).await {
            Err(DialError::Refused {
                code: RefusalCode::BadReservation,
                message,
            }) => break message,
            Ok(mut session) if std::time::Instant::now() < deadline => {
                session.bye("retry").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!(
                "a replay after the job ended was not refused: {:?}",
                other.err()
            ),
        }
    };
    assert!(message.contains("has ended"), "{message}");
}

#[tokio::test]
async fn a_reservation_outlives_a_relay_restart_but_not_the_job() {
    let env = TestEnv::new("reserve-restart");
    let alice = read_token(&env.token_file("alice"));
    let relay = start_relay(&env, &[]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let reserved = reserve(&env, &relay, &alice, "9").await;
    relay.proc.signal(Signal::SIGKILL);
    drop(relay);
    let relay = start_relay_at(&env, https, quic, &[]);
    let mut session = dial::open_session(
        &dial_config(&env, &relay),
        &hello(&alice, "9", &reserved.reservation),
    )
    .await
    .expect("the reservation survives the restart");
    assert_eq!(session.welcome.name, reserved.name);
    session.bye("done").await;
}
