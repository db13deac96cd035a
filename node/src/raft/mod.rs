//! Raft plumbing: the peer transport (client and server) and start-up.

pub mod health;
mod leadership;
mod network;
mod peer_service;
mod read_fence;
mod setup;
mod snapshots;

pub use health::Health;
pub use leadership::{run as place_leadership, Handover, Hold, HoldWrites, RoleNow};
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

/// Where a proposal this node makes for itself goes (audit batches, the
/// backup catalog): to its own proposer when it leads, else to the leader's
/// peer service.
pub enum LeaderPeer {
    /// This node leads.
    Here,
    /// The leader's peer client.
    There(mailvault_proto::raft::raft_peer_client::RaftPeerClient<tonic::transport::Channel>),
}

/// The [`LeaderPeer`] for a proposal now (an error names why there is none).
pub fn leader_peer(raft: &Raft, peers: &PeerClients) -> Result<LeaderPeer, String> {
    let m = raft.metrics().borrow().clone();
    let leader = m.current_leader.ok_or("no leader")?;
    if leader == m.id {
        return Ok(LeaderPeer::Here);
    }
    let addr = m
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.raft_addr.clone())
        .ok_or("leader address unknown")?;
    peers
        .client(&addr)
        .map(LeaderPeer::There)
        .map_err(|e| e.to_string())
}

/// Largest peer message accepted, in bytes (entries carry up to a few MiB of chunks).
pub const PEER_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
