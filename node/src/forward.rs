//! Routing writes to the leader: a node that does not lead forwards a write
//! to the leader over its peer mTLS channel, marked forwarded and naming the
//! original caller, so the leader authorizes and audits the caller, not the
//! node. Every service routes its writes the same way (`route_write!`).

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::access::{Principal, ON_BEHALF_OF, ON_BEHALF_SERIAL, ON_BEHALF_SOURCE};
use crate::error::{ApiError, Reason, DOMAIN};
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
}

impl Router {
    /// A router for node `id`.
    pub fn new(id: NodeId, raft: Raft, peers: PeerClients) -> Router {
        Router { id, raft, peers }
    }

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

    /// Decides whether a write is handled here or forwarded to the leader. A
    /// forwarded call that reaches a node which no longer leads is refused,
    /// never forwarded again.
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
            return Err(ApiError::new(Reason::NoLeader, "no leader elected; retry").into());
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
    }
    r
}

/// The answer to a forwarded write as the caller gets it. A status the leader
/// sent carries mailvault's `ErrorInfo` and passes unchanged, as do statuses
/// that say the leader refused the call itself (unimplemented, too large).
/// One the transport made up — the connection to the leader failed or broke,
/// so the leader may or may not have committed the write — becomes
/// `WRITE_OUTCOME_UNKNOWN` (`UNAVAILABLE`): retry with the same idempotency
/// key. Never `UNKNOWN: transport error`.
pub fn leader_answer<T>(answer: Result<T, Status>) -> Result<T, Status> {
    answer.map_err(|s| {
        let from_leader = s.get_details_error_info().is_some_and(|i| i.domain == DOMAIN);
        let transport = matches!(
            s.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Internal
        );
        if from_leader || !transport {
            return s;
        }
        tracing::info!(code = ?s.code(), "a forwarded write got no answer from the leader");
        metrics::counter!("mailvault_forward_outcome_unknown_total").increment(1);
        ApiError::new(
            Reason::WriteOutcomeUnknown,
            "the leader did not answer a forwarded write, which may have been committed; \
             retry with the same idempotency key",
        )
        .into()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &Status) -> Option<String> {
        s.get_details_error_info().map(|i| i.reason)
    }

    #[test]
    fn a_transport_failure_of_a_forwarded_write_is_an_unknown_outcome() {
        for made_up in [
            Status::unknown("transport error"),
            Status::unavailable("connection reset"),
            Status::cancelled("h2 stream reset"),
            Status::internal("h2 protocol error"),
        ] {
            let s = leader_answer::<()>(Err(made_up)).unwrap_err();
            assert_eq!(s.code(), Code::Unavailable);
            assert_eq!(reason(&s).as_deref(), Some("WRITE_OUTCOME_UNKNOWN"));
        }
        // The leader's own answers pass unchanged, whatever their code.
        let leader: Status = ApiError::new(Reason::NoLeader, "no leader").into();
        let s = leader_answer::<()>(Err(leader)).unwrap_err();
        assert_eq!(reason(&s).as_deref(), Some("NO_LEADER"));
        let s = leader_answer::<()>(Err(Status::unimplemented("no such method"))).unwrap_err();
        assert_eq!(s.code(), Code::Unimplemented);
        assert_eq!(leader_answer(Ok::<u8, Status>(7)).unwrap(), 7);
    }
}
