//! `mailvault-admin backup restore`: a new cluster from a backup, local or
//! off-site. Everything is checked before anything is written: the new
//! nodes' configs (one cluster, one master key, a config for every voter,
//! empty data directories), then the copy, downloaded into scratch — its
//! manifest's authenticity, every file's size and checksum, the data opened
//! with its keys put back, the state digest and audit head against the
//! manifest, every data key unwrapped by the master key given, a sample of
//! every tenant's mail decrypted (`store::drill`). Only then is the new
//! state prepared and each node's data directory written
//! (`store::restore`).
//!
//! A local backup root has the layout of an off-site store
//! (`<root>/<id>/…`), so `file:///var/lib/mailvault/data/backups` restores
//! a backup the backup node still holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use super::offsite::{Offsite, OffsiteError, Progress};
use crate::config::Config;
use crate::crypto::{Keyring, MasterKey};
use crate::state::audit::AuditEvent;
use crate::state::backup::{BackupKeyring, BackupManifest};
use crate::state::types::NodeId;
use crate::store::backup::KEYRING;
use crate::store::drill::{check_restorable, DrillReport};
use crate::store::restore::{
    check_target, check_unwraps, prepare, write_node, NewCluster, Prepared, RestoreError,
};

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
    /// Who restores (for the audit record).
    pub operator: String,
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
    /// Bytes downloaded.
    pub downloaded: u64,
    /// How long it all took.
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

/// Restores; see the module's documentation.
pub async fn restore_cluster(
    r: &ClusterRestore,
    progress: &dyn Progress,
) -> Result<RestoreReport, ClusterRestoreError> {
    let started = Instant::now();
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
    let _ = std::fs::remove_dir_all(&r.scratch);
    let into = r.scratch.join(&id);
    let outcome = restore_from_scratch(r, &store, &id, &into, cluster, keyring, progress).await;
    let _ = std::fs::remove_dir_all(&r.scratch);
    let (manifest, checks, prepared, nodes) = outcome?;
    let downloaded = manifest.files.iter().map(|f| f.bytes).sum();
    Ok(RestoreReport {
        manifest,
        checks,
        prepared,
        nodes,
        downloaded,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

type Restored = (BackupManifest, DrillReport, Prepared, Vec<(NodeId, PathBuf, u64)>);

async fn restore_from_scratch(
    r: &ClusterRestore,
    store: &Offsite,
    id: &str,
    into: &std::path::Path,
    cluster: NewCluster,
    keyring: Keyring,
    progress: &dyn Progress,
) -> Result<Restored, ClusterRestoreError> {
    let manifest = store.download_with(id, &keyring, into, progress).await?;
    let (dir, ring_keys) = (into.to_path_buf(), keyring.clone());
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
    let data = into.join(crate::store::backup::DATA);
    let event = AuditEvent {
        node: 0,
        ..AuditEvent::new(
            &r.operator,
            None,
            "backup-restore",
            id,
            &format!(
                "a new cluster restored from backup {id} of cluster {} (log index {}, {} files, {} bytes, state digest and audit head verified, {} messages decrypted), voters {:?}",
                manifest.cluster,
                manifest.applied_index,
                manifest.files.len(),
                manifest.files.iter().map(|f| f.bytes).sum::<u64>(),
                checks.messages_decrypted,
                cluster.voters
            ),
        )
    };
    let (d, k) = (data.clone(), keyring.clone());
    let prepared = blocking(move || prepare(&d, &k, &cluster, event)).await?;
    let mut nodes = Vec::new();
    for c in &r.nodes {
        progress.begin(&format!("node {}", c.node_id), 0);
        let (d, p, node, dir) = (data.clone(), prepared.clone(), c.node_id, c.data_dir.clone());
        let bytes = blocking(move || write_node(&d, &p, node, &dir)).await?;
        progress.end();
        nodes.push((c.node_id, c.data_dir.clone(), bytes));
    }
    Ok((manifest, checks, prepared, nodes))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RestoreError> + Send + 'static,
) -> Result<T, RestoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RestoreError::Io(std::io::Error::other(e.to_string())))?
}
