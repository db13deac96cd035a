//! The backup catalog: which backups exist, on which node, and what became of
//! them (shipped, drilled, removed). Every change names one backup; a change
//! already in place is done again without effect, so a retried proposal is
//! safe. Changes to a backup the catalog does not hold are refused, and so is
//! a second node's backup under an id the catalog already holds.

use super::{Decided, Tx};
use crate::state::backup::{BackupChange, BackupRecord};
use crate::state::command::{CommandResult, Refusal};
use crate::state::keys;

impl Tx<'_> {
    pub(super) fn change_backups(&mut self, change: BackupChange) -> Decided {
        let key = keys::backup(change.id());
        let before: Option<BackupRecord> = self.get(&key)?;
        let after = match (before.clone(), change) {
            (None, BackupChange::Taken(entry)) => BackupRecord {
                entry,
                local_removed_at_ms: None,
                shipped: None,
                offsite_removed_at_ms: None,
                drill: None,
            },
            (Some(rec), BackupChange::Taken(entry)) if rec.entry.node == entry.node => rec,
            (Some(_), BackupChange::Taken(_)) => return Ok(Err(Refusal::BackupIdTaken)),
            (None, _) => return Ok(Err(Refusal::NoBackup)),
            (Some(mut rec), BackupChange::LocalRemoved { at_ms, .. }) => {
                rec.local_removed_at_ms.get_or_insert(at_ms);
                rec
            }
            (Some(mut rec), BackupChange::Shipped { copy, .. }) => {
                rec.shipped = Some(copy);
                rec.offsite_removed_at_ms = None;
                rec
            }
            (Some(mut rec), BackupChange::OffsiteRemoved { at_ms, .. }) => {
                if rec.shipped.is_some() {
                    rec.offsite_removed_at_ms.get_or_insert(at_ms);
                }
                rec
            }
            (Some(mut rec), BackupChange::Drilled { drill, .. }) => {
                rec.drill = Some(drill);
                rec
            }
        };
        if before.as_ref() != Some(&after) {
            self.put(key, &after);
        }
        Ok(Ok(CommandResult::Done))
    }
}
