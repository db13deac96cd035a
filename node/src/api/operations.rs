//! `mailvault.v1.Operations`: two-person operations. A proposal is
//! rehearsed here on the leader (`state::ops::rehearse` over its applied
//! state) and recorded with `Command::Ops`; the state machine decides every
//! transition again (`store/apply/ops.rs`), so what a handler checks first is
//! for a clear answer, and what the state machine checks is what holds.
//! Execution is the leader's worker's (`crate::operations`).

use std::sync::Arc;
use std::time::Duration;

use mailvault_proto::v1::operation_kind::Kind;
use mailvault_proto::v1::operations_client::OperationsClient;
use mailvault_proto::v1::operations_server::Operations;
use mailvault_proto::v1::{
    AddNodeOperation, AllowlistOperation, ApproveOperationRequest, AuditSettingsOperation,
    CancelOperationRequest, DeleteMailboxOperation, ExportOperation, ExpungeOperation,
    FencePart as ProtoFencePart, GetOperationRequest, GrantOperation, ListOperationsRequest,
    ListOperationsResponse, Operation as ProtoOperation, OperationKind, Plan as ProtoPlan,
    PlanOperationRequest, PlanStep, ProposeOperationRequest, RejectOperationRequest, RemoveNodeOperation,
    ReplaceNodeOperation, RestoreMailboxOperation, RestoreMailboxRequest, StepResult as ProtoStepResult,
    TransferLeadershipOperation,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::access::{check_identity, networks, role_of, role_to_proto};
use super::operator::record;
use crate::access::{Against, Principal};
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::forward::{principal_of, route_write, FORWARDED};
use crate::state::command::{Command, CommandResult, Refusal};
use crate::state::member::{JoinerFacts, MembershipFacts};
use crate::state::ops::{
    hex, plan_hash, rehearse, Actor, Approval, BackupFinding, BulkExpunge, Export, LeadershipFacts,
    LeadershipTransfer, MailboxFromBackup, MailboxName, OpChange, OpKind, OpRefusal, OpStatus, Operation,
    Person, Plan, VoterFacts,
};
use crate::tls::{identity_of, verify_client_certificate, CertIdentity};

/// Longest reason accepted (proposal, rejection).
const REASON_MAX_BYTES: usize = 500;
/// An unapproved proposal expires after this by default.
const DEFAULT_EXPIRY_SECS: u32 = 3600;
/// And after a day at most.
const MAX_EXPIRY_SECS: u32 = 86_400;
/// A leadership transfer holds leadership this long by default.
const DEFAULT_HOLD_SECS: u32 = 3600;
/// And a day at most.
const MAX_HOLD_SECS: u32 = 86_400;
/// An approved export lasts 30 days at most.
const MAX_EXPORT_WINDOW_MS: i64 = 30 * 86_400_000;

/// The operations service.
#[derive(Clone)]
pub struct OperationsService {
    ctx: Arc<Ctx>,
}

impl OperationsService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> OperationsService {
        OperationsService { ctx }
    }

    /// A client of this service on the leader, to forward a write over `ch`.
    fn client(&self, ch: Channel) -> OperationsClient<Channel> {
        OperationsClient::new(ch)
    }

    fn actor(&self, p: &Principal) -> Actor {
        Actor {
            identity: p.identity.clone(),
            source: p.source_text(),
            node: self.ctx.id,
            at_ms: crate::clock::now_ms(),
        }
    }

    /// The operation `id`, after a linearizable read point.
    async fn find(&self, id: &str) -> Result<Operation, Status> {
        check_op_id(id)?;
        self.ctx.read_barrier().await?;
        self.ctx
            .reader
            .operation(id)
            .map_err(error::read)?
            .ok_or_else(|| error::op_refusal(OpRefusal::NotFound).into())
    }

    /// Proposes one change to an operation: the operation after it, or the
    /// state machine's refusal.
    async fn decide(&self, change: OpChange) -> Result<Result<Operation, OpRefusal>, Status> {
        match self
            .ctx
            .proposer
            .propose(Command::Ops(change))
            .await
            .map_err(error::propose)?
        {
            CommandResult::Operation(op) => Ok(Ok(*op)),
            CommandResult::Refused(Refusal::Operation(r)) => Ok(Err(r)),
            CommandResult::Refused(r) => Err(error::refusal(r).into()),
            _ => Err(error::unexpected("operation change").into()),
        }
    }

    /// Proposes one change to an operation and returns the operation after
    /// it; a refusal is audited (see [`Self::refused`]).
    async fn change(&self, p: &Principal, method: &str, change: OpChange) -> Result<ProtoOperation, Status> {
        let target = change.id().to_string();
        match self.decide(change).await? {
            Ok(op) => Ok(op_to_proto(&op)),
            Err(r) => Err(self.refused(p, method, &target, r).await),
        }
    }

    /// Audits a refusal and builds its status. An attempt to approve without
    /// a second person (one's own proposal, one's own key, a signature that
    /// does not verify) is a denial and counts towards lockout; the other
    /// refusals (expired, decided, changed) are honest mistakes.
    async fn refused(&self, p: &Principal, method: &str, target: &str, r: OpRefusal) -> Status {
        let why = r.to_string();
        match r {
            OpRefusal::SelfApproval
            | OpRefusal::SameKey
            | OpRefusal::BadSignature(_)
            | OpRefusal::NotProposer => {
                self.ctx
                    .gate
                    .denials
                    .deny(&p.identity, p.source, method, target, &why, Against::Identity)
                    .await
            }
            _ => {
                let event = p.event(method, target.to_string(), &format!("refused: {why}"));
                if let Err(e) = self.ctx.audit.record(event).await {
                    return e;
                }
            }
        }
        error::op_refusal(r).into()
    }

    /// The checks on an approval's certificate that need this node's
    /// configuration (the CA) or the TLS session: the certificate is the
    /// caller's own (same key, same identity), issued by the cluster's CA and
    /// valid now, and not revoked. The signature is the state machine's to
    /// check. A failure is audited as a denial.
    async fn check_certificate(&self, p: &Principal, id: &str, der: &[u8]) -> Result<(), Status> {
        let checked = (|| {
            let key = mailvault_proto::approval::key_fingerprint(der)?;
            if p.key.is_empty() || key != p.key {
                return Err("the certificate sent is not the one this call is made with".to_string());
            }
            match identity_of(der) {
                Some((CertIdentity::User(u), serial)) if u == p.identity => {
                    if self.ctx.reader.serial_revoked(&serial).unwrap_or(true) {
                        return Err("the certificate sent is revoked".to_string());
                    }
                }
                _ => return Err("the certificate sent does not name the caller".to_string()),
            }
            verify_client_certificate(&self.ctx.config.tls, der)
        })();
        match checked {
            Ok(()) => Ok(()),
            Err(why) => Err(self
                .refused(p, "ApproveOperation", id, OpRefusal::BadSignature(why))
                .await),
        }
    }
}

impl OperationsService {
    /// What a rehearsal needs beyond the replicated state: for a mailbox
    /// restore, the node holding the backup verifies it and counts the
    /// mailbox's messages (after a read point). A backup that does not
    /// verify, or holds no such mailbox, is a violated precondition.
    async fn found(&self, kind: OpKind) -> Result<Result<OpKind, OpRefusal>, Status> {
        let mut r = match kind {
            OpKind::RestoreMailbox(r) => r,
            OpKind::TransferLeadership(mut x) => {
                x.seen = self.leadership_facts();
                return Ok(Ok(OpKind::TransferLeadership(x)));
            }
            OpKind::AddNode { node, .. } => {
                let seen = self.ctx.membership_facts();
                return Ok(self
                    .probe_joiner(node.id, &node.member.raft_addr)
                    .await
                    .map(|node| OpKind::AddNode { node, seen }));
            }
            OpKind::RemoveNode { id, .. } => {
                return Ok(Ok(OpKind::RemoveNode {
                    id,
                    seen: self.ctx.membership_facts(),
                }))
            }
            OpKind::ReplaceNode { old, new, .. } => {
                return Ok(Ok(OpKind::ReplaceNode {
                    old,
                    new,
                    seen: self.ctx.membership_facts(),
                }))
            }
            kind => return Ok(Ok(kind)),
        };
        let Some(rec) = self.ctx.reader.backup(&r.backup).map_err(error::read)? else {
            return Ok(Err(OpRefusal::Precondition(format!(
                "backup {} is not in the catalog",
                r.backup
            ))));
        };
        let node = rec.entry.node;
        if !rec.is_local() {
            // The rehearsal says so, in its words.
            r.found.node = node;
            return Ok(Ok(OpKind::RestoreMailbox(r)));
        }
        let checked = if node == self.ctx.id {
            self.ctx
                .backups
                .check_mailbox(&r.backup, &r.from.tenant, &r.from.mailbox)
                .await
                .map_err(|e| e.to_string())
        } else {
            match self.ctx.router.member_channel(node) {
                None => Err(format!("node {node}, which holds it, is not a member any more")),
                Some(ch) => {
                    let mut req = Request::new(RestoreMailboxRequest {
                        backup_id: r.backup.clone(),
                        tenant: r.from.tenant.clone(),
                        mailbox: r.from.mailbox.clone(),
                        new_mailbox: r.into.clone(),
                        resume: false,
                        operation: String::new(),
                        rehearse: true,
                    });
                    req.set_timeout(Duration::from_secs(300));
                    mailvault_proto::v1::backups_client::BackupsClient::new(ch)
                        .restore_mailbox(req)
                        .await
                        .map(|a| {
                            let a = a.into_inner();
                            (u64::from(a.messages), a.bytes)
                        })
                        .map_err(|s| format!("node {node}: {}", s.message()))
                }
            }
        };
        match checked {
            Ok((messages, bytes)) => {
                r.found = BackupFinding {
                    node,
                    messages,
                    bytes,
                };
                Ok(Ok(OpKind::RestoreMailbox(r)))
            }
            Err(why) => Ok(Err(OpRefusal::Precondition(format!(
                "backup {} cannot be restored from: {why}",
                r.backup
            )))),
        }
    }
}

impl OperationsService {
    /// Probes a node that waits to join: it must answer as node `id`, sign
    /// our nonce with a node certificate of the cluster's CA naming it, be
    /// of this cluster and data version, and hold no Raft state.
    async fn probe_joiner(&self, id: u64, addr: &str) -> Result<JoinerFacts, OpRefusal> {
        let refuse = |why: String| OpRefusal::Precondition(format!("node {id} at {addr}: {why}"));
        let r = crate::raft::health::probe(&self.ctx.peers, addr, Duration::from_secs(5))
            .await
            .map_err(|e| refuse(format!("no answer to the probe ({e})")))?;
        verify_client_certificate(&self.ctx.config.tls, &r.certificate)
            .map_err(|e| refuse(format!("its certificate is refused: {e}")))?;
        let serial = match identity_of(&r.certificate) {
            Some((CertIdentity::Node(n), serial)) if n == id && r.node_id == id => serial,
            Some((who, _)) => {
                return Err(refuse(format!(
                    "its certificate names {who}, and it answers as node {}",
                    r.node_id
                )))
            }
            None => return Err(refuse("its certificate names no node".into())),
        };
        if self.ctx.reader.serial_revoked(&serial).unwrap_or(true) {
            return Err(refuse("its certificate is revoked".into()));
        }
        if r.cluster_name != self.ctx.config.cluster_name {
            return Err(refuse(format!(
                "it belongs to cluster {:?}, not {:?}",
                r.cluster_name, self.ctx.config.cluster_name
            )));
        }
        if r.data_version != crate::state::version::DATA_VERSION {
            return Err(refuse(format!(
                "it runs data version {}, this cluster {}: upgrade it first",
                r.data_version,
                crate::state::version::DATA_VERSION
            )));
        }
        let role =
            crate::state::Role::parse(&r.role).ok_or_else(|| refuse(format!("unknown role {:?}", r.role)))?;
        Ok(JoinerFacts {
            id,
            member: crate::state::Member {
                role,
                client_addr: r.client_addr,
                raft_addr: r.raft_addr,
                ops_addr: r.ops_addr,
            },
            region: r.region,
            key: mailvault_proto::approval::key_fingerprint(&r.certificate).map_err(refuse)?,
            serial,
            initialized: r.initialized,
            disk_free_bytes: r.disk_free_bytes,
        })
    }

    /// The voters as this node sees them: the leader, each voter's role,
    /// and (on the leader only) how far each is behind.
    fn leadership_facts(&self) -> LeadershipFacts {
        let m = self.ctx.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let last = m.last_log_index.unwrap_or(0);
        let replication = m.replication.as_ref();
        let voters = membership
            .voter_ids()
            .filter_map(|id| {
                let node = membership.get_node(&id)?;
                let behind = match replication {
                    Some(_) if id == self.ctx.id => Some(0),
                    Some(r) => Some(last.saturating_sub(r.get(&id)?.as_ref().map_or(0, |l| l.index))),
                    None => None,
                };
                Some(VoterFacts {
                    id,
                    role: node.role,
                    behind,
                })
            })
            .collect();
        LeadershipFacts {
            leader: m.current_leader,
            voters,
        }
    }
}

fn check_op_id(id: &str) -> Result<(), ApiError> {
    let ok = id.len() == 11 && id.starts_with("op-") && id[3..].bytes().all(|b| b.is_ascii_hexdigit());
    match ok {
        true => Ok(()),
        false => Err(error::invalid("an operation id is op- and 8 hex digits").with("field", "id")),
    }
}

fn check_reason(field: &'static str, reason: &str) -> Result<(), ApiError> {
    crate::names::check(field, reason, REASON_MAX_BYTES).map_err(|_| {
        error::invalid(format!(
            "{field} is required (e.g. a ticket number): at most {REASON_MAX_BYTES} bytes, no control characters"
        ))
        .with("field", field)
    })
}

/// The operation a request names.
fn kind_of(k: Option<OperationKind>) -> Result<OpKind, ApiError> {
    match k.and_then(|k| k.kind) {
        Some(Kind::Grant(g)) => {
            check_identity(&g.identity)?;
            Ok(OpKind::Grant {
                identity: g.identity,
                role: role_of(g.role)?,
            })
        }
        Some(Kind::Allowlist(a)) => {
            check_identity(&a.identity)?;
            Ok(OpKind::Allowlist {
                identity: a.identity,
                networks: networks(&a.allow_from.map(|a| a.networks).unwrap_or_default())?,
            })
        }
        Some(Kind::DeleteMailbox(d)) => {
            crate::names::tenant(&d.tenant).map_err(error::name)?;
            crate::names::mailbox(&d.mailbox).map_err(error::name)?;
            Ok(OpKind::DeleteMailbox(MailboxName {
                tenant: d.tenant,
                mailbox: d.mailbox,
            }))
        }
        Some(Kind::Export(x)) => {
            check_identity(&x.exporter)?;
            crate::names::tenant(&x.tenant).map_err(error::name)?;
            crate::names::mailbox(&x.mailbox).map_err(error::name)?;
            let now = crate::clock::now_ms();
            if x.until_ms <= now || x.until_ms > now + MAX_EXPORT_WINDOW_MS {
                return Err(
                    error::invalid("until_ms must be in the future, at most 30 days ahead")
                        .with("field", "until_ms"),
                );
            }
            Ok(OpKind::ApproveExport(Export {
                exporter: x.exporter,
                mailbox: MailboxName {
                    tenant: x.tenant,
                    mailbox: x.mailbox,
                },
                until_ms: x.until_ms,
            }))
        }
        Some(Kind::RestoreMailbox(r)) => {
            if !crate::store::backup::is_backup_id(&r.backup_id) {
                return Err(
                    error::invalid("backup_id is not a backup id (YYYYMMDDTHHMMSSZ-NNNNNNNNNNNN)")
                        .with("field", "backup_id"),
                );
            }
            crate::names::tenant(&r.tenant).map_err(error::name)?;
            crate::names::mailbox(&r.mailbox).map_err(error::name)?;
            crate::names::mailbox(&r.new_mailbox).map_err(error::name)?;
            Ok(OpKind::RestoreMailbox(MailboxFromBackup {
                backup: r.backup_id,
                from: MailboxName {
                    tenant: r.tenant,
                    mailbox: r.mailbox,
                },
                into: r.new_mailbox,
                found: BackupFinding::default(),
            }))
        }
        Some(Kind::AuditSettings(a)) => Ok(OpKind::AuditSettings {
            fail_closed: a.fail_closed,
        }),
        Some(Kind::Expunge(x)) => {
            crate::names::tenant(&x.tenant).map_err(error::name)?;
            crate::names::mailbox(&x.mailbox).map_err(error::name)?;
            if x.before_ms < 0 {
                return Err(error::invalid("before_ms must not be negative").with("field", "before_ms"));
            }
            if x.before_ms == 0 && !x.deleted_only {
                return Err(error::invalid(
                    "say which messages: before_ms, deleted_only or both (DeleteMailbox removes a whole mailbox)",
                )
                .with("field", "before_ms"));
            }
            Ok(OpKind::Expunge(BulkExpunge {
                mailbox: MailboxName {
                    tenant: x.tenant,
                    mailbox: x.mailbox,
                },
                before_ms: (x.before_ms > 0).then_some(x.before_ms),
                deleted_only: x.deleted_only,
            }))
        }
        Some(Kind::TransferLeadership(x)) => {
            if x.node_id == 0 {
                return Err(error::invalid("name the voter to lead (node_id)").with("field", "node_id"));
            }
            let hold_secs = match x.hold_secs {
                0 => DEFAULT_HOLD_SECS,
                s if s <= MAX_HOLD_SECS => s,
                _ => {
                    return Err(error::invalid(format!("hold_secs is at most {MAX_HOLD_SECS}"))
                        .with("field", "hold_secs"))
                }
            };
            Ok(OpKind::TransferLeadership(LeadershipTransfer {
                to: x.node_id,
                hold_ms: i64::from(hold_secs) * 1000,
                seen: LeadershipFacts::default(),
            }))
        }
        Some(Kind::AddNode(x)) => {
            if x.node_id == 0 {
                return Err(error::invalid("name the joining node's id (node_id)").with("field", "node_id"));
            }
            if x.raft_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(
                    error::invalid("raft_addr is the joining node's raft address, ip:port")
                        .with("field", "raft_addr"),
                );
            }
            Ok(OpKind::AddNode {
                node: JoinerFacts {
                    id: x.node_id,
                    member: crate::state::Member {
                        raft_addr: x.raft_addr,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                seen: MembershipFacts::default(),
            })
        }
        Some(Kind::RemoveNode(x)) => Ok(OpKind::RemoveNode {
            id: node_id(x.node_id, "node_id")?,
            seen: MembershipFacts::default(),
        }),
        Some(Kind::ReplaceNode(x)) => {
            let (old, new) = (
                node_id(x.old_node_id, "old_node_id")?,
                node_id(x.new_node_id, "new_node_id")?,
            );
            if old == new {
                return Err(error::invalid("a node does not replace itself").with("field", "new_node_id"));
            }
            Ok(OpKind::ReplaceNode {
                old,
                new,
                seen: MembershipFacts::default(),
            })
        }
        Some(Kind::Unfreeze(_)) => Ok(OpKind::Unfreeze),
        None => Err(error::invalid("name the operation (kind)").with("field", "kind")),
    }
}

fn node_id(id: u64, field: &'static str) -> Result<u64, ApiError> {
    match id {
        0 => Err(error::invalid(format!("{field} names a node id (not 0)")).with("field", field)),
        id => Ok(id),
    }
}

fn kind_to_proto(k: &OpKind) -> OperationKind {
    let kind = match k {
        OpKind::Grant { identity, role } => Kind::Grant(GrantOperation {
            identity: identity.clone(),
            role: Some(role_to_proto(role)),
        }),
        OpKind::Allowlist { identity, networks } => Kind::Allowlist(AllowlistOperation {
            identity: identity.clone(),
            allow_from: Some(mailvault_proto::v1::Allowlist {
                networks: networks.iter().map(|n| n.to_string()).collect(),
            }),
        }),
        OpKind::DeleteMailbox(m) => Kind::DeleteMailbox(DeleteMailboxOperation {
            tenant: m.tenant.clone(),
            mailbox: m.mailbox.clone(),
        }),
        OpKind::ApproveExport(x) => Kind::Export(ExportOperation {
            exporter: x.exporter.clone(),
            tenant: x.mailbox.tenant.clone(),
            mailbox: x.mailbox.mailbox.clone(),
            until_ms: x.until_ms,
        }),
        OpKind::RestoreMailbox(r) => Kind::RestoreMailbox(RestoreMailboxOperation {
            backup_id: r.backup.clone(),
            tenant: r.from.tenant.clone(),
            mailbox: r.from.mailbox.clone(),
            new_mailbox: r.into.clone(),
            node: r.found.node,
            messages: r.found.messages,
            bytes: r.found.bytes,
        }),
        OpKind::AuditSettings { fail_closed } => Kind::AuditSettings(AuditSettingsOperation {
            fail_closed: *fail_closed,
        }),
        OpKind::Expunge(x) => Kind::Expunge(ExpungeOperation {
            tenant: x.mailbox.tenant.clone(),
            mailbox: x.mailbox.mailbox.clone(),
            before_ms: x.before_ms.unwrap_or(0),
            deleted_only: x.deleted_only,
        }),
        OpKind::TransferLeadership(x) => Kind::TransferLeadership(TransferLeadershipOperation {
            node_id: x.to,
            hold_secs: (x.hold_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32,
        }),
        OpKind::AddNode { node, .. } => Kind::AddNode(AddNodeOperation {
            raft_addr: node.member.raft_addr.clone(),
            node_id: node.id,
        }),
        OpKind::RemoveNode { id, .. } => Kind::RemoveNode(RemoveNodeOperation { node_id: *id }),
        OpKind::ReplaceNode { old, new, .. } => Kind::ReplaceNode(ReplaceNodeOperation {
            old_node_id: *old,
            new_node_id: *new,
        }),
        OpKind::Unfreeze => Kind::Unfreeze(mailvault_proto::v1::UnfreezeOperation {}),
    };
    OperationKind { kind: Some(kind) }
}

fn plan_to_proto(kind: &OpKind, plan: &Plan) -> ProtoPlan {
    ProtoPlan {
        kind: Some(kind_to_proto(kind)),
        steps: plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| PlanStep {
                index: i as u32,
                action: s.action().to_string(),
                description: s.describe(),
            })
            .collect(),
        effect: plan.effect.clone(),
        checks: plan.checks.clone(),
        backup_first: plan.backup_first,
        fence: plan
            .fence
            .iter()
            .map(|f| ProtoFencePart {
                what: f.what.clone(),
                hash: hex(&f.hash),
            })
            .collect(),
        fence_hash: hex(&plan.fence_hash()),
    }
}

fn op_to_proto(op: &Operation) -> ProtoOperation {
    let approval = op.approval.as_ref();
    ProtoOperation {
        id: op.id.clone(),
        status: op.status.as_str().to_string(),
        reason: op.reason.clone(),
        proposer: op.proposer.identity.clone(),
        proposer_key: op.proposer.key.clone(),
        created_ms: op.created_ms,
        expires_ms: op.expires_ms,
        plan: Some(plan_to_proto(&op.kind, &op.plan)),
        plan_hash: hex(&op.plan_hash),
        approver: approval.map(|a| a.by.identity.clone()).unwrap_or_default(),
        approver_key: approval.map(|a| a.by.key.clone()).unwrap_or_default(),
        approved_ms: approval.map(|a| a.at_ms).unwrap_or_default(),
        approval_signature: approval.map(|a| a.signature.clone()).unwrap_or_default(),
        backup_id: op.backup_id.clone().unwrap_or_default(),
        steps: op
            .steps
            .iter()
            .map(|s| ProtoStepResult {
                index: s.index,
                at_ms: s.at_ms,
                ok: s.ok,
                result: s.result.clone(),
            })
            .collect(),
        ended_ms: op.ended_ms.unwrap_or_default(),
        outcome: op.outcome.clone(),
    }
}

/// Pending first (oldest first), then the ended ones, newest first.
fn list_order(ops: &mut [Operation]) {
    ops.sort_by(|a, b| {
        let (ea, eb) = (a.status.ended(), b.status.ended());
        ea.cmp(&eb).then_with(|| match ea {
            false => a.created_ms.cmp(&b.created_ms),
            true => b.created_ms.cmp(&a.created_ms),
        })
    });
}

fn new_op_id() -> Result<String, ApiError> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|_| ApiError::new(Reason::InternalError, "random source unavailable"))?;
    Ok(format!("op-{}", hex(&b)))
}

fn principal(p: Option<Principal>) -> Result<Principal, ApiError> {
    p.ok_or_else(|| ApiError::new(Reason::NoIdentity, "no authenticated identity"))
}

type WatchStream = ReceiverStream<Result<ProtoOperation, Status>>;

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn plan_operation(
        &self,
        req: Request<PlanOperationRequest>,
    ) -> Result<Response<ProtoPlan>, Status> {
        let p = principal_of(&req);
        let kind = kind_of(req.into_inner().kind)?;
        record(&self.ctx, p.as_ref(), "PlanOperation", kind.target()).await?;
        self.ctx.read_barrier().await?;
        let kind = match self.found(kind).await? {
            Ok(kind) => kind,
            Err(r) => return Err(error::op_refusal(r).into()),
        };
        match rehearse(&self.ctx.reader, &kind).map_err(error::read)? {
            Ok(plan) => Ok(Response::new(plan_to_proto(&kind, &plan))),
            Err(r) => Err(error::op_refusal(r).into()),
        }
    }

    async fn propose_operation(
        &self,
        req: Request<ProposeOperationRequest>,
    ) -> Result<Response<ProtoOperation>, Status> {
        route_write!(self, req, p, propose_operation);
        let p = principal(p)?;
        let r = req.into_inner();
        let kind = kind_of(r.kind)?;
        check_reason("reason", &r.reason)?;
        let expires_in = match r.expires_in_secs {
            0 => DEFAULT_EXPIRY_SECS,
            s if s <= MAX_EXPIRY_SECS => s,
            _ => {
                return Err(
                    error::invalid(format!("expires_in_secs is at most {MAX_EXPIRY_SECS}"))
                        .with("field", "expires_in_secs")
                        .into(),
                )
            }
        };
        if p.key.is_empty() {
            return Err(ApiError::new(Reason::NoIdentity, "the caller's certificate key is unknown").into());
        }
        self.ctx.read_barrier().await?;
        let target = kind.target();
        let kind = match self.found(kind).await? {
            Ok(kind) => kind,
            Err(r) => return Err(self.refused(&p, "ProposeOperation", &target, r).await),
        };
        let plan = match rehearse(&self.ctx.reader, &kind).map_err(error::read)? {
            Ok(plan) => plan,
            Err(r) => return Err(self.refused(&p, "ProposeOperation", &target, r).await),
        };
        let proposer = Person {
            identity: p.identity.clone(),
            key: p.key.clone(),
        };
        // A taken id (one in four billion) is proposed again under another.
        for _ in 0..3 {
            let actor = self.actor(&p);
            let id = new_op_id()?;
            let expires_ms = actor.at_ms + i64::from(expires_in) * 1000;
            let hash = plan_hash(&id, &kind, &r.reason, &proposer, expires_ms, &plan);
            let op = Operation {
                id,
                kind: kind.clone(),
                reason: r.reason.clone(),
                proposer: proposer.clone(),
                created_ms: actor.at_ms,
                expires_ms,
                plan: plan.clone(),
                plan_hash: hash,
                status: OpStatus::Proposed,
                approval: None,
                backup_id: None,
                steps: Vec::new(),
                ended_ms: None,
                outcome: String::new(),
            };
            let change = OpChange::Propose {
                op: Box::new(op),
                actor,
            };
            match self.decide(change).await? {
                Ok(op) => return Ok(Response::new(op_to_proto(&op))),
                Err(OpRefusal::IdTaken) => continue,
                Err(r) => return Err(self.refused(&p, "ProposeOperation", &target, r).await),
            }
        }
        Err(ApiError::new(Reason::InternalError, "no free operation id; retry").into())
    }

    async fn list_operations(
        &self,
        req: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let p = principal_of(&req);
        record(&self.ctx, p.as_ref(), "ListOperations", "-".into()).await?;
        self.ctx.read_barrier().await?;
        let mut ops = self.ctx.reader.operations().map_err(error::read)?;
        list_order(&mut ops);
        Ok(Response::new(ListOperationsResponse {
            operations: ops.iter().map(op_to_proto).collect(),
        }))
    }

    async fn get_operation(
        &self,
        req: Request<GetOperationRequest>,
    ) -> Result<Response<ProtoOperation>, Status> {
        let p = principal_of(&req);
        let id = req.into_inner().id;
        check_op_id(&id)?;
        record(&self.ctx, p.as_ref(), "GetOperation", id.clone()).await?;
        Ok(Response::new(op_to_proto(&self.find(&id).await?)))
    }

    async fn approve_operation(
        &self,
        req: Request<ApproveOperationRequest>,
    ) -> Result<Response<ProtoOperation>, Status> {
        // The certificate must be the one this call is made with; checked
        // before the call is passed on, and again on the leader (which sees
        // the caller's key as this node forwards it).
        if !req.metadata().contains_key(FORWARDED) {
            let p = principal(principal_of(&req))?;
            let r = req.get_ref();
            check_op_id(&r.id)?;
            self.check_certificate(&p, &r.id, &r.certificate).await?;
        }
        route_write!(self, req, p, approve_operation);
        let p = principal(p)?;
        let r = req.into_inner();
        check_op_id(&r.id)?;
        let hash: [u8; 32] = decode_hex(&r.plan_hash)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| error::invalid("plan_hash is 64 hex digits").with("field", "plan_hash"))?;
        self.check_certificate(&p, &r.id, &r.certificate).await?;
        let actor = self.actor(&p);
        let approval = Approval {
            by: Person {
                identity: p.identity.clone(),
                key: p.key.clone(),
            },
            certificate: r.certificate,
            signature: r.signature,
            at_ms: actor.at_ms,
        };
        let change = OpChange::Approve {
            id: r.id,
            plan_hash: hash,
            approval,
            actor,
        };
        Ok(Response::new(self.change(&p, "ApproveOperation", change).await?))
    }

    async fn reject_operation(
        &self,
        req: Request<RejectOperationRequest>,
    ) -> Result<Response<ProtoOperation>, Status> {
        route_write!(self, req, p, reject_operation);
        let p = principal(p)?;
        let r = req.into_inner();
        check_op_id(&r.id)?;
        check_reason("reason", &r.reason)?;
        let change = OpChange::Reject {
            id: r.id,
            reason: r.reason,
            actor: self.actor(&p),
        };
        Ok(Response::new(self.change(&p, "RejectOperation", change).await?))
    }

    async fn cancel_operation(
        &self,
        req: Request<CancelOperationRequest>,
    ) -> Result<Response<ProtoOperation>, Status> {
        route_write!(self, req, p, cancel_operation);
        let p = principal(p)?;
        let id = req.into_inner().id;
        check_op_id(&id)?;
        let change = OpChange::Cancel {
            id,
            actor: self.actor(&p),
        };
        Ok(Response::new(self.change(&p, "CancelOperation", change).await?))
    }

    type WatchOperationStream = WatchStream;

    async fn watch_operation(
        &self,
        req: Request<GetOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        let p = principal_of(&req);
        let id = req.into_inner().id;
        check_op_id(&id)?;
        record(&self.ctx, p.as_ref(), "WatchOperation", id.clone()).await?;
        let first = self.find(&id).await?;
        let (tx, rx) = mpsc::channel(8);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(op_to_proto(&last))).await.is_err() {
                return;
            }
            let mut applied = ctx.applied.clone();
            // Bounded: an operation ends, or its proposal expires within a
            // day; a watcher that goes away ends it sooner.
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs(u64::from(MAX_EXPIRY_SECS) + 3600);
            while !last.status.ended() && tokio::time::Instant::now() < deadline {
                let _ = tokio::time::timeout(Duration::from_secs(1), applied.changed()).await;
                let now = match ctx.reader.operation(&id) {
                    Ok(Some(op)) => op,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(error::read(e).into())).await;
                        return;
                    }
                };
                if now != last {
                    if tx.send(Ok(op_to_proto(&now))).await.is_err() {
                        return;
                    }
                    last = now;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
