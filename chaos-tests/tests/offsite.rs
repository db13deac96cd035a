//! Shipping backups off-site and drilling their restore, against a directory
//! and a real S3-compatible server (`moto_server`, from PyPI, installed by
//! `.ci/run`): every object is read back before a copy counts as shipped; a
//! drill restores the copy into scratch and checks it whole; a damaged or
//! missing object fails the drill by name, and the restorable time does not
//! claim that copy; while the store is down, ships fail and alert, and no
//! local backup that is not off-site is deleted; a ship cut short by `kill -9`
//! is never listed and completes after the restart; retention keeps exactly
//! `keep_offsite` restorable copies and never deletes the last one.

use std::path::Path;
use std::time::{Duration, Instant};

use mailvault_chaos::s3::{free_port, Moto};
use mailvault_chaos::*;
use mailvault_proto::v1::*;

const T: &str = "acme";
const M: &str = "inbox";

async fn fill(cluster: &Cluster, big: usize) {
    create_tenant_and_mailbox(cluster, 0, T, M).await;
    let c = cluster.mailbox(0).await;
    for n in 0..6 {
        let size = if n == 0 { big } else { 3000 };
        let body = test_message("Offsite subject", "cust@example.org", "OFFSITE-BODY-41", size);
        retry(Duration::from_secs(20), || {
            let (mut c, body) = (c.clone(), body.clone());
            async move { append(&mut c, T, M, &format!("k{n}"), &body).await }
        })
        .await
        .unwrap();
    }
}

async fn take(cluster: &Cluster) -> Backup {
    let mut b = cluster.admin(0).await.backups;
    b.take_backup(TakeBackupRequest {})
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap()
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        match e.path().is_dir() {
            true => files_under(&e.path(), out),
            false => out.push(e.path()),
        }
    }
}

/// Waits until node `ops`'s gauge `name` reads `want` (published each second).
async fn gauge_becomes(ops: &str, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = scrape_metric(ops, name).await.unwrap_or(-1.0);
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn audited(cluster: &Cluster, action: &str, target: &str) -> Vec<AuditRecord> {
    cluster
        .audit_records(0, "auditor")
        .await
        .into_iter()
        .filter(|r| r.action == action && r.target == target)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_copy_is_read_back_and_drilled_and_a_damaged_one_fails_by_name() {
    let offsite = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(ClusterOptions {
        // Daily shipping: after the first copy (shipped at once), only by hand.
        backup: format!("offsite = \"file://{}\"\n", offsite.path().display()),
        ..Default::default()
    })
    .await;
    // One message of 12 MiB: its blob file goes up in parts.
    fill(&cluster, 12 << 20).await;
    cluster.grant_cluster_role("auditor", "auditor").await;

    // The first backup is shipped at once and drilled.
    let a = take(&cluster).await;
    let l = wait_drilled(
        &cluster,
        0,
        &a.id,
        Duration::from_secs(120),
        "the first copy drilled",
    )
    .await;
    let shipped = l.backups.iter().find(|b| b.id == a.id).unwrap();
    let copy = shipped.shipped.as_ref().unwrap();
    assert!(copy.target.starts_with("file://"), "{copy:?}");
    assert_eq!(copy.objects, a.files, "every file and the manifest went up");
    let dir = offsite.path().join(&a.id);
    assert!(dir.join("manifest.json").exists() && dir.join("keyring.json").exists());
    let mut objects = Vec::new();
    files_under(&dir, &mut objects);
    assert!(
        objects.iter().any(|p| p.metadata().unwrap().len() > 8 << 20),
        "an object larger than one upload part"
    );
    // No plaintext in the off-site copy.
    for p in &objects {
        let data = std::fs::read(p).unwrap();
        for s in ["OFFSITE-BODY-41", "cust@example.org", "Offsite subject"] {
            assert!(
                !data.windows(s.len()).any(|w| w == s.as_bytes()),
                "plaintext in {}",
                p.display()
            );
        }
    }
    let ops1 = cluster.ops_addr(0);
    let secs = |ms: i64| ms as f64 / 1000.0;
    let restorable = "mailvault_backup_last_restorable_timestamp_seconds";
    assert_eq!(
        gauge_becomes(&ops1, restorable, secs(a.taken_at_ms)).await,
        secs(a.taken_at_ms),
        "any node tells the restorable time"
    );
    assert_eq!(
        scrape_metric(&ops1, "mailvault_backup_offsite_stale").await,
        Some(0.0)
    );
    assert!(
        scrape_metric(&cluster.ops_addr(2), "mailvault_backups_shipped_total")
            .await
            .unwrap()
            >= 1.0
    );
    let s = cluster.node_status(1).await.backup.unwrap();
    assert_eq!(
        (s.shipped_id.as_str(), s.restorable_id.as_str()),
        (a.id.as_str(), a.id.as_str())
    );
    assert!(s.drill_passed && !s.offsite_stale, "{s:?}");
    assert_eq!(
        audited(&cluster, "backup-drill-passed", &a.id).await.len(),
        1,
        "the drill is audited"
    );

    // A second backup, shipped by hand through node 2: read back, drilled.
    let (ok, b, err) = cluster.admin_json(1, &["backup", "now"]);
    assert!(ok, "{err}");
    let b_id = b["id"].as_str().unwrap().to_string();
    let (ok, shipped, err) = cluster.admin_json(1, &["backup", "ship-now", &b_id]);
    assert!(ok, "ship-now: {err}");
    assert_eq!(shipped["drill"]["passed"], true, "{shipped}");
    let b_taken = shipped["taken_at_ms"].as_i64().unwrap();
    assert_eq!(
        gauge_becomes(&ops1, restorable, secs(b_taken)).await,
        secs(b_taken)
    );

    // One byte of its largest object flipped: the drill fails and names it;
    // the restorable time falls back to the first copy.
    let mut b_objects = Vec::new();
    files_under(&offsite.path().join(&b_id), &mut b_objects);
    let largest = b_objects
        .iter()
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap()
        .clone();
    let name = largest
        .strip_prefix(offsite.path().join(&b_id))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut bytes = std::fs::read(&largest).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x20;
    std::fs::write(&largest, bytes).unwrap();
    let (ok, drilled, _) = cluster.admin_json(0, &["backup", "drill", &b_id]);
    assert!(!ok, "a damaged copy's drill must fail (exit non-zero)");
    let problem = drilled["drill"]["problem"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(drilled["drill"]["passed"], false, "{drilled}");
    assert!(problem.contains(&name), "the drill names {name}: {problem}");
    assert_eq!(
        gauge_becomes(&ops1, restorable, secs(a.taken_at_ms)).await,
        secs(a.taken_at_ms),
        "the damaged copy is not counted as restorable"
    );
    let failed = audited(&cluster, "backup-drill-failed", &b_id).await;
    assert_eq!(failed.len(), 1);
    assert!(failed[0].result.contains(&name), "{:?}", failed[0]);
    let s = cluster.node_status(0).await.backup.unwrap();
    assert!(
        !s.drill_passed && s.drill_id == b_id && s.drill_problem.contains(&name),
        "{s:?}"
    );

    // An object deleted from the first copy: named too.
    std::fs::remove_file(offsite.path().join(&a.id).join("keyring.json")).unwrap();
    let (ok, drilled, _) = cluster.admin_json(2, &["backup", "drill", &a.id]);
    assert!(!ok);
    let problem = drilled["drill"]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("keyring.json") && problem.contains("missing"),
        "{problem}"
    );
    assert_eq!(
        gauge_becomes(&ops1, restorable, 0.0).await,
        0.0,
        "no copy is known to restore"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_to_s3_reads_back_alerts_while_the_store_is_down_and_resumes_once_it_is_back() {
    let port = free_port();
    let moto = Moto::start(port);
    let creds = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        creds.path(),
        "access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
    )
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        backup: format!(
            "interval_secs = 2\nkeep_local = 2\nship_interval_secs = 2\nmax_offsite_age_secs = 5\n\
             offsite = \"s3://mailvault/cluster-a\"\n\n[backup.s3]\nendpoint = \"http://{}\"\n\
             allow_http = true\ncredentials_file = \"{}\"\n",
            moto.addr,
            creds.path().display()
        ),
        ..Default::default()
    })
    .await;
    fill(&cluster, 100_000).await;
    let l = wait_backups(
        &cluster,
        0,
        Duration::from_secs(90),
        "a copy drilled on S3",
        |l| {
            l.backups
                .iter()
                .any(|b| b.drill.as_ref().is_some_and(|d| d.passed))
        },
    )
    .await;
    let first = l
        .backups
        .iter()
        .find(|b| b.drill.as_ref().is_some_and(|d| d.passed))
        .unwrap();
    assert_eq!(first.shipped.as_ref().unwrap().target, "s3://mailvault/cluster-a");
    let listing = moto.http("GET", "/mailvault?list-type=2&prefix=cluster-a/");
    assert!(
        listing.contains(&format!("cluster-a/{}/manifest.json", first.id)),
        "the manifest is in the bucket"
    );

    // The store goes away: ships fail and alert; backups go on, and none
    // that is not off-site is removed, whatever keep_local says.
    drop(moto);
    let down = Instant::now();
    let ops3 = cluster.ops_addr(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cluster.node_status(2).await.backup.unwrap();
        let failures = scrape_metric(&ops3, "mailvault_backup_ship_failures_total")
            .await
            .unwrap_or(0.0);
        if s.offsite_stale && failures >= 1.0 && s.last_failure.contains("ship") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no alert while the store is down: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        gauge_becomes(&cluster.ops_addr(0), "mailvault_backup_offsite_stale", 1.0).await,
        1.0,
        "every node raises the alert"
    );
    let (ok, _, err) = cluster.admin_json(0, &["backup", "ship-now"]);
    assert!(!ok && err.contains("OFFSITE_UNAVAILABLE"), "{err}");
    let l = wait_backups(&cluster, 0, Duration::from_secs(60), "backups while down", |l| {
        l.backups.iter().filter(|b| b.shipped.is_none()).count() >= 4
    })
    .await;
    let newest_shipped = l
        .backups
        .iter()
        .filter(|b| b.shipped.is_some())
        .map(|b| b.id.clone())
        .max()
        .unwrap();
    for b in l.backups.iter().filter(|b| b.id > newest_shipped) {
        assert!(b.local, "{} was removed before it was off-site", b.id);
    }
    assert!(down.elapsed() > Duration::from_secs(5));

    // The store is back: the newest backup ships, the alert clears, and the
    // backups kept meanwhile may go.
    let moto = Moto::start(port);
    let l = wait_backups(
        &cluster,
        0,
        Duration::from_secs(90),
        "a ship after the store returned",
        |l| {
            l.backups
                .iter()
                .any(|b| b.id > newest_shipped && b.drill.as_ref().is_some_and(|d| d.passed))
        },
    )
    .await;
    let after = l.backups.iter().filter(|b| b.id > newest_shipped).count();
    assert!(after >= 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.node_status(2).await.backup.unwrap();
        if !s.offsite_stale && s.local_backups <= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the alert did not clear: {s:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(moto);
}

/// The backup node is killed (`kill -9`) in the middle of a ship: the copy
/// is not listed as shipped, and after the restart the ship resumes and
/// completes, read back and drilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ship_cut_short_by_kill_9_is_never_listed_and_completes_after_the_restart() {
    let offsite = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        backup: format!("offsite = \"file://{}\"\n", offsite.path().display()),
        ..Default::default()
    })
    .await;
    // 40 MiB of mail: the ship takes long enough to be caught in the middle.
    fill(&cluster, 40 << 20).await;
    let b = take(&cluster).await;
    let copy = offsite.path().join(&b.id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if copy.exists() && !copy.join("manifest.json").exists() {
            break;
        }
        assert!(
            !copy.join("manifest.json").exists(),
            "the ship finished before the test could catch it in the middle"
        );
        assert!(Instant::now() < deadline, "the ship never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    cluster.kill(2);
    // Objects already whole there (LocalFileSystem writes a staging file
    // named `…#n` and renames it once complete).
    let mut at_kill = Vec::new();
    files_under(&copy, &mut at_kill);
    let whole = at_kill
        .iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().contains('#'))
        .count();
    let l = list_backups(&cluster, 0).await;
    let listed = l.backups.iter().find(|x| x.id == b.id).unwrap();
    assert!(
        listed.shipped.is_none(),
        "a partial copy is listed as shipped: {listed:?}"
    );
    assert!(!copy.join("manifest.json").exists());
    cluster.start_node(2);
    let l = wait_drilled(
        &cluster,
        0,
        &b.id,
        Duration::from_secs(120),
        "the ship completed after the restart",
    )
    .await;
    let done = l.backups.iter().find(|x| x.id == b.id).unwrap();
    let shipped = done.shipped.as_ref().unwrap();
    assert!(shipped.objects <= b.files);
    if whole > 0 {
        assert!(
            shipped.objects as usize <= b.files as usize - whole,
            "the resumed ship sent again the {whole} objects already whole there: {shipped:?}"
        );
    }
    assert!(copy.join("manifest.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_site_retention_keeps_exactly_keep_offsite_restorable_copies() {
    let offsite = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(ClusterOptions {
        backup: format!(
            "offsite = \"file://{}\"\ninterval_secs = 2\nship_interval_secs = 1\nkeep_offsite = 2\nkeep_local = 10\n",
            offsite.path().display()
        ),
        ..Default::default()
    })
    .await;
    fill(&cluster, 3000).await;
    cluster.grant_cluster_role("auditor", "auditor").await;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut first_restorable = false;
    loop {
        let l = list_backups(&cluster, 0).await;
        let restorable: Vec<&Backup> = l
            .backups
            .iter()
            .filter(|b| {
                b.shipped.as_ref().is_some_and(|c| c.removed_at_ms == 0)
                    && b.drill.as_ref().is_some_and(|d| d.passed)
            })
            .collect();
        // Once a copy restored, there is always one.
        first_restorable |= !restorable.is_empty();
        assert!(
            !first_restorable || !restorable.is_empty(),
            "the last restorable copy was deleted"
        );
        let expired: Vec<&Backup> = l
            .backups
            .iter()
            .filter(|b| b.shipped.as_ref().is_some_and(|c| c.removed_at_ms > 0))
            .collect();
        if expired.len() >= 3 && restorable.len() == 2 {
            // The expired copies are the oldest ones.
            let oldest_kept = restorable.iter().map(|b| b.id.as_str()).min().unwrap();
            assert!(expired.iter().all(|b| b.id.as_str() < oldest_kept), "{expired:?}");
            // And their objects are gone from the store (deleted after marking).
            let on_disk = || {
                let mut ids: Vec<String> = std::fs::read_dir(offsite.path())
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                ids.sort();
                ids
            };
            let live: Vec<String> = l
                .backups
                .iter()
                .filter(|b| b.shipped.as_ref().is_some_and(|c| c.removed_at_ms == 0))
                .map(|b| b.id.clone())
                .collect();
            let settle = Instant::now() + Duration::from_secs(10);
            while expired.iter().any(|b| on_disk().contains(&b.id)) && Instant::now() < settle {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for b in &expired {
                assert!(
                    !on_disk().contains(&b.id),
                    "expired copy {} still in the store",
                    b.id
                );
            }
            assert!(
                live.iter().all(|id| on_disk().contains(id)),
                "{live:?} vs {:?}",
                on_disk()
            );
            let removed = audited(&cluster, "backup-offsite-expired", &expired[0].id).await;
            assert_eq!(removed.len(), 1, "one audit record per expired copy");
            return;
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!(
                "retention never settled at 2 restorable copies: {:?}",
                l.backups
                    .iter()
                    .map(|b| (
                        &b.id,
                        b.shipped.as_ref().map(|c| c.removed_at_ms),
                        b.drill.as_ref().map(|d| d.passed)
                    ))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
