//! The URL at submit time, before the job runs (issue #16): the reserved URL shows where
//! the job is — queued with Slurm's reason, starting, cancelled — updating by itself, then
//! the app; to anyone without the key it looks like a name that does not exist.
//!
//! Slurm is played here by a script in `scontrol show job -o` format (the relay's
//! `--slurm-status` command); tests/e2e/slurm-reserve.sh runs the real `scontrol`.

mod common;

use common::*;
use http::{Request, StatusCode};
use jobgate_agent::dial::{self, DialConfig, Reserved, TransportChoice};
use jobgate_protocol::{AccessMode, Token};
use std::path::Path;
use std::time::Duration;

/// The relay caches a job's state this long (`queued::STATUS_CACHE`) plus a margin.
const STATE_CHANGE: Duration = Duration::from_secs(15);

/// A `scontrol show job -o` stand-in: prints `job-<id>.state` from its own directory, or
/// fails as scontrol does for a job it does not know.
fn fake_scontrol(dir: &Path) -> String {
    let script = dir.join("scontrol-show-job");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat \"$(dirname \"$0\")/job-$1.state\" 2>/dev/null || { echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1; }\n",
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    format!("{} {{job}}", script.display())
}

fn set_job(dir: &Path, job: &str, line: &str) {
    std::fs::write(dir.join(format!("job-{job}.state")), format!("{line}\n")).expect("state");
}

async fn reserve(env: &TestEnv, relay: &RelayProc, token: &str, job: &str) -> Reserved {
    let config = DialConfig {
        transport: TransportChoice::Quic,
        ..DialConfig::new(
            format!("127.0.0.1:{}", relay.quic_port),
            Some(env.ca.clone()),
        )
    };
    dial::reserve(
        &config,
        Token(token.to_owned()),
        Some(AccessMode::Link),
        job,
    )
    .await
    .expect("reserved")
}

/// GET `path_and_query` on the reserved name as a script would: (status, x-jobgate, body).
async fn fetch(
    env: &TestEnv,
    relay: &RelayProc,
    reserved: &Reserved,
    path_and_query: &str,
) -> (StatusCode, Option<String>, String) {
    let host = format!("{}.{DOMAIN}", reserved.name);
    let mut sender = h1(env, relay.https_port, &host).await;
    let request = Request::get(path_and_query)
        .header("host", &host)
        .body(empty())
        .expect("request");
    let (status, headers, body) =
        collect(sender.send_request(request).await.expect("response")).await;
    let marker = headers
        .get("x-jobgate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, marker, String::from_utf8_lossy(&body).into_owned())
}

fn key_of(reserved: &Reserved) -> String {
    reserved
        .access_url
        .split("jobgate_key=")
        .nth(1)
        .expect("a link reservation has a key")
        .to_owned()
}

#[tokio::test]
async fn a_reserved_url_says_queued_then_starting_then_serves_the_app() {
    let env = TestEnv::new("status-page");
    let token_file = env.token_file("alice");
    let token = std::fs::read_to_string(&token_file).expect("token");
    let relay = start_relay(&env, &["--slurm-status", &fake_scontrol(&env.dir)]);
    let reserved = reserve(&env, &relay, token.trim(), "4242").await;
    let key = key_of(&reserved);
    set_job(
        &env.dir,
        "4242",
        "JobId=4242 JobName=jupyter JobState=PENDING Reason=JobHeldUser StartTime=Unknown",
    );

    // Without the key the name does not exist, as far as anyone can tell.
    let (status, _, body) = fetch(&env, &relay, &reserved, "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!body.contains("4242"), "{body}");
    let (status, _, _) = fetch(&env, &relay, &reserved, "/.jobgate/status").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = fetch(&env, &relay, &reserved, "/?jobgate_key=wrongwrongwrong").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With it: the page and its JSON say the job is queued, and why.
    let (status, marker, page) =
        fetch(&env, &relay, &reserved, &format!("/?jobgate_key={key}")).await;
    // Not 200: a script waiting for the app must not take the page for it.
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{page}");
    assert_eq!(marker.as_deref(), Some("relay"));
    assert!(
        page.contains("queued") && page.contains("JobHeldUser"),
        "{page}"
    );
    assert!(
        page.contains("/.jobgate/status"),
        "the page polls its status: {page}"
    );
    let state = |text: &str| {
        json(text.as_bytes())["state"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let (_, _, status_json) = fetch(
        &env,
        &relay,
        &reserved,
        &format!("/.jobgate/status?jobgate_key={key}"),
    )
    .await;
    assert_eq!(state(&status_json), "queued", "{status_json}");
    assert_eq!(json(status_json.as_bytes())["reason"], "JobHeldUser");

    // Released and running: the page says the app is starting.
    set_job(&env.dir, "4242", "JobId=4242 JobState=RUNNING Reason=None");
    let starting = eventually(STATE_CHANGE, || async {
        let (_, _, body) = fetch(
            &env,
            &relay,
            &reserved,
            &format!("/.jobgate/status?jobgate_key={key}"),
        )
        .await;
        state(&body) == "starting"
    })
    .await;
    assert!(starting.is_some(), "the page never said starting");

    // The job's agent connects with the reservation: the same URL is the app now.
    let file = write_reservation_file(&env.dir, "4242", &reserved);
    let bin = env.bin.to_string_lossy().into_owned();
    let mut command = agent_command(&env, &relay, &token_file, &env.dir.join("url"));
    command
        .env("SLURM_JOB_ID", "4242")
        .arg("--reservation-file")
        .arg(&file)
        .args(demo_app_command(&bin, "app"));
    let _agent = jobgate_harness::stack::launch_agent(command).unwrap_or_else(|e| panic!("{e}"));
    let (status, marker, _) =
        fetch(&env, &relay, &reserved, &format!("/echo?jobgate_key={key}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(marker, None, "the app answers now, not the relay");
    // The page's poll now reaches the app, which is how the page knows to reload.
    let (_, marker, _) = fetch(
        &env,
        &relay,
        &reserved,
        &format!("/.jobgate/status?jobgate_key={key}"),
    )
    .await;
    assert_ne!(marker.as_deref(), Some("relay"));
}

#[tokio::test]
async fn a_cancelled_job_says_so_then_its_name_ends() {
    let env = TestEnv::new("status-cancel");
    let token = std::fs::read_to_string(env.token_file("alice")).expect("token");
    let relay = start_relay(
        &env,
        &[
            "--slurm-status",
            &fake_scontrol(&env.dir),
            "--queued-end-grace",
            "2",
        ],
    );
    let reserved = reserve(&env, &relay, token.trim(), "4243").await;
    let key = key_of(&reserved);
    set_job(
        &env.dir,
        "4243",
        "JobId=4243 JobState=CANCELLED Reason=None ExitCode=0:15",
    );
    let (status, _, body) = fetch(
        &env,
        &relay,
        &reserved,
        &format!("/.jobgate/status?jobgate_key={key}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(body.as_bytes())["state"], "cancelled", "{body}");
    let (status, _, page) = fetch(&env, &relay, &reserved, &format!("/?jobgate_key={key}")).await;
    assert_eq!(status, StatusCode::GONE);
    assert!(page.contains("cancelled"), "{page}");

    // After the grace the name is gone for good: 404, and the reservation is spent.
    let gone = eventually(Duration::from_secs(20), || async {
        fetch(&env, &relay, &reserved, &format!("/?jobgate_key={key}"))
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert!(gone.is_some(), "the cancelled job's name never ended");
}

#[tokio::test]
async fn a_relay_that_cannot_see_the_queue_says_so() {
    let env = TestEnv::new("status-blind");
    let token = std::fs::read_to_string(env.token_file("alice")).expect("token");
    let relay = start_relay(
        &env,
        &["--slurm-status", "/nonexistent/scontrol show job -o {job}"],
    );
    let reserved = reserve(&env, &relay, token.trim(), "99").await;
    let key = key_of(&reserved);
    let (status, _, body) = fetch(
        &env,
        &relay,
        &reserved,
        &format!("/.jobgate/status?jobgate_key={key}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let status_json = json(body.as_bytes());
    assert_eq!(status_json["state"], "unknown", "{body}");
    let message = status_json["message"].as_str().unwrap_or("");
    assert!(
        message.contains("cannot see the batch queue") && message.contains("/nonexistent/scontrol"),
        "{message}"
    );
}

#[tokio::test]
async fn the_page_comes_back_after_a_relay_restart() {
    let env = TestEnv::new("status-restart");
    let token = std::fs::read_to_string(env.token_file("alice")).expect("token");
    let scontrol = fake_scontrol(&env.dir);
    let relay = start_relay(&env, &["--slurm-status", &scontrol]);
    let (https, quic) = (relay.https_port, relay.quic_port);
    let reserved = reserve(&env, &relay, token.trim(), "5150").await;
    let key = key_of(&reserved);
    set_job(
        &env.dir,
        "5150",
        "JobId=5150 JobState=PENDING Reason=Resources StartTime=Unknown",
    );

    let mut relay = relay;
    relay.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        relay.proc.wait_exit(Duration::from_secs(15)),
        0,
        "{}",
        relay.proc.stderr()
    );
    let relay = start_relay_at(&env, https, quic, &["--slurm-status", &scontrol]);
    let (status, _, body) = fetch(
        &env,
        &relay,
        &reserved,
        &format!("/.jobgate/status?jobgate_key={key}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(body.as_bytes())["reason"], "Resources", "{body}");
    // Still no page for anyone without the key.
    assert_eq!(
        fetch(&env, &relay, &reserved, "/").await.0,
        StatusCode::NOT_FOUND
    );
}
