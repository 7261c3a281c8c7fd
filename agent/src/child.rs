//! The app the agent supervises: `{port}`/`{sock}` substitution, start in its own
//! process group, wait until it accepts connections, pass signals on, report its exit.

use crate::target::Target;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::process::{Child, Command};

/// Placeholder replaced by a free loopback port.
pub const PORT_PLACEHOLDER: &str = "{port}";
/// Placeholder replaced by a unix socket path in a private directory.
pub const SOCK_PLACEHOLDER: &str = "{sock}";
/// How often readiness is probed.
const READY_POLL: Duration = Duration::from_millis(20);

/// Why the app could not be started.
#[derive(Debug, Error)]
pub enum ChildError {
    /// No command, or nothing says where the app will listen.
    #[error("{0}")]
    Usage(String),
    /// Preparing a port or socket directory failed.
    #[error("cannot prepare the app's address: {0}")]
    Prepare(std::io::Error),
    /// The command could not be started.
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        /// The program.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The app exited before it accepted connections.
    #[error("the app exited before it was ready ({0})")]
    ExitedEarly(String),
    /// Another user's listener holds the app's TCP port (it took `{port}` first).
    #[error(
        "another user (uid {uid}) listens on {target}, where the app should: refusing to \
         forward to it. Start the app again, preferably on {{sock}} (a private unix socket)"
    )]
    ForeignListener {
        /// The app's address.
        target: String,
        /// The owner of the listener found there.
        uid: u32,
    },
    /// The app did not accept connections in time.
    #[error("the app did not accept connections on {target} within {secs} s")]
    NotReady {
        /// Where we probed.
        target: String,
        /// The timeout.
        secs: u64,
    },
}

/// A command line with its placeholders resolved.
#[derive(Debug)]
pub struct PreparedApp {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Where the app will listen.
    pub target: Target,
    /// Private directory holding the socket, removed when the agent ends.
    pub private_dir: Option<PathBuf>,
}

/// A private 0700 directory for sockets, under `$XDG_RUNTIME_DIR` or the temp dir.
pub fn private_dir() -> std::io::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    jobgate_files::new_dir_in(&base)
}

/// A free loopback TCP port (bound and released at once).
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// Resolves `{port}` and `{sock}` in `command`; `to` names the target explicitly.
pub fn prepare(command: Vec<String>, to: Option<Target>) -> Result<PreparedApp, ChildError> {
    if command.is_empty() {
        return Err(ChildError::Usage("no app command given after --".into()));
    }
    let wants_port = command.iter().any(|a| a.contains(PORT_PLACEHOLDER));
    let wants_sock = command.iter().any(|a| a.contains(SOCK_PLACEHOLDER));
    let (target, private_dir, replacement) =
        match (to, wants_port, wants_sock) {
            (_, true, true) => {
                return Err(ChildError::Usage(
                    "use {port} or {sock} in the command, not both".into(),
                ))
            }
            (Some(target), false, false) => (target, None, None),
            (Some(_), _, _) => {
                return Err(ChildError::Usage(
                    "--to and {port}/{sock} both say where the app listens: pick one".into(),
                ))
            }
            (None, true, false) => {
                let port = free_port().map_err(ChildError::Prepare)?;
                let target = Target::Tcp(([127, 0, 0, 1], port).into());
                (target, None, Some((PORT_PLACEHOLDER, port.to_string())))
            }
            (None, false, true) => {
                let dir = private_dir().map_err(ChildError::Prepare)?;
                let sock = dir.join("app.sock");
                let text = sock.to_string_lossy().into_owned();
                (
                    Target::Unix(sock),
                    Some(dir),
                    Some((SOCK_PLACEHOLDER, text)),
                )
            }
            (None, false, false) => return Err(ChildError::Usage(
                "say where the app listens: put {port} or {sock} in its arguments, or give --to"
                    .into(),
            )),
        };
    let argv = match replacement {
        Some((placeholder, value)) => command
            .iter()
            .map(|a| a.replace(placeholder, &value))
            .collect(),
        None => command,
    };
    Ok(PreparedApp {
        argv,
        target,
        private_dir,
    })
}

/// The running app.
pub struct App {
    child: Child,
    pgid: Pid,
}

impl App {
    /// Starts the app in its own process group, with stdout/stderr going to the job's.
    pub fn spawn(argv: &[String], envs: &[(String, String)]) -> Result<Self, ChildError> {
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .process_group(0)
            .stdin(std::process::Stdio::null());
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command.spawn().map_err(|source| ChildError::Spawn {
            command: argv[0].clone(),
            source,
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        Ok(Self {
            child,
            pgid: Pid::from_raw(pid),
        })
    }

    /// Waits until `target` accepts a connection, the app exits, or `timeout` passes.
    pub async fn wait_ready(
        &mut self,
        target: &Target,
        timeout: Duration,
    ) -> Result<(), ChildError> {
        let deadline = Instant::now() + timeout;
        loop {
            if target.connect().await.is_ok() {
                return check_owner(target);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ChildError::ExitedEarly(describe(status)));
            }
            if Instant::now() >= deadline {
                return Err(ChildError::NotReady {
                    target: target.to_string(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The app's process group (its leader's pid).
    pub fn pgid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Sends `signal` to the app's whole process group.
    pub fn signal(&self, signal: Signal) {
        if self.pgid.as_raw() > 0 {
            let _ = killpg(self.pgid, signal);
        }
    }

    /// Waits for the app to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Asks the app to stop with `signal`, then kills its group after `grace`.
    pub async fn stop(&mut self, signal: Signal, grace: Duration) -> Option<ExitStatus> {
        self.signal(signal);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(
                    "the app did not stop within {} s of {signal}: killing it",
                    grace.as_secs()
                );
                self.signal(Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        }
    }
}

/// Refuses a TCP target whose listener belongs to another user (see [`crate::listener`]).
fn check_owner(target: &Target) -> Result<(), ChildError> {
    let Target::Tcp(addr) = target else {
        return Ok(());
    };
    match crate::listener::foreign_listener(*addr, nix::unistd::getuid().as_raw()) {
        Some(uid) => Err(ChildError::ForeignListener {
            target: target.to_string(),
            uid,
        }),
        None => Ok(()),
    }
}

/// The shell convention: the exit code, or 128 + the signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// "exit status 3" or "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown status".into(),
    }
}

/// Removes the private socket directory (best effort).
pub fn remove_private_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn port_placeholder_becomes_a_loopback_port() {
        let app = prepare(argv(&["app", "--port={port}"]), None).expect("prepare");
        let Target::Tcp(addr) = app.target else {
            panic!("tcp expected")
        };
        assert!(addr.ip().is_loopback());
        assert_eq!(app.argv[1], format!("--port={}", addr.port()));
    }

    #[test]
    fn sock_placeholder_lives_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let app = prepare(argv(&["app", "{sock}"]), None).expect("prepare");
        let dir = app.private_dir.clone().expect("dir");
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(app.target, Target::Unix(dir.join("app.sock")));
        remove_private_dir(&dir);
    }

    #[test]
    fn ambiguous_or_missing_targets_are_usage_errors() {
        assert!(prepare(argv(&["app"]), None).is_err());
        assert!(prepare(argv(&["app", "{port}", "{sock}"]), None).is_err());
        assert!(prepare(argv(&["app", "{port}"]), Some(Target::Unix("/x".into()))).is_err());
        assert!(prepare(vec![], None).is_err());
    }
}
