//! Shared plumbing for the end-to-end tests: the `jobgate-harness` crate (real `jobgate`
//! processes, real TLS, real HTTP/1.1, HTTP/2 and WebSocket clients), under the names the
//! tests use.
#![allow(dead_code, unused_imports)]

pub use jobgate_harness::*;

/// The `jobgate` binary cargo built for these tests (the harness finds the same file
/// next to the test executable; this checks that they agree).
pub fn bin() -> &'static str {
    let built = env!("CARGO_BIN_EXE_jobgate");
    debug_assert_eq!(
        std::fs::canonicalize(built).ok(),
        std::fs::canonicalize(jobgate_harness::bin()).ok(),
        "the harness runs another jobgate binary than cargo built"
    );
    built
}

/// A hand-made agent's dial settings for `relay` (QUIC, trusting `env`'s CA).
pub fn dial_config(env: &TestEnv, relay: &RelayProc) -> jobgate_agent::dial::DialConfig {
    jobgate_agent::dial::DialConfig {
        idle_timeout: std::time::Duration::from_secs(30),
        transport: jobgate_agent::dial::TransportChoice::Quic,
        ..jobgate_agent::dial::DialConfig::new(
            format!("127.0.0.1:{}", relay.quic_port),
            Some(env.ca.clone()),
        )
    }
}

/// A hand-made agent's `Hello` for a link session of `token`, resuming with `resume`.
pub fn link_hello(
    token: &str,
    resume: Option<jobgate_protocol::Token>,
) -> jobgate_agent::dial::HelloParams {
    jobgate_agent::dial::HelloParams {
        token: jobgate_protocol::Token(token.to_owned()),
        access: Some(jobgate_protocol::AccessMode::Link),
        share: Default::default(),
        job: jobgate_protocol::JobInfo::default(),
        resume,
        reservation: None,
        moving: false,
    }
}

/// A hand-made agent ends its job: `Bye` on the control stream, which it then finishes.
pub async fn say_bye(session: &mut jobgate_agent::dial::RelaySession) {
    let bye = jobgate_protocol::ControlMessage::Bye {
        reason: "job over".into(),
    };
    jobgate_protocol::write_frame(&mut session.control, &bye.to_payload())
        .await
        .expect("bye");
    let _ = session.control.finish().await;
}

/// Writes a reservation file as `jobgate launch` does (the reservation, then the link;
/// private like a token); returns its path.
pub fn write_reservation_file(
    dir: &std::path::Path,
    job: &str,
    reserved: &jobgate_agent::dial::Reserved,
) -> std::path::PathBuf {
    let file = dir.join(format!("{job}.reservation"));
    let contents = format!("{}\n{}\n", reserved.reservation.0, reserved.access_url);
    std::fs::write(&file, contents).expect("write the reservation file");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the reservation file");
    file
}
