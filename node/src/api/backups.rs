//! `mailvault.v1.Backups`: the backup catalog, and taking and checking
//! backups. Any node lists the catalog; a call about one backup is passed on
//! (once, marked forwarded) to the node that holds it, and `TakeBackup` to
//! the node holding the duty, so an operator may ask any node.

use std::sync::Arc;

use mailvault_proto::v1::backups_client::BackupsClient;
use mailvault_proto::v1::backups_server::Backups;
use mailvault_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::operator::record;
use crate::backups::{MailboxRestore, MailboxRestoreError, OffsiteError, ShipError, TakeError};
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::forward::{forwarded, principal_of, FORWARDED};
use crate::state::backup::{BackupManifest as Manifest, BackupRecord};
use crate::state::ops::{OpStatus, Step};
use crate::state::types::NodeId;
use crate::store::backup::{is_backup_id, BackupError};

/// The backups service.
#[derive(Clone)]
pub struct BackupsService {
    ctx: Arc<Ctx>,
}

impl BackupsService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> BackupsService {
        BackupsService { ctx }
    }

    /// The catalog's record of `id`, after a linearizable read point.
    async fn find(&self, id: &str) -> Result<BackupRecord, Status> {
        if !is_backup_id(id) {
            return Err(
                error::invalid("id is not a backup id (YYYYMMDDTHHMMSSZ-NNNNNNNNNNNN)")
                    .with("field", "id")
                    .into(),
            );
        }
        self.ctx.read_barrier().await?;
        self.ctx
            .reader
            .backup(id)
            .map_err(error::read)?
            .ok_or_else(|| ApiError::new(Reason::BackupNotFound, "backup not found").into())
    }

    /// The node holding the backup duty now, as this node sees it.
    fn duty_holder(&self) -> Result<NodeId, Status> {
        let duty = self.ctx.backups.local_status().duty;
        duty.and_then(|d| d.holder).ok_or_else(|| -> Status {
            ApiError::new(
                Reason::BackupNodeUnreachable,
                "no node holds the backup duty now (no leader, no backup member); retry",
            )
            .into()
        })
    }

    /// Where a call about backup `id` is served: on the node that holds it
    /// (passed on there), or here — then audited as `action`, and refused
    /// if the local copy was removed.
    async fn held<T>(&self, req: &Request<T>, id: &str, action: &str) -> Result<Held, Status> {
        let rec = self.find(id).await?;
        if let Some(c) = self.route(req, rec.entry.node)? {
            return Ok(Held::There(c, rec.entry.node));
        }
        let p = principal_of(req);
        record(&self.ctx, p.as_ref(), action, rec.entry.id.clone()).await?;
        if !rec.is_local() {
            return Err(not_local(&rec));
        }
        Ok(Held::Here(rec))
    }

    /// Where a call about something node `holder` has must be served: here,
    /// or on that node (a call already passed on once is not passed again).
    fn route<T>(&self, req: &Request<T>, holder: NodeId) -> Result<Option<BackupsClient<Channel>>, Status> {
        if holder == self.ctx.id {
            return Ok(None);
        }
        if req.metadata().contains_key(FORWARDED) {
            return Err(ApiError::new(
                Reason::BackupNotLocal,
                format!("this node does not hold it; node {holder} does"),
            )
            .with("node", holder)
            .into());
        }
        let ch = self.ctx.router.member_channel(holder).ok_or_else(|| -> Status {
            ApiError::new(
                Reason::BackupNodeUnreachable,
                format!("node {holder}, which holds it, is not a member any more"),
            )
            .with("node", holder)
            .into()
        })?;
        Ok(Some(
            BackupsClient::new(ch)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        ))
    }
}

impl BackupsService {
    /// A restore that writes is a step of an executing two-person
    /// operation, made by a node (the leader's executor) naming it; an
    /// operator's is refused (`TWO_PERSON_REQUIRED`, audited).
    async fn executing_restore(&self, req: &Request<RestoreMailboxRequest>) -> Result<(), Status> {
        let r = req.get_ref();
        let p = principal_of(req);
        let target = format!(
            "{}/{} from {} as {}",
            r.tenant, r.mailbox, r.backup_id, r.new_mailbox
        );
        if !p.as_ref().is_some_and(|p| p.is_node) {
            return Err(super::access::two_person(
                &self.ctx,
                p.as_ref(),
                "RestoreMailbox",
                target,
                "restoring a mailbox",
            )
            .await);
        }
        self.ctx.read_barrier().await?;
        let op = match r.operation.is_empty() {
            true => None,
            false => self.ctx.reader.operation(&r.operation).map_err(error::read)?,
        };
        let names_it = op.as_ref().is_some_and(|op| {
            op.status == OpStatus::Executing
                && matches!(op.plan.steps.get(op.steps.len()), Some(Step::RestoreMailbox(x))
                    if x.backup == r.backup_id
                        && x.from.tenant == r.tenant
                        && x.from.mailbox == r.mailbox
                        && x.into == r.new_mailbox)
        });
        match names_it {
            true => Ok(()),
            false => Err(ApiError::new(
                Reason::TwoPersonRequired,
                "no executing operation's next step is this restore",
            )
            .into()),
        }
    }
}

/// Where a call about one backup is served.
enum Held {
    /// Here: the catalog's record.
    Here(BackupRecord),
    /// On that node, through this client.
    There(BackupsClient<Channel>, NodeId),
}

fn not_local(rec: &BackupRecord) -> Status {
    ApiError::new(
        Reason::BackupNotLocal,
        "the backup's local copy was removed (retention); only the catalog entry remains",
    )
    .with("node", rec.entry.node)
    .into()
}

/// A failure reading a backup held here.
fn disk_error(e: BackupError) -> Status {
    ApiError::new(Reason::BackupFailed, e.to_string()).into()
}

/// A failed ship or drill as the caller sees it.
fn ship_error(e: ShipError) -> Status {
    let reason = match &e {
        ShipError::Offsite(OffsiteError::Store { .. } | OffsiteError::Io(_) | OffsiteError::Config(_)) => {
            Reason::OffsiteUnavailable
        }
        _ => Reason::BackupFailed,
    };
    ApiError::new(reason, e.to_string()).into()
}

/// A failed mailbox restore as the caller sees it.
fn restore_error(e: MailboxRestoreError) -> Status {
    match e {
        MailboxRestoreError::Refused(r) => error::refusal(r).into(),
        MailboxRestoreError::NotInBackup { .. } => ApiError::new(Reason::MailboxNotFound, e.to_string())
            .with("in", "backup")
            .into(),
        MailboxRestoreError::Write(..) => ApiError::new(Reason::WriteOutcomeUnknown, e.to_string()).into(),
        MailboxRestoreError::Live(_) => ApiError::new(Reason::InternalError, e.to_string()).into(),
        MailboxRestoreError::Backup(_) | MailboxRestoreError::Damaged { .. } => {
            ApiError::new(Reason::BackupFailed, e.to_string()).into()
        }
    }
}

/// The catalog record as the API shows it.
pub fn backup_message(r: &BackupRecord) -> Backup {
    Backup {
        id: r.entry.id.clone(),
        node: r.entry.node,
        taken_at_ms: r.entry.taken_at_ms,
        applied_index: r.entry.applied_index,
        applied_term: r.entry.applied_term,
        files: r.entry.files,
        bytes: r.entry.bytes,
        took_ms: r.entry.took_ms,
        local: r.is_local(),
        local_removed_at_ms: r.local_removed_at_ms.unwrap_or(0),
        shipped: r.shipped.as_ref().map(|c| ShippedCopy {
            target: c.target.clone(),
            at_ms: c.at_ms,
            objects: c.objects,
            bytes: c.bytes,
            took_ms: c.took_ms,
            removed_at_ms: r.offsite_removed_at_ms.unwrap_or(0),
        }),
        drill: r.drill.as_ref().map(|d| Drill {
            node: d.node,
            at_ms: d.at_ms,
            passed: d.passed,
            problem: d.problem.clone(),
            took_ms: d.took_ms,
        }),
    }
}

fn manifest_message(m: Manifest) -> BackupManifest {
    BackupManifest {
        cluster: m.cluster,
        mailvault_version: m.mailvault_version,
        data_version: m.data_version,
        manifest_format: m.format,
        members: m
            .members
            .into_iter()
            .map(|b| BackupMember {
                id: b.id,
                role: b.role,
                voter: b.voter,
            })
            .collect(),
        files: m
            .files
            .into_iter()
            .map(|f| BackupFile {
                path: f.path,
                bytes: f.bytes,
                sha256: f.sha256,
            })
            .collect(),
        state_digest: m.state_digest,
        records: m.records,
        audit_head_seq: m.audit_head.seq,
        audit_head_hash: m.audit_head.hash,
        tenants: m
            .tenants
            .into_iter()
            .map(|t| BackupTenant {
                name: t.name,
                key_versions: t.key_versions,
            })
            .collect(),
        master_key_fingerprint: m.master_key_fingerprint,
    }
}

#[tonic::async_trait]
impl Backups for BackupsService {
    async fn list_backups(
        &self,
        req: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        let p = principal_of(&req);
        record(&self.ctx, p.as_ref(), "ListBackups", "-".into()).await?;
        self.ctx.read_barrier().await?;
        let backups = self.ctx.reader.backups().map_err(error::read)?;
        let duty = self.ctx.backups.local_status().duty;
        Ok(Response::new(ListBackupsResponse {
            backups: backups.iter().map(backup_message).collect(),
            duty_node: duty.and_then(|d| d.holder).unwrap_or(0),
            standing_in: duty.is_some_and(|d| d.standing_in),
        }))
    }

    async fn show_backup(
        &self,
        req: Request<ShowBackupRequest>,
    ) -> Result<Response<ShowBackupResponse>, Status> {
        let rec = match self.held(&req, &req.get_ref().id, "ShowBackup").await? {
            Held::Here(rec) => rec,
            Held::There(mut c, node) => {
                let p = principal_of(&req);
                return c
                    .show_backup(forwarded(req.into_inner(), p.as_ref()))
                    .await
                    .map_err(|s| error::from_backup_node(s, node));
            }
        };
        let manifest = self
            .ctx
            .backups
            .manifest(&rec.entry.id)
            .await
            .map_err(disk_error)?;
        Ok(Response::new(ShowBackupResponse {
            backup: Some(backup_message(&rec)),
            manifest: Some(manifest_message(manifest)),
        }))
    }

    async fn take_backup(
        &self,
        req: Request<TakeBackupRequest>,
    ) -> Result<Response<TakeBackupResponse>, Status> {
        let holder = self.duty_holder()?;
        if let Some(mut c) = self.route(&req, holder)? {
            let p = principal_of(&req);
            return c
                .take_backup(forwarded(req.into_inner(), p.as_ref()))
                .await
                .map_err(|s| error::from_backup_node(s, holder));
        }
        let p = principal_of(&req);
        record(&self.ctx, p.as_ref(), "TakeBackup", "-".into()).await?;
        let who = p.as_ref().map(|p| p.identity.as_str()).unwrap_or("-");
        // Everything acknowledged before the call is in the backup.
        self.ctx.read_barrier().await?;
        let entry = self
            .ctx
            .backups
            .take(&format!("asked by {who}"))
            .await
            .map_err(|e| -> Status {
                let stage = match e {
                    TakeError::NotRecorded(_) => "record",
                    TakeError::Disk(_) => "take",
                };
                ApiError::new(Reason::BackupFailed, e.to_string())
                    .with("stage", stage)
                    .into()
            })?;
        self.ctx.read_barrier().await?;
        let rec = self
            .ctx
            .reader
            .backup(&entry.id)
            .map_err(error::read)?
            .ok_or_else(|| -> Status { error::unexpected("backup catalog").into() })?;
        Ok(Response::new(TakeBackupResponse {
            backup: Some(backup_message(&rec)),
        }))
    }

    async fn verify_backup(
        &self,
        req: Request<VerifyBackupRequest>,
    ) -> Result<Response<VerifyBackupResponse>, Status> {
        let rec = match self.held(&req, &req.get_ref().id, "VerifyBackup").await? {
            Held::Here(rec) => rec,
            Held::There(mut c, node) => {
                let p = principal_of(&req);
                return c
                    .verify_backup(forwarded(req.into_inner(), p.as_ref()))
                    .await
                    .map_err(|s| error::from_backup_node(s, node));
            }
        };
        let started = std::time::Instant::now();
        let answer = match self.ctx.backups.verify(&rec.entry.id).await {
            Ok((m, bytes, took)) => VerifyBackupResponse {
                backup: Some(backup_message(&rec)),
                ok: true,
                problem: String::new(),
                files_checked: m.files.len() as u32,
                bytes_checked: bytes,
                took_ms: took.as_millis() as u64,
            },
            Err(e @ BackupError::Io(_)) | Err(e @ BackupError::Db(_)) => return Err(disk_error(e)),
            Err(e) => {
                tracing::warn!(backup = %rec.entry.id, problem = %e, "a backup failed verification");
                metrics::counter!("mailvault_backup_verify_failures_total").increment(1);
                self.ctx
                    .backups
                    .audit_event("backup-verify-failed", &rec.entry.id, &e.to_string())
                    .await;
                VerifyBackupResponse {
                    backup: Some(backup_message(&rec)),
                    ok: false,
                    problem: e.to_string(),
                    files_checked: 0,
                    bytes_checked: 0,
                    took_ms: started.elapsed().as_millis() as u64,
                }
            }
        };
        Ok(Response::new(answer))
    }

    async fn ship_backup(
        &self,
        req: Request<ShipBackupRequest>,
    ) -> Result<Response<ShipBackupResponse>, Status> {
        let id = req.get_ref().id.clone();
        let rec = if id.is_empty() {
            let holder = self.duty_holder()?;
            if let Some(mut c) = self.route(&req, holder)? {
                let p = principal_of(&req);
                return c
                    .ship_backup(forwarded(req.into_inner(), p.as_ref()))
                    .await
                    .map_err(|s| error::from_backup_node(s, holder));
            }
            self.ctx.read_barrier().await?;
            let newest = self.ctx.backups.local_backups().pop().ok_or_else(|| -> Status {
                ApiError::new(
                    Reason::BackupNotFound,
                    "this node holds no backup to ship; take one first",
                )
                .into()
            })?;
            let p = principal_of(&req);
            record(&self.ctx, p.as_ref(), "ShipBackup", newest.entry.id.clone()).await?;
            newest
        } else {
            match self.held(&req, &id, "ShipBackup").await? {
                Held::Here(rec) => rec,
                Held::There(mut c, node) => {
                    let p = principal_of(&req);
                    return c
                        .ship_backup(forwarded(req.into_inner(), p.as_ref()))
                        .await
                        .map_err(|s| error::from_backup_node(s, node));
                }
            }
        };
        let who = principal_of(&req)
            .map(|p| p.identity)
            .unwrap_or_else(|| "-".into());
        self.ctx
            .backups
            .ship(&rec.entry.id, &format!("asked by {who}"))
            .await
            .map_err(ship_error)?;
        let rec = self.find(&rec.entry.id).await?;
        Ok(Response::new(ShipBackupResponse {
            backup: Some(backup_message(&rec)),
        }))
    }

    async fn restore_mailbox(
        &self,
        req: Request<RestoreMailboxRequest>,
    ) -> Result<Response<RestoreMailboxResponse>, Status> {
        {
            let r = req.get_ref();
            crate::names::tenant(&r.tenant).map_err(error::name)?;
            crate::names::mailbox(&r.mailbox).map_err(error::name)?;
            crate::names::mailbox(&r.new_mailbox).map_err(error::name)?;
            if !r.rehearse {
                self.executing_restore(&req).await?;
            }
        }
        let rec = match self
            .held(&req, &req.get_ref().backup_id, "RestoreMailbox")
            .await?
        {
            Held::Here(rec) => rec,
            Held::There(mut c, node) => {
                let p = principal_of(&req);
                return c
                    .restore_mailbox(forwarded(req.into_inner(), p.as_ref()))
                    .await
                    .map_err(|s| error::from_backup_node(s, node));
            }
        };
        let who = principal_of(&req)
            .map(|p| p.identity)
            .unwrap_or_else(|| "-".into());
        let r = req.into_inner();
        if r.rehearse {
            let (messages, bytes) = self
                .ctx
                .backups
                .check_mailbox(&rec.entry.id, &r.tenant, &r.mailbox)
                .await
                .map_err(restore_error)?;
            return Ok(Response::new(RestoreMailboxResponse {
                backup: Some(backup_message(&rec)),
                messages: u32::try_from(messages).unwrap_or(u32::MAX),
                skipped: 0,
                bytes,
                uidvalidity: 0,
                took_ms: 0,
            }));
        }
        let who = match r.operation.is_empty() {
            true => who,
            false => format!("{who} for {}", r.operation),
        };
        let job = MailboxRestore {
            backup: rec.entry.id.clone(),
            tenant: r.tenant,
            mailbox: r.mailbox,
            new_mailbox: r.new_mailbox,
            resume: r.resume,
        };
        let target = format!(
            "{}/{} from {} as {}/{}",
            job.tenant, job.mailbox, job.backup, job.tenant, job.new_mailbox
        );
        match self.ctx.backups.restore_mailbox(&job).await {
            Ok(done) => {
                tracing::info!(backup = %job.backup, messages = done.messages, skipped = done.skipped, took_ms = done.took_ms, "mailbox restored from a backup");
                self.ctx
                    .backups
                    .audit_event(
                        "backup-restore-mailbox",
                        &target,
                        &format!(
                            "restored (asked by {who}): {} messages, {} bytes, {} already there, {} ms",
                            done.messages, done.bytes, done.skipped, done.took_ms
                        ),
                    )
                    .await;
                Ok(Response::new(RestoreMailboxResponse {
                    backup: Some(backup_message(&rec)),
                    messages: done.messages,
                    skipped: done.skipped,
                    bytes: done.bytes,
                    uidvalidity: done.uidvalidity,
                    took_ms: done.took_ms,
                }))
            }
            Err(e) => {
                tracing::warn!(backup = %job.backup, problem = %e, "a mailbox restore failed");
                metrics::counter!("mailvault_backup_mailbox_restore_failures_total").increment(1);
                self.ctx
                    .backups
                    .audit_event("backup-restore-mailbox-failed", &target, &e.to_string())
                    .await;
                Err(restore_error(e))
            }
        }
    }

    async fn drill_backup(
        &self,
        req: Request<DrillBackupRequest>,
    ) -> Result<Response<DrillBackupResponse>, Status> {
        let holder = self.duty_holder()?;
        if let Some(mut c) = self.route(&req, holder)? {
            let p = principal_of(&req);
            return c
                .drill_backup(forwarded(req.into_inner(), p.as_ref()))
                .await
                .map_err(|s| error::from_backup_node(s, holder));
        }
        let id = req.get_ref().id.clone();
        let rec = if id.is_empty() {
            self.ctx.read_barrier().await?;
            self.ctx
                .backups
                .catalog()
                .into_iter()
                .rfind(|r| r.is_offsite())
                .ok_or_else(|| -> Status {
                    ApiError::new(
                        Reason::BackupNotShipped,
                        "no backup has a verified off-site copy yet",
                    )
                    .into()
                })?
        } else {
            self.find(&id).await?
        };
        if !rec.is_offsite() {
            return Err(ApiError::new(
                Reason::BackupNotShipped,
                "the backup has no verified off-site copy to drill",
            )
            .into());
        }
        let p = principal_of(&req);
        record(&self.ctx, p.as_ref(), "DrillBackup", rec.entry.id.clone()).await?;
        let who = p.map(|p| p.identity).unwrap_or_else(|| "-".into());
        let drill = self
            .ctx
            .backups
            .drill(&rec.entry.id, &format!("asked by {who}"))
            .await
            .map_err(ship_error)?;
        let rec = self.find(&rec.entry.id).await?;
        Ok(Response::new(DrillBackupResponse {
            backup: Some(backup_message(&rec)),
            drill: Some(Drill {
                node: drill.node,
                at_ms: drill.at_ms,
                passed: drill.passed,
                problem: drill.problem,
                took_ms: drill.took_ms,
            }),
        }))
    }
}
