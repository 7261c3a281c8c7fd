//! A jobgate stack of real processes: a scratch directory with a dev CA, certificate and
//! tokens ([`TestEnv`]), relays ([`RelayProc`]), agents ([`AgentProc`]) and demo apps.
//!
//! Each step has a `Result` form for benches and a panicking form (the names the tests
//! have always used: `start_relay`, `start_agent`, ...).

use crate::error::{Error, Result};
use crate::process::{EchoFilter, Proc};
use crate::startup::{parse_startup, READY_MARKER};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The domain every harness relay serves; nothing resolves it: clients connect to
/// 127.0.0.1 and send the session host as SNI and `Host`.
pub const DOMAIN: &str = "jobgate.test";
/// How long a relay has to print its ready line (a busy 2-core machine, a debug build).
const RELAY_START: Duration = Duration::from_secs(20);
/// How long an agent has to connect and print its URL.
const AGENT_START: Duration = Duration::from_secs(30);
/// How long a relay has to print its metrics line once it is ready.
const METRICS_LINE: Duration = Duration::from_secs(10);
/// What an agent prints before its URL on stderr.
pub const URL_MARKER: &str = "your app is at ";
/// How often a starting agent's URL file is looked at.
const URL_POLL: Duration = Duration::from_millis(20);

/// The `jobgate` binary under test: the one cargo built next to the running test or bench
/// executable (`target/<profile>/jobgate`; cargo builds a package's binaries before its
/// integration tests and benches). Panics with advice if it is not there.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("locating this test: {e}"));
        // target/<profile>/deps/<test>-<hash> → target/<profile>/jobgate
        let path = exe
            .parent()
            .and_then(Path::parent)
            .map(|profile| profile.join("jobgate"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no jobgate binary next to {} (run through cargo test/bench, which builds it)",
                    exe.display()
                )
            });
        path.to_string_lossy().into_owned()
    })
}

/// Sets `path`'s permission bits; panics on failure.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Runs `bin args...` to completion; returns its stdout.
fn run_jobgate(bin: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let what = || format!("{} {args:?}", bin.display());
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            what: what(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: what(),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    String::from_utf8(out.stdout).map_err(|e| Error::Command {
        command: what(),
        detail: format!("output not UTF-8: {e}"),
    })
}

/// A scratch directory with a dev CA, a wildcard certificate for [`DOMAIN`] and a tokens
/// file; removed on drop.
pub struct TestEnv {
    /// The directory.
    pub dir: PathBuf,
    /// The dev CA's certificate (clients and agents trust it).
    pub ca: PathBuf,
    /// The relay's wildcard certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The relay's tokens file.
    pub tokens: PathBuf,
    /// The `jobgate` binary that made them (and runs relays and agents).
    pub bin: PathBuf,
}

impl TestEnv {
    /// A fresh environment for the test `name` (`$TMPDIR/jobgate-test-<name>-<pid>`).
    pub fn new(name: &str) -> Self {
        Self::create(Path::new(bin()), &format!("jobgate-test-{name}"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh environment in `$TMPDIR/<prefix>-<pid>`, made by `bin dev-cert`.
    pub fn create(bin: &Path, prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        run_jobgate(
            bin,
            &[
                "dev-cert".as_ref(),
                "--domain".as_ref(),
                DOMAIN.as_ref(),
                "--out".as_ref(),
                dir.as_os_str(),
            ],
        )?;
        Ok(Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            tokens: dir.join("tokens.toml"),
            bin: bin.to_owned(),
            dir,
        })
    }

    /// Issues a token for `user` and writes it to a 0600 file; returns the file.
    pub fn token_file(&self, user: &str) -> PathBuf {
        self.issue_token(user)
            .map(|(_, path)| path)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Issues a token for `user`: (the token, a 0600 file holding it).
    pub fn issue_token(&self, user: &str) -> Result<(String, PathBuf)> {
        let out = run_jobgate(
            &self.bin,
            &[
                "token".as_ref(),
                "issue".as_ref(),
                "--user".as_ref(),
                user.as_ref(),
                "--tokens".as_ref(),
                self.tokens.as_os_str(),
            ],
        )?;
        let token = out.trim().to_owned();
        let path = self.dir.join(format!("{user}.token"));
        write_private(&path, &token)?;
        Ok((token, path))
    }
}

/// Writes `text` to a new file readable by its owner only (agents refuse other modes).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(Error::io(format!("writing {}", path.display())))
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// Relays
// ---------------------------------------------------------------------------------------

/// A relay process on loopback, and the ports it announced.
pub struct RelayProc {
    /// The process.
    pub proc: Proc,
    /// Its HTTPS front door.
    pub https_port: u16,
    /// Its QUIC endpoint for agents.
    pub quic_port: u16,
}

impl RelayProc {
    /// The metrics listener's address (needs `--listen-metrics`): waits for its line.
    pub fn metrics_addr(&mut self) -> Result<SocketAddr> {
        self.proc
            .wait_line(crate::startup::METRICS_MARKER, METRICS_LINE)?;
        parse_startup(&self.proc.stderr())?
            .metrics
            .ok_or(Error::Startup(crate::startup::StartupError::NotReady))
    }
}

/// `[wrapper...] bin relay` on 127.0.0.1 with `env`'s certificate and tokens; add flags
/// and hand it to [`launch_relay`].
pub fn relay_command(
    wrapper: &[&str],
    bin: &Path,
    env: &TestEnv,
    https_port: u16,
    quic_port: u16,
) -> Command {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(bin);
            command
        }
        None => Command::new(bin),
    };
    command
        .args(["relay", "--domain", DOMAIN])
        .arg("--listen-https")
        .arg(format!("127.0.0.1:{https_port}"))
        .arg("--listen-quic")
        .arg(format!("127.0.0.1:{quic_port}"))
        .arg("--cert")
        .arg(&env.cert)
        .arg("--key")
        .arg(&env.key)
        .arg("--tokens")
        .arg(&env.tokens);
    command
}

/// Starts a relay command and reads its ports from its startup line.
pub fn launch_relay(command: Command, echo: Option<EchoFilter>) -> Result<RelayProc> {
    let mut proc = Proc::start_echoing("relay", command, echo)?;
    proc.wait_line(READY_MARKER, RELAY_START)?;
    let addrs = parse_startup(&proc.stderr())?;
    Ok(RelayProc {
        proc,
        https_port: addrs.https.port(),
        quic_port: addrs.quic.port(),
    })
}

/// A relay on any free loopback ports with `extra` flags.
pub fn start_relay(env: &TestEnv, extra: &[&str]) -> RelayProc {
    start_relay_at(env, 0, 0, extra)
}

/// A relay on given loopback ports (0 = any), e.g. to restart one where it was.
pub fn start_relay_at(env: &TestEnv, https_port: u16, quic_port: u16, extra: &[&str]) -> RelayProc {
    start_relay_via(&[], env, https_port, quic_port, extra)
}

/// A relay started through `wrapper` (a program and its arguments, e.g.
/// `["prlimit", "--nofile=256:256"]`), which runs `jobgate relay ...`.
pub fn start_relay_via(
    wrapper: &[&str],
    env: &TestEnv,
    https_port: u16,
    quic_port: u16,
    extra: &[&str],
) -> RelayProc {
    let mut command = relay_command(wrapper, &env.bin, env, https_port, quic_port);
    command.args(extra);
    launch_relay(command, None).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------
// Agents and apps
// ---------------------------------------------------------------------------------------

/// An agent process and the URL it printed.
pub struct AgentProc {
    /// The process.
    pub proc: Proc,
    /// The access URL (with the access key in link mode).
    pub url: String,
}

/// What a client needs to reach a session through the relay in link mode.
#[derive(Clone, Debug)]
pub struct Session {
    /// `<name>.<domain>`.
    pub host: String,
    /// The access cookie, `__Host-jobgate-<name>=<key>` (as the relay sets it).
    pub cookie: String,
}

impl AgentProc {
    /// `https://<name>.<domain>:<port>` without path or query.
    pub fn base(&self) -> String {
        let start = self.url.find("://").map_or(0, |i| i + 3);
        let end = self.url[start..]
            .find(['/', '?', '#'])
            .map_or(self.url.len(), |i| start + i);
        self.url[..end].to_owned()
    }

    /// The access key from the printed URL (link mode), or "" (public mode).
    pub fn key(&self) -> String {
        self.url
            .split("jobgate_key=")
            .nth(1)
            .and_then(|k| k.split(['&', '#']).next())
            .unwrap_or_default()
            .to_owned()
    }

    /// `path` with the access key added to its query, as an API client would send it.
    pub fn path(&self, path: &str) -> String {
        let key = self.key();
        if key.is_empty() {
            return path.to_owned();
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}jobgate_key={key}")
    }

    /// Absolute URI of `path`, with the access key.
    pub fn uri(&self, path: &str) -> String {
        format!("{}{}", self.base(), self.path(path))
    }

    /// The host name, `<name>.<domain>`.
    pub fn host(&self) -> String {
        let base = self.base();
        let authority = base.split("://").nth(1).unwrap_or(&base);
        authority.split(':').next().unwrap_or(authority).to_owned()
    }

    /// Host and access cookie, for clients that cannot put the key in the query (wrk,
    /// h2load); fails in public mode (no key).
    pub fn session(&self) -> Result<Session> {
        let key = self.key();
        if key.is_empty() {
            return Err(Error::Url {
                url: self.url.clone(),
                problem: "no access key (link mode expected)",
            });
        }
        let host = self.host();
        let name = host.split('.').next().unwrap_or_default();
        Ok(Session {
            cookie: format!("__Host-jobgate-{name}={key}"),
            host,
        })
    }
}

/// `bin agent` dialing `relay` with `env`'s CA and `token`; add flags and `--to` or `--`.
pub fn agent_command_for(bin: &Path, env: &TestEnv, relay: &RelayProc, token: &Path) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("agent")
        .arg("--relay")
        .arg(format!("127.0.0.1:{}", relay.quic_port))
        .arg("--relay-ca")
        .arg(&env.ca)
        .arg("--token-file")
        .arg(token);
    command
}

/// The test binary's agent command, writing its URL to `url_file`.
pub fn agent_command(env: &TestEnv, relay: &RelayProc, token: &Path, url_file: &Path) -> Command {
    let mut command = agent_command_for(&env.bin, env, relay, token);
    command.arg("--url-file").arg(url_file);
    command
}

/// Starts an agent command and waits for the URL it prints on stderr; the line's arrival
/// time is [`Proc::find_line`]`(URL_MARKER)`.
pub fn launch_agent(command: Command) -> Result<AgentProc> {
    let mut proc = Proc::start("agent", command)?;
    let (_, line) = proc.wait_line(URL_MARKER, AGENT_START)?;
    let url = line
        .split_once(URL_MARKER)
        .map(|(_, url)| url.trim().to_owned())
        .unwrap_or_default();
    Ok(AgentProc { proc, url })
}

/// Starts an agent with `args` appended (e.g. `--to ...` or `-- cmd`) and waits for its URL.
pub fn start_agent(env: &TestEnv, relay: &RelayProc, token: &Path, args: &[&str]) -> AgentProc {
    let url_file = env.dir.join(format!("url-{}", rand::random::<u64>()));
    let mut command = agent_command(env, relay, token, &url_file);
    command.args(args);
    start_agent_command(command, &url_file)
}

/// Starts an agent command that was given `--url-file url_file` and waits for the URL
/// it writes there.
pub fn start_agent_command(command: Command, url_file: &Path) -> AgentProc {
    let mut proc = Proc::start("agent", command).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + AGENT_START;
    loop {
        // The agent writes the file atomically; a final newline says it is complete.
        if let Ok(url) = std::fs::read_to_string(url_file) {
            if url.ends_with('\n') {
                return AgentProc {
                    proc,
                    url: url.trim().to_owned(),
                };
            }
        }
        assert!(
            Instant::now() < deadline,
            "agent printed no URL:\n{}",
            proc.stderr()
        );
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("agent exited ({status}) without a URL:\n{}", proc.stderr());
        }
        std::thread::sleep(URL_POLL);
    }
}

/// Starts an agent that runs the demo app itself on `{port}`, labelled `label`.
pub fn start_demo_agent(env: &TestEnv, relay: &RelayProc, token: &Path, label: &str) -> AgentProc {
    start_demo_agent_with(env, relay, token, label, &[])
}

/// [`start_demo_agent`] with the agent's `flags` (before the app's command).
pub fn start_demo_agent_with(
    env: &TestEnv,
    relay: &RelayProc,
    token: &Path,
    label: &str,
    flags: &[&str],
) -> AgentProc {
    let bin = env.bin.to_string_lossy().into_owned();
    let mut args = flags.to_vec();
    args.extend(demo_app_command(&bin, label));
    start_agent(env, relay, token, &args)
}

/// What follows an agent's flags to have it run the demo app (`bin`), labelled `label`,
/// on the port the agent picks.
pub fn demo_app_command<'a>(bin: &'a str, label: &'a str) -> [&'a str; 7] {
    [
        "--",
        bin,
        "demo-app",
        "--listen",
        "127.0.0.1:{port}",
        "--label",
        label,
    ]
}

/// Runs the demo app (`jobgate demo-app`) as its own process.
pub fn start_app(listen: &str, label: &str) -> Proc {
    let mut command = Command::new(bin());
    command.args(["demo-app", "--listen", listen, "--label", label]);
    Proc::start("demo app", command).unwrap_or_else(|e| panic!("{e}"))
}
