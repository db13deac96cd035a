//! `mailvault-admin backup restore`: a new cluster from a backup, local or
//! off-site, as a two-person operation whose plan is a file
//! (`restore_plan.rs`): [`rehearse_cluster_restore`] makes the plan, writing
//! nothing; [`restore_cluster`] runs a plan two operators signed. Everything
//! is checked before anything is written: the new
//! nodes' configs (one cluster, one master key, a config for every voter,
//! empty data directories), then the copy, downloaded into scratch — its
//! manifest's authenticity, every file's size and checksum, the data opened
//! with its keys put back, the state digest and audit head against the
//! manifest, every data key unwrapped by the master key given, a sample of
//! every tenant's mail decrypted (`store::drill`), and for a restore the
//! plan's signatures against the backup's own policy. Only then is the new
//! state prepared and each node's data directory written
//! (`store::restore`).
//!
//! A local backup root has the layout of an off-site store
//! (`<root>/<id>/…`), so `file:///var/lib/mailvault/data/backups` restores
//! a backup the backup node still holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::offsite::{Offsite, OffsiteError, Progress};
use super::restore_plan::{json_sha256, new_plan_id, PlanNode, RestorePlan, SignedPlan, PLAN_FORMAT};
use crate::config::Config;
use crate::crypto::{Keyring, MasterKey};
use crate::state::audit::AuditEvent;
use crate::state::backup::{BackupKeyring, BackupManifest};
use crate::state::ops::size_text;
use crate::state::policy::ClusterRole;
use crate::state::types::NodeId;
use crate::store::backup::KEYRING;
use crate::store::drill::{check_restorable, DrillReport};
use crate::store::restore::{
    check_target, check_unwraps, open_copy, prepare, write_node, NewCluster, Prepared, RestoreError,
};
use crate::store::MailReader;

/// Why a cluster restore was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterRestoreError {
    /// The configs given do not describe one new cluster.
    #[error("{0}")]
    Configs(String),
    /// The off-site store failed, or the copy there is not whole.
    #[error("{0}")]
    Offsite(#[from] OffsiteError),
    /// The copy does not restore, or writing a node failed.
    #[error("{0}")]
    Restore(#[from] RestoreError),
    /// The plan is not for this restore, or two operators did not approve
    /// it.
    #[error("{0}")]
    Plan(String),
}

/// What to restore, and where.
pub struct ClusterRestore {
    /// The store holding the backup: `file:///…` (an off-site directory or
    /// a node's backup root) or `s3://bucket/prefix` (with the first
    /// config's `[backup.s3]` settings).
    pub from: String,
    /// The backup's id, or `latest` (the newest copy there).
    pub backup: String,
    /// The new cluster's node configs, one per node to write.
    pub nodes: Vec<Config>,
    /// Where the copy is downloaded and checked (removed afterwards).
    pub scratch: PathBuf,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The backup's manifest.
    pub manifest: BackupManifest,
    /// The checks of the copy (its digest equalled the manifest's).
    pub checks: DrillReport,
    /// The new cluster's starting state.
    pub prepared: Prepared,
    /// Each node written, its data directory and the bytes copied there.
    pub nodes: Vec<(NodeId, PathBuf, u64)>,
    /// Who signed the plan, the proposer first.
    pub signers: Vec<String>,
    /// Bytes downloaded.
    pub downloaded: u64,
    /// How long it all took.
    pub took_ms: u64,
}

/// What the backup holds, counted for the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Tenants.
    pub tenants: usize,
    /// Mailboxes.
    pub mailboxes: u64,
    /// Messages.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What a rehearsal found.
#[derive(Debug, Clone)]
pub struct Rehearsal {
    /// The plan (its proposer is filled in when it is signed).
    pub plan: RestorePlan,
    /// The checks of the copy.
    pub checks: DrillReport,
    /// What the backup holds.
    pub census: Census,
    /// Bytes downloaded.
    pub downloaded: u64,
    /// How long it took.
    pub took_ms: u64,
}

/// Checks the new nodes' configs; returns the cluster they describe and
/// the master key they share.
fn new_cluster(nodes: &[Config]) -> Result<(NewCluster, Keyring), ClusterRestoreError> {
    let bad = |m: String| ClusterRestoreError::Configs(m);
    let first = nodes
        .first()
        .ok_or_else(|| bad("no node config given (--config NODE.toml, once per node)".into()))?;
    let key = |c: &Config| {
        MasterKey::load(&c.master_key_file)
            .map(|k| Keyring::new(&k))
            .map_err(|e| bad(format!("node {}: {e}", c.node_id)))
    };
    let keyring = key(first)?;
    let mut ids = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for c in nodes {
        if c.cluster_name != first.cluster_name || c.members != first.members {
            return Err(bad(format!(
                "node {}'s config describes another cluster than node {}'s (cluster_name or [members] differ)",
                c.node_id, first.node_id
            )));
        }
        if !c.members.contains_key(&c.node_id) {
            return Err(bad(format!(
                "node {} is not among its config's [members]",
                c.node_id
            )));
        }
        if !ids.insert(c.node_id) {
            return Err(bad(format!("node {} is given twice", c.node_id)));
        }
        if !dirs.insert(c.data_dir.clone()) {
            return Err(bad(format!(
                "two nodes share data directory {}",
                c.data_dir.display()
            )));
        }
        if key(c)?.backups().fingerprint() != keyring.backups().fingerprint() {
            return Err(bad(format!(
                "node {}'s master key is not node {}'s: a cluster has one master key",
                c.node_id, first.node_id
            )));
        }
    }
    let members: BTreeMap<_, _> = first.members.iter().map(|(id, m)| (*id, m.into())).collect();
    let voters: BTreeSet<NodeId> = first
        .members
        .iter()
        .filter(|(_, m)| m.role.is_voter())
        .map(|(id, _)| *id)
        .collect();
    if let Some(missing) = voters.iter().find(|v| !ids.contains(v)) {
        return Err(bad(format!(
            "voter {missing} of the new cluster has no config here: every voter's data directory is written by the restore (spares and DR copies join later)"
        )));
    }
    if let Some(extra) = ids.iter().find(|i| !voters.contains(i)) {
        return Err(bad(format!(
            "node {extra} is not a voter of the new cluster: only voters are restored (spares and DR copies join later)"
        )));
    }
    Ok((NewCluster { members, voters }, keyring))
}

/// The new cluster's members as a plan names them.
fn plan_nodes(nodes: &[Config]) -> Vec<PlanNode> {
    let first = &nodes[0];
    first
        .members
        .iter()
        .map(|(id, m)| PlanNode {
            id: *id,
            role: m.role.as_str().to_string(),
            voter: m.role.is_voter(),
            client_addr: m.client_addr.clone(),
            raft_addr: m.raft_addr.clone(),
            data_dir: nodes
                .iter()
                .find(|c| c.node_id == *id)
                .map(|c| c.data_dir.display().to_string())
                .unwrap_or_default(),
        })
        .collect()
}

/// A restore's configs checked, its store opened and its backup named.
struct Job {
    cluster: NewCluster,
    keyring: Keyring,
    store: Offsite,
    id: String,
}

async fn open_job(r: &ClusterRestore) -> Result<Job, ClusterRestoreError> {
    let (cluster, keyring) = new_cluster(&r.nodes)?;
    for c in &r.nodes {
        check_target(c.node_id, &c.data_dir)?;
        if r.scratch.starts_with(&c.data_dir) {
            return Err(ClusterRestoreError::Configs(format!(
                "the scratch directory {} is inside node {}'s data directory",
                r.scratch.display(),
                c.node_id
            )));
        }
    }
    let store = Offsite::open(&r.from, &r.nodes[0].backup)?;
    let id = match r.backup.as_str() {
        "latest" => store
            .ids()
            .await?
            .into_iter()
            .max()
            .ok_or_else(|| ClusterRestoreError::Configs(format!("{} holds no backup", store.url())))?,
        id => id.to_string(),
    };
    if !crate::store::backup::is_backup_id(&id) {
        return Err(ClusterRestoreError::Configs(format!(
            "{id:?} is not a backup id (YYYYMMDDTHHMMSSZ-NNNNNNNNNNNN) or `latest`"
        )));
    }
    Ok(Job {
        cluster,
        keyring,
        store,
        id,
    })
}

/// Runs `work` on the copy downloaded into scratch, which is removed
/// before and after.
async fn in_scratch<T>(
    r: &ClusterRestore,
    work: impl std::future::Future<Output = Result<T, ClusterRestoreError>>,
) -> Result<T, ClusterRestoreError> {
    let _ = std::fs::remove_dir_all(&r.scratch);
    let out = work.await;
    let _ = std::fs::remove_dir_all(&r.scratch);
    out
}

/// Downloads the copy into `into` and checks it as a drill does, and that
/// the master key unwraps every data key of its keyring object.
async fn verified_copy(
    job: &Job,
    into: &Path,
    progress: &dyn Progress,
) -> Result<(BackupManifest, DrillReport), ClusterRestoreError> {
    let manifest = job
        .store
        .download_with(&job.id, &job.keyring, into, progress)
        .await?;
    let (dir, ring_keys) = (into.to_path_buf(), job.keyring.clone());
    let checks = blocking(move || -> Result<DrillReport, RestoreError> {
        let checks = check_restorable(&dir, &ring_keys)?;
        // The keyring object verified with the rest: the master key must
        // unwrap every data key in it, or nothing is written.
        let ring: BackupKeyring =
            serde_json::from_slice(&std::fs::read(dir.join(KEYRING))?).map_err(std::io::Error::other)?;
        check_unwraps(&ring, &ring_keys)?;
        Ok(checks)
    })
    .await?;
    if checks.manifest != manifest {
        return Err(ClusterRestoreError::Configs(
            "the copy's manifest changed while it was downloaded: retry".into(),
        ));
    }
    Ok((manifest, checks))
}

/// What the copy holds, and who may sign its restore: the operators of its
/// policy and the configs' bootstrap operators, none revoked there.
fn census(
    data: &Path,
    keyring: &Keyring,
    manifest: &BackupManifest,
    bootstrap: &[String],
) -> Result<(Census, Vec<String>), RestoreError> {
    let reader = open_copy(data, keyring)?;
    let unreadable = |_| RestoreError::Cluster("the copy's state cannot be read".into());
    let mut c = Census {
        tenants: manifest.tenants.len(),
        ..Census::default()
    };
    for t in &manifest.tenants {
        for (_, m) in reader.mailboxes(&t.name).map_err(unreadable)? {
            c.mailboxes += 1;
            c.messages += m.messages;
            c.bytes += m.total_bytes;
        }
    }
    let policies = reader.identity_policies().map_err(unreadable)?;
    let mut approvers: BTreeSet<String> = policies
        .iter()
        .filter(|(_, p)| !p.revoked && p.cluster_roles.contains(&ClusterRole::Operator))
        .map(|(i, _)| i.clone())
        .collect();
    for b in bootstrap {
        if !policies.iter().any(|(i, p)| i == b && p.revoked) {
            approvers.insert(b.clone());
        }
    }
    Ok((c, approvers.into_iter().collect()))
}

/// Rehearses a restore: every check a restore makes, on the configs and on
/// the copy downloaded into scratch, and the plan; writes no data
/// directory. The plan expires `expires_in_ms` from now.
pub async fn rehearse_cluster_restore(
    r: &ClusterRestore,
    reason: &str,
    expires_in_ms: i64,
    progress: &dyn Progress,
) -> Result<Rehearsal, ClusterRestoreError> {
    let started = Instant::now();
    let job = open_job(r).await?;
    let into = r.scratch.join(&job.id);
    let (manifest, checks, census, approvers) = in_scratch(r, async {
        let (manifest, checks) = verified_copy(&job, &into, progress).await?;
        let (data, keys, m, ops) = (
            into.join(crate::store::backup::DATA),
            job.keyring.clone(),
            manifest.clone(),
            r.nodes[0].access.operators.clone(),
        );
        let (census, approvers) = blocking(move || census(&data, &keys, &m, &ops)).await?;
        Ok((manifest, checks, census, approvers))
    })
    .await?;
    let now = crate::clock::now_ms();
    let nodes = plan_nodes(&r.nodes);
    let written: Vec<PlanNode> = nodes.iter().filter(|n| n.voter).cloned().collect();
    let voters = written
        .iter()
        .map(|n| n.id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    let mut steps = vec![
        format!(
            "download backup {} from {} into scratch ({} files, {}) and check it as the rehearsal did",
            job.id,
            job.store.url(),
            manifest.files.len(),
            size_text(bytes)
        ),
        "check this plan: unchanged, unexpired, signed by two operators of the backup's policy \
         (different identities and keys, certificates of the configs' CA, not revoked)"
            .to_string(),
        format!(
            "prepare the new cluster's state: membership {}, the old catalog dropped, a backup-restore \
             audit record naming this plan and its signers",
            voters
        ),
    ];
    for n in &written {
        steps.push(format!(
            "write node {}'s data directory {} (beside it, renamed in)",
            n.id, n.data_dir
        ));
    }
    let plan = RestorePlan {
        format: PLAN_FORMAT,
        id: new_plan_id().map_err(ClusterRestoreError::Plan)?,
        reason: reason.to_string(),
        proposer: String::new(),
        created_ms: now,
        expires_ms: now + expires_in_ms,
        from: job.store.url().to_string(),
        backup: job.id.clone(),
        manifest_sha256: json_sha256(&manifest),
        source_cluster: manifest.cluster.clone(),
        applied_index: manifest.applied_index,
        taken: manifest.time.clone(),
        cluster_name: r.nodes[0].cluster_name.clone(),
        master_key_fingerprint: job.keyring.backups().fingerprint().to_string(),
        nodes,
        steps,
        effect: vec![
            format!(
                "a new cluster {} of voters {} starts from backup {} of cluster {} (taken {}, log index {}): \
                 {} tenants, {} mailboxes, {} messages ({})",
                r.nodes[0].cluster_name,
                voters,
                job.id,
                manifest.cluster,
                manifest.time,
                manifest.applied_index,
                census.tenants,
                census.mailboxes,
                census.messages,
                size_text(census.bytes)
            ),
            "UIDs, MODSEQs, flags, claims and idempotency keys are the backup's; writes after it were \
             not in it and are not restored"
                .to_string(),
            "no running cluster is changed: only empty data directories are written".to_string(),
        ],
        checks: vec![
            format!(
                "the configs describe one cluster with one master key (fingerprint {}), a config for \
                 every voter, and every data directory is empty",
                job.keyring.backups().fingerprint()
            ),
            format!(
                "backup {}: manifest authentic, {} files match their checksums, state digest {} recomputed, \
                 {} audit records verified, every data key unwrapped, {} messages decrypted",
                job.id, checks.files, checks.state_digest, checks.audit_records, checks.messages_decrypted
            ),
            format!(
                "may sign (operators of the backup's policy and the configs' [access] operators): {}",
                approvers.join(", ")
            ),
        ],
        approvers,
    };
    Ok(Rehearsal {
        plan,
        checks,
        census,
        downloaded: bytes,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// Whether `plan` is the plan of this restore: the same backup, store, new
/// cluster and master key (checked before anything is downloaded).
fn plan_fits(r: &ClusterRestore, job: &Job, plan: &RestorePlan) -> Result<(), ClusterRestoreError> {
    let differs = |what: &str, planned: &str, given: &str| {
        Err(ClusterRestoreError::Plan(format!(
            "plan {} restores {what} {planned}, not {given}: rehearse this restore and have it signed",
            plan.id
        )))
    };
    if plan.backup != job.id {
        return differs("backup", &plan.backup, &job.id);
    }
    if plan.from != job.store.url() {
        return differs("from", &plan.from, job.store.url());
    }
    if plan.cluster_name != r.nodes[0].cluster_name {
        return differs("into cluster", &plan.cluster_name, &r.nodes[0].cluster_name);
    }
    if plan.master_key_fingerprint != job.keyring.backups().fingerprint() {
        return differs(
            "with the master key of fingerprint",
            &plan.master_key_fingerprint,
            job.keyring.backups().fingerprint(),
        );
    }
    if plan.nodes != plan_nodes(&r.nodes) {
        return Err(ClusterRestoreError::Plan(format!(
            "plan {} names other nodes, addresses or data directories than these configs: rehearse this \
             restore and have it signed",
            plan.id
        )));
    }
    Ok(())
}

/// Restores along a signed plan; see the module's documentation.
pub async fn restore_cluster(
    r: &ClusterRestore,
    signed: &SignedPlan,
    progress: &dyn Progress,
) -> Result<RestoreReport, ClusterRestoreError> {
    let started = Instant::now();
    let job = open_job(r).await?;
    plan_fits(r, &job, &signed.plan)?;
    // Expired or changed: refused before the download.
    if signed.plan.hash() != signed.plan_hash || crate::clock::now_ms() > signed.plan.expires_ms {
        signed
            .check(crate::clock::now_ms(), &r.nodes[0].tls, |_, _| Ok(()))
            .map_err(ClusterRestoreError::Plan)?;
    }
    let into = r.scratch.join(&job.id);
    let (manifest, checks, prepared, nodes, signers) = in_scratch(r, async {
        let (manifest, checks) = verified_copy(&job, &into, progress).await?;
        if json_sha256(&manifest) != signed.plan.manifest_sha256 {
            return Err(ClusterRestoreError::Plan(format!(
                "backup {} at {} is not the copy plan {} was rehearsed on (its manifest differs)",
                job.id, signed.plan.from, signed.plan.id
            )));
        }
        let data = into.join(crate::store::backup::DATA);
        let (d, k, s, tls, bootstrap) = (
            data.clone(),
            job.keyring.clone(),
            signed.clone(),
            r.nodes[0].tls.clone(),
            r.nodes[0].access.operators.clone(),
        );
        let signers = blocking(move || {
            let reader = open_copy(&d, &k)?;
            Ok(s.check(crate::clock::now_ms(), &tls, |identity, serial| {
                may_sign(&reader, &bootstrap, identity, serial)
            }))
        })
        .await?
        .map_err(ClusterRestoreError::Plan)?;
        let p = &signed.plan;
        let event = AuditEvent {
            node: 0,
            ..AuditEvent::new(
                &p.proposer,
                None,
                "backup-restore",
                &job.id,
                &format!(
                    "a new cluster restored from backup {} of cluster {} (log index {}, {} files, {} bytes, state \
                     digest and audit head verified, {} messages decrypted), voters {:?}; two-person plan {} \
                     (hash {}) proposed by {}, approved by {}; reason: {}",
                    job.id,
                    manifest.cluster,
                    manifest.applied_index,
                    manifest.files.len(),
                    manifest.files.iter().map(|f| f.bytes).sum::<u64>(),
                    checks.messages_decrypted,
                    job.cluster.voters,
                    p.id,
                    signed.plan_hash,
                    signers[0],
                    signers[1..].join(", "),
                    p.reason
                ),
            )
        };
        let (d, k, cluster) = (data.clone(), job.keyring.clone(), job.cluster.clone());
        let prepared = blocking(move || prepare(&d, &k, &cluster, event)).await?;
        let mut nodes = Vec::new();
        for c in &r.nodes {
            progress.begin(&format!("node {}", c.node_id), 0);
            let (d, p, node, dir) = (data.clone(), prepared.clone(), c.node_id, c.data_dir.clone());
            let bytes = blocking(move || write_node(&d, &p, node, &dir)).await?;
            progress.end();
            nodes.push((c.node_id, c.data_dir.clone(), bytes));
        }
        Ok((manifest, checks, prepared, nodes, signers))
    })
    .await?;
    let downloaded = manifest.files.iter().map(|f| f.bytes).sum();
    Ok(RestoreReport {
        manifest,
        checks,
        prepared,
        nodes,
        signers,
        downloaded,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// Whether `identity` (certificate `serial`) may sign a restore of the copy
/// `reader` reads: an operator there or among the configs' bootstrap
/// operators, and neither it nor the certificate revoked there.
fn may_sign(reader: &MailReader, bootstrap: &[String], identity: &str, serial: &str) -> Result<(), String> {
    let unreadable = |_| "the backup's policy cannot be read".to_string();
    let policy = reader.identity_policy(identity).map_err(unreadable)?;
    if policy.as_ref().is_some_and(|p| p.revoked) {
        return Err(format!("{identity} is revoked in the backup's policy"));
    }
    if reader.serial_revoked(serial).map_err(unreadable)? {
        return Err(format!(
            "the certificate {serial} is revoked in the backup's policy"
        ));
    }
    let operator = policy.is_some_and(|p| p.cluster_roles.contains(&ClusterRole::Operator));
    if !operator && !bootstrap.iter().any(|b| b == identity) {
        return Err(format!(
            "{identity} is no operator in the backup's policy nor among the configs' [access] operators"
        ));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RestoreError> + Send + 'static,
) -> Result<T, RestoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RestoreError::Io(std::io::Error::other(e.to_string())))?
}
