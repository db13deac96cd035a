//! `mailvault.v1.Mailbox`: writes are routed to the leader, reads wait for a
//! linearizable read point and are served from local data.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::mailbox_server::Mailbox;
use mailvault_proto::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::tenant_keys::{cipher_for, names_to_propose, new_blob};
use super::{append, messages, watch};
use crate::access::{authorize, Principal};
use crate::crypto::{NameKind, TenantNames, HEADERS_CHUNK};
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::forward::{forwarded, leader_answer, principal_of, route_write, Route, FORWARDED};
use crate::names;
use crate::state::command::{Command, CommandResult, NewMessage, Refusal};
use crate::state::policy::Action;
use crate::state::records::MailboxRecord;

/// The mailbox service.
#[derive(Clone)]
pub struct MailboxService {
    ctx: Arc<Ctx>,
}

impl MailboxService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> MailboxService {
        MailboxService { ctx }
    }

    /// A client of this service on the leader, to forward a write over `ch`.
    fn client(&self, ch: Channel) -> MailboxClient<Channel> {
        let max = self.ctx.max_frame();
        MailboxClient::new(ch)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    async fn run(&self, cmd: Command) -> Result<CommandResult, Status> {
        match self.ctx.proposer.propose(cmd).await.map_err(error::propose)? {
            CommandResult::Refused(r) => Err(error::refusal(r).into()),
            other => Ok(other),
        }
    }

    /// `run` for a command that names an agent: the claim holder in a
    /// refusal is opened for the client.
    async fn run_named(&self, names: &TenantNames, cmd: Command) -> Result<CommandResult, Status> {
        match self.ctx.proposer.propose(cmd).await.map_err(error::propose)? {
            CommandResult::Refused(Refusal::ClaimedBy(owner)) => {
                let owner = names.open(NameKind::Agent, &owner).map_err(error::crypto)?;
                Err(error::refusal(Refusal::ClaimedBy(owner)).into())
            }
            CommandResult::Refused(r) => Err(error::refusal(r).into()),
            other => Ok(other),
        }
    }

    fn mailbox_status(
        &self,
        tenant: &str,
        mailbox: &str,
        m: &MailboxRecord,
    ) -> Result<MailboxStatus, Status> {
        let (mut unseen, mut claimed) = (0, 0);
        self.ctx
            .reader
            .messages(tenant, mailbox, 0, |msg| {
                // A message damaged here is counted as it would be whole:
                // unseen and unclaimed are what is known of it.
                let (seen, claim) = match &msg {
                    Ok(m) => (m.flags.iter().any(|f| f == "\\Seen"), m.claimed_by.is_some()),
                    Err(_) => (false, false),
                };
                unseen += u64::from(!seen);
                claimed += u64::from(claim);
                true
            })
            .map_err(error::read)?;
        Ok(MailboxStatus {
            tenant: tenant.to_string(),
            mailbox: mailbox.to_string(),
            uidvalidity: m.uidvalidity,
            uidnext: m.uidnext,
            highest_modseq: m.highest_modseq,
            messages: m.messages,
            unseen,
            claimed,
            total_bytes: m.total_bytes,
        })
    }

    fn existing_mailbox(&self, tenant: &str, mailbox: &str) -> Result<MailboxRecord, Status> {
        names::tenant(tenant).map_err(error::name)?;
        names::mailbox(mailbox).map_err(error::name)?;
        if let Some(m) = self.ctx.reader.mailbox(tenant, mailbox).map_err(error::read)? {
            return Ok(m);
        }
        if self.ctx.reader.tenant(tenant).map_err(error::read)?.is_none() {
            return Err(error::refusal(Refusal::NoTenant).into());
        }
        Err(error::refusal(Refusal::NoMailbox).into())
    }

    fn changed(r: CommandResult) -> Result<(u64, Vec<String>, Option<String>), Status> {
        match r {
            CommandResult::Changed {
                modseq,
                flags,
                claimed_by,
            } => Ok((modseq, flags, claimed_by)),
            _ => Err(error::unexpected("command").into()),
        }
    }
}

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn target(tenant: &str, mailbox: &str, uid: Option<u32>) -> String {
    match uid {
        Some(u) => format!("{tenant}/{mailbox}/{u}"),
        None => format!("{tenant}/{mailbox}"),
    }
}

#[tonic::async_trait]
impl Mailbox for MailboxService {
    async fn create_mailbox(
        &self,
        req: Request<CreateMailboxRequest>,
    ) -> Result<Response<MailboxStatus>, Status> {
        route_write!(self, req, p, create_mailbox);
        let r = req.into_inner();
        names::tenant(&r.tenant).map_err(error::name)?;
        names::mailbox(&r.mailbox).map_err(error::name)?;
        let t = target(&r.tenant, &r.mailbox, None);
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "CreateMailbox",
            &r.tenant,
            t,
            Action::ManageMailboxes,
        )
        .await?;
        let uidvalidity = (crate::clock::now_ms() / 1000) as u32;
        self.run(Command::CreateMailbox {
            tenant: r.tenant.clone(),
            mailbox: r.mailbox.clone(),
            uidvalidity,
        })
        .await?;
        let m = self.existing_mailbox(&r.tenant, &r.mailbox)?;
        Ok(Response::new(self.mailbox_status(&r.tenant, &r.mailbox, &m)?))
    }

    async fn list_mailboxes(
        &self,
        req: Request<ListMailboxesRequest>,
    ) -> Result<Response<ListMailboxesResponse>, Status> {
        let p = principal_of(&req);
        let r = req.into_inner();
        names::tenant(&r.tenant).map_err(error::name)?;
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "ListMailboxes",
            &r.tenant,
            r.tenant.clone(),
            Action::Read,
        )
        .await?;
        self.ctx.read_barrier().await?;
        if self.ctx.reader.tenant(&r.tenant).map_err(error::read)?.is_none() {
            return Err(error::refusal(Refusal::NoTenant).into());
        }
        let mailboxes = self
            .ctx
            .reader
            .mailboxes(&r.tenant)
            .map_err(error::read)?
            .iter()
            .map(|(name, m)| self.mailbox_status(&r.tenant, name, m))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListMailboxesResponse { mailboxes }))
    }

    async fn get_mailbox_status(
        &self,
        req: Request<GetMailboxStatusRequest>,
    ) -> Result<Response<MailboxStatus>, Status> {
        let p = principal_of(&req);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, None);
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "GetMailboxStatus",
            &r.tenant,
            t,
            Action::Read,
        )
        .await?;
        self.ctx.read_barrier().await?;
        let m = self.existing_mailbox(&r.tenant, &r.mailbox)?;
        Ok(Response::new(self.mailbox_status(&r.tenant, &r.mailbox, &m)?))
    }

    async fn append_message(
        &self,
        req: Request<Streaming<AppendMessageRequest>>,
    ) -> Result<Response<AppendMessageResponse>, Status> {
        let p = principal_of(&req);
        match self.ctx.router.route(req.metadata())? {
            Route::Local => {
                let started = std::time::Instant::now();
                let r = append::append(&self.ctx, p.as_ref(), req.into_inner()).await?;
                metrics::histogram!("mailvault_append_seconds").record(started.elapsed().as_secs_f64());
                Ok(Response::new(r))
            }
            Route::Forward(ch) => forward_append(self.client(ch), p.as_ref(), req.into_inner()).await,
        }
    }

    type GetMessageStream = RespStream<GetMessageResponse>;

    async fn get_message(
        &self,
        req: Request<GetMessageRequest>,
    ) -> Result<Response<Self::GetMessageStream>, Status> {
        let p = principal_of(&req);
        // A read another node passes on (its copy was damaged) is never passed on again.
        let passed_on = req.metadata().contains_key(FORWARDED);
        let r = req.into_inner();
        let fallback = (!passed_on).then(|| messages::Fallback {
            request: r.clone(),
            principal: p.clone(),
        });
        let t = target(&r.tenant, &r.mailbox, Some(r.uid));
        let p = authorize(
            &self.ctx.gate,
            p.as_ref(),
            "GetMessage",
            &r.tenant,
            t,
            Action::Read,
        )
        .await?;
        self.ctx.read_barrier().await?;
        self.existing_mailbox(&r.tenant, &r.mailbox)?;
        let m = self
            .ctx
            .reader
            .message(&r.tenant, &r.mailbox, r.uid)
            .map_err(error::read)?
            .ok_or_else(|| error::refusal(Refusal::NoMessage))?;
        let view = p.may_view_addresses(&r.tenant);
        let m = match m {
            Ok(m) => m,
            Err(uid) => {
                let rx = messages::from_replicas_only(self.ctx.clone(), &r.tenant, &r.mailbox, uid, fallback);
                return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
            }
        };
        let rx = messages::stream(self.ctx.clone(), r.tenant, r.mailbox, m, view, fallback)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_messages(
        &self,
        req: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let p = principal_of(&req);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, None);
        let p = authorize(
            &self.ctx.gate,
            p.as_ref(),
            "ListMessages",
            &r.tenant,
            t,
            Action::Read,
        )
        .await?;
        self.ctx.read_barrier().await?;
        self.existing_mailbox(&r.tenant, &r.mailbox)?;
        Ok(Response::new(messages::list(
            &self.ctx,
            &r,
            p.may_view_addresses(&r.tenant),
        )?))
    }

    async fn update_flags(
        &self,
        req: Request<UpdateFlagsRequest>,
    ) -> Result<Response<UpdateFlagsResponse>, Status> {
        route_write!(self, req, p, update_flags);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, Some(r.uid));
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "UpdateFlags",
            &r.tenant,
            t,
            Action::Write,
        )
        .await?;
        for f in r.add.iter().chain(&r.remove) {
            names::flag(f).map_err(error::name)?;
        }
        let n = names_to_propose(&self.ctx, &r.tenant).await?;
        let res = self
            .run(Command::UpdateFlags {
                tenant: r.tenant,
                mailbox: r.mailbox,
                uid: r.uid,
                add: r.add.iter().map(|f| n.seal_flag(f)).collect(),
                remove: r.remove.iter().map(|f| n.seal_flag(f)).collect(),
                unchanged_since: r.unchanged_since,
            })
            .await?;
        let (modseq, flags, _) = Self::changed(res)?;
        let flags = n.open_flags(&flags).map_err(error::crypto)?;
        Ok(Response::new(UpdateFlagsResponse { modseq, flags }))
    }

    async fn claim_message(
        &self,
        req: Request<ClaimMessageRequest>,
    ) -> Result<Response<ClaimMessageResponse>, Status> {
        route_write!(self, req, p, claim_message);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, Some(r.uid));
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "ClaimMessage",
            &r.tenant,
            t,
            Action::Write,
        )
        .await?;
        names::agent(&r.agent).map_err(error::name)?;
        let n = names_to_propose(&self.ctx, &r.tenant).await?;
        let cmd = Command::Claim {
            agent: n.seal(NameKind::Agent, &r.agent),
            tenant: r.tenant,
            mailbox: r.mailbox,
            uid: r.uid,
        };
        let res = self.run_named(&n, cmd).await?;
        let (modseq, _, claimed_by) = Self::changed(res)?;
        let claimed_by = n.open_agent(claimed_by.as_deref()).map_err(error::crypto)?;
        Ok(Response::new(ClaimMessageResponse { modseq, claimed_by }))
    }

    async fn release_claim(
        &self,
        req: Request<ReleaseClaimRequest>,
    ) -> Result<Response<ReleaseClaimResponse>, Status> {
        route_write!(self, req, p, release_claim);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, Some(r.uid));
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "ReleaseClaim",
            &r.tenant,
            t,
            Action::Write,
        )
        .await?;
        names::agent(&r.agent).map_err(error::name)?;
        let n = names_to_propose(&self.ctx, &r.tenant).await?;
        let cmd = Command::Release {
            agent: n.seal(NameKind::Agent, &r.agent),
            tenant: r.tenant,
            mailbox: r.mailbox,
            uid: r.uid,
        };
        let res = self.run_named(&n, cmd).await?;
        let (modseq, _, _) = Self::changed(res)?;
        Ok(Response::new(ReleaseClaimResponse { modseq }))
    }

    async fn move_message(
        &self,
        req: Request<MoveMessageRequest>,
    ) -> Result<Response<MoveMessageResponse>, Status> {
        route_write!(self, req, p, move_message);
        let r = req.into_inner();
        let t = format!(
            "{} -> {}",
            target(&r.tenant, &r.mailbox, Some(r.uid)),
            r.destination
        );
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "MoveMessage",
            &r.tenant,
            t,
            Action::Write,
        )
        .await?;
        self.ctx.read_barrier().await?;
        self.existing_mailbox(&r.tenant, &r.destination)?;
        let message = self.reencrypt_for_move(&r).await?;
        let res = self
            .run(Command::Move {
                tenant: r.tenant,
                mailbox: r.mailbox,
                uid: r.uid,
                message,
            })
            .await?;
        match res {
            CommandResult::Appended { uid, modseq, .. } => {
                Ok(Response::new(MoveMessageResponse { uid, modseq }))
            }
            _ => Err(error::unexpected("move").into()),
        }
    }

    async fn expunge_messages(
        &self,
        req: Request<ExpungeMessagesRequest>,
    ) -> Result<Response<ExpungeMessagesResponse>, Status> {
        route_write!(self, req, p, expunge_messages);
        let r = req.into_inner();
        let t = format!("{} uids {:?}", target(&r.tenant, &r.mailbox, None), r.uids);
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "ExpungeMessages",
            &r.tenant,
            t,
            Action::Write,
        )
        .await?;
        if r.uids.is_empty() {
            return Err(error::invalid("no uids given").into());
        }
        match self
            .run(Command::Expunge {
                tenant: r.tenant,
                mailbox: r.mailbox,
                uids: r.uids,
            })
            .await?
        {
            CommandResult::Expunged { uids, modseq } => Ok(Response::new(ExpungeMessagesResponse {
                expunged: uids,
                modseq,
            })),
            _ => Err(error::unexpected("expunge").into()),
        }
    }

    type WatchMailboxStream = RespStream<MailboxChange>;

    async fn watch_mailbox(
        &self,
        req: Request<WatchMailboxRequest>,
    ) -> Result<Response<Self::WatchMailboxStream>, Status> {
        let p = principal_of(&req);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, None);
        authorize(
            &self.ctx.gate,
            p.as_ref(),
            "WatchMailbox",
            &r.tenant,
            t,
            Action::Read,
        )
        .await?;
        self.ctx.read_barrier().await?;
        self.existing_mailbox(&r.tenant, &r.mailbox)?;
        let rx = watch::start(self.ctx.clone(), r.tenant, r.mailbox, r.since_modseq);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExportMailboxStream = RespStream<ExportedMessage>;

    async fn export_mailbox(
        &self,
        req: Request<ExportMailboxRequest>,
    ) -> Result<Response<Self::ExportMailboxStream>, Status> {
        let p = principal_of(&req);
        let passed_on = req.metadata().contains_key(FORWARDED);
        let r = req.into_inner();
        let t = target(&r.tenant, &r.mailbox, None);
        // A bulk export is two-person: an approved export operation must name
        // this identity and mailbox, now. Checked for a caller whose roles
        // would allow it (the others are denied by `authorize`, once).
        if let Some(caller) = p.as_ref().filter(|c| c.policy.permits(&r.tenant, Action::Export)) {
            // An approval just recorded through another node is seen here.
            self.ctx.read_barrier().await?;
            let approval = self
                .ctx
                .reader
                .export_approval(&caller.identity, &r.tenant, &r.mailbox)
                .map_err(error::read)?;
            let now = crate::clock::now_ms();
            if !approval.is_some_and(|a| a.from_ms <= now && now < a.until_ms) {
                let why = "no approved export of this mailbox for this identity now";
                self.ctx
                    .gate
                    .denials
                    .deny(
                        &caller.identity,
                        caller.source,
                        "ExportMailbox",
                        &t,
                        why,
                        crate::access::Against::Identity,
                    )
                    .await;
                return Err(ApiError::new(
                    Reason::ExportNotApproved,
                    "a bulk export needs an approved export operation naming this identity and mailbox \
                     (mailvault-admin op propose export), valid now",
                )
                .into());
            }
        }
        let p = authorize(
            &self.ctx.gate,
            p.as_ref(),
            "ExportMailbox",
            &r.tenant,
            t,
            Action::Export,
        )
        .await?;
        self.ctx.read_barrier().await?;
        self.existing_mailbox(&r.tenant, &r.mailbox)?;
        let rx = messages::export(self.ctx.clone(), r.tenant, r.mailbox, Some(p), passed_on);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl MailboxService {
    /// Decrypts a message and encrypts it again for its destination mailbox.
    /// Bodies larger than one chunk are staged first, as appends are.
    async fn reencrypt_for_move(&self, r: &MoveMessageRequest) -> Result<NewMessage, Status> {
        let ctx = &self.ctx;
        let src = ctx
            .reader
            .message(&r.tenant, &r.mailbox, r.uid)
            .map_err(error::read)?
            .ok_or_else(|| error::refusal(Refusal::NoMessage))?
            .map_err(|_| error::damaged_record())?;
        let from = cipher_for(ctx, &r.tenant, &r.mailbox, src.blob, Some(src.key_version))?;
        let blob = new_blob()?;
        let to = cipher_for(ctx, &r.tenant, &r.destination, blob, None)?;
        let mut inline = Vec::new();
        let mut staged = 0;
        for i in 0..src.chunks {
            let ct = ctx
                .reader
                .chunk(&r.tenant, &src.blob, i)
                .map_err(error::read)?
                .ok_or_else(|| error::damaged("a chunk of the message is missing"))?;
            let sealed = serde_bytes::ByteBuf::from(to.seal(i, &from.open(i, &ct)?)?);
            if i + 1 < src.chunks {
                self.run(Command::PutChunk {
                    tenant: r.tenant.clone(),
                    blob,
                    index: i,
                    ciphertext: sealed,
                })
                .await?;
                staged += 1;
            } else {
                inline.push(sealed);
            }
        }
        let headers = to.seal(HEADERS_CHUNK, &from.open(HEADERS_CHUNK, &src.headers)?)?;
        Ok(NewMessage {
            mailbox: r.destination.clone(),
            idempotency_key: String::new(),
            blob,
            key_version: to.key_version,
            flags: src.flags,
            internal_date_ms: src.internal_date_ms,
            size: src.size,
            staged_chunks: staged,
            inline_chunks: inline,
            headers,
        })
    }
}

/// Proxies an append stream to the leader. If the client's stream fails, the
/// forwarded call is cancelled rather than ended, so the leader never commits
/// a truncated message.
async fn forward_append(
    mut client: MailboxClient<Channel>,
    principal: Option<&Principal>,
    mut incoming: Streaming<AppendMessageRequest>,
) -> Result<Response<AppendMessageResponse>, Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<Status>();
    tokio::spawn(async move {
        while let Some(item) = incoming.next().await {
            match item {
                Ok(frame) => {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = fail_tx.send(e);
                    // Keep `tx` open until the call is dropped, so the stream never ends cleanly.
                    tx.closed().await;
                    return;
                }
            }
        }
    });
    let call = client.append_message(forwarded(ReceiverStream::new(rx), principal));
    tokio::select! {
        r = call => leader_answer(r),
        Ok(e) = fail_rx => Err(e),
    }
}
