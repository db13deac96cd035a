//! Scheduled backups, as operators see them through the CLI and the API: the
//! backup node takes one per interval, each verified and in the replicated
//! catalog any node lists; `keep_local` removes the oldest from the catalog
//! and the disk; a damaged backup fails verification naming the file; the
//! leader stands in while the backup node is down and hands the duty back.

use std::time::Duration;

use mailvault_chaos::*;
use mailvault_proto::v1::*;
use tonic::Code;

const T: &str = "acme";
const M: &str = "inbox";

use mailvault_chaos::code_and_reason as reason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_node_takes_verified_backups_on_schedule_and_keeps_only_keep_local() {
    let cluster = Cluster::start(ClusterOptions {
        backup: "interval_secs = 2\nkeep_local = 4\nship_interval_secs = 1\n".into(),
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let c = cluster.mailbox(0).await;
    for n in 0..5 {
        let body = test_message(
            "Backups subject",
            "cust@example.org",
            "BACKUP-BODY-MARKER-41",
            2000,
        );
        retry(Duration::from_secs(10), || {
            let (mut c, body) = (c.clone(), body.clone());
            async move { append(&mut c, T, M, &format!("k{n}"), &body).await }
        })
        .await
        .unwrap();
    }
    // Several backups, every one by the backup node (node 3), listed by any
    // node, and no more than keep_local of them held. (A new backup is
    // recorded before the oldest is marked removed — never the other way
    // round — so for a moment after each take the catalog holds one more;
    // a catalog that never comes back to keep_local fails here.)
    let held_of = |l: &ListBackupsResponse| l.backups.iter().filter(|b| b.local).count();
    let l = wait_backups(
        &cluster,
        0,
        Duration::from_secs(60),
        "five backups, at most keep_local = 4 held",
        |l| l.backups.len() >= 5 && held_of(l) <= 4,
    )
    .await;
    assert!(l.backups.iter().all(|b| b.node == 3), "taken by the backup node");
    assert_eq!((l.duty_node, l.standing_in), (3, false));
    assert!(held_of(&l) >= 1, "the newest backups are held");
    // The oldest were removed from the catalog's local copies, then from
    // disk (in that order: a moment after the catalog says so).
    let root = cluster.data_dir(2).join("backups");
    for b in l.backups.iter().filter(|b| !b.local) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while root.join(&b.id).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} removed in the catalog but still on disk",
                b.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(b.local_removed_at_ms >= b.taken_at_ms);
    }
    let first = &l.backups[0];
    assert!(!first.local, "the oldest backup went");
    assert!(first.files >= 4 && first.bytes > 0, "{first:?}");

    // Show, through node 1 (passed on to node 3): the authenticated manifest.
    let newest = wait_backups(&cluster, 0, Duration::from_secs(10), "a held backup", |l| {
        l.backups.iter().any(|b| b.local)
    })
    .await
    .backups
    .into_iter()
    .rfind(|b| b.local)
    .unwrap();
    let (ok, shown, err) = cluster.admin_json(0, &["backup", "show", &newest.id]);
    if ok {
        assert_eq!(shown["backup"]["id"], newest.id.as_str());
        assert_eq!(shown["manifest"]["tenants"][0]["name"], T);
        assert_eq!(shown["manifest"]["members"].as_array().unwrap().len(), 3);
        assert!(shown["manifest"]["files"].as_array().unwrap().len() >= 3);
    } else {
        // Expired between the list and the show: named as such.
        assert!(err.contains("BACKUP_NOT_LOCAL"), "{err}");
    }

    // Errors: malformed id, unknown id, an auditor taking one, a removed backup.
    let mut b = cluster.admin(1).await.backups;
    let e = b
        .show_backup(ShowBackupRequest { id: "../etc".into() })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::InvalidArgument, "INVALID_REQUEST".into()));
    let e = b
        .verify_backup(VerifyBackupRequest {
            id: "20200101T000000Z-000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::NotFound, "BACKUP_NOT_FOUND".into()));
    let e = b
        .verify_backup(VerifyBackupRequest { id: first.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::FailedPrecondition, "BACKUP_NOT_LOCAL".into()));
    cluster.grant_cluster_role("auditor", "auditor").await;
    let mut auditor = cluster.admin_as(0, "auditor").await.backups;
    assert!(auditor.list_backups(ListBackupsRequest {}).await.is_ok());
    let e = auditor.take_backup(TakeBackupRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // `backup now`, asked of node 2: taken by node 3, verified, listed.
    let (ok, taken, err) = cluster.admin_json(1, &["backup", "now"]);
    assert!(ok, "backup now: {err}");
    assert_eq!(taken["node"], 3);
    let id = taken["id"].as_str().unwrap().to_string();
    // Verified where it is held; then damaged: its keyring object (a file of
    // its own, not shared with the live state) has one byte flipped.
    let (ok, v, err) = cluster.admin_json(0, &["backup", "verify", &id]);
    if !ok && err.contains("BACKUP_NOT_LOCAL") {
        panic!("the backup just taken expired before it was verified: keep_local too small for the test");
    }
    assert!(ok, "verify: {err}");
    assert_eq!(v["ok"], true);
    assert!(v["files_checked"].as_u64().unwrap() >= 3);
    let keyring = root.join(&id).join("keyring.json");
    let mut bytes = std::fs::read(&keyring).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&keyring, bytes).unwrap();
    let (ok, v, _) = cluster.admin_json(0, &["backup", "verify", &id]);
    assert!(!ok, "a damaged backup must fail verification (exit non-zero)");
    assert_eq!(v["ok"], false);
    let problem = v["problem"].as_str().unwrap();
    assert!(
        problem.contains("keyring.json") && problem.contains("checksum"),
        "{problem}"
    );
    // A restore from it is refused when it is proposed, nothing recorded.
    let err = cluster
        .restore_mailbox(0, &id, "acme", "support", "support-restored")
        .await
        .unwrap_err();
    assert!(
        err.contains("PRECONDITION_VIOLATED")
            && err.contains(&format!("backup {id} cannot be restored from"))
            && err.contains("keyring.json"),
        "{err}"
    );
    let (ok, ops, err) = cluster.admin_json(0, &["op", "list"]);
    assert!(ok, "{err}");
    assert!(
        !ops.to_string().contains("restore"),
        "no restore was proposed: {ops}"
    );

    // Status names the duty holder and the newest backup; /metrics counts them.
    let s = cluster.node_status(0).await.backup.unwrap();
    assert_eq!(s.duty_node, 3);
    assert!(!s.newest_id.is_empty() && s.newest_node == 3);
    // The backup node's own count, settled between two takes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let s3 = loop {
        let s3 = cluster.node_status(2).await.backup.unwrap();
        if (1..=4).contains(&s3.local_backups) {
            break s3;
        }
        assert!(std::time::Instant::now() < deadline, "keep_local = 4: {s3:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(s3.next_due_ms > 0, "the backup node's next backup is due");
    let taken = scrape_metric(&cluster.ops_addr(2), "mailvault_backups_taken_total")
        .await
        .unwrap();
    assert!(taken >= 6.0, "mailvault_backups_taken_total = {taken}");
    assert_eq!(
        scrape_metric(&cluster.ops_addr(2), "mailvault_backup_duty").await,
        Some(1.0)
    );
    // Nothing of the mail in clear in any backup file.
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            match e.path().is_dir() {
                true => stack.push(e.path()),
                false => files.push(e.path()),
            }
        }
    }
    assert!(!files.is_empty());
    for f in files {
        let Ok(data) = std::fs::read(&f) else { continue };
        for s in ["BACKUP-BODY-MARKER-41", "cust@example.org", "Backups subject"] {
            assert!(
                !data.windows(s.len()).any(|w| w == s.as_bytes()),
                "plaintext in {}",
                f.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_stands_in_while_the_backup_node_is_down_and_hands_the_duty_back() {
    let mut cluster = Cluster::start(ClusterOptions {
        backup: "interval_secs = 2\nkeep_local = 20\n".into(),
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    wait_backups(&cluster, 0, Duration::from_secs(60), "a backup by node 3", |l| {
        l.backups.iter().any(|b| b.node == 3)
    })
    .await;
    cluster.stop(2);
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let leader_id = leader as u64 + 1;
    // Two intervals without a backup, then the leader takes them.
    let l = wait_backups(
        &cluster,
        leader,
        Duration::from_secs(60),
        "a stand-in backup",
        |l| l.backups.iter().any(|b| b.node == leader_id),
    )
    .await;
    assert_eq!((l.duty_node, l.standing_in), (leader_id, true));
    // Every node names the stand-in (each decides once a second).
    let other = 1 - leader.min(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = cluster.node_status(other).await.backup.unwrap();
        if (s.duty_node, s.standing_in) == (leader_id, true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {} names {:?}, not the stand-in {leader_id}",
            other + 1,
            (s.duty_node, s.standing_in)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `backup now` goes to the node holding the duty.
    let (ok, taken, err) = cluster.admin_json(0, &["backup", "now"]);
    assert!(ok, "backup now during the stand-in: {err}");
    assert_eq!(taken["node"], leader_id);
    let stood_in = taken["id"].as_str().unwrap().to_string();

    cluster.start_node(2);
    let l = wait_backups(&cluster, 0, Duration::from_secs(60), "node 3 back on duty", |l| {
        l.backups.last().is_some_and(|b| b.node == 3) && l.duty_node == 3 && !l.standing_in
    })
    .await;
    assert!(l.backups.iter().any(|b| b.id == stood_in));
    // A stand-in's backup is verified where it is held, asked of node 3.
    let (ok, v, err) = cluster.admin_json(2, &["backup", "verify", &stood_in]);
    assert!(ok, "verify through node 3: {err}");
    assert_eq!(v["ok"], true);
    // The text status says who holds the duty.
    let out = cluster
        .admin_command(&cluster.client_addr(0), ADMIN)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backup duty: node 3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_node_killed_in_the_middle_of_a_backup_lists_nothing_and_takes_the_next() {
    let mut cluster = Cluster::start(ClusterOptions {
        test_modes: "pause-backup".into(),
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let mut c = cluster.mailbox(0).await;
    for n in 0..5 {
        let body = test_message(
            "Backups subject",
            "cust@example.org",
            "BACKUP-BODY-MARKER-41",
            5000 + n,
        );
        append(&mut c, T, M, &format!("k{n}"), &body).await.unwrap();
    }
    // Node 3's next backup holds before its manifest, every file written.
    let pause = cluster
        .data_dir(2)
        .join(mailvault_node::test_modes::PAUSE_BACKUP_FILE);
    std::fs::write(&pause, b"").unwrap();
    let b = cluster.admin(0).await.backups;
    let call = tokio::spawn(async move {
        // Retried while the duty is not yet known (just after the start).
        retry(Duration::from_secs(30), || {
            let mut b = b.clone();
            async move { b.take_backup(TakeBackupRequest {}).await }
        })
        .await
    });
    let root = cluster.data_dir(2).join("backups");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let staged = loop {
        let found = std::fs::read_dir(&root).ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name().unwrap().to_string_lossy().starts_with("incoming-")
                    && p.join("keyring.json").exists()
            })
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backup never reached its manifest"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!staged.join("manifest.json").exists());
    cluster.kill(2);
    let answer = call.await.unwrap();
    assert!(
        answer.is_err(),
        "a backup cut short was answered as taken: {answer:?}"
    );
    std::fs::remove_file(&pause).unwrap();
    assert!(
        staged.exists(),
        "the half-taken backup is on disk (the kill was in the middle)"
    );
    let l = list_backups(&cluster, 0).await;
    assert!(
        l.backups.is_empty(),
        "a half-taken backup is listed: {:?}",
        l.backups
    );

    cluster.start_node(2);
    // After the restart the leftover is removed and the next backup is whole.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while staged.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the leftover {} stayed",
            staged.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, taken, err) = cluster.admin_json(0, &["backup", "now"]);
    assert!(ok, "backup now after the restart: {err}");
    assert_eq!(taken["node"], 3);
    let id = taken["id"].as_str().unwrap().to_string();
    let (ok, v, err) = cluster.admin_json(0, &["backup", "verify", &id]);
    assert!(ok && v["ok"] == true, "{err} {v}");
    let l = list_backups(&cluster, 0).await;
    assert_eq!(
        l.backups.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [id], "only the whole backup under the root");
}
