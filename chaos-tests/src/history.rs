//! What a chaos run did and saw, as JSON lines, kept for replay.
//!
//! Every line is one [`Event`]. Message bodies are not stored: a message is
//! identified by its idempotency key (also its subject) and a digest of the
//! exact bytes the client wrote, so the checker can tell whether what a read
//! returned is what a client wrote.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// How an append ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged with this UID: it must be present exactly once, forever.
    Ok {
        /// The UID the cluster assigned.
        uid: u32,
    },
    /// Refused for certain (the request itself was wrong): must be absent.
    Failed,
    /// Timed out or the connection broke: may be present or absent, never twice.
    Indeterminate,
}

/// An operation on a shared message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SharedOp {
    /// Claim it for the agent.
    Claim,
    /// Release the agent's claim.
    Release,
    /// Toggle a flag with `unchanged_since` set to this MODSEQ.
    SetFlagsIfUnchanged {
        /// The MODSEQ the update was conditional on.
        since: u64,
    },
    /// Read its summary (claimant and MODSEQ).
    Read,
}

/// How an operation on a shared message ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SharedOutcome {
    /// It took effect (a read: it returned).
    Ok {
        /// The message's MODSEQ the response named.
        modseq: u64,
        /// For a read: the claimant it saw (`None`: unclaimed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        claimed_by: Option<String>,
    },
    /// Refused for certain (claimed by another agent; not the claimant; modified since).
    Refused,
    /// Timed out or the connection broke: it may or may not have taken effect.
    Indeterminate,
}

/// One change a watch delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its MODSEQ.
    pub modseq: u64,
    /// The message.
    pub uid: u32,
    /// True when the change is the message's arrival.
    pub appended: bool,
}

/// One message as a read returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Its UID.
    pub uid: u32,
    /// Its idempotency key (the workload uses it as the subject).
    pub key: String,
    /// Digest of the bytes returned, if the read fetched the body.
    pub digest: Option<String>,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// An append, from its start to its end.
    Append {
        /// The client that made it.
        client: u32,
        /// The mailbox.
        mailbox: String,
        /// Idempotency key, unique per message.
        key: String,
        /// Digest of the bytes written.
        digest: String,
        /// Start, in milliseconds since the run began.
        start_ms: u64,
        /// End, in milliseconds since the run began.
        end_ms: u64,
        /// How it ended.
        outcome: Outcome,
    },
    /// A successful linearizable listing of a mailbox during the run.
    Read {
        /// The client that made it.
        client: u32,
        /// The node that served it.
        node: usize,
        /// The mailbox.
        mailbox: String,
        /// Start, in milliseconds since the run began.
        start_ms: u64,
        /// End, in milliseconds since the run began.
        end_ms: u64,
        /// What it returned, in UID order.
        messages: Vec<Seen>,
    },
    /// A node's whole copy of a mailbox after the last heal, bodies included.
    Final {
        /// The node.
        node: usize,
        /// The mailbox.
        mailbox: String,
        /// Every message, in UID order, each with the digest of its bytes.
        messages: Vec<Seen>,
    },
    /// A claim, release, conditional flag update or read of a shared
    /// message, from its start to its end.
    Shared {
        /// The client that made it.
        client: u32,
        /// The mailbox.
        mailbox: String,
        /// The message.
        uid: u32,
        /// The agent making it.
        agent: String,
        /// What it did.
        what: SharedOp,
        /// Start, in milliseconds since the run began.
        start_ms: u64,
        /// End, in milliseconds since the run began.
        end_ms: u64,
        /// How it ended.
        outcome: SharedOutcome,
    },
    /// A watch of a mailbox from MODSEQ 0, and the changes it delivered.
    Watch {
        /// The client that made it.
        client: u32,
        /// The node that served it.
        node: usize,
        /// The mailbox.
        mailbox: String,
        /// Start, in milliseconds since the run began.
        start_ms: u64,
        /// End, in milliseconds since the run began.
        end_ms: u64,
        /// The changes, in the order delivered.
        changes: Vec<Change>,
    },
    /// A fault injected or healed (for the reader of the history; not checked).
    Fault {
        /// When, in milliseconds since the run began.
        at_ms: u64,
        /// What.
        what: String,
    },
}

/// The digest the history uses for message bytes (SHA-256, hex).
pub fn digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A history being recorded: shared by the workload tasks, written out at the end.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// Starts the clock.
    pub fn new() -> Recorder {
        Recorder {
            started: Instant::now(),
            events: Arc::default(),
        }
    }

    /// Milliseconds since the run began.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Adds an event.
    pub fn push(&self, e: Event) {
        self.events.lock().expect("history lock").push(e);
    }

    /// Notes a fault.
    pub fn fault(&self, what: impl Into<String>) {
        let at_ms = self.now_ms();
        self.push(Event::Fault {
            at_ms,
            what: what.into(),
        });
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("history lock").clone()
    }

    /// Writes the history as JSON lines.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for e in self.events() {
            serde_json::to_writer(&mut f, &e)?;
            f.write_all(b"\n")?;
        }
        f.flush()
    }
}

/// Reads a history written by [`Recorder::save`].
pub fn load(path: &Path) -> std::io::Result<Vec<Event>> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    f.lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|l| serde_json::from_str(&l?).map_err(std::io::Error::other))
        .collect()
}
