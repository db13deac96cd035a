//! Leadership placement against real nodes: after the active node was
//! killed and restarted, leadership returns to it — with three voters and
//! with five (where openraft 0.9's followers refuse votes during the leader
//! lease unless the leader goes silent first) — within 30 s, by one
//! election, under a write load that loses nothing acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailvault_chaos::*;

const T: &str = "acme";
const M: &str = "support";

/// (term, leader id) as node `i` reports them; none when it does not answer.
async fn term_and_leader(cluster: &Cluster, i: usize) -> Option<(u64, u64)> {
    let mut a = cluster.admin(i).await.cluster;
    let s = a
        .node_status(mailvault_proto::v1::NodeStatusRequest {})
        .await
        .ok()?
        .into_inner();
    s.has_leader.then_some((s.term, s.leader_id))
}

/// Waits until the nodes that answer — a majority at least — all name one
/// leader in one term, a leader `wanted` accepts: (term, leader).
async fn leads(
    cluster: &Cluster,
    wanted: impl Fn(u64) -> bool,
    nodes: usize,
    timeout: Duration,
) -> (u64, u64) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for i in 0..nodes {
            seen.push(term_and_leader(cluster, i).await);
        }
        let answers: Vec<(u64, u64)> = seen.iter().flatten().copied().collect();
        if let Some(&(term, leader)) = answers.first() {
            if wanted(leader) && answers.len() > nodes / 2 && answers.iter().all(|a| *a == (term, leader)) {
                return (term, leader);
            }
        }
        assert!(Instant::now() < deadline, "not the leader wanted: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn leadership_returns_to_the_active_node(nodes: usize) {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes,
        ..Default::default()
    })
    .await;
    leads(&cluster, |l| l == 1, nodes, Duration::from_secs(60)).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;

    // A write load through node 2 (forwarded to whichever node leads),
    // bounded in count and time.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let c = cluster.mailbox(1).await;
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(180);
            for k in 0..3000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > until {
                    break;
                }
                let key = format!("w{k}");
                let body = test_message(&key, "a@example.com", "x", 1500);
                let mut c = c.clone();
                if let Ok(r) = append(&mut c, T, M, &key, &body).await {
                    acked.lock().unwrap().push((key, r.uid));
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };

    cluster.kill(0);
    let (before, interim) = leads(&cluster, |l| l != 1, nodes, Duration::from_secs(60)).await;
    cluster.start_node(0);
    let restarted = Instant::now();
    let (after, _) = leads(&cluster, |l| l == 1, nodes, Duration::from_secs(60)).await;
    let took = restarted.elapsed();
    let handovers = scrape_metric(
        &cluster.ops_addr(interim as usize - 1),
        "mailvault_leader_handovers_total",
    )
    .await
    .unwrap_or(0.0);
    eprintln!(
        "{nodes} voters: node 1 leads again {:.1} s after its restart, term {before} -> {after}, {handovers} handover(s) asked by node {interim}",
        took.as_secs_f64()
    );
    assert!(
        took <= Duration::from_secs(30),
        "node 1 leads again only after {took:?}"
    );
    assert_eq!(after, before + 1, "one election, by node 1");

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the load wrote only {}", acked.len());
    let mut c = cluster.mailbox(0).await;
    let listed = list_all(&mut c, T, M).await.unwrap();
    let uids: std::collections::BTreeSet<u32> = listed.iter().map(|m| m.uid).collect();
    for (key, uid) in &acked {
        assert!(
            uids.contains(uid),
            "acknowledged append {key} (uid {uid}) is gone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_returns_to_the_restarted_active_node_of_three_voters_by_one_election() {
    leadership_returns_to_the_active_node(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_returns_to_the_restarted_active_node_of_five_voters_by_one_election() {
    leadership_returns_to_the_active_node(5).await;
}
