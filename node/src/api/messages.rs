//! Reading messages: summaries, listing, and streaming a body back.

use std::sync::Arc;

use mailvault_proto::v1::get_message_response::Frame;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::{
    ExportedMessage, GetMessageRequest, GetMessageResponse, ListMessagesRequest, ListMessagesResponse,
    MessageSummary,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use super::tenant_keys::{cipher_for, names_for};
use crate::access::{mask_address, mask_addresses_in, Principal};
use crate::crypto::HEADERS_CHUNK;
use crate::ctx::Ctx;
use crate::damage::Part;
use crate::error;
use crate::forward::forwarded;
use crate::state::codec::decode;
use crate::state::command::Refusal;
use crate::state::records::{HeaderSummary, MessageRecord};
use crate::store::StoredMessage;

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
        subject: h.subject,
        from: h.from,
        to: h.to,
        date: h.date,
        damaged: false,
        ..record_summary(ctx, tenant, m)?
    })
}

/// What a message's record says, its flags and claim holder opened.
fn record_summary(ctx: &Ctx, tenant: &str, m: &MessageRecord) -> Result<MessageSummary, Status> {
    let names = names_for(ctx, tenant)?;
    let claimed_by = names.open_agent(m.claimed_by.as_deref()).map_err(error::crypto)?;
    Ok(MessageSummary {
        uid: m.uid,
        modseq: m.modseq,
        flags: names.open_flags(&m.flags).map_err(error::crypto)?,
        internal_date_ms: m.internal_date_ms,
        size: m.size,
        claimed_by,
        ..Default::default()
    })
}

/// What a listing says of a damaged message: what its record knows if the
/// record is whole (its headers did not authenticate), else its UID only.
fn damaged_summary(ctx: &Ctx, tenant: &str, m: &StoredMessage) -> MessageSummary {
    let known = match m {
        Ok(m) => record_summary(ctx, tenant, m).ok(),
        Err(_) => None,
    };
    MessageSummary {
        uid: uid_of(m),
        damaged: true,
        ..known.unwrap_or_default()
    }
}

fn uid_of(m: &StoredMessage) -> u32 {
    match m {
        Ok(m) => m.uid,
        Err(uid) => *uid,
    }
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
            let uid = uid_of(&m);
            if uid > max {
                return false;
            }
            // A damaged record's MODSEQ is unknown: it is listed.
            if m.as_ref().is_ok_and(|m| m.modseq <= req.changed_since) {
                return true;
            }
            if records.len() == page {
                next = Some(uid);
                return false;
            }
            records.push(m);
            true
        })
        .map_err(error::read)?;
    // A message whose copy here fails authentication is listed as damaged;
    // it does not take the listing down.
    let messages = records
        .iter()
        .map(|stored| {
            let found = match stored {
                Ok(m) => summary(ctx, tenant, mailbox, m, view_addresses).map_err(|e| (e, Part::Headers)),
                Err(_) => Err((error::damaged_record().into(), Part::Record)),
            };
            match found {
                Ok(s) => Ok(s),
                Err((e, part)) if e.code() == Code::DataLoss => {
                    ctx.damage.found(tenant, mailbox, uid_of(stored), part);
                    Ok(damaged_summary(ctx, tenant, stored))
                }
                Err((e, _)) => Err(e),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(ListMessagesResponse {
        messages,
        next_page_token: next.map(|u| u.to_string()).unwrap_or_default(),
        highest_modseq: mbox.highest_modseq,
    })
}

/// Where a message whose copy here is damaged is read instead: the other
/// replicas, asked on the caller's behalf with the same request. `None` when
/// this call is itself such a read (it is never passed on again).
pub struct Fallback {
    /// The caller's request.
    pub request: GetMessageRequest,
    /// The caller.
    pub principal: Option<Principal>,
}

type Frames = mpsc::Sender<Result<GetMessageResponse, Status>>;

/// Streams a message whose record here failed its check: reported, and read
/// whole from a healthy replica (see [`Fallback`]).
pub fn from_replicas_only(
    ctx: Arc<Ctx>,
    tenant: &str,
    mailbox: &str,
    uid: u32,
    fallback: Option<Fallback>,
) -> mpsc::Receiver<Result<GetMessageResponse, Status>> {
    let (tx, rx) = mpsc::channel(2);
    ctx.damage.found(tenant, mailbox, uid, Part::Record);
    tokio::spawn(from_replicas(
        ctx,
        fallback,
        0,
        tx,
        error::damaged_record().into(),
    ));
    rx
}

/// Streams a message: its summary, then its decrypted chunks, one at a time.
/// A part that fails authentication here is reported, and the rest of the
/// message comes from a healthy replica (see [`Fallback`]).
pub fn stream(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
    m: MessageRecord,
    view_addresses: bool,
    fallback: Option<Fallback>,
) -> Result<mpsc::Receiver<Result<GetMessageResponse, Status>>, Status> {
    let (tx, rx) = mpsc::channel(2);
    let first = match summary(&ctx, &tenant, &mailbox, &m, view_addresses) {
        Ok(first) => first,
        Err(e) if e.code() == Code::DataLoss => {
            ctx.damage.found(&tenant, &mailbox, m.uid, Part::Headers);
            tokio::spawn(from_replicas(ctx, fallback, 0, tx, e));
            return Ok(rx);
        }
        Err(e) => return Err(e),
    };
    if !view_addresses {
        return masked_stream(ctx, tenant, mailbox, m, first, fallback);
    }
    let cipher = cipher_for(&ctx, &tenant, &mailbox, m.blob, Some(m.key_version))?;
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
            match frame {
                Err(e) if e.code() == Code::DataLoss => {
                    // The metadata and chunks 0..i are sent: the replica's
                    // stream continues after as many frames.
                    ctx.damage.found(&tenant, &mailbox, m.uid, Part::Body);
                    let sent = 1 + i as usize;
                    tokio::spawn(from_replicas(ctx.clone(), fallback, sent, tx, e));
                    return;
                }
                Err(e) => {
                    send(Err(e));
                    return;
                }
                Ok(f) => {
                    if !send(Ok(f)) {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// Sends the frames of a healthy replica's copy after the first `skip`
/// (those this node already sent), trying each other member in turn; when
/// none has it whole, or there is no fallback, the caller gets `damage`.
/// Chunk frames are the stored chunks, the same on every replica, so a
/// stream broken by a damaged chunk continues exactly where it stopped.
async fn from_replicas(ctx: Arc<Ctx>, fallback: Option<Fallback>, skip: usize, tx: Frames, damage: Status) {
    let Some(fallback) = fallback else {
        let _ = tx.send(Err(damage)).await;
        return;
    };
    for ch in ctx.router.replicas() {
        let mut client = MailboxClient::new(ch)
            .max_decoding_message_size(ctx.max_frame())
            .max_encoding_message_size(ctx.max_frame());
        let request = forwarded(fallback.request.clone(), fallback.principal.as_ref());
        let Ok(answer) = client.get_message(request).await else {
            continue;
        };
        let mut frames = answer.into_inner();
        let mut seen = 0usize;
        loop {
            match frames.next().await {
                Some(Ok(f)) => {
                    seen += 1;
                    if seen > skip && tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                // Nothing of this replica's copy passed on yet: try the next.
                Some(Err(_)) if seen <= skip => break,
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                None if seen > skip => return,
                None => break,
            }
        }
    }
    let _ = tx.send(Err(damage)).await;
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

/// Streams every message of a mailbox, in UID order, one at a time. A
/// message whose copy here fails authentication is reported and exported
/// from a healthy replica (asked on the caller's behalf; never when this
/// call was itself passed on).
pub fn export(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
    principal: Option<Principal>,
    passed_on: bool,
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
            let Some(last) = batch.last().map(uid_of) else {
                return;
            };
            for stored in &batch {
                let local = match stored {
                    Ok(m) => match summary(&ctx, &tenant, &mailbox, m, true) {
                        Ok(metadata) => match body(&ctx, &tenant, &mailbox, m) {
                            Ok(raw) => Ok(ExportedMessage {
                                metadata: Some(metadata),
                                raw,
                            }),
                            Err(e) => Err((e, Part::Body)),
                        },
                        Err(e) => Err((e, Part::Headers)),
                    },
                    Err(_) => Err((error::damaged_record().into(), Part::Record)),
                };
                let uid = uid_of(stored);
                let item = match local {
                    Ok(item) => Ok(item),
                    Err((e, part)) if e.code() == Code::DataLoss => {
                        ctx.damage.found(&tenant, &mailbox, uid, part);
                        let fallback = (!passed_on).then(|| Fallback {
                            request: GetMessageRequest {
                                tenant: tenant.clone(),
                                mailbox: mailbox.clone(),
                                uid,
                            },
                            principal: principal.clone(),
                        });
                        tokio::runtime::Handle::current().block_on(whole_from_replicas(
                            ctx.clone(),
                            fallback,
                            e,
                        ))
                    }
                    Err((e, _)) => Err(e),
                };
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

/// A whole message from a healthy replica (see [`from_replicas`]), as an export item.
async fn whole_from_replicas(
    ctx: Arc<Ctx>,
    fallback: Option<Fallback>,
    damage: Status,
) -> Result<ExportedMessage, Status> {
    let (tx, mut rx) = mpsc::channel(2);
    tokio::spawn(from_replicas(ctx, fallback, 0, tx, damage));
    let (mut metadata, mut raw) = (None, Vec::new());
    while let Some(frame) = rx.recv().await {
        match frame?.frame {
            Some(Frame::Metadata(m)) => metadata = Some(m),
            Some(Frame::Chunk(c)) => raw.extend_from_slice(&c),
            None => {}
        }
    }
    match metadata {
        Some(m) => Ok(ExportedMessage {
            metadata: Some(m),
            raw,
        }),
        None => Err(error::damaged("no replica returned the message whole").into()),
    }
}

/// Streams a message with every address masked (for principals without
/// `ViewAddresses`): the body is decrypted whole, masked, then chunked; a
/// body that fails authentication here is read from a healthy replica.
fn masked_stream(
    ctx: Arc<Ctx>,
    tenant: String,
    mailbox: String,
    m: MessageRecord,
    first: MessageSummary,
    fallback: Option<Fallback>,
) -> Result<mpsc::Receiver<Result<GetMessageResponse, Status>>, Status> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let raw = match body(&ctx, &tenant, &mailbox, &m) {
            Ok(raw) => raw,
            Err(e) if e.code() == Code::DataLoss => {
                ctx.damage.found(&tenant, &mailbox, m.uid, Part::Body);
                tokio::spawn(from_replicas(ctx.clone(), fallback, 0, tx, e));
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let frames = std::iter::once(Frame::Metadata(first)).chain(
            mask_addresses_in(&raw)
                .chunks(ctx.config.limits.chunk_bytes)
                .map(|c| Frame::Chunk(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        for frame in frames {
            if tx
                .blocking_send(Ok(GetMessageResponse { frame: Some(frame) }))
                .is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}
