//! The `backup-schedule` worker: tidies the backup root once the catalog is
//! known, then decides the duty every second and takes a backup when one is
//! due, and — on the node holding the duty — ships the newest one when a
//! ship is due (retrying a failed one after a quarter interval, between 1 s
//! and 5 min). A ship runs in a task of its own, so that backups go on while
//! it retries against a store that is down.

use std::time::Duration;

use super::duty::next_ship_ms;
use super::ship::{publish, ShipError};
use super::{decide, summarize, Backups};
use crate::clock::now_ms;
use crate::config::parse_time_of_day;
use crate::raft::ReadBarrier;
use crate::state::backup::{BackupChange, DrillResult, ShippedCopy};
use crate::store::backup as disk;

const TICK: Duration = Duration::from_secs(1);

/// A ship in flight, stopped with the schedule.
struct Ship(tokio::task::JoinHandle<Result<(ShippedCopy, DrillResult), ShipError>>);

impl Drop for Ship {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the schedule until the node stops (the supervisor cancels it).
pub async fn run_schedule(backups: Backups, reads: ReadBarrier) {
    let since = now_ms();
    // Decide nothing on a catalog that may lag the cluster's.
    while reads.wait().await.is_err() {
        tokio::time::sleep(TICK).await;
    }
    backups.reconcile().await;
    backups.publish_local_count();
    let interval_ms = (backups.config().interval_secs as i64).saturating_mul(1000);
    let retry_ms = (interval_ms / 4).clamp(1_000, 300_000);
    let me = backups.node();
    let mut not_before = 0i64;
    let mut ship_not_before = 0i64;
    let mut shipping: Option<Ship> = None;
    let ship_at = parse_time_of_day(&backups.config().ship_at).unwrap_or(120);
    let ship_interval_ms = (backups.config().ship_interval_secs as i64).saturating_mul(1000);
    let max_age_ms = (backups.config().max_offsite_age_secs as i64).saturating_mul(1000);
    loop {
        let now = now_ms();
        let catalog = backups.catalog();
        let offsite = summarize(&catalog, me, now, max_age_ms);
        publish(&offsite);
        let view = backups.duty_view(since, now);
        let duty = decide(&view);
        let next = duty.next_due_ms.map(|d| d.max(not_before));
        backups.update_status(|s| {
            s.duty = Some(duty);
            s.next_due_ms = next;
        });
        metrics::gauge!("mailvault_backup_duty").set(if duty.holder == Some(me) { 1.0 } else { 0.0 });
        if let Some((_, at)) = view.newest {
            metrics::gauge!("mailvault_backup_newest_timestamp_seconds").set(at as f64 / 1000.0);
        }
        // The holder of the duty ships its newest backup.
        let ship = offsite
            .to_ship
            .clone()
            .filter(|_| duty.holder == Some(me))
            .map(|id| {
                let at = next_ship_ms(
                    offsite.last_shipped.as_ref().map(|s| s.1),
                    ship_at,
                    ship_interval_ms,
                );
                (id, at.max(ship_not_before))
            });
        backups.update_status(|s| {
            s.offsite = offsite;
            s.next_ship_ms = ship.as_ref().map(|s| s.1.max(now));
        });
        if next.is_some_and(|due| now >= due) && still_due(&backups, &reads, since).await {
            not_before = match backups.take("schedule").await {
                Ok(_) => 0,
                Err(_) => now_ms() + retry_ms,
            };
            continue;
        }
        // A ship runs beside the schedule (an unreachable store may retry
        // it for a while): backups go on meanwhile, one ship at a time.
        if let Some(mut done) = shipping.take_if(|s| s.0.is_finished()) {
            ship_not_before = match (&mut done.0).await {
                Ok(Ok(_)) => 0,
                _ => now_ms() + retry_ms,
            };
            continue;
        }
        if shipping.is_none() {
            if let Some((id, _)) = ship.filter(|(_, due)| now >= *due) {
                if reads.wait().await.is_ok() {
                    let b = backups.clone();
                    shipping = Some(Ship(tokio::spawn(async move { b.ship(&id, "schedule").await })));
                    continue;
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Whether a backup is still due once this node's catalog caught up with the
/// cluster's (a linearizable read point): a lagging follower must not take
/// one the catalog already holds.
async fn still_due(backups: &Backups, reads: &ReadBarrier, since: i64) -> bool {
    if reads.wait().await.is_err() {
        return false;
    }
    let now = now_ms();
    decide(&backups.duty_view(since, now))
        .next_due_ms
        .is_some_and(|due| now >= due)
}

impl Backups {
    /// Makes the backup root agree with the catalog after a crash or an
    /// interrupted removal: leftovers of backups cut short go; a verified
    /// backup of this node's the catalog lacks is recorded; one the catalog
    /// says was removed goes; a catalog entry whose directory is gone is
    /// marked removed. A directory that does not verify and is not listed is
    /// not a backup, and goes too.
    pub(crate) async fn reconcile(&self) {
        let root = self.root().to_path_buf();
        let listing = match disk::list_root(&root) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, root = %root.display(), "cannot list the backup root");
                return;
            }
        };
        let _ = std::fs::remove_dir_all(root.join(super::ship::DRILLS));
        for dir in &listing.incomplete {
            tracing::info!(dir = %dir.display(), "removing a backup that was cut short");
            let _ = std::fs::remove_dir_all(dir);
        }
        let catalog = self.local_backups();
        for id in &listing.backups {
            match self.inner.p.reader.backup(id) {
                Ok(Some(rec)) if rec.entry.node == self.node() && !rec.is_local() => {
                    let _ = disk::remove(&root, id);
                }
                Ok(Some(_)) => {}
                Ok(None) => self.adopt(id).await,
                Err(e) => tracing::warn!(backup = %id, error = %e, "cannot read the catalog"),
            }
        }
        for rec in catalog {
            if !listing.backups.contains(&rec.entry.id) {
                tracing::warn!(backup = %rec.entry.id, "a listed backup's directory is gone; marking it removed");
                let change = BackupChange::LocalRemoved {
                    id: rec.entry.id.clone(),
                    at_ms: now_ms(),
                };
                if let Err(e) = self.record(change).await {
                    tracing::warn!(backup = %rec.entry.id, error = %e, "could not mark it removed");
                }
            }
        }
    }

    /// Records a backup of this node's that verified but was not recorded
    /// (the node stopped between the two), or removes what is not one.
    async fn adopt(&self, id: &str) {
        match self.verify(id).await {
            Ok((m, _, took)) if m.taken_by == self.node() && m.cluster == self.inner.p.cluster => {
                let entry = super::entry_of(&m, &self.root().join(id), took);
                match self.record(BackupChange::Taken(entry)).await {
                    Ok(()) => tracing::info!(backup = id, "recorded a backup taken before a restart"),
                    Err(e) => {
                        tracing::warn!(backup = id, error = %e, "could not record a backup taken before a restart")
                    }
                }
            }
            Ok(_) => tracing::warn!(
                backup = id,
                "a backup of another node or cluster lies in the backup root; left alone"
            ),
            Err(e) => {
                tracing::warn!(backup = id, error = %e, "an unlisted backup does not verify; removing it");
                let _ = disk::remove(self.root(), id);
            }
        }
    }
}
