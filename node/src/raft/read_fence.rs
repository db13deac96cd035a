//! The leader's read fence: a linearizable read on a leader must also cover
//! an entry this process committed in its current term.
//!
//! openraft 0.9 restores a restarted node's leadership at once, without an
//! election. Its read index is then the larger of its term's first entry and
//! the commit index it finds on disk — both can lie before entries that were
//! committed and acknowledged just before the restart (the commit index is
//! learned again only when the next entry commits). A read served there would
//! miss acknowledged writes. The chaos suite's power-loss scenario found this:
//! a read lacked a message acknowledged 3 s earlier, which came back later.
//!
//! So the first read after a node takes or restores leadership first commits
//! an empty entry; committing it commits everything before it. The cost is
//! one empty entry per term.
//!
//! [`ReadBarrier`] is what a read waits on before it is served: on the
//! leader, the fence and a quorum's confirmation of its leadership (read
//! index); on a follower, the leader's read index and its own apply of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use super::PeerClients;
use crate::error::{ApiError, Reason};
use crate::state::types::{Batch, NodeId, Raft};

/// How long a read waits to reach its linearizable read point.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared by the local read path and the peer `ReadIndex` service.
#[derive(Clone)]
pub struct ReadFence {
    raft: Raft,
    /// (term, log index) of the empty entry this process committed as leader.
    fenced: Arc<Mutex<Option<(u64, u64)>>>,
    /// Serialises fence writes so concurrent first reads make one entry.
    writing: Arc<tokio::sync::Mutex<()>>,
    /// Until when reads wait before they confirm leadership (a handover
    /// keeps the leader silent; see `leadership::Handover`).
    held: Arc<watch::Sender<Option<tokio::time::Instant>>>,
}

impl ReadFence {
    /// A fence over `raft`.
    pub fn new(raft: Raft) -> ReadFence {
        ReadFence {
            raft,
            fenced: Arc::default(),
            writing: Arc::default(),
            held: Arc::new(watch::channel(None).0),
        }
    }

    /// Makes reads wait (at most `d`) before they confirm leadership, which
    /// sends Raft messages that would renew the followers' leader lease.
    pub fn hold_for(&self, d: Duration) {
        self.held.send_replace(Some(tokio::time::Instant::now() + d));
    }

    /// Ends a hold.
    pub fn release(&self) {
        self.held.send_replace(None);
    }

    async fn unheld(&self) {
        let mut held = self.held.subscribe();
        loop {
            let until = *held.borrow_and_update();
            match until {
                Some(t) if t > tokio::time::Instant::now() => {
                    let _ = tokio::time::timeout_at(t, held.changed()).await;
                }
                _ => return,
            }
        }
    }

    fn current(&self, term: u64) -> Option<u64> {
        let f = *self.fenced.lock().expect("fence lock");
        f.filter(|(t, _)| *t == term).map(|(_, i)| i)
    }

    /// The log index a read on this leader must cover, committing (and
    /// applying) an empty entry first if this term has none of this process.
    pub async fn index(&self) -> Result<u64, Status> {
        self.unheld().await;
        let term = self.raft.metrics().borrow().current_term;
        if let Some(i) = self.current(term) {
            return Ok(i);
        }
        let _one = self.writing.lock().await;
        if let Some(i) = self.current(term) {
            return Ok(i);
        }
        let resp = self
            .raft
            .client_write(Batch::default())
            .await
            .map_err(|_| ApiError::new(Reason::LeadershipChanged, "leadership changed; retry"))?;
        let log_id = resp.log_id;
        *self.fenced.lock().expect("fence lock") = Some((log_id.leader_id.term, log_id.index));
        Ok(log_id.index)
    }
}

/// Waits until this node may serve a linearizable read.
#[derive(Clone)]
pub struct ReadBarrier {
    id: NodeId,
    raft: Raft,
    fence: ReadFence,
    peers: PeerClients,
    applied: watch::Receiver<u64>,
    /// The `stale_reads` test mode: reads do not wait at all.
    stale: bool,
}

impl ReadBarrier {
    /// A barrier for node `id`, whose applied index `applied` follows.
    pub fn new(
        id: NodeId,
        raft: Raft,
        fence: ReadFence,
        peers: PeerClients,
        applied: watch::Receiver<u64>,
        stale: bool,
    ) -> ReadBarrier {
        ReadBarrier {
            id,
            raft,
            fence,
            peers,
            applied,
            stale,
        }
    }

    /// Waits until this node may serve a linearizable read: the leader
    /// confirms its leadership with a quorum (read index), and this node has
    /// applied up to that index.
    pub async fn wait(&self) -> Result<(), Status> {
        if self.stale {
            return Ok(());
        }
        let leader = super::leader_of(&self.raft);
        if leader.as_ref().is_some_and(|(id, _)| *id == self.id) {
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
                Err(_) => Err(ApiError::new(
                    Reason::LeadershipUnconfirmed,
                    "leadership could not be confirmed in time",
                )
                .into()),
            };
        }
        let Some((_, leader)) = leader else {
            return Err(crate::error::no_leader().into());
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
