//! Corruption of a stopped node's data: a flipped bit in a stored ciphertext,
//! a stored record copied over another's place, and a flipped bit in an SST
//! file and in the write-ahead log. Damaged data is detected and
//! never served: every read returns the exact bytes written or an error, the
//! other replicas keep serving everything, and acknowledged mail is not lost.

use std::path::Path;
use std::time::Duration;

use mailvault_chaos::scenario::seed_from_env;
use mailvault_chaos::*;
use mailvault_node::crypto::{MasterKey, RecordBinding, TAG_BYTES};
use mailvault_node::store::{open_state_dir, CF_SM};
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
    let db = open_state_dir(data_dir).unwrap();
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
    // The Raft log's database and the state's live generation (its own
    // database since data version 4).
    let state = std::fs::read_to_string(data_dir.join("state/CURRENT")).unwrap();
    let mut paths: Vec<_> = [data_dir.join("db"), data_dir.join("state").join(state.trim())]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
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
    let mut rng = rng("ciphertext");
    cluster.stop(2);
    flip_a_ciphertext_bit(&cluster.data_dir(2), &mut rng);
    cluster.start_node(2);
    // The damaged node never serves the damaged bytes: it reads that message
    // from a healthy replica (the stream continues where its copy failed),
    // so every read through it is exact, and it reports the damage.
    assert_eq!(read_all_from(&cluster, 2, &uids).await, (uids.len(), 0));
    assert_eq!(damaged_on(&cluster, 2).await.len(), 1, "the damage is reported");
    // The healthy replicas serve everything and found nothing.
    assert_eq!(read_all_from(&cluster, 0, &uids).await, (uids.len(), 0));
    assert!(damaged_on(&cluster, 0).await.is_empty());
    // Damaged on every replica: then, and only then, DATA_LOSS.
    let damaged = damaged_on(&cluster, 2).await[0].clone();
    for i in 0..cluster.len() {
        cluster.stop(i);
    }
    for i in [0, 1] {
        damage_message(&cluster, i, damaged.uid, Damage::Chunk(0));
    }
    for i in 0..cluster.len() {
        cluster.start_node(i);
    }
    let c = cluster.mailbox(2).await;
    let e = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            match fetch(&mut c, T, M, damaged.uid).await {
                Ok(_) => panic!("a message damaged on every replica was served"),
                Err(e) if e.code() == Code::DataLoss => Ok(e),
                Err(e) => Err(e),
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !e.message().contains("BODY"),
        "an error message carries mail content"
    );
}

/// What to damage of a stored message.
enum Damage {
    /// One bit of its encrypted headers (in its record).
    Headers,
    /// One bit of the ciphertext of this chunk of its body.
    Chunk(u32),
}

/// The binding of the cluster's stored records (from its master key: the
/// headers' own authentication is tested by an edit that keeps the record
/// bound, as only someone holding the master key could make it).
fn binding(cluster: &Cluster) -> RecordBinding {
    RecordBinding::new(&MasterKey::load(&cluster.dir().join("master.key")).unwrap())
}

/// Flips one bit of a stored message of the stopped node with this data
/// directory, in its headers or in one chunk of its body.
fn damage_message(cluster: &Cluster, node: usize, uid: u32, what: Damage) {
    use mailvault_node::state::codec::{decode, encode};
    use mailvault_node::state::keys;
    use mailvault_node::state::records::MessageRecord;
    let db = open_state_dir(&cluster.data_dir(node)).unwrap();
    let cf = db.cf_handle(CF_SM).unwrap();
    let key = keys::message(T, M, uid);
    let stored = db.get_cf(cf, &key).unwrap().expect("the message is stored");
    let mut record: MessageRecord = decode(&stored[..stored.len() - TAG_BYTES]).unwrap();
    match what {
        Damage::Headers => {
            let at = record.headers.len() / 2;
            record.headers[at] ^= 0x10;
            db.put_cf(cf, &key, binding(cluster).bind(&key, encode(&record)))
                .unwrap();
        }
        Damage::Chunk(i) => {
            let key = keys::chunk(T, &record.blob, i);
            let mut ct = db.get_cf(cf, &key).unwrap().expect("the chunk is stored");
            let at = ct.len() / 2;
            ct[at] ^= 0x10;
            db.put_cf(cf, &key, ct).unwrap();
        }
    }
    db.flush_wal(true).unwrap();
}

/// The damaged messages node `i` reports in its status.
async fn damaged_on(cluster: &Cluster, i: usize) -> Vec<mailvault_proto::v1::DamagedMessage> {
    let c = cluster.admin(i).await.cluster;
    retry(Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            c.node_status(mailvault_proto::v1::NodeStatusRequest {})
                .await
                .map(|r| r.into_inner().damaged)
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_with_one_damaged_message_returns_the_rest_and_the_damaged_one_is_read_from_a_replica() {
    let (mut cluster, mut uids) = setup(8).await;
    // And one larger than two chunks, whose middle chunk will be damaged.
    let big = test_message("big", "buyer@customer.example", "BODY big", 2_300_000);
    let c = cluster.mailbox(0).await;
    let r = retry(Duration::from_secs(20), || {
        let mut c = c.clone();
        let big = big.clone();
        async move { append(&mut c, T, M, "big", &big).await }
    })
    .await
    .unwrap();
    uids.push(r.uid);
    cluster.grant("reader", T, "reader").await;
    cluster.grant("exporter", T, "exporter").await;
    cluster.approve_export("exporter", T, M).await;
    cluster.wait_all_applied().await;
    let (headers_uid, body_uid) = (uids[3], r.uid);
    cluster.stop(2);
    damage_message(&cluster, 2, headers_uid, Damage::Headers);
    damage_message(&cluster, 2, body_uid, Damage::Chunk(1));
    cluster.start_node(2);

    // The listing on the damaged node is whole, the damaged one marked.
    let c = cluster.mailbox(2).await;
    let listed = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { list_all(&mut c, T, M).await }
    })
    .await
    .unwrap();
    assert_eq!(listed.len(), uids.len(), "{listed:?}");
    for m in &listed {
        let damaged = m.uid == headers_uid;
        assert_eq!(m.damaged, damaged, "uid {}", m.uid);
        assert_eq!(m.subject.is_empty(), damaged, "uid {}: {m:?}", m.uid);
        assert!(m.size > 0 && m.modseq > 0);
    }
    // Both damaged messages read through the damaged node are exact: from a
    // healthy replica, the big one continuing after its healthy first chunk.
    let mut c = cluster.mailbox(2).await;
    let (meta, bytes) = fetch(&mut c, T, M, headers_uid).await.unwrap();
    assert_eq!((meta.subject.as_str(), bytes), ("m3", body(3)));
    let (meta, bytes) = fetch(&mut c, T, M, body_uid).await.unwrap();
    assert_eq!(meta.subject, "big");
    assert!(
        bytes == big,
        "the big message came back different ({} bytes)",
        bytes.len()
    );
    // A reader (addresses masked) gets the masked copy of a replica.
    let mut reader = cluster.mailbox_as(2, "reader").await;
    let (_, masked) = fetch(&mut reader, T, M, body_uid).await.unwrap();
    assert!(!masked.windows(22).any(|w| w == b"buyer@customer.example"));
    assert!(masked.windows(21).any(|w| w == b"b***@customer.example"));
    assert!(
        masked.ends_with(&big[big.len() - 1000..]),
        "the masked copy is whole"
    );

    // An export through the damaged node is whole: the damaged ones from a replica.
    let mut ex = cluster.mailbox_as(2, "exporter").await;
    let mut stream = ex
        .export_mailbox(mailvault_proto::v1::ExportMailboxRequest {
            tenant: T.into(),
            mailbox: M.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut exported = Vec::new();
    while let Some(item) = tokio_stream::StreamExt::next(&mut stream).await {
        let item = item.unwrap();
        exported.push((item.metadata.unwrap().uid, item.raw));
    }
    assert_eq!(exported.len(), uids.len());
    for (uid, raw) in &exported {
        match *uid {
            u if u == body_uid => assert!(*raw == big, "the big message exported different"),
            u => {
                let n = uids.iter().position(|x| *x == u).unwrap();
                assert_eq!(*raw, body(n), "uid {u}");
            }
        }
    }

    // The node reports both, by id, in status, /metrics and the audit log.
    let mut found: Vec<(u32, String)> = damaged_on(&cluster, 2)
        .await
        .into_iter()
        .map(|d| {
            assert_eq!((d.tenant.as_str(), d.mailbox.as_str()), (T, M));
            (d.uid, d.part)
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            (headers_uid, "headers".to_string()),
            (body_uid, "body".to_string())
        ]
    );
    assert_eq!(
        scrape_metric(&cluster.ops_addr(2), "mailvault_damaged_messages").await,
        Some(2.0)
    );
    assert!(damaged_on(&cluster, 0).await.is_empty());
    cluster.grant_cluster_role("auditor", "auditor").await;
    let audit = cluster.admin_as(0, "auditor").await.audit;
    let records = retry(Duration::from_secs(20), || {
        let mut a = audit.clone();
        async move {
            let r = a
                .list_audit(mailvault_proto::v1::ListAuditRequest {
                    from_seq: 1,
                    limit: 10_000,
                })
                .await?
                .into_inner()
                .records;
            let found: Vec<_> = r.into_iter().filter(|r| r.action == "damage-found").collect();
            match found.len() {
                2 => Ok(found),
                _ => Err(tonic::Status::unavailable("not yet audited")),
            }
        }
    })
    .await
    .unwrap();
    for r in &records {
        assert_eq!((r.node, r.identity.as_str()), (3, "node:3"), "{r:?}");
        assert!(r.target.starts_with("acme/inbox/"), "{r:?}");
    }
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

/// Copies the stored value at `from` over the one at `to` in the stopped
/// node's store, as someone with a copy of the data directory could.
fn copy_record(cluster: &Cluster, node: usize, from: &[u8], to: &[u8]) {
    let db = open_state_dir(&cluster.data_dir(node)).unwrap();
    let cf = db.cf_handle(CF_SM).unwrap();
    let value = db
        .get_cf(cf, from)
        .unwrap()
        .expect("the record to copy is stored");
    assert!(
        db.get_cf(cf, to).unwrap().is_some(),
        "the record to replace is stored"
    );
    db.put_cf(cf, to, value).unwrap();
    db.flush_wal(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_record_copied_over_another_is_refused_there_and_the_original_served() {
    use mailvault_node::state::keys;
    use mailvault_proto::v1::{GetMailboxStatusRequest, WatchMailboxRequest};
    const OTHER: &str = "other";
    let (mut cluster, uids) = setup(4).await;
    create_mailbox(&cluster, 0, T, OTHER).await.unwrap();
    cluster.wait_all_applied().await;
    cluster.stop(2);
    // A message's record over the next one's, a mailbox's over another's,
    // a change record over the next one's.
    copy_record(
        &cluster,
        2,
        &keys::message(T, M, uids[0]),
        &keys::message(T, M, uids[1]),
    );
    copy_record(&cluster, 2, &keys::mailbox(T, M), &keys::mailbox(T, OTHER));
    copy_record(&cluster, 2, &keys::change(T, M, 1), &keys::change(T, M, 2));
    cluster.start_node(2);

    // The copied message record is not served as the message at its new
    // place: the tampered node lists that UID once, marked damaged, and a
    // read of it returns the original, from a healthy replica.
    let c = cluster.mailbox(2).await;
    let listed = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { list_all(&mut c, T, M).await }
    })
    .await
    .unwrap();
    assert_eq!(
        listed.iter().map(|m| m.uid).collect::<Vec<_>>(),
        uids,
        "{listed:?}"
    );
    for m in &listed {
        assert_eq!(m.damaged, m.uid == uids[1], "uid {}: {m:?}", m.uid);
    }
    let mut c = cluster.mailbox(2).await;
    let (meta, bytes) = fetch(&mut c, T, M, uids[1]).await.unwrap();
    assert_eq!((meta.uid, meta.subject.as_str()), (uids[1], "m1"));
    assert_eq!(bytes, body(1), "the original bytes of that UID");
    let found: Vec<_> = damaged_on(&cluster, 2)
        .await
        .into_iter()
        .map(|d| (d.uid, d.part))
        .collect();
    assert_eq!(found, vec![(uids[1], "record".to_string())]);

    // The copied mailbox record and change record are refused on the
    // tampered node with DATA_LOSS; the other nodes serve the originals.
    let status = |i: usize| {
        let cluster = &cluster;
        async move {
            let mut c = cluster.mailbox(i).await;
            c.get_mailbox_status(GetMailboxStatusRequest {
                tenant: T.into(),
                mailbox: OTHER.into(),
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    let e = status(2).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("failed its check"), "{e:?}");
    let healthy = status(0).await.unwrap();
    assert_eq!((healthy.mailbox.as_str(), healthy.messages), (OTHER, 0));
    let first_change = |i: usize| {
        let cluster = &cluster;
        async move {
            let mut c = cluster.mailbox(i).await;
            let mut s = c
                .watch_mailbox(WatchMailboxRequest {
                    tenant: T.into(),
                    mailbox: M.into(),
                    since_modseq: 0,
                })
                .await?
                .into_inner();
            tokio_stream::StreamExt::next(&mut s)
                .await
                .expect("a first change or an error")
        }
    };
    let e = first_change(2).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert_eq!(first_change(0).await.unwrap().modseq, 1);
    // Nothing acknowledged was lost: every message reads back exactly on
    // the healthy nodes and through the tampered one.
    for i in [0, 2] {
        assert_eq!(
            read_all_from(&cluster, i, &uids).await,
            (uids.len(), 0),
            "node {i}"
        );
    }
}
