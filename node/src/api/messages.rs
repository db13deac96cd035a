//! Reading messages: summaries, listing, and streaming a body back.

use std::sync::Arc;

use mailvault_proto::v1::get_message_response::Frame;
use mailvault_proto::v1::{
    ExportedMessage, GetMessageResponse, ListMessagesRequest, ListMessagesResponse, MessageSummary,
};
use tokio::sync::mpsc;
use tonic::Status;

use super::tenant_keys::cipher_for;
use crate::access::{mask_address, mask_addresses_in};
use crate::crypto::HEADERS_CHUNK;
use crate::ctx::Ctx;
use crate::error;
use crate::state::codec::decode;
use crate::state::command::Refusal;
use crate::state::records::{HeaderSummary, MessageRecord};

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// The client-facing summary of a stored message (decrypts its headers).
/// Without `view_addresses`, customer addresses are masked.
pub fn summary(
    ctx: &Ctx,
    tenant: &str,
    mailbox: &str,
    m: &MessageRecord,
    view_addresses: bool,
) -> Result<MessageSummary, Status> {
    let cipher = cipher_for(ctx, tenant, mailbox, m.blob, Some(m.key_version))?;
    let plain = cipher.open(HEADERS_CHUNK, &m.headers)?;
    let mut h: HeaderSummary = decode(&plain).map_err(|_| error::damaged("stored headers are corrupt"))?;
    if !view_addresses {
        h.from = mask_address(&h.from);
        h.to = h.to.iter().map(|a| mask_address(a)).collect();
    }
    Ok(MessageSummary {
        uid: m.uid,
        modseq: m.modseq,
        flags: m.flags.clone(),
        internal_date_ms: m.internal_date_ms,
        size: m.size,
        subject: h.subject,
        from: h.from,
        to: h.to,
        date: h.date,
        claimed_by: m.claimed_by.clone().unwrap_or_default(),
    })
}

/// `ListMessages` after the read barrier.
pub fn list(
    ctx: &Ctx,
    req: &ListMessagesRequest,
    view_addresses: bool,
) -> Result<ListMessagesResponse, Status> {
    let (tenant, mailbox) = (req.tenant.as_str(), req.mailbox.as_str());
    let mbox = ctx
        .reader
        .mailbox(tenant, mailbox)
        .map_err(error::read)?
        .ok_or_else(|| error::refusal(Refusal::NoMailbox))?;
    let page = match req.page_size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    } as usize;
    let from = if req.page_token.is_empty() {
        req.uid_min
    } else {
        req.page_token
            .parse::<u32>()
            .map_err(|_| error::invalid("malformed page_token"))?
            .max(req.uid_min)
    };
    let max = if req.uid_max == 0 { u32::MAX } else { req.uid_max };
    let mut records = Vec::new();
    let mut next = None;
    ctx.reader
        .messages(tenant, mailbox, from, |m| {
            if m.uid > max {
                return false;
            }
            if m.modseq <= req.changed_since {
                return true;
            }
            if records.len() == page {
                next = Some(m.uid);
                return false;
            }
            records.push(m);
            true
        })
        .map_err(error::read)?;
    let messages = records
        .iter()
        .map(|m| summary(ctx, tenant, mailbox, m, view_addresses))
        .collect::<Result<_, _>>()?;
    Ok(ListMessagesResponse {
        messages,
        next_page_token: next.map(|u| u.to_string()).unwrap_or_default(),
        highest_modseq: mbox.highest_modseq,
    })
}

/// Streams a message: its summary, then its decrypted chunks, one at a time.
pub fn stream(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
    m: MessageRecord,
    view_addresses: bool,
) -> Result<mpsc::Receiver<Result<GetMessageResponse, Status>>, Status> {
    let first = summary(&ctx, &tenant, &mailbox, &m, view_addresses)?;
    if !view_addresses {
        return masked_stream(ctx, tenant, mailbox, m, first);
    }
    let cipher = cipher_for(&ctx, &tenant, &mailbox, m.blob, Some(m.key_version))?;
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let send = |r| tx.blocking_send(r).is_ok();
        if !send(Ok(GetMessageResponse {
            frame: Some(Frame::Metadata(first)),
        })) {
            return;
        }
        for i in 0..m.chunks {
            let frame = match ctx.reader.chunk(&tenant, &m.blob, i) {
                Ok(Some(ct)) => cipher
                    .open(i, &ct)
                    .map_err(Status::from)
                    .map(|p| GetMessageResponse {
                        frame: Some(Frame::Chunk(p)),
                    }),
                Ok(None) => Err(error::damaged("a chunk of the message is missing").into()),
                Err(e) => Err(error::read(e).into()),
            };
            let failed = frame.is_err();
            if !send(frame) || failed {
                return;
            }
        }
    });
    Ok(rx)
}

/// Reads a whole body, decrypting every chunk.
fn body(ctx: &Ctx, tenant: &str, mailbox: &str, m: &MessageRecord) -> Result<Vec<u8>, Status> {
    let cipher = cipher_for(ctx, tenant, mailbox, m.blob, Some(m.key_version))?;
    let mut out = Vec::with_capacity(m.size as usize);
    for i in 0..m.chunks {
        let ct = ctx
            .reader
            .chunk(tenant, &m.blob, i)
            .map_err(error::read)?
            .ok_or_else(|| error::damaged("a chunk of the message is missing"))?;
        out.extend_from_slice(&cipher.open(i, &ct)?);
    }
    Ok(out)
}

/// Streams every message of a mailbox, in UID order, one at a time.
pub fn export(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
) -> mpsc::Receiver<Result<ExportedMessage, Status>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut next = 0u32;
        loop {
            let mut batch = Vec::new();
            let res = ctx.reader.messages(&tenant, &mailbox, next, |m| {
                batch.push(m);
                batch.len() < 64
            });
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(error::read(e).into()));
                return;
            }
            let Some(last) = batch.last().map(|m| m.uid) else {
                return;
            };
            for m in &batch {
                let item = summary(&ctx, &tenant, &mailbox, m, true).and_then(|metadata| {
                    Ok(ExportedMessage {
                        metadata: Some(metadata),
                        raw: body(&ctx, &tenant, &mailbox, m)?,
                    })
                });
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
            match last.checked_add(1) {
                Some(n) => next = n,
                None => return,
            }
        }
    });
    rx
}

/// Streams a message with every address masked (for principals without
/// `ViewAddresses`): the body is decrypted whole, masked, then chunked.
fn masked_stream(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
    m: MessageRecord,
    first: MessageSummary,
) -> Result<mpsc::Receiver<Result<GetMessageResponse, Status>>, Status> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let frames =
            std::iter::once(Ok(Frame::Metadata(first))).chain(match body(&ctx, &tenant, &mailbox, &m) {
                Ok(raw) => mask_addresses_in(&raw)
                    .chunks(ctx.config.limits.chunk_bytes)
                    .map(|c| Ok(Frame::Chunk(c.to_vec())))
                    .collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            });
        for f in frames {
            if tx
                .blocking_send(f.map(|frame| GetMessageResponse { frame: Some(frame) }))
                .is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}
