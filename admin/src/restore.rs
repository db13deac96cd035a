//! `mailvault-admin backup restore`: a new cluster's data directories from
//! a backup, offline (`mailvault_node::backups::restore`), with a progress
//! bar for the download and each node written.

use std::path::PathBuf;

use mailvault_node::backups::offsite::Progress;
use mailvault_node::backups::restore::{restore_cluster, ClusterRestore};
use mailvault_node::config::Config;
use serde_json::json;

use crate::output::{size, Output};
use crate::progress::Bars;

/// `backup restore`'s arguments.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Where the backup is: `file:///path` (the off-site directory, or a node's backup root,
    /// `DATA_DIR/backups`) or `s3://bucket/prefix` (endpoint, region and credentials from the
    /// first config's `[backup.s3]`, or the AWS_* environment).
    #[arg(long)]
    pub from: String,
    /// The backup's id, or `latest`: the newest copy there.
    #[arg(long)]
    pub backup: String,
    /// A node config of the new cluster (`mailvault-node`'s TOML); once per voter. Its
    /// `data_dir` must be absent or empty; its master key must be the backup's.
    #[arg(long = "config", required = true)]
    pub configs: Vec<PathBuf>,
    /// Where the copy is downloaded and checked (removed afterwards); default: beside the first
    /// node's data directory.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Who restores, for the restored cluster's audit record (default: $USER).
    #[arg(long)]
    pub operator: Option<String>,
}

pub async fn run(output: Output, args: RestoreArgs) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for path in &args.configs {
        nodes.push(Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let scratch = match args.scratch {
        Some(s) => s,
        None => {
            let first = &nodes
                .first()
                .ok_or_else(|| anyhow::anyhow!("no --config given"))?
                .data_dir;
            let mut name = first.file_name().unwrap_or_default().to_os_string();
            name.push(".restore-scratch");
            first.with_file_name(name)
        }
    };
    let operator = args
        .operator
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "-".into());
    let job = ClusterRestore {
        from: args.from,
        backup: args.backup,
        nodes,
        scratch,
        operator: format!("{operator} (mailvault-admin backup restore)"),
    };
    let bars = Bars::new(output == Output::Text);
    let r = restore_cluster(&job, &bars)
        .await
        .map_err(|e| anyhow::anyhow!("restore refused: {e}"))?;
    bars.end();
    let m = &r.manifest;
    let doc = json!({
        "backup": m.backup_id, "from": job.from, "cluster": m.cluster,
        "applied_index": m.applied_index, "applied_term": m.applied_term,
        "manifest_state_digest": m.state_digest, "records": m.records,
        "checks": {
            "files": r.checks.files, "state_digest": r.checks.state_digest,
            "audit_records": r.checks.audit_records, "messages_decrypted": r.checks.messages_decrypted,
        },
        "restored_state_digest": r.prepared.state_digest, "restored_records": r.prepared.records,
        "catalog_dropped": r.prepared.catalog_dropped,
        "nodes": r.nodes.iter().map(|(id, dir, bytes)| json!({"id": id, "data_dir": dir, "bytes": bytes})).collect::<Vec<_>>(),
        "downloaded_bytes": r.downloaded, "took_ms": r.took_ms,
    });
    output.emit(doc, || {
        let nodes: Vec<String> = r
            .nodes
            .iter()
            .map(|(id, dir, bytes)| format!("  node {id}: {} ({})", dir.display(), size(*bytes)))
            .collect();
        format!(
            "backup {} of cluster {} (log index {}) restored in {} ms\n\
             checked:  manifest authentic, {} files, state digest recomputed {} (the manifest's),\n          \
             {} audit records, every data key unwrapped, {} messages decrypted\n\
             written:\n{}\n\
             The new cluster starts at log index {} with its own membership (state digest {});\n\
             the old cluster's backup catalog ({} entries) is not carried over. Start the nodes.",
            m.backup_id,
            m.cluster,
            m.applied_index,
            r.took_ms,
            r.checks.files,
            r.checks.state_digest,
            r.checks.audit_records,
            r.checks.messages_decrypted,
            nodes.join("\n"),
            m.applied_index,
            r.prepared.state_digest,
            r.prepared.catalog_dropped,
        )
    });
    Ok(())
}
