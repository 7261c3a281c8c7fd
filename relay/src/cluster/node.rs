//! This relay's membership of a cluster: its etcd lease kept alive, its name claims, and a
//! watched local copy of every relay's routes (read without a network call, so a request
//! costs no etcd round trip, and live sessions keep serving while etcd is away).

use super::etcd::{Claim, EtcdClient, EtcdError, LeaseId, WatchEvent};
use super::{ended_key, node_key, nodes_prefix, route_key, routes_prefix};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// TTL of a relay's lease: how long after a relay dies (kill -9, a lost host) its names stay
/// claimed. The agent's move to another relay must finish within 10 s of the death, its
/// reconnection included, so a few seconds; long enough that a keep-alive every third of it
/// survives one lost call and a short etcd leader election.
pub const LEASE_TTL_SECS: u64 = 6;
/// How often the lease is renewed: a third of its TTL, so two renewals may fail in a row.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(LEASE_TTL_SECS / 3);
/// Pause before the routes are read and watched again after the watch broke (etcd
/// restarting): short, the local copy is stale meanwhile; not a busy loop.
pub const RESYNC_PAUSE: Duration = Duration::from_secs(1);
/// Watch events queued between the stream and the local copy.
const WATCH_QUEUE: usize = 256;

/// One relay's place in the cluster.
#[derive(Debug)]
pub struct ClusterNode {
    etcd: EtcdClient,
    node_id: String,
    /// Where other relays reach this one's peer link (`host:port`).
    advertise: String,
    lease: AtomicI64,
    /// Session name → node id of the relay holding it, as etcd last said.
    routes: RwLock<HashMap<String, String>>,
    /// Node id → peer address of every relay alive in the cluster, as etcd last said.
    peers: RwLock<HashMap<String, String>>,
    /// Counts lost leases: each loss means every name this relay held is no longer its own.
    lease_losses: watch::Sender<u64>,
}

impl ClusterNode {
    /// Joins: takes a lease, reads the routes, and keeps both up to date in the background
    /// for as long as the node lives.
    pub async fn join(
        etcd: EtcdClient,
        node_id: String,
        advertise: String,
    ) -> Result<Arc<Self>, EtcdError> {
        let lease = etcd.lease_grant(LEASE_TTL_SECS).await?;
        let node = Arc::new(Self {
            etcd,
            node_id,
            advertise,
            lease: AtomicI64::new(lease.0),
            routes: RwLock::new(HashMap::new()),
            peers: RwLock::new(HashMap::new()),
            lease_losses: watch::channel(0).0,
        });
        node.register().await?;
        for table in [Table::Routes, Table::Nodes] {
            let revision = node.load(table).await?;
            tokio::spawn(mirror(Arc::downgrade(&node), table, revision));
        }
        tokio::spawn(keep_alive(Arc::downgrade(&node)));
        Ok(node)
    }

    /// The cluster's resume-ticket key: the one in etcd, or `fresh` stored there if this is
    /// the first relay (whoever writes first wins; every relay then uses that one).
    pub async fn shared_resume_key(
        etcd: &EtcdClient,
        fresh: &[u8; crate::ticket::KEY_BYTES],
    ) -> Result<[u8; crate::ticket::KEY_BYTES], EtcdError> {
        let stored = etcd.create_or_get(&super::resume_key_key(), fresh).await?;
        stored
            .try_into()
            .map_err(|_| EtcdError::Malformed("the resume key in etcd has the wrong length".into()))
    }

    /// Announces this relay's peer address under its lease.
    async fn register(&self) -> Result<(), EtcdError> {
        self.etcd
            .put(
                &node_key(&self.node_id),
                self.advertise.as_bytes(),
                Some(self.lease()),
            )
            .await
    }

    /// The etcd client.
    pub fn etcd(&self) -> &EtcdClient {
        &self.etcd
    }

    /// Where relay `node_id`'s peer link listens, if it is alive.
    pub fn peer_address(&self, node_id: &str) -> Option<String> {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node_id)
            .cloned()
    }

    /// Every relay alive and how many sessions each holds (the metrics' view).
    pub fn sessions_by_relay(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = self
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .map(|id| (id.clone(), 0))
            .collect();
        for owner in self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            if !is_queued(owner.as_bytes()) {
                *counts.entry(owner.clone()).or_default() += 1;
            }
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort();
        counts
    }

    /// Whether another relay holds session `name` now, live or as a reserved name waiting
    /// for its job (then requests for it go there): that relay's node id.
    pub fn held_elsewhere(&self, name: &str) -> Option<String> {
        self.owner(name)
            .map(|holder| holder_node(&holder).to_owned())
            .filter(|owner| *owner != self.node_id)
    }

    /// Claims a reserved name for this relay's status page until its job's agent connects
    /// (to any relay: the claim is taken over then, see [`QUEUED_MARK`]).
    pub async fn claim_queued(&self, name: &str) -> Result<Claim, EtcdError> {
        let value = format!("{} {QUEUED_MARK}", self.node_id);
        self.etcd
            .claim_unless(
                &route_key(name),
                value.as_bytes(),
                self.lease(),
                &ended_key(name),
            )
            .await
    }

    /// Releases a reserved name's claim (its job ended without a session).
    pub async fn release_queued(&self, name: &str) -> Result<(), EtcdError> {
        let value = format!("{} {QUEUED_MARK}", self.node_id);
        self.etcd
            .delete_if_value(&route_key(name), value.as_bytes())
            .await?;
        Ok(())
    }

    /// Takes a reserved name over from the relay showing its status page (`holder`, a
    /// route value ending in [`QUEUED_MARK`]): the job's agent has come.
    pub async fn take_over_queued(&self, name: &str, holder: &[u8]) -> Result<Claim, EtcdError> {
        let claim = self
            .etcd
            .move_if_value(
                &route_key(name),
                holder,
                self.node_id.as_bytes(),
                self.lease(),
            )
            .await?;
        if claim == Claim::Won {
            self.set_route(name, Some(self.node_id.clone()));
        }
        Ok(claim)
    }

    /// This relay's node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The lease this relay's claims live under now.
    pub fn lease(&self) -> LeaseId {
        LeaseId(self.lease.load(Ordering::Relaxed))
    }

    /// Which relay holds session `name`, from the local copy.
    pub fn owner(&self, name: &str) -> Option<String> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Changes whenever this relay lost its lease: it must stop serving every name it held
    /// (another relay may own them now) and let their agents move.
    pub fn lease_losses(&self) -> watch::Receiver<u64> {
        self.lease_losses.subscribe()
    }

    /// Claims session `name` for this relay (a new session, or a resume here); never one
    /// that ended for good.
    pub async fn claim(&self, name: &str) -> Result<Claim, EtcdError> {
        let claim = self
            .etcd
            .claim_unless(
                &route_key(name),
                self.node_id.as_bytes(),
                self.lease(),
                &ended_key(name),
            )
            .await?;
        if claim == Claim::Won {
            self.set_route(name, Some(self.node_id.clone()));
        }
        Ok(claim)
    }

    /// Releases session `name` if this relay still holds it (the session ended).
    pub async fn release(&self, name: &str) -> Result<(), EtcdError> {
        self.etcd
            .delete_if_value(&route_key(name), self.node_id.as_bytes())
            .await?;
        Ok(())
    }

    /// Ends session `name` for good across the cluster: an end marker that outlives every
    /// ticket of it (`lifetime_secs`), and this relay's claim gone. Nothing is written when
    /// another relay holds the name: then only a stale connection of it ended here.
    pub async fn end_for_good(&self, name: &str, lifetime_secs: u64) -> Result<bool, EtcdError> {
        let marker_lease = self.etcd.lease_grant(lifetime_secs.max(1)).await?;
        self.etcd
            .bar_unless_held(
                &route_key(name),
                self.node_id.as_bytes(),
                &ended_key(name),
                b"ended",
                marker_lease,
            )
            .await
    }

    /// Leaves the cluster now (a drain): every claim ends with the lease.
    pub async fn leave(&self) -> Result<(), EtcdError> {
        self.etcd.lease_revoke(self.lease()).await
    }

    fn set_route(&self, name: &str, owner: Option<String>) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        match owner {
            Some(owner) => routes.insert(name.to_owned(), owner),
            None => routes.remove(name),
        };
    }

    fn table(&self, table: Table) -> &RwLock<HashMap<String, String>> {
        match table {
            Table::Routes => &self.routes,
            Table::Nodes => &self.peers,
        }
    }

    /// Replaces the local copy of `table` with etcd's; the revision it was read at.
    async fn load(&self, table: Table) -> Result<i64, EtcdError> {
        let prefix = table.prefix();
        let (kvs, revision) = self.etcd.range_prefix(&prefix).await?;
        let fresh = kvs
            .into_iter()
            .filter_map(|kv| route_entry(&prefix, &kv.key, kv.value))
            .collect::<HashMap<_, _>>();
        *self
            .table(table)
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(revision)
    }

    fn apply(&self, table: Table, event: WatchEvent) {
        let prefix = table.prefix();
        let mut copy = self
            .table(table)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match event {
            WatchEvent::Put(kv) => {
                if let Some((key, value)) = route_entry(&prefix, &kv.key, kv.value) {
                    copy.insert(key, value);
                }
            }
            WatchEvent::Delete(key) => {
                if let Some((key, _)) = route_entry(&prefix, &key, Vec::new()) {
                    copy.remove(&key);
                }
            }
        }
    }
}

/// The two tables every relay mirrors.
#[derive(Debug, Clone, Copy)]
enum Table {
    /// Session name → owning relay.
    Routes,
    /// Relay → peer address.
    Nodes,
}

impl Table {
    fn prefix(self) -> Vec<u8> {
        match self {
            Self::Routes => routes_prefix(),
            Self::Nodes => nodes_prefix(),
        }
    }
}

/// Second word of a route value whose relay only shows a reserved name's status page (no
/// agent yet): `r1 queued`. A session's agent, on any relay, may take such a name over.
pub const QUEUED_MARK: &str = "queued";

/// The node id in a route value (`r1`, or `r1 queued`).
pub fn holder_node(value: &str) -> &str {
    value.split(' ').next().unwrap_or(value)
}

/// Whether a route value is a reserved name's status page rather than a live session.
pub fn is_queued(value: &[u8]) -> bool {
    value
        .strip_suffix(QUEUED_MARK.as_bytes())
        .is_some_and(|rest| rest.ends_with(b" "))
}

/// A route key and value as (name, owner), if well-formed.
fn route_entry(prefix: &[u8], key: &[u8], value: Vec<u8>) -> Option<(String, String)> {
    let name = std::str::from_utf8(key.strip_prefix(prefix)?).ok()?;
    Some((name.to_owned(), String::from_utf8(value).ok()?))
}

/// Renews the lease; when it has ended (etcd away longer than its TTL, this relay stopped),
/// takes a new one and tells the relay its names are gone.
async fn keep_alive(node: Weak<ClusterNode>) {
    let mut tick = tokio::time::interval(KEEPALIVE_INTERVAL);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let alive = match node.etcd.lease_keepalive(node.lease()).await {
            // etcd forgot the lease (it expired while this relay was stopped, or etcd lost
            // it): the same as an answer of TTL 0.
            Err(EtcdError::Refused(why)) if why.contains("lease not found") => Ok(false),
            other => other,
        };
        match alive {
            Ok(true) => {}
            Ok(false) => match node.etcd.lease_grant(LEASE_TTL_SECS).await {
                Ok(lease) => {
                    node.lease.store(lease.0, Ordering::Relaxed);
                    if let Err(e) = node.register().await {
                        tracing::warn!(error = %e, "cannot announce this relay's peer address again");
                    }
                    node.lease_losses.send_modify(|n| *n += 1);
                    tracing::warn!(node = %node.node_id, "etcd lease lost: this relay's sessions are no longer its own");
                }
                Err(e) => tracing::warn!(error = %e, "etcd lease lost, and no new one yet"),
            },
            // etcd away: live sessions keep serving from the local copy meanwhile.
            Err(e) => tracing::warn!(error = %e, "etcd lease keep-alive failed"),
        }
    }
}

/// Keeps the local copy of `table` in step with etcd: a watch from the revision read, and a
/// fresh read whenever the watch breaks.
async fn mirror(node: Weak<ClusterNode>, table: Table, mut revision: i64) {
    loop {
        let Some(etcd) = node.upgrade().map(|n| n.etcd.clone()) else {
            return;
        };
        let (events_tx, mut events) = mpsc::channel(WATCH_QUEUE);
        let watch = tokio::spawn(async move {
            etcd.watch_prefix(&table.prefix(), revision + 1, events_tx)
                .await
        });
        while let Some(event) = events.recv().await {
            let Some(node) = node.upgrade() else {
                watch.abort();
                return;
            };
            node.apply(table, event);
        }
        if let Ok(Err(e)) = watch.await {
            tracing::warn!(error = %e, "etcd watch broke; reading {table:?} again");
        }
        loop {
            tokio::time::sleep(RESYNC_PAUSE).await;
            let Some(node) = node.upgrade() else { return };
            match node.load(table).await {
                Ok(read_at) => {
                    revision = read_at;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "etcd still away"),
            }
        }
    }
}
