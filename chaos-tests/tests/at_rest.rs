//! No plaintext mail on disk: after appends, a memtable flush, a snapshot and
//! a backup, no file under any node's data directory (snapshots and backups
//! included) holds a body marker, a subject, a customer address, an
//! idempotency key, a keyword or a claim agent.

use std::path::Path;
use std::time::Duration;

use mailvault_chaos::*;
use mailvault_proto::v1::{ClaimMessageRequest, UpdateFlagsRequest};
use tonic_types::StatusExt;

const T: &str = "tenant-canary-acme";
const M: &str = "inbox";

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_mail_in_any_data_directory() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    // An idempotency key as front ends make them (a Message-ID naming the
    // sender's domain), a keyword with an order number, a claim agent.
    const IDEM: &str = "<IDEM-MARKER-5531@sender-shop.example>";
    const KEYWORD: &str = "$Order-KEYWORD-MARKER-9021";
    const AGENT: &str = "AGENT-MARKER-olivia@desk.example";
    let secrets = [
        "BODY-MARKER-7f3a9c",
        "Refund for order 88412 subject",
        "jane.customer.4471@example.org",
        "IDEM-MARKER-5531",
        "sender-shop.example",
        "KEYWORD-MARKER-9021",
        "AGENT-MARKER-olivia",
    ];
    let mut c = cluster.mailbox(0).await;
    for n in 0..20 {
        let body = test_message(secrets[1], secrets[2], secrets[0], 500 + n * 300);
        retry(Duration::from_secs(10), || {
            let mut c = c.clone();
            let body = body.clone();
            async move { append(&mut c, T, M, &format!("{IDEM}-{n}"), &body).await }
        })
        .await
        .unwrap();
    }
    // A large one too, so staged chunks are covered; with a keyword given
    // at append time.
    let big = test_message(secrets[1], secrets[2], secrets[0], 3 * 1024 * 1024);
    let mut frames = append_frames(T, M, IDEM, &big);
    if let Some(mailvault_proto::v1::append_message_request::Frame::Header(h)) = &mut frames[0].frame {
        h.flags = vec![KEYWORD.into(), "\\Seen".into()];
    }
    c.append_message(tokio_stream::iter(frames)).await.unwrap();
    // A retry with the same key is recognised through its hashed form.
    let again = append(&mut c, T, M, IDEM, &big).await.unwrap();
    assert!(again.duplicate && again.uid == 21, "{again:?}");
    // A keyword and a claim set afterwards; the answers are in clear.
    let flags = c
        .update_flags(UpdateFlagsRequest {
            tenant: T.into(),
            mailbox: M.into(),
            uid: 1,
            add: vec![KEYWORD.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flags.flags, [KEYWORD]);
    let claim = ClaimMessageRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 1,
        agent: AGENT.into(),
    };
    let claimed = c.claim_message(claim.clone()).await.unwrap().into_inner();
    assert_eq!(claimed.claimed_by, AGENT);
    let other = c
        .claim_message(ClaimMessageRequest {
            agent: "someone-else".into(),
            ..claim
        })
        .await
        .unwrap_err();
    let info = other.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, "CLAIMED_BY_ANOTHER_AGENT");
    assert_eq!(info.metadata["claimed_by"], AGENT, "the holder is named in clear");
    snapshot_every_node(&cluster).await.unwrap();
    // A backup too (on the backup node, node 3, under its data directory):
    // its checkpoint, its keyring object and its manifest are scanned below.
    let backup = cluster
        .admin(0)
        .await
        .backups
        .take_backup(mailvault_proto::v1::TakeBackupRequest {})
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(backup.node, 3, "taken on the backup node");
    // The first backup is shipped off-site at once (to node 3's
    // `data_dir/offsite` by default) and drilled: wait for both, so that the
    // off-site copy is scanned too and no drill's scratch files come and go
    // during the scan.
    wait_drilled(
        &cluster,
        0,
        &backup.id,
        Duration::from_secs(60),
        "the backup shipped and drilled",
    )
    .await;
    assert!(cluster
        .data_dir(2)
        .join("offsite")
        .join(&backup.id)
        .join("manifest.json")
        .exists());
    let backup_dir = cluster.data_dir(2).join("backups").join(&backup.id);
    for f in ["manifest.json", "keyring.json", "data/CURRENT"] {
        assert!(backup_dir.join(f).exists(), "the backup has no {f}");
    }
    // The reads still work, so the data is really there, names in clear.
    let (meta, bytes) = fetch(&mut c, T, M, 21).await.unwrap();
    assert_eq!(bytes, big);
    assert_eq!(meta.flags, [KEYWORD, "\\Seen"]);
    let listed = list_all(&mut c, T, M).await.unwrap();
    assert_eq!(listed[0].flags, [KEYWORD]);
    assert_eq!(listed[0].claimed_by, AGENT);

    for i in 0..cluster.len() {
        let mut all = Vec::new();
        files(&cluster.data_dir(i), &mut all);
        assert!(
            all.iter().any(|p| p.to_string_lossy().ends_with(".sst")),
            "node {i}: no SST was flushed"
        );
        // A snapshot is a checkpoint directory (hard links to the state's files).
        let snapshots = cluster.data_dir(i).join("snapshots");
        assert!(
            all.iter()
                .any(|p| p.starts_with(&snapshots) && p.ends_with("CURRENT")),
            "node {i}: no snapshot on disk"
        );
        let mut saw_tenant = false;
        for p in &all {
            let data = std::fs::read(p).unwrap();
            // Positive control: names are stored in clear in keys, so the scan can see plaintext.
            saw_tenant |= contains(&data, T.as_bytes());
            for s in secrets {
                assert!(
                    !contains(&data, s.as_bytes()),
                    "node {i}: plaintext found in {}",
                    p.display()
                );
            }
        }
        assert!(
            saw_tenant,
            "node {i}: the scan found not even the tenant name; it cannot see plaintext"
        );
        let log = std::fs::read(cluster.dir().join(format!("node{}/node.log", i + 1))).unwrap();
        for s in secrets {
            assert!(
                !contains(&log, s.as_bytes()),
                "node {i}: mail content in the node's log"
            );
        }
    }
}
