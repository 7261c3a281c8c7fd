//! The binary's own surface: log formats, shell completions, manual pages.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// An operator who ships logs to a log store asks for JSON: every line the relay writes
/// (its status lines included) is one JSON object with a level and a message.
#[test]
fn the_relay_logs_one_json_object_per_line() {
    let env = TestEnv::new("json-logs");
    let _token = env.token_file("alice");
    let mut command = Command::new(bin());
    command
        .args(["--log-format", "json", "relay", "--domain", DOMAIN])
        .args([
            "--listen-https",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
        ])
        .arg("--cert")
        .arg(&env.cert)
        .arg("--key")
        .arg(&env.key)
        .arg("--tokens")
        .arg(&env.tokens);
    let relay = spawn(command);
    relay.wait_for_stderr("agents (QUIC/UDP) on", Duration::from_secs(20));
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    let mut relay = relay;
    assert_eq!(relay.wait_exit(Duration::from_secs(20)), 0);
    let text = relay.stderr();
    let mut messages = Vec::new();
    for line in text.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{text}"));
        assert!(event["level"].is_string(), "{line}");
        messages.push(event["fields"]["message"].as_str().unwrap_or("").to_owned());
    }
    for expected in ["relay listening", "draining", "stopped"] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "no {expected:?} event in:\n{text}"
        );
    }
}

/// Plain text stays the default: the status line a person reads.
#[test]
fn text_logs_stay_the_default() {
    let env = TestEnv::new("text-logs");
    let relay = start_relay(&env, &[]);
    let text = relay.proc.stderr();
    let line = text
        .lines()
        .find(|l| l.contains("agents (QUIC/UDP) on"))
        .expect("status line");
    assert!(line.starts_with("jobgate relay: HTTPS on "), "{line}");
}

/// `jobgate completions` and `jobgate man` come from the same definitions as `--help`:
/// every subcommand a user can type is in them.
#[test]
fn completions_and_manual_pages_cover_the_commands() {
    let output = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().expect("run");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).expect("utf8")
    };
    let bash = output(&["completions", "bash"]);
    for sub in ["relay", "agent", "launch", "token", "completions", "man"] {
        assert!(bash.contains(sub), "bash completions lack {sub}");
    }
    assert!(output(&["completions", "zsh"]).starts_with("#compdef jobgate"));
    assert!(output(&["completions", "fish"]).contains("complete -c jobgate"));

    let man = output(&["man"]);
    assert!(man.contains(".TH jobgate 1"), "{man}");
    let dir = std::env::temp_dir().join(format!("jobgate-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(bin())
        .args(["man", "--out-dir"])
        .arg(&dir)
        .output()
        .expect("run");
    assert!(out.status.success());
    for page in [
        "jobgate.1",
        "jobgate-relay.1",
        "jobgate-agent.1",
        "jobgate-launch.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).expect(page);
        assert!(text.contains(".TH"), "{page} is no manual page");
    }
    let _ = std::fs::remove_dir_all(&dir);

    let bad = Command::new(bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
