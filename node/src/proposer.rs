//! Group commit: concurrent client commands are packed into one Raft entry
//! (bounded by bytes), so one fsync serves many writes.
//!
//! One task takes commands from a queue. It drains whatever has queued up
//! (up to `max_batch_bytes`) into a batch and proposes it, keeping at most
//! `max_batches_in_flight` batches that are not full (default 1) in flight;
//! while they commit, new commands queue up and form the next, larger batch.
//! Full batches (large messages) go at once, a few at a time. openraft 0.9
//! keeps one AppendEntries call in flight per follower, so more entries in
//! flight do not overlap much: they mostly wait in openraft's queue, each
//! costing its own fsync on every node (measured at 16 clients, when the
//! leader still synced each entry before replicating it: one in flight gave
//! the most writes/s and 0.125 fsyncs per write per node, against 0.23 with
//! four).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::state::command::{Command, CommandResult};
use crate::state::types::{Batch, NodeId, Raft};
use crate::workers::{Kind, Supervisor};

/// Why a proposal did not produce a result.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ProposeError {
    /// This node is not the leader (the leader, if known).
    #[error("not the leader")]
    NotLeader(Option<NodeId>),
    /// The outcome is unknown (timeout or leadership lost); retry with the same idempotency key.
    #[error("write outcome unknown: {0}")]
    Unknown(String),
    /// The node stopped before the command was proposed: it was not written.
    #[error("raft stopped")]
    Stopped,
}

struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<CommandResult, ProposeError>>,
}

/// Handle to the group-commit task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    timeout: Duration,
    hold: Arc<watch::Sender<Option<Instant>>>,
}

impl Proposer {
    /// Starts the group-commit task, as the essential worker `proposer`.
    pub fn start(
        raft: Raft,
        max_batch_bytes: usize,
        in_flight: usize,
        timeout: Duration,
        workers: &Supervisor,
    ) -> Proposer {
        let (tx, rx) = mpsc::channel(16 * 1024);
        let (hold, held) = watch::channel(None);
        workers.spawn("proposer", Kind::Essential, async move {
            run(raft, rx, max_batch_bytes, in_flight, held).await;
            Ok(())
        });
        Proposer {
            tx,
            timeout,
            hold: Arc::new(hold),
        }
    }

    /// Holds new batches back (they gather, and are proposed once released)
    /// for at most `d`: a leadership transfer lets the target catch up with
    /// a log that stops growing, so that its vote request is up to date.
    pub fn hold_for(&self, d: Duration) {
        self.hold.send_replace(Some(Instant::now() + d));
    }

    /// Ends a hold.
    pub fn release(&self) {
        self.hold.send_replace(None);
    }

    /// Proposes one command and waits for its result.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { command, reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Unknown("proposal dropped".into())),
            Err(_) => Err(ProposeError::Unknown("commit timed out".into())),
        }
    }
}

/// Full batches proposed concurrently, at most (see [`run`]).
const MAX_FULL_IN_FLIGHT: usize = 4;

/// Commands gathered for one Raft entry.
struct Gathering {
    batch: Vec<Pending>,
    bytes: usize,
    max_bytes: usize,
}

impl Gathering {
    fn push(&mut self, p: Pending) {
        self.bytes += p.command.approx_bytes();
        self.batch.push(p);
    }

    fn full(&self) -> bool {
        self.bytes >= self.max_bytes
    }

    /// Takes what has queued up, until the batch is full.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Pending>) {
        while !self.full() {
            match rx.try_recv() {
                Ok(p) => self.push(p),
                Err(_) => break,
            }
        }
    }
}

/// The group-commit loop. A batch that is not full waits until fewer than
/// `in_flight` batches are committing, gathering the commands that arrive
/// meanwhile, so that under load commands share entries (and fsyncs). A full
/// batch cannot gain by waiting (large messages, each chunk about a batch):
/// it goes at once, up to [`MAX_FULL_IN_FLIGHT`] batches in flight, so that
/// the follower's part of one entry overlaps the leader's part of the next.
async fn run(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    max_batch_bytes: usize,
    in_flight: usize,
    mut held: watch::Receiver<Option<Instant>>,
) {
    let partial = Arc::new(Semaphore::new(in_flight));
    let all = Arc::new(Semaphore::new(in_flight.max(MAX_FULL_IN_FLIGHT)));
    while let Some(first) = rx.recv().await {
        let mut g = Gathering {
            batch: Vec::new(),
            bytes: 0,
            max_bytes: max_batch_bytes,
        };
        g.push(first);
        g.drain(&mut rx);
        let mut partial_permit = None;
        while !g.full() {
            tokio::select! {
                permit = partial.clone().acquire_owned() => {
                    partial_permit = Some(permit.expect("semaphore open"));
                    g.drain(&mut rx);
                    break;
                }
                next = rx.recv() => match next {
                    Some(p) => {
                        g.push(p);
                        g.drain(&mut rx);
                    }
                    None => break,
                },
            }
        }
        // Held (a leadership transfer): wait until released or expired.
        loop {
            let until = *held.borrow_and_update();
            match until {
                Some(t) if t > Instant::now() => {
                    let _ = tokio::time::timeout_at(t.into(), held.changed()).await;
                }
                _ => break,
            }
        }
        let permit = all.clone().acquire_owned().await.expect("semaphore open");
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, g.batch).await;
            drop(permit);
            drop(partial_permit);
        });
    }
}

async fn commit(raft: &Raft, batch: Vec<Pending>) {
    let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let n = commands.len();
    let started = Instant::now();
    let res = raft.client_write(Batch { commands }).await;
    metrics::histogram!("mailvault_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("mailvault_commands_per_entry").record(n as f64);
    match res {
        Ok(resp) => {
            let mut results = resp.data.results.into_iter();
            for reply in replies {
                let r = results
                    .next()
                    .ok_or_else(|| ProposeError::Unknown("missing result".into()));
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            let err = match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    ProposeError::NotLeader(f.leader_id)
                }
                RaftError::APIError(other) => ProposeError::Unknown(other.to_string()),
                // Raft stopped with the batch submitted: it may have been
                // replicated and committed by the others.
                RaftError::Fatal(_) => ProposeError::Unknown("raft stopped during the commit".into()),
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
