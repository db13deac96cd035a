//! Replication: what one node acknowledges, every node serves; a node that was
//! down catches up from the log and from a snapshot (also after 20,000 appends
//! and a purge); large messages round-trip.

use std::time::{Duration, Instant};

use mailvault_chaos::*;
use mailvault_proto::v1::{NodeStatusResponse, StateDigestRequest, TriggerSnapshotRequest};

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
    purge_logs(&cluster, &[leader, up]).await;
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
    // It came as a checkpoint, file by file.
    let received = scrape_metric(&cluster.ops_addr(down), "mailvault_snapshot_received_bytes_total").await;
    assert!(received > Some(0.0), "no checkpoint was received: {received:?}");
    let _ = &mut d;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_during_twenty_thousand_appends_and_a_purge_catches_up_by_a_checkpoint() {
    const APPENDS: usize = 20_000;
    const CLIENTS: usize = 16;
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let down = (leader + 1) % 3;
    cluster.kill(down);
    // 20,000 appends from 16 clients, bounded in time.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let c = cluster.mailbox(leader).await;
    let mut tasks = Vec::new();
    for w in 0..CLIENTS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0usize;
            for n in (w..APPENDS).step_by(CLIENTS) {
                if Instant::now() > deadline {
                    break;
                }
                let body = test_message(&format!("bulk {n}"), "a@b.example", "z", 300);
                let key = format!("bulk-{n}");
                let done = retry(Duration::from_secs(30), || {
                    let (mut c, body, key) = (c.clone(), body.clone(), key.clone());
                    async move { append(&mut c, T, M, &key, &body).await }
                })
                .await;
                acked += usize::from(done.is_ok());
            }
            acked
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    let took = started.elapsed();
    assert_eq!(acked, APPENDS, "every append acknowledged");
    // The log the follower would need is purged on both others.
    let others: Vec<usize> = (0..3).filter(|&i| i != down).collect();
    purge_logs(&cluster, &others).await;
    let restarted = Instant::now();
    cluster.start_node(down);
    let d = cluster.mailbox(down).await;
    let all = retry(Duration::from_secs(180), || {
        let mut d = d.clone();
        async move {
            let l = list_all(&mut d, T, M).await?;
            if l.len() < APPENDS {
                return Err(tonic::Status::unavailable("not caught up"));
            }
            Ok(l)
        }
    })
    .await
    .unwrap();
    let caught_up = restarted.elapsed();
    assert_eq!(all.len(), APPENDS);
    let installed = scrape_metric(&cluster.ops_addr(down), "mailvault_snapshots_installed_total").await;
    assert!(installed >= Some(1.0), "no snapshot installed: {installed:?}");
    let received = scrape_metric(&cluster.ops_addr(down), "mailvault_snapshot_received_bytes_total").await;
    assert!(received > Some(0.0), "no checkpoint received: {received:?}");
    // Byte-exact on the follower, and the same state everywhere.
    let mut d = d.clone();
    for uid in [1, 777, APPENDS as u32 / 2, APPENDS as u32] {
        let (meta, bytes) = fetch(&mut d, T, M, uid).await.unwrap();
        let n: usize = meta.subject.trim_start_matches("bulk ").parse().unwrap();
        assert_eq!(bytes, test_message(&format!("bulk {n}"), "a@b.example", "z", 300));
    }
    cluster.wait_all_applied().await;
    let mut digests = Vec::new();
    for i in 0..3 {
        let mut a = cluster.admin(i).await.cluster;
        let r = a.state_digest(StateDigestRequest {}).await.unwrap().into_inner();
        digests.push((r.applied_index, r.sha256));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    eprintln!(
        "{APPENDS} appends from {CLIENTS} clients in {took:?}; the follower caught up by a checkpoint of {} bytes in {caught_up:?}",
        received.unwrap_or(0.0)
    );
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

/// A snapshot on each of `nodes`, its log purged up to it.
async fn purge_logs(cluster: &Cluster, nodes: &[usize]) {
    for &i in nodes {
        let mut a = cluster.admin(i).await;
        let r = a
            .cluster
            .trigger_snapshot(TriggerSnapshotRequest { purge_log: true })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.purged_index >= r.snapshot_index && r.snapshot_index > 0,
            "{r:?}"
        );
    }
}

/// Each node's count of snapshots it built itself (or was asked to).
async fn snapshots_built(cluster: &Cluster) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..cluster.len() {
        let n = scrape_metric(&cluster.ops_addr(i), "mailvault_snapshots_built_total").await;
        out.push(n.unwrap_or(0.0));
    }
    out
}

/// Waits until every node has applied what the cluster committed so far
/// (the snapshot schedule runs on each node's applied index).
async fn settle(cluster: &Cluster, leader: usize) {
    let mut c = cluster.mailbox(leader).await;
    let n = list_all(&mut c, T, M).await.unwrap().len();
    for i in 0..cluster.len() {
        let d = cluster.mailbox(i).await;
        retry(Duration::from_secs(30), || {
            let mut d = d.clone();
            async move {
                if list_all(&mut d, T, M).await?.len() < n {
                    return Err(tonic::Status::unavailable("not caught up"));
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    // A build the schedule asks for starts within a moment of the apply.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_snapshot_on_their_own_once_new_mail_reaches_a_share_of_the_last_snapshot() {
    let mut cluster = Cluster::start(ClusterOptions {
        snapshot_every: 10,
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let mut c = cluster.mailbox(leader).await;
    let big = |n: usize| test_message(&format!("big {n}"), "a@b.example", "B", 200_000);

    // About 4 MB of mail in 20 entries: every node snapshots by itself.
    for n in 0..20 {
        append(&mut c, T, M, &format!("big-{n}"), &big(n)).await.unwrap();
    }
    settle(&cluster, leader).await;
    assert!(
        snapshots_built(&cluster).await.iter().all(|&n| n >= 1.0),
        "{:?}",
        snapshots_built(&cluster).await
    );

    // A fresh snapshot of it all on every node, then 40 small messages:
    // four times `snapshot_every` entries, but a few percent of the
    // snapshot in bytes. openraft's entry count alone would snapshot
    // four times over; the schedule waits.
    for i in 0..cluster.len() {
        let mut a = cluster.admin(i).await;
        a.cluster
            .trigger_snapshot(TriggerSnapshotRequest { purge_log: false })
            .await
            .unwrap();
    }
    let before = snapshots_built(&cluster).await;
    for n in 0..40 {
        let body = test_message(&format!("small {n}"), "a@b.example", "s", 1000);
        append(&mut c, T, M, &format!("small-{n}"), &body).await.unwrap();
    }
    settle(&cluster, leader).await;
    assert_eq!(
        snapshots_built(&cluster).await,
        before,
        "no snapshot for a little new mail"
    );

    // 1.6 MB more (over a quarter of the snapshot): every node snapshots again.
    for n in 20..28 {
        append(&mut c, T, M, &format!("big-{n}"), &big(n)).await.unwrap();
    }
    settle(&cluster, leader).await;
    let after = retry(Duration::from_secs(30), || async {
        let now = snapshots_built(&cluster).await;
        if now.iter().zip(&before).any(|(a, b)| a <= b) {
            return Err(tonic::Status::unavailable(format!("{now:?}")));
        }
        Ok(now)
    })
    .await
    .unwrap();
    assert!(
        after.iter().zip(&before).all(|(a, b)| a > b),
        "{after:?} vs {before:?}"
    );
}

async fn status(cluster: &Cluster, i: usize) -> NodeStatusResponse {
    cluster.node_status(i).await
}

/// Waits until every node has applied all of the leader's log, twice in a
/// row a second apart (status calls are not audited, so nothing new comes);
/// returns that index.
async fn wait_quiet(cluster: &Cluster, leader: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut previous = None;
    loop {
        assert!(Instant::now() < deadline, "the cluster never became quiet");
        let last = status(cluster, leader).await.last_log_index;
        let mut applied = Vec::new();
        for i in 0..cluster.len() {
            applied.push(status(cluster, i).await.applied_index);
        }
        if applied.iter().all(|&a| a == last) {
            if previous == Some(last) {
                return last;
            }
            previous = Some(last);
        } else {
            previous = None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The leader syncs its own copy of an entry while the followers receive it
/// (openraft 0.9 would have it wait for that sync first), and still a write
/// is acknowledged, and the followers apply it, only once the leader's copy
/// is on disk. The `slow-leader-sync` test mode holds each sync of the
/// leader's appends back for 3 s (while a file says so, around this one
/// write), so the order of events can be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_for_the_leaders_own_sync_while_the_followers_already_hold_it() {
    let slow = mailvault_node::test_modes::SLOW_LEADER_SYNC;
    let mut cluster = Cluster::start(ClusterOptions {
        test_modes: "slow-leader-sync".into(),
        extra_raft: "pipeline_leader_fsync = true\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let followers: Vec<usize> = (0..cluster.len()).filter(|&i| i != leader).collect();
    let base = wait_quiet(&cluster, leader).await;

    let slow_file = cluster
        .data_dir(leader)
        .join(mailvault_node::test_modes::SLOW_LEADER_SYNC_FILE);
    std::fs::write(&slow_file, b"").unwrap();
    let sent = Instant::now();
    let mut c = cluster.mailbox(leader).await;
    let body = test_message("Order 77", "bo@customer.example", "BODY-77", 2000);
    let write = tokio::spawn(async move { append(&mut c, T, M, "slow-1", &body).await });

    // The leader's sync of the entry is through 3 s after it was sent at
    // the earliest. Until then the followers receive every new entry of the
    // leader's (the write's, and the audit record of the call) — and apply
    // none of them. Only samples taken wholly before then count.
    let mut leader_last = base;
    let mut received = Vec::new();
    while received.len() < followers.len() {
        assert!(
            sent.elapsed() < slow,
            "the followers did not receive the write before the leader synced it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        if leader_last == base {
            leader_last = status(&cluster, leader).await.last_log_index;
            continue;
        }
        for &f in &followers {
            let s = status(&cluster, f).await;
            if sent.elapsed() >= slow {
                break;
            }
            assert_eq!(
                s.applied_index, base,
                "node {f} applied an entry the leader had not synced"
            );
            if s.last_log_index >= leader_last && !received.contains(&f) {
                received.push(f);
            }
        }
    }

    let r = write.await.unwrap().unwrap();
    assert_eq!((r.uid, r.duplicate), (1, false));
    assert!(
        sent.elapsed() >= slow,
        "acknowledged after {:?}, before the leader's sync",
        sent.elapsed()
    );

    // Once synced, the followers learn that it is committed and apply it.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &f in &followers {
        while status(&cluster, f).await.applied_index < leader_last {
            assert!(Instant::now() < deadline, "node {f} never applied the write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for &f in &followers {
        let mut c = cluster.mailbox(f).await;
        let (meta, _) = fetch(&mut c, T, M, 1).await.unwrap();
        assert_eq!(meta.subject, "Order 77");
    }
}
