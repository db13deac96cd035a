//! `AppendMessage` on the leader: validate the stream, encrypt the body in
//! bounded chunks, stage large bodies chunk by chunk, then commit the message.

use mailvault_proto::v1::append_message_request::Frame;
use mailvault_proto::v1::{AppendHeader, AppendMessageRequest, AppendMessageResponse};
use serde_bytes::ByteBuf;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use super::tenant_keys::{cipher_for, names_for, new_blob};
use crate::access::{authorize, Principal};
use crate::clock::now_ms;
use crate::crypto::MessageCipher;
use crate::crypto::HEADERS_CHUNK;
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::headers::{summarize, HEADER_SCAN_BYTES};
use crate::names;
use crate::state::codec::encode;
use crate::state::command::{Command, CommandResult, NewMessage};
use crate::state::policy::Action;

/// Handles a whole append stream on the leader.
pub async fn append(
    ctx: &Ctx,
    principal: Option<&Principal>,
    mut stream: Streaming<AppendMessageRequest>,
) -> Result<AppendMessageResponse, Status> {
    let header = match stream.next().await {
        Some(Ok(AppendMessageRequest {
            frame: Some(Frame::Header(h)),
        })) => h,
        Some(Ok(_)) => {
            return Err(
                ApiError::new(Reason::StreamHeaderMissing, "the first frame must be the header").into(),
            )
        }
        Some(Err(e)) => return Err(e),
        None => return Err(ApiError::new(Reason::StreamHeaderMissing, "empty append stream").into()),
    };
    check_header(ctx, &header)?;
    let target = format!("{}/{}", header.tenant, header.mailbox);
    authorize(
        &ctx.gate,
        principal,
        "AppendMessage",
        &header.tenant,
        target,
        Action::Write,
    )
    .await?;
    let (tenant, mailbox) = (header.tenant.as_str(), header.mailbox.as_str());
    // No read barrier on the way in: the state machine checks the mailbox
    // and the idempotency key again when it applies the append, so local
    // state is enough here, and an append costs no extra quorum round. Only
    // a mailbox missing locally is looked up again after a barrier (it may
    // have been created just before a change of leader).
    let exists = |ctx: &Ctx| {
        ctx.reader
            .mailbox(tenant, mailbox)
            .map_err(error::read)
            .map(|m| m.is_some())
    };
    if !exists(ctx)? {
        ctx.read_barrier().await?;
        if !exists(ctx)? {
            let missing = if ctx.reader.tenant(tenant).map_err(error::read)?.is_none() {
                ApiError::new(Reason::TenantNotFound, "tenant not found")
            } else {
                ApiError::new(Reason::MailboxNotFound, "mailbox not found")
            };
            return Err(missing.into());
        }
    }
    // A key found locally was committed (only committed entries are applied);
    // one not found yet is caught by the state machine. Keys and keywords
    // are stored hashed and sealed, and so proposed.
    let names = names_for(ctx, tenant)?;
    let header = AppendHeader {
        idempotency_key: names.idempotency_key(&header.idempotency_key),
        flags: header.flags.iter().map(|f| names.seal_flag(f)).collect(),
        ..header.clone()
    };
    if let Some(prev) = ctx
        .reader
        .idempotency(tenant, mailbox, &header.idempotency_key)
        .map_err(error::read)?
    {
        // A retry of a committed append: store nothing, answer as the first time.
        drain(ctx, &mut stream).await?;
        let uidvalidity = ctx
            .reader
            .mailbox(tenant, mailbox)
            .map_err(error::read)?
            .map(|m| m.uidvalidity)
            .unwrap_or(0);
        return Ok(AppendMessageResponse {
            uid: prev.uid,
            modseq: prev.modseq,
            uidvalidity,
            duplicate: true,
        });
    }
    let mut upload = Upload::new(ctx, &header)?;
    match upload.receive(&mut stream).await {
        Ok(()) => upload.commit(&header).await,
        Err(e) => {
            upload.abandon().await;
            Err(e)
        }
    }
}

fn check_header(ctx: &Ctx, h: &AppendHeader) -> Result<(), Status> {
    names::tenant(&h.tenant).map_err(error::name)?;
    names::mailbox(&h.mailbox).map_err(error::name)?;
    names::idempotency_key(&h.idempotency_key).map_err(error::name)?;
    for f in &h.flags {
        names::flag(f).map_err(error::name)?;
    }
    if h.size > ctx.config.limits.max_message_bytes {
        return Err(too_large(ctx));
    }
    Ok(())
}

fn too_large(ctx: &Ctx) -> Status {
    let max = ctx.config.limits.max_message_bytes;
    ApiError::new(
        Reason::MessageTooLarge,
        format!("message exceeds the maximum size of {max} bytes"),
    )
    .with("max_bytes", max)
    .into()
}

/// Reads the rest of a stream whose content is not needed, within the size limit.
async fn drain(ctx: &Ctx, stream: &mut Streaming<AppendMessageRequest>) -> Result<(), Status> {
    let mut total = 0u64;
    while let Some(frame) = stream.next().await {
        if let Some(Frame::Chunk(c)) = frame?.frame {
            total += c.len() as u64;
            if total > ctx.config.limits.max_message_bytes {
                return Err(too_large(ctx));
            }
        }
    }
    Ok(())
}

struct Upload<'a> {
    ctx: &'a Ctx,
    tenant: String,
    cipher: MessageCipher,
    blob: crate::state::command::BlobId,
    buffer: Vec<u8>,
    head: Vec<u8>,
    staged: u32,
    total: u64,
}

impl<'a> Upload<'a> {
    fn new(ctx: &'a Ctx, h: &AppendHeader) -> Result<Upload<'a>, Status> {
        let blob = new_blob()?;
        let cipher = cipher_for(ctx, &h.tenant, &h.mailbox, blob, None)?;
        Ok(Upload {
            ctx,
            tenant: h.tenant.clone(),
            cipher,
            blob,
            buffer: Vec::new(),
            head: Vec::new(),
            staged: 0,
            total: 0,
        })
    }

    /// Receives the body; full chunks are encrypted and staged as they fill.
    async fn receive(&mut self, stream: &mut Streaming<AppendMessageRequest>) -> Result<(), Status> {
        let chunk_bytes = self.ctx.config.limits.chunk_bytes;
        while let Some(frame) = stream.next().await {
            let bytes = match frame?.frame {
                Some(Frame::Chunk(c)) => c,
                Some(Frame::Header(_)) => {
                    return Err(ApiError::new(
                        Reason::DuplicateStreamHeader,
                        "header frame after the first frame",
                    )
                    .into())
                }
                None => return Err(ApiError::new(Reason::EmptyFrame, "empty frame").into()),
            };
            self.total += bytes.len() as u64;
            if self.total > self.ctx.config.limits.max_message_bytes {
                return Err(too_large(self.ctx));
            }
            if self.head.len() < HEADER_SCAN_BYTES {
                let take = bytes.len().min(HEADER_SCAN_BYTES - self.head.len());
                self.head.extend_from_slice(&bytes[..take]);
            }
            self.buffer.extend_from_slice(&bytes);
            while self.buffer.len() > chunk_bytes {
                let rest = self.buffer.split_off(chunk_bytes);
                let full = std::mem::replace(&mut self.buffer, rest);
                self.stage(&full).await?;
            }
        }
        if self.total == 0 {
            return Err(ApiError::new(Reason::EmptyMessage, "message is empty").into());
        }
        Ok(())
    }

    async fn stage(&mut self, plaintext: &[u8]) -> Result<(), Status> {
        let ciphertext = ByteBuf::from(self.cipher.seal(self.staged, plaintext)?);
        let cmd = Command::PutChunk {
            tenant: self.tenant.clone(),
            blob: self.blob,
            index: self.staged,
            ciphertext,
        };
        // Counted before the outcome is known, so an abandon removes it either way.
        self.staged += 1;
        self.ctx.proposer.propose(cmd).await.map_err(error::propose)?;
        Ok(())
    }

    /// Removes staged chunks of an upload that will not be committed (best effort).
    async fn abandon(&self) {
        if self.staged == 0 {
            return;
        }
        let cmd = Command::DropBlob {
            tenant: self.tenant.clone(),
            blob: self.blob,
            chunks: self.staged,
        };
        if let Err(e) = self.ctx.proposer.propose(cmd).await {
            tracing::warn!(error = %e, chunks = self.staged, "could not drop staged chunks of an abandoned upload");
        }
    }

    async fn commit(mut self, h: &AppendHeader) -> Result<AppendMessageResponse, Status> {
        if h.size != 0 && h.size != self.total {
            self.abandon().await;
            let message = format!(
                "declared size {} does not match the {} bytes received",
                h.size, self.total
            );
            return Err(ApiError::new(Reason::SizeMismatch, message).into());
        }
        let last = std::mem::take(&mut self.buffer);
        let inline = vec![ByteBuf::from(self.cipher.seal(self.staged, &last)?)];
        let headers = self.cipher.seal(HEADERS_CHUNK, &encode(&summarize(&self.head)))?;
        let internal_date_ms = if h.internal_date_ms == 0 {
            now_ms()
        } else {
            h.internal_date_ms
        };
        let message = NewMessage {
            mailbox: h.mailbox.clone(),
            idempotency_key: h.idempotency_key.clone(),
            blob: self.blob,
            key_version: self.cipher.key_version,
            flags: h.flags.clone(),
            internal_date_ms,
            size: self.total,
            staged_chunks: self.staged,
            inline_chunks: inline,
            headers,
        };
        let cmd = Command::Append {
            tenant: self.tenant.clone(),
            message,
        };
        match self.ctx.proposer.propose(cmd).await.map_err(error::propose)? {
            CommandResult::Appended {
                uid,
                modseq,
                uidvalidity,
                duplicate,
            } => {
                metrics::counter!("mailvault_appends_total").increment(1);
                Ok(AppendMessageResponse {
                    uid,
                    modseq,
                    uidvalidity,
                    duplicate,
                })
            }
            CommandResult::Refused(r) => Err(error::refusal(r).into()),
            _ => Err(error::unexpected("append").into()),
        }
    }
}
