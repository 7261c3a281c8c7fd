//! Limits on what strangers can make the relay hold: client connections (file
//! descriptors), pending agent handshakes, and memory that agents can fill through QUIC
//! flow control. Each is a counter checked once per connection, never per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// File descriptors kept free for everything but client connections: the listeners, the
/// QUIC socket, the audit log, state and token files, metrics scrapes, and the socket an
/// over-the-cap connection is accepted on before it is closed.
pub const FD_RESERVE: u64 = 64;

/// Raises the open-files soft limit to the hard limit (systemd's default soft limit is
/// 1,024) and returns the limit in force, if the system tells.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Some(hard),
        Err(e) => {
            tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
            Some(soft)
        }
    }
}

/// The total client-connection cap that fits `fd_limit`: the configured cap, lowered so
/// that accepting (and at once closing) one more connection can never run out of file
/// descriptors. Agents need none: they all share the one QUIC socket.
pub fn client_cap_for_fd_limit(configured: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return configured;
    };
    let usable = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    configured.min(usable.max(1))
}

/// Why a client connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverCap {
    /// The relay has `max_client_connections` open.
    Total,
    /// The client's address has `max_client_connections_per_ip` open.
    PerIp,
}

/// Client connections open now, in total and per address.
pub struct ConnectionCaps {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl ConnectionCaps {
    /// Caps of `max_total` connections, `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            open: Mutex::default(),
        }
    }

    /// The total cap in force.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Counts a new connection from `ip`, unless a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientPermit, OverCap> {
        // An IPv4 client on a dual-stack socket is one address, however it is written.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.max_total {
            return Err(OverCap::Total);
        }
        let from_ip = open.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(OverCap::PerIp);
        }
        *from_ip += 1;
        open.total += 1;
        Ok(ClientPermit {
            caps: self.clone(),
            ip,
        })
    }
}

/// One open client connection; gives its place back when dropped.
pub struct ClientPermit {
    caps: Arc<ConnectionCaps>,
    ip: IpAddr,
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

/// First pause after a failed `accept` (out of file descriptors, most often).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between `accept` retries: the listener is back within a second of
/// descriptors being freed.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A burst of failed accepts is logged at most this often (one line with the count),
/// not once per retry.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Exponential backoff for an accept loop, and at most one log line per
/// [`ACCEPT_LOG_INTERVAL`] with the number of failures since the last one.
pub struct AcceptBackoff {
    what: &'static str,
    pause: Duration,
    /// Failures not logged yet, and since when they are counted.
    unlogged: u64,
    counting_since: Option<Instant>,
    last_log: Option<Instant>,
}

impl AcceptBackoff {
    /// Backoff for the listener described by `what` (used in the log line).
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            pause: ACCEPT_BACKOFF_MIN,
            unlogged: 0,
            counting_since: None,
            last_log: None,
        }
    }

    /// An accept succeeded: the next failure waits the shortest pause again.
    pub fn succeeded(&mut self) {
        self.pause = ACCEPT_BACKOFF_MIN;
    }

    /// An accept failed: counts it, logs if a line is due, then sleeps (longer each time).
    pub async fn failed(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        self.unlogged += 1;
        let since = *self.counting_since.get_or_insert(now);
        if self
            .last_log
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_LOG_INTERVAL)
        {
            tracing::warn!(
                "{}: accept failed {} time(s) in the last {:.1}s: {error}",
                self.what,
                self.unlogged,
                now.duration_since(since).as_secs_f64()
            );
            self.unlogged = 0;
            self.counting_since = Some(now);
            self.last_log = Some(now);
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// Receive window of a session whose grant came out of the budget: room for WAN
/// bandwidth × RTT on bulk transfers (see `jobgate_protocol::quic`).
pub const FULL_SESSION_WINDOW: u32 = jobgate_protocol::quic::CONNECTION_RECEIVE_WINDOW;
/// Receive window of a session admitted once the budget is spent: still ~50 MB/s at
/// 20 ms RTT, and a thirty-second of the full window's memory.
pub const SMALL_SESSION_WINDOW: u32 = 1024 * 1024;
/// Per-stream receive window of a session accepted while the budget had room: one
/// download at WAN bandwidth × RTT.
pub const FULL_STREAM_WINDOW: u32 = jobgate_protocol::quic::STREAM_RECEIVE_WINDOW;
/// Per-stream receive window of a connection accepted once the budget is spent (fixed at
/// the QUIC handshake): a quarter of [`SMALL_SESSION_WINDOW`], so that one download a
/// client stopped reading cannot fill the session's whole window and stall its other
/// requests (it takes four).
pub const SMALL_STREAM_WINDOW: u32 = SMALL_SESSION_WINDOW / 4;
/// Receive window of a connection until its `Hello` is admitted: a `Hello` is at most
/// 16 KiB, so this is plenty, and a stranger can make the relay buffer no more.
pub const PRE_HELLO_WINDOW: u32 = 64 * 1024;

/// The relay-wide budget for data agents can make the relay buffer: each admitted
/// session takes its full window out of it while there is room.
pub struct WindowBudget {
    left: AtomicU64,
}

impl WindowBudget {
    /// A budget of `mib` MiB.
    pub fn new(mib: u64) -> Self {
        Self {
            left: AtomicU64::new(mib.saturating_mul(1024 * 1024)),
        }
    }

    /// Whether a full window is left to grant (a connection accepted now gets full-size
    /// stream windows).
    pub fn has_room(&self) -> bool {
        self.left.load(Ordering::Relaxed) >= u64::from(FULL_SESSION_WINDOW)
    }

    /// The window a new session gets: the full one if the budget still has room, else
    /// the small one. The grant goes back to the budget when dropped.
    pub fn grant(self: &Arc<Self>) -> WindowGrant {
        let full = u64::from(FULL_SESSION_WINDOW);
        let taken = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(full)
            })
            .is_ok();
        WindowGrant {
            budget: self.clone(),
            taken: if taken { full } else { 0 },
        }
    }
}

/// A session's share of the [`WindowBudget`].
pub struct WindowGrant {
    budget: Arc<WindowBudget>,
    taken: u64,
}

impl WindowGrant {
    /// The connection receive window this grant allows.
    pub fn window(&self) -> u32 {
        if self.taken > 0 {
            FULL_SESSION_WINDOW
        } else {
            SMALL_SESSION_WINDOW
        }
    }

    /// Whether the session got the full window.
    pub fn is_full(&self) -> bool {
        self.taken > 0
    }
}

impl Drop for WindowGrant {
    fn drop(&mut self) {
        self.budget.left.fetch_add(self.taken, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_caps_hold_and_free_on_drop() {
        let caps = Arc::new(ConnectionCaps::new(3, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = caps.admit(a).expect("first");
        let _a2 = caps.admit(a).expect("second");
        assert_eq!(caps.admit(a).err(), Some(OverCap::PerIp));
        let _b1 = caps.admit(b).expect("other address");
        assert_eq!(caps.admit(b).err(), Some(OverCap::Total));
        drop(a1);
        assert!(caps.admit(a).is_ok());
    }

    #[test]
    fn mapped_ipv4_counts_as_the_same_address() {
        let caps = Arc::new(ConnectionCaps::new(10, 1));
        let _v4 = caps.admit([10, 0, 0, 1].into()).expect("v4");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("addr");
        assert_eq!(caps.admit(mapped).err(), Some(OverCap::PerIp));
    }

    #[test]
    fn budget_grants_full_windows_until_spent_and_takes_them_back() {
        let budget = Arc::new(WindowBudget::new(64));
        let first = budget.grant();
        let second = budget.grant();
        let third = budget.grant();
        assert!(first.is_full() && second.is_full());
        assert_eq!(third.window(), SMALL_SESSION_WINDOW);
        drop(first);
        assert!(budget.grant().is_full());
    }

    #[test]
    fn client_cap_leaves_descriptors_in_reserve() {
        assert_eq!(client_cap_for_fd_limit(20_000, Some(1024)), 960);
        assert_eq!(client_cap_for_fd_limit(100, Some(1024)), 100);
        assert_eq!(client_cap_for_fd_limit(100, None), 100);
        assert_eq!(client_cap_for_fd_limit(100, Some(10)), 1);
    }
}
