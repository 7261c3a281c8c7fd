//! A real etcd server on loopback for the cluster tests and bench (Debian's `etcd-server`,
//! or `$JOBGATE_ETCD`): its own data directory, free ports, killed and removed on drop.

use crate::error::{Error, Result};
use crate::process::free_port;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to start on a busy 2-core machine.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running etcd.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    command: Vec<String>,
    /// `http://127.0.0.1:<port>`, what relays take as `--cluster-etcd`.
    pub url: String,
    port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it answers a read.
    pub fn start() -> Result<Self> {
        let binary = std::env::var("JOBGATE_ETCD").unwrap_or_else(|_| "etcd".into());
        let (port, peer_port) = (free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(format!("jobgate-etcd-{}-{port}", std::process::id()));
        let url = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let command: Vec<String> = [
            binary.as_str(),
            "--name",
            "t",
            "--data-dir",
            &dir.to_string_lossy(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("t={peer}"),
        ]
        .map(|s| s.to_owned())
        .to_vec();
        let child = spawn(&command)?;
        let etcd = Self {
            child,
            dir,
            command,
            url,
            port,
        };
        etcd.wait_ready()?;
        Ok(etcd)
    }

    /// Kills etcd (SIGKILL): nothing answers until [`Etcd::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.child = spawn(&self.command)?;
        self.wait_ready()
    }

    /// Waits until a read succeeds (etcd elected itself leader).
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        while !self.answers() {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("etcd on {}", self.url),
                    timeout: ETCD_START_TIMEOUT,
                    stderr: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Whether a range read through the JSON gateway answers 200.
    fn answers(&self) -> bool {
        let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
        let body = r#"{"key":"AA=="}"#;
        let request = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if tcp.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = [0u8; 64];
        let n = tcp.read(&mut answer).unwrap_or(0);
        answer[..n].starts_with(b"HTTP/1.1 200")
    }
}

fn spawn(command: &[String]) -> Result<Child> {
    Command::new(&command[0])
        .args(&command[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(Error::io(format!(
            "starting etcd ({}); install Debian's etcd-server",
            command[0]
        )))
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
