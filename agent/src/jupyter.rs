//! The Jupyter preset: `jobgate agent --jupyter [-- extra jupyter args]`.
//!
//! Starts `jupyter lab` set up for life behind the relay, so users don't have to know how:
//! - it listens on a unix socket (mode 0600) in a private 0700 directory, and its kernels
//!   use `ipc` transport: nothing on the node listens on TCP, not even on loopback
//!   ([`Listen::Tcp`] is the fallback for a jupyter_server older than 1.9);
//! - `trust_xheaders` and `allow_remote_access` let Jupyter accept the browser's `Host` as
//!   forwarded by the relay, while its own Origin and XSRF checks stay on;
//! - the agent makes Jupyter's token (192 bits from the OS CSPRNG) and hands it over in a
//!   0600 file named by `JUPYTER_TOKEN_FILE`, never on the command line where `ps` would
//!   show it; the printed URL opens `lab?token=...`, so the link logs straight in.
//!
//! The user's extra arguments come last on Jupyter's command line, so they override the
//! defaults here (traitlets: the last value given wins).

use crate::child;
use crate::target::Target;
use rand::rngs::OsRng;
use rand::RngCore;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The program started when no other is given.
pub const DEFAULT_PROGRAM: &str = "jupyter";
/// Random bytes in Jupyter's token (192 bits, as Jupyter's own).
const TOKEN_BYTES: usize = 24;
const _: () = assert!(TOKEN_BYTES * 8 >= 128, "tokens carry at least 128 bits");
/// The oldest jupyter_server that can listen on a unix socket (`ServerApp.sock`).
const FIRST_SOCKET_VERSION: (u32, u32) = (1, 9);
/// How long `jupyter server --version` may take (a cold Python on a network file system).
const VERSION_TIMEOUT: Duration = Duration::from_secs(120);
/// Name of the socket inside the private directory.
const SOCKET_NAME: &str = "jupyter.sock";
/// Name of the token file inside the private directory.
const TOKEN_FILE_NAME: &str = "jupyter-token";

/// Where Jupyter listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket in the private directory (the default).
    Socket,
    /// A free loopback port (`--jupyter-tcp`, or an old jupyter_server).
    Tcp,
}

/// A private 0700 directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Creates a fresh private directory (see [`child::private_dir`]).
    pub fn create() -> std::io::Result<Self> {
        child::private_dir().map(Self)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        child::remove_private_dir(&self.0);
    }
}

/// Everything the agent needs to start Jupyter and announce it.
#[derive(Debug)]
pub struct JupyterLaunch {
    /// Program and arguments (no secret among them).
    pub argv: Vec<String>,
    /// The socket to forward to; `None` when `argv` carries `{port}`.
    pub to: Option<Target>,
    /// Extra environment for Jupyter (names the token file).
    pub env: Vec<(String, String)>,
    /// What the printed URL opens below the session's root: `lab?token=...`.
    pub app_path: String,
    /// Holds the socket and the token file; remove it (drop) when the agent is done.
    pub dir: PrivateDir,
}

/// A fresh Jupyter token: 192 bits from the OS CSPRNG, hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `jupyter lab` command line: our defaults first, then the user's `extra` arguments
/// (which win). `socket` is the socket path for [`Listen::Socket`]; for [`Listen::Tcp`]
/// the port is the agent's `{port}` placeholder.
pub fn lab_argv(program: &str, listen: Listen, socket: &Path, extra: &[String]) -> Vec<String> {
    let mut argv = vec![
        program.to_owned(),
        "lab".to_owned(),
        "--no-browser".to_owned(),
    ];
    match listen {
        Listen::Socket => {
            argv.push(format!("--ServerApp.sock={}", socket.display()));
            argv.push("--ServerApp.sock_mode=0600".to_owned());
        }
        Listen::Tcp => {
            argv.push("--ServerApp.ip=127.0.0.1".to_owned());
            argv.push(format!("--ServerApp.port={}", child::PORT_PLACEHOLDER));
            // Jupyter must not wander to another port: the agent forwards to this one.
            argv.push("--ServerApp.port_retries=0".to_owned());
        }
    }
    argv.extend(
        [
            "--KernelManager.transport=ipc",
            "--ServerApp.trust_xheaders=True",
            "--ServerApp.allow_remote_access=True",
            "--ServerApp.base_url=/",
        ]
        .map(String::from),
    );
    argv.extend(extra.iter().cloned());
    argv
}

/// The path the printed URL opens: JupyterLab, logged in with `token`.
pub fn app_path(token: &str) -> String {
    format!("lab?token={token}")
}

/// Prepares a launch: private directory, token file, command line, environment.
pub fn prepare(program: &str, listen: Listen, extra: &[String]) -> std::io::Result<JupyterLaunch> {
    let dir = PrivateDir::create()?;
    let token = new_token();
    let token_file = dir.path().join(TOKEN_FILE_NAME);
    // jupyter_server reads the file as is: no trailing newline.
    crate::token::write_private(&token_file, &token)?;
    let socket = dir.path().join(SOCKET_NAME);
    let argv = lab_argv(program, listen, &socket, extra);
    let to = match listen {
        Listen::Socket => Some(Target::Unix(socket)),
        Listen::Tcp => None,
    };
    let mut env = vec![
        (
            "JUPYTER_TOKEN_FILE".to_owned(),
            token_file.to_string_lossy().into_owned(),
        ),
        // An inherited JUPYTER_TOKEN would take precedence over the file; empty is ignored.
        ("JUPYTER_TOKEN".to_owned(), String::new()),
    ];
    // Kernel ipc sockets live in the runtime directory; a long $HOME can push their paths
    // past the 107-byte limit of unix socket names. The private directory is short.
    if std::env::var_os("JUPYTER_RUNTIME_DIR").is_none() {
        let runtime = dir.path().join("runtime");
        std::fs::create_dir(&runtime)?;
        env.push((
            "JUPYTER_RUNTIME_DIR".to_owned(),
            runtime.to_string_lossy().into_owned(),
        ));
    }
    Ok(JupyterLaunch {
        argv,
        to,
        env,
        app_path: app_path(&token),
        dir,
    })
}

/// Parses the first `MAJOR.MINOR` found in `jupyter server --version` output.
pub fn parse_version(output: &str) -> Option<(u32, u32)> {
    output.split_whitespace().find_map(|word| {
        let mut parts = word.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor_text: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, minor_text.parse().ok()?))
    })
}

/// Whether a jupyter_server of this version can listen on a unix socket.
pub fn supports_socket(version: (u32, u32)) -> bool {
    version >= FIRST_SOCKET_VERSION
}

/// Why Jupyter cannot be started at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The program is not on `PATH` (or not an executable file).
    #[error("cannot find {0:?} on PATH: is JupyterLab installed and its environment active in the job (module load, conda activate, source venv/bin/activate)?")]
    NotFound(String),
}

/// Where `program` is: itself if it names a path, else the first executable on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// The Python interpreter (with its arguments) named by a script's `#!` line, if it is one:
/// `#!/venv/bin/python3` or `#!/usr/bin/env python3`.
pub fn python_of_shebang(first_line: &str) -> Option<Vec<String>> {
    let words: Vec<&str> = first_line.strip_prefix("#!")?.split_whitespace().collect();
    let name = |w: &str| w.rsplit('/').next().unwrap_or(w).to_owned();
    match words.as_slice() {
        [interp, ..] if name(interp).starts_with("python") => Some(vec![(*interp).to_owned()]),
        [env, python, ..] if name(env) == "env" && python.starts_with("python") => {
            Some(vec![(*env).to_owned(), (*python).to_owned()])
        }
        _ => None,
    }
}

/// Asks the installed jupyter_server for its version: `Ok(None)` if it answered nothing
/// we understand (then the socket is tried anyway). Fast when `jupyter` is a Python
/// script (its interpreter imports `jupyter_server`, ~50 ms); otherwise it runs
/// `jupyter server --version` (seconds).
pub async fn probe_version(program: &str) -> Result<Option<(u32, u32)>, ProbeError> {
    let path = find_program(program).ok_or_else(|| ProbeError::NotFound(program.to_owned()))?;
    let first_line = std::fs::File::open(&path)
        .ok()
        .and_then(|file| {
            use std::io::{BufRead, Read};
            let mut line = String::new();
            std::io::BufReader::new(file.take(512))
                .read_line(&mut line)
                .ok()
                .map(|_| line)
        })
        .unwrap_or_default();
    let mut command = match python_of_shebang(&first_line) {
        Some(interp) => {
            let mut command = tokio::process::Command::new(&interp[0]);
            command.args(&interp[1..]).args([
                "-c",
                "import jupyter_server; print(jupyter_server.__version__)",
            ]);
            command
        }
        None => {
            let mut command = tokio::process::Command::new(&path);
            command.args(["server", "--version"]);
            command
        }
    };
    let output = command
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_TIMEOUT, output).await {
        Ok(Ok(output)) if output.status.success() => {
            Ok(parse_version(&String::from_utf8_lossy(&output.stdout)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn tokens_are_long_random_hex() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), TOKEN_BYTES * 2);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn socket_argv_listens_on_no_tcp_and_keeps_checks_on() {
        let argv = lab_argv("jupyter", Listen::Socket, Path::new("/p/jupyter.sock"), &[]);
        assert_eq!(argv[..3], strings(&["jupyter", "lab", "--no-browser"]));
        for flag in [
            "--ServerApp.sock=/p/jupyter.sock",
            "--ServerApp.sock_mode=0600",
            "--KernelManager.transport=ipc",
            "--ServerApp.trust_xheaders=True",
            "--ServerApp.allow_remote_access=True",
            "--ServerApp.base_url=/",
        ] {
            assert!(argv.iter().any(|a| a == flag), "{flag} missing in {argv:?}");
        }
        for a in &argv {
            assert!(!a.contains("ServerApp.port"), "{a}");
            assert!(!a.contains("ServerApp.ip"), "{a}");
            assert!(!a.contains("allow_origin"), "{a}");
            assert!(!a.contains("disable_check_xsrf"), "{a}");
        }
    }

    #[test]
    fn tcp_argv_uses_the_port_placeholder_on_loopback() {
        let argv = lab_argv("jupyter", Listen::Tcp, Path::new("/unused"), &[]);
        assert!(argv.contains(&"--ServerApp.port={port}".to_owned()));
        assert!(argv.contains(&"--ServerApp.ip=127.0.0.1".to_owned()));
        assert!(argv.contains(&"--ServerApp.port_retries=0".to_owned()));
        assert!(!argv.iter().any(|a| a.contains("sock")));
    }

    #[test]
    fn user_arguments_come_last() {
        let extra = strings(&["--notebook-dir=/data", "--ServerApp.base_url=/x/"]);
        let argv = lab_argv("/opt/jupyter", Listen::Socket, Path::new("/s"), &extra);
        assert_eq!(argv[0], "/opt/jupyter");
        assert_eq!(argv[argv.len() - 2..], extra[..]);
    }

    #[test]
    fn prepare_keeps_the_token_off_the_command_line() {
        let launch = prepare("jupyter", Listen::Socket, &[]).expect("prepare");
        let token = launch
            .app_path
            .strip_prefix("lab?token=")
            .expect("app path")
            .to_owned();
        assert!(token.len() >= 32);
        assert!(!launch.argv.iter().any(|a| a.contains(&token)));
        let dir = launch.dir.path().to_owned();
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let (_, file) = launch
            .env
            .iter()
            .find(|(k, _)| k == "JUPYTER_TOKEN_FILE")
            .expect("token file env");
        let file = PathBuf::from(file);
        assert!(file.starts_with(&dir));
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read_to_string(&file).expect("read"), token);
        assert!(launch
            .env
            .contains(&("JUPYTER_TOKEN".into(), String::new())));
        assert_eq!(launch.to, Some(Target::Unix(dir.join(SOCKET_NAME))));
        assert!(launch.argv.contains(&format!(
            "--ServerApp.sock={}",
            dir.join(SOCKET_NAME).display()
        )));
        drop(launch);
        assert!(!dir.exists(), "the private directory goes with the launch");
    }

    #[test]
    fn prepare_tcp_leaves_the_target_to_the_port_placeholder() {
        let launch = prepare("jupyter", Listen::Tcp, &[]).expect("prepare");
        assert_eq!(launch.to, None);
        assert!(launch.argv.iter().any(|a| a.contains("{port}")));
    }

    #[test]
    fn shebangs_name_the_python() {
        let v = |s: &[&str]| Some(strings(s));
        assert_eq!(
            python_of_shebang("#!/venv/bin/python3\n"),
            v(&["/venv/bin/python3"])
        );
        assert_eq!(
            python_of_shebang("#!/usr/bin/env python3.11\n"),
            v(&["/usr/bin/env", "python3.11"])
        );
        assert_eq!(python_of_shebang("#!/bin/sh\n"), None);
        assert_eq!(python_of_shebang("\x7fELF"), None);
        assert_eq!(python_of_shebang(""), None);
    }

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(find_program("sh").is_some());
        assert_eq!(find_program("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find_program("jobgate-no-such-program"), None);
        assert_eq!(find_program("/nonexistent/jupyter"), None);
    }

    #[test]
    fn versions_parse_and_gate_the_socket() {
        assert_eq!(parse_version("2.14.2\n"), Some((2, 14)));
        assert_eq!(parse_version("1.9.0rc1"), Some((1, 9)));
        assert_eq!(parse_version("garbage"), None);
        assert!(supports_socket((2, 0)));
        assert!(supports_socket((1, 9)));
        assert!(!supports_socket((1, 8)));
    }
}
