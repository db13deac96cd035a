//! The node's shared context: what every API handler needs.

use tokio::sync::watch;

use crate::access::Gate;
use crate::audit::AuditRecorder;
use crate::config::Config;
use crate::crypto::Keyring;
use crate::forward::Router;
use crate::proposer::Proposer;
use crate::raft::ReadBarrier;
use crate::state::types::{NodeId, Raft};
use crate::store::MailReader;

/// Shared state of a running node.
pub struct Ctx {
    /// This node's id.
    pub id: NodeId,
    /// The node's configuration.
    pub config: Config,
    /// Raft handle.
    pub raft: Raft,
    /// Local reads of the state machine.
    pub reader: MailReader,
    /// Tenant data keys.
    pub keyring: Keyring,
    /// Group-commit proposer.
    pub proposer: Proposer,
    /// Where writes go (here, or forwarded to the leader).
    pub router: Router,
    /// What a linearizable read waits on.
    pub reads: ReadBarrier,
    /// Last applied log index.
    pub applied: watch::Receiver<u64>,
    /// Audit log recorder.
    pub audit: AuditRecorder,
    /// What the access checks work with (policies, denials, audit).
    pub gate: Gate,
    /// This node's backups (taken here, recorded in the catalog).
    pub backups: crate::backups::Backups,
    /// Stored messages found damaged on this node.
    pub damage: crate::damage::DamageReport,
    /// The node's background workers.
    pub workers: crate::workers::Supervisor,
    /// Raft peer channels (e.g. to ask a voter to campaign).
    pub peers: crate::raft::PeerClients,
    /// This node's watch of the members.
    pub health: crate::raft::Health,
    /// How this node, leading, hands leadership to another voter.
    pub handover: crate::raft::Handover,
    /// Unsafe test modes (none in production).
    pub test_modes: crate::test_modes::TestModes,
}

impl Ctx {
    /// Largest gRPC frame accepted on the client API.
    pub fn max_frame(&self) -> usize {
        self.config.limits.chunk_bytes * 4 + 64 * 1024
    }

    /// The members as this node sees them: roles, addresses, and (on the
    /// leader only) whether each is up and how far behind.
    pub fn membership_facts(&self) -> crate::state::member::MembershipFacts {
        let m = self.raft.metrics().borrow().clone();
        let leading = m.current_leader == Some(self.id);
        let views = self.health.views(&self.raft);
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let v = views.get(id);
                crate::state::member::MemberFacts {
                    id: *id,
                    member: n.clone(),
                    voter: voters.contains(id),
                    up: v.and_then(|v| v.up).filter(|_| leading),
                    behind: v.and_then(|v| v.behind).filter(|_| leading),
                }
            })
            .collect();
        crate::state::member::MembershipFacts {
            leader: m.current_leader,
            members,
        }
    }

    /// Waits until this node may serve a linearizable read (see [`ReadBarrier`]).
    pub async fn read_barrier(&self) -> Result<(), tonic::Status> {
        self.router.check_member()?;
        self.reads.wait().await
    }
}
