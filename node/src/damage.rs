//! Stored messages this node found damaged: their copy here failed
//! authentication (a flipped bit, a moved record). Each is reported once —
//! in `NodeStatus.damaged`, as `mailvault_damaged_messages` in `/metrics` and
//! as a `damage-found` audit record — while reads of it are served from a
//! healthy replica. Quarantine and re-seeding come with self-healing; this
//! list lives until the node restarts (the next read finds it again).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::audit::AuditRecorder;
use crate::clock::now_ms;
use crate::state::audit::AuditEvent;
use crate::state::types::NodeId;

/// The part of a message that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Its encrypted headers (the summary).
    Headers,
    /// A chunk of its body.
    Body,
    /// Its record (flags, claim, sizes): it failed its binding to its key.
    Record,
}

impl Part {
    /// The name shown in status and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Headers => "headers",
            Part::Body => "body",
            Part::Record => "record",
        }
    }
}

/// One damaged message, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// Its tenant.
    pub tenant: String,
    /// Its mailbox.
    pub mailbox: String,
    /// Its UID.
    pub uid: u32,
    /// The part that failed first.
    pub part: Part,
    /// When this node found it.
    pub found_ms: i64,
}

/// The damaged messages this node has found.
#[derive(Clone)]
pub struct DamageReport {
    node: NodeId,
    audit: AuditRecorder,
    found: Arc<Mutex<BTreeMap<(String, String, u32), Damaged>>>,
}

impl DamageReport {
    /// An empty report for node `node`, audited through `audit`.
    pub fn new(node: NodeId, audit: AuditRecorder) -> DamageReport {
        metrics::gauge!("mailvault_damaged_messages").set(0.0);
        DamageReport {
            node,
            audit,
            found: Arc::default(),
        }
    }

    /// Records that this node's copy of a message failed; the first time,
    /// it is counted and audited. Returns whether it was new.
    pub fn found(&self, tenant: &str, mailbox: &str, uid: u32, part: Part) -> bool {
        let key = (tenant.to_string(), mailbox.to_string(), uid);
        let count = {
            let mut found = self.found.lock().expect("damage lock");
            if found.contains_key(&key) {
                return false;
            }
            found.insert(
                key,
                Damaged {
                    tenant: tenant.to_string(),
                    mailbox: mailbox.to_string(),
                    uid,
                    part,
                    found_ms: now_ms(),
                },
            );
            found.len()
        };
        metrics::gauge!("mailvault_damaged_messages").set(count as f64);
        tracing::error!(
            tenant,
            mailbox,
            uid,
            part = part.as_str(),
            "a stored message failed authentication"
        );
        let event = AuditEvent::new(
            &format!("node:{}", self.node),
            None,
            "damage-found",
            &format!("{tenant}/{mailbox}/{uid}"),
            &format!("damaged: stored {} failed authentication", part.as_str()),
        );
        let audit = self.audit.clone();
        tokio::spawn(async move {
            let _ = audit.record(event).await;
        });
        true
    }

    /// Every damaged message found so far, by tenant, mailbox and UID.
    pub fn list(&self) -> Vec<Damaged> {
        self.found
            .lock()
            .expect("damage lock")
            .values()
            .cloned()
            .collect()
    }
}
