//! `mailvault-admin status`.

use mailvault_proto::v1::{BackupStatus, NodeStatusRequest, NodeStatusResponse, Worker};
use serde_json::json;

use crate::client::{cluster, status_err};
use crate::output::{rfc3339, table, Output};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What one member answered, or why it did not.
struct Probe {
    member: mailvault_proto::v1::Member,
    status: Result<NodeStatusResponse, String>,
}

/// Asks the contacted node for the membership, then every member for its own status.
pub async fn run(endpoint: &str, output: Output) -> anyhow::Result<()> {
    let me = cluster(endpoint)
        .await?
        .node_status(NodeStatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    let mut probes = Vec::new();
    for m in &me.members {
        let status = async {
            let mut c = cluster(&m.client_addr).await.map_err(|e| format!("{e:#}"))?;
            let mut req = tonic::Request::new(NodeStatusRequest {});
            req.set_timeout(std::time::Duration::from_secs(3));
            c.node_status(req)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
        .await;
        probes.push(Probe {
            member: m.clone(),
            status,
        });
    }
    let leader = probes
        .iter()
        .filter_map(|p| p.status.as_ref().ok())
        .find(|s| s.state == "leader")
        .map(|s| s.id);
    let healthy = probes.iter().filter(|p| p.status.is_ok()).count();
    // How the leader sees each member (it probes them, and knows their lag).
    let seen: Vec<mailvault_proto::v1::Member> = probes
        .iter()
        .filter_map(|p| p.status.as_ref().ok())
        .find(|s| s.state == "leader")
        .map_or_else(|| me.members.clone(), |s| s.members.clone());
    let seen_of = |id: u64| seen.iter().find(|m| m.id == id).cloned().unwrap_or_default();
    let nodes: Vec<_> = probes
        .iter()
        .map(|p| {
            let m = &p.member;
            let l = seen_of(m.id);
            let mut v = json!({
                "id": m.id, "role": m.role, "voter": m.voter, "region": l.region,
                "client_addr": m.client_addr, "raft_addr": m.raft_addr, "ops_addr": m.ops_addr,
                "seen_by_leader": {
                    "health": l.health,
                    "lag_entries": (l.lag_entries >= 0).then_some(l.lag_entries),
                    "lag_secs": (l.lag_secs >= 0.0).then_some(l.lag_secs),
                    "last_contact": (l.last_contact_ms > 0).then(|| rfc3339(l.last_contact_ms)),
                },
            });
            match &p.status {
                Ok(s) => {
                    v["healthy"] = json!(true);
                    v["membership"] = json!(s.membership);
                    v["state"] = json!(s.state);
                    v["term"] = json!(s.term);
                    v["last_log_index"] = json!(s.last_log_index);
                    v["applied_index"] = json!(s.applied_index);
                    v["snapshot_index"] = json!(s.snapshot_index);
                    v["workers"] = s
                        .workers
                        .iter()
                        .map(|w| {
                            json!({"name": w.name, "state": w.state, "detail": w.detail,
                                        "since": rfc3339(w.since_ms)})
                        })
                        .collect();
                    v["backup"] = s.backup.as_ref().map(backup_json).unwrap_or_default();
                    v["audit_fail_closed"] = json!(s.audit_fail_closed);
                    v["repair"] = s
                        .repair
                        .as_ref()
                        .map(|r| {
                            json!({"frozen": r.frozen, "reason": r.reason,
                                   "frozen_at": (r.frozen_ms > 0).then(|| rfc3339(r.frozen_ms)),
                                   "under_way": r.under_way, "last": r.last, "failures": r.failures})
                        })
                        .unwrap_or_default();
                    v["leadership_held"] = s
                        .leadership_held
                        .as_ref()
                        .map(|h| json!({"node_id": h.node_id, "until_ms": h.until_ms, "operation": h.operation}))
                        .unwrap_or_default();
                    v["operations"] = s
                        .operations
                        .as_ref()
                        .map(|o| {
                            json!({"bootstrap_operators": o.bootstrap_operators, "warning": o.warning,
                                   "pending": o.pending, "executing": o.executing})
                        })
                        .unwrap_or_default();
                    v["damaged"] = s
                        .damaged
                        .iter()
                        .map(|d| {
                            json!({"tenant": d.tenant, "mailbox": d.mailbox, "uid": d.uid,
                                        "part": d.part, "found": rfc3339(d.found_ms)})
                        })
                        .collect();
                }
                Err(e) => {
                    v["healthy"] = json!(false);
                    v["error"] = json!(e);
                }
            }
            v
        })
        .collect();
    let doc = json!({
        "leader": leader,
        "contacted": {"id": me.id, "membership": me.membership, "region": me.region},
        "term": me.term,
        "members": me.members.len(),
        "healthy": healthy,
        "nodes": nodes,
    });
    output.emit(doc, || {
        let header = [
            "id",
            "role",
            "voter",
            "region",
            "state",
            "term",
            "last log",
            "applied",
            "health",
            "lag",
            "last contact",
            "workers",
            "client addr",
        ];
        let rows = probes.iter().map(|p| {
            let m = &p.member;
            let l = seen_of(m.id);
            let lag = match (l.lag_entries, l.lag_secs) {
                (e, s) if e >= 0 && s >= 0.0 => format!("{e} entries, {s:.1}s"),
                _ => "-".to_string(),
            };
            let contact = match l.last_contact_ms {
                0 => "never".to_string(),
                ms => format!("{:.1}s ago", (now_ms() - ms).max(0) as f64 / 1000.0),
            };
            let (state, term, last, applied, health, workers) = match &p.status {
                Ok(s) => (
                    s.state.clone(),
                    s.term.to_string(),
                    s.last_log_index.to_string(),
                    s.applied_index.to_string(),
                    match (s.membership.as_str(), s.damaged.len()) {
                        ("member" | "", 0) => format!("ok, leader sees it {}", l.health),
                        ("member" | "", n) => format!("ok, leader sees it {}, {n} damaged message(s)", l.health),
                        (other, _) => format!("NOT A MEMBER ({other})"),
                    },
                    workers_text(&s.workers),
                ),
                Err(e) => (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("DOWN ({e}); leader sees it {}", l.health),
                    "-".into(),
                ),
            };
            [
                m.id.to_string(),
                m.role.clone(),
                m.voter.to_string(),
                match l.region.as_str() {
                    "" => "-".to_string(),
                    r => r.to_string(),
                },
                state,
                term,
                last,
                applied,
                health,
                lag,
                contact,
                workers,
                m.client_addr.clone(),
            ]
        });
        let summary = match leader {
            Some(l) => format!(
                "leader: node {l}, term {}; {healthy}/{} members healthy",
                me.term,
                me.members.len()
            ),
            None => format!("NO LEADER; {healthy}/{} members healthy", me.members.len()),
        };
        // Which stored messages a node found damaged (served from the other replicas).
        let damaged: String = probes
            .iter()
            .filter_map(|p| p.status.as_ref().ok())
            .flat_map(|s| {
                s.damaged.iter().map(move |d| {
                    format!(
                        "\nnode {}: damaged {} of {}/{} uid {} (found {})",
                        s.id,
                        d.part,
                        d.tenant,
                        d.mailbox,
                        d.uid,
                        rfc3339(d.found_ms)
                    )
                })
            })
            .collect();
        let contacted = match me.membership.as_str() {
            "waiting" => format!(
                "\nnode {} (contacted) waits to be added: two operators add it (op propose add-node {} --raft-addr …)",
                me.id, me.id
            ),
            "removed" => format!("\nnode {} (contacted) is no longer a member: it serves nothing", me.id),
            _ => String::new(),
        };
        let repair = repair_text(&probes);
        let backups = backup_text(&probes);
        let operations = operations_text(&probes);
        format!(
            "{}\n{summary}{contacted}{repair}{operations}{backups}{damaged}",
            table(header, rows)
        )
    });
    Ok(())
}

/// Automatic repair as the leader sees it: loud when frozen.
fn repair_text(probes: &[Probe]) -> String {
    let answered: Vec<&NodeStatusResponse> = probes.iter().filter_map(|p| p.status.as_ref().ok()).collect();
    let Some(r) = answered
        .iter()
        .find(|s| s.state == "leader")
        .or(answered.first())
        .and_then(|s| s.repair.as_ref())
    else {
        return String::new();
    };
    let mut out = String::new();
    if r.frozen {
        out.push_str(&format!("\nREPAIR FROZEN: {}", r.reason));
        if r.frozen_ms > 0 {
            out.push_str(&format!(
                " (since {}; two operators resume it: op propose unfreeze)",
                rfc3339(r.frozen_ms)
            ));
        }
    }
    if !r.under_way.is_empty() {
        out.push_str(&format!("\nrepair: {}", r.under_way));
    }
    if !r.last.is_empty() {
        out.push_str(&format!("\nlast repair: {} ({})", r.last, rfc3339(r.last_ms)));
    }
    for f in &r.failures {
        out.push_str(&format!("\nfailed lately: {f}"));
    }
    out
}

/// `15 running`, or the workers that are not running and why.
fn workers_text(workers: &[Worker]) -> String {
    let down: Vec<String> = workers
        .iter()
        .filter(|w| w.state != "running")
        .map(|w| match w.detail.as_str() {
            "" => format!("{} {}", w.name, w.state),
            why => format!("{} {} ({why})", w.name, w.state),
        })
        .collect();
    match down.is_empty() {
        true => format!("{} running", workers.len()),
        false => down.join("; "),
    }
}

fn backup_json(b: &BackupStatus) -> serde_json::Value {
    json!({
        "duty_node": b.duty_node, "standing_in": b.standing_in,
        "newest": (!b.newest_id.is_empty()).then(|| json!({
            "id": b.newest_id, "node": b.newest_node, "at": rfc3339(b.newest_at_ms)})),
        "local_backups": b.local_backups,
        "next_due": (b.next_due_ms > 0).then(|| rfc3339(b.next_due_ms)),
        "last_failure": (b.last_failure_ms > 0).then(|| json!({
            "at": rfc3339(b.last_failure_ms), "why": b.last_failure})),
        "offsite": b.offsite,
        "shipped": (!b.shipped_id.is_empty()).then(|| json!({"id": b.shipped_id, "at": rfc3339(b.shipped_at_ms)})),
        "restorable": (!b.restorable_id.is_empty()).then(|| json!({
            "id": b.restorable_id, "taken": rfc3339(b.restorable_at_ms)})),
        "drill": (!b.drill_id.is_empty()).then(|| json!({
            "id": b.drill_id, "at": rfc3339(b.drill_at_ms), "passed": b.drill_passed, "problem": b.drill_problem})),
        "offsite_stale": b.offsite_stale,
        "next_ship": (b.next_ship_ms > 0).then(|| rfc3339(b.next_ship_ms)),
    })
}

/// Two-person operations under way (as the leader sees them), and any node
/// whose config has fewer than two bootstrap operators.
fn operations_text(probes: &[Probe]) -> String {
    let answered: Vec<&NodeStatusResponse> = probes.iter().filter_map(|p| p.status.as_ref().ok()).collect();
    let view = answered
        .iter()
        .find(|s| s.state == "leader")
        .or(answered.first())
        .and_then(|s| s.operations.as_ref());
    let mut out = match view {
        Some(o) if o.pending + o.executing > 0 => format!(
            "
operations: {} waiting for approval, {} approved and running (`op list`)",
            o.pending, o.executing
        ),
        _ => String::new(),
    };
    let closed: Vec<bool> = answered.iter().map(|s| s.audit_fail_closed).collect();
    match closed.as_slice() {
        [] => {}
        [first, rest @ ..] if rest.iter().all(|c| c == first) => {
            out.push_str(&format!("\naudit: fail_closed {first} on every node"))
        }
        _ => {
            for s in &answered {
                out.push_str(&format!(
                    "\nnode {}: audit fail_closed {}",
                    s.id, s.audit_fail_closed
                ));
            }
        }
    }
    if let Some(h) = answered.iter().find_map(|s| s.leadership_held.as_ref()) {
        out.push_str(&format!(
            "\nleadership: held on node {} until {} ({}); placement does not move it back before then",
            h.node_id,
            rfc3339(h.until_ms),
            h.operation
        ));
    }
    for s in &answered {
        if let Some(o) = s.operations.as_ref().filter(|o| !o.warning.is_empty()) {
            out.push_str(&format!(
                "
node {}: WARNING: {}",
                s.id, o.warning
            ));
        }
    }
    out
}

/// The backup duty (as the leader sees it), the newest backup, and per node
/// the backups it holds and its last failure.
fn backup_text(probes: &[Probe]) -> String {
    let answered: Vec<&NodeStatusResponse> = probes.iter().filter_map(|p| p.status.as_ref().ok()).collect();
    let view = answered
        .iter()
        .find(|s| s.state == "leader")
        .or(answered.first())
        .and_then(|s| s.backup.as_ref());
    let Some(view) = view else {
        return String::new();
    };
    let duty = match (view.duty_node, view.standing_in) {
        (0, _) => "no node holds the backup duty".to_string(),
        (n, false) => format!("backup duty: node {n}"),
        (n, true) => format!("backup duty: node {n}, STANDING IN for the backup node"),
    };
    let newest = match view.newest_id.as_str() {
        "" => "no backup yet".to_string(),
        id => format!(
            "newest backup {id} on node {} at {}",
            view.newest_node,
            rfc3339(view.newest_at_ms)
        ),
    };
    let mut out = format!("\n{duty}; {newest}");
    out.push_str(&match view.shipped_id.as_str() {
        "" => "\nno off-site copy yet".to_string(),
        id => format!(
            "\nnewest off-site copy {id}, verified {}",
            rfc3339(view.shipped_at_ms)
        ),
    });
    if !view.drill_id.is_empty() {
        out.push_str(&format!(
            "; last drill {} of {} at {}{}",
            if view.drill_passed { "passed" } else { "FAILED" },
            view.drill_id,
            rfc3339(view.drill_at_ms),
            if view.drill_passed {
                String::new()
            } else {
                format!(": {}", view.drill_problem)
            }
        ));
    }
    if !view.restorable_id.is_empty() {
        out.push_str(&format!("\nrestorable up to {}", rfc3339(view.restorable_at_ms)));
    }
    if view.offsite_stale {
        out.push_str("\nALERT: no verified off-site copy within backup.max_offsite_age_secs");
    }
    for s in &answered {
        let Some(b) = &s.backup else { continue };
        if b.local_backups > 0 || b.next_due_ms > 0 {
            out.push_str(&format!("\nnode {}: holds {} backup(s)", s.id, b.local_backups));
            if b.next_due_ms > 0 && s.id == view.duty_node {
                out.push_str(&format!(", next due {}", rfc3339(b.next_due_ms)));
            } else if b.next_due_ms > 0 {
                out.push_str(&format!(
                    ", stands in at {} if none is taken before",
                    rfc3339(b.next_due_ms)
                ));
            }
            if b.next_ship_ms > 0 {
                out.push_str(&format!(", next ship {}", rfc3339(b.next_ship_ms)));
            }
        }
        if b.last_failure_ms > 0 {
            out.push_str(&format!(
                "\nnode {}: last backup FAILED at {}: {}",
                s.id,
                rfc3339(b.last_failure_ms),
                b.last_failure
            ));
        }
    }
    out
}
