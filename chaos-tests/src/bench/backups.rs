//! `mailvault-bench backups`: what backups cost as the mail held grows. For
//! each message count, a fresh 3-node cluster is filled with messages of
//! `--size` bytes (64 clients), then measured: a snapshot build (it must
//! not grow with the mail held), a backup (time and size), the ship to a
//! directory — and to a real S3 server (`moto_server`) with `--s3` — with
//! its read-back (MB/s, as the node measured it), the restore drill, a
//! whole-cluster restore (`mailvault-admin backup restore`, offline) and a
//! mailbox restore of `--mailbox-messages` messages into the live cluster.

use std::time::{Duration, Instant};

use anyhow::Context;
use mailvault_proto::v1::{Backup, GetMailboxStatusRequest, ListBackupsRequest, TriggerSnapshotRequest};

use super::load::{drive, Load};
use super::{mailbox_target, TENANT};
use crate::s3::{free_port, Moto};
use crate::{create_mailbox, create_tenant_and_mailbox, Cluster, ClusterOptions};

/// What to measure.
pub struct BackupPlan {
    /// Message counts, one cluster each.
    pub messages: Vec<u64>,
    /// Message size in bytes.
    pub size: usize,
    /// Also ship to a `moto_server`.
    pub s3: bool,
    /// Messages in the mailbox restored into the live cluster.
    pub mailbox_messages: u64,
}

/// One row of the table.
struct Row {
    store: &'static str,
    messages: u64,
    snapshot_s: f64,
    backup_s: f64,
    backup_bytes: u64,
    ship_s: f64,
    ship_mb_s: f64,
    drill_s: f64,
    restore_s: f64,
    mailbox_s: f64,
}

const MAILBOX: &str = "inbox";
const SMALL: &str = "restore-me";

async fn fill(c: &Cluster, leader: usize, mailbox: &str, count: u64, size: usize) -> anyhow::Result<()> {
    let load = Load {
        clients: 64,
        duration: Duration::from_secs(3600),
        max_writes: count,
        first_endpoint: leader,
        keep_ack_times: false,
        attempt_timeout: None,
    };
    let m = drive(mailbox_target(c, 64, size, mailbox, mailbox), load).await;
    anyhow::ensure!(
        m.acked() == count,
        "only {} of {count} appends acknowledged",
        m.acked()
    );
    eprintln!(
        "  {count} messages of {size} B into {mailbox} in {:.0} s",
        m.seconds
    );
    Ok(())
}

async fn catalog(c: &Cluster) -> anyhow::Result<Vec<Backup>> {
    let mut b = c.admin(0).await.backups;
    Ok(b.list_backups(ListBackupsRequest {}).await?.into_inner().backups)
}

/// One cluster of `messages`, shipping to `offsite` (TOML lines of `[backup]`).
async fn measure(
    plan: &BackupPlan,
    store: &'static str,
    messages: u64,
    offsite: String,
) -> anyhow::Result<Row> {
    eprintln!("{messages} messages, off-site {store}:");
    let mut cluster = Cluster::start(ClusterOptions {
        production_timing: true,
        backup: offsite,
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, TENANT, MAILBOX).await;
    create_mailbox(&cluster, 0, TENANT, SMALL).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    fill(&cluster, leader, MAILBOX, messages, plan.size).await?;
    fill(&cluster, leader, SMALL, plan.mailbox_messages, plan.size).await?;

    let mut a = cluster.admin(leader).await;
    let t = Instant::now();
    a.cluster
        .trigger_snapshot(TriggerSnapshotRequest { purge_log: false })
        .await?;
    let snapshot_s = t.elapsed().as_secs_f64();

    // Through the CLI, which waits as long as it takes (the harness's
    // channels give up after 30 s); its start-up is in the time.
    let t = Instant::now();
    let (ok, taken, err) = tokio::task::block_in_place(|| cluster.admin_json(leader, &["backup", "now"]));
    let backup_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(ok, "backup now failed: {err}");
    let backup = Backup {
        id: taken["id"].as_str().context("no backup id")?.to_string(),
        bytes: taken["bytes"].as_u64().unwrap_or(0),
        ..Default::default()
    };
    // The first backup ships at once and is drilled; the node's own timings.
    let deadline = Instant::now() + Duration::from_secs(3600);
    let done = loop {
        let l = catalog(&cluster).await?;
        if let Some(b) = l.into_iter().find(|b| b.id == backup.id && b.drill.is_some()) {
            break b;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backup was never shipped and drilled"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let copy = done.shipped.clone().context("drilled but not shipped")?;
    let drill = done.drill.clone().context("no drill")?;
    anyhow::ensure!(drill.passed, "the drill failed: {}", drill.problem);
    let ship_s = copy.took_ms as f64 / 1000.0;

    let t = Instant::now();
    let new_name = format!("{SMALL}-restored");
    let op = cluster
        .restore_mailbox(leader, &backup.id, TENANT, SMALL, &new_name)
        .await
        .map_err(|e| anyhow::anyhow!("restore-mailbox refused: {e}"))?;
    let mailbox_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        op.status == "succeeded",
        "the restore did not succeed: {}",
        op.outcome
    );
    let holds = format!("holds {} messages", plan.mailbox_messages);
    anyhow::ensure!(
        op.steps.last().is_some_and(|s| s.result.contains(&holds)),
        "{:?}",
        op.steps
    );

    // A whole new cluster from the copy, offline.
    let key = std::fs::read_to_string(cluster.master_key_file())?;
    let mut new = Cluster::start(ClusterOptions {
        master_key: key.trim().to_string(),
        start_nodes: false,
        production_timing: true,
        backup: offsite_of(&cluster, store),
        ..Default::default()
    })
    .await;
    let from = copy.target.clone();
    let t = Instant::now();
    let (ok, _, err) = tokio::task::block_in_place(|| {
        new.restore_offline(
            &from,
            &backup.id,
            &new.config_files(),
            crate::ADMIN,
            crate::ADMIN2,
        )
    });
    let restore_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(ok, "restore failed: {err}");
    new.start_all().await;
    let mut m = new.mailbox(0).await;
    let status = crate::retry(Duration::from_secs(30), || {
        let mut m = m.clone();
        async move {
            m.get_mailbox_status(GetMailboxStatusRequest {
                tenant: TENANT.into(),
                mailbox: MAILBOX.into(),
            })
            .await
        }
    })
    .await?
    .into_inner();
    let _ = &mut m;
    anyhow::ensure!(
        status.messages == messages,
        "the restored cluster holds {status:?}"
    );
    Ok(Row {
        store,
        messages,
        snapshot_s,
        backup_s,
        backup_bytes: backup.bytes,
        ship_s,
        ship_mb_s: copy.bytes as f64 / 1e6 / ship_s.max(1e-3),
        drill_s: drill.took_ms as f64 / 1000.0,
        restore_s,
        mailbox_s,
    })
}

/// The restored cluster reads the copy where the old one shipped it; for
/// S3 it needs the same `[backup.s3]` settings.
fn offsite_of(old: &Cluster, store: &str) -> String {
    match store {
        "s3" => std::fs::read_to_string(old.config_file(0))
            .ok()
            .and_then(|c| c.split_once("[backup]\n").map(|(_, b)| b.to_string()))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Runs the plan and prints a markdown table.
pub async fn backups(plan: BackupPlan) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let moto = if plan.s3 {
        Some(Moto::start(free_port()))
    } else {
        None
    };
    let creds = tempfile::NamedTempFile::new()?;
    std::fs::write(
        creds.path(),
        "access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
    )?;
    for &n in &plan.messages {
        let dir = tempfile::tempdir()?;
        rows.push(
            measure(
                &plan,
                "directory",
                n,
                format!("offsite = \"file://{}\"\n", dir.path().display()),
            )
            .await?,
        );
        if let Some(m) = &moto {
            let s3 = format!(
                "offsite = \"s3://mailvault/bench-{n}\"\n\n[backup.s3]\nendpoint = \"http://{}\"\nallow_http = true\ncredentials_file = \"{}\"\n",
                m.addr,
                creds.path().display()
            );
            rows.push(measure(&plan, "s3", n, s3).await?);
        }
    }
    println!(
        "| messages ({} B) | off-site | snapshot build s | backup s | backup MiB | ship + read-back s | MB/s | drill s | cluster restore s | mailbox restore s ({} msgs) |",
        plan.size, plan.mailbox_messages
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.messages,
            r.store,
            r.snapshot_s,
            r.backup_s,
            r.backup_bytes as f64 / (1u64 << 20) as f64,
            r.ship_s,
            r.ship_mb_s,
            r.drill_s,
            r.restore_s,
            r.mailbox_s
        );
    }
    Ok(())
}
