//! Replication: what one node acknowledges, every node serves; a node that was
//! down catches up from the log and from a snapshot; large messages round-trip.

use std::time::Duration;

use mailvault_chaos::*;
use mailvault_proto::v1::TriggerSnapshotRequest;

const T: &str = "acme";
const M: &str = "support";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_on_one_node_reads_the_same_bytes_from_every_node() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    // Append through a follower-or-leader, whichever node 1 is.
    let body = test_message("Order 1234", "ann@customer.example", "BODY-MARKER-1", 10_000);
    let mut c = cluster.mailbox(1).await;
    let r = retry(Duration::from_secs(10), || {
        let mut c = c.clone();
        let body = body.clone();
        async move { append(&mut c, T, M, "k-1", &body).await }
    })
    .await
    .unwrap();
    assert_eq!(r.uid, 1);
    for i in 0..cluster.len() {
        let c = cluster.mailbox(i).await;
        let (meta, bytes) = retry(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move { fetch(&mut c, T, M, r.uid).await }
        })
        .await
        .unwrap();
        assert_eq!(bytes, body, "node {i} served different bytes");
        assert_eq!(meta.subject, "Order 1234");
        assert_eq!(meta.from, "ann@customer.example");
        assert_eq!(meta.to, vec!["support@shop.example".to_string()]);
        assert_eq!(meta.size, body.len() as u64);
    }
    // A second append with the same key stores nothing new.
    let again = append(&mut c, T, M, "k-1", &body).await.unwrap();
    assert_eq!((again.uid, again.duplicate), (1, true));
    assert_eq!(list_all(&mut c, T, M).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_down_catches_up_from_the_log_and_from_a_snapshot() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let down = (leader + 1) % 3;
    let up = 3 - leader - down;

    // Phase 1: catch up from the log.
    cluster.kill(down);
    let mut c = cluster.mailbox(leader).await;
    for n in 0..20 {
        let body = test_message(&format!("log {n}"), "a@b.example", "x", 2000);
        append(&mut c, T, M, &format!("log-{n}"), &body).await.unwrap();
    }
    cluster.start_node(down);
    let mut d = cluster.mailbox(down).await;
    let all = retry(Duration::from_secs(30), || {
        let mut d = d.clone();
        async move {
            let l = list_all(&mut d, T, M).await?;
            if l.len() < 20 {
                return Err(tonic::Status::unavailable("not caught up"));
            }
            Ok(l)
        }
    })
    .await
    .unwrap();
    assert_eq!(all.len(), 20);

    // Phase 2: the log it needs is purged, so only a snapshot can bring it back.
    cluster.kill(down);
    for n in 0..30 {
        let body = test_message(&format!("snap {n}"), "a@b.example", "y", 2000);
        append(&mut c, T, M, &format!("snap-{n}"), &body).await.unwrap();
    }
    for i in [leader, up] {
        let mut a = cluster.admin(i).await;
        let r = a
            .trigger_snapshot(TriggerSnapshotRequest { purge_log: true })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.purged_index >= r.snapshot_index && r.snapshot_index > 0,
            "{r:?}"
        );
    }
    cluster.start_node(down);
    let all = retry(Duration::from_secs(60), || {
        let mut d = d.clone();
        async move {
            let l = list_all(&mut d, T, M).await?;
            if l.len() < 50 {
                return Err(tonic::Status::unavailable("not caught up"));
            }
            Ok(l)
        }
    })
    .await
    .unwrap();
    assert_eq!(all.len(), 50);
    let (_, bytes) = fetch(&mut d, T, M, 50).await.unwrap();
    assert_eq!(bytes, test_message("snap 29", "a@b.example", "y", 2000));
    let installed = scrape_metric(&cluster.ops_addr(down), "mailvault_snapshots_installed_total").await;
    assert!(
        installed >= Some(1.0),
        "the restarted node must have installed a snapshot: {installed:?}"
    );
    let _ = &mut d;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_mib_message_round_trips_byte_exact() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let mut body = test_message("big", "big@customer.example", "BIG", 0);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while body.len() < 20 * 1024 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    let mut c = cluster.mailbox(2).await;
    let r = retry(Duration::from_secs(10), || {
        let mut c = c.clone();
        let body = body.clone();
        async move { append(&mut c, T, M, "big-1", &body).await }
    })
    .await
    .unwrap();
    for i in 0..cluster.len() {
        let mut c = cluster.mailbox(i).await;
        let (meta, bytes) = fetch(&mut c, T, M, r.uid).await.unwrap();
        assert_eq!(meta.size, body.len() as u64);
        assert!(bytes == body, "node {i}: 20 MiB body differs");
    }
    let _ = &mut c;
}
