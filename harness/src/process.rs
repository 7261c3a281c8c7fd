//! Child processes with their stderr collected line by line (with arrival times), killed
//! and reaped on drop; and the figures of a process that tests and benches read from /proc.

use crate::error::{Error, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// How long [`Proc::wait_exit`] waits for an exited process's stderr to be read to its end
/// (a process it left behind may hold the pipe: wait a little, not forever).
const STDERR_DRAIN: Duration = Duration::from_secs(2);
/// How often waiters look at a process that prints nothing (to notice that it exited).
const POLL: Duration = Duration::from_millis(20);
/// How long [`Proc::wait_for_socket`] waits for a unix socket to appear.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How long a process collecting a profile gets to exit on `SIGTERM` when dropped.
const PROFILE_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Which stderr lines a process's reader thread also copies to our own stderr.
pub type EchoFilter = fn(&str) -> bool;

/// Stderr as collected so far.
#[derive(Default)]
struct Collected {
    lines: Vec<(SystemTime, String)>,
    /// Set once stderr reached EOF (every writer closed it).
    closed: bool,
}

/// Collected stderr, shared with the reader thread, which signals each new line.
#[derive(Default)]
struct Stderr {
    collected: Mutex<Collected>,
    changed: Condvar,
}

impl Stderr {
    fn lock(&self) -> MutexGuard<'_, Collected> {
        // A panicking reader cannot leave the lines half-written: take them anyway.
        self.collected.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A child process whose stderr is collected; killed and reaped on drop.
pub struct Proc {
    /// The child (for `try_wait`, `id`, ...).
    pub child: Child,
    /// Names the process in errors.
    label: String,
    stderr: Arc<Stderr>,
}

/// Spawns a prepared command with collected stderr; panics if it cannot start.
pub fn spawn(command: Command) -> Proc {
    Proc::start("jobgate", command).unwrap_or_else(|e| panic!("{e}"))
}

impl Proc {
    /// Starts `command` (stdin and stdout to /dev/null, stderr collected).
    pub fn start(label: &str, command: Command) -> Result<Self> {
        Self::start_echoing(label, command, None)
    }

    /// Like [`Proc::start`]; stderr lines that pass `echo` are also copied to ours
    /// (e.g. a relay's errors during a long soak).
    pub fn start_echoing(
        label: &str,
        mut command: Command,
        echo: Option<EchoFilter>,
    ) -> Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            what: format!("{label}: {command:?}"),
            source,
        })?;
        let Some(pipe) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Spawn {
                what: label.to_owned(),
                source: std::io::Error::other("no stderr pipe"),
            });
        };
        let stderr = Arc::new(Stderr::default());
        let sink = stderr.clone();
        let prefix = label.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if echo.is_some_and(|echo| echo(&line)) {
                    eprintln!("  {prefix}: {line}");
                }
                sink.lock().lines.push((SystemTime::now(), line));
                sink.changed.notify_all();
            }
            sink.lock().closed = true;
            sink.changed.notify_all();
        });
        Ok(Self {
            child,
            label: label.to_owned(),
            stderr,
        })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything on stderr so far, one `\n`-terminated line each.
    pub fn stderr(&self) -> String {
        let collected = self.stderr.lock();
        let mut text = String::new();
        for (_, line) in &collected.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// The first stderr line containing `needle` so far, with when it arrived.
    pub fn find_line(&self, needle: &str) -> Option<(SystemTime, String)> {
        self.stderr
            .lock()
            .lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .cloned()
    }

    /// Waits for a stderr line containing `needle`: (arrival time, line). Fails early if
    /// the process exits first.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<(SystemTime, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.find_line(needle) {
                return Ok(found);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The last lines may still be on their way through the pipe.
                self.drain_stderr();
                if let Some(found) = self.find_line(needle) {
                    return Ok(found);
                }
                return Err(self.exited(status, needle));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} printing {needle:?}", self.label),
                    timeout,
                    stderr: self.stderr(),
                });
            }
            self.wait_for_news(POLL);
        }
    }

    /// Waits for a line of stderr containing `needle`; returns the whole stderr so far.
    /// Panics (with the stderr) if none comes within `timeout`.
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
            self.wait_for_news(POLL);
        }
    }

    /// Waits for the process to exit; returns its exit code (128 + signal if killed).
    /// Panics if it does not exit within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        self.try_wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Proc::wait_exit`], as a `Result`.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(Error::io("waiting"))? {
                use std::os::unix::process::ExitStatusExt;
                self.drain_stderr();
                return Ok(status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} exiting", self.label),
                    timeout,
                    stderr: self.stderr(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` (errors ignored: the process may be gone).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Waits until a unix socket exists at `path`; panics after 10 s.
    pub fn wait_for_socket(&self, path: &Path) {
        let deadline = Instant::now() + SOCKET_WAIT;
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket at {}:\n{}",
                path.display(),
                self.stderr()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Blocks until a new stderr line arrives or `at_most` passes.
    fn wait_for_news(&self, at_most: Duration) {
        let collected = self.stderr.lock();
        let seen = collected.lines.len();
        let _ = self
            .stderr
            .changed
            .wait_timeout_while(collected, at_most, |c| c.lines.len() == seen && !c.closed);
    }

    /// After the process exited: lets the reader take in its last lines.
    fn drain_stderr(&self) {
        let collected = self.stderr.lock();
        let _ = self
            .stderr
            .changed
            .wait_timeout_while(collected, STDERR_DRAIN, |c| !c.closed);
    }

    fn exited(&self, status: ExitStatus, needle: &str) -> Error {
        Error::Exited {
            what: self.label.clone(),
            status,
            needle: needle.to_owned(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A binary built to collect a profile (`-Cprofile-generate`, as
        // `packaging/build-pgo.sh` does) writes it when it exits on its own: it is asked
        // to stop first, and killed only if it does not.
        if std::env::var_os("LLVM_PROFILE_FILE").is_some() {
            self.signal(nix::sys::signal::Signal::SIGTERM);
            if self.try_wait_exit(PROFILE_EXIT_WAIT).is_ok() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Figures from /proc
// ---------------------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (`"VmRSS:"`, `"VmHWM:"`, ...).
pub fn proc_status_kib(pid: i32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(Error::io(format!("reading {path}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Io {
            what: format!("reading {path}"),
            source: std::io::Error::other(format!("no {field}")),
        })
}

/// Peak resident memory (VmHWM) of a process, in KiB; panics if it cannot be read.
pub fn peak_rss_kib(pid: i32) -> u64 {
    proc_status_kib(pid, "VmHWM:").unwrap_or_else(|e| panic!("{e}"))
}

/// Resident memory (VmRSS) of a process now, in KiB; panics if it cannot be read.
pub fn rss_kib(pid: i32) -> u64 {
    proc_status_kib(pid, "VmRSS:").unwrap_or_else(|e| panic!("{e}"))
}

/// Open file descriptors of a process (0 if it cannot be read).
pub fn fd_count(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Threads of a process (0 if it cannot be read).
pub fn thread_count(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count() as u64)
}

/// CPU time consumed so far by all live threads of `pid`, in nanoseconds (schedstat,
/// else utime + stime at USER_HZ = 100; 0 if neither can be read).
pub fn cpu_ns(pid: i32) -> u64 {
    let from_schedstat = || -> Option<u64> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let path = task.ok()?.path().join("schedstat");
            let text = std::fs::read_to_string(path).ok()?;
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(total)
    };
    from_schedstat().unwrap_or_else(|| cpu_ticks(pid).map_or(0, |t| t * 10_000_000))
}

/// CPU time (user + system) of a process, in seconds (0 if it cannot be read).
pub fn cpu_s(pid: i32) -> f64 {
    cpu_ticks(pid).map_or(0.0, |t| t as f64 / 100.0)
}

/// utime + stime of `/proc/<pid>/stat` (fields 14 and 15), in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit (children inherit it); returns it.
pub fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let to_io = |e: nix::Error| Error::Io {
        what: "RLIMIT_NOFILE".into(),
        source: e.into(),
    };
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(to_io)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(to_io)?;
    }
    Ok(hard)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("binding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(Error::io("binding a free port"))?
        .port())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_tcp(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("a listener on 127.0.0.1:{port}"),
                timeout,
                stderr: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `program` on `$PATH` (or in /usr/sbin, /sbin, where nginx lives).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
