//! `mailvault-admin backup restore` and `backup approve-restore`: a new
//! cluster's data directories from a backup, offline
//! (`mailvault_node::backups::restore`), as a two-person operation whose plan
//! is a file: rehearsed and signed by one operator (`--plan-out`), signed by
//! a second (`approve-restore`), then run (`--plan`), with a progress bar for
//! the download and each node written.

use std::path::{Path, PathBuf};

use mailvault_node::backups::offsite::Progress;
use mailvault_node::backups::restore::{rehearse_cluster_restore, restore_cluster, ClusterRestore};
use mailvault_node::backups::restore_plan::{rfc3339, RestorePlan, SignedPlan, MAX_EXPIRY_MS};
use mailvault_node::config::Config;
use serde_json::json;

use crate::client::signing_identity;
use crate::output::{size, Output};
use crate::progress::Bars;

/// `backup restore`'s arguments.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Where the backup is: `file:///path` (the off-site directory, or a node's backup root,
    /// `DATA_DIR/backups`) or `s3://bucket/prefix` (endpoint, region and credentials from the
    /// first config's `[backup.s3]`, or the AWS_* environment). With --plan: the plan's.
    #[arg(long, required_unless_present = "plan")]
    pub from: Option<String>,
    /// The backup's id, or `latest`: the newest copy there. With --plan: the plan's.
    #[arg(long, required_unless_present = "plan")]
    pub backup: Option<String>,
    /// A node config of the new cluster (`mailvault-node`'s TOML); once per voter. Its
    /// `data_dir` must be absent or empty; its master key must be the backup's.
    #[arg(long = "config", required = true)]
    pub configs: Vec<PathBuf>,
    /// Where the copy is downloaded and checked (removed afterwards); default: beside the first
    /// node's data directory.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Rehearse only: check everything the restore checks, write this plan file signed with
    /// this CLI's certificate (--cert/--key), and write no data directory. A second operator
    /// signs it with `backup approve-restore`.
    #[arg(long, conflicts_with = "plan", requires = "reason")]
    pub plan_out: Option<PathBuf>,
    /// Why (e.g. a ticket number); with --plan-out.
    #[arg(long)]
    pub reason: Option<String>,
    /// How long the plan may be signed and run (at most 24h); with --plan-out.
    #[arg(long, default_value = "1h")]
    pub expires: humantime::Duration,
    /// Run this plan, signed by two operators (its proposer and an approver).
    #[arg(long)]
    pub plan: Option<PathBuf>,
}

/// `backup approve-restore`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ApproveRestoreArgs {
    /// The plan file (`backup restore --plan-out`); the signature is added to it.
    pub plan: PathBuf,
    /// For scripts: sign without asking; needs --plan-hash.
    #[arg(long, requires = "plan_hash")]
    pub yes: bool,
    /// The plan hash the approver read; refused if the file's is another.
    #[arg(long)]
    pub plan_hash: Option<String>,
}

fn scratch_of(nodes: &[Config], given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(s) = given {
        return Ok(s);
    }
    let first = &nodes
        .first()
        .ok_or_else(|| anyhow::anyhow!("no --config given"))?
        .data_dir;
    let mut name = first.file_name().unwrap_or_default().to_os_string();
    name.push(".restore-scratch");
    Ok(first.with_file_name(name))
}

pub async fn run(output: Output, args: RestoreArgs) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for path in &args.configs {
        nodes.push(Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let scratch = scratch_of(&nodes, args.scratch)?;
    match (args.plan_out, args.plan) {
        (Some(out), None) => {
            let job = ClusterRestore {
                from: args.from.unwrap_or_default(),
                backup: args.backup.unwrap_or_default(),
                nodes,
                scratch,
            };
            let reason = args.reason.unwrap_or_default();
            rehearse(output, &job, &reason, args.expires, &out).await
        }
        (None, Some(plan)) => {
            let signed = SignedPlan::load(&plan).map_err(anyhow::Error::msg)?;
            let job = ClusterRestore {
                from: args.from.unwrap_or_else(|| signed.plan.from.clone()),
                backup: args.backup.unwrap_or_else(|| signed.plan.backup.clone()),
                nodes,
                scratch,
            };
            restore(output, &job, &signed).await
        }
        _ => anyhow::bail!(
            "a cluster restore is a two-person operation: rehearse it with --plan-out PLAN --reason R \
             (signed with your certificate), have a second operator sign it (`backup approve-restore PLAN`), \
             then run `backup restore --plan PLAN --config …`"
        ),
    }
}

async fn rehearse(
    output: Output,
    job: &ClusterRestore,
    reason: &str,
    expires: humantime::Duration,
    out: &Path,
) -> anyhow::Result<()> {
    if reason.trim().is_empty() {
        anyhow::bail!("--reason is required (e.g. a ticket number)");
    }
    let expires_ms = i64::try_from(std::time::Duration::from(expires).as_millis()).unwrap_or(i64::MAX);
    if expires_ms <= 0 || expires_ms > MAX_EXPIRY_MS {
        anyhow::bail!("--expires must be more than 0 and at most 24h");
    }
    let (cert, key) = signing_identity()?;
    let bars = Bars::new(output == Output::Text);
    let r = rehearse_cluster_restore(job, reason, expires_ms, &bars)
        .await
        .map_err(|e| anyhow::anyhow!("restore refused: {e}"))?;
    bars.end();
    let signed = SignedPlan::new(r.plan, &cert, &key).map_err(anyhow::Error::msg)?;
    signed.save(out)?;
    let mut doc = serde_json::to_value(&signed)?;
    doc["file"] = json!(out.display().to_string());
    doc["took_ms"] = json!(r.took_ms);
    output.emit(doc, || {
        format!(
            "{}\nRehearsed in {} ms; nothing was written. Plan {} is in {}, signed by {}.\n\
             A second operator reads and signs it: mailvault-admin backup approve-restore {}\n\
             Then: mailvault-admin backup restore --plan {} --config … (before {})",
            plan_text(&signed),
            r.took_ms,
            signed.plan.id,
            out.display(),
            signed.plan.proposer,
            out.display(),
            out.display(),
            rfc3339(signed.plan.expires_ms)
        )
    });
    Ok(())
}

/// The plan as the approver reads it.
pub fn plan_text(s: &SignedPlan) -> String {
    let p: &RestorePlan = &s.plan;
    let mut out = vec![
        format!("cluster restore {}  (from backup {})", p.id, p.backup),
        format!(
            "proposed by {} at {}; expires {}",
            p.proposer,
            rfc3339(p.created_ms),
            rfc3339(p.expires_ms)
        ),
        format!("reason: {}", p.reason),
        format!("from: {}", p.from),
        "new cluster:".to_string(),
    ];
    for n in &p.nodes {
        out.push(format!(
            "  node {} {}{}: client {}, raft {}{}",
            n.id,
            n.role,
            if n.voter { " (voter)" } else { "" },
            n.client_addr,
            n.raft_addr,
            match n.data_dir.is_empty() {
                true => String::new(),
                false => format!(", data {}", n.data_dir),
            }
        ));
    }
    out.push("plan (executed in this order):".into());
    out.extend(
        p.steps
            .iter()
            .enumerate()
            .map(|(i, s)| format!("  {}. {s}", i + 1)),
    );
    out.push("effect:".into());
    out.extend(p.effect.iter().map(|e| format!("  - {e}")));
    out.push("checked:".into());
    out.extend(p.checks.iter().map(|c| format!("  - {c}")));
    out.push(format!("plan hash: {}", s.plan_hash));
    for sig in &s.signatures {
        out.push(format!(
            "signed by {} (key {}) at {}",
            sig.identity,
            sig.key.get(..16).unwrap_or(&sig.key),
            rfc3339(sig.signed_ms)
        ));
    }
    out.join("\n")
}

/// `backup approve-restore`: shows the plan, asks for its id, signs it.
pub fn approve(output: Output, args: ApproveRestoreArgs) -> anyhow::Result<()> {
    let mut signed = SignedPlan::load(&args.plan).map_err(anyhow::Error::msg)?;
    match (args.yes, &args.plan_hash) {
        (true, Some(h)) => {
            if *h != signed.plan_hash {
                anyhow::bail!(
                    "not signed: the plan's hash is {}, not the {h} given (the plan is another)",
                    signed.plan_hash
                );
            }
        }
        (_, given) => {
            eprintln!("{}", plan_text(&signed));
            crate::op::confirm(
                &signed.plan.id,
                &format!("--yes --plan-hash {}", signed.plan_hash),
            )?;
            if let Some(h) = given {
                if *h != signed.plan_hash {
                    anyhow::bail!("not signed: the plan's hash is {}, not {h}", signed.plan_hash);
                }
            }
        }
    }
    let (cert, key) = signing_identity()?;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX);
    let who = signed
        .sign(&cert, &key, now)
        .map_err(|e| anyhow::anyhow!("not signed: {e}"))?
        .identity
        .clone();
    signed.save(&args.plan)?;
    let doc = json!({
        "id": signed.plan.id, "plan_hash": signed.plan_hash, "signed_by": who,
        "signatures": signed.signatures.iter().map(|s| s.identity.clone()).collect::<Vec<_>>(),
    });
    output.emit(doc, || {
        format!(
            "plan {} signed by {who} ({} signatures: {}). Run it: mailvault-admin backup restore --plan {} --config …",
            signed.plan.id,
            signed.signatures.len(),
            signed
                .signatures
                .iter()
                .map(|s| s.identity.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            args.plan.display()
        )
    });
    Ok(())
}

async fn restore(output: Output, job: &ClusterRestore, signed: &SignedPlan) -> anyhow::Result<()> {
    let bars = Bars::new(output == Output::Text);
    let r = restore_cluster(job, signed, &bars)
        .await
        .map_err(|e| anyhow::anyhow!("restore refused: {e}"))?;
    bars.end();
    let m = &r.manifest;
    let doc = json!({
        "backup": m.backup_id, "from": job.from, "cluster": m.cluster,
        "plan": signed.plan.id, "plan_hash": signed.plan_hash, "signed_by": r.signers,
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
            "backup {} of cluster {} (log index {}) restored in {} ms, plan {} signed by {}\n\
             checked:  manifest authentic, {} files, state digest recomputed {} (the manifest's),\n          \
             {} audit records, every data key unwrapped, {} messages decrypted\n\
             written:\n{}\n\
             The new cluster starts at log index {} with its own membership (state digest {});\n\
             the old cluster's backup catalog ({} entries) is not carried over. Start the nodes.",
            m.backup_id,
            m.cluster,
            m.applied_index,
            r.took_ms,
            signed.plan.id,
            r.signers.join(" and "),
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
