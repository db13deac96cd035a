//! Restore, from the outside: `mailvault-admin backup restore` builds a new
//! 3-node cluster from a backup taken under a steady write load, and the new
//! cluster serves every message acknowledged before the backup was asked
//! for, byte-exact, with the same UIDs, MODSEQs, flags and claims; a copy
//! that is damaged, edited, missing an object or of another master key is
//! refused with nothing written; one mailbox expunged by mistake comes back
//! under a new name with `backup restore-mailbox`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailvault_chaos::code_and_reason as reason;
use mailvault_chaos::*;
use mailvault_proto::v1::*;

const T: &str = "acme";
const M: &str = "support";

/// An append the writer saw acknowledged.
#[derive(Debug, Clone)]
struct Acked {
    uid: u32,
    modseq: u64,
    body: Vec<u8>,
    /// Acknowledged before the backup was asked for.
    before: bool,
}

fn body(n: usize) -> Vec<u8> {
    // Every 25th message spans three chunks (1 MiB each).
    let size = if n.is_multiple_of(25) {
        (2 << 20) + 12_345
    } else {
        1500 + n * 37
    };
    test_message(
        &format!("Restore subject {n}"),
        "cust@example.org",
        &format!("RESTORE-BODY-{n}"),
        size,
    )
}

async fn manifest(cluster: &Cluster, id: &str) -> mailvault_proto::v1::BackupManifest {
    let mut b = cluster.admin(0).await.backups;
    b.show_backup(ShowBackupRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .manifest
        .unwrap()
}

/// `mailvault-admin backup restore` as two operators run it, offline, for
/// the nodes of `c` whose `configs` are given: rehearsed and signed by
/// `admin`, signed by `admin2`, run (`Cluster::restore_offline`).
fn restore(c: &Cluster, from: &str, backup: &str, configs: &[PathBuf]) -> (bool, serde_json::Value, String) {
    c.restore_offline(from, backup, configs, ADMIN, ADMIN2)
}

fn configs(c: &Cluster) -> Vec<PathBuf> {
    c.config_files()
}

/// Nothing of a refused restore is left: no data directory, no half-written
/// one beside it, no scratch.
fn nothing_written(c: &Cluster) {
    for i in 0..c.len() {
        let dir = c.data_dir(i);
        let siblings: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("data"))
            .collect();
        assert!(siblings.is_empty(), "node {}: {siblings:?} written", i + 1);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        match e.path().is_dir() {
            true => copy_tree(&e.path(), &target),
            false => {
                std::fs::copy(e.path(), target).unwrap();
            }
        }
    }
}

async fn summaries(
    c: &mut mailvault_proto::v1::mailbox_client::MailboxClient<tonic::transport::Channel>,
    mailbox: &str,
) -> BTreeMap<u32, MessageSummary> {
    let all = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { list_all(&mut c, T, mailbox).await }
    })
    .await
    .unwrap();
    all.into_iter().map(|m| (m.uid, m)).collect()
}

/// A cluster that ships its backups to the directory `offsite`, with the
/// tenant and mailbox the tests write to.
async fn shipping_cluster(offsite: &Path) -> Cluster {
    let c = Cluster::start(ClusterOptions {
        backup: format!("offsite = \"file://{}\"\n", offsite.display()),
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&c, 0, T, M).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_new_cluster_byte_exact() {
    let offsite = tempfile::tempdir().unwrap();
    let old = shipping_cluster(offsite.path()).await;
    // The access policy is part of the state: the restored cluster has this grant.
    old.grant_cluster_role("auditor", "auditor").await;
    let mut c = old.mailbox(0).await;
    // Flags, keywords and a claim, set before the load.
    for n in 1..=4 {
        append(&mut c, T, M, &format!("pre-{n}"), &body(n + 1000))
            .await
            .unwrap();
    }
    c.update_flags(UpdateFlagsRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 2,
        add: vec!["\\Seen".into(), "$Escalated".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    c.claim_message(ClaimMessageRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 3,
        agent: "agent-7".into(),
    })
    .await
    .unwrap();

    // A steady writer, bounded in count and time.
    let asked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<String, Acked>>> = Arc::default();
    let writer = {
        let (asked, stop, acked, mut c) = (asked.clone(), stop.clone(), acked.clone(), c.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            for n in 0..400 {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                let key = format!("load-{n}");
                let b = body(n);
                if let Ok(r) = append(&mut c, T, M, &key, &b).await {
                    let before = !asked.load(Ordering::SeqCst);
                    acked.lock().unwrap().insert(
                        key,
                        Acked {
                            uid: r.uid,
                            modseq: r.modseq,
                            body: b,
                            before,
                        },
                    );
                }
            }
        })
    };
    while acked.lock().unwrap().len() < 40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    asked.store(true, Ordering::SeqCst);
    let backup = old.take_backup().await;
    // The load goes on a while after the backup.
    let after = acked.lock().unwrap().len() + 20;
    while acked.lock().unwrap().len() < after {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    // The first backup ships at once and is drilled.
    wait_drilled(
        &old,
        0,
        &backup.id,
        Duration::from_secs(180),
        "the backup shipped and drilled",
    )
    .await;
    let m = manifest(&old, &backup.id).await;
    let acked = acked.lock().unwrap().clone();
    let before = acked.values().filter(|a| a.before).count();
    assert!(
        before >= 40 && acked.len() > before,
        "{before} of {} acknowledged before",
        acked.len()
    );
    let mut oc = old.mailbox(0).await;
    let old_box = summaries(&mut oc, M).await;

    // The new cluster: same master key, its own addresses and certificates.
    let key = std::fs::read_to_string(old.master_key_file()).unwrap();
    let mut new = Cluster::start(ClusterOptions {
        master_key: key.trim().to_string(),
        start_nodes: false,
        ..Default::default()
    })
    .await;
    let from = format!("file://{}", offsite.path().display());
    let (ok, doc, err) = restore(&new, &from, &backup.id, &configs(&new));
    assert!(ok, "restore failed: {err}");
    assert_eq!(doc["backup"], backup.id.as_str());
    assert_eq!(doc["applied_index"], backup.applied_index);
    assert_eq!(doc["manifest_state_digest"], m.state_digest.as_str(), "{doc}");
    // Recomputed from the downloaded data, before the new membership was written.
    assert_eq!(doc["checks"]["state_digest"], m.state_digest.as_str(), "{doc}");
    assert_eq!(doc["nodes"].as_array().unwrap().len(), 3);
    for s in ["RESTORE-BODY", "cust@example.org", "Restore subject"] {
        assert!(
            !err.contains(s) && !doc.to_string().contains(s),
            "content in the restore's output"
        );
    }
    // A second restore into the written directories is refused.
    let (ok, _, err) = restore(&new, &from, &backup.id, &configs(&new));
    assert!(!ok && err.contains("is not empty"), "{err}");

    new.start_all().await;
    let mut nc = new.mailbox(0).await;
    let restored = summaries(&mut nc, M).await;
    // Every message acknowledged before the backup was asked for is there,
    // byte-exact, at its UID and MODSEQ.
    for (key, a) in &acked {
        let got = restored.get(&a.uid);
        if !a.before && got.is_none() {
            continue;
        }
        let got =
            got.unwrap_or_else(|| panic!("{key} (uid {}) acknowledged before the backup is missing", a.uid));
        assert_eq!(got.modseq, a.modseq, "{key}");
        let (_, bytes) = fetch(&mut nc, T, M, a.uid).await.unwrap();
        assert!(bytes == a.body, "{key}: the body differs");
    }
    // And every restored message is the old cluster's, summary for summary
    // (flags, keywords, claims, internal dates, sizes, headers).
    assert!(restored.len() >= before + 4);
    for (uid, s) in &restored {
        assert_eq!(Some(s), old_box.get(uid), "uid {uid}");
    }
    assert_eq!(restored[&2].flags, ["$Escalated", "\\Seen"]);
    assert_eq!(restored[&3].claimed_by, "agent-7");
    // The new cluster goes on from there: a new append gets the next UID
    // and a higher MODSEQ; its nodes agree.
    let top_uid = *restored.keys().max().unwrap();
    let top_modseq = restored.values().map(|s| s.modseq).max().unwrap();
    let r = retry(Duration::from_secs(20), || {
        let mut c = nc.clone();
        async move { append(&mut c, T, M, "after-restore", &body(7)).await }
    })
    .await
    .unwrap();
    assert_eq!(r.uid, top_uid + 1);
    assert!(r.modseq > top_modseq);
    new.wait_all_applied().await;
    let mut digests = Vec::new();
    for i in 0..3 {
        let mut a = new.admin(i).await.cluster;
        let d = a.state_digest(StateDigestRequest {}).await.unwrap().into_inner();
        digests.push((d.applied_index, d.sha256));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    // Its audit chain verifies and says where it came from; the old
    // cluster's backups are not its own.
    let mut audit = new.admin_as(0, "auditor").await.audit;
    let v = audit
        .verify_audit(VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    let records = audit
        .list_audit(ListAuditRequest {
            from_seq: 1,
            limit: 100_000,
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    // It names the two-person plan and both people.
    let plan = doc["plan"].as_str().expect("the plan's id");
    assert!(
        plan.starts_with("restore-") && doc["signed_by"] == serde_json::json!([ADMIN, ADMIN2]),
        "{doc}"
    );
    assert!(
        records.iter().any(|r| r.action == "backup-restore"
            && r.target == backup.id
            && r.identity == ADMIN
            && r.result.contains(&format!("two-person plan {plan}"))
            && r.result.contains("proposed by admin, approved by admin2")),
        "no audit record of the restore naming its plan and signers"
    );
    let l = list_backups(&new, 0).await;
    assert!(l.backups.iter().all(|b| b.id != backup.id), "{:?}", l.backups);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_edited_incomplete_or_foreign_copy_is_refused_with_nothing_written() {
    let offsite = tempfile::tempdir().unwrap();
    let old = shipping_cluster(offsite.path()).await;
    let mut c = old.mailbox(0).await;
    for n in 0..5 {
        append(&mut c, T, M, &format!("k{n}"), &body(n + 1))
            .await
            .unwrap();
    }
    let backup = old.take_backup().await;
    wait_backups(&old, 0, Duration::from_secs(180), "the backup shipped", |l| {
        l.backups.iter().any(|b| b.id == backup.id && b.shipped.is_some())
    })
    .await;
    let key = std::fs::read_to_string(old.master_key_file()).unwrap();
    let new = Cluster::start(ClusterOptions {
        master_key: key.trim().to_string(),
        start_nodes: false,
        ..Default::default()
    })
    .await;
    let copy = offsite.path().join(&backup.id);
    let refused = |store: &Path, want: &str| {
        let (ok, _, err) = restore(
            &new,
            &format!("file://{}", store.display()),
            &backup.id,
            &configs(&new),
        );
        assert!(!ok, "restored from a bad copy ({want})");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
        nothing_written(&new);
        err
    };
    let variant = || {
        let root = tempfile::tempdir().unwrap();
        copy_tree(&copy, &root.path().join(&backup.id));
        root
    };
    // One field of the manifest edited offline.
    let edited = variant();
    let path = edited.path().join(&backup.id).join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = text.replacen("\"records\": ", "\"records\": 1", 1);
    assert_ne!(changed, text);
    std::fs::write(&path, changed).unwrap();
    refused(edited.path(), "fails its authentication");
    // One byte of one data object flipped: named.
    let flipped = variant();
    let data = flipped.path().join(&backup.id).join("data");
    let victim = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sst" || x == "blob"))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let err = refused(flipped.path(), "does not match its checksum");
    assert!(err.contains(&name), "the damaged object is not named: {err}");
    // The keyring object missing.
    let missing = variant();
    std::fs::remove_file(missing.path().join(&backup.id).join("keyring.json")).unwrap();
    refused(missing.path(), "keyring.json is missing");
    // Another master key.
    let foreign = Cluster::start(ClusterOptions {
        start_nodes: false,
        ..Default::default()
    })
    .await;
    let (ok, _, err) = restore(
        &foreign,
        &format!("file://{}", offsite.path().display()),
        &backup.id,
        &configs(&foreign),
    );
    assert!(!ok && err.contains("master key"), "{err}");
    nothing_written(&foreign);
    // A config for only two of the three voters.
    let (ok, _, err) = restore(
        &new,
        &format!("file://{}", offsite.path().display()),
        &backup.id,
        &configs(&new)[..2],
    );
    assert!(!ok && err.contains("voter 3"), "{err}");
    nothing_written(&new);
    // A data directory that holds something.
    std::fs::create_dir_all(new.data_dir(1)).unwrap();
    std::fs::write(new.data_dir(1).join("keep"), b"x").unwrap();
    let (ok, _, err) = restore(
        &new,
        &format!("file://{}", offsite.path().display()),
        &backup.id,
        &configs(&new),
    );
    assert!(!ok && err.contains("is not empty"), "{err}");
    assert!(!new.data_dir(0).exists() && !new.data_dir(2).exists());
    assert_eq!(std::fs::read_dir(new.data_dir(1)).unwrap().count(), 1);
    // The good copy restores (the refusals above were the copies' fault).
    std::fs::remove_dir_all(new.data_dir(1)).unwrap();
    let (ok, _, err) = restore(
        &new,
        &format!("file://{}", offsite.path().display()),
        "latest",
        &configs(&new),
    );
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_expunged_by_mistake_comes_back_under_a_new_name() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    cluster.grant_cluster_role("auditor", "auditor").await;
    let mut c = cluster.mailbox(0).await;
    let mut bodies = BTreeMap::new();
    for n in 0..12 {
        let b = body(n);
        let frames = {
            let header = AppendHeader {
                tenant: T.into(),
                mailbox: M.into(),
                idempotency_key: format!("m{n}"),
                flags: match n % 3 {
                    0 => vec!["\\Seen".into()],
                    1 => vec!["\\Flagged".into(), "$Invoice".into()],
                    _ => vec![],
                },
                internal_date_ms: 1_700_000_000_000 + n as i64 * 86_400_000,
                size: 0,
            };
            mailvault_proto::client::append_frames(header, &b)
        };
        let r = c
            .append_message(tokio_stream::iter(frames))
            .await
            .unwrap()
            .into_inner();
        bodies.insert(r.uid, b);
    }
    let before = summaries(&mut c, M).await;
    let backup = cluster.take_backup().await;
    // Expunged by mistake.
    let uids: Vec<u32> = before.keys().copied().collect();
    c.expunge_messages(ExpungeMessagesRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uids,
    })
    .await
    .unwrap();
    assert!(summaries(&mut c, M).await.is_empty());

    // Two operators: proposed (rehearsed on the node holding the backup),
    // approved, run as planned.
    let op = cluster
        .restore_mailbox(0, "latest", T, M, "support-restored")
        .await
        .expect("the restore is proposed");
    assert_eq!(op.status, "succeeded", "{op:?}");
    let plan = op.plan.clone().unwrap();
    let kind = match plan.kind.and_then(|k| k.kind) {
        Some(operation_kind::Kind::RestoreMailbox(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (kind.backup_id.as_str(), kind.messages, kind.node),
        (backup.id.as_str(), 12, backup.node)
    );
    assert!(!plan.backup_first, "nothing live is changed");
    let planned: Vec<_> = plan.steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(planned, ["create-mailbox", "restore-mailbox"]);
    assert_eq!(op.steps.len(), plan.steps.len(), "{op:?}");
    assert!(op.steps.iter().all(|s| s.ok), "{op:?}");
    assert!(
        op.steps[1].result.contains("holds 12 messages"),
        "{:?}",
        op.steps[1]
    );
    let restored = summaries(&mut c, "support-restored").await;
    assert_eq!(restored.len(), before.len());
    // In UID order, byte-exact, with flags, keywords, internal dates and
    // headers; new UIDs of the new mailbox.
    for ((old_uid, was), (new_uid, now)) in before.iter().zip(restored.iter()) {
        assert_eq!(old_uid, new_uid);
        assert_eq!(now.flags, was.flags);
        assert_eq!(now.internal_date_ms, was.internal_date_ms);
        assert_eq!(
            (now.size, &now.subject, &now.from),
            (was.size, &was.subject, &was.from)
        );
        let (_, bytes) = fetch(&mut c, T, "support-restored", *new_uid).await.unwrap();
        assert!(bytes == bodies[old_uid], "uid {old_uid}: the body differs");
    }
    // Into a mailbox that exists, from a mailbox the backup does not hold, a
    // name that is not one: refused when proposed, nothing changed.
    let err = cluster
        .restore_mailbox(0, &backup.id, T, M, "support-restored")
        .await
        .unwrap_err();
    assert!(
        err.contains("PRECONDITION_VIOLATED") && err.contains("mailbox acme/support-restored exists"),
        "{err}"
    );
    let err = cluster
        .restore_mailbox(0, &backup.id, T, "nope", "x")
        .await
        .unwrap_err();
    assert!(
        err.contains("PRECONDITION_VIOLATED") && err.contains("holds no mailbox"),
        "{err}"
    );
    let err = cluster
        .restore_mailbox(0, &backup.id, T, M, "bad\u{1}name")
        .await
        .unwrap_err();
    assert!(err.contains("INVALID_NAME"), "{err}");
    assert_eq!(summaries(&mut c, "support-restored").await.len(), 12);
    // One operator cannot restore directly; rehearsing writes nothing.
    let direct = |rehearse: bool| RestoreMailboxRequest {
        backup_id: backup.id.clone(),
        tenant: T.into(),
        mailbox: M.into(),
        new_mailbox: "y".into(),
        resume: false,
        operation: String::new(),
        rehearse,
    };
    let mut as_admin = cluster.admin(0).await.backups;
    let e = as_admin.restore_mailbox(direct(false)).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (tonic::Code::FailedPrecondition, "TWO_PERSON_REQUIRED".into())
    );
    let checked = as_admin.restore_mailbox(direct(true)).await.unwrap().into_inner();
    assert_eq!((checked.messages, checked.skipped), (12, 0));
    let e = c
        .get_mailbox_status(GetMailboxStatusRequest {
            tenant: T.into(),
            mailbox: "y".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "a rehearsal creates nothing");
    let mut as_frontend = cluster.admin_as(0, FRONTEND).await.backups;
    let e = as_frontend.restore_mailbox(direct(true)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // On record.
    let mut audit = cluster.admin_as(0, "auditor").await.audit;
    let records = audit
        .list_audit(ListAuditRequest {
            from_seq: 1,
            limit: 100_000,
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(records
        .iter()
        .any(|r| r.action == "backup-restore-mailbox" && r.target.contains("support-restored")));
    assert!(records.iter().any(|r| r.action == "ProposeOperation"
        && r.result.contains("refused")
        && r.result.contains("holds no mailbox")));
    assert!(records
        .iter()
        .any(|r| r.action == "RestoreMailbox" && r.result == "refused: two-person operation"));
}

/// Reads the plan file as JSON.
fn plan_doc(c: &Cluster) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(c.restore_plan_file()).unwrap()).unwrap()
}

fn write_plan(c: &Cluster, doc: &serde_json::Value) {
    std::fs::write(c.restore_plan_file(), serde_json::to_vec_pretty(doc).unwrap()).unwrap();
}

/// `doc` with one more signature entry.
fn signed(doc: &serde_json::Value, signature: serde_json::Value) -> serde_json::Value {
    let mut d = doc.clone();
    d["signatures"]
        .as_array_mut()
        .expect("a plan file's signatures")
        .push(signature);
    d
}

/// `backup approve-restore PLAN --yes --plan-hash HASH`.
fn approve_restore(plan: &str, hash: &str) -> Vec<String> {
    ["backup", "approve-restore", plan, "--yes", "--plan-hash", hash]
        .map(String::from)
        .to_vec()
}

/// A signature entry as `identity` of cluster `c` would make it for the
/// plan `doc` (or for `id`/`hash` given instead).
fn signature_of(c: &Cluster, identity: &str, id: &str, hash: &str) -> serde_json::Value {
    use base64::Engine;
    let (cert, key) = c.identity_files(identity);
    let message = mailvault_proto::approval::message(id, hash);
    let sig = mailvault_proto::approval::sign(&key, &cert, &message).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    serde_json::json!({
        "identity": identity,
        "key": mailvault_proto::approval::key_fingerprint(&cert).unwrap(),
        "certificate": b64.encode(&cert),
        "signature": b64.encode(sig),
        "signed_ms": 1,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restore_runs_only_on_an_unchanged_plan_two_operators_signed() {
    let old = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&old, 0, T, M).await;
    let mut c = old.mailbox(0).await;
    for n in 0..4 {
        append(&mut c, T, M, &format!("k{n}"), &body(n + 1))
            .await
            .unwrap();
    }
    let backup = old.take_backup().await;
    // A node's own backup root has the layout of an off-site store.
    let from = format!(
        "file://{}",
        old.data_dir(backup.node as usize - 1).join("backups").display()
    );
    let key = std::fs::read_to_string(old.master_key_file()).unwrap();
    let new = Cluster::start(ClusterOptions {
        master_key: key.trim().to_string(),
        start_nodes: false,
        ..Default::default()
    })
    .await;
    let cfg: Vec<String> = configs(&new).iter().map(|p| p.display().to_string()).collect();
    let with_configs = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for c in &cfg {
            v.extend(["--config".to_string(), c.clone()]);
        }
        v
    };
    let run_as = |identity: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        new.admin_json_as(0, identity, &args)
    };
    let plan_path = new.restore_plan_file().display().to_string();
    let run_plan = || run_as(ADMIN, with_configs(&["backup", "restore", "--plan", &plan_path]));
    let refused = |(ok, _, err): (bool, serde_json::Value, String), want: &str| {
        assert!(!ok, "ran, wanted a refusal naming {want:?}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
        nothing_written(&new);
    };

    // No solo path: without a plan, refused.
    refused(
        run_as(
            ADMIN,
            with_configs(&["backup", "restore", "--from", &from, "--backup", &backup.id]),
        ),
        "a cluster restore is a two-person operation",
    );
    // Rehearsed by one operator: the plan, signed by them, nothing written.
    let (ok, planned, err) = run_as(
        ADMIN,
        with_configs(&[
            "backup",
            "restore",
            "--from",
            &from,
            "--backup",
            "latest",
            "--reason",
            "T-900",
            "--plan-out",
            &plan_path,
        ]),
    );
    assert!(ok, "{err}");
    nothing_written(&new);
    let p = &planned["plan"];
    assert_eq!(p["backup"], backup.id.as_str());
    assert_eq!(p["proposer"], ADMIN);
    assert_eq!(planned["signatures"].as_array().unwrap().len(), 1);
    let effect = p["effect"][0].as_str().unwrap();
    assert!(
        effect.contains("1 tenants, 1 mailboxes, 4 messages") && effect.contains("voters 1, 2, 3"),
        "{effect}"
    );
    assert!(p["approvers"] == serde_json::json!([ADMIN, ADMIN2]), "{p}");
    assert!(p["steps"].as_array().unwrap().len() == 6, "{p}");
    for s in ["RESTORE-BODY", "cust@example.org"] {
        assert!(!planned.to_string().contains(s), "content in the plan");
    }
    let (id, hash) = (
        p["id"].as_str().unwrap().to_string(),
        planned["plan_hash"].as_str().unwrap().to_string(),
    );
    let proposed_only = plan_doc(&new);

    // Run with the proposer's signature only: refused.
    refused(run_plan(), "a second operator must sign it");
    // The proposer signs again: refused; nothing added.
    let sign = |identity: &str| run_as(identity, approve_restore(&plan_path, &hash));
    refused(sign(ADMIN), "admin signed plan");
    // Another identity on the proposer's key: refused by the CLI, and by
    // the restore when the file is made by hand.
    new.issue_on_key_of("admin3", ADMIN);
    refused(sign("admin3"), "this certificate's key signed plan");
    let doc = signed(&proposed_only, signature_of(&new, "admin3", &id, &hash));
    write_plan(&new, &doc);
    refused(run_plan(), "signed with one key");
    // A wrong plan hash given to approve-restore: not signed.
    write_plan(&new, &proposed_only);
    let (ok, _, err) = run_as(ADMIN2, approve_restore(&plan_path, &"0".repeat(64)));
    assert!(!ok && err.contains("not signed: the plan's hash is"), "{err}");
    // Not an operator: it may sign the file, the restore refuses it.
    let (ok, _, err) = sign("frontend");
    assert!(ok, "{err}");
    refused(run_plan(), "frontend is no operator in the backup's policy");
    // A forged signature (one byte flipped): refused.
    write_plan(&new, &proposed_only);
    let mut forged = signature_of(&new, ADMIN2, &id, &hash);
    let s = forged["signature"].as_str().unwrap().to_string();
    let flipped = if s.starts_with('A') {
        s.replacen('A', "B", 1)
    } else {
        format!("A{}", &s[1..])
    };
    forged["signature"] = flipped.into();
    write_plan(&new, &signed(&proposed_only, forged));
    refused(run_plan(), "admin2's signature is refused");
    // A signature of another plan, replayed onto this one: refused.
    let doc = signed(
        &proposed_only,
        signature_of(&new, ADMIN2, "restore-00000000", &hash),
    );
    write_plan(&new, &doc);
    refused(run_plan(), "the signature does not match");
    // The plan edited after it was signed (another reason): refused.
    let mut doc = signed(&proposed_only, signature_of(&new, ADMIN2, &id, &hash));
    let signed_by_both = doc.clone();
    doc["plan"]["reason"] = "T-901".into();
    write_plan(&new, &doc);
    refused(run_plan(), "was changed after it was rehearsed");
    // Signed by both, but run with another cluster's configs: refused.
    write_plan(&new, &signed_by_both);
    let other = Cluster::start(ClusterOptions {
        master_key: key.trim().to_string(),
        start_nodes: false,
        ..Default::default()
    })
    .await;
    let mut args = vec!["backup", "restore", "--plan", &plan_path];
    let other_cfg: Vec<String> = configs(&other).iter().map(|p| p.display().to_string()).collect();
    for c in &other_cfg {
        args.extend(["--config", c.as_str()]);
    }
    let (ok, _, err) = new.admin_json_as(0, ADMIN, &args);
    assert!(
        !ok && err.contains("rehearse this restore and have it signed"),
        "{err}"
    );
    nothing_written(&other);
    // Expired: neither signed nor run.
    let (ok, _, err) = run_as(
        ADMIN,
        with_configs(&[
            "backup",
            "restore",
            "--from",
            &from,
            "--backup",
            &backup.id,
            "--reason",
            "T-902",
            "--expires",
            "2s",
            "--plan-out",
            &plan_path,
        ]),
    );
    assert!(ok, "{err}");
    let short_hash = plan_doc(&new)["plan_hash"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, _, err) = run_as(ADMIN2, approve_restore(&plan_path, &short_hash));
    assert!(!ok && err.contains("expired"), "{err}");
    refused(run_plan(), "expired");

    // An approver revoked in the backup's policy: refused.
    let mut a = old.admin(0).await.access;
    a.revoke_identity(RevokeIdentityRequest {
        identity: ADMIN2.into(),
    })
    .await
    .unwrap();
    old.wait_all_applied().await;
    let revoked = old.take_backup().await;
    let (ok, _, err) = new.restore_offline(&from, &revoked.id, &configs(&new), ADMIN, ADMIN2);
    assert!(
        !ok && err.contains("admin2 is revoked in the backup's policy"),
        "{err}"
    );
    nothing_written(&new);

    // The plan signed by both, unchanged, in time: it runs.
    let (ok, done, err) = new.restore_offline(&from, &backup.id, &configs(&new), ADMIN, ADMIN2);
    assert!(ok, "{err}");
    assert!(done["signed_by"] == serde_json::json!([ADMIN, ADMIN2]), "{done}");
    assert_eq!(done["nodes"].as_array().unwrap().len(), 3);
}
