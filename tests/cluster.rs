//! Several relays through etcd, as the binary exposes it so far: the settings are checked
//! together, and a relay asked to join a cluster refuses to start while clustering is
//! incomplete (never a relay that looks clustered and is not). The etcd side itself is
//! tested against a real etcd in relay/tests/etcd.rs.

mod common;

use common::*;
use std::process::Command;

const BASE: [&str; 9] = [
    "relay",
    "--domain",
    "example.org",
    "--cert",
    "/nonexistent/c",
    "--key",
    "/nonexistent/k",
    "--tokens",
    "/nonexistent/t",
];

fn relay_with(extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(BASE)
        .args(extra)
        .output()
        .expect("run jobgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cluster_settings_go_together() {
    let (code, stderr) = relay_with(&["--node-id", "r1"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("need cluster_etcd"), "{stderr}");

    let (code, stderr) =
        relay_with(&["--cluster-etcd", "http://127.0.0.1:2379", "--node-id", "r1"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("peer_listen and peer_advertise"),
        "{stderr}"
    );
}

#[test]
fn a_clustered_relay_refuses_to_start_until_clustering_is_complete() {
    let (code, stderr) = relay_with(&[
        "--cluster-etcd",
        "http://127.0.0.1:2379",
        "--node-id",
        "r1",
        "--peer-listen",
        "127.0.0.1:7444",
        "--peer-advertise",
        "r1.example.org:7444",
        "--peer-ca",
        "/nonexistent/ca.pem",
        "--peer-cert",
        "/nonexistent/peer.pem",
        "--peer-key",
        "/nonexistent/peer.key",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("clustering is not complete"), "{stderr}");
}
