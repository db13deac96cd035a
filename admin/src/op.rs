//! `mailvault-admin op`: two-person operations. One operator proposes (the
//! cluster rehearses and shows the exact plan), a second one — another
//! identity with another key — reads the plan and approves it, signing its
//! hash with the key of the certificate this CLI calls with; the leader then
//! executes it step by step (`op watch`).

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use mailvault_proto::v1::operation_kind::Kind;
use mailvault_proto::v1::{role, Role, TenantRole};
use mailvault_proto::v1::{
    AddNodeOperation, Allowlist, AllowlistOperation, ApproveOperationRequest, AuditSettingsOperation,
    CancelOperationRequest, DeleteMailboxOperation, ExportOperation, ExpungeOperation, GetOperationRequest,
    GrantOperation, ListOperationsRequest, Operation, OperationKind, Plan, PlanOperationRequest,
    ProposeOperationRequest, RejectOperationRequest, RemoveNodeOperation, ReplaceNodeOperation,
    RestoreMailboxOperation, TransferLeadershipOperation,
};
use serde_json::json;

use crate::client::{operations, signing_identity, status_err};
use crate::output::{rfc3339, table, Output};

/// One role: `--tenant T --role R`, or `--cluster-role R`.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = true)]
pub struct RoleArgs {
    /// Tenant (`*` for every tenant).
    #[arg(long, requires = "role", conflicts_with = "cluster_role")]
    tenant: Option<String>,
    /// reader, agent, exporter or tenant-admin.
    #[arg(long, requires = "tenant")]
    role: Option<String>,
    /// operator or auditor.
    #[arg(long)]
    cluster_role: Option<String>,
}

impl RoleArgs {
    /// The role as the API names it.
    pub fn into_role(self) -> anyhow::Result<Option<Role>> {
        let role = match (self.tenant, self.role, self.cluster_role) {
            (Some(tenant), Some(role), None) => role::Role::Tenant(TenantRole { tenant, role }),
            (None, None, Some(c)) => role::Role::Cluster(c),
            _ => anyhow::bail!("give --tenant with --role, or --cluster-role"),
        };
        Ok(Some(Role { role: Some(role) }))
    }
}

#[derive(Subcommand, Debug)]
pub enum OpCmd {
    /// Rehearses an operation without proposing it (read-only, one person).
    Plan {
        #[command(subcommand)]
        kind: KindCmd,
    },
    /// Proposes an operation: rehearsed, recorded, and changing nothing until
    /// a second operator approves it.
    Propose {
        /// Why (e.g. a ticket number); required.
        #[arg(long)]
        reason: String,
        /// How long the proposal waits for approval (e.g. 30m, 2h; at most 24h).
        #[arg(long, default_value = "1h")]
        expires: humantime::Duration,
        #[command(subcommand)]
        kind: KindCmd,
    },
    /// Every operation, pending first.
    List,
    /// One operation, with its plan as the approver sees it.
    Show {
        /// The operation id (op-…).
        id: String,
    },
    /// Approves an operation proposed by another operator: shows its plan,
    /// asks for its id to be typed, signs its plan hash with this CLI's key.
    Approve {
        /// The operation id.
        id: String,
        /// For scripts: approve without asking; needs --plan-hash.
        #[arg(long, requires = "plan_hash")]
        yes: bool,
        /// The plan hash the approver read (`op show`); refused if the
        /// operation's is another.
        #[arg(long)]
        plan_hash: Option<String>,
    },
    /// Rejects an operation proposed by another operator.
    Reject {
        /// The operation id.
        id: String,
        /// Why; required.
        #[arg(long)]
        reason: String,
    },
    /// Withdraws one's own proposal.
    Cancel {
        /// The operation id.
        id: String,
    },
    /// Follows an operation until it ends, with a progress bar.
    Watch {
        /// The operation id.
        id: String,
    },
}

/// A mailbox restore's arguments (`op propose restore-mailbox`, `backup restore-mailbox`).
#[derive(clap::Args, Debug)]
pub struct RestoreMailboxArgs {
    /// The backup's id (`backup list`); `backup restore-mailbox` also takes `latest`: the newest
    /// one still held.
    pub backup: String,
    /// The tenant.
    #[arg(long)]
    pub tenant: String,
    /// The mailbox, as named in the backup.
    #[arg(long)]
    pub mailbox: String,
    /// The new mailbox to create and fill; it must not exist.
    #[arg(long = "as")]
    pub new_mailbox: String,
}

impl RestoreMailboxArgs {
    /// The operation's kind.
    pub fn into_kind(self) -> Kind {
        Kind::RestoreMailbox(RestoreMailboxOperation {
            backup_id: self.backup,
            tenant: self.tenant,
            mailbox: self.mailbox,
            new_mailbox: self.new_mailbox,
            ..Default::default()
        })
    }
}

/// The operations that can be planned and proposed.
#[derive(Subcommand, Debug)]
pub enum KindCmd {
    /// Grant a tenant role (`--tenant T --role R`) or a cluster role
    /// (`--cluster-role R`) to an identity.
    Grant {
        /// The identity.
        identity: String,
        #[command(flatten)]
        role: RoleArgs,
    },
    /// Let an identity call from these networks (none: anywhere) when that
    /// admits new sources (narrowing is `access allow`, at once).
    Allow {
        /// The identity.
        identity: String,
        /// CIDR networks.
        networks: Vec<String>,
    },
    /// Delete a mailbox and every message in it, after a verified backup.
    DeleteMailbox {
        /// The tenant.
        tenant: String,
        /// The mailbox.
        mailbox: String,
    },
    /// Let one identity export one mailbox (`Mailbox.ExportMailbox`) for a while.
    Export {
        /// The exporter identity (it also needs the exporter role).
        exporter: String,
        /// The tenant.
        tenant: String,
        /// The mailbox.
        mailbox: String,
        /// For how long from now (e.g. 4h, 2d; at most 30 days).
        #[arg(long = "for", default_value = "24h")]
        valid_for: humantime::Duration,
    },
    /// Set the cluster's audit settings on every node, replacing each node's `[audit]` config.
    AuditSettings {
        /// Whether every access waits for its audit record and fails when it cannot be
        /// committed.
        #[arg(long, action = clap::ArgAction::Set)]
        fail_closed: bool,
    },
    /// Restore one mailbox of a backup into a new live mailbox (`backup restore-mailbox`).
    RestoreMailbox(RestoreMailboxArgs),
    /// Expunge the messages of a mailbox that the rules select (all of them must match), after a
    /// verified backup; the plan lists every UID.
    Expunge {
        /// The tenant.
        tenant: String,
        /// The mailbox.
        mailbox: String,
        /// Only messages received (internal date) before this UTC time: `2026-01-01` or
        /// `2026-01-01T12:00:00Z`.
        #[arg(long, value_parser = parse_time_ms)]
        before: Option<i64>,
        /// Only messages flagged `\Deleted`.
        #[arg(long)]
        deleted: bool,
    },
    /// Move leadership to a voter (active or standby) and keep it there for a while, e.g. before
    /// the leader's machine is serviced; one election.
    TransferLeadership {
        /// The node id of the voter to lead (`status` lists the members).
        node: u64,
        /// How long it keeps leadership once it has it (e.g. 30m, 4h; at most 24h).
        #[arg(long, default_value = "1h")]
        hold: humantime::Duration,
    },
    /// Add a node that waits to join (started with a `[join]` setting and its node certificate):
    /// the leader probes it (it proves its id with its certificate's key) and the plan shows its
    /// role, region and key. A spare or dr node becomes a learner; a standby or backup node a
    /// learner, then a voter once caught up.
    AddNode {
        /// The id the node's certificate names.
        node: u64,
        /// The node's raft address (its `[join]` raft_addr), ip:port.
        #[arg(long)]
        raft_addr: String,
    },
    /// Remove a member; refused if it would leave fewer healthy voters than a quorum, or no voter
    /// that may lead, or if it leads (transfer leadership first).
    RemoveNode {
        /// The member's id.
        node: u64,
    },
    /// Replace a voter by a caught-up learner (a spare), which takes its role; one
    /// joint-consensus change.
    ReplaceNode {
        /// The voter to remove.
        old: u64,
        /// The learner that takes its place.
        new: u64,
    },
    /// Let automatic repair go on after it froze (`status` says why it did).
    Unfreeze,
}

impl KindCmd {
    fn into_kind(self) -> anyhow::Result<OperationKind> {
        let kind = match self {
            KindCmd::Grant { identity, role } => Kind::Grant(GrantOperation {
                identity,
                role: role.into_role()?,
            }),
            KindCmd::Allow { identity, networks } => Kind::Allowlist(AllowlistOperation {
                identity,
                allow_from: Some(Allowlist { networks }),
            }),
            KindCmd::DeleteMailbox { tenant, mailbox } => {
                Kind::DeleteMailbox(DeleteMailboxOperation { tenant, mailbox })
            }
            KindCmd::Export {
                exporter,
                tenant,
                mailbox,
                valid_for,
            } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let until = now + std::time::Duration::from(valid_for);
                Kind::Export(ExportOperation {
                    exporter,
                    tenant,
                    mailbox,
                    until_ms: i64::try_from(until.as_millis()).unwrap_or(i64::MAX),
                })
            }
            KindCmd::AuditSettings { fail_closed } => {
                Kind::AuditSettings(AuditSettingsOperation { fail_closed })
            }
            KindCmd::RestoreMailbox(r) => r.into_kind(),
            KindCmd::Expunge {
                tenant,
                mailbox,
                before,
                deleted,
            } => {
                if before.is_none() && !deleted {
                    anyhow::bail!(
                        "say which messages: --before DATE, --deleted or both (op propose delete-mailbox removes a whole mailbox)"
                    );
                }
                Kind::Expunge(ExpungeOperation {
                    tenant,
                    mailbox,
                    before_ms: before.unwrap_or(0),
                    deleted_only: deleted,
                })
            }
            KindCmd::TransferLeadership { node, hold } => {
                let secs = std::time::Duration::from(hold).as_secs();
                if secs == 0 || secs > 86_400 {
                    anyhow::bail!("--hold is at least a second and at most 24h");
                }
                Kind::TransferLeadership(TransferLeadershipOperation {
                    node_id: node,
                    hold_secs: secs as u32,
                })
            }
            KindCmd::AddNode { node, raft_addr } => Kind::AddNode(AddNodeOperation {
                raft_addr,
                node_id: node,
            }),
            KindCmd::RemoveNode { node } => Kind::RemoveNode(RemoveNodeOperation { node_id: node }),
            KindCmd::ReplaceNode { old, new } => Kind::ReplaceNode(ReplaceNodeOperation {
                old_node_id: old,
                new_node_id: new,
            }),
            KindCmd::Unfreeze => Kind::Unfreeze(mailvault_proto::v1::UnfreezeOperation {}),
        };
        Ok(OperationKind { kind: Some(kind) })
    }
}

/// A UTC date (`2026-01-01`, midnight) or time (RFC 3339), as ms since the Unix epoch.
fn parse_time_ms(s: &str) -> Result<i64, String> {
    let full = match s.len() == 10 {
        true => format!("{s}T00:00:00Z"),
        false => s.to_string(),
    };
    let t = humantime::parse_rfc3339_weak(&full)
        .map_err(|e| format!("{s:?} is not a date (2026-01-01) or an RFC 3339 time: {e}"))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis();
    i64::try_from(ms).map_err(|_| format!("{s:?} is too far ahead"))
}

/// What the operation does, in a few words.
fn kind_text(k: Option<&OperationKind>) -> String {
    match k.and_then(|k| k.kind.as_ref()) {
        Some(Kind::Grant(g)) => {
            let role = g.role.as_ref().and_then(|r| r.role.as_ref());
            let role = match role {
                Some(mailvault_proto::v1::role::Role::Tenant(t)) => {
                    format!("{} on tenant {}", t.role, t.tenant)
                }
                Some(mailvault_proto::v1::role::Role::Cluster(c)) => format!("cluster role {c}"),
                None => "-".into(),
            };
            format!("grant {role} to {}", g.identity)
        }
        Some(Kind::Allowlist(a)) => {
            let n = a
                .allow_from
                .as_ref()
                .map(|a| a.networks.clone())
                .unwrap_or_default();
            let n = match n.is_empty() {
                true => "anywhere".to_string(),
                false => n.join(", "),
            };
            format!("let {} call from {n}", a.identity)
        }
        Some(Kind::DeleteMailbox(d)) => format!("delete mailbox {}/{}", d.tenant, d.mailbox),
        Some(Kind::Export(x)) => format!(
            "let {} export {}/{} until {}",
            x.exporter,
            x.tenant,
            x.mailbox,
            rfc3339(x.until_ms)
        ),
        Some(Kind::AuditSettings(a)) => format!("set the cluster's audit fail_closed to {}", a.fail_closed),
        Some(Kind::Expunge(x)) => {
            let mut rules = Vec::new();
            if x.before_ms > 0 {
                rules.push(format!("received before {}", rfc3339(x.before_ms)));
            }
            if x.deleted_only {
                rules.push("flagged \\Deleted".to_string());
            }
            format!(
                "expunge the messages of {}/{} {}",
                x.tenant,
                x.mailbox,
                rules.join(" and ")
            )
        }
        Some(Kind::RestoreMailbox(r)) => format!(
            "restore {}/{} of backup {} as {}/{}",
            r.tenant, r.mailbox, r.backup_id, r.tenant, r.new_mailbox
        ),
        Some(Kind::TransferLeadership(t)) => format!(
            "transfer leadership to node {} for {}",
            t.node_id,
            humantime::format_duration(std::time::Duration::from_secs(u64::from(t.hold_secs)))
        ),
        Some(Kind::AddNode(a)) => format!("add node {} (raft {})", a.node_id, a.raft_addr),
        Some(Kind::RemoveNode(r)) => format!("remove node {}", r.node_id),
        Some(Kind::ReplaceNode(r)) => format!("replace node {} by node {}", r.old_node_id, r.new_node_id),
        Some(Kind::Unfreeze(_)) => "unfreeze automatic repair".to_string(),
        None => "-".into(),
    }
}

fn plan_json(p: &Plan) -> serde_json::Value {
    json!({
        "operation": kind_text(p.kind.as_ref()),
        "steps": p.steps.iter().map(|s| json!({"index": s.index, "action": s.action, "description": s.description})).collect::<Vec<_>>(),
        "effect": p.effect,
        "checks": p.checks,
        "backup_first": p.backup_first,
        "fence": p.fence.iter().map(|f| json!({"what": f.what, "hash": f.hash})).collect::<Vec<_>>(),
        "fence_hash": p.fence_hash,
    })
}

fn plan_text(p: &Plan) -> String {
    let mut out = vec![format!("operation: {}", kind_text(p.kind.as_ref()))];
    out.push("plan (executed in this order):".into());
    for s in &p.steps {
        out.push(format!("  {}. {}", s.index + 1, s.description));
    }
    out.push("effect:".into());
    out.extend(p.effect.iter().map(|e| format!("  - {e}")));
    out.push("checked:".into());
    out.extend(p.checks.iter().map(|c| format!("  - {c}")));
    out.push(format!(
        "pre-operation backup: {}",
        match p.backup_first {
            true => "yes, taken and verified before the first step",
            false => "no (nothing is deleted)",
        }
    ));
    let fence: Vec<String> = p.fence.iter().map(|f| f.what.clone()).collect();
    out.push(format!(
        "depends on: {} (fence {})",
        fence.join(", "),
        short(&p.fence_hash)
    ));
    out.join("\n")
}

fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

fn op_json(o: &Operation) -> serde_json::Value {
    json!({
        "id": o.id, "status": o.status, "reason": o.reason,
        "proposer": o.proposer, "proposer_key": o.proposer_key,
        "created": rfc3339(o.created_ms), "expires": rfc3339(o.expires_ms),
        "plan": o.plan.as_ref().map(plan_json), "plan_hash": o.plan_hash,
        "approver": o.approver, "approver_key": o.approver_key,
        "approved": (o.approved_ms > 0).then(|| rfc3339(o.approved_ms)),
        "backup_id": o.backup_id,
        "steps": o.steps.iter().map(|s| json!({"index": s.index, "at": rfc3339(s.at_ms), "ok": s.ok, "result": s.result})).collect::<Vec<_>>(),
        "ended": (o.ended_ms > 0).then(|| rfc3339(o.ended_ms)),
        "outcome": o.outcome,
    })
}

fn op_text(o: &Operation) -> String {
    let mut out = vec![
        format!("operation {}  [{}]", o.id, o.status),
        format!(
            "proposed by {} (key {}) at {}; expires {}",
            o.proposer,
            short(&o.proposer_key),
            rfc3339(o.created_ms),
            rfc3339(o.expires_ms)
        ),
        format!("reason: {}", o.reason),
    ];
    if let Some(p) = &o.plan {
        out.push(plan_text(p));
    }
    out.push(format!("plan hash: {}", o.plan_hash));
    if !o.approver.is_empty() {
        out.push(format!(
            "approved by {} (key {}) at {}",
            o.approver,
            short(&o.approver_key),
            rfc3339(o.approved_ms)
        ));
    }
    if !o.backup_id.is_empty() {
        out.push(format!("pre-operation backup: {}", o.backup_id));
    }
    for s in &o.steps {
        let mark = if s.ok { "done" } else { "FAILED" };
        out.push(format!(
            "step {} {mark} at {}: {}",
            s.index + 1,
            rfc3339(s.at_ms),
            s.result
        ));
    }
    if !o.outcome.is_empty() {
        out.push(format!("outcome: {}", o.outcome));
    }
    out.join("\n")
}

/// Asks the approver to type the operation's id, on a terminal (`scripted`:
/// how to approve without one).
pub(crate) fn confirm(id: &str, scripted: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("stdin is not a terminal: approve with {scripted}");
    }
    eprint!("Type the operation id ({id}) to approve this plan: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    match line.trim() == id {
        true => Ok(()),
        false => anyhow::bail!("not approved: the id typed is not {id}"),
    }
}

pub async fn run(endpoint: &str, output: Output, cmd: OpCmd) -> anyhow::Result<()> {
    let mut c = operations(endpoint).await?;
    match cmd {
        OpCmd::Plan { kind } => {
            let p = c
                .plan_operation(PlanOperationRequest {
                    kind: Some(kind.into_kind()?),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(plan_json(&p), || plan_text(&p));
        }
        OpCmd::Propose {
            reason,
            expires,
            kind,
        } => {
            let kind = kind.into_kind()?;
            propose(endpoint, output, kind, reason, expires.into()).await?;
        }
        OpCmd::List => {
            let ops = c
                .list_operations(ListOperationsRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .operations;
            output.emit(json!(ops.iter().map(op_json).collect::<Vec<_>>()), || {
                match ops.is_empty() {
                    true => "no operations".to_string(),
                    false => table(
                        [
                            "id",
                            "status",
                            "operation",
                            "proposer",
                            "approver",
                            "created",
                            "reason",
                        ],
                        ops.iter().map(|o| {
                            [
                                o.id.clone(),
                                o.status.clone(),
                                kind_text(o.plan.as_ref().and_then(|p| p.kind.as_ref())),
                                o.proposer.clone(),
                                o.approver.clone(),
                                rfc3339(o.created_ms),
                                o.reason.clone(),
                            ]
                        }),
                    ),
                }
            });
        }
        OpCmd::Show { id } => {
            let o = c
                .get_operation(GetOperationRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(op_json(&o), || op_text(&o));
        }
        OpCmd::Approve { id, yes, plan_hash } => {
            let o = c
                .get_operation(GetOperationRequest { id: id.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let hash = match (yes, plan_hash) {
                (true, Some(h)) => h,
                (_, given) => {
                    eprintln!("{}", op_text(&o));
                    confirm(&id, &format!("--yes --plan-hash HASH (from `op show {id}`)"))?;
                    given.unwrap_or_else(|| o.plan_hash.clone())
                }
            };
            let (cert, key) = signing_identity()?;
            let message = mailvault_proto::approval::message(&id, &hash);
            let signature =
                mailvault_proto::approval::sign(&key, &cert, &message).map_err(anyhow::Error::msg)?;
            let o = c
                .approve_operation(ApproveOperationRequest {
                    id,
                    plan_hash: hash,
                    certificate: cert,
                    signature,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(op_json(&o), || {
                format!(
                    "{}\napproved: the leader executes it now (`op watch {}`)",
                    op_text(&o),
                    o.id
                )
            });
        }
        OpCmd::Reject { id, reason } => {
            let o = c
                .reject_operation(RejectOperationRequest { id, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(op_json(&o), || op_text(&o));
        }
        OpCmd::Cancel { id } => {
            let o = c
                .cancel_operation(CancelOperationRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(op_json(&o), || op_text(&o));
        }
        OpCmd::Watch { id } => return watch(endpoint, output, id).await,
    }
    Ok(())
}

/// Proposes `kind` and prints the proposal with what to do next.
pub async fn propose(
    endpoint: &str,
    output: Output,
    kind: OperationKind,
    reason: String,
    expires: Duration,
) -> anyhow::Result<()> {
    let mut c = operations(endpoint).await?;
    let o = c
        .propose_operation(ProposeOperationRequest {
            kind: Some(kind),
            reason,
            expires_in_secs: u32::try_from(expires.as_secs()).unwrap_or(u32::MAX),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    output.emit(op_json(&o), || {
        format!(
            "{}\nproposed: nothing changes until a second operator approves it \
             (`mailvault-admin op show {id}`, then `mailvault-admin op approve {id}`)",
            op_text(&o),
            id = o.id
        )
    });
    Ok(())
}

/// Follows an operation until it ends; fails unless it succeeded.
async fn watch(endpoint: &str, output: Output, id: String) -> anyhow::Result<()> {
    let mut c = operations(endpoint).await?;
    let mut stream = c
        .watch_operation(GetOperationRequest { id })
        .await
        .map_err(status_err)?
        .into_inner();
    let shown = output == Output::Text && std::io::stderr().is_terminal();
    let bar = ProgressBar::new(0);
    if !shown {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} steps {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut last = None;
    while let Some(o) = stream.message().await.map_err(status_err)? {
        let steps = o.plan.as_ref().map_or(0, |p| p.steps.len()) as u64;
        bar.set_length(steps);
        bar.set_position(o.steps.len() as u64);
        bar.set_message(o.status.clone());
        last = Some(o);
    }
    bar.finish_and_clear();
    let o = last.ok_or_else(|| anyhow::anyhow!("the node sent no operation"))?;
    output.emit(op_json(&o), || op_text(&o));
    match o.status.as_str() {
        "succeeded" => Ok(()),
        "proposed" | "approved" | "executing" => anyhow::bail!("{} has not ended", o.id),
        other => anyhow::bail!("{} {other}: {}", o.id, o.outcome),
    }
}
