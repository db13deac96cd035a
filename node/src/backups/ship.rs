//! Shipping a backup off-site and drilling its restore. A ship verifies the
//! local backup, uploads it (resuming what a ship cut short left there),
//! reads every object back against the copy's own authenticated manifest,
//! and only then records `BackupChange::Shipped`: no partial copy is ever
//! listed as shipped. A drill downloads the copy into scratch and runs
//! [`crate::store::drill::check_restorable`] there; its result is recorded
//! (`BackupChange::Drilled`) whether it passed or not. After a passed drill,
//! `keep_offsite` deletes the oldest copies: each is marked removed in the
//! catalog before its objects go.

use std::time::Instant;

use super::offsite::OffsiteError;
use super::{blocking, Backups};
use crate::clock::now_ms;
use crate::state::backup::{BackupChange, BackupRecord, DrillResult, ShippedCopy};
use crate::state::NodeId;
use crate::store::backup::{self as disk, BackupError};
use crate::store::drill::check_restorable;

/// Why a ship or a drill did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The local backup is not held here, or does not verify.
    #[error("{0}")]
    Local(#[from] BackupError),
    /// The off-site store failed, or the copy there is damaged.
    #[error("{0}")]
    Offsite(#[from] OffsiteError),
    /// The catalog could not record it.
    #[error("the catalog could not record it: {0}")]
    NotRecorded(String),
}

/// The scratch directory of drills, under the backup root (not a backup).
pub const DRILLS: &str = "drills";

/// The off-site side of the catalog, as every node can tell it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsiteSummary {
    /// The newest verified off-site copy: its backup, and when it verified.
    pub last_shipped: Option<(String, i64)>,
    /// The newest copy whose last drill passed: its backup, and when that
    /// backup was taken (the point a restore can reach).
    pub restorable: Option<(String, i64)>,
    /// The last drill of any copy.
    pub last_drill: Option<(String, DrillResult)>,
    /// No verified off-site copy newer than `max_offsite_age` (and backups
    /// older than that exist): an alert condition.
    pub stale: bool,
    /// This node's newest held backup, if it is newer than every shipped one.
    pub to_ship: Option<String>,
}

/// Summarizes the catalog for node `me` at `now`.
pub fn summarize(catalog: &[BackupRecord], me: NodeId, now: i64, max_age_ms: i64) -> OffsiteSummary {
    let shipped = catalog
        .iter()
        .filter(|r| r.is_offsite())
        .filter_map(|r| r.shipped.as_ref().map(|c| (r.entry.id.clone(), c.at_ms)))
        .max_by_key(|(_, at)| *at);
    let restorable = catalog
        .iter()
        .filter(|r| r.is_offsite() && r.drill.as_ref().is_some_and(|d| d.passed))
        .map(|r| (r.entry.id.clone(), r.entry.taken_at_ms))
        .max_by_key(|(_, at)| *at);
    let last_drill = catalog
        .iter()
        .filter_map(|r| r.drill.clone().map(|d| (r.entry.id.clone(), d)))
        .max_by_key(|(_, d)| d.at_ms);
    let stale = match &shipped {
        Some((_, at)) => now - at > max_age_ms,
        None => catalog
            .first()
            .is_some_and(|r| now - r.entry.taken_at_ms > max_age_ms),
    };
    let newest_shipped_id = catalog
        .iter()
        .filter(|r| r.shipped.is_some())
        .map(|r| r.entry.id.as_str())
        .max();
    let to_ship = catalog
        .iter()
        .filter(|r| r.entry.node == me && r.is_local())
        .map(|r| r.entry.id.clone())
        .max()
        .filter(|id| newest_shipped_id.is_none_or(|s| id.as_str() > s));
    OffsiteSummary {
        last_shipped: shipped,
        restorable,
        last_drill,
        stale,
        to_ship,
    }
}

/// Publishes the summary as gauges (every node: any one's `/metrics` tells).
pub fn publish(s: &OffsiteSummary) {
    let secs = |ms: i64| ms as f64 / 1000.0;
    if let Some((_, at)) = &s.last_shipped {
        metrics::gauge!("mailvault_backup_last_shipped_timestamp_seconds").set(secs(*at));
    }
    // 0 when no copy is known to restore (its last drill failed, or none ran).
    let restorable = s.restorable.as_ref().map_or(0.0, |(_, at)| secs(*at));
    metrics::gauge!("mailvault_backup_last_restorable_timestamp_seconds").set(restorable);
    metrics::gauge!("mailvault_backup_offsite_stale").set(if s.stale { 1.0 } else { 0.0 });
}

/// Marks the backup being shipped for as long as it lives, so that
/// retention leaves it alone.
struct ShippingNow<'a>(&'a Backups);

impl<'a> ShippingNow<'a> {
    fn mark(b: &'a Backups, id: &str) -> ShippingNow<'a> {
        *b.inner.shipping_now.lock().expect("shipping now") = Some(id.to_string());
        ShippingNow(b)
    }
}

impl Drop for ShippingNow<'_> {
    fn drop(&mut self) {
        *self.0.inner.shipping_now.lock().expect("shipping now") = None;
    }
}

impl Backups {
    /// The backup being shipped, if any.
    pub(crate) fn shipping_now(&self) -> Option<String> {
        self.inner.shipping_now.lock().expect("shipping now").clone()
    }

    /// Ships backup `id` (held here), then drills the copy; `why` names the
    /// trigger for the audit log.
    pub async fn ship(&self, id: &str, why: &str) -> Result<(ShippedCopy, DrillResult), ShipError> {
        let _one = self.inner.shipping.lock().await;
        let _marked = ShippingNow::mark(self, id);
        let started = Instant::now();
        let shipped = self.ship_locked(id, started).await;
        let copy = match shipped {
            Ok(copy) => copy,
            Err(e) => {
                self.failed("ship", "backup-ship-failed", id, why, &e.to_string())
                    .await;
                metrics::counter!("mailvault_backup_ship_failures_total").increment(1);
                return Err(e);
            }
        };
        metrics::counter!("mailvault_backups_shipped_total").increment(1);
        metrics::counter!("mailvault_backup_shipped_bytes_total").increment(copy.bytes);
        metrics::histogram!("mailvault_backup_ship_duration_seconds").record(copy.took_ms as f64 / 1000.0);
        tracing::info!(
            backup = id,
            target = %copy.target,
            objects = copy.objects,
            bytes = copy.bytes,
            took_ms = copy.took_ms,
            trigger = why,
            "backup shipped and read back"
        );
        self.audit_event(
            "backup-shipped",
            id,
            &format!(
                "shipped ({why}) to {}: {} objects, {} bytes uploaded, every object read back, {} ms",
                copy.target, copy.objects, copy.bytes, copy.took_ms
            ),
        )
        .await;
        let drill = self.drill_locked(id, why).await?;
        if drill.passed {
            self.expire_offsite(id).await;
        }
        let _removing = self.inner.taking.lock().await;
        self.expire_local().await;
        self.publish_local_count();
        Ok((copy, drill))
    }

    async fn ship_locked(&self, id: &str, started: Instant) -> Result<ShippedCopy, ShipError> {
        let (dir, keyring) = (self.root().join(id), self.inner.p.keyring.clone());
        let local = {
            let (dir, keyring) = (dir.clone(), keyring.clone());
            blocking(move || disk::verify(&dir, &keyring)).await?
        };
        let offsite = &self.inner.p.offsite;
        let (objects, bytes) = offsite.upload(&dir, &local).await?;
        // Read back: the copy as the store holds it, against its own manifest.
        let there = offsite.verify(id, &keyring).await?;
        if there != local {
            return Err(OffsiteError::Damaged {
                backup: id.to_string(),
                object: disk::MANIFEST.to_string(),
                why: "is not the local backup's",
            }
            .into());
        }
        let copy = ShippedCopy {
            target: offsite.url().to_string(),
            at_ms: now_ms(),
            objects,
            bytes,
            took_ms: started.elapsed().as_millis() as u64,
        };
        let change = BackupChange::Shipped {
            id: id.to_string(),
            copy: copy.clone(),
        };
        self.record(change).await.map_err(ShipError::NotRecorded)?;
        Ok(copy)
    }

    /// Restores the off-site copy of `id` into scratch and checks it (see
    /// the module's documentation); records the result.
    pub async fn drill(&self, id: &str, why: &str) -> Result<DrillResult, ShipError> {
        let _one = self.inner.shipping.lock().await;
        self.drill_locked(id, why).await
    }

    async fn drill_locked(&self, id: &str, why: &str) -> Result<DrillResult, ShipError> {
        let started = Instant::now();
        let scratch = self.root().join(DRILLS);
        let into = scratch.join(id);
        let _ = std::fs::remove_dir_all(&scratch);
        let keyring = self.inner.p.keyring.clone();
        let outcome = match self.inner.p.offsite.download(id, &keyring, &into).await {
            Err(e) => Err(e.to_string()),
            Ok(()) => {
                let (into, keyring) = (into.clone(), keyring.clone());
                blocking(move || check_restorable(&into, &keyring))
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let _ = std::fs::remove_dir_all(&scratch);
        let drill = DrillResult {
            node: self.node(),
            at_ms: now_ms(),
            passed: outcome.is_ok(),
            problem: outcome.as_ref().err().cloned().unwrap_or_default(),
            took_ms: started.elapsed().as_millis() as u64,
        };
        let recorded = self
            .record(BackupChange::Drilled {
                id: id.to_string(),
                drill: drill.clone(),
            })
            .await;
        match &outcome {
            Ok(report) => {
                metrics::counter!("mailvault_backup_drills_total").increment(1);
                metrics::histogram!("mailvault_backup_drill_duration_seconds")
                    .record(drill.took_ms as f64 / 1000.0);
                tracing::info!(
                    backup = id,
                    files = report.files,
                    audit_records = report.audit_records,
                    messages = report.messages_decrypted,
                    took_ms = drill.took_ms,
                    "restore drill passed"
                );
                self.audit_event(
                    "backup-drill-passed",
                    id,
                    &format!(
                        "restored ({why}) and checked: {} files, state digest, {} audit records, {} messages decrypted, {} ms",
                        report.files, report.audit_records, report.messages_decrypted, drill.took_ms
                    ),
                )
                .await;
            }
            Err(problem) => {
                metrics::counter!("mailvault_backup_drill_failures_total").increment(1);
                self.failed("drill", "backup-drill-failed", id, why, problem)
                    .await;
            }
        }
        recorded.map_err(ShipError::NotRecorded)?;
        Ok(drill)
    }

    /// Deletes the off-site copies older than the `keep_offsite` newest restorable ones, now that
    /// `newest` verified and restored; and any copy the catalog says was
    /// removed but whose deletion was cut short.
    async fn expire_offsite(&self, newest: &str) {
        let catalog = self.inner.p.reader.backups().unwrap_or_default();
        let mut gone: Vec<String> = Vec::new();
        for id in offsite_expiry(&catalog, newest, self.inner.p.config.keep_offsite) {
            let change = BackupChange::OffsiteRemoved {
                id: id.clone(),
                at_ms: now_ms(),
            };
            match self.record(change).await {
                Ok(()) => gone.push(id),
                Err(e) => {
                    tracing::warn!(backup = %id, error = %e, "could not mark an old off-site copy removed; kept")
                }
            }
        }
        gone.extend(
            catalog
                .iter()
                .filter(|r| r.shipped.is_some() && r.offsite_removed_at_ms.is_some())
                .map(|r| r.entry.id.clone()),
        );
        let present = self.inner.p.offsite.ids().await.unwrap_or_default();
        for id in gone.into_iter().filter(|i| present.contains(i)) {
            match self.inner.p.offsite.delete(&id).await {
                Ok(()) => {
                    metrics::counter!("mailvault_backup_offsite_expired_total").increment(1);
                    self.audit_event(
                        "backup-offsite-expired",
                        &id,
                        "off-site copy deleted (keep_offsite)",
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(backup = %id, error = %e, "deleting an old off-site copy failed; retried after the next ship")
                }
            }
        }
    }

    /// Records a failed ship or drill: status, log, audit.
    async fn failed(&self, what: &str, action: &str, id: &str, why: &str, problem: &str) {
        let now = now_ms();
        metrics::gauge!("mailvault_backup_last_failure_timestamp_seconds").set(now as f64 / 1000.0);
        tracing::error!(backup = id, problem, trigger = why, "backup {what} failed");
        self.update_status(|s| s.last_failure = Some((now, format!("{what} of {id}: {problem}"))));
        self.audit_event(action, id, &format!("failed ({why}): {problem}"))
            .await;
    }
}

/// Which off-site copies `keep_offsite` removes once `newest` passed its
/// drill: every copy older than the `keep` newest copies whose last drill
/// passed (`newest` among them), whether it passed or not; none while there
/// are `keep` or fewer restorable copies. So exactly `keep` restorable copies
/// remain (and any newer copy whose drill failed, kept for a look), and the
/// newest restorable copy is never removed.
pub fn offsite_expiry(catalog: &[BackupRecord], newest: &str, keep: usize) -> Vec<String> {
    let mut restorable: Vec<&str> = catalog
        .iter()
        .filter(|r| r.is_offsite() && r.drill.as_ref().is_some_and(|d| d.passed))
        .map(|r| r.entry.id.as_str())
        .chain([newest])
        .collect();
    restorable.sort();
    restorable.dedup();
    if restorable.len() <= keep.max(1) {
        return Vec::new();
    }
    let oldest_kept = restorable[restorable.len() - keep.max(1)];
    let mut out: Vec<String> = catalog
        .iter()
        .filter(|r| r.is_offsite() && r.entry.id.as_str() < oldest_kept)
        .map(|r| r.entry.id.clone())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::backup::{BackupEntry, DrillResult, ShippedCopy};

    fn rec(id: &str, shipped: bool, drill: Option<bool>) -> BackupRecord {
        BackupRecord {
            entry: BackupEntry {
                id: id.into(),
                node: 3,
                taken_at_ms: 0,
                applied_index: 0,
                applied_term: 0,
                files: 0,
                bytes: 0,
                took_ms: 0,
            },
            local_removed_at_ms: None,
            shipped: shipped.then(|| ShippedCopy {
                target: "file:///x".into(),
                at_ms: 0,
                objects: 0,
                bytes: 0,
                took_ms: 0,
            }),
            offsite_removed_at_ms: None,
            drill: drill.map(|passed| DrillResult {
                node: 3,
                at_ms: 0,
                passed,
                problem: String::new(),
                took_ms: 0,
            }),
        }
    }

    #[test]
    fn retention_keeps_exactly_keep_restorable_copies_and_never_the_last_restorable_one() {
        // a, b, c restorable; d's drill failed; e just passed.
        let catalog = vec![
            rec("a", true, Some(true)),
            rec("b", true, Some(true)),
            rec("c", true, Some(true)),
            rec("d", true, Some(false)),
            rec("e", true, None),
            rec("f", false, None),
        ];
        assert_eq!(
            offsite_expiry(&catalog, "e", 2),
            ["a", "b"],
            "c and e kept, d kept for a look"
        );
        assert_eq!(offsite_expiry(&catalog, "e", 4), Vec::<String>::new());
        assert_eq!(offsite_expiry(&catalog, "e", 1), ["a", "b", "c", "d"]);
        // keep 0 is read as 1: the newest restorable copy always stays.
        assert_eq!(offsite_expiry(&catalog, "e", 0), ["a", "b", "c", "d"]);
        // Failed drills alone never make room: the older restorable copies stay.
        let failing = vec![
            rec("a", true, Some(true)),
            rec("b", true, Some(false)),
            rec("c", true, Some(false)),
        ];
        assert_eq!(offsite_expiry(&failing, "a", 1), Vec::<String>::new());
        // A copy already marked removed is not counted.
        let mut gone = rec("a", true, Some(true));
        gone.offsite_removed_at_ms = Some(1);
        assert_eq!(
            offsite_expiry(&[gone, rec("b", true, Some(true))], "c", 2),
            Vec::<String>::new()
        );
    }
}
