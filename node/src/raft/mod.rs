//! Raft plumbing: the peer transport (client and server) and start-up.

mod leadership;
mod network;
mod peer_service;
mod read_fence;
mod setup;
mod snapshots;

pub use leadership::run as place_leadership;
pub use network::{resend_held_back_commits, PeerClients, PeerNetwork};
pub use peer_service::PeerService;
pub use read_fence::{ReadBarrier, ReadFence};
pub use setup::{bootstrap_if_fresh, raft_config, snapshot_schedule};
pub use snapshots::{run as schedule_snapshots, SnapshotSchedule};

use crate::state::types::{Member, NodeId, Raft};

/// The current leader and its member record, as this node knows them.
pub fn leader_of(raft: &Raft) -> Option<(NodeId, Member)> {
    let m = raft.metrics().borrow().clone();
    let id = m.current_leader?;
    let member = m.membership_config.membership().get_node(&id)?.clone();
    Some((id, member))
}

/// Largest peer message accepted, in bytes (entries carry up to a few MiB of chunks).
pub const PEER_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
