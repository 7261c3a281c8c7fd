//! This relay's membership of a cluster: its etcd lease kept alive, its name claims, and a
//! watched local copy of every relay's routes (read without a network call, so a request
//! costs no etcd round trip, and live sessions keep serving while etcd is away).

use super::etcd::{Claim, EtcdClient, EtcdError, LeaseId, WatchEvent};
use super::{route_key, routes_prefix};
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
    lease: AtomicI64,
    /// Session name → node id of the relay holding it, as etcd last said.
    routes: RwLock<HashMap<String, String>>,
    /// Counts lost leases: each loss means every name this relay held is no longer its own.
    lease_losses: watch::Sender<u64>,
}

impl ClusterNode {
    /// Joins: takes a lease, reads the routes, and keeps both up to date in the background
    /// for as long as the node lives.
    pub async fn join(etcd: EtcdClient, node_id: String) -> Result<Arc<Self>, EtcdError> {
        let lease = etcd.lease_grant(LEASE_TTL_SECS).await?;
        let node = Arc::new(Self {
            etcd,
            node_id,
            lease: AtomicI64::new(lease.0),
            routes: RwLock::new(HashMap::new()),
            lease_losses: watch::channel(0).0,
        });
        let revision = node.load_routes().await?;
        tokio::spawn(keep_alive(Arc::downgrade(&node)));
        tokio::spawn(mirror_routes(Arc::downgrade(&node), revision));
        Ok(node)
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

    /// Claims session `name` for this relay (a new session, or a resume here).
    pub async fn claim(&self, name: &str) -> Result<Claim, EtcdError> {
        let claim = self
            .etcd
            .claim(&route_key(name), self.node_id.as_bytes(), self.lease())
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

    /// Replaces the local copy with etcd's routes; the revision they were read at.
    async fn load_routes(&self) -> Result<i64, EtcdError> {
        let prefix = routes_prefix();
        let (kvs, revision) = self.etcd.range_prefix(&prefix).await?;
        let fresh = kvs
            .into_iter()
            .filter_map(|kv| route_entry(&prefix, &kv.key, kv.value))
            .collect::<HashMap<_, _>>();
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(revision)
    }

    fn apply(&self, event: WatchEvent) {
        let prefix = routes_prefix();
        match event {
            WatchEvent::Put(kv) => {
                if let Some((name, owner)) = route_entry(&prefix, &kv.key, kv.value) {
                    self.set_route(&name, Some(owner));
                }
            }
            WatchEvent::Delete(key) => {
                if let Some((name, _)) = route_entry(&prefix, &key, Vec::new()) {
                    self.set_route(&name, None);
                }
            }
        }
    }
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
        match node.etcd.lease_keepalive(node.lease()).await {
            Ok(true) => {}
            Ok(false) => match node.etcd.lease_grant(LEASE_TTL_SECS).await {
                Ok(lease) => {
                    node.lease.store(lease.0, Ordering::Relaxed);
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

/// Keeps the local copy of the routes in step with etcd: a watch from the revision read,
/// and a fresh read whenever the watch breaks.
async fn mirror_routes(node: Weak<ClusterNode>, mut revision: i64) {
    loop {
        let Some(etcd) = node.upgrade().map(|n| n.etcd.clone()) else {
            return;
        };
        let (events_tx, mut events) = mpsc::channel(WATCH_QUEUE);
        let watch = tokio::spawn(async move {
            etcd.watch_prefix(&routes_prefix(), revision + 1, events_tx)
                .await
        });
        while let Some(event) = events.recv().await {
            let Some(node) = node.upgrade() else {
                watch.abort();
                return;
            };
            node.apply(event);
        }
        if let Ok(Err(e)) = watch.await {
            tracing::warn!(error = %e, "etcd watch of the routes broke; reading them again");
        }
        loop {
            tokio::time::sleep(RESYNC_PAUSE).await;
            let Some(node) = node.upgrade() else { return };
            match node.load_routes().await {
                Ok(read_at) => {
                    revision = read_at;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "etcd still away"),
            }
        }
    }
}
