//! Several relays sharing one set of names through etcd (high availability).
//!
//! Each relay holds an etcd lease; a session's name is claimed with a conditional write
//! (`<prefix>routes/<name>` → owning relay's node id) under that lease, so the names of a relay
//! that dies vanish with its lease and another relay may claim them when the agent resumes
//! there. Without `--cluster-etcd` none of this runs and a relay works alone.

pub mod etcd;
pub mod node;
pub mod peer;

/// Key prefix of every jobgate key in etcd (one etcd may serve other applications too).
pub const KEY_PREFIX: &str = "/jobgate/";

/// The etcd key holding which relay owns session `name`.
pub fn route_key(name: &str) -> Vec<u8> {
    format!("{KEY_PREFIX}routes/{name}").into_bytes()
}

/// The prefix of every route key (a range over it is the cluster's routing table).
pub fn routes_prefix() -> Vec<u8> {
    format!("{KEY_PREFIX}routes/").into_bytes()
}

/// The etcd key marking session `name` ended for good (no relay may claim it again).
pub fn ended_key(name: &str) -> Vec<u8> {
    format!("{KEY_PREFIX}ended/{name}").into_bytes()
}

/// The etcd key holding relay `node_id`'s peer address (under its lease: gone with it).
pub fn node_key(node_id: &str) -> Vec<u8> {
    format!("{KEY_PREFIX}nodes/{node_id}").into_bytes()
}

/// The prefix of every node key.
pub fn nodes_prefix() -> Vec<u8> {
    format!("{KEY_PREFIX}nodes/").into_bytes()
}

/// The etcd key holding the cluster's resume-ticket key: one key, so a ticket from any relay
/// is good on every relay. Whoever can read etcd can forge tickets: etcd is the cluster's
/// trust root and must be reachable by the relays only (docs/admin-guide.md).
pub fn resume_key_key() -> Vec<u8> {
    format!("{KEY_PREFIX}resume-key").into_bytes()
}

/// Longest node id: it is part of etcd values and metric labels.
pub const MAX_NODE_ID_LEN: usize = 63;

/// Whether `id` can name a relay: 1-63 ASCII letters, digits, `-` or `_`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A clustered relay's two halves: its membership (etcd) and its link to the other relays.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub node: std::sync::Arc<node::ClusterNode>,
    pub link: std::sync::Arc<peer::PeerLink>,
}

/// How long an admission waits for another relay's claim on the name to lapse (the agent
/// moved here because that relay died: its lease ends within its TTL) before refusing. Under
/// the agent's wait for its `Welcome` (10 s).
pub const CLAIM_WAIT: std::time::Duration =
    std::time::Duration::from_secs(node::LEASE_TTL_SECS + 1);
/// How often a waiting admission looks at the local copy of the routes.
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(100);

use crate::agents::Refusal;
use crate::names::SessionName;
use crate::Shared;
use jobgate_protocol::RefusalCode;
use std::sync::Arc;

/// Claims `name` for this relay before its session is welcomed: a new name, a resume, a
/// move from a dead relay (waiting out its lease, up to [`CLAIM_WAIT`]). Refused when
/// another relay's connection of the session stays live, when the name ended for good on
/// any relay, or when etcd is unreachable (new sessions and moves wait; live ones go on).
pub(crate) async fn claim_session(shared: &Shared, name: SessionName) -> Result<(), Refusal> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    loop {
        let claim = cluster.node.claim(name.as_str()).await.map_err(|e| {
            Refusal::new(
                RefusalCode::TryAgain,
                format!("the relays' shared store is unreachable, so no session can start or move now; live sessions go on ({e})"),
            )
        })?;
        let holder = match claim {
            etcd::Claim::Won => return Ok(()),
            etcd::Claim::Barred => {
                // Ended on another relay: remember it here too, so the agent's next try
                // (with the same ticket) gets a new name.
                crate::agents::mark_ended(shared, name);
                return Err(Refusal::new(
                    RefusalCode::TryAgain,
                    format!("session {name} has ended; a new one starts on the next try"),
                ));
            }
            // A reserved name whose status page some relay shows: the job's agent takes it.
            etcd::Claim::Held(holder) if node::is_queued(&holder) => {
                match cluster.node.take_over_queued(name.as_str(), &holder).await {
                    Ok(etcd::Claim::Won) => return Ok(()),
                    _ if tokio::time::Instant::now() >= deadline => {
                        return Err(Refusal::new(
                            RefusalCode::TryAgain,
                            format!(
                                "session {name} could not be taken over from its reserving relay"
                            ),
                        ))
                    }
                    _ => continue,
                }
            }
            etcd::Claim::Held(holder) => String::from_utf8_lossy(&holder).into_owned(),
        };
        // Wait for the holder's claim to vanish from the watched copy, then claim again.
        while cluster.node.owner(name.as_str()).as_deref() == Some(holder.as_str()) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Refusal::new(
                    RefusalCode::TryAgain,
                    format!("session {name} is live on relay {holder} (another connection of it holds the name)"),
                ));
            }
            tokio::time::sleep(CLAIM_POLL).await;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Refusal::new(
                RefusalCode::TryAgain,
                format!("session {name} is held by relay {holder}"),
            ));
        }
    }
}

/// Runs `write` (an etcd write about a name) in the background, in a cluster only: the
/// caller (a session ending, a reservation) never waits on etcd.
fn in_background<F, Fut>(shared: &Shared, write: F)
where
    F: FnOnce(Arc<node::ClusterNode>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if let Some(cluster) = &shared.cluster {
        tokio::spawn(write(cluster.node.clone()));
    }
}

/// Gives `name` up (its agent is gone for now; the name waits here for the resume grace,
/// and any relay may take it when the agent comes back elsewhere).
pub(crate) fn release(shared: &Shared, name: SessionName) {
    in_background(shared, |node| async move {
        if let Err(e) = node.release(name.as_str()).await {
            tracing::warn!(%name, error = %e, "cannot release the session's name in etcd; it lapses with this relay's lease");
        }
    });
}

/// Ends `name` for good on every relay (a `Bye`, a revoked token, the grace ran out).
pub(crate) fn end_for_good(shared: &Shared, name: SessionName) {
    let lifetime = shared.config.ticket_lifetime_secs;
    in_background(shared, move |node| async move {
        match node.end_for_good(name.as_str(), lifetime).await {
            Ok(true) => {}
            Ok(false) => tracing::debug!(%name, "session lives on another relay: not ended there"),
            Err(e) => tracing::warn!(%name, error = %e, "cannot record the session's end in etcd"),
        }
    });
}

/// Claims a name reserved here for its status page (a reservation, or one restored from
/// the state file), so every relay sends its browsers here until the job's agent comes.
pub(crate) fn claim_queued(shared: &Shared, name: SessionName) {
    in_background(shared, |node| async move {
        match node.claim_queued(name.as_str()).await {
            Ok(etcd::Claim::Won) => {}
            Ok(other) => tracing::debug!(%name, ?other, "reserved name not claimed for its page"),
            Err(e) => {
                tracing::warn!(%name, error = %e, "cannot claim a reserved name in etcd: only this relay shows its page")
            }
        }
    });
}

/// Ends a reserved name whose job ended without a session, on every relay: its page's
/// claim goes, its end marker comes.
pub(crate) fn end_queued_for_good(shared: &Shared, name: SessionName) {
    let lifetime = shared.config.ticket_lifetime_secs;
    in_background(shared, move |node| async move {
        let ended = match node.release_queued(name.as_str()).await {
            Ok(()) => node.end_for_good(name.as_str(), lifetime).await,
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            tracing::warn!(%name, error = %e, "cannot record the reserved name's end in etcd");
        }
    });
}

/// Whether another relay holds `name` now.
pub(crate) fn held_elsewhere(shared: &Shared, name: &str) -> Option<String> {
    shared.cluster.as_ref()?.node.held_elsewhere(name)
}

/// Follows this relay's lease: when it was lost (etcd away past its TTL, or this process
/// stopped), every name held here is claimed again under the new lease; a session whose
/// name another relay took meanwhile is closed (`Draining`: its agent reconnects and finds
/// the relay that holds it now).
pub(crate) async fn follow_lease(shared: Arc<Shared>) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let mut losses = cluster.node.lease_losses();
    // Reserved names restored from the state file show their page from here again.
    for name in shared.queued.names() {
        claim_queued(&shared, name);
    }
    while losses.changed().await.is_ok() {
        for name in shared.queued.names() {
            claim_queued(&shared, name);
        }
        for session in shared.routes.all() {
            let kept = matches!(
                cluster.node.claim(session.name.as_str()).await,
                Ok(etcd::Claim::Won)
            );
            if !kept {
                tracing::info!(name = %session.name, "another relay holds this session now: closing its connection here");
                session.connection.close(
                    jobgate_protocol::CloseCode::Draining,
                    b"another relay holds the session",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RelayConfig;

    fn clustered() -> RelayConfig {
        let mut config = RelayConfig::new("example.org", "c".into(), "k".into(), "t".into());
        config.cluster_etcd = Some("http://127.0.0.1:2379,http://127.0.0.2:2379".into());
        config.node_id = Some("r1".into());
        config.peer_listen = Some(([127, 0, 0, 1], 7444).into());
        config.peer_advertise = Some("r1.example.org:7444".into());
        config.peer_ca = Some("ca.pem".into());
        config.peer_cert = Some("peer.pem".into());
        config.peer_key = Some("peer.key".into());
        config
    }

    #[test]
    fn a_cluster_needs_a_node_id_a_peer_link_and_its_pki() {
        assert_eq!(clustered().validate(), Ok(()));
        let mut c = clustered();
        c.node_id = None;
        assert!(c.validate().is_err());
        let mut c = clustered();
        c.node_id = Some("r 1".into());
        assert!(c.validate().is_err());
        let mut c = clustered();
        c.peer_advertise = None;
        assert!(c.validate().is_err());
        let mut c = clustered();
        c.peer_key = None;
        assert!(c.validate().is_err());
        let mut c = clustered();
        c.cluster_etcd = Some("https://etcd:2379".into());
        assert!(c.validate().is_err());
        let mut c = clustered();
        c.oidc_issuer = Some("https://idp.example.org".into());
        c.oidc_client_id = Some("jobgate".into());
        c.oidc_client_secret_file = Some("secret".into());
        assert!(c
            .validate()
            .is_err_and(|why| why.contains("single sign-on state is per relay")));
    }

    #[test]
    fn a_lone_relay_takes_no_cluster_settings() {
        let lone = RelayConfig::new("example.org", "c".into(), "k".into(), "t".into());
        assert_eq!(lone.validate(), Ok(()));
        let mut stray = lone.clone();
        stray.node_id = Some("r1".into());
        assert!(stray.validate().is_err());
    }

    #[test]
    fn node_ids_are_short_plain_names() {
        assert!(valid_node_id("relay-1_a"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("r/1"));
        assert!(!valid_node_id(&"r".repeat(MAX_NODE_ID_LEN + 1)));
    }
}
