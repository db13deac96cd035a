//! Membership changes against real nodes: a node started with a `[join]`
//! setting serves nothing until two operators add it; the rehearsed
//! membership is what the change leaves; a removal that would lose quorum is
//! refused at rehearsal; a replaced node that comes back is refused by the
//! members, knows it, and disturbs nothing (no election, no term change).

use std::time::{Duration, Instant};

use mailvault_chaos::*;
use mailvault_proto::v1::*;
use tonic::Code;

const T: &str = "acme";
const M: &str = "support";

/// Three voters (1 active, 2 standby, 3 backup) and two nodes waiting to
/// join as spares (4 and 5); members are down after 4 s without contact.
async fn setup() -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        joining: vec!["spare".into(), "spare".into()],
        heal: "down_after_secs = 4\nprobe_every_ms = 500\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    cluster.grant_cluster_role("auditor", "auditor").await;
    cluster
}

/// Proposes `args` (after `op propose --reason R`) as admin through node
/// `i`, approves it as admin2, and returns it once it ended.
async fn run_op(cluster: &Cluster, i: usize, args: &[&str]) -> Operation {
    let mut all = vec!["op", "propose", "--reason", "CHG-77"];
    all.extend_from_slice(args);
    let (ok, op, err) = cluster.admin_json(i, &all);
    assert!(ok, "{args:?}: {err}");
    let (id, hash) = (op["id"].as_str().unwrap(), op["plan_hash"].as_str().unwrap());
    cluster.approve(i, ADMIN2, id, hash).await.expect("approve");
    cluster.wait_operation_ended(i, id).await
}

/// Members as node `i` lists them: (id, role, voter).
async fn members(cluster: &Cluster, i: usize) -> Vec<(u64, String, bool)> {
    cluster
        .node_status(i)
        .await
        .members
        .into_iter()
        .map(|m| (m.id, m.role, m.voter))
        .collect()
}

/// The "membership after" line of a plan.
fn after_line(plan: &serde_json::Value) -> String {
    plan["effect"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .find(|e| e.starts_with("membership after: "))
        .expect("the plan shows the membership after")
        .to_string()
}

/// The same line for the membership now.
fn as_line(members: &[(u64, String, bool)]) -> String {
    let list = |voter: bool| {
        let l: Vec<String> = members
            .iter()
            .filter(|m| m.2 == voter)
            .map(|m| format!("{} ({})", m.0, m.1))
            .collect();
        if l.is_empty() {
            "none".to_string()
        } else {
            l.join(", ")
        }
    };
    format!(
        "membership after: voters {}; learners {}",
        list(true),
        list(false)
    )
}

async fn append_some(cluster: &Cluster, leader: usize, from: usize, n: usize) {
    let mut c = cluster.mailbox(leader).await;
    for k in from..from + n {
        let body = test_message(&format!("m{k}"), "a@example.com", "x", 2000);
        retry(Duration::from_secs(20), || {
            let mut c = c.clone();
            let body = body.clone();
            async move { append(&mut c, T, M, &format!("k{k}"), &body).await }
        })
        .await
        .expect("append");
    }
    let _ = &mut c;
}

/// A node that is not a member refuses a front end's read:
/// `UNAVAILABLE`, `NOT_A_MEMBER`.
async fn assert_serves_nothing(cluster: &Cluster, i: usize) {
    let mut c = cluster.mailbox(i).await;
    let req = ListMessagesRequest {
        tenant: T.into(),
        mailbox: M.into(),
        ..Default::default()
    };
    let s = c.list_messages(req).await.unwrap_err();
    assert_eq!(
        code_and_reason(&s),
        (Code::Unavailable, "NOT_A_MEMBER".into()),
        "node {}: {s:?}",
        i + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_are_replaced_and_leave_only_by_two_operators_as_rehearsed() {
    let mut cluster = setup().await;
    // Leadership placement puts the active node (node 1) in the lead.
    let deadline = Instant::now() + Duration::from_secs(40);
    while cluster.wait_for_leader(Duration::from_secs(30)).await != 0 {
        assert!(Instant::now() < deadline, "node 1 does not lead");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let leader = 0;
    append_some(&cluster, leader, 0, 20).await;

    // A node that waits to join serves nothing, and says why.
    let waiting = cluster.node_status(3).await;
    assert_eq!(waiting.membership, "waiting");
    assert_serves_nothing(&cluster, 3).await;

    // Rehearsal: the leader probes the node, which proves its id.
    let addr4 = cluster.raft_addr(3);
    let (ok, _, err) = cluster.admin_json(0, &["op", "plan", "add-node", "5", "--raft-addr", &addr4]);
    assert!(!ok && err.contains("its certificate names node:4"), "{err}");
    let (ok, plan, err) = cluster.admin_json(0, &["op", "plan", "add-node", "4", "--raft-addr", &addr4]);
    assert!(ok, "{err}");
    assert_eq!(
        after_line(&plan),
        "membership after: voters 1 (active), 2 (standby), 3 (backup); learners 4 (spare)"
    );
    let checks = plan["checks"].to_string();
    assert!(checks.contains("node 4 proved its identity"), "{checks}");
    assert!(checks.contains("holds no Raft state"), "{checks}");
    assert!(
        plan["effect"]
            .to_string()
            .contains("this machine holds the cluster's data"),
        "{plan}"
    );

    // Proposed by one operator, nothing changes; approved, node 4 is a
    // learner as rehearsed, holding the same data.
    let (ok, proposed, err) = cluster.admin_json(
        0,
        &[
            "op",
            "propose",
            "--reason",
            "CHG-76",
            "add-node",
            "4",
            "--raft-addr",
            &addr4,
        ],
    );
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(members(&cluster, 0).await.len(), 3, "nothing changes unapproved");
    let (id, hash) = (
        proposed["id"].as_str().unwrap(),
        proposed["plan_hash"].as_str().unwrap(),
    );
    cluster.approve(0, ADMIN2, id, hash).await.expect("approve");
    let done = cluster.wait_operation_ended(0, id).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    let now = members(&cluster, 0).await;
    assert_eq!(
        as_line(&now),
        after_line(&plan),
        "the rehearsed membership is the result"
    );
    // Adding it again is nothing to do; node 5 joins the same way.
    let (ok, _, err) = cluster.admin_json(0, &["op", "plan", "add-node", "4", "--raft-addr", &addr4]);
    assert!(!ok && err.contains("node 4 is a member already"), "{err}");
    let addr5 = cluster.raft_addr(4);
    let done = run_op(&cluster, 0, &["add-node", "5", "--raft-addr", &addr5]).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    append_some(&cluster, leader, 20, 10).await;
    cluster.wait_same_digest(&[0, 1, 2, 3, 4]).await;
    let status4 = cluster.node_status(3).await;
    assert_eq!(status4.membership, "member");
    // The leader probes it: up, its region recorded, its lag measured.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader_view = cluster.node_status(leader).await;
        let m4 = leader_view.members.iter().find(|m| m.id == 4).unwrap().clone();
        assert_eq!((m4.region.as_str(), m4.voter), ("dc1", false), "{m4:?}");
        if m4.health == "up" {
            assert!(
                m4.lag_entries >= 0 && m4.lag_secs >= 0.0 && m4.last_contact_ms > 0,
                "{m4:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never heard from node 4: {m4:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Replace the standby (node 2) by spare 4: as rehearsed.
    let (ok, plan, err) = cluster.admin_json(0, &["op", "plan", "replace-node", "2", "4"]);
    assert!(ok, "{err}");
    assert_eq!(
        after_line(&plan),
        "membership after: voters 1 (active), 3 (backup), 4 (standby); learners 5 (spare)"
    );
    let term_before = cluster.node_status(leader).await.term;
    let done = run_op(&cluster, 0, &["replace-node", "2", "4"]).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(as_line(&members(&cluster, 0).await), after_line(&plan));
    append_some(&cluster, leader, 30, 5).await;

    // Node 2, replaced, learns it is no longer a member; restarted, it
    // causes no election and no term change.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node_status(1).await.membership != "removed" {
        assert!(Instant::now() < deadline, "node 2 never learned it was removed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.kill(1);
    cluster.start_node(1);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = cluster.node_status(leader).await;
    assert_eq!(
        (after.leader_id, after.term),
        (leader as u64 + 1, term_before),
        "no election, no new term"
    );
    assert_eq!(cluster.node_status(1).await.membership, "removed");
    assert_serves_nothing(&cluster, 1).await;
    // A removed id never comes back.
    let addr2 = cluster.raft_addr(1);
    let (ok, _, err) = cluster.admin_json(0, &["op", "plan", "add-node", "2", "--raft-addr", &addr2]);
    assert!(!ok && err.contains("node 2 was removed"), "{err}");

    // With the backup voter down, removing voter 4 would lose quorum:
    // refused at rehearsal. Removing learner 5 is fine.
    cluster.kill(2);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (ok, _, err) = cluster.admin_json(0, &["op", "plan", "remove-node", "4"]);
    assert!(
        !ok && err.contains("removing node 4 would leave 1 healthy voter of 2 (a quorum is 2): refused"),
        "{err}"
    );
    let done = run_op(&cluster, 0, &["remove-node", "5"]).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(
        as_line(&members(&cluster, 0).await),
        "membership after: voters 1 (active), 3 (backup), 4 (standby); learners none"
    );

    // Every step is on record, by the node that made it.
    let records = cluster.audit_records(0, "auditor").await;
    let steps: Vec<&str> = records
        .iter()
        .filter(|r| r.action == "op-step")
        .map(|r| r.result.as_str())
        .collect();
    for want in [
        "add node 4 (spare, region dc1",
        "add node 5 (spare",
        "make learner 4 a voter in node 2's role (standby)",
        "remove node 5 from the membership",
    ] {
        assert!(steps.iter().any(|s| s.contains(want)), "{want}: {steps:?}");
    }
}
