//! Housekeeping against real nodes: the chunks of an upload whose leader
//! was killed before its final append are expired on every node once the
//! upload has been idle for `limits.staged_expiry_secs`, and the upload can
//! be sent again.

use std::time::{Duration, Instant};

use futures::StreamExt;
use mailvault_chaos::*;

const T: &str = "acme";
const M: &str = "support";
/// `limits.staged_expiry_secs` of this test's nodes.
const EXPIRY: Duration = Duration::from_secs(10);
const BIG: usize = 20 * 1024 * 1024;

/// (uploads, chunks, bytes) node `i` holds staged (none when it does not answer).
async fn staged(cluster: &Cluster, i: usize) -> Option<(f64, f64, f64)> {
    let page = scrape_metrics(&cluster.ops_addr(i)).await?;
    let v = |name| mailvault_proto::client::metric_value(&page, name);
    Some((
        v("mailvault_staged_uploads"),
        v("mailvault_staged_chunks"),
        v("mailvault_staged_bytes"),
    ))
}

/// Waits until no node of the three holds anything staged.
async fn nothing_staged_within(cluster: &Cluster, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut left = Vec::new();
        for i in 0..3 {
            left.push(staged(cluster, i).await);
        }
        if left.iter().all(|s| *s == Some((0.0, 0.0, 0.0))) {
            return;
        }
        assert!(Instant::now() < deadline, "still staged: {left:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_staged_by_a_leader_killed_mid_upload_are_expired_on_every_node_after_the_idle_time() {
    let mut cluster = Cluster::start(ClusterOptions {
        limits: format!("staged_expiry_secs = {}\n", EXPIRY.as_secs()),
        ..Default::default()
    })
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    create_tenant_and_mailbox(&cluster, leader, T, M).await;
    cluster.grant_cluster_role("auditor", "auditor").await;
    let follower = (leader + 1) % 3;
    let mut c = cluster.mailbox(leader).await;
    let small = test_message("before", "a@example.com", "x", 2000);
    append(&mut c, T, M, "before", &small)
        .await
        .expect("a small append");

    // 20 MiB sent slowly (about 1 MiB, one chunk, a second) to the leader.
    let body = test_message("big", "b@example.com", "y", BIG);
    let frames = append_frames(T, M, "big", &body);
    let pace = Duration::from_secs(20) / frames.len() as u32;
    let slow = futures::stream::iter(frames).then(move |f| async move {
        tokio::time::sleep(pace).await;
        f
    });
    let mut uploader = c.clone();
    let upload = tokio::spawn(async move { uploader.append_message(slow).await });

    // Once a follower holds a few staged chunks, the leader dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before_kill = loop {
        if let Some(s) = staged(&cluster, follower).await {
            if s.0 == 1.0 && s.1 >= 3.0 {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no chunk staged on node {}",
            follower + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cluster.kill(leader);
    let killed = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("the upload ends")
        .unwrap();
    assert!(outcome.is_err(), "the upload cannot succeed: {outcome:?}");
    eprintln!(
        "staged on node {} when the leader was killed: {before_kill:?}",
        follower + 1
    );

    // The staged chunks are kept while the upload may still be idle for less
    // than the expiry (its last chunk came less than a second before the kill).
    let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.start_node(leader);
    tokio::time::sleep((EXPIRY / 2).saturating_sub(killed.elapsed())).await;
    let (uploads, chunks, bytes) = staged(&cluster, new_leader).await.expect("metrics");
    assert!(
        uploads == 1.0 && chunks >= before_kill.1 && bytes > chunks * 1024.0 * 1024.0 * 0.9,
        "expired early: {uploads} uploads, {chunks} chunks, {bytes} bytes staged"
    );

    // Then every node, the restarted one too, reclaims them.
    nothing_staged_within(&cluster, EXPIRY * 6).await;
    let reclaimed = killed.elapsed();
    eprintln!(
        "staged chunks reclaimed on every node {:.1} s after the kill (expiry {} s)",
        reclaimed.as_secs_f64(),
        EXPIRY.as_secs()
    );
    // Counted by the leader that expired them (leadership may have moved
    // back to the restarted node since): summed over the nodes.
    let mut expired = 0.0;
    for i in 0..3 {
        expired += scrape_metric(&cluster.ops_addr(i), "mailvault_staged_expired_chunks_total")
            .await
            .unwrap_or(0.0);
    }
    assert!(
        expired >= before_kill.1,
        "{expired} chunks expired, {before_kill:?} were staged"
    );
    let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.wait_same_digest(&[0, 1, 2]).await;
    let audit = cluster.audit_records(new_leader, "auditor").await;
    let expired: Vec<_> = audit.iter().filter(|r| r.action == "staged-expired").collect();
    assert_eq!(expired.len(), 1, "one audit record for the expired upload");
    assert!(
        expired[0].identity.starts_with("node:") && expired[0].target.starts_with("acme/"),
        "{:?}",
        expired[0]
    );

    // Sent again with the same idempotency key, the message is stored
    // whole. An attempt cut short meanwhile (node 1, back, takes its
    // leadership back) leaves chunks that expire the same way: in the end
    // nothing stays staged.
    let mut c = cluster.mailbox(new_leader).await;
    let r = retry(Duration::from_secs(60), || {
        let mut c = c.clone();
        let body = body.clone();
        async move { append(&mut c, T, M, "big", &body).await }
    })
    .await
    .expect("the upload sent again");
    assert!(!r.duplicate);
    let (_, raw) = fetch(&mut c, T, M, r.uid).await.expect("fetch");
    assert!(raw == body, "the message read back differs from the one sent");
    let page = list_all(&mut c, T, M).await.unwrap();
    assert_eq!(page.len(), 2, "the small message and the big one");
    nothing_staged_within(&cluster, EXPIRY * 6).await;
    let (_, raw) = fetch(&mut c, T, M, r.uid).await.expect("fetch after the expiry");
    assert!(raw == body, "the committed message lost chunks to the expiry");
}
