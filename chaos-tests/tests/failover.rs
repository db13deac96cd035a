//! Killing the leader with SIGKILL during concurrent appends loses no
//! acknowledged append, and retries with the same idempotency key create no
//! duplicates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailvault_chaos::*;

const T: &str = "acme";
const M: &str = "orders";
const WRITERS: usize = 8;
const PER_WRITER: usize = 25;

fn body_for(key: &str) -> Vec<u8> {
    test_message(key, "buyer@customer.example", &format!("BODY {key}"), 3000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_leader_kill_and_retries_create_no_duplicates() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let old_leader = cluster.wait_for_leader(Duration::from_secs(10)).await;

    let clients: Vec<_> = futures_clients(&cluster).await;
    let acked: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let clients = clients.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts_with_error = 0;
            for n in 0..PER_WRITER {
                let key = format!("w{w}-m{n}");
                let body = body_for(&key);
                let mut target = w;
                // Retry the same key against the nodes in turn until it is acknowledged.
                loop {
                    assert!(Instant::now() < deadline, "append {key} never acknowledged");
                    let mut c = clients[target % clients.len()].clone();
                    match append(&mut c, T, M, &key, &body).await {
                        Ok(r) => {
                            acked.lock().unwrap().insert(key.clone(), r.uid);
                            break;
                        }
                        Err(s) => {
                            assert!(transient(&s), "non-transient error for {key}: {s:?}");
                            attempts_with_error += 1;
                            target += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            attempts_with_error
        }));
    }
    // Kill the leader once a part of the load is acknowledged.
    while acked.lock().unwrap().len() < WRITERS * PER_WRITER / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked_before_kill = acked.lock().unwrap().len();
    cluster.kill(old_leader);
    let mut retried = 0;
    for t in tasks {
        retried += t.await.unwrap();
    }
    let new_leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    assert_ne!(new_leader, old_leader);
    cluster.start_node(old_leader);

    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), WRITERS * PER_WRITER);
    eprintln!("acked before kill: {acked_before_kill}; failed attempts retried: {retried}");

    // Every node, including the restarted old leader, holds every acknowledged
    // append exactly once, with the bytes that were written.
    for i in 0..cluster.len() {
        let c = cluster.mailbox(i).await;
        let listed = exactly_once_each(&c, &acked, &format!("node {i}")).await;
        assert_eq!(listed.len(), acked.len(), "node {i} holds unacknowledged extras");
        for (key, uid) in acked.iter().take(10) {
            // Leadership may move back to the restarted active node meanwhile:
            // reads then fail UNAVAILABLE for a moment, and are retried.
            let (_, bytes) = retry(Duration::from_secs(20), || {
                let mut c = c.clone();
                async move { fetch(&mut c, T, M, *uid).await }
            })
            .await
            .unwrap();
            assert_eq!(bytes, body_for(key));
        }
        let uids: Vec<u32> = listed.iter().map(|m| m.uid).collect();
        assert!(
            uids.windows(2).all(|w| w[0] < w[1]),
            "UIDs must strictly increase"
        );
    }
}

/// Lists the mailbox through `c` once it holds as many messages as were
/// acknowledged, and checks that each acknowledged key is there exactly once,
/// with its UID; returns the listing.
async fn exactly_once_each(
    c: &mailvault_proto::v1::mailbox_client::MailboxClient<tonic::transport::Channel>,
    acked: &HashMap<String, u32>,
    on: &str,
) -> Vec<mailvault_proto::v1::MessageSummary> {
    let want = acked.len();
    let listed = retry(Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            let l = list_all(&mut c, T, M).await?;
            if l.len() < want {
                return Err(tonic::Status::unavailable("catching up"));
            }
            Ok(l)
        }
    })
    .await
    .unwrap();
    let mut by_subject: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for m in &listed {
        by_subject.entry(m.subject.as_str()).or_default().push(m.uid);
    }
    for (key, uid) in acked {
        assert_eq!(
            by_subject.get(key.as_str()),
            Some(&vec![*uid]),
            "{on}: {key} not present exactly once"
        );
    }
    listed
}

async fn futures_clients(
    cluster: &Cluster,
) -> Vec<mailvault_proto::v1::mailbox_client::MailboxClient<tonic::transport::Channel>> {
    let mut v = Vec::new();
    for i in 0..cluster.len() {
        v.push(cluster.mailbox(i).await);
    }
    v
}

/// What a writer saw fail: the round, the code and the `ErrorInfo` reason.
type Failure = (usize, tonic::Code, Option<String>);

/// Appends through followers only (so every append is forwarded to the
/// leader, and a large one streamed through), killing the leader with SIGKILL
/// twenty times: no caller ever sees `UNKNOWN`; every failure is `UNAVAILABLE`
/// with a mailvault reason, and retrying with the same idempotency key lands
/// each message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leader_kills_under_forwarded_appends_never_answer_unknown() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use tonic_types::StatusExt;

    const KILLS: usize = 20;
    const FORWARDERS: usize = 4;
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let clients = futures_clients(&cluster).await;
    let targets: Arc<Mutex<Vec<usize>>> = Arc::default();
    let round = Arc::new(AtomicUsize::new(0));
    let seen_round: Arc<Vec<AtomicUsize>> = Arc::new((0..FORWARDERS).map(|_| AtomicUsize::new(0)).collect());
    let acked: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let failures: Arc<Mutex<Vec<Failure>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(600);
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    *targets.lock().unwrap() = (0..cluster.len()).filter(|&i| i != leader).collect();

    let mut tasks = Vec::new();
    for w in 0..FORWARDERS {
        let (clients, targets, round, seen_round) = (
            clients.clone(),
            targets.clone(),
            round.clone(),
            seen_round.clone(),
        );
        let (acked, failures, stop) = (acked.clone(), failures.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(SeqCst) {
                let key = format!("f{w}-m{n}");
                // Every eighth message is larger than a chunk: staged through the forward.
                let size = if n % 8 == 7 { 2_300_000 } else { 2_000 };
                let body = test_message(&key, "buyer@customer.example", &format!("BODY {key}"), size);
                let mut attempt = w;
                loop {
                    assert!(Instant::now() < deadline, "append {key} never acknowledged");
                    let r = round.load(SeqCst);
                    let target = {
                        let t = targets.lock().unwrap();
                        t[attempt % t.len()]
                    };
                    let mut c = clients[target].clone();
                    let outcome = append(&mut c, T, M, &key, &body).await;
                    seen_round[w].store(r, SeqCst);
                    match outcome {
                        Ok(resp) => {
                            acked.lock().unwrap().insert(key.clone(), resp.uid);
                            break;
                        }
                        Err(s) => {
                            let reason = s
                                .get_details_error_info()
                                .filter(|i| i.domain == "mailvault")
                                .map(|i| i.reason);
                            failures.lock().unwrap().push((r, s.code(), reason));
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                n += 1;
            }
        }));
    }
    let acked_now = |acked: &Arc<Mutex<HashMap<String, u32>>>| acked.lock().unwrap().len();
    let wait_acked = |more: usize, what: String| {
        let acked = acked.clone();
        async move {
            let want = acked.lock().unwrap().len() + more;
            while acked.lock().unwrap().len() < want {
                assert!(Instant::now() < deadline, "appends stopped: {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for kill in 1..=KILLS {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        *targets.lock().unwrap() = (0..cluster.len()).filter(|&i| i != leader).collect();
        round.store(kill, SeqCst);
        // Every writer has finished a call begun after the switch, so nothing
        // still in flight goes to the node about to be killed directly.
        while seen_round.iter().any(|s| s.load(SeqCst) < kill) {
            assert!(Instant::now() < deadline, "a writer is stuck before kill {kill}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_acked(2 * FORWARDERS, format!("before kill {kill}")).await;
        cluster.kill(leader);
        wait_acked(FORWARDERS, format!("after kill {kill}")).await;
        cluster.start_node(leader);
    }
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (_, code, reason) in &failures {
        *tally.entry(format!("{code:?} {reason:?}")).or_default() += 1;
    }
    eprintln!(
        "{KILLS} leader kills, {} appends acknowledged, failed attempts: {tally:?}",
        acked_now(&acked)
    );
    for (r, code, reason) in &failures {
        assert_ne!(*code, tonic::Code::Unknown, "UNKNOWN in round {r}: {tally:?}");
        assert_eq!(*code, tonic::Code::Unavailable, "round {r}: {code:?} {reason:?}");
        assert!(
            reason.is_some(),
            "round {r}: UNAVAILABLE without a reason: {tally:?}"
        );
    }
    assert!(
        !failures.is_empty(),
        "the kills made no append fail: the test tests nothing"
    );

    // Each acknowledged message exactly once, retried ones included.
    let acked = acked.lock().unwrap().clone();
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let c = cluster.mailbox(0).await;
    let listed = exactly_once_each(&c, &acked, "the cluster").await;
    assert_eq!(listed.len(), acked.len(), "unacknowledged extras");
}
