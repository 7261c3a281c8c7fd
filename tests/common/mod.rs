//! Shared plumbing for the end-to-end tests: real `jobgate` processes (relay, agents,
//! demo apps), real TLS, real HTTP/1.1, HTTP/2 and WebSocket clients.
#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The domain every test relay serves.
pub const DOMAIN: &str = "jobgate.test";

pub type TestBody = BoxBody<Bytes, std::io::Error>;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_jobgate")
}

/// A scratch directory with a dev CA, a wildcard certificate and a tokens file.
pub struct TestEnv {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub tokens: PathBuf,
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("jobgate-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let status = Command::new(bin())
            .args(["dev-cert", "--domain", DOMAIN, "--out"])
            .arg(&dir)
            .stdout(Stdio::null())
            .status()
            .expect("run dev-cert");
        assert!(status.success());
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            tokens: dir.join("tokens.toml"),
            dir,
        }
    }

    /// Issues a token for `user` and writes it to a 0600 file; returns the file.
    pub fn token_file(&self, user: &str) -> PathBuf {
        let out = Command::new(bin())
            .args(["token", "issue", "--user", user, "--tokens"])
            .arg(&self.tokens)
            .stderr(Stdio::null())
            .output()
            .expect("token issue");
        assert!(out.status.success());
        let token = String::from_utf8(out.stdout).expect("utf8");
        let path = self.dir.join(format!("{user}.token"));
        std::fs::write(&path, token.trim()).expect("write token");
        set_mode(&path, 0o600);
        path
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// How long `wait_exit` waits for an exited process's stderr to be read to its end.
const STDERR_DRAIN: Duration = Duration::from_secs(2);

/// A child process whose stderr is collected, killed on drop.
pub struct Proc {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
    /// Set once stderr reached EOF (every writer closed it).
    stderr_closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Proc {
    fn spawn(mut command: Command) -> Self {
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = command.spawn().expect("spawn jobgate");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        let stderr_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed = stderr_closed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
            closed.store(true, std::sync::atomic::Ordering::Release);
        });
        Self {
            child,
            stderr,
            stderr_closed,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// Waits for a line of stderr containing `needle`; returns the whole stderr so far.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stderr();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr within {timeout:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                use std::os::unix::process::ExitStatusExt;
                // Let the reader thread take in the last lines the process wrote (a
                // process it left behind may hold the pipe: wait a little, not forever).
                let read_until = Instant::now() + STDERR_DRAIN;
                while !self
                    .stderr_closed
                    .load(std::sync::atomic::Ordering::Acquire)
                    && Instant::now() < read_until
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }
}

/// Spawns a prepared command with collected stderr.
pub fn spawn(command: Command) -> Proc {
    Proc::spawn(command)
}

impl Proc {
    /// Waits until a unix socket exists at `path`.
    pub fn wait_for_socket(&self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket at {}:\n{}",
                path.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay process on loopback with ephemeral ports.
pub struct RelayProc {
    pub proc: Proc,
    pub https_port: u16,
    pub quic_port: u16,
}

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
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(bin());
            command
        }
        None => Command::new(bin()),
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
        .arg(&env.tokens)
        .args(extra);
    let proc = Proc::spawn(command);
    let text = proc.wait_for_stderr("agents (QUIC/UDP) on", Duration::from_secs(20));
    let line = text
        .lines()
        .find(|l| l.contains("agents (QUIC/UDP) on"))
        .expect("line");
    let port_after = |marker: &str| -> u16 {
        let rest = &line[line.find(marker).expect("marker") + marker.len()..];
        let addr = rest
            .split([',', ' '])
            .find(|s| !s.is_empty())
            .expect("addr");
        addr.rsplit(':')
            .next()
            .expect("port")
            .parse()
            .expect("port number")
    };
    let https_port = port_after("HTTPS on ");
    let quic_port = port_after("agents (QUIC/UDP) on ");
    RelayProc {
        proc,
        https_port,
        quic_port,
    }
}

/// An agent process and the URL it printed.
pub struct AgentProc {
    pub proc: Proc,
    pub url: String,
}

impl AgentProc {
    /// `https://<name>.<domain>:<port>` without path or query.
    pub fn base(&self) -> String {
        let end = self
            .url
            .find(".test:")
            .map(|i| i + 6)
            .expect("domain in url");
        let rest = &self.url[end..];
        let port_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        self.url[..end + port_len].to_owned()
    }

    /// The access key from the printed URL (link mode), or "" (public mode).
    pub fn key(&self) -> String {
        self.url
            .split("jobgate_key=")
            .nth(1)
            .and_then(|k| k.split('&').next())
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
        let host = base.trim_start_matches("https://");
        host.split(':').next().expect("host").to_owned()
    }
}

pub fn agent_command(env: &TestEnv, relay: &RelayProc, token: &Path, url_file: &Path) -> Command {
    let mut command = Command::new(bin());
    command
        .args([
            "agent",
            "--relay",
            &format!("127.0.0.1:{}", relay.quic_port),
        ])
        .arg("--relay-ca")
        .arg(&env.ca)
        .arg("--token-file")
        .arg(token)
        .arg("--url-file")
        .arg(url_file);
    command
}

/// Starts an agent with `args` appended (e.g. `--to ...` or `-- cmd`) and waits for its URL.
pub fn start_agent(env: &TestEnv, relay: &RelayProc, token: &Path, args: &[&str]) -> AgentProc {
    let url_file = env.dir.join(format!("url-{}", rand::random::<u64>()));
    let mut command = agent_command(env, relay, token, &url_file);
    command.args(args);
    let mut proc = Proc::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(url) = std::fs::read_to_string(&url_file) {
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts an agent that runs the demo app itself on `{port}`, labelled `label`.
pub fn start_demo_agent(env: &TestEnv, relay: &RelayProc, token: &Path, label: &str) -> AgentProc {
    start_agent(
        env,
        relay,
        token,
        &[
            "--",
            bin(),
            "demo-app",
            "--listen",
            "127.0.0.1:{port}",
            "--label",
            label,
        ],
    )
}

/// Runs the demo app as its own process.
pub fn start_app(listen: &str, label: &str) -> Proc {
    let mut command = Command::new(bin());
    command.args(["demo-app", "--listen", listen, "--label", label]);
    Proc::spawn(command)
}

fn tls_config(env: &TestEnv, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&env.ca).expect("ca");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("cert")).expect("add");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the relay's front door for `host` (SNI), offering `alpn`.
pub async fn tls_connect(
    env: &TestEnv,
    port: u16,
    host: &str,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let connector = tokio_rustls::TlsConnector::from(tls_config(env, alpn));
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

pub fn empty() -> TestBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An HTTP/1.1 connection to `host` through the relay.
pub async fn h1(
    env: &TestEnv,
    port: u16,
    host: &str,
) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let tls = tls_connect(env, port, host, &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    sender
}

/// An HTTP/2 connection to the relay, SNI `host` (other names may share it).
pub async fn h2(
    env: &TestEnv,
    port: u16,
    host: &str,
) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tls = tls_connect(env, port, host, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "relay must offer h2"
    );
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// A GET over a fresh HTTP/1.1 connection; returns status, headers and the whole body.
pub async fn get(
    env: &TestEnv,
    port: u16,
    host: &str,
    path: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut sender = h1(env, port, host).await;
    let request = Request::get(path)
        .header("host", host)
        .body(empty())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    collect(response).await
}

pub async fn collect(
    response: Response<hyper::body::Incoming>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Resident memory (VmRSS) of a process now, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

/// Polls `check` until it is true or `timeout` passes; returns the time it took.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The well-behaved session `good` (demo app labelled "good") answers a fresh request:
/// 200 from its own app, which saw exactly the request sent (no smuggled prefix from an
/// earlier attack, nothing confused by a misbehaving neighbour).
pub async fn assert_serves(env: &TestEnv, port: u16, good: &AgentProc, context: &str) {
    let probe = format!("/echo?probe={:016x}", rand::random::<u64>());
    let (host, path) = (good.host(), good.path(&probe));
    let request = get(env, port, &host, &path);
    let Ok((status, headers, body)) = tokio::time::timeout(Duration::from_secs(10), request).await
    else {
        panic!("{context}: the good session did not answer within 10 s");
    };
    assert_eq!(status, StatusCode::OK, "{context}: the good session failed");
    assert_eq!(
        headers.get("x-app-label").map(|v| v.as_bytes()),
        Some(&b"good"[..]),
        "{context}: answered by the wrong app"
    );
    assert_eq!(json(&body)["target"], probe.as_str(), "{context}");
}
