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
    /// Unsafe test modes (none in production).
    pub test_modes: crate::test_modes::TestModes,
}

impl Ctx {
    /// Largest gRPC frame accepted on the client API.
    pub fn max_frame(&self) -> usize {
        self.config.limits.chunk_bytes * 4 + 64 * 1024
    }

    /// Waits until this node may serve a linearizable read (see [`ReadBarrier`]).
    pub async fn read_barrier(&self) -> Result<(), tonic::Status> {
        self.reads.wait().await
    }
}
