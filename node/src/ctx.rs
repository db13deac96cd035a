//! The node's shared context: what every API handler needs.

use std::time::Duration;

use mailvault_proto::v1::admin_client::AdminClient;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::Status;

use crate::access::{Gate, Principal, ON_BEHALF_OF, ON_BEHALF_SERIAL, ON_BEHALF_SOURCE};
use crate::audit::AuditRecorder;
use crate::config::Config;
use crate::crypto::Keyring;
use crate::error::{ApiError, Reason};
use crate::proposer::Proposer;
use crate::raft::PeerClients;
use crate::state::types::{Member, NodeId, Raft};
use crate::store::MailReader;

/// Metadata header marking a request a follower forwarded to the leader.
pub const FORWARDED: &str = "x-mailvault-forwarded";

/// How long a read waits to reach its linearizable read point.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// mTLS channels to peers (Raft, read index, forwarding).
    pub peers: PeerClients,
    /// Last applied log index.
    pub applied: watch::Receiver<u64>,
    /// Audit log recorder.
    pub audit: AuditRecorder,
    /// What the access checks work with (policies, denials, audit).
    pub gate: Gate,
    /// The leader's read fence (see `crate::raft::ReadFence`).
    pub fence: crate::raft::ReadFence,
    /// Unsafe test modes (none in production).
    pub test_modes: crate::test_modes::TestModes,
}

/// Where a write must go.
pub enum Route {
    /// Handle it here.
    Local,
    /// Forward it to the leader over this channel.
    Forward(Channel),
}

impl Ctx {
    /// The current leader and its member record, if known.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let member = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, member))
    }

    /// Whether this node currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Decides whether a write is handled here or forwarded to the leader.
    pub fn route(&self, metadata: &MetadataMap) -> Result<Route, Status> {
        if self.is_leader() {
            return Ok(Route::Local);
        }
        if metadata.contains_key(FORWARDED) {
            return Err(ApiError::new(
                Reason::LeadershipChanged,
                "leadership changed while forwarding; retry",
            )
            .into());
        }
        let Some((_, leader)) = self.leader() else {
            return Err(no_leader());
        };
        let ch = self
            .peers
            .channel(&leader.client_addr)
            .map_err(|_| ApiError::new(Reason::LeaderUnreachable, "leader unreachable"))?;
        Ok(Route::Forward(ch))
    }

    /// A mailbox client for a forwarding channel.
    pub fn mailbox_client(&self, ch: Channel) -> MailboxClient<Channel> {
        let max = self.max_frame();
        MailboxClient::new(ch)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// An admin client for a forwarding channel.
    pub fn admin_client(&self, ch: Channel) -> AdminClient<Channel> {
        AdminClient::new(ch)
    }

    /// Largest gRPC frame accepted on the client API.
    pub fn max_frame(&self) -> usize {
        self.config.limits.chunk_bytes * 4 + 64 * 1024
    }

    /// Waits until this node may serve a linearizable read: the leader
    /// confirms its leadership with a quorum (read index), and this node has
    /// applied up to that index.
    pub async fn read_barrier(&self) -> Result<(), Status> {
        if self.test_modes.stale_reads {
            return Ok(());
        }
        if self.is_leader() {
            let r = tokio::time::timeout(READ_TIMEOUT, async {
                self.fence.index().await?;
                Ok(self.raft.ensure_linearizable().await)
            })
            .await;
            return match r {
                Ok(Err(s)) => Err(s),
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err(_))) => {
                    Err(ApiError::new(Reason::LeadershipChanged, "leadership lost; retry").into())
                }
                Err(_) => Err(unconfirmed()),
            };
        }
        let Some((_, leader)) = self.leader() else {
            return Err(no_leader());
        };
        let index = self.peers.read_index(&leader.raft_addr, READ_TIMEOUT).await?;
        let mut applied = self.applied.clone();
        let r = tokio::time::timeout(READ_TIMEOUT, applied.wait_for(|a| *a >= index)).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::new(Reason::ReplicaBehind, "this node is behind the leader; retry").into()),
        }
    }
}

fn no_leader() -> Status {
    ApiError::new(Reason::NoLeader, "no leader elected; retry").into()
}

/// The leader could not confirm its leadership for a read in time.
pub fn unconfirmed() -> Status {
    ApiError::new(
        Reason::LeadershipUnconfirmed,
        "leadership could not be confirmed in time",
    )
    .into()
}

/// Wraps a request a follower forwards to the leader: marks it forwarded and
/// names the original caller (trusted by the leader because a node
/// certificate presents it).
pub fn forwarded<T>(inner: T, principal: Option<&Principal>) -> tonic::Request<T> {
    use tonic::metadata::MetadataValue;
    let mut r = tonic::Request::new(inner);
    let md = r.metadata_mut();
    md.insert(FORWARDED, MetadataValue::from_static("1"));
    if let Some(p) = principal {
        let mut set = |k: &'static str, v: &str| {
            if let Ok(v) = MetadataValue::try_from(v) {
                md.insert(k, v);
            }
        };
        set(ON_BEHALF_OF, &p.identity);
        set(ON_BEHALF_SERIAL, &p.serial);
        set(ON_BEHALF_SOURCE, &p.source_text());
    }
    r
}
