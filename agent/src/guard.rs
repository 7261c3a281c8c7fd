//! The app's guard: no app outlives its agent.
//!
//! The agent stops its app itself on every exit it sees (signals, relay refusal, errors).
//! It cannot when it is killed outright (SIGKILL, the OOM killer). Slurm then cleans up
//! the job's cgroup, but not every site runs Slurm with cgroups, and an agent started by
//! hand has no cgroup at all: the app would run on, unreachable, holding the node's memory
//! and GPUs. So the agent starts a guard next to the app: this same binary in a small
//! mode (`jobgate __app-guard`), which asks the kernel for a signal when its parent dies
//! (`PR_SET_PDEATHSIG`), waits, and then stops the app's process group as the agent would
//! have: SIGTERM, [`GUARD_STOP_GRACE`], SIGKILL.
//!
//! The guard blocks the usual termination signals, so a Ctrl-C or a `scancel` meant for
//! the agent does not end it early; it runs in its own process group for the same reason.
//! When the agent exits normally the app is already gone and the guard exits at once.

use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::{getppid, Pid};
use std::path::Path;
use std::time::{Duration, Instant};

/// The hidden subcommand that runs the guard.
pub const GUARD_SUBCOMMAND: &str = "__app-guard";
/// How long the app gets to stop after SIGTERM once its agent is gone.
pub const GUARD_STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the guard checks whether the app's group is gone while it stops it.
const GUARD_POLL: Duration = Duration::from_millis(100);
/// The signal the kernel sends the guard when the agent dies.
const PARENT_DEATH_SIGNAL: Signal = Signal::SIGUSR1;

/// Starts a guard for the app's process group `pgid`, running `exe` (the `jobgate`
/// binary). The guard is reaped by tokio when it exits.
pub fn spawn(exe: &Path, pgid: i32) -> std::io::Result<()> {
    let parent = std::process::id();
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(GUARD_SUBCOMMAND)
        .arg("--parent")
        .arg(parent.to_string())
        .arg("--pgid")
        .arg(pgid.to_string())
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(false);
    command.spawn().map(drop)
}

/// The guard's whole life; returns its exit code. Call it before any runtime starts
/// threads: signals are blocked on the calling thread only.
pub fn run(parent: i32, pgid: i32) -> i32 {
    let mut waited = SigSet::empty();
    for signal in [
        PARENT_DEATH_SIGNAL,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        waited.add(signal);
    }
    // Blocked before the parent-death signal is armed, so it cannot kill the guard.
    if waited.thread_block().is_err()
        || nix::sys::prctl::set_pdeathsig(PARENT_DEATH_SIGNAL).is_err()
    {
        crate::warn_user!("the app guard could not arm itself; the app will not be stopped if the agent is killed");
        return 1;
    }
    // The signal also comes when the thread that started the guard ends while the agent
    // lives on; only a new parent (init or a subreaper) means the agent is gone. Checking
    // first also covers an agent that died before the guard was armed.
    while getppid().as_raw() == parent {
        if waited.wait().is_err() {
            std::thread::sleep(GUARD_POLL);
        }
    }
    stop_group(Pid::from_raw(pgid));
    0
}

fn group_alive(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
}

/// SIGTERM to the group, then SIGKILL if it is still there after the grace.
fn stop_group(pgid: Pid) {
    if pgid.as_raw() <= 1 || !group_alive(pgid) {
        return;
    }
    crate::say!(
        "the agent ended without stopping its app: stopping the app (process group {pgid})"
    );
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + GUARD_STOP_GRACE;
    while Instant::now() < deadline {
        if !group_alive(pgid) {
            return;
        }
        std::thread::sleep(GUARD_POLL);
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}
