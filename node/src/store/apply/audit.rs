//! The audit domain: events become hash-chained records, numbered and hashed
//! here, at apply, so every replica holds the same chain.

use super::{Decided, Tx};
use crate::state::audit::{chain_hash, AuditEvent, AuditHead, AuditRecord};
use crate::state::command::CommandResult;
use crate::state::keys;

impl Tx<'_> {
    pub(super) fn append_audit(&mut self, events: Vec<AuditEvent>) -> Decided {
        let mut head: AuditHead = self.get(keys::AUDIT_HEAD)?.unwrap_or_default();
        for event in events {
            let seq = head.seq + 1;
            let hash = chain_hash(seq, &head.hash, &event);
            let rec = AuditRecord {
                seq,
                event,
                prev_hash: head.hash,
                hash,
            };
            self.put(keys::audit(seq), &rec);
            head = AuditHead { seq, hash };
        }
        self.put(keys::AUDIT_HEAD.to_vec(), &head);
        Ok(Ok(CommandResult::Done))
    }
}
