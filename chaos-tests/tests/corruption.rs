//! Corruption of a stopped node's data: a flipped bit in a stored ciphertext,
//! in an SST file and in the write-ahead log. Damaged data is detected and
//! never served: every read returns the exact bytes written or an error, the
//! other replicas keep serving everything, and acknowledged mail is not lost.

use std::path::Path;
use std::time::Duration;

use mailvault_chaos::scenario::seed_from_env;
use mailvault_chaos::*;
use mailvault_node::store::{open_db, CF_SM};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

const T: &str = "acme";
const M: &str = "inbox";

fn body(n: usize) -> Vec<u8> {
    test_message(
        &format!("m{n}"),
        "buyer@customer.example",
        &format!("BODY {n}"),
        5000,
    )
}

async fn setup(messages: usize) -> (Cluster, Vec<u32>) {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let c = cluster.mailbox(0).await;
    let mut uids = Vec::new();
    for n in 0..messages {
        let r = retry(Duration::from_secs(20), || {
            let mut c = c.clone();
            async move { append(&mut c, T, M, &format!("m{n}"), &body(n)).await }
        })
        .await
        .unwrap();
        uids.push(r.uid);
    }
    (cluster, uids)
}

/// Waits until node `i` answers reads, then reads every message from it:
/// returns how many came back exact and how many failed; wrong bytes panic.
async fn read_all_from(cluster: &Cluster, i: usize, uids: &[u32]) -> (usize, usize) {
    let c = cluster.mailbox(i).await;
    retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { list_all(&mut c, T, M).await }
    })
    .await
    .unwrap();
    let (mut exact, mut failed) = (0, 0);
    for (n, uid) in uids.iter().enumerate() {
        let got = retry(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move { fetch(&mut c, T, M, *uid).await }
        })
        .await;
        match got {
            Ok((_, bytes)) => {
                assert_eq!(bytes, body(n), "node {i} served wrong bytes for uid {uid}");
                exact += 1;
            }
            Err(e) => {
                assert!(
                    !e.message().contains("BODY"),
                    "an error message carries mail content"
                );
                failed += 1;
            }
        }
    }
    (exact, failed)
}

/// Waits until node 0 accepts a new message.
async fn accepts_mail(cluster: &Cluster) {
    let c = cluster.mailbox(0).await;
    retry(Duration::from_secs(20), || {
        let mut c = c.clone();
        async move { append(&mut c, T, M, "after", b"Subject: after\r\n\r\nafter").await }
    })
    .await
    .unwrap();
}

/// The test's random source, from a printed seed (`MAILVAULT_CHAOS_SEED`
/// replays one).
fn rng(test: &str) -> SmallRng {
    let seed = seed_from_env();
    eprintln!("corruption test {test} seed {seed}");
    SmallRng::seed_from_u64(seed)
}

/// Flips one random bit in the ciphertext of one random stored chunk of the
/// stopped node with this data directory.
fn flip_a_ciphertext_bit(data_dir: &Path, rng: &mut SmallRng) {
    let db = open_db(&data_dir.join("db")).unwrap();
    let cf = db.cf_handle(CF_SM).unwrap();
    let prefix = [mailvault_node::state::keys::CHUNK];
    let chunks: Vec<(Vec<u8>, Vec<u8>)> = db
        .prefix_iterator_cf(cf, prefix)
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .take_while(|(k, _)| k[0] == mailvault_node::state::keys::CHUNK)
        .collect();
    assert!(!chunks.is_empty(), "no stored chunk");
    let (key, mut value) = chunks[rng.random_range(0..chunks.len())].clone();
    // In the second half: the ciphertext and its tag, past any header.
    let at = rng.random_range(value.len() / 2..value.len());
    let bit = rng.random_range(0..8);
    eprintln!("flipping bit {bit} of byte {at} of a {}-byte chunk", value.len());
    value[at] ^= 1 << bit;
    db.put_cf(cf, &key, &value).unwrap();
    db.flush_wal(true).unwrap();
}

/// Flips one random byte (with a random non-zero mask) in the second half of
/// every file of the node whose name ends in `ext`.
fn flip_bytes_in_files(data_dir: &Path, ext: &str, rng: &mut SmallRng) -> usize {
    let mut n = 0;
    let mut paths: Vec<_> = std::fs::read_dir(data_dir.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    paths.sort();
    for p in paths {
        let mut bytes = std::fs::read(&p).unwrap();
        if bytes.len() < 64 {
            continue;
        }
        let at = rng.random_range(bytes.len() / 2..bytes.len());
        bytes[at] ^= rng.random_range(1..=255u8);
        std::fs::write(&p, bytes).unwrap();
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_ciphertext_is_refused_not_served() {
    let (mut cluster, uids) = setup(20).await;
    cluster.stop(2);
    flip_a_ciphertext_bit(&cluster.data_dir(2), &mut rng("ciphertext"));
    cluster.start_node(2);
    let (exact, failed) = read_all_from(&cluster, 2, &uids).await;
    assert_eq!(failed, 1, "exactly the damaged message fails on the damaged node");
    assert_eq!(exact, uids.len() - 1);
    // The healthy replicas serve everything.
    assert_eq!(read_all_from(&cluster, 0, &uids).await, (uids.len(), 0));
    // And the damaged one says why: DATA_LOSS.
    let mut c = cluster.mailbox(2).await;
    let mut data_loss = false;
    for uid in &uids {
        if let Err(e) = fetch(&mut c, T, M, *uid).await {
            data_loss |= e.code() == Code::DataLoss;
        }
    }
    assert!(data_loss, "a failed authentication is reported as DATA_LOSS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_sst_blob_and_wal_files_never_serve_wrong_bytes() {
    let (mut cluster, uids) = setup(20).await;
    // Move the data into SST files first (a snapshot flushes the memtables).
    let mut a = cluster.admin(2).await;
    a.cluster
        .trigger_snapshot(mailvault_proto::v1::TriggerSnapshotRequest { purge_log: false })
        .await
        .unwrap();
    cluster.stop(2);
    let mut rng = rng("sst-and-wal");
    let ssts = flip_bytes_in_files(&cluster.data_dir(2), "sst", &mut rng);
    let wals = flip_bytes_in_files(&cluster.data_dir(2), "log", &mut rng);
    // Messages this large live in blob files, out of the SSTs.
    let blobs = flip_bytes_in_files(&cluster.data_dir(2), "blob", &mut rng);
    assert!(ssts > 0, "no SST file to corrupt");
    assert!(blobs > 0, "no blob file to corrupt");
    eprintln!("corrupted {ssts} SST, {blobs} blob and {wals} WAL files");
    cluster.start_node(2);
    // The damaged node may refuse to start or fail reads; it must never serve
    // wrong bytes. Give it a moment, then read whatever it serves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if cluster.is_running(2) {
        let c = cluster.mailbox(2).await;
        for (n, uid) in uids.iter().enumerate() {
            let mut c = c.clone();
            if let Ok((_, bytes)) = fetch(&mut c, T, M, *uid).await {
                assert_eq!(bytes, body(n), "the damaged node served wrong bytes");
            }
        }
    } else {
        eprintln!("the damaged node refused to start: {:?}", cluster.exited(2));
    }
    // The healthy majority keeps serving and accepting mail.
    assert_eq!(read_all_from(&cluster, 0, &uids).await, (uids.len(), 0));
    accepts_mail(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_corrupted_wal_refuses_to_start_rather_than_forget() {
    // The acknowledged entries are only in the WAL (no flush; killed, since a
    // clean stop flushes): a node that replayed it up to the damage and
    // dropped the rest would have forgotten entries it acknowledged, which
    // made the leader's openraft panic.
    let (mut cluster, uids) = setup(20).await;
    cluster.kill(2);
    let wals = flip_bytes_in_files(&cluster.data_dir(2), "log", &mut rng("wal"));
    assert!(wals > 0, "no WAL file to corrupt");
    cluster.start_node(2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("damaged node running: {}", cluster.is_running(2));
    // The healthy nodes stay up and serve everything; the cluster still writes.
    assert_eq!(read_all_from(&cluster, 0, &uids).await, (uids.len(), 0));
    assert_eq!(read_all_from(&cluster, 1, &uids).await, (uids.len(), 0));
    accepts_mail(&cluster).await;
    assert!(
        cluster.is_running(0) && cluster.is_running(1),
        "a healthy node stopped"
    );
}
