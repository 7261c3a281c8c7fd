//! Several relays sharing one set of names through etcd (high availability).
//!
//! Each relay holds an etcd lease; a session's name is claimed with a conditional write
//! (`<prefix>routes/<name>` → owning relay's node id) under that lease, so the names of a relay
//! that dies vanish with its lease and another relay may claim them when the agent resumes
//! there. Without `--cluster-etcd` none of this runs and a relay works alone.

pub mod etcd;
pub mod node;

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
