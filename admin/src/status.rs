//! `mailvault-admin status`.

use mailvault_proto::v1::{NodeStatusRequest, NodeStatusResponse, Worker};
use serde_json::json;

use crate::client::{cluster, status_err};
use crate::output::{rfc3339, table, Output};

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
    let nodes: Vec<_> = probes
        .iter()
        .map(|p| {
            let m = &p.member;
            let mut v = json!({
                "id": m.id, "role": m.role, "voter": m.voter,
                "client_addr": m.client_addr, "raft_addr": m.raft_addr, "ops_addr": m.ops_addr,
            });
            match &p.status {
                Ok(s) => {
                    v["healthy"] = json!(true);
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
            "state",
            "term",
            "last log",
            "applied",
            "health",
            "workers",
            "client addr",
        ];
        let rows = probes.iter().map(|p| {
            let m = &p.member;
            let (state, term, last, applied, health, workers) = match &p.status {
                Ok(s) => (
                    s.state.clone(),
                    s.term.to_string(),
                    s.last_log_index.to_string(),
                    s.applied_index.to_string(),
                    match s.damaged.len() {
                        0 => "ok".to_string(),
                        n => format!("ok, {n} damaged message(s)"),
                    },
                    workers_text(&s.workers),
                ),
                Err(e) => (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("DOWN ({e})"),
                    "-".into(),
                ),
            };
            [
                m.id.to_string(),
                m.role.clone(),
                m.voter.to_string(),
                state,
                term,
                last,
                applied,
                health,
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
        format!("{}\n{summary}{damaged}", table(header, rows))
    });
    Ok(())
}

/// `12 running`, or the workers that are not running and why.
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
