//! User stories for a session's life: it starts with the app, ends with the job, and
//! the agent never opens a listening socket.

mod common;

use common::*;
use http::StatusCode;
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::time::Duration;

async fn status_of(env: &TestEnv, relay: &RelayProc, agent: &AgentProc) -> StatusCode {
    get(env, relay.https_port, &agent.host(), &agent.path("/echo"))
        .await
        .0
}

#[tokio::test]
async fn unknown_names_get_the_session_ended_page() {
    let env = TestEnv::new("unknown");
    let relay = start_relay(&env, &[]);
    let host = format!("aaaaaaaaaaaaaaaa.{DOMAIN}");
    let (status, headers, body) = get(&env, relay.https_port, &host, "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-jobgate"], "relay");
    assert!(String::from_utf8_lossy(&body).contains("does not exist or has ended"));
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_the_relays_message() {
    let env = TestEnv::new("badtoken");
    let _known = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let forged = env.dir.join("forged.token");
    std::fs::write(&forged, "jgt_not-a-real-token").expect("write");
    set_mode(&forged, 0o600);
    let url_file = env.dir.join("url");
    let mut command = agent_command(&env, &relay, &forged, &url_file);
    command.args(["--to", "127.0.0.1:9"]);
    let mut agent = spawn(command);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), 3);
    assert!(agent.stderr().contains("refused"), "{}", agent.stderr());
    assert!(
        agent.stderr().contains("does not know this token"),
        "{}",
        agent.stderr()
    );
    assert!(!url_file.exists());
}

#[tokio::test]
async fn a_token_file_others_can_read_is_refused_before_dialing() {
    let env = TestEnv::new("tokenmode");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    set_mode(&token, 0o644);
    let mut command = agent_command(&env, &relay, &token, &env.dir.join("url"));
    command.args(["--to", "127.0.0.1:9"]);
    let mut agent = spawn(command);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), 2);
    assert!(agent.stderr().contains("chmod 600"), "{}", agent.stderr());
}

#[tokio::test]
async fn sigkill_of_the_agent_frees_the_name_within_the_idle_timeout() {
    let env = TestEnv::new("sigkill");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &["--idle-timeout", "3", "--resume-grace", "0"]);
    let agent = start_demo_agent(&env, &relay, &token, "victim");
    assert_eq!(status_of(&env, &relay, &agent).await, StatusCode::OK);
    agent.proc.signal(Signal::SIGKILL);
    let took = eventually(Duration::from_secs(8), || async {
        status_of(&env, &relay, &agent).await == StatusCode::NOT_FOUND
    })
    .await;
    assert!(
        took.is_some(),
        "name still answered 8 s after SIGKILL (idle timeout 3 s)"
    );
}

#[tokio::test]
async fn sigterm_ends_the_session_at_once_and_the_name_is_never_reused() {
    let env = TestEnv::new("sigterm");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let mut agent = start_demo_agent(&env, &relay, &token, "a");
    assert_eq!(status_of(&env, &relay, &agent).await, StatusCode::OK);
    agent.proc.signal(Signal::SIGTERM);
    // The app (demo-app) dies of SIGTERM: the agent exits with 128 + 15.
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(15)), 143);
    assert_eq!(status_of(&env, &relay, &agent).await, StatusCode::NOT_FOUND);

    let mut names = HashSet::from([agent.host()]);
    for i in 0..5 {
        let next = start_demo_agent(&env, &relay, &token, &format!("n{i}"));
        assert!(
            names.insert(next.host()),
            "name issued twice: {}",
            next.host()
        );
    }
}

#[tokio::test]
async fn the_agent_exits_with_the_apps_exit_code_and_the_url_dies() {
    let env = TestEnv::new("exitcode");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let script = format!("timeout 3 {} demo-app --listen 127.0.0.1:$1; exit 7", bin());
    let mut agent = start_agent(
        &env,
        &relay,
        &token,
        &["--", "sh", "-c", &script, "sh", "{port}"],
    );
    assert_eq!(status_of(&env, &relay, &agent).await, StatusCode::OK);
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(20)), 7);
    assert!(
        agent.proc.stderr().contains("exit status 7"),
        "{}",
        agent.proc.stderr()
    );
    assert_eq!(status_of(&env, &relay, &agent).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sock_mode_and_unix_socket_targets_work() {
    let env = TestEnv::new("unix");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);

    let agent = start_agent(
        &env,
        &relay,
        &token,
        &[
            "--",
            bin(),
            "demo-app",
            "--listen",
            "unix:{sock}",
            "--label",
            "sock",
        ],
    );
    let (status, headers, _) =
        get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
    assert_eq!(
        (status, headers["x-app-label"].to_str().ok()),
        (StatusCode::OK, Some("sock"))
    );

    let path = env.dir.join("app.sock");
    let listen = format!("unix:{}", path.display());
    let app = start_app(&listen, "existing");
    app.wait_for_socket(&path);
    let agent = start_agent(&env, &relay, &token, &["--to", &listen]);
    let (status, headers, _) =
        get(&env, relay.https_port, &agent.host(), &agent.path("/echo")).await;
    assert_eq!(
        (status, headers["x-app-label"].to_str().ok()),
        (StatusCode::OK, Some("existing"))
    );
}

#[tokio::test]
async fn the_agent_holds_no_listening_socket_and_one_udp_socket() {
    let env = TestEnv::new("nolisten");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let path = env.dir.join("app.sock");
    let listen = format!("unix:{}", path.display());
    let app = start_app(&listen, "x");
    app.wait_for_socket(&path);
    let agent = start_agent(&env, &relay, &token, &["--to", &listen]);
    // Serve a request so the pool holds an open connection to the app too.
    assert_eq!(
        get(&env, relay.https_port, &agent.host(), &agent.path("/echo"))
            .await
            .0,
        StatusCode::OK
    );

    let inodes = socket_inodes(agent.proc.pid());
    assert!(!inodes.is_empty(), "agent should hold sockets");
    let listening_tcp = sockets_in(&["tcp", "tcp6"], &inodes, |state| state == "0A");
    assert!(
        listening_tcp.is_empty(),
        "agent listens on TCP: {listening_tcp:?}"
    );
    let udp = sockets_in(&["udp", "udp6"], &inodes, |_| true);
    assert_eq!(
        udp.len(),
        1,
        "agent must hold exactly its QUIC socket: {udp:?}"
    );
    let unix_listening = unix_listeners(&inodes);
    assert!(
        unix_listening.is_empty(),
        "agent listens on a unix socket: {unix_listening:?}"
    );
}

fn socket_inodes(pid: i32) -> HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .map(|s| s.trim_end_matches(']').to_owned())
        })
        .collect()
}

/// Lines of /proc/net/<table> whose inode is ours and whose state passes `state_ok`.
fn sockets_in(
    tables: &[&str],
    inodes: &HashSet<String>,
    state_ok: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut found = Vec::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && inodes.contains(fields[9]) && state_ok(fields[3]) {
                found.push(format!("{table}: {line}"));
            }
        }
    }
    found
}

/// Unix sockets of ours in the listening state (flags 00010000 = __SO_ACCEPTCON).
fn unix_listeners(inodes: &HashSet<String>) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 6 && inodes.contains(f[6]) && f[3] == "00010000"
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn an_unreachable_relay_is_reported_while_the_app_is_still_starting() {
    let env = TestEnv::new("unreachable");
    let token = env.token_file("alice");
    // A UDP port nobody answers on; the app never becomes ready (it only sleeps).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let mut command = std::process::Command::new(bin());
    command
        .args(["agent", "--relay", &format!("127.0.0.1:{port}")])
        .arg("--relay-ca")
        .arg(&env.ca)
        .arg("--token-file")
        .arg(&token)
        .args(["--", "sh", "-c", "sleep 60 # {port}"]);
    let started = std::time::Instant::now();
    let mut agent = spawn(command);
    assert_eq!(
        agent.wait_exit(Duration::from_secs(40)),
        4,
        "{}",
        agent.stderr()
    );
    assert!(agent.stderr().contains("UDP"), "{}", agent.stderr());
    // Told while the app was starting, not after its 300 s readiness timeout.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// Children of `pid` whose command line contains `needle`.
fn children_matching(pid: i32, needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.filter_map(|t| t.ok()) {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(child);
            }
        }
    }
    found
}

/// Whether `pid` still runs (a zombie nobody reaped counts as gone).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[tokio::test]
async fn a_killed_agent_does_not_leave_its_app_running() {
    let env = TestEnv::new("guard");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let agent = start_demo_agent(&env, &relay, &token, "a");
    let agent_pid = agent.proc.pid();
    let app = children_matching(agent_pid, "demo-app");
    assert_eq!(app.len(), 1, "the agent runs one app");
    let guard = children_matching(agent_pid, "__app-guard");
    assert_eq!(guard.len(), 1, "the agent runs one guard next to its app");
    let (app, guard) = (app[0], guard[0]);

    // SIGKILL: the agent cannot stop its app itself.
    agent.proc.signal(Signal::SIGKILL);
    let gone = eventually(Duration::from_secs(15), || async {
        !running(app) && !running(guard)
    })
    .await;
    assert!(
        gone.is_some(),
        "app running: {}, guard running: {}",
        running(app),
        running(guard)
    );
}

#[tokio::test]
async fn the_guard_leaves_a_running_agents_app_alone() {
    let env = TestEnv::new("guardidle");
    let token = env.token_file("alice");
    let relay = start_relay(&env, &[]);
    let mut agent = start_demo_agent(&env, &relay, &token, "a");
    let guard = children_matching(agent.proc.pid(), "__app-guard");
    assert_eq!(guard.len(), 1);
    // Signals meant for the agent's job (scancel, Ctrl-C) do not end the guard early.
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(guard[0]), signal).expect("signal");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(running(guard[0]), "the guard must ignore stray signals");
    assert_eq!(status_of(&env, &relay, &agent).await, StatusCode::OK);

    // A normal end: the agent stops the app, and the guard leaves with it.
    agent.proc.signal(Signal::SIGTERM);
    agent.proc.wait_exit(Duration::from_secs(20));
    let gone = eventually(Duration::from_secs(5), || async { !running(guard[0]) }).await;
    assert!(gone.is_some(), "the guard outlived a normal agent exit");
}

/// An agent the relay keeps refusing for now (here: over the user's rate of new
/// sessions) waits longer and longer between attempts, up to 30 s. A `scancel` in that
/// wait must still stop the app and end the agent at once, not after the pause (Slurm
/// would SIGKILL both after its KillWait, with no clean stop).
#[test]
fn sigterm_during_the_reconnect_backoff_stops_the_agent_at_once() {
    let env = TestEnv::new("backoff-sigterm");
    let relay = start_relay(
        &env,
        &[
            "--max-new-sessions-per-user-per-minute",
            "1",
            "--new-sessions-burst-per-user",
            "1",
        ],
    );
    let token = env.token_file("alice");
    let _first = start_demo_agent(&env, &relay, &token, "first");
    let mut command = agent_command(&env, &relay, &token, &env.dir.join("second.url"));
    command.args(["--", bin(), "demo-app", "--listen", "127.0.0.1:{port}"]);
    let mut agent = spawn(command);
    // Wait for a long pause: the sixth wait is 3.2–6.4 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let pause = loop {
        let text = agent.stderr();
        let pauses: Vec<f64> = text
            .lines()
            .filter_map(|l| l.split("retrying in ").nth(1))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect();
        if pauses.len() >= 6 {
            break pauses[pauses.len() - 1];
        }
        assert!(std::time::Instant::now() < deadline, "no backoff:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(pause >= 3.0, "pause {pause} s");
    let asked = std::time::Instant::now();
    agent.signal(Signal::SIGTERM);
    let code = agent.wait_exit(Duration::from_secs(20));
    let took = asked.elapsed().as_secs_f64();
    assert_eq!(code, 128 + 15, "{}", agent.stderr());
    assert!(
        took < pause - 1.0,
        "the agent ended {took:.1} s after SIGTERM, in a {pause:.1} s pause: it slept through it"
    );
}
