//! A relay on several cores (`cores = N`): one single-threaded runtime per core.
//!
//! Why not tokio's multi-thread runtime: on the 2-core machines this was measured on, it
//! cost ~1.5× the CPU per request of the single-threaded one (docs/performance.md): a
//! work-stealing scheduler moves tasks between threads, and every hand-off between
//! threads is a wake-up. Here each core runs a current-thread runtime of its own, and the
//! work is placed once:
//!
//! - **Clients.** Each core has its own HTTPS (and plain-HTTP) listener on the same
//!   address, bound with `SO_REUSEPORT`: the kernel spreads new connections over them by
//!   a hash of their addresses, and a connection stays on the core that accepted it (its
//!   TLS, its HTTP parsing, its request tasks). Linux lets only sockets of the same user
//!   join a `SO_REUSEPORT` group, so no other account can bind the port beside the relay.
//! - **Agents.** quinn drives each connection in a task of its own (decrypting packets,
//!   stream bookkeeping, sending); [`SpreadRuntime`] spawns each new one on the core with
//!   the fewest agent connections. The endpoint's receive loop (one UDP socket; it routes
//!   each datagram to its connection by connection ID, the decryption is the
//!   connection's) runs on core 0: measured on 2 cores, 4 of 4 paired runs, that beat a
//!   thread of its own (c50 +7 %, 5.7 µs less relay + agent CPU per request, c1 p50
//!   −43 µs), as the agents placed on core 0 then get their datagrams without a hop
//!   between threads. Agent admission, control streams, the admin API and metrics stay
//!   on the main runtime.
//! - **A cluster's peer link.** Its QUIC connections (one to and one from each other
//!   relay, carrying every forwarded browser's bytes) are handed to the cores in turn by
//!   a [`SpreadRuntime`] of their own, and each forwarded browser to the next core
//!   (`CoreLoad::spawn_in_turn`), so the link's packet work is not all on one thread.
//!
//! A request from a client on one core to an agent on another crosses threads once each
//! way (the stream is opened on the agent's connection, whose task wakes on its core).
//! One UDP socket for every agent keeps NAT rebinding harmless: `SO_REUSEPORT` on UDP
//! would steer an agent whose address changed to another socket, which would not know its
//! connection.

use quinn::Runtime;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

/// I/O events a single-threaded runtime takes from the kernel per tick (tokio's default
/// is 1,024). With fewer, a burst of 50 ready connections is handled in small batches,
/// so the first requests of a burst are on their way to the next process (relay → agent
/// → app) while the rest wait, instead of all of them being decoded before any is sent:
/// the processes of the pipeline overlap rather than take turns. Measured on 2 cores, 50
/// connections, paired runs (docs/performance.md): +16 to +30 % req/s over the default,
/// the same CPU per request, the same latency at one connection.
pub const IO_EVENTS_PER_TICK: usize = 16;

/// The most cores a relay may be told to use (`cores`); far above any host's count, it
/// only stops a typo from starting thousands of threads.
pub const MAX_CORES: usize = 1_024;

/// Pending connections each listener queues (what tokio's `TcpListener::bind` uses).
const LISTEN_BACKLOG: u32 = 1_024;

/// What each core carries, for `/metrics`.
pub struct CoreLoad {
    /// Client connections each core accepted (TLS not yet done), since start.
    clients_accepted: Box<[AtomicU64]>,
    /// Agent connections (QUIC) each core drives now.
    agents_live: Box<[AtomicI64]>,
    /// The cores' runtimes (none with one core), for their task counts and for work
    /// handed to them in turn.
    runtimes: Vec<Handle>,
    /// The core [`CoreLoad::spawn_in_turn`] uses next.
    next: AtomicUsize,
}

impl CoreLoad {
    fn new(cores: usize, runtimes: Vec<Handle>) -> Self {
        Self {
            clients_accepted: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            agents_live: (0..cores).map(|_| AtomicI64::new(0)).collect(),
            runtimes,
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `task` on the next core in turn (on the caller's runtime with one core): for
    /// connections that arrive through the main runtime, such as browsers forwarded by
    /// another relay of a cluster, so that their TLS and HTTP work is spread like that of
    /// the connections each core accepts itself.
    pub(crate) fn spawn_in_turn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.runtimes.is_empty() {
            tokio::spawn(task);
            return;
        }
        let core = self.next.fetch_add(1, Relaxed) % self.runtimes.len();
        self.runtimes[core].spawn(task);
    }

    /// Tasks alive on the cores' runtimes (the main runtime's are not counted here).
    pub(crate) fn tasks_alive(&self) -> usize {
        self.runtimes
            .iter()
            .map(|runtime| runtime.metrics().num_alive_tasks())
            .sum()
    }

    /// Counts a client connection accepted on `core`.
    pub(crate) fn client_accepted(&self, core: usize) {
        if let Some(count) = self.clients_accepted.get(core) {
            count.fetch_add(1, Relaxed);
        }
    }

    /// How many cores the relay serves on (1 with no runtime of its own).
    pub(crate) fn cores(&self) -> usize {
        self.clients_accepted.len()
    }

    /// Per core: client connections accepted so far, agent connections driven now.
    pub(crate) fn snapshot(&self) -> Vec<(u64, i64)> {
        self.clients_accepted
            .iter()
            .zip(self.agents_live.iter())
            .map(|(clients, agents)| (clients.load(Relaxed), agents.load(Relaxed)))
            .collect()
    }

    /// The core with the fewest agent connections (the first of equals).
    fn least_loaded(&self) -> usize {
        (0..self.agents_live.len())
            .min_by_key(|&core| self.agents_live[core].load(Relaxed))
            .unwrap_or(0)
    }
}

/// The cores' runtimes; dropping this stops their threads (and every task on them).
pub struct Cores {
    handles: Vec<Handle>,
    load: Arc<CoreLoad>,
    /// Dropped to stop: each thread runs its runtime until its receiver sees the drop.
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Cores {
    /// Starts `cores` threads, each running a single-threaded runtime. With one core,
    /// none: everything stays on the caller's runtime.
    pub fn start(cores: usize) -> std::io::Result<Self> {
        let threads = if cores > 1 { cores } else { 0 };
        let mut handles = Vec::with_capacity(threads);
        let mut stop = Vec::with_capacity(threads);
        for core in 0..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .max_io_events_per_tick(IO_EVENTS_PER_TICK)
                .enable_all()
                .build()?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("jobgate-core-{core}"))
                .spawn(move || {
                    // The runtime (and every task left on it) is dropped here, on its
                    // own thread, once the relay lets go of `Cores`.
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            stop.push(stop_tx);
        }
        Ok(Self {
            load: Arc::new(CoreLoad::new(cores.max(1), handles.clone())),
            handles,
            _stop: stop,
        })
    }

    /// The runtime of each core, or none when the relay runs on its caller's runtime.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// What each core carries.
    pub fn load(&self) -> Arc<CoreLoad> {
        self.load.clone()
    }

    /// One listener per core on `addr`, all in one `SO_REUSEPORT` group (on the port the
    /// first one got, where `addr` says port 0), each registered with its core's runtime;
    /// with one core, one listener on the caller's runtime.
    pub(crate) fn bind_each(&self, addr: SocketAddr) -> std::io::Result<Vec<TcpListener>> {
        let several = !self.handles.is_empty();
        let mut bound = addr;
        let mut listeners = Vec::with_capacity(self.handles.len().max(1));
        for core in 0..self.handles.len().max(1) {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(several)?;
            socket.bind(bound)?;
            bound = socket.local_addr()?;
            // Registered with the core's reactor, so its readiness wakes that core.
            let _on_core = self.handles.get(core).map(Handle::enter);
            listeners.push(socket.listen(LISTEN_BACKLOG)?);
        }
        Ok(listeners)
    }

    /// Runs `task` in `set` on `core`'s runtime (the caller's with one core).
    pub(crate) fn spawn_on<F>(&self, set: &mut JoinSet<()>, core: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.handles.get(core) {
            Some(handle) => set.spawn_on(task, handle),
            None => set.spawn(task),
        };
    }

    /// The quinn runtime for the agents' endpoint: connection tasks spread over the
    /// cores. Call [`SpreadRuntime::spread`] once the endpoint exists.
    pub fn quic_runtime(&self) -> Arc<SpreadRuntime> {
        self.spread_runtime(Placement::FewestAgents)
    }

    /// The quinn runtime for a cluster's peer link: its few, long-lived connections go
    /// to the cores in turn and are not counted as agents.
    pub fn peer_quic_runtime(&self) -> Arc<SpreadRuntime> {
        self.spread_runtime(Placement::InTurn)
    }

    fn spread_runtime(&self, placement: Placement) -> Arc<SpreadRuntime> {
        Arc::new(SpreadRuntime {
            handles: self.handles.clone(),
            load: self.load.clone(),
            spreading: AtomicBool::new(false),
            placement,
        })
    }
}

/// Where a [`SpreadRuntime`] puts a new connection's task.
#[derive(Debug)]
enum Placement {
    /// On the core with the fewest agent connections, counted while the task lives.
    FewestAgents,
    /// On the next core in turn, uncounted.
    InTurn,
}

/// quinn's tokio runtime, except that connection tasks are placed on the cores: an
/// agent's on the core with the fewest agents, a peer link's on the next core in turn.
#[derive(Debug)]
pub struct SpreadRuntime {
    handles: Vec<Handle>,
    load: Arc<CoreLoad>,
    /// Off while the endpoint is made: its first spawn is the endpoint's own receive
    /// loop, which goes to core 0 (with its socket); every later one is a connection's.
    spreading: AtomicBool,
    placement: Placement,
}

impl SpreadRuntime {
    /// From now on, each spawned task is a connection's: place it on a core.
    pub fn spread(&self) {
        self.spreading.store(true, Relaxed);
    }
}

impl std::fmt::Debug for CoreLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

impl Runtime for SpreadRuntime {
    fn new_timer(&self, at: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        // Made inside the connection's task, so the timer is its core's.
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        if !self.spreading.load(Relaxed) || self.handles.is_empty() {
            match self.handles.first() {
                Some(first) => first.spawn(future),
                None => tokio::spawn(future),
            };
            return;
        }
        if let Placement::InTurn = self.placement {
            self.load.spawn_in_turn(future);
            return;
        }
        let core = self.load.least_loaded();
        let Some(handle) = self.handles.get(core) else {
            tokio::spawn(future);
            return;
        };
        let load = self.load.clone();
        load.agents_live[core].fetch_add(1, Relaxed);
        handle.spawn(async move {
            let _live = AgentOnCore { load, core };
            future.await;
        });
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // Registered with core 0's reactor, where the receive loop runs.
        let _on_first = self.handles.first().map(Handle::enter);
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> std::time::Instant {
        quinn::TokioRuntime.now()
    }
}

/// Counts one agent connection on a core until its task ends (or is dropped with its
/// runtime).
struct AgentOnCore {
    load: Arc<CoreLoad>,
    core: usize,
}

impl Drop for AgentOnCore {
    fn drop(&mut self) {
        self.load.agents_live[self.core].fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_go_to_the_core_with_the_fewest() {
        let load = CoreLoad::new(3, Vec::new());
        assert_eq!(load.least_loaded(), 0);
        load.agents_live[0].fetch_add(1, Relaxed);
        assert_eq!(load.least_loaded(), 1);
        load.agents_live[1].fetch_add(1, Relaxed);
        load.agents_live[2].fetch_add(2, Relaxed);
        assert_eq!(load.least_loaded(), 0);
    }

    #[tokio::test]
    async fn each_core_gets_a_listener_on_one_shared_port() {
        let cores = Cores::start(3).expect("cores");
        assert_eq!(cores.handles().len(), 3);
        let listeners = cores
            .bind_each("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
    }

    #[test]
    fn tasks_on_the_cores_are_counted() {
        let cores = Cores::start(2).expect("cores");
        assert_eq!(cores.load().tasks_alive(), 0);
        let (done, wait) = tokio::sync::oneshot::channel::<()>();
        cores.handles()[1].spawn(async move {
            let _ = wait.await;
        });
        assert_eq!(cores.load().tasks_alive(), 1);
        drop(done);
    }

    /// Four tasks reported their threads' names on `rx`: two ran on each of two cores.
    async fn assert_two_on_each_of_two_cores(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
    ) {
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(rx.recv().await.flatten().unwrap_or_default());
        }
        names.sort();
        assert_eq!(
            names,
            [
                "jobgate-core-0",
                "jobgate-core-0",
                "jobgate-core-1",
                "jobgate-core-1"
            ]
        );
    }

    #[tokio::test]
    async fn work_handed_in_turn_goes_round_the_cores() {
        let cores = Cores::start(2).expect("cores");
        let load = cores.load();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let tx = tx.clone();
            load.spawn_in_turn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
            });
        }
        assert_two_on_each_of_two_cores(&mut rx).await;
    }

    #[tokio::test]
    async fn peer_link_connections_go_round_the_cores_and_are_not_agents() {
        let cores = Cores::start(2).expect("cores");
        let peers = cores.peer_quic_runtime();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (hold, held) = tokio::sync::watch::channel(());
        let spawn_one = |tx: tokio::sync::mpsc::UnboundedSender<Option<String>>| {
            let mut held = held.clone();
            Box::pin(async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
                let _ = held.changed().await; // alive until the test ends
            })
        };
        // The endpoint's own task (before `spread`) goes to core 0.
        peers.spawn(spawn_one(tx.clone()));
        assert_eq!(rx.recv().await.flatten().as_deref(), Some("jobgate-core-0"));
        peers.spread();
        for _ in 0..4 {
            peers.spawn(spawn_one(tx.clone()));
        }
        assert_two_on_each_of_two_cores(&mut rx).await;
        // Live peer connections do not show as agents on the cores.
        assert_eq!(cores.load().snapshot(), vec![(0, 0), (0, 0)]);
        drop(hold);
    }

    #[test]
    fn one_core_starts_no_thread() {
        let cores = Cores::start(1).expect("cores");
        assert!(cores.handles().is_empty());
        assert_eq!(cores.load().snapshot(), vec![(0, 0)]);
    }
}
