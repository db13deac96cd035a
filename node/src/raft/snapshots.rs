//! When a node builds a snapshot.
//!
//! openraft 0.9's own policy counts entries only (`LogsSinceLast`): a node
//! dumped all the mail it held every `snapshot_every` entries, so the cost
//! of snapshots per message written grew with the data held (measured with
//! 60,000 messages of 4 KiB held: one dump in 15 s of single-client writes
//! cost 13–15 % of the writes/s and doubled p99). Here a snapshot is due once
//! at least `snapshot_every` entries have been applied since the last one
//! **and** client commands amounting to `snapshot_growth_percent` of that
//! snapshot's size: the bytes dumped per byte written then stay bounded
//! (100 / percent) whatever the size of the store, and the log kept between
//! two snapshots stays within about that share of the state.
//!
//! Every node decides for itself, as with openraft's policy; openraft purges
//! the log after each build as before (keeping `snapshot_every` entries).

use std::time::Duration;

use crate::state::types::Raft;
use crate::store::{SnapshotExtent, StateMachine};

/// The rule: how much must happen after a snapshot before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSchedule {
    /// Entries applied since the last snapshot, at least.
    pub min_entries: u64,
    /// Bytes of commands applied since it, as a percentage of its size, at least.
    pub growth_percent: u64,
}

impl SnapshotSchedule {
    /// Whether a snapshot is due, `applied` being the last applied index.
    pub fn due(&self, applied: u64, last: SnapshotExtent) -> bool {
        applied.saturating_sub(last.index) >= self.min_entries
            && u128::from(last.applied_bytes_since) * 100
                >= u128::from(last.bytes) * u128::from(self.growth_percent)
    }
}

/// How long a requested build may take before it is requested again.
const BUILD_PATIENCE: Duration = Duration::from_secs(120);

/// Requests a snapshot from openraft whenever [`SnapshotSchedule::due`]
/// says so, one at a time. Ends at the first request after Raft has
/// stopped, or with the runtime (a stopped node applies nothing more, so
/// it only waits).
pub async fn run(raft: Raft, sm: StateMachine, schedule: SnapshotSchedule) {
    let mut applied = sm.applied_index();
    loop {
        if applied.changed().await.is_err() {
            return;
        }
        let index = *applied.borrow_and_update();
        let last = sm.snapshot_extent();
        if !schedule.due(index, last) {
            continue;
        }
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        // Until a newer snapshot is current (this build, or one installed
        // from the leader), so that one build is not requested twice.
        let waited = tokio::time::Instant::now();
        while sm.snapshot_extent().index <= last.index && waited.elapsed() < BUILD_PATIENCE {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: SnapshotSchedule = SnapshotSchedule {
        min_entries: 100,
        growth_percent: 25,
    };

    /// The last snapshot at index 7, of `bytes`, with `since` bytes applied after it.
    fn last(bytes: u64, since: u64) -> SnapshotExtent {
        SnapshotExtent {
            index: 7,
            bytes,
            applied_bytes_since: since,
        }
    }

    #[test]
    fn the_first_snapshot_needs_only_the_entries() {
        let none = SnapshotExtent {
            index: 0,
            bytes: 0,
            applied_bytes_since: 0,
        };
        assert!(!SCHEDULE.due(99, none));
        assert!(SCHEDULE.due(100, none));
    }

    #[test]
    fn later_ones_wait_for_a_quarter_of_the_last_snapshot_in_new_commands() {
        let gb = 1 << 30;
        assert!(!SCHEDULE.due(1_000_000, last(gb, gb / 4 - 1)));
        assert!(SCHEDULE.due(107, last(gb, gb / 4)));
        assert!(!SCHEDULE.due(106, last(gb, gb)), "and still for the entries");
        // Sizes near the top of u64 do not overflow.
        assert!(SCHEDULE.due(107, last(u64::MAX, u64::MAX)));
    }

    #[test]
    fn zero_percent_is_openraft_s_entry_count_alone() {
        let s = SnapshotSchedule {
            growth_percent: 0,
            ..SCHEDULE
        };
        assert!(s.due(107, last(u64::MAX, 0)));
        assert!(!s.due(106, last(1, u64::MAX)));
    }
}
