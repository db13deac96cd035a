//! `mailvault-admin audit`: list, verify and export the hash-chained audit log.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mailvault_proto::v1::{AuditRecord, ListAuditRequest, VerifyAuditRequest};
use serde_json::json;

use crate::client::{audit, status_err};
use crate::output::{rfc3339, table, Output};

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Lists records from a sequence number on.
    List {
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Verifies the hash chain: on a node over gRPC, or offline on a stopped node's data directory.
    Verify {
        /// A stopped node's `data_dir` to verify offline. Stop it cleanly first: after a
        /// crash, records still only in its Raft log are not verified (a note says so).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Exports every record as JSON lines to stdout.
    Export,
}

fn record_json(r: &AuditRecord) -> serde_json::Value {
    json!({"seq": r.seq, "time": rfc3339(r.time_ms), "time_ms": r.time_ms, "identity": r.identity, "source": r.source,
           "action": r.action, "target": r.target, "result": r.result, "node": r.node,
           "prev_hash": r.prev_hash, "hash": r.hash})
}

pub async fn run(endpoint: &str, output: Output, cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Verify { data_dir: Some(dir) } => {
            let log = mailvault_node::store::open_db_read_only(&dir.join("db"))
                .with_context(|| format!("cannot open the store in {}", dir.display()))?;
            let db = mailvault_node::store::open_state_dir_read_only(&dir)
                .with_context(|| format!("cannot open the store in {}", dir.display()))?;
            mailvault_node::store::data_version::check(&db)
                .with_context(|| format!("cannot read the store in {}", dir.display()))?;
            let (applied, committed) = mailvault_node::store::applied_and_committed(&log, &db)
                .map_err(|e| anyhow::anyhow!("cannot read the applied index: {e}"))?;
            if committed > applied {
                eprintln!(
                    "note: this node was not stopped cleanly: its state is at log index {applied}, and \
                     {} committed entries after it, which may hold audit records, are not yet applied; \
                     start the node (it applies them) and stop it cleanly to verify those too",
                    committed - applied
                );
            }
            let result = mailvault_node::store::MailReader::unkeyed(db).verify_audit()?;
            report(
                output,
                result.as_ref().ok().copied(),
                result.err().map(|e| e.to_string()),
            )
        }
        AuditCmd::Verify { data_dir: None } => {
            let r = audit(endpoint)
                .await?
                .verify_audit(VerifyAuditRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            report(output, r.ok.then_some(r.records), (!r.ok).then_some(r.error))
        }
        AuditCmd::List { from, limit } => {
            let r = audit(endpoint)
                .await?
                .list_audit(ListAuditRequest {
                    from_seq: from,
                    limit,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let json = serde_json::Value::from(r.records.iter().map(record_json).collect::<Vec<_>>());
            output.emit(json, || {
                let rows = r.records.iter().map(|x| {
                    [
                        x.seq.to_string(),
                        rfc3339(x.time_ms),
                        x.identity.clone(),
                        x.source.clone(),
                        x.action.clone(),
                        x.target.clone(),
                        x.result.clone(),
                        x.node.to_string(),
                    ]
                });
                let header = [
                    "seq",
                    "time (UTC)",
                    "identity",
                    "source",
                    "action",
                    "target",
                    "result",
                    "node",
                ];
                format!("{}\nhead: record {}", table(header, rows), r.head_seq)
            });
            Ok(())
        }
        AuditCmd::Export => {
            let mut c = audit(endpoint).await?;
            let mut from = 1;
            loop {
                let r = c
                    .list_audit(ListAuditRequest {
                        from_seq: from,
                        limit: 5000,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                let Some(last) = r.records.last().map(|x| x.seq) else {
                    return Ok(());
                };
                for x in &r.records {
                    println!("{}", record_json(x));
                }
                from = last + 1;
            }
        }
    }
}

fn report(output: Output, ok: Option<u64>, error: Option<String>) -> anyhow::Result<()> {
    match (output, ok) {
        (Output::Json, _) => println!("{}", json!({"ok": ok.is_some(), "records": ok, "error": error})),
        (Output::Text, Some(n)) => println!("audit chain intact: {n} records"),
        (Output::Text, None) => {}
    }
    match error {
        None => Ok(()),
        Some(e) => anyhow::bail!("audit chain BROKEN: {e}"),
    }
}
