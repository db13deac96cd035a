//! The `kill-operation` fault class: a two-person operation proposed by one
//! operator and approved by another, the leader killed with `kill -9` at a
//! random moment 0–1.5 s after the approval (before the
//! pre-operation backup, during it, during the step, or after), and
//! afterwards every such operation must have ended in a recorded state with
//! its effect whole (it succeeded, every planned step ran once) or absent (it
//! failed, or the approval never took), the same on every node.
//!
//! The operations are ones the workload does not touch, so the checker's
//! view of the workload's mailboxes stays as it was: deleting a mailbox of
//! its own (backup first), a bulk expunge of one (backup first), and a grant
//! of the reader role to a new identity.

use std::time::{Duration, Instant};

use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::{
    operation_kind, role, DeleteMailboxOperation, ExpungeOperation, GetMailboxStatusRequest,
    GetOperationRequest, GrantOperation, ListBackupsRequest, MailboxStatus, Operation, OperationKind,
    ProposeOperationRequest, Role, TenantRole, VerifyBackupRequest,
};
use rand::rngs::SmallRng;
use rand::Rng;
use tonic::transport::Channel;
use tonic::Code;

use crate::history::Recorder;
use crate::{append, create_mailbox, list_all, retry, test_message, Cluster, ADMIN2};

/// What an operation changes, to look for afterwards.
#[derive(Debug, Clone)]
enum Effect {
    /// The mailbox (holding `messages` messages) is gone.
    DeleteMailbox { mailbox: String, messages: u64 },
    /// Every message of the mailbox (there were `messages`) is expunged.
    Expunge { mailbox: String, messages: u64 },
    /// The identity reads the tenant's mailbox `mailbox`.
    Grant { identity: String, mailbox: String },
}

/// An operation a fault proposed and had approved.
#[derive(Debug, Clone)]
pub struct Launched {
    id: String,
    tenant: String,
    effect: Effect,
}

impl Launched {
    /// The operation's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Longest wait for an operation to end after the heal.
const END_BOUND: Duration = Duration::from_secs(90);

fn kind_of(tenant: &str, effect: &Effect) -> OperationKind {
    let kind = match effect {
        Effect::DeleteMailbox { mailbox, .. } => {
            operation_kind::Kind::DeleteMailbox(DeleteMailboxOperation {
                tenant: tenant.into(),
                mailbox: mailbox.clone(),
            })
        }
        Effect::Expunge { mailbox, .. } => operation_kind::Kind::Expunge(ExpungeOperation {
            tenant: tenant.into(),
            mailbox: mailbox.clone(),
            // Everything appended so far (internal dates are the append time).
            before_ms: now_ms() + 86_400_000,
            deleted_only: false,
        }),
        Effect::Grant { identity, .. } => operation_kind::Kind::Grant(GrantOperation {
            identity: identity.clone(),
            role: Some(Role {
                role: Some(role::Role::Tenant(TenantRole {
                    tenant: tenant.into(),
                    role: "reader".into(),
                })),
            }),
        }),
    };
    OperationKind { kind: Some(kind) }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A mailbox of the fault's own, with `n` messages in it.
async fn fill(cluster: &Cluster, tenant: &str, mailbox: &str, n: u64) -> Result<(), String> {
    create_mailbox(cluster, 0, tenant, mailbox)
        .await
        .map_err(|s| format!("could not create {mailbox}: {:?}", s.code()))?;
    let c = cluster.mailbox(0).await;
    for i in 0..n {
        let key = format!("{mailbox}-{i}");
        let body = test_message(&key, "customer@example.org", &key, 2000);
        retry(Duration::from_secs(20), || {
            let (mut c, key, body) = (c.clone(), key.clone(), body.clone());
            async move { append(&mut c, tenant, mailbox, &key, &body).await }
        })
        .await
        .map_err(|s| format!("could not fill {mailbox}: {:?}", s.code()))?;
    }
    Ok(())
}

/// Proposes one operation on `tenant` (as [`crate::ADMIN`]) and approves it
/// (as [`ADMIN2`]); a grant is of the reader role, checked afterwards by
/// reading mailbox `readable`. `n` numbers the fault, for unique names.
/// Returns the
/// operation, or why it could not be set up (not a finding: the cluster may
/// still be settling from the previous fault).
pub async fn launch(
    cluster: &Cluster,
    (tenant, readable): (&str, &str),
    n: usize,
    rng: &mut SmallRng,
    rec: &Recorder,
) -> Result<Launched, String> {
    let messages = rng.random_range(2..8);
    let effect = match rng.random_range(0..3) {
        0 => Effect::DeleteMailbox {
            mailbox: format!("op-delete-{n}"),
            messages,
        },
        1 => Effect::Expunge {
            mailbox: format!("op-expunge-{n}"),
            messages,
        },
        _ => Effect::Grant {
            identity: format!("op-reader-{n}"),
            mailbox: readable.to_string(),
        },
    };
    match &effect {
        Effect::DeleteMailbox { mailbox, messages } | Effect::Expunge { mailbox, messages } => {
            fill(cluster, tenant, mailbox, *messages).await?
        }
        Effect::Grant { .. } => {}
    }
    let kind = kind_of(tenant, &effect);
    let a = cluster.admin(0).await.operations;
    let proposed = retry(Duration::from_secs(20), || {
        let (mut a, kind) = (a.clone(), kind.clone());
        let req = ProposeOperationRequest {
            kind: Some(kind),
            reason: format!("chaos kill-operation {n}"),
            expires_in_secs: 0,
        };
        async move { a.propose_operation(req).await }
    })
    .await
    .map_err(|s| format!("could not propose: {:?} {}", s.code(), s.message()))?
    .into_inner();
    let approved = cluster
        .approve(0, ADMIN2, &proposed.id, &proposed.plan_hash)
        .await;
    rec.fault(format!(
        "operation {} ({}) proposed by admin, approval by admin2: {}",
        proposed.id,
        describe(&effect),
        match &approved {
            Ok(o) => o.status.clone(),
            Err(s) => format!("{:?}", s.code()),
        }
    ));
    Ok(Launched {
        id: proposed.id,
        tenant: tenant.to_string(),
        effect,
    })
}

/// Where operation `id` stands, in a few words, as the cluster answers
/// within a second (for the history, at the moment of a kill).
pub async fn stage_of(cluster: &Cluster, id: &str) -> String {
    let mut a = cluster.admin(0).await.operations;
    let mut req = tonic::Request::new(GetOperationRequest { id: id.into() });
    req.set_timeout(Duration::from_secs(1));
    match a.get_operation(req).await.map(|o| o.into_inner()) {
        Ok(o) => {
            let backup = match (
                o.plan.as_ref().is_some_and(|p| p.backup_first),
                o.backup_id.is_empty(),
            ) {
                (false, _) => "",
                (true, true) => ", its backup not taken yet",
                (true, false) => ", its backup taken",
            };
            format!("{}{backup}, {} step(s) done", o.status, o.steps.len())
        }
        Err(s) => format!("not known ({:?})", s.code()),
    }
}

fn describe(e: &Effect) -> String {
    match e {
        Effect::DeleteMailbox { mailbox, messages } => {
            format!("delete mailbox {mailbox} of {messages} messages")
        }
        Effect::Expunge { mailbox, messages } => format!("expunge all {messages} messages of {mailbox}"),
        Effect::Grant { identity, .. } => format!("grant {identity} reader"),
    }
}

/// The operation as node 1 sees it, once it ended (or the bound passed).
async fn ended(cluster: &Cluster, id: &str) -> Result<Operation, String> {
    let deadline = Instant::now() + END_BOUND;
    loop {
        let a = cluster.admin(0).await.operations;
        let got = retry(Duration::from_secs(20), || {
            let mut a = a.clone();
            let req = GetOperationRequest { id: id.into() };
            async move { a.get_operation(req).await }
        })
        .await
        .map_err(|s| format!("operation {id} cannot be read: {:?}", s.code()))?
        .into_inner();
        // A proposal whose approval never took stays proposed (until it
        // expires): nothing ran, and nothing may have.
        if !matches!(got.status.as_str(), "approved" | "executing") {
            return Ok(got);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "operation {id} still {} {END_BOUND:?} after the heal (steps {:?})",
                got.status, got.steps
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GetMailboxStatus` of `mailbox` through `c`, retried while the answer is
/// transient; a definite refusal (not found, permission denied) is its code.
async fn mailbox_status(
    c: &MailboxClient<Channel>,
    tenant: &str,
    mailbox: &str,
) -> Result<Result<MailboxStatus, Code>, tonic::Status> {
    retry(Duration::from_secs(20), || {
        let mut c = c.clone();
        let req = GetMailboxStatusRequest {
            tenant: tenant.into(),
            mailbox: mailbox.into(),
        };
        async move {
            match c.get_mailbox_status(req).await {
                Ok(s) => Ok(Ok(s.into_inner())),
                Err(s) if matches!(s.code(), Code::NotFound | Code::PermissionDenied) => Ok(Err(s.code())),
                Err(s) => Err(s),
            }
        }
    })
    .await
}

/// Whether the effect is there, as node `i` sees it; an error when it is
/// neither whole nor absent.
async fn effect_on(cluster: &Cluster, i: usize, tenant: &str, e: &Effect) -> Result<bool, String> {
    match e {
        Effect::DeleteMailbox { mailbox, messages } => {
            let got = match mailbox_status(&cluster.mailbox(i).await, tenant, mailbox).await {
                Ok(Ok(s)) => Some(s.messages),
                Ok(Err(Code::NotFound)) => None,
                other => return Err(format!("node {}: {mailbox} cannot be read: {other:?}", i + 1)),
            };
            match got {
                None => Ok(true),
                Some(m) if m == *messages => Ok(false),
                Some(m) => Err(format!(
                    "node {}: {mailbox} holds {m} of its {messages} messages: half deleted",
                    i + 1
                )),
            }
        }
        Effect::Expunge { mailbox, messages } => {
            let c = cluster.mailbox(i).await;
            let listed = retry(Duration::from_secs(20), || {
                let mut c = c.clone();
                async move { list_all(&mut c, tenant, mailbox).await }
            })
            .await
            .map_err(|s| format!("node {}: {mailbox} cannot be listed: {:?}", i + 1, s.code()))?;
            match listed.len() as u64 {
                0 => Ok(true),
                m if m == *messages => Ok(false),
                m => Err(format!(
                    "node {}: {mailbox} holds {m} of its {messages} messages: half expunged",
                    i + 1
                )),
            }
        }
        Effect::Grant { identity, mailbox } => {
            match mailbox_status(&cluster.mailbox_as(i, identity).await, tenant, mailbox).await {
                Ok(Ok(_)) => Ok(true),
                Ok(Err(Code::PermissionDenied)) => Ok(false),
                other => Err(format!("node {}: {identity} cannot be checked: {other:?}", i + 1)),
            }
        }
    }
}

/// After the heal: every launched operation ended in a recorded state, its
/// effect whole or absent on every node as its record says, a succeeded
/// one's steps exactly the planned ones, each once, after a verified
/// backup where the plan asked for one. Returns the problems found and a
/// summary for the table.
pub async fn operations_whole(
    cluster: &Cluster,
    launched: &[Launched],
    rec: &Recorder,
) -> (Vec<String>, String) {
    let mut problems = Vec::new();
    let (mut succeeded, mut failed, mut unapproved) = (0, 0, 0);
    for l in launched {
        let op = match ended(cluster, &l.id).await {
            Ok(op) => op,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let whole = op.status == "succeeded";
        match op.status.as_str() {
            "succeeded" => succeeded += 1,
            "failed" => failed += 1,
            "proposed" => unapproved += 1,
            other => problems.push(format!("operation {} ended {other}, not after an approval", l.id)),
        }
        for i in 0..cluster.len() {
            match effect_on(cluster, i, &l.tenant, &l.effect).await {
                Ok(there) if there == whole => {}
                Ok(there) => problems.push(format!(
                    "operation {} is {} ({}) but node {} finds its effect {}",
                    l.id,
                    op.status,
                    op.outcome,
                    i + 1,
                    if there { "there" } else { "absent" }
                )),
                Err(e) => problems.push(format!("operation {}: {e}", l.id)),
            }
        }
        if let Some(p) = steps_problem(&op) {
            problems.push(p);
        }
        if whole {
            if let Some(p) = backup_problem(cluster, &op).await {
                problems.push(p);
            }
        }
        rec.fault(format!(
            "operation {} ({}): {} — {} step(s){}",
            l.id,
            describe(&l.effect),
            op.status,
            op.steps.len(),
            match op.backup_id.as_str() {
                "" => String::new(),
                b => format!(", backup {b} first"),
            }
        ));
    }
    let summary = format!(
        "ops {}: {succeeded} succeeded, {failed} failed, {unapproved} unapproved",
        launched.len()
    );
    (problems, summary)
}

/// A succeeded operation ran every planned step once, in order, each ok; a
/// failed one's steps are a prefix of the plan with only the last not ok.
fn steps_problem(op: &Operation) -> Option<String> {
    let planned = op.plan.as_ref().map(|p| p.steps.len()).unwrap_or(0);
    let indexes: Vec<u32> = op.steps.iter().map(|s| s.index).collect();
    let in_order = indexes.iter().enumerate().all(|(k, &i)| i as usize == k);
    let ok = match op.status.as_str() {
        "succeeded" => in_order && op.steps.len() == planned && op.steps.iter().all(|s| s.ok),
        "failed" => {
            in_order
                && op.steps.len() <= planned
                && op.steps.iter().rev().skip(1).all(|s| s.ok)
                && op.steps.last().is_none_or(|s| !s.ok)
        }
        _ => op.steps.is_empty(),
    };
    (!ok).then(|| {
        format!(
            "operation {} {} with steps {:?} of {planned} planned",
            op.id, op.status, indexes
        )
    })
}

/// A succeeded operation that planned a backup first names a backup the
/// catalog lists and that verifies.
async fn backup_problem(cluster: &Cluster, op: &Operation) -> Option<String> {
    if !op.plan.as_ref().is_some_and(|p| p.backup_first) {
        return None;
    }
    if op.backup_id.is_empty() {
        return Some(format!(
            "operation {} succeeded without its pre-operation backup",
            op.id
        ));
    }
    let b = cluster.admin(0).await.backups;
    let listed = retry(Duration::from_secs(20), || {
        let mut b = b.clone();
        async move { b.list_backups(ListBackupsRequest {}).await }
    })
    .await
    .ok()?
    .into_inner()
    .backups;
    if !listed.iter().any(|b| b.id == op.backup_id) {
        return Some(format!(
            "operation {}'s backup {} is not in the catalog",
            op.id, op.backup_id
        ));
    }
    let v = retry(Duration::from_secs(30), || {
        let (mut b, id) = (b.clone(), op.backup_id.clone());
        async move { b.verify_backup(VerifyBackupRequest { id }).await }
    })
    .await;
    match v.map(|v| v.into_inner()) {
        Ok(v) if v.ok => None,
        Ok(v) => Some(format!(
            "operation {}'s backup does not verify: {}",
            op.id, v.problem
        )),
        Err(e) => Some(format!(
            "operation {}'s backup cannot be verified: {:?}",
            op.id,
            e.code()
        )),
    }
}
