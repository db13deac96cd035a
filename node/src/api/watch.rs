//! `WatchMailbox`: replays changes since a MODSEQ, then follows live changes.
//! Changes are read from the replicated change log, so a reconnecting watcher
//! that passes its last MODSEQ resumes without gaps.

use std::sync::Arc;

use mailvault_proto::v1::{ChangeKind, MailboxChange};
use tokio::sync::mpsc;
use tonic::Status;

use crate::ctx::Ctx;
use crate::error;
use crate::state::records::ChangeKind as Kind;

const BATCH: usize = 256;

fn kind(k: Kind) -> ChangeKind {
    match k {
        Kind::Appended => ChangeKind::Appended,
        Kind::Flags => ChangeKind::Flags,
        Kind::Claimed => ChangeKind::Claimed,
        Kind::Released => ChangeKind::Released,
        Kind::Expunged => ChangeKind::Expunged,
    }
}

/// Starts a watcher task; it ends when the client goes away.
pub fn start(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
    since: u64,
) -> mpsc::Receiver<Result<MailboxChange, Status>> {
    let (tx, rx) = mpsc::channel(BATCH);
    tokio::spawn(async move {
        let mut applied = ctx.applied.clone();
        let mut last = since;
        loop {
            // Mark the current applied index seen before scanning, so a change
            // applied during the scan wakes the next round.
            applied.borrow_and_update();
            let changes = match ctx.reader.changes(&tenant, &mailbox, last, BATCH) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(error::read(e).into())).await;
                    return;
                }
            };
            let full = changes.len() == BATCH;
            for (modseq, c) in changes {
                last = modseq;
                let change = MailboxChange {
                    modseq,
                    uid: c.uid,
                    kind: kind(c.kind) as i32,
                    flags: c.flags,
                    claimed_by: c.claimed_by.unwrap_or_default(),
                };
                if tx.send(Ok(change)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    rx
}
