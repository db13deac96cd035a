//! Group commit: concurrent client commands are packed into one Raft entry
//! (bounded by bytes), so one fsync serves many writes.
//!
//! One task takes commands from a queue. It drains whatever has queued up
//! (up to `max_batch_bytes`) into a batch and proposes it, keeping a few
//! batches in flight; while they commit, new commands queue up and form the
//! next, larger batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::command::{Command, CommandResult};
use crate::types::{Batch, NodeId, Raft};

/// Batches proposed concurrently.
const MAX_IN_FLIGHT: usize = 4;

/// Why a proposal did not produce a result.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ProposeError {
    /// This node is not the leader (the leader, if known).
    #[error("not the leader")]
    NotLeader(Option<NodeId>),
    /// The outcome is unknown (timeout or leadership lost); retry with the same idempotency key.
    #[error("write outcome unknown: {0}")]
    Unknown(String),
    /// Raft stopped.
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
}

impl Proposer {
    /// Starts the group-commit task.
    pub fn start(raft: Raft, max_batch_bytes: usize, timeout: Duration) -> Proposer {
        let (tx, rx) = mpsc::channel(16 * 1024);
        tokio::spawn(run(raft, rx, max_batch_bytes));
        Proposer { tx, timeout }
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

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>, max_batch_bytes: usize) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let mut bytes = first.command.approx_bytes();
        let mut batch = vec![first];
        while bytes < max_batch_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.command.approx_bytes();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(permit);
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
                RaftError::Fatal(_) => ProposeError::Stopped,
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
