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

use std::sync::{Arc, Mutex};

use tonic::Status;

use crate::error::{ApiError, Reason};
use crate::state::types::{Batch, Raft};

/// Shared by the local read path and the peer `ReadIndex` service.
#[derive(Clone)]
pub struct ReadFence {
    raft: Raft,
    /// (term, log index) of the empty entry this process committed as leader.
    fenced: Arc<Mutex<Option<(u64, u64)>>>,
    /// Serialises fence writes so concurrent first reads make one entry.
    writing: Arc<tokio::sync::Mutex<()>>,
}

impl ReadFence {
    /// A fence over `raft`.
    pub fn new(raft: Raft) -> ReadFence {
        ReadFence {
            raft,
            fenced: Arc::default(),
            writing: Arc::default(),
        }
    }

    fn current(&self, term: u64) -> Option<u64> {
        let f = *self.fenced.lock().expect("fence lock");
        f.filter(|(t, _)| *t == term).map(|(_, i)| i)
    }

    /// The log index a read on this leader must cover, committing (and
    /// applying) an empty entry first if this term has none of this process.
    pub async fn index(&self) -> Result<u64, Status> {
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
