//! Two-person operations against real nodes, with two operator identities
//! (`admin` proposes, `admin2` approves) and one front end: a grant proposed
//! by one operator changes nothing until a second one approves it; every
//! approval that is not a second person's, for the plan shown, on the state
//! rehearsed, in time, with a valid signature, is refused with a reason that
//! says which; a leader killed between approval and completion leaves the
//! operation whole and recorded.

use std::time::Duration;

use mailvault_chaos::*;
use mailvault_proto::v1::*;
use tonic::Code;
use tonic_types::StatusExt;

const T: &str = "acme";
const M: &str = "support";

use mailvault_chaos::code_and_reason as reason;

fn grant_kind(identity: &str, tenant: &str, role: &str) -> OperationKind {
    OperationKind {
        kind: Some(operation_kind::Kind::Grant(GrantOperation {
            identity: identity.into(),
            role: Some(Role {
                role: Some(role::Role::Tenant(TenantRole {
                    tenant: tenant.into(),
                    role: role.into(),
                })),
            }),
        })),
    }
}

async fn propose(cluster: &Cluster, kind: OperationKind, expires_in_secs: u32) -> Operation {
    let a = cluster.admin(0).await.operations;
    retry(Duration::from_secs(20), || {
        let mut a = a.clone();
        let req = ProposeOperationRequest {
            kind: Some(kind.clone()),
            reason: "T-200".into(),
            expires_in_secs,
        };
        async move { a.propose_operation(req).await }
    })
    .await
    .expect("propose")
    .into_inner()
}

async fn get(cluster: &Cluster, id: &str) -> Operation {
    let mut a = cluster.admin(0).await.operations;
    a.get_operation(GetOperationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// An approval request as `identity` would make it: its certificate, its
/// signature over (id, plan_hash).
fn approval(cluster: &Cluster, identity: &str, id: &str, plan_hash: &str) -> ApproveOperationRequest {
    let (cert, key) = cluster.identity_files(identity);
    let message = mailvault_proto::approval::message(id, plan_hash);
    ApproveOperationRequest {
        id: id.into(),
        plan_hash: plan_hash.into(),
        signature: mailvault_proto::approval::sign(&key, &cert, &message).unwrap(),
        certificate: cert,
    }
}

async fn approve_as(
    cluster: &Cluster,
    identity: &str,
    req: ApproveOperationRequest,
) -> Result<Operation, tonic::Status> {
    let mut a = cluster.admin_as(0, identity).await.operations;
    a.approve_operation(req).await.map(|r| r.into_inner())
}

async fn can_read(cluster: &Cluster, identity: &str) -> bool {
    let mut c = cluster.mailbox_as(0, identity).await;
    c.get_mailbox_status(GetMailboxStatusRequest {
        tenant: T.into(),
        mailbox: M.into(),
    })
    .await
    .is_ok()
}

async fn setup(opts: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(opts).await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    cluster.grant_cluster_role("auditor", "auditor").await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_proposed_by_one_operator_runs_only_once_a_second_one_approves_it() {
    let cluster = setup(ClusterOptions::default()).await;
    assert!(!can_read(&cluster, "carol").await, "no role yet");

    // `access grant` proposes; nothing changes.
    let (ok, proposed, err) = cluster.admin_json(
        0,
        &[
            "access",
            "grant",
            "carol",
            "--tenant",
            T,
            "--role",
            "reader",
            "--reason",
            "T-200 onboarding",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(proposed["status"], "proposed");
    let id = proposed["id"].as_str().unwrap().to_string();
    let hash = proposed["plan_hash"].as_str().unwrap().to_string();
    let planned = proposed["plan"]["steps"].as_array().unwrap().clone();
    assert_eq!(planned.len(), 1);
    assert_eq!(planned[0]["description"], "grant reader on tenant acme to carol");
    assert!(
        proposed["plan"]["effect"][0]
            .as_str()
            .unwrap()
            .contains("carol gains reader on tenant acme"),
        "{proposed}"
    );
    assert_eq!(proposed["plan"]["backup_first"], false);
    cluster.wait_all_applied().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !can_read(&cluster, "carol").await,
        "nothing changes before the approval"
    );
    assert_eq!(get(&cluster, &id).await.status, "proposed");

    // The second operator reads the plan ...
    let out = cluster
        .admin_command(&cluster.client_addr(1), ADMIN2)
        .args(["op", "show", &id])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for line in [
        "grant reader on tenant acme to carol",
        "proposed by admin",
        "reason: T-200 onboarding",
        &hash,
    ] {
        assert!(shown.contains(line), "{line:?} not in {shown}");
    }
    // ... cannot approve it without a terminal or --yes ...
    let out = cluster
        .admin_command(&cluster.client_addr(1), ADMIN2)
        .args(["op", "approve", &id])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes --plan-hash"));
    assert_eq!(get(&cluster, &id).await.status, "proposed");
    // ... and approves it, presenting the hash it read.
    let out = cluster
        .admin_command(&cluster.client_addr(1), ADMIN2)
        .args(["op", "approve", &id, "--yes", "--plan-hash", &hash])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // `op watch` follows it to its end.
    let out = cluster
        .admin_command(&cluster.client_addr(2), ADMIN)
        .args(["--output", "json", "op", "watch", &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["approver"], "admin2");
    // The executed steps are the planned steps.
    let steps = done["steps"].as_array().unwrap();
    assert_eq!(steps.len(), planned.len());
    for (s, p) in steps.iter().zip(&planned) {
        assert_eq!(s["index"], p["index"]);
        assert_eq!(s["ok"], true);
        assert!(
            s["result"]
                .as_str()
                .unwrap()
                .contains(p["description"].as_str().unwrap()),
            "{s} ≠ {p}"
        );
    }
    cluster.wait_all_applied().await;
    assert!(can_read(&cluster, "carol").await, "granted");

    // Every transition is in the audit log, in order, by who made it.
    let records = cluster.audit_records(0, "auditor").await;
    let of = |action: &str| {
        records
            .iter()
            .find(|r| r.action == action && r.target.starts_with(&id))
            .unwrap_or_else(|| panic!("no {action} record for {id}"))
            .clone()
    };
    let (p, a, s) = (of("op-propose"), of("op-approve"), of("op-step"));
    assert_eq!(p.identity, "admin");
    assert_eq!(p.result, "proposed: T-200 onboarding");
    assert_eq!(a.identity, "admin2");
    assert!(
        s.identity.starts_with("node:") && s.result.ends_with("succeeded"),
        "{s:?}"
    );
    assert!(p.seq < a.seq && a.seq < s.seq);
    assert!(p.target.contains("grant carol: +reader on tenant acme"), "{p:?}");

    // An auditor lists operations but approves nothing.
    let mut aud = cluster.admin_as(0, "auditor").await.operations;
    let listed = aud
        .list_operations(ListOperationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert!(listed.iter().any(|o| o.id == id && o.status == "succeeded"));
    let e = aud
        .approve_operation(approval(&cluster, "auditor", &id, &hash))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_that_is_not_a_second_persons_for_the_plan_shown_is_refused_with_its_reason() {
    let cluster = setup(ClusterOptions::default()).await;
    // A third operator whose certificate has admin's key.
    cluster.issue_on_key_of("admin-twin", ADMIN);
    cluster.grant_cluster_role("admin-twin", "operator").await;
    // And one that will be revoked.
    cluster.grant_cluster_role("ops3", "operator").await;

    let op = propose(&cluster, grant_kind("dave", T, "reader"), 0).await;
    let (id, hash) = (op.id.clone(), op.plan_hash.clone());
    assert_eq!(op.proposer, ADMIN);

    // The proposer approving: refused.
    let e = approve_as(&cluster, ADMIN, approval(&cluster, ADMIN, &id, &hash))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "SELF_APPROVAL".into()),
        "{e:?}"
    );
    // Another identity on the proposer's key: refused.
    let e = approve_as(
        &cluster,
        "admin-twin",
        approval(&cluster, "admin-twin", &id, &hash),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&e), (Code::PermissionDenied, "SAME_KEY".into()), "{e:?}");
    // A non-operator: refused at the door.
    let e = approve_as(&cluster, FRONTEND, approval(&cluster, FRONTEND, &id, &hash))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "NO_CLUSTER_ROLE".into()),
        "{e:?}"
    );
    // A hash other than the plan's (signed as such): refused.
    let other = "00".repeat(32);
    let e = approve_as(&cluster, ADMIN2, approval(&cluster, ADMIN2, &id, &other))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::FailedPrecondition, "PLAN_HASH_MISMATCH".into()),
        "{e:?}"
    );
    // A forged signature: refused.
    let mut forged = approval(&cluster, ADMIN2, &id, &hash);
    let last = forged.signature.len() - 1;
    forged.signature[last] ^= 1;
    let e = approve_as(&cluster, ADMIN2, forged).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "APPROVAL_SIGNATURE_INVALID".into()),
        "{e:?}"
    );
    // Someone else's approval (admin's certificate and signature) sent by admin2.
    let e = approve_as(&cluster, ADMIN2, approval(&cluster, ADMIN, &id, &hash))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "APPROVAL_SIGNATURE_INVALID".into()),
        "{e:?}"
    );
    assert!(
        e.message().contains("not the one this call is made with"),
        "{e:?}"
    );
    // None of it approved anything.
    let now = get(&cluster, &id).await;
    assert_eq!((now.status.as_str(), now.approver.as_str()), ("proposed", ""));
    assert!(!can_read(&cluster, "dave").await);

    // The second operator's approval: approved and run.
    let valid = approval(&cluster, ADMIN2, &id, &hash);
    approve_as(&cluster, ADMIN2, valid.clone()).await.unwrap();
    let done = cluster.wait_operation_ended(0, &id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(!done.approval_signature.is_empty());
    cluster.wait_all_applied().await;
    assert!(can_read(&cluster, "dave").await);

    // Replayed: for the same operation it is decided; for another, the
    // signature is not over that operation.
    let e = approve_as(&cluster, ADMIN2, valid.clone()).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::FailedPrecondition, "OPERATION_DECIDED".into()),
        "{e:?}"
    );
    let op2 = propose(&cluster, grant_kind("dave", T, "agent"), 0).await;
    let replay = ApproveOperationRequest {
        id: op2.id.clone(),
        plan_hash: op2.plan_hash.clone(),
        ..valid
    };
    let e = approve_as(&cluster, ADMIN2, replay).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "APPROVAL_SIGNATURE_INVALID".into()),
        "{e:?}"
    );

    // The state the plan depends on changed (dave's policy, by an immediate
    // removal): refused, naming what changed.
    let mut access = cluster.admin(0).await.access;
    access
        .ungrant(GrantRequest {
            identity: "dave".into(),
            role: Some(Role {
                role: Some(role::Role::Tenant(TenantRole {
                    tenant: T.into(),
                    role: "reader".into(),
                })),
            }),
        })
        .await
        .unwrap();
    let e = approve_as(
        &cluster,
        ADMIN2,
        approval(&cluster, ADMIN2, &op2.id, &op2.plan_hash),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&e), (Code::Aborted, "STATE_CHANGED".into()), "{e:?}");
    let changed = e
        .get_details_error_info()
        .and_then(|i| i.metadata.get("changed").cloned())
        .unwrap_or_default();
    assert_eq!(changed, "policy of identity dave");
    assert_eq!(get(&cluster, &op2.id).await.status, "proposed");

    // Expired before approval: refused as expired, and recorded expired.
    let op3 = propose(&cluster, grant_kind("erin", T, "reader"), 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = approve_as(
        &cluster,
        ADMIN2,
        approval(&cluster, ADMIN2, &op3.id, &op3.plan_hash),
    )
    .await
    .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::FailedPrecondition, "OPERATION_EXPIRED".into()),
        "{e:?}"
    );
    let expired = cluster.wait_operation_ended(0, &op3.id).await;
    assert_eq!(
        (expired.status.as_str(), expired.outcome.as_str()),
        ("expired", "expired unapproved")
    );

    // Cancel is the proposer's; reject is another operator's.
    let op4 = propose(&cluster, grant_kind("erin", T, "agent"), 0).await;
    let mut ops2 = cluster.admin_as(0, ADMIN2).await.operations;
    let e = ops2
        .cancel_operation(CancelOperationRequest { id: op4.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "NOT_PROPOSER".into()),
        "{e:?}"
    );
    let mut ops1 = cluster.admin(0).await.operations;
    let e = ops1
        .reject_operation(RejectOperationRequest {
            id: op4.id.clone(),
            reason: "no".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let rejected = ops2
        .reject_operation(RejectOperationRequest {
            id: op4.id.clone(),
            reason: "T-201: not needed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejected.status, "rejected");
    assert_eq!(rejected.outcome, "rejected by admin2: T-201: not needed");
    let e = approve_as(
        &cluster,
        ADMIN2,
        approval(&cluster, ADMIN2, &op4.id, &op4.plan_hash),
    )
    .await
    .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::FailedPrecondition, "OPERATION_DECIDED".into()),
        "{e:?}"
    );
    let cancelled = ops1
        .cancel_operation(CancelOperationRequest { id: op2.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, "cancelled");

    // A revoked operator approves nothing; revoking was one person, at once.
    let op5 = propose(&cluster, grant_kind("frank", T, "reader"), 0).await;
    access
        .revoke_identity(RevokeIdentityRequest {
            identity: "ops3".into(),
        })
        .await
        .unwrap();
    cluster.wait_all_applied().await;
    let e = approve_as(
        &cluster,
        "ops3",
        approval(&cluster, "ops3", &op5.id, &op5.plan_hash),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&e), (Code::Unauthenticated, "REVOKED".into()), "{e:?}");
    assert_eq!(get(&cluster, &op5.id).await.status, "proposed");

    // A proposal needs a reason; an auditor proposes nothing.
    let e = ops1
        .propose_operation(ProposeOperationRequest {
            kind: Some(grant_kind("frank", T, "agent")),
            reason: String::new(),
            expires_in_secs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::InvalidArgument, "INVALID_REQUEST".into()),
        "{e:?}"
    );
    let mut aud = cluster.admin_as(0, "auditor").await.operations;
    let e = aud
        .propose_operation(ProposeOperationRequest {
            kind: Some(grant_kind("frank", T, "agent")),
            reason: "T-202".into(),
            expires_in_secs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The attempts to approve without a second person are denials on record.
    let records = cluster.audit_records(0, "auditor").await;
    for (who, why) in [
        (ADMIN, "the proposer cannot approve"),
        ("admin-twin", "the proposer's key"),
        (ADMIN2, "signature"),
    ] {
        assert!(
            records.iter().any(|r| r.identity == who
                && r.action == "ApproveOperation"
                && r.result.starts_with("denied: ")
                && r.result.contains(why)),
            "no denial of {who} ({why}) on record"
        );
    }
    // Pending first in the listing.
    let listed = ops1
        .list_operations(ListOperationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert_eq!(listed[0].id, op5.id, "the pending one first");
    assert!(listed[1..].iter().all(|o| o.status != "proposed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_between_approval_and_completion_leaves_the_operation_whole_and_recorded() {
    let mut cluster = setup(ClusterOptions {
        test_modes: "pause-operation".into(),
        ..Default::default()
    })
    .await;
    let pause = |c: &Cluster, i: usize| {
        c.data_dir(i)
            .join(mailvault_node::test_modes::PAUSE_OPERATION_FILE)
    };
    for i in 0..cluster.len() {
        std::fs::write(pause(&cluster, i), b"").unwrap();
    }
    let op = propose(&cluster, grant_kind("gina", T, "reader"), 0).await;
    approve_as(
        &cluster,
        ADMIN2,
        approval(&cluster, ADMIN2, &op.id, &op.plan_hash),
    )
    .await
    .unwrap();
    // Approved, held before its first step.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = get(&cluster, &op.id).await;
    assert_eq!((held.status.as_str(), held.steps.len()), ("approved", 0));
    assert!(!can_read(&cluster, "gina").await);

    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    cluster.kill(leader);
    for i in (0..cluster.len()).filter(|&i| i != leader) {
        std::fs::remove_file(pause(&cluster, i)).unwrap();
    }
    let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    assert_ne!(new_leader, leader);
    let done = cluster.wait_operation_ended(new_leader, &op.id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.steps.len(), 1, "the step ran once");
    assert!(done.steps[0].ok);

    // The killed node comes back with the same record and the grant.
    std::fs::remove_file(pause(&cluster, leader)).unwrap();
    cluster.start_node(leader);
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    cluster.wait_all_applied().await;
    let back = cluster.admin(leader).await.operations;
    let there = retry(Duration::from_secs(20), || {
        let mut b = back.clone();
        let id = op.id.clone();
        async move { b.get_operation(GetOperationRequest { id }).await }
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(there.status, "succeeded");
    assert_eq!(there.steps.len(), 1);
    let c = cluster.mailbox_as(leader, "gina").await;
    retry(Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            c.get_mailbox_status(GetMailboxStatusRequest {
                tenant: T.into(),
                mailbox: M.into(),
            })
            .await
        }
    })
    .await
    .unwrap();
    let records = cluster.audit_records(new_leader, "auditor").await;
    let steps: Vec<_> = records
        .iter()
        .filter(|r| r.action == "op-step" && r.target.starts_with(&op.id))
        .collect();
    assert_eq!(steps.len(), 1, "one step on record: {steps:?}");
    assert_eq!(
        steps[0].identity,
        format!("node:{}", new_leader + 1),
        "run by the new leader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_deleted_by_two_operators_is_backed_up_first_and_comes_back_from_that_backup() {
    let cluster = setup(ClusterOptions::default()).await;
    let mut c = cluster.mailbox(0).await;
    let mut bodies = Vec::new();
    for n in 0..20 {
        let body = test_message(
            "Delete me",
            "cust@example.org",
            &format!("DELETE-MARKER-{n}"),
            3000 + n,
        );
        let r = retry(Duration::from_secs(10), || {
            let (mut c, body) = (c.clone(), body.clone());
            async move { append(&mut c, T, M, &format!("d{n}"), &body).await }
        })
        .await
        .unwrap();
        bodies.push((r.uid, body));
    }

    // Rehearsed by one person: what goes, and that a backup comes first.
    let (ok, plan, err) = cluster.admin_json(0, &["op", "plan", "delete-mailbox", T, M]);
    assert!(ok, "{err}");
    assert_eq!(plan["backup_first"], true);
    let effect = plan["effect"][0].as_str().unwrap();
    assert!(
        effect.starts_with("mailbox acme/support: 20 messages"),
        "{effect}"
    );

    // Proposed; mail arrives before the approval: refused, nothing deleted.
    let (ok, first, err) = cluster.admin_json(0, &["mailbox", "delete", T, M, "--reason", "T-300"]);
    assert!(ok, "{err}");
    let late = test_message("Late", "cust@example.org", "LATE-MARKER", 1000);
    append(&mut c, T, M, "late", &late).await.unwrap();
    let e = cluster
        .approve(
            0,
            ADMIN2,
            first["id"].as_str().unwrap(),
            first["plan_hash"].as_str().unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::Aborted, "STATE_CHANGED".into()), "{e:?}");
    assert!(e.message().contains("mailbox acme/support"), "{e:?}");

    // Proposed again and approved: backed up, then deleted.
    let (ok, op, err) = cluster.admin_json(0, &["mailbox", "delete", T, M, "--reason", "T-300 again"]);
    assert!(ok, "{err}");
    let (id, hash) = (op["id"].as_str().unwrap(), op["plan_hash"].as_str().unwrap());
    assert!(op["plan"]["effect"][0].as_str().unwrap().contains("21 messages"));
    cluster.approve(0, ADMIN2, id, hash).await.unwrap();
    let done = cluster.wait_operation_ended(0, id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(!done.backup_id.is_empty(), "a pre-operation backup is recorded");
    assert_eq!(done.steps.len(), 1);
    assert!(
        done.steps[0].result.contains("(21 messages)"),
        "{:?}",
        done.steps[0]
    );
    cluster.wait_all_applied().await;
    for i in 0..cluster.len() {
        let mut c = cluster.mailbox(i).await;
        let e = c
            .get_mailbox_status(GetMailboxStatusRequest {
                tenant: T.into(),
                mailbox: M.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::NotFound, "MAILBOX_NOT_FOUND".into()),
            "node {i}"
        );
    }

    // The backup was verified, holds the mailbox, and brings it back.
    let (ok, v, err) = cluster.admin_json(0, &["backup", "verify", &done.backup_id]);
    assert!(ok && v["ok"] == true, "{err}");
    let restored = cluster
        .restore_mailbox(0, &done.backup_id, T, M, "support-back")
        .await
        .expect("the restore is proposed");
    assert_eq!(restored.status, "succeeded", "{restored:?}");
    assert!(
        restored.steps[1].result.contains("holds 21 messages"),
        "{:?}",
        restored.steps
    );
    let listed = list_all(&mut c, T, "support-back").await.unwrap();
    assert_eq!(listed.len(), 21);
    bodies.push((0, late));
    let mut got = Vec::new();
    for m in &listed {
        got.push(fetch(&mut c, T, "support-back", m.uid).await.unwrap().1);
    }
    let mut want: Vec<Vec<u8>> = bodies.into_iter().map(|(_, b)| b).collect();
    want.sort();
    got.sort();
    assert!(want == got, "every message back, byte-exact");

    // On record: the backup, taken for the operation, before the step.
    assert_backed_up_between_approval_and_step(&cluster, id).await;
}

/// On record for operation `id`: the approval, then the pre-operation
/// backup, then the step.
async fn assert_backed_up_between_approval_and_step(cluster: &Cluster, id: &str) {
    let records = cluster.audit_records(0, "auditor").await;
    let seq = |action: &str| {
        records
            .iter()
            .find(|r| r.action == action && r.target.starts_with(id))
            .map(|r| r.seq)
            .unwrap_or_else(|| panic!("no {action} for {id}"))
    };
    assert!(seq("op-approve") < seq("op-backup") && seq("op-backup") < seq("op-step"));
}

fn export_kind(exporter: &str, mailbox: &str, until_ms: i64) -> OperationKind {
    OperationKind {
        kind: Some(operation_kind::Kind::Export(ExportOperation {
            exporter: exporter.into(),
            tenant: T.into(),
            mailbox: mailbox.into(),
            until_ms,
        })),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn export(cluster: &Cluster, identity: &str, mailbox: &str) -> Result<usize, tonic::Status> {
    let mut c = cluster.mailbox_as(1, identity).await;
    let mut s = c
        .export_mailbox(ExportMailboxRequest {
            tenant: T.into(),
            mailbox: mailbox.into(),
        })
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await? {
        assert!(!m.raw.is_empty());
        n += 1;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_export_needs_an_approval_naming_the_exporter_the_mailbox_and_the_time() {
    let cluster = setup(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, T, "billing").await;
    let mut c = cluster.mailbox(0).await;
    for n in 0..3 {
        let body = test_message("Export", "cust@example.org", &format!("EXPORT-{n}"), 2000);
        append(&mut c, T, M, &format!("e{n}"), &body).await.unwrap();
    }
    cluster.grant("xavier", T, "exporter").await;
    cluster.grant("yvonne", T, "exporter").await;

    // The exporter role alone exports nothing: denied, audited.
    let e = export(&cluster, "xavier", M).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "EXPORT_NOT_APPROVED".into()),
        "{e:?}"
    );

    // An export approval is rehearsed: the exporter needs the role.
    let mut ops = cluster.admin(0).await.operations;
    let e = ops
        .propose_operation(ProposeOperationRequest {
            kind: Some(export_kind("zack", M, now_ms() + 3_600_000)),
            reason: "T-400".into(),
            expires_in_secs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::FailedPrecondition, "PRECONDITION_VIOLATED".into())
    );
    assert!(e.message().contains("zack holds no exporter role"), "{e:?}");
    let e = ops
        .propose_operation(ProposeOperationRequest {
            kind: Some(export_kind("xavier", M, now_ms() - 1)),
            reason: "T-400".into(),
            expires_in_secs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::InvalidArgument, "INVALID_REQUEST".into()));

    // Approved for xavier, acme/support, a few seconds: only that works.
    let until = now_ms() + 6_000;
    let op = cluster
        .two_person(0, export_kind("xavier", M, until), "T-401 legal hold")
        .await;
    assert_eq!(op.status, "succeeded", "{op:?}");
    cluster.wait_all_applied().await;
    assert_eq!(export(&cluster, "xavier", M).await.unwrap(), 3);
    let e = export(&cluster, "xavier", "billing").await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "EXPORT_NOT_APPROVED".into()),
        "another mailbox"
    );
    let e = export(&cluster, "yvonne", M).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "EXPORT_NOT_APPROVED".into()),
        "another identity"
    );
    let e = export(&cluster, FRONTEND, M).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "no exporter role at all");
    // After its window: denied again.
    let wait = until - now_ms() + 500;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let e = export(&cluster, "xavier", M).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::PermissionDenied, "EXPORT_NOT_APPROVED".into()),
        "expired"
    );

    // Denials are audited as they happen, committed a moment later.
    let denied = |records: &[AuditRecord]| {
        records
            .iter()
            .filter(|r| r.action == "ExportMailbox" && r.result.starts_with("denied: no approved export"))
            .count()
    };
    let mut records = cluster.audit_records(0, "auditor").await;
    for _ in 0..50 {
        if denied(&records) >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        records = cluster.audit_records(0, "auditor").await;
    }
    assert_eq!(denied(&records), 4, "each refused export is a denial on record");
    assert!(records
        .iter()
        .any(|r| r.action == "ExportMailbox" && r.identity == "xavier" && r.result == "allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_restore_cut_short_by_a_leader_kill_is_resumed_with_every_message_once() {
    let mut cluster = setup(ClusterOptions {
        test_modes: "pause-restore".into(),
        ..Default::default()
    })
    .await;
    let mut c = cluster.mailbox(0).await;
    let mut bodies = Vec::new();
    for n in 0..8 {
        let body = test_message(
            "Restore me",
            "cust@example.org",
            &format!("RESTORE-{n}"),
            2000 + n,
        );
        append(&mut c, T, M, &format!("r{n}"), &body).await.unwrap();
        bodies.push(body);
    }
    let taken = cluster.take_backup().await;
    let backup = taken.id.clone();
    let holder = taken.node as usize - 1;
    // The holder holds the restore after each message.
    let pause = cluster
        .data_dir(holder)
        .join(mailvault_node::test_modes::PAUSE_RESTORE_FILE);
    std::fs::write(&pause, b"").unwrap();
    let args = [
        "backup",
        "restore-mailbox",
        &backup,
        "--tenant",
        T,
        "--mailbox",
        M,
        "--as",
        "support-back",
        "--reason",
        "T-9",
    ];
    let (ok, proposed, err) = cluster.admin_json(0, &args);
    assert!(ok, "{err}");
    let id = proposed["id"].as_str().unwrap().to_string();
    cluster
        .approve(0, ADMIN2, &id, proposed["plan_hash"].as_str().unwrap())
        .await
        .unwrap();
    // Created, and one message in: the restore is under way.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = c
            .get_mailbox_status(GetMailboxStatusRequest {
                tenant: T.into(),
                mailbox: "support-back".into(),
            })
            .await;
        if status.is_ok_and(|s| s.into_inner().messages == 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the restore never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let under_way = get(&cluster, &id).await;
    assert_eq!(
        (under_way.status.as_str(), under_way.steps.len()),
        ("executing", 1),
        "{under_way:?}"
    );

    // The leader that asked for it dies; the holder goes on; the new leader
    // asks again, which adds only what is missing, and records the step.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    assert_ne!(leader, holder, "the backup node never leads");
    cluster.kill(leader);
    std::fs::remove_file(&pause).unwrap();
    let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let done = cluster.wait_operation_ended(new_leader, &id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.steps.len(), 2);
    assert!(
        done.steps[1].result.contains("holds 8 messages"),
        "{:?}",
        done.steps
    );
    let mut c = cluster.mailbox(new_leader).await;
    let listed = list_all(&mut c, T, "support-back").await.unwrap();
    let mut got = Vec::new();
    for m in &listed {
        got.push(fetch(&mut c, T, "support-back", m.uid).await.unwrap().1);
    }
    got.sort();
    bodies.sort();
    assert!(got == bodies, "every message exactly once, byte-exact");
    let records = cluster.audit_records(new_leader, "auditor").await;
    let last_step = records
        .iter()
        .rfind(|r| r.action == "op-step" && r.target.starts_with(&id))
        .unwrap();
    assert_eq!(last_step.identity, format!("node:{}", new_leader + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_settings_change_on_every_node_only_by_two_operators() {
    let cluster = setup(ClusterOptions::default()).await;
    for i in 0..cluster.len() {
        assert!(
            !cluster.node_status(i).await.audit_fail_closed,
            "node {i}: the config's"
        );
    }
    let (ok, plan, err) = cluster.admin_json(0, &["op", "plan", "audit-settings", "--fail-closed", "true"]);
    assert!(ok, "{err}");
    let effect = plan["effect"][0].as_str().unwrap();
    assert!(
        effect.contains("fail_closed becomes true on every node")
            && effect.contains("each node's [audit] fail_closed config"),
        "{effect}"
    );
    let (ok, proposed, err) = cluster.admin_json(
        0,
        &[
            "op",
            "propose",
            "--reason",
            "T-7",
            "audit-settings",
            "--fail-closed",
            "true",
        ],
    );
    assert!(ok, "{err}");
    let id = proposed["id"].as_str().unwrap();
    // Proposed only: nothing changed.
    assert!(!cluster.node_status(1).await.audit_fail_closed);
    let e = cluster
        .approve(0, ADMIN, id, proposed["plan_hash"].as_str().unwrap())
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::PermissionDenied, "SELF_APPROVAL".into()));
    cluster
        .approve(0, ADMIN2, id, proposed["plan_hash"].as_str().unwrap())
        .await
        .unwrap();
    let done = cluster.wait_operation_ended(0, id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    for i in 0..cluster.len() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cluster.node_status(i).await.audit_fail_closed {
            assert!(std::time::Instant::now() < deadline, "node {i} never followed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Accesses go on, each waiting for its record.
    let mut c = cluster.mailbox(1).await;
    let body = test_message("Closed", "cust@example.org", "FAIL-CLOSED", 900);
    append(&mut c, T, M, "fc", &body).await.unwrap();
    // The same again is nothing to do; the status says what applies.
    let (ok, _, err) = cluster.admin_json(
        0,
        &[
            "op",
            "propose",
            "--reason",
            "T-8",
            "audit-settings",
            "--fail-closed",
            "true",
        ],
    );
    assert!(!ok && err.contains("NOTHING_TO_DO"), "{err}");
    let (ok, status, err) = cluster.admin_json(0, &["status"]);
    assert!(ok, "{err}");
    assert!(
        status.to_string().contains("\"audit_fail_closed\":true"),
        "{status}"
    );
    let records = cluster.audit_records(0, "auditor").await;
    assert!(records.iter().any(|r| r.action == "op-step"
        && r.target.starts_with(id)
        && r.result.contains("audit fail_closed")));
}

/// Appends with an internal date and flags of the test's choosing.
async fn append_dated(
    c: &mut mailvault_proto::v1::mailbox_client::MailboxClient<tonic::transport::Channel>,
    key: &str,
    internal_date_ms: i64,
    flags: &[&str],
    body: &[u8],
) -> u32 {
    let header = AppendHeader {
        tenant: T.into(),
        mailbox: M.into(),
        idempotency_key: key.into(),
        flags: flags.iter().map(|f| f.to_string()).collect(),
        internal_date_ms,
        size: 0,
    };
    let frames = mailvault_proto::client::append_frames(header, body);
    retry(Duration::from_secs(10), || {
        let (mut c, frames) = (c.clone(), frames.clone());
        async move { c.append_message(tokio_stream::iter(frames)).await }
    })
    .await
    .expect("append")
    .into_inner()
    .uid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_expunge_by_two_operators_removes_exactly_the_messages_rehearsed_after_a_backup() {
    const DAY: i64 = 86_400_000;
    const CUT: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let cluster = setup(ClusterOptions::default()).await;
    let mut c = cluster.mailbox(0).await;
    // 12 messages of 2025 (every fourth flagged \Deleted), 8 of 2026.
    let mut old = Vec::new();
    for n in 0..20i64 {
        let date = match n < 12 {
            true => CUT - (n + 1) * DAY,
            false => CUT + n * DAY,
        };
        let flags: &[&str] = if n % 4 == 0 { &["\\Deleted"] } else { &["\\Seen"] };
        let body = test_message("Old or new", "cust@example.org", &format!("BULK-{n}"), 1500);
        let uid = append_dated(&mut c, &format!("b{n}"), date, flags, &body).await;
        if n < 12 {
            old.push(uid);
        }
    }

    // No rule: refused by the CLI, and by the server as INVALID_ARGUMENT.
    let (ok, _, err) = cluster.admin_json(0, &["op", "plan", "expunge", T, M]);
    assert!(!ok && err.contains("say which messages"), "{err}");
    let mut ops = cluster.admin(0).await.operations;
    let e = ops
        .plan_operation(PlanOperationRequest {
            kind: Some(OperationKind {
                kind: Some(operation_kind::Kind::Expunge(ExpungeOperation {
                    tenant: T.into(),
                    mailbox: M.into(),
                    before_ms: 0,
                    deleted_only: false,
                })),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Rehearsed: both rules select the three old \Deleted ones.
    let (ok, plan, err) = cluster.admin_json(
        0,
        &[
            "op",
            "plan",
            "expunge",
            T,
            M,
            "--before",
            "2026-01-01",
            "--deleted",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(plan["backup_first"], true);
    let effect = plan["effect"][0].as_str().unwrap();
    assert!(
        effect.starts_with("mailbox acme/support: 3 of its 20 messages")
            && effect.contains("received before 2026-01-01T00:00:00Z and flagged \\Deleted"),
        "{effect}"
    );

    // Proposed for every 2025 message; one more of 2025 arrives before the
    // approval: refused, nothing expunged.
    let propose = |r: &str| {
        cluster.admin_json(
            0,
            &[
                "op",
                "propose",
                "--reason",
                r,
                "expunge",
                T,
                M,
                "--before",
                "2026-01-01",
            ],
        )
    };
    let (ok, first, err) = propose("T-400");
    assert!(ok, "{err}");
    assert!(first["plan"]["effect"][0]
        .as_str()
        .unwrap()
        .contains("12 of its 20 messages"));
    let late = test_message("Late", "cust@example.org", "BULK-LATE", 1500);
    old.push(append_dated(&mut c, "late", CUT - 400 * DAY, &[], &late).await);
    let e = cluster
        .approve(
            0,
            ADMIN2,
            first["id"].as_str().unwrap(),
            first["plan_hash"].as_str().unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(reason(&e), (Code::Aborted, "STATE_CHANGED".into()), "{e:?}");
    assert!(
        e.message().contains("the messages of acme/support it selects"),
        "{e:?}"
    );
    assert_eq!(list_all(&mut c, T, M).await.unwrap().len(), 21);

    // Proposed again, approved by the second operator: backed up, then the
    // 13 go and the 8 of 2026 stay.
    let (ok, op, err) = propose("T-400 again");
    assert!(ok, "{err}");
    let (id, hash) = (op["id"].as_str().unwrap(), op["plan_hash"].as_str().unwrap());
    let e = cluster.approve(0, ADMIN, id, hash).await.unwrap_err();
    assert_eq!(reason(&e), (Code::PermissionDenied, "SELF_APPROVAL".into()));
    cluster.approve(0, ADMIN2, id, hash).await.unwrap();
    let done = cluster.wait_operation_ended(0, id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(!done.backup_id.is_empty(), "a pre-operation backup is recorded");
    assert_eq!(done.steps.len(), 1);
    assert!(
        done.steps[0]
            .result
            .contains("expunge 13 messages of acme/support")
            && done.steps[0].result.contains("(13 expunged, 0 gone already)"),
        "{:?}",
        done.steps[0]
    );
    cluster.wait_all_applied().await;
    for i in 0..cluster.len() {
        let mut c = cluster.mailbox(i).await;
        let left = list_all(&mut c, T, M).await.unwrap();
        assert_eq!(left.len(), 8, "node {i}");
        assert!(left
            .iter()
            .all(|m| m.internal_date_ms >= CUT && !old.contains(&m.uid)));
    }
    // Nothing matches now.
    let (ok, _, err) = propose("T-401");
    assert!(!ok && err.contains("NOTHING_TO_DO"), "{err}");

    // The backup holds the mailbox as it was: all 21 come back.
    let back = cluster
        .restore_mailbox(0, &done.backup_id, T, M, "support-before")
        .await
        .expect("the restore is proposed");
    assert_eq!(back.status, "succeeded", "{back:?}");
    assert_eq!(list_all(&mut c, T, "support-before").await.unwrap().len(), 21);

    assert_backed_up_between_approval_and_step(&cluster, id).await;
}

/// The leader as every running node names it (waits up to 30 s for agreement).
async fn leader(cluster: &mut Cluster) -> usize {
    cluster.wait_for_leader(Duration::from_secs(30)).await
}

/// Waits up to `within` until node `want` (0-based) leads.
async fn wait_leads(cluster: &mut Cluster, want: usize, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let l = leader(cluster).await;
        if l == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {} does not lead within {within:?} (node {} does)",
            want + 1,
            l + 1
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_only_by_two_operators_and_stays_on_the_voter_chosen_for_the_hold() {
    let mut cluster = setup(ClusterOptions::default()).await;
    // Leadership placement puts the active node (node 1) in the lead.
    wait_leads(&mut cluster, 0, Duration::from_secs(40)).await;

    // Rehearsal, one person, read-only: refused where it cannot be done.
    for (node, why) in [
        ("7", "node 7 is not a voter (the voters: 1, 2, 3)"),
        ("3", "node 3 is a backup voter, which never leads by choice"),
        ("1", "nothing to do: node 1 leads already"),
    ] {
        let (ok, _, err) = cluster.admin_json(0, &["op", "plan", "transfer-leadership", node]);
        assert!(!ok && err.contains(why), "{node}: {err}");
    }
    let (ok, plan, err) = cluster.admin_json(0, &["op", "plan", "transfer-leadership", "2"]);
    assert!(ok, "{err}");
    assert_eq!(
        plan["effect"][0],
        "leadership moves from node 1 (active) to node 2 (standby)"
    );
    assert_eq!(plan["backup_first"], false);
    // Through a follower the rehearsal cannot see how far node 2 is behind,
    // and says so; the proposal is rehearsed on the leader.
    let (ok, there, err) = cluster.admin_json(1, &["op", "plan", "transfer-leadership", "2"]);
    assert!(ok, "{err}");
    assert!(
        there["checks"].to_string().contains("measured on the leader"),
        "{there}"
    );

    // Proposed by one operator: nothing moves.
    let (ok, op, err) = cluster.admin_json(
        1,
        &[
            "op",
            "propose",
            "--reason",
            "T-400 service node 1",
            "transfer-leadership",
            "2",
            "--hold",
            "25s",
        ],
    );
    assert!(ok, "{err}");
    let checks = op["plan"]["checks"].to_string();
    assert!(
        checks.contains("log entries behind the leader") && !checks.contains("measured on the leader"),
        "rehearsed on the leader: {op}"
    );
    let (id, hash) = (op["id"].as_str().unwrap(), op["plan_hash"].as_str().unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leader(&mut cluster).await, 0, "nothing moved unapproved");

    // Approved by the second: node 2 leads, and recorded the step itself.
    cluster.approve(0, ADMIN2, id, hash).await.unwrap();
    let done = cluster.wait_operation_ended(0, id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(
        done.steps[0]
            .result
            .starts_with("done: node 2 leads, and keeps leadership until"),
        "{:?}",
        done.steps
    );
    assert_eq!(leader(&mut cluster).await, 1, "node 2 leads");
    let records = cluster.audit_records(1, "auditor").await;
    let step = records
        .iter()
        .find(|r| r.action == "op-step" && r.target.starts_with(id))
        .expect("the step is on record");
    assert_eq!(step.identity, "node:2", "recorded by the node that took over");
    let (ok, status, err) = cluster.admin_json(0, &["status"]);
    assert!(ok, "{err}");
    assert!(status.to_string().contains(id), "status names the hold: {status}");

    // Held there: placement, which hands leadership to the active node 10 s
    // after it moved, leaves it for the hold.
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert_eq!(leader(&mut cluster).await, 1, "still node 2 while held");

    // Once the hold ends, the roles decide again: the active node leads.
    wait_leads(&mut cluster, 0, Duration::from_secs(45)).await;
}
