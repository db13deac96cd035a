//! Batching audit events into Raft. Events queue on the node that saw the
//! access; a task proposes them in batches (on the leader directly, from a
//! follower through the leader's peer service), so a read does not wait for a
//! Raft round trip — unless `audit.fail_closed` is set, in which case the
//! access waits until its record is committed and fails if it cannot be.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mailvault_proto::raft::RaftPayload;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::error::{ApiError, Reason};
use crate::proposer::Proposer;
use crate::raft::{leader_peer, LeaderPeer, PeerClients};
use crate::state::audit::AuditEvent;
use crate::state::codec::encode;
use crate::state::command::Command;
use crate::state::types::Raft;
use crate::workers::{Kind, Supervisor};

const BATCH: usize = 512;
const LINGER: Duration = Duration::from_millis(20);
const QUEUE: usize = 65_536;

struct Item {
    event: AuditEvent,
    done: Option<oneshot::Sender<bool>>,
}

/// Queues audit events for replication.
#[derive(Clone)]
pub struct AuditRecorder {
    tx: mpsc::Sender<Item>,
    /// The config's, until the replicated settings say otherwise
    /// ([`AuditRecorder::set_fail_closed`]).
    fail_closed: Arc<AtomicBool>,
    node: u64,
}

impl AuditRecorder {
    /// Starts the batching task, as the essential worker `audit-recorder`.
    pub fn start(
        node: u64,
        raft: Raft,
        proposer: Proposer,
        peers: PeerClients,
        fail_closed: bool,
        workers: &Supervisor,
    ) -> AuditRecorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        workers.spawn("audit-recorder", Kind::Essential, async move {
            run(rx, raft, proposer, peers).await;
            Ok(())
        });
        AuditRecorder {
            tx,
            fail_closed: Arc::new(AtomicBool::new(fail_closed)),
            node,
        }
    }

    /// Records an event. With `fail_closed`, waits until it is committed and
    /// fails `UNAVAILABLE` if it cannot be; otherwise only queues it.
    pub async fn record(&self, event: AuditEvent) -> Result<(), Status> {
        self.submit(event, self.fail_closed()).await
    }

    /// Records an event and waits until it is committed, whatever
    /// `fail_closed` says (for records that change something: an unlock).
    pub async fn record_committed(&self, event: AuditEvent) -> Result<(), Status> {
        self.submit(event, true).await
    }

    async fn submit(&self, mut event: AuditEvent, wait: bool) -> Result<(), Status> {
        event.node = self.node;
        if !wait {
            if self.tx.try_send(Item { event, done: None }).is_err() {
                metrics::counter!("mailvault_audit_dropped_total").increment(1);
                tracing::error!("audit queue full; an audit record was dropped");
            }
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Item {
                event,
                done: Some(done),
            })
            .await
            .map_err(|_| ApiError::new(Reason::AuditUnavailable, "audit log unavailable"))?;
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(ApiError::new(
                Reason::AuditUnavailable,
                "the access could not be recorded in the audit log; refused",
            )
            .into()),
        }
    }

    /// Whether accesses wait for their audit record.
    pub fn fail_closed(&self) -> bool {
        self.fail_closed.load(Ordering::Relaxed)
    }

    /// Follows the replicated audit settings (or the config, while none
    /// are stored).
    pub fn set_fail_closed(&self, on: bool) {
        if self.fail_closed.swap(on, Ordering::Relaxed) != on {
            tracing::info!(fail_closed = on, "audit fail_closed changed");
        }
    }
}

async fn run(mut rx: mpsc::Receiver<Item>, raft: Raft, proposer: Proposer, peers: PeerClients) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => batch.push(item),
                _ => break,
            }
        }
        let events: Vec<AuditEvent> = batch.iter().map(|i| i.event.clone()).collect();
        let mut ok = false;
        for attempt in 0..50 {
            match submit(&raft, &proposer, &peers, &events).await {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    if attempt == 0 {
                        tracing::warn!(error = %e, events = events.len(), "audit batch not committed yet; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if !ok {
            metrics::counter!("mailvault_audit_dropped_total").increment(events.len() as u64);
            tracing::error!(events = events.len(), "audit batch could not be committed");
        }
        metrics::counter!("mailvault_audit_records_total").increment(events.len() as u64);
        for item in batch {
            if let Some(done) = item.done {
                let _ = done.send(ok);
            }
        }
    }
}

async fn submit(
    raft: &Raft,
    proposer: &Proposer,
    peers: &PeerClients,
    events: &[AuditEvent],
) -> Result<(), String> {
    match leader_peer(raft, peers)? {
        LeaderPeer::Here => proposer
            .propose(Command::Audit {
                events: events.to_vec(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        LeaderPeer::There(mut c) => {
            let mut req = tonic::Request::new(RaftPayload {
                data: encode(&events),
            });
            req.set_timeout(Duration::from_secs(5));
            c.propose_audit(req)
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string())
        }
    }
}
