//! The etcd client against a real etcd server on loopback (Debian's `etcd-server`; `.ci/run`
//! installs it). A test that cannot start etcd fails.

use jobgate_harness::etcd::Etcd;
use jobgate_relay::cluster::etcd::{Claim, EtcdClient, EtcdError};
use jobgate_relay::cluster::{route_key, routes_prefix};
use std::time::{Duration, Instant};

/// Lease TTL in these tests: long enough that no keep-alive is needed while a test runs.
const TEST_LEASE_TTL_SECS: u64 = 60;

/// A real etcd (the harness's, shared with the cluster tests) and a client of it.
async fn start_etcd() -> (Etcd, EtcdClient) {
    let etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("etcd start task")
        .unwrap_or_else(|e| panic!("{e}"));
    let client = EtcdClient::new(&etcd.url).expect("client");
    (etcd, client)
}

#[tokio::test]
async fn a_claim_race_has_exactly_one_winner() {
    let (_etcd, client) = start_etcd().await;
    let key = route_key("race");
    let mut tasks = Vec::new();
    for relay in 0..8 {
        let client = client.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let lease = client
                .lease_grant(TEST_LEASE_TTL_SECS)
                .await
                .expect("lease");
            let me = format!("r{relay}").into_bytes();
            (
                me.clone(),
                client.claim(&key, &me, lease).await.expect("claim"),
            )
        }));
    }
    let mut winners = Vec::new();
    let mut holders = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            (me, Claim::Won) => winners.push(me),
            (_, Claim::Held(holder)) => holders.push(holder),
            (_, Claim::Barred) => panic!("no end marker was written"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one relay wins the name");
    assert!(
        holders.iter().all(|h| *h == winners[0]),
        "every loser is told who holds it"
    );
    let stored = client
        .get(&key)
        .await
        .expect("get")
        .expect("the key exists");
    assert_eq!(stored.value, winners[0]);
}

#[tokio::test]
async fn a_lost_lease_frees_its_names_for_another_relay() {
    let (_etcd, client) = start_etcd().await;
    let key = route_key("moving");
    let r1 = client
        .lease_grant(TEST_LEASE_TTL_SECS)
        .await
        .expect("lease r1");
    let r2 = client
        .lease_grant(TEST_LEASE_TTL_SECS)
        .await
        .expect("lease r2");
    assert_eq!(
        client.claim(&key, b"r1", r1).await.expect("claim"),
        Claim::Won
    );
    // The holder claiming again (an agent resuming on the same relay) keeps it.
    assert_eq!(
        client.claim(&key, b"r1", r1).await.expect("reclaim"),
        Claim::Won
    );
    assert_eq!(
        client.claim(&key, b"r2", r2).await.expect("claim r2"),
        Claim::Held(b"r1".to_vec())
    );
    assert!(
        client.lease_keepalive(r1).await.expect("keepalive"),
        "a live lease renews"
    );

    // r1 dies: its lease ends, its names with it, and r2 may take them.
    client.lease_revoke(r1).await.expect("revoke");
    assert!(
        !client.lease_keepalive(r1).await.expect("keepalive"),
        "an ended lease does not renew"
    );
    assert_eq!(client.get(&key).await.expect("get"), None);
    assert_eq!(
        client.claim(&key, b"r2", r2).await.expect("claim r2"),
        Claim::Won
    );
    let (routes, revision) = client.range_prefix(&routes_prefix()).await.expect("range");
    assert!(revision > 0);
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].value, b"r2");
    assert_eq!(routes[0].lease, r2.0);
}

#[tokio::test]
async fn a_move_and_a_release_only_touch_their_own_claim() {
    let (_etcd, client) = start_etcd().await;
    let key = route_key("owned");
    let r1 = client
        .lease_grant(TEST_LEASE_TTL_SECS)
        .await
        .expect("lease r1");
    let r2 = client
        .lease_grant(TEST_LEASE_TTL_SECS)
        .await
        .expect("lease r2");
    assert_eq!(
        client.claim(&key, b"r1", r1).await.expect("claim"),
        Claim::Won
    );
    // A move from a holder that no longer holds it is refused with the real holder.
    assert_eq!(
        client
            .move_if_value(&key, b"r3", b"r2", r2)
            .await
            .expect("move"),
        Claim::Held(b"r1".to_vec())
    );
    assert!(
        !client.delete_if_value(&key, b"r2").await.expect("delete"),
        "r2 cannot release r1's name"
    );
    assert_eq!(
        client
            .move_if_value(&key, b"r1", b"r2", r2)
            .await
            .expect("move"),
        Claim::Won
    );
    assert!(
        !client.delete_if_value(&key, b"r1").await.expect("delete"),
        "r1 cannot release it any more"
    );
    assert!(client.delete_if_value(&key, b"r2").await.expect("delete"));
    assert_eq!(client.get(&key).await.expect("get"), None);
}

#[tokio::test]
async fn an_unreachable_etcd_is_an_error_not_a_hang() {
    let client = EtcdClient::new(&format!(
        "http://127.0.0.1:{}",
        jobgate_harness::process::free_port().expect("a free port")
    ))
    .expect("client");
    assert!(matches!(
        client.get(b"/x").await,
        Err(EtcdError::Unreachable(_))
    ));
    assert!(matches!(
        client.lease_grant(5).await,
        Err(EtcdError::Unreachable(_))
    ));
}

#[tokio::test]
async fn a_watch_sees_claims_and_ended_leases() {
    use jobgate_relay::cluster::etcd::WatchEvent;
    let (_etcd, client) = start_etcd().await;
    let (_, revision) = client.range_prefix(&routes_prefix()).await.expect("range");
    let (events_tx, mut events) = tokio::sync::mpsc::channel(16);
    let watcher = client.clone();
    let watch = tokio::spawn(async move {
        watcher
            .watch_prefix(&routes_prefix(), revision + 1, events_tx)
            .await
    });
    let lease = client
        .lease_grant(TEST_LEASE_TTL_SECS)
        .await
        .expect("lease");
    assert_eq!(
        client
            .claim(&route_key("w"), b"r1", lease)
            .await
            .expect("claim"),
        Claim::Won
    );
    // A key outside the prefix is not seen.
    client.put(b"/elsewhere", b"x", None).await.expect("put");
    client.lease_revoke(lease).await.expect("revoke");
    let within = Duration::from_secs(30);
    let first = tokio::time::timeout(within, events.recv())
        .await
        .expect("an event")
        .expect("open");
    match first {
        WatchEvent::Put(kv) => assert_eq!((kv.key, kv.value), (route_key("w"), b"r1".to_vec())),
        other => panic!("expected the claim, got {other:?}"),
    }
    let second = tokio::time::timeout(within, events.recv())
        .await
        .expect("an event")
        .expect("open");
    assert_eq!(second, WatchEvent::Delete(route_key("w")));
    watch.abort();
}

/// Polls `check` until it holds (a watch delivers in milliseconds; a busy machine is slow).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn relays_share_routes_and_a_lost_lease_gives_names_up() {
    use jobgate_relay::cluster::node::ClusterNode;
    let (_etcd, client) = start_etcd().await;
    let r1 = ClusterNode::join(client.clone(), "r1".into(), "127.0.0.1:1".into())
        .await
        .expect("r1 joins");
    let r2 = ClusterNode::join(client.clone(), "r2".into(), "127.0.0.1:2".into())
        .await
        .expect("r2 joins");
    assert_eq!(r1.claim("nb").await.expect("claim"), Claim::Won);
    eventually("r2 sees r1's claim", || {
        r2.owner("nb").as_deref() == Some("r1")
    })
    .await;
    assert_eq!(
        r2.claim("nb").await.expect("claim"),
        Claim::Held(b"r1".to_vec())
    );

    // r1's lease ends (etcd lost it, r1 was stopped too long): r1 is told, the name is free.
    let mut losses = r1.lease_losses();
    let old = r1.lease();
    client.lease_revoke(old).await.expect("revoke");
    tokio::time::timeout(Duration::from_secs(30), losses.changed())
        .await
        .expect("r1 is told")
        .expect("open");
    assert_ne!(r1.lease(), old, "r1 holds a new lease");
    eventually("r2 sees the name freed", || r2.owner("nb").is_none()).await;
    assert_eq!(r2.claim("nb").await.expect("claim"), Claim::Won);
    eventually("r1 sees r2 holds it", || {
        r1.owner("nb").as_deref() == Some("r2")
    })
    .await;
    r2.release("nb").await.expect("release");
    eventually("both see it released", || {
        r1.owner("nb").is_none() && r2.owner("nb").is_none()
    })
    .await;
}

#[tokio::test]
async fn live_routes_outlive_an_etcd_restart() {
    use jobgate_relay::cluster::node::ClusterNode;
    let (mut etcd, client) = start_etcd().await;
    let r1 = ClusterNode::join(client.clone(), "r1".into(), "127.0.0.1:1".into())
        .await
        .expect("r1 joins");
    let r2 = ClusterNode::join(client.clone(), "r2".into(), "127.0.0.1:2".into())
        .await
        .expect("r2 joins");
    assert_eq!(r1.claim("kept").await.expect("claim"), Claim::Won);
    eventually("r2 sees r1's claim", || {
        r2.owner("kept").as_deref() == Some("r1")
    })
    .await;

    etcd.kill();
    // Live sessions keep their routes from the local copy; new claims wait, with a reason.
    assert_eq!(r2.owner("kept").as_deref(), Some("r1"));
    assert!(matches!(
        r2.claim("new").await,
        Err(EtcdError::Unreachable(_))
    ));

    etcd.restart().unwrap_or_else(|e| panic!("{e}"));
    // Nothing was lost: the claim is still r1's (its lease outlived the short outage), and
    // the copies follow new claims again once their watches are back.
    assert_eq!(
        r2.claim("kept").await.expect("claim"),
        Claim::Held(b"r1".to_vec())
    );
    assert_eq!(r2.claim("new").await.expect("claim"), Claim::Won);
    eventually("r1 sees the new claim", || {
        r1.owner("new").as_deref() == Some("r2")
    })
    .await;
    assert_eq!(r1.owner("kept").as_deref(), Some("r1"));
}
