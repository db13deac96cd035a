//! `WatchMailbox`: replays changes since a MODSEQ, then follows live changes.
//! Changes are read from the replicated change log, so a reconnecting watcher
//! that passes its last MODSEQ resumes without gaps.

use std::sync::Arc;

use mailvault_proto::v1::{ChangeKind, MailboxChange};
use tokio::sync::mpsc;
use tonic::Status;

use super::tenant_keys::names_for;
use crate::ctx::Ctx;
use crate::error;
use crate::state::records::{ChangeKind as Kind, ChangeRecord};

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

/// A stored change as the client sees it: flags and claim holder opened.
fn opened(ctx: &Ctx, tenant: &str, modseq: u64, c: ChangeRecord) -> Result<MailboxChange, Status> {
    let names = names_for(ctx, tenant)?;
    let claimed_by = names.open_agent(c.claimed_by.as_deref()).map_err(error::crypto)?;
    Ok(MailboxChange {
        modseq,
        uid: c.uid,
        kind: kind(c.kind) as i32,
        flags: names.open_flags(&c.flags).map_err(error::crypto)?,
        claimed_by,
    })
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
                let change = match opened(&ctx, &tenant, modseq, c) {
                    Ok(change) => change,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
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
