//! Routing writes to the leader: a node that does not lead forwards a write
//! to the leader over its peer mTLS channel, marked forwarded and naming the
//! original caller, so the leader authorizes and audits the caller, not the
//! node. Every service routes its writes the same way (`route_write!`).

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::Status;

use crate::access::{Principal, ON_BEHALF_KEY, ON_BEHALF_OF, ON_BEHALF_SERIAL, ON_BEHALF_SOURCE};
use crate::error::{ApiError, Reason};
use crate::raft::PeerClients;
use crate::state::types::{Member, NodeId, Raft};

/// Metadata header marking a request a follower forwarded to the leader.
pub const FORWARDED: &str = "x-mailvault-forwarded";

/// Where a write must go.
pub enum Route {
    /// Handle it here.
    Local,
    /// Forward it to the leader over this channel.
    Forward(Channel),
}

/// Decides where writes go, and holds the channels they are forwarded over.
#[derive(Clone)]
pub struct Router {
    id: NodeId,
    raft: Raft,
    peers: PeerClients,
    health: crate::raft::Health,
}

impl Router {
    /// A router for node `id`.
    pub fn new(id: NodeId, raft: Raft, peers: PeerClients, health: crate::raft::Health) -> Router {
        Router {
            id,
            raft,
            peers,
            health,
        }
    }

    /// This node's membership in words: `member`, `waiting` (to be added)
    /// or `removed`.
    pub fn membership(&self) -> &'static str {
        if self.health.removed() {
            return "removed";
        }
        let m = self.raft.metrics().borrow().membership_config.clone();
        match m.membership().get_node(&self.id) {
            Some(_) => "member",
            None if m.log_id().is_none() => "waiting",
            None => "removed",
        }
    }

    /// Refuses to serve while this node is not a member (it waits to be
    /// added, or was removed): `UNAVAILABLE`, `NOT_A_MEMBER`.
    pub fn check_member(&self) -> Result<(), Status> {
        match self.membership() {
            "member" => Ok(()),
            "waiting" => Err(ApiError::new(
                Reason::NotAMember,
                format!(
                    "node {} waits to be added to the cluster (mailvault-admin op propose add-node); it serves nothing until then",
                    self.id
                ),
            )
            .into()),
            _ => Err(ApiError::new(
                Reason::NotAMember,
                format!(
                    "node {} is no longer a member of the cluster: it serves nothing (call another node)",
                    self.id
                ),
            )
            .into()),
        }
    }

    /// The current leader and its member record, if known.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        crate::raft::leader_of(&self.raft)
    }

    /// Channels to every other member's client port, for reads this node
    /// cannot serve from its own copy (a damaged message).
    pub fn replicas(&self) -> Vec<Channel> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.id)
            .filter_map(|(_, member)| self.peers.channel(&member.client_addr).ok())
            .collect()
    }

    /// A channel to member `id`'s client port (calls about what one node
    /// holds, such as its backups).
    pub fn member_channel(&self, id: NodeId) -> Option<Channel> {
        let m = self.raft.metrics().borrow().clone();
        let member = m.membership_config.membership().get_node(&id)?.clone();
        self.peers.channel(&member.client_addr).ok()
    }

    /// Whether this node currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Decides whether a write is handled here or forwarded to the leader. A
    /// forwarded call that reaches a node which no longer leads is refused,
    /// never forwarded again.
    pub fn route(&self, metadata: &MetadataMap) -> Result<Route, Status> {
        self.check_member()?;
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
            return Err(crate::error::no_leader().into());
        };
        let ch = self
            .peers
            .channel(&leader.client_addr)
            .map_err(|_| ApiError::new(Reason::LeaderUnreachable, "leader unreachable"))?;
        Ok(Route::Forward(ch))
    }
}

/// Wraps a request a follower forwards to the leader: marks it forwarded and
/// names the original caller (trusted by the leader because a node
/// certificate presents it).
pub fn forwarded<T>(inner: T, principal: Option<&Principal>) -> tonic::Request<T> {
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
        set(ON_BEHALF_KEY, &p.key);
    }
    r
}

/// The answer to a forwarded write as the caller gets it: a failure the
/// transport made up is an unknown outcome (see [`crate::error::from_leader`]).
pub fn leader_answer<T>(answer: Result<T, Status>) -> Result<T, Status> {
    answer.map_err(crate::error::from_leader)
}

/// The principal the access layer attached to a request.
pub fn principal_of<T>(req: &tonic::Request<T>) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

/// Routes a unary write: when this node does not lead, forwards the call to
/// the leader through `$self.client(channel)` (the service's client for its
/// own service) and returns the leader's answer. Binds `$p` to the caller's
/// principal either way. `$self.ctx.router` decides.
macro_rules! route_write {
    ($self:ident, $req:ident, $p:ident, $method:ident) => {
        let $p = $crate::forward::principal_of(&$req);
        if let $crate::forward::Route::Forward(ch) = $self.ctx.router.route($req.metadata())? {
            return $crate::forward::leader_answer(
                $self
                    .client(ch)
                    .$method($crate::forward::forwarded($req.into_inner(), $p.as_ref()))
                    .await,
            );
        }
    };
}
pub(crate) use route_write;
