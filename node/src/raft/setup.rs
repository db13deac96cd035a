//! Raft configuration and the one-time bootstrap of a fresh cluster.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::raft::SnapshotSchedule;
use crate::state::types::{Member, NodeId, Raft};

/// openraft's config derived from ours.
pub fn raft_config(config: &Config) -> Result<openraft::Config, openraft::ConfigError> {
    let r = &config.raft;
    openraft::Config {
        cluster_name: config.cluster_name.clone(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        // A backup node is a voter that never campaigns.
        enable_elect: config.me().role.may_campaign(),
        max_payload_entries: 64,
        // Snapshots are requested by `raft::snapshots` (entries and bytes).
        snapshot_policy: openraft::SnapshotPolicy::Never,
        // A follower that fell behind by less than a snapshot interval
        // catches up from the log rather than by a whole snapshot, which
        // costs as much as the data held (a brief stall, a restart).
        max_in_snapshot_log_to_keep: r.snapshot_every,
        snapshot_max_chunk_size: 1024 * 1024,
        install_snapshot_timeout: 5000,
        ..Default::default()
    }
    .validate()
}

/// When snapshots are built, from our config.
pub fn snapshot_schedule(config: &Config) -> SnapshotSchedule {
    SnapshotSchedule {
        min_entries: config.raft.snapshot_every,
        growth_percent: config.raft.snapshot_growth_percent,
    }
}

/// Initializes a fresh cluster exactly once: only the lowest-numbered member
/// does it, and only when its Raft state is empty. Later starts are no-ops.
pub async fn bootstrap_if_fresh(raft: &Raft, config: &Config) -> anyhow::Result<bool> {
    // A joining node (`join`) never bootstraps: two operators add it.
    let Some(&first) = config.members.keys().next() else {
        return Ok(false);
    };
    if config.join.is_some() || first != config.node_id || raft.is_initialized().await? {
        return Ok(false);
    }
    let voters: BTreeMap<NodeId, Member> = config
        .members
        .iter()
        .filter(|(_, m)| m.role.is_voter())
        .map(|(id, m)| (*id, Member::from(m)))
        .collect();
    // Spares and DR learners join through membership changes, not the bootstrap.
    raft.initialize(voters).await?;
    Ok(true)
}
