//! Several relays sharing one set of names through etcd (high availability).
//!
//! Each relay holds an etcd lease; a session's name is claimed with a conditional write
//! (`<prefix>routes/<name>` → owning relay's node id) under that lease, so the names of a relay
//! that dies vanish with its lease and another relay may claim them when the agent resumes
//! there. Without `--cluster-etcd` none of this runs and a relay works alone.

pub mod etcd;

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
