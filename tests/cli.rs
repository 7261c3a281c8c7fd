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

/// Writes a config file with `mode`; returns its path.
fn config_file(env: &TestEnv, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    let path = env.dir.join(name);
    std::fs::write(&path, text).expect("write config");
    set_mode(&path, mode);
    path
}

/// With a site config in place a user types no flag at all: the relay, its CA and the token
/// come from the file.
#[test]
fn an_agent_needs_no_flag_with_a_config_file() {
    let env = TestEnv::new("config-agent");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let config = config_file(
        &env,
        "jobgate.toml",
        &format!(
            "relay = \"127.0.0.1:{}\"\nrelay_ca = \"{}\"\ntoken_file = \"{}\"\n",
            relay.quic_port,
            env.ca.display(),
            token.display()
        ),
        0o644,
    );
    let url_file = env.dir.join("url");
    let mut command = Command::new(bin());
    command
        .env("JOBGATE_CONFIG", &config)
        .env_remove("JOBGATE_RELAY")
        .env_remove("JOBGATE_RELAY_CA")
        .env_remove("JOBGATE_TOKEN_FILE")
        .args(["agent", "--url-file"])
        .arg(&url_file)
        .args(["--", bin(), "demo-app", "--listen", "127.0.0.1:{port}"]);
    let agent = spawn(command);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n')) {
        assert!(
            std::time::Instant::now() < deadline,
            "no URL:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A flag beats its environment variable, which beats the file: the file names a relay
/// that is not there, the environment the real one.
#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let env = TestEnv::new("config-precedence");
    let relay = start_relay(&env, &[]);
    let token = env.token_file("alice");
    let config = config_file(
        &env,
        "jobgate.toml",
        "relay = \"127.0.0.1:9\"\nready_timeout = 5\n",
        0o600,
    );
    let url_file = env.dir.join("url");
    let agent = |relay_env: &str, relay_flag: Option<String>| {
        let _ = std::fs::remove_file(&url_file);
        let mut command = Command::new(bin());
        command
            .env("JOBGATE_CONFIG", &config)
            .env("JOBGATE_RELAY", relay_env)
            .arg("agent");
        if let Some(flag) = relay_flag {
            command.args(["--relay", &flag]);
        }
        command
            .arg("--relay-ca")
            .arg(&env.ca)
            .arg("--token-file")
            .arg(&token)
            .arg("--url-file")
            .arg(&url_file)
            .args(["--", bin(), "demo-app", "--listen", "127.0.0.1:{port}"]);
        spawn(command)
    };
    let good = format!("127.0.0.1:{}", relay.quic_port);
    for (relay_env, flag) in [(good.as_str(), None), ("127.0.0.1:9", Some(good.clone()))] {
        let proc = agent(relay_env, flag.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n')) {
            assert!(
                std::time::Instant::now() < deadline,
                "env {relay_env}, flag {flag:?}: no URL:\n{}",
                proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Config mistakes stop the program with a message naming the file and the key, before
/// anything starts: a typo (with the nearest key), a wrong type, a file others may write.
#[test]
fn config_mistakes_are_named() {
    let env = TestEnv::new("config-errors");
    let run_agent = |config: &std::path::Path| {
        let out = Command::new(bin())
            .env("JOBGATE_CONFIG", config)
            .args(["agent", "--relay", "127.0.0.1:9", "--to", "127.0.0.1:9"])
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let typo = config_file(&env, "typo.toml", "relay_cert = \"x\"\n", 0o600);
    let (code, stderr) = run_agent(&typo);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("typo.toml"), "{stderr}");
    assert!(
        stderr.contains("unknown key `relay_cert`; did you mean `relay_ca`?"),
        "{stderr}"
    );

    let wrong = config_file(&env, "type.toml", "ready_timeout = \"5 minutes\"\n", 0o600);
    let (code, stderr) = run_agent(&wrong);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("type.toml") && stderr.contains("ready_timeout"),
        "{stderr}"
    );

    let open = config_file(&env, "open.toml", "relay = \"127.0.0.1:9\"\n", 0o666);
    let (code, stderr) = run_agent(&open);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("writable by group or others"), "{stderr}");

    let missing = env.dir.join("missing.toml");
    let (code, stderr) = run_agent(&missing);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");

    // The relay's --config: the same strictness.
    let relay_typo = config_file(
        &env,
        "relay.toml",
        &format!(
            "domain = \"{DOMAIN}\"\ncert = \"{}\"\nkey = \"{}\"\ntokens = \"{}\"\nlisten_htps = \"127.0.0.1:0\"\n",
            env.cert.display(),
            env.key.display(),
            env.tokens.display()
        ),
        0o600,
    );
    let out = Command::new(bin())
        .args(["relay", "--config"])
        .arg(&relay_typo)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("relay.toml"), "{stderr}");
    assert!(
        stderr.contains("unknown key `listen_htps`; did you mean `listen_https`?"),
        "{stderr}"
    );
}

/// `jobgate launch` takes the site's `[launch]` defaults; a flag still wins.
#[test]
fn launch_takes_its_defaults_from_the_config() {
    let env = TestEnv::new("config-launch");
    let token = env.token_file("alice");
    let config = config_file(
        &env,
        "jobgate.toml",
        &format!(
            "relay = \"relay.example.org:7443\"\ntoken_file = \"{}\"\n[launch]\npartition = \"interactive\"\ntime = \"4:00:00\"\naccount = \"phys\"\n",
            token.display()
        ),
        0o644,
    );
    let dry_run = |extra: &[&str]| {
        let out = Command::new(bin())
            .env("JOBGATE_CONFIG", &config)
            .env("HOME", &env.dir)
            .env_remove("JOBGATE_RELAY")
            .env_remove("JOBGATE_TOKEN_FILE")
            .args(["launch", "--dry-run"])
            .args(extra)
            .args(["--", "python3", "-m", "http.server", "{port}"])
            .output()
            .expect("run");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf8")
    };
    let script = dry_run(&[]);
    for line in [
        "#SBATCH --partition=interactive",
        "#SBATCH --time=4:00:00",
        "#SBATCH --account=phys",
    ] {
        assert!(script.contains(line), "{line} missing:\n{script}");
    }
    assert!(script.contains("relay.example.org:7443"), "{script}");
    let script = dry_run(&["--time", "0:30:00", "--partition", "debug"]);
    assert!(script.contains("#SBATCH --time=0:30:00"), "{script}");
    assert!(script.contains("#SBATCH --partition=debug"), "{script}");
}
