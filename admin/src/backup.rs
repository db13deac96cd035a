//! `mailvault-admin backup`: the backup catalog, one backup's manifest,
//! taking one now and verifying one. Any node answers; a call about one
//! backup is passed on to the node that holds it.

use clap::Subcommand;
use mailvault_proto::v1::backups_client::BackupsClient;
use mailvault_proto::v1::{
    Backup, BackupManifest, Drill, DrillBackupRequest, ListBackupsRequest, ShipBackupRequest,
    ShowBackupRequest, TakeBackupRequest, VerifyBackupRequest,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::client::{backups, status_err};
use crate::op::RestoreMailboxArgs;
use crate::output::{rfc3339, size, table, Output};
use crate::progress::with_spinner;
use crate::restore::RestoreArgs;

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Lists the catalog, oldest first, and who holds the backup duty.
    List,
    /// Shows one backup and its authenticated manifest.
    Show {
        /// The backup's id (from `backup list`), or `latest`: the newest one still held.
        id: String,
    },
    /// Takes a backup now on the node holding the duty; answers once it is verified and recorded.
    Now,
    /// Ships a backup off-site now (the newest, or the one named), reads every object back, and
    /// drills its restore. Exits non-zero if the drill fails.
    ShipNow {
        /// The backup's id; omitted: the newest held by the node holding the duty.
        id: Option<String>,
    },
    /// Restores a backup's off-site copy into scratch and checks it whole (manifest, every object,
    /// state digest, audit chain, a sample of every tenant's mail decrypted). Exits non-zero if it
    /// fails.
    Drill {
        /// The backup's id; omitted: the newest shipped.
        id: Option<String>,
    },
    /// Verifies a backup where it is held: the manifest's authenticity and every file's checksum.
    /// Exits non-zero if it fails.
    Verify {
        /// The backup's id, or `latest`: the newest one still held.
        id: String,
    },
    /// Builds a new cluster from a backup, offline, on the new nodes' machines, as a two-person
    /// operation: `--plan-out PLAN --reason R` rehearses it (downloads the copy into scratch and
    /// checks it whole: manifest, every file, state digest, audit chain, every data key unwrapped
    /// by the configs' master key, a sample of every tenant's mail decrypted) and writes the plan,
    /// signed with this CLI's certificate; once a second operator signed it (`approve-restore`),
    /// `--plan PLAN` checks it all again and the signatures against the backup's policy, then
    /// writes each new node's data directory with the new cluster's membership. Refuses, writing
    /// nothing, if any check fails or a data directory is not empty. Needs no running node.
    Restore(RestoreArgs),
    /// Signs a cluster restore's plan as its second operator (offline): shows the plan, asks for
    /// its id to be typed, adds a signature made with this CLI's certificate key to the file.
    ApproveRestore(crate::restore::ApproveRestoreArgs),
    /// Proposes restoring one mailbox of a backup into the live cluster under a new name (a mailbox
    /// expunged or deleted by mistake): a two-person operation (`op propose restore-mailbox`). The
    /// node holding the backup verifies it and counts the mailbox's messages for the plan; once a
    /// second operator approved it, the leader has every message restored there, byte-exact, with
    /// its flags, keywords and internal date, in UID order (new UIDs). The new mailbox must not
    /// exist.
    RestoreMailbox {
        #[command(flatten)]
        target: RestoreMailboxArgs,
        /// Why (e.g. a ticket number); required.
        #[arg(long)]
        reason: String,
    },
}

fn backup_json(b: &Backup) -> serde_json::Value {
    json!({
        "id": b.id, "node": b.node, "taken": rfc3339(b.taken_at_ms), "taken_at_ms": b.taken_at_ms,
        "applied_index": b.applied_index, "applied_term": b.applied_term,
        "files": b.files, "bytes": b.bytes, "took_ms": b.took_ms,
        "local": b.local,
        "local_removed": (b.local_removed_at_ms > 0).then(|| rfc3339(b.local_removed_at_ms)),
        "shipped": b.shipped.as_ref().map(|c| json!({
            "target": c.target, "at": rfc3339(c.at_ms), "objects": c.objects, "bytes": c.bytes,
            "took_ms": c.took_ms, "removed": (c.removed_at_ms > 0).then(|| rfc3339(c.removed_at_ms))})),
        "drill": b.drill.as_ref().map(|d| json!({
            "node": d.node, "at": rfc3339(d.at_ms), "passed": d.passed, "problem": d.problem,
            "took_ms": d.took_ms})),
    })
}

fn manifest_json(m: &BackupManifest) -> serde_json::Value {
    json!({
        "cluster": m.cluster, "mailvault_version": m.mailvault_version, "data_version": m.data_version,
        "manifest_format": m.manifest_format,
        "members": m.members.iter().map(|x| json!({"id": x.id, "role": x.role, "voter": x.voter})).collect::<Vec<_>>(),
        "files": m.files.iter().map(|f| json!({"path": f.path, "bytes": f.bytes, "sha256": f.sha256})).collect::<Vec<_>>(),
        "state_digest": m.state_digest, "records": m.records,
        "audit_head": {"seq": m.audit_head_seq, "hash": m.audit_head_hash},
        "tenants": m.tenants.iter().map(|t| json!({"name": t.name, "key_versions": t.key_versions})).collect::<Vec<_>>(),
        "master_key_fingerprint": m.master_key_fingerprint,
    })
}

fn backup_text(b: &Backup) -> String {
    let mut lines = vec![
        format!("backup:        {}", b.id),
        format!("node:          {}", b.node),
        format!("taken:         {} ({} ms)", rfc3339(b.taken_at_ms), b.took_ms),
        format!(
            "log id:        index {}, term {}",
            b.applied_index, b.applied_term
        ),
        format!("size:          {} files, {}", b.files, size(b.bytes)),
        format!(
            "local copy:    {}",
            match b.local {
                true => "held".to_string(),
                false => format!("removed {}", rfc3339(b.local_removed_at_ms)),
            }
        ),
    ];
    lines.push(match &b.shipped {
        Some(c) => format!("shipped:       {} at {}", c.target, rfc3339(c.at_ms)),
        None => "shipped:       not yet".to_string(),
    });
    if let Some(d) = &b.drill {
        lines.push(format!(
            "drill:         {} at {} on node {}{}",
            if d.passed { "passed" } else { "FAILED" },
            rfc3339(d.at_ms),
            d.node,
            if d.problem.is_empty() {
                String::new()
            } else {
                format!(": {}", d.problem)
            }
        ));
    }
    lines.join("\n")
}

/// `latest` as the newest backup the catalog says is still held; any other
/// id as it is (the node checks it).
async fn resolve(c: &mut BackupsClient<Channel>, id: String) -> anyhow::Result<String> {
    if id != "latest" {
        return Ok(id);
    }
    let r = c
        .list_backups(ListBackupsRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    r.backups
        .into_iter()
        .rev()
        .find(|b| b.local)
        .map(|b| b.id)
        .ok_or_else(|| anyhow::anyhow!("no backup is held yet (take one with `backup now`)"))
}

/// A drill that failed (or did not run) as the exit status.
fn drill_outcome(id: &str, drill: Option<&Drill>) -> anyhow::Result<()> {
    match drill {
        Some(d) if d.passed => Ok(()),
        Some(d) => anyhow::bail!("the restore drill of backup {id} FAILED: {}", d.problem),
        None => anyhow::bail!("no restore drill of backup {id} was recorded"),
    }
}

pub async fn run(endpoint: &str, output: Output, cmd: BackupCmd) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Restore(args) => crate::restore::run(output, args).await,
        BackupCmd::ApproveRestore(args) => crate::restore::approve(output, args),
        cmd => online(endpoint, output, cmd).await,
    }
}

async fn online(endpoint: &str, output: Output, cmd: BackupCmd) -> anyhow::Result<()> {
    let mut c = backups(endpoint).await?;
    let cmd = match cmd {
        BackupCmd::Show { id } => BackupCmd::Show {
            id: resolve(&mut c, id).await?,
        },
        BackupCmd::Verify { id } => BackupCmd::Verify {
            id: resolve(&mut c, id).await?,
        },
        BackupCmd::RestoreMailbox { mut target, reason } => {
            target.backup = resolve(&mut c, target.backup).await?;
            let kind = mailvault_proto::v1::OperationKind {
                kind: Some(target.into_kind()),
            };
            let expiry = std::time::Duration::from_secs(3600);
            return crate::op::propose(endpoint, output, kind, reason, expiry).await;
        }
        BackupCmd::Drill { id: Some(id) } => BackupCmd::Drill {
            id: Some(resolve(&mut c, id).await?),
        },
        BackupCmd::ShipNow { id: Some(id) } => BackupCmd::ShipNow {
            id: Some(resolve(&mut c, id).await?),
        },
        other => other,
    };
    match cmd {
        BackupCmd::List => {
            let r = c
                .list_backups(ListBackupsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let doc = json!({
                "backups": r.backups.iter().map(backup_json).collect::<Vec<_>>(),
                "duty_node": r.duty_node, "standing_in": r.standing_in,
            });
            output.emit(doc, || {
                let rows = r.backups.iter().map(|b| {
                    [
                        b.id.clone(),
                        b.node.to_string(),
                        rfc3339(b.taken_at_ms),
                        b.applied_index.to_string(),
                        size(b.bytes),
                        if b.local { "held" } else { "removed" }.to_string(),
                        match &b.shipped {
                            Some(s) if s.removed_at_ms == 0 => "yes".to_string(),
                            Some(_) => "deleted".to_string(),
                            None => "-".to_string(),
                        },
                        match &b.drill {
                            Some(d) if d.passed => "passed".to_string(),
                            Some(_) => "FAILED".to_string(),
                            None => "-".to_string(),
                        },
                    ]
                });
                let header = [
                    "id",
                    "node",
                    "taken (UTC)",
                    "log index",
                    "size",
                    "local",
                    "shipped",
                    "drill",
                ];
                let duty = match (r.duty_node, r.standing_in) {
                    (0, _) => "no node holds the backup duty".to_string(),
                    (n, false) => format!("backup duty: node {n}"),
                    (n, true) => format!("backup duty: node {n}, standing in for the backup node"),
                };
                format!("{}\n{} backup(s); {duty}", table(header, rows), r.backups.len())
            });
            Ok(())
        }
        BackupCmd::Show { id } => {
            let r = c
                .show_backup(ShowBackupRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            let (b, m) = (r.backup.unwrap_or_default(), r.manifest.unwrap_or_default());
            output.emit(json!({"backup": backup_json(&b), "manifest": manifest_json(&m)}), || {
                let members: Vec<String> = m
                    .members
                    .iter()
                    .map(|x| format!("{} ({}{})", x.id, x.role, if x.voter { ", voter" } else { "" }))
                    .collect();
                let tenants: Vec<String> = m
                    .tenants
                    .iter()
                    .map(|t| format!("{} (key versions {:?})", t.name, t.key_versions))
                    .collect();
                let files = m.files.iter().map(|f| [f.path.clone(), f.bytes.to_string(), f.sha256.clone()]);
                format!(
                    "{}\ncluster:       {}\nversion:       mailvault {}, data version {}, manifest format {}\n\
                     members:       {}\nstate digest:  {} ({} records)\naudit head:    record {} ({})\n\
                     tenants:       {}\nmaster key:    fingerprint {}\n{}",
                    backup_text(&b),
                    m.cluster,
                    m.mailvault_version,
                    m.data_version,
                    m.manifest_format,
                    members.join(", "),
                    m.state_digest,
                    m.records,
                    m.audit_head_seq,
                    m.audit_head_hash,
                    if tenants.is_empty() { "-".to_string() } else { tenants.join(", ") },
                    m.master_key_fingerprint,
                    table(["file", "bytes", "sha256"], files),
                )
            });
            Ok(())
        }
        BackupCmd::Now => {
            let r = with_spinner(output, "taking a backup", c.take_backup(TakeBackupRequest {}))
                .await
                .map_err(status_err)?
                .into_inner();
            let b = r.backup.unwrap_or_default();
            output.emit(backup_json(&b), || {
                format!("backup taken and verified\n{}", backup_text(&b))
            });
            Ok(())
        }
        BackupCmd::ShipNow { id } => {
            let r = with_spinner(
                output,
                "shipping, reading back and drilling",
                c.ship_backup(ShipBackupRequest {
                    id: id.unwrap_or_default(),
                }),
            )
            .await
            .map_err(status_err)?
            .into_inner();
            let b = r.backup.unwrap_or_default();
            output.emit(backup_json(&b), || {
                format!("backup shipped and read back\n{}", backup_text(&b))
            });
            drill_outcome(&b.id, b.drill.as_ref())
        }
        BackupCmd::Drill { id } => {
            let r = with_spinner(
                output,
                "drilling a restore",
                c.drill_backup(DrillBackupRequest {
                    id: id.unwrap_or_default(),
                }),
            )
            .await
            .map_err(status_err)?
            .into_inner();
            let b = r.backup.unwrap_or_default();
            output.emit(backup_json(&b), || backup_text(&b));
            drill_outcome(&b.id, r.drill.as_ref())
        }
        BackupCmd::RestoreMailbox { .. } => unreachable!("proposed above"),
        BackupCmd::Restore(_) | BackupCmd::ApproveRestore(_) => {
            anyhow::bail!("backup restore runs offline, on the new nodes' machines")
        }
        BackupCmd::Verify { id } => {
            let r = c
                .verify_backup(VerifyBackupRequest { id: id.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let doc = json!({
                "id": id, "ok": r.ok, "problem": (!r.ok).then_some(&r.problem),
                "files_checked": r.files_checked, "bytes_checked": r.bytes_checked, "took_ms": r.took_ms,
            });
            output.emit(doc, || match r.ok {
                true => format!(
                    "backup {id} verified: manifest authentic, {} files ({}) match their checksums, in {} ms",
                    r.files_checked,
                    size(r.bytes_checked),
                    r.took_ms
                ),
                false => format!("backup {id} FAILED verification: {}", r.problem),
            });
            match r.ok {
                true => Ok(()),
                false => anyhow::bail!("backup {id} does not verify"),
            }
        }
    }
}
