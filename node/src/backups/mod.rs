//! Backups as the running node takes, records and expires them: the duty
//! (`duty.rs`, who takes them and when), the schedule (`schedule.rs`, the
//! worker that follows it and tidies the backup root), and [`Backups`], the
//! handle that takes one. A backup is taken and verified on disk
//! (`crate::store::backup`), then recorded in the replicated catalog
//! (`Command::Backups`); only a recorded backup counts, and one that cannot
//! be recorded is removed again. Older local backups than `backup.keep_local`
//! are removed after a newer one was recorded: first in the catalog, then on
//! disk, so no listed backup is ever missing without the catalog saying so.
//! The node holding the duty also ships its newest backup off-site
//! (`offsite.rs`, `ship.rs`) and drills its restore.

pub mod duty;
mod mailbox;
pub mod offsite;
pub mod restore;
pub mod restore_plan;
mod schedule;
mod ship;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailvault_proto::raft::RaftPayload;

pub use self::duty::{decide, Duty, DutyView};
pub use self::mailbox::{MailboxRestore, MailboxRestoreError, MailboxRestored};
pub use self::offsite::{Offsite, OffsiteError};
pub use self::schedule::run_schedule;
pub use self::ship::{summarize, OffsiteSummary, ShipError};
use crate::audit::AuditRecorder;
use crate::config::BackupConfig;
use crate::crypto::Keyring;
use crate::proposer::Proposer;
use crate::raft::{leader_peer, LeaderPeer, PeerClients};
use crate::state::audit::AuditEvent;
use crate::state::backup::{BackupChange, BackupEntry, BackupManifest, BackupRecord};
use crate::state::codec::{decode, encode};
use crate::state::command::{Command, CommandResult};
use crate::state::member::Role;
use crate::state::types::{NodeId, Raft};
use crate::store::backup::{self as disk, BackupError, Taker};
use crate::store::{MailReader, StateDb};

/// How long a catalog change may take to commit before it counts as failed.
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a backup was not taken (or not recorded). Names no content.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// Taking or verifying it on disk failed.
    #[error("{0}")]
    Disk(#[from] BackupError),
    /// It verified, but the catalog could not record it (it was removed).
    #[error("the backup could not be recorded in the catalog: {0}")]
    NotRecorded(String),
}

/// What this node knows of its own backup work, beyond the catalog.
#[derive(Debug, Clone, Default)]
pub struct LocalStatus {
    /// The duty as this node last decided it.
    pub duty: Option<Duty>,
    /// When this node takes its next backup, if it is its duty.
    pub next_due_ms: Option<i64>,
    /// The last failure: when, and why.
    pub last_failure: Option<(i64, String)>,
    /// The newest backup this node recorded (covers the catalog's lag here).
    pub last_recorded: Option<(NodeId, i64)>,
    /// The off-site side of the catalog, as last summarized.
    pub offsite: OffsiteSummary,
    /// When this node ships next, if it holds the duty and has one to ship.
    pub next_ship_ms: Option<i64>,
}

struct Inner {
    p: BackupsParts,
    /// One backup at a time on this node; held by whatever removes local
    /// backups too, and by a mailbox restore reading one.
    taking: tokio::sync::Mutex<()>,
    /// One ship or drill at a time (the drill scratch is one directory);
    /// apart from `taking`, so that backups go on while a ship retries.
    shipping: tokio::sync::Mutex<()>,
    /// The backup being shipped, which retention leaves alone.
    shipping_now: Mutex<Option<String>>,
    status: Mutex<LocalStatus>,
}

/// Takes, records and expires this node's backups.
#[derive(Clone)]
pub struct Backups {
    inner: Arc<Inner>,
}

/// What a node needs to take backups.
pub struct BackupsParts {
    /// This node.
    pub id: NodeId,
    /// The cluster's name, for manifests.
    pub cluster: String,
    /// `[backup]`.
    pub config: BackupConfig,
    /// Where this node keeps its backups.
    pub root: PathBuf,
    /// The live state database.
    pub state: StateDb,
    /// The master key's keys.
    pub keyring: Keyring,
    /// Raft.
    pub raft: Raft,
    /// Proposals here.
    pub proposer: Proposer,
    /// Proposals through the leader.
    pub peers: PeerClients,
    /// The audit log.
    pub audit: AuditRecorder,
    /// The catalog, as applied here.
    pub reader: MailReader,
    /// The off-site store.
    pub offsite: Offsite,
    /// The `pause-backup` test mode's file (`None` in production).
    pub pause_backup: Option<PathBuf>,
    /// The `pause-restore` test mode's file (`None` in production).
    pub pause_restore: Option<PathBuf>,
}

impl Backups {
    /// A handle over `parts`.
    pub fn new(parts: BackupsParts) -> Backups {
        Backups {
            inner: Arc::new(Inner {
                p: parts,
                taking: tokio::sync::Mutex::new(()),
                shipping: tokio::sync::Mutex::new(()),
                shipping_now: Mutex::default(),
                status: Mutex::default(),
            }),
        }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.inner.p.id
    }

    /// Where this node keeps its backups.
    pub fn root(&self) -> &std::path::Path {
        &self.inner.p.root
    }

    /// The off-site store.
    pub fn offsite(&self) -> &Offsite {
        &self.inner.p.offsite
    }

    /// `[backup]`.
    pub fn config(&self) -> &BackupConfig {
        &self.inner.p.config
    }

    /// What this node knows of its own backup work.
    pub fn local_status(&self) -> LocalStatus {
        self.inner.status.lock().expect("backup status").clone()
    }

    pub(crate) fn update_status(&self, f: impl FnOnce(&mut LocalStatus)) {
        f(&mut self.inner.status.lock().expect("backup status"))
    }

    /// The duty as of now, from the membership, the leader and the newest
    /// backup (the catalog's, or the last one recorded here if newer).
    pub fn duty_view(&self, since_ms: i64, now_ms: i64) -> DutyView {
        let m = self.inner.p.raft.metrics().borrow().clone();
        let backup_node = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(_, member)| member.role == Role::Backup)
            .map(|(id, _)| *id)
            .min();
        let catalog = self
            .inner
            .p
            .reader
            .newest_backup()
            .ok()
            .flatten()
            .map(|r| (r.entry.node, r.entry.taken_at_ms));
        let recorded = self.local_status().last_recorded;
        let newest = match (catalog, recorded) {
            (Some(a), Some(b)) => Some(if b.1 > a.1 { b } else { a }),
            (a, b) => a.or(b),
        };
        DutyView {
            me: self.inner.p.id,
            leader: m.current_leader,
            backup_node,
            newest,
            since_ms,
            interval_ms: (self.inner.p.config.interval_secs as i64).saturating_mul(1000),
            now_ms,
        }
    }

    /// The whole catalog as applied here, oldest first.
    pub fn catalog(&self) -> Vec<BackupRecord> {
        self.inner.p.reader.backups().unwrap_or_default()
    }

    /// The catalog's backups held on this node, oldest first.
    pub fn local_backups(&self) -> Vec<BackupRecord> {
        self.inner
            .p
            .reader
            .backups()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.entry.node == self.inner.p.id && r.is_local())
            .collect()
    }

    /// Reads and authenticates the manifest of a backup held here.
    pub async fn manifest(&self, id: &str) -> Result<BackupManifest, BackupError> {
        let (dir, keyring) = (self.inner.p.root.join(id), self.inner.p.keyring.clone());
        blocking(move || disk::read_manifest(&dir, &keyring)).await
    }

    /// Verifies a backup held here: its manifest and every file.
    pub async fn verify(&self, id: &str) -> Result<(BackupManifest, u64, Duration), BackupError> {
        let (dir, keyring) = (self.inner.p.root.join(id), self.inner.p.keyring.clone());
        let started = Instant::now();
        let m = blocking(move || disk::verify(&dir, &keyring)).await?;
        let bytes = m.files.iter().map(|f| f.bytes).sum();
        Ok((m, bytes, started.elapsed()))
    }

    /// Takes a backup now, verifies it, records it in the catalog and
    /// applies `keep_local`; `why` names the trigger for the audit log.
    pub async fn take(&self, why: &str) -> Result<BackupEntry, TakeError> {
        let _one = self.inner.taking.lock().await;
        let started = Instant::now();
        let result = self.take_and_record(started).await;
        let took = started.elapsed();
        match &result {
            Ok(entry) => {
                metrics::counter!("mailvault_backups_taken_total").increment(1);
                metrics::histogram!("mailvault_backup_duration_seconds").record(took.as_secs_f64());
                metrics::gauge!("mailvault_backup_bytes").set(entry.bytes as f64);
                metrics::gauge!("mailvault_backup_last_success_timestamp_seconds")
                    .set(entry.taken_at_ms as f64 / 1000.0);
                tracing::info!(
                    backup = %entry.id,
                    files = entry.files,
                    bytes = entry.bytes,
                    took_ms = entry.took_ms,
                    trigger = why,
                    "backup taken, verified and recorded"
                );
                self.update_status(|s| s.last_recorded = Some((entry.node, entry.taken_at_ms)));
                self.audit_event(
                    "backup-taken",
                    &entry.id,
                    &format!(
                        "taken ({why}): {} files, {} bytes, {} ms",
                        entry.files, entry.bytes, entry.took_ms
                    ),
                )
                .await;
                self.expire(&entry.id).await;
            }
            Err(e) => {
                let now = crate::clock::now_ms();
                metrics::counter!("mailvault_backup_failures_total").increment(1);
                metrics::gauge!("mailvault_backup_last_failure_timestamp_seconds").set(now as f64 / 1000.0);
                tracing::error!(error = %e, trigger = why, "backup failed");
                self.update_status(|s| s.last_failure = Some((now, e.to_string())));
                self.audit_event("backup-failed", "-", &format!("failed ({why}): {e}"))
                    .await;
            }
        }
        self.publish_local_count();
        result
    }

    async fn take_and_record(&self, started: Instant) -> Result<BackupEntry, TakeError> {
        let (state, keyring, root) = (
            self.inner.p.state.clone(),
            self.inner.p.keyring.clone(),
            self.inner.p.root.clone(),
        );
        let (cluster, node) = (self.inner.p.cluster.clone(), self.inner.p.id);
        let pause = self.inner.p.pause_backup.clone();
        let (manifest, dir) = blocking(move || {
            let (manifest, dir) = disk::take(
                &state,
                &keyring,
                &root,
                Taker {
                    cluster: &cluster,
                    node,
                    pause_while: pause.as_deref(),
                },
            )?;
            // A backup counts once it verified as a reader would check it.
            if let Err(e) = disk::verify(&dir, &keyring) {
                let _ = disk::remove(&root, &manifest.backup_id);
                return Err(e);
            }
            Ok((manifest, dir))
        })
        .await?;
        let entry = entry_of(&manifest, &dir, started.elapsed());
        if let Err(e) = self.record(BackupChange::Taken(entry.clone())).await {
            // Not recorded: it does not exist. Should the change have
            // committed after all, its local copy is marked removed too.
            let _ = disk::remove(&self.inner.p.root, &entry.id);
            let _ = self
                .record(BackupChange::LocalRemoved {
                    id: entry.id.clone(),
                    at_ms: crate::clock::now_ms(),
                })
                .await;
            return Err(TakeError::NotRecorded(e));
        }
        Ok(entry)
    }

    /// Removes this node's local backups beyond `keep_local`, oldest first,
    /// but none newer than the newest verified off-site copy (while shipping
    /// fails, every backup since is kept): each is marked removed in the
    /// catalog before its directory goes.
    async fn expire(&self, newest: &str) {
        let catalog = self.catalog();
        let shipped = catalog
            .iter()
            .filter(|r| r.is_offsite())
            .map(|r| r.entry.id.clone())
            .max();
        let mut ids: Vec<String> = catalog
            .into_iter()
            .filter(|r| r.entry.node == self.inner.p.id && r.is_local())
            .map(|r| r.entry.id)
            .collect();
        if !ids.iter().any(|i| i == newest) {
            ids.push(newest.to_string());
        }
        ids.sort();
        let excess = ids.len().saturating_sub(self.inner.p.config.keep_local);
        let in_flight = self.shipping_now();
        let expired = ids
            .into_iter()
            .take(excess)
            .filter(|id| shipped.as_ref().is_some_and(|s| id <= s))
            .filter(|id| in_flight.as_ref() != Some(id));
        for id in expired {
            self.remove_local(&id, "keep_local").await;
        }
    }

    /// Applies `keep_local` again (after a ship made older backups
    /// removable).
    pub(crate) async fn expire_local(&self) {
        if let Some(newest) = self.local_backups().pop() {
            self.expire(&newest.entry.id).await;
        }
    }

    /// Removes one local backup: catalog first, then disk.
    pub(crate) async fn remove_local(&self, id: &str, why: &str) {
        let change = BackupChange::LocalRemoved {
            id: id.to_string(),
            at_ms: crate::clock::now_ms(),
        };
        if let Err(e) = self.record(change).await {
            tracing::warn!(backup = id, error = %e, "could not mark an expired backup removed; kept for now");
            return;
        }
        match disk::remove(&self.inner.p.root, id) {
            Ok(()) => {
                metrics::counter!("mailvault_backups_expired_total").increment(1);
                tracing::info!(backup = id, why, "local backup removed");
                self.audit_event("backup-expired", id, &format!("removed ({why})"))
                    .await;
            }
            Err(e) => {
                tracing::warn!(backup = id, error = %e, "removing an expired backup failed; retried at the next start")
            }
        }
    }

    /// Proposes a catalog change: here when this node leads, else through the
    /// leader's peer service.
    pub(crate) async fn record(&self, change: BackupChange) -> Result<(), String> {
        let proposed = async {
            match leader_peer(&self.inner.p.raft, &self.inner.p.peers)? {
                LeaderPeer::Here => self
                    .inner
                    .p
                    .proposer
                    .propose(Command::Backups(change))
                    .await
                    .map_err(|e| e.to_string()),
                LeaderPeer::There(mut c) => {
                    let mut req = tonic::Request::new(RaftPayload {
                        data: encode(&change),
                    });
                    req.set_timeout(RECORD_TIMEOUT);
                    let reply = c.propose_backup(req).await.map_err(|s| s.message().to_string())?;
                    decode::<CommandResult>(&reply.into_inner().data)
                        .map_err(|_| "the leader's answer does not decode".to_string())
                }
            }
        };
        match tokio::time::timeout(RECORD_TIMEOUT, proposed).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(CommandResult::Refused(r))) => Err(r.to_string()),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Records a node event about backups in the audit log (`node:<id>`).
    pub async fn audit_event(&self, action: &str, target: &str, result: &str) {
        let event = AuditEvent::new(&format!("node:{}", self.inner.p.id), None, action, target, result);
        if let Err(e) = self.inner.p.audit.record(event).await {
            tracing::warn!(error = %e.message(), action, "a backup audit record was not committed");
        }
    }

    pub(crate) fn publish_local_count(&self) {
        metrics::gauge!("mailvault_backups_local").set(self.local_backups().len() as f64);
    }
}

/// The catalog entry of a backup that verified in `dir`.
fn entry_of(manifest: &BackupManifest, dir: &std::path::Path, took: Duration) -> BackupEntry {
    let manifest_bytes = std::fs::metadata(dir.join(disk::MANIFEST))
        .map(|m| m.len())
        .unwrap_or(0);
    BackupEntry {
        id: manifest.backup_id.clone(),
        node: manifest.taken_by,
        taken_at_ms: manifest.time_ms,
        applied_index: manifest.applied_index,
        applied_term: manifest.applied_term,
        files: manifest.files.len() as u32 + 1,
        bytes: manifest.files.iter().map(|f| f.bytes).sum::<u64>() + manifest_bytes,
        took_ms: took.as_millis() as u64,
    }
}

/// Runs blocking disk work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(BackupError::Io(std::io::Error::other(e.to_string()))))
}
