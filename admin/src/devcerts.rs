//! `mailvault-admin dev-certs`: development certificates for a local cluster.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::Output;

#[derive(clap::Args, Debug)]
pub struct DevCertsArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// A node as `ID=IP[,IP…]`; repeat per node.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// A client identity to issue; repeat per identity.
    #[arg(long = "client")]
    clients: Vec<String>,
}

pub fn run(output: Output, a: DevCertsArgs) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for n in &a.nodes {
        let (id, ips) = n.split_once('=').context("--node takes ID=IP[,IP…]")?;
        let ips = ips
            .split(',')
            .map(|ip| {
                ip.parse::<IpAddr>()
                    .with_context(|| format!("not an IP address: {ip}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        nodes.push((id.parse::<u64>().context("node id must be a number")?, ips));
    }
    mailvault_node::tls::devcerts::write_all(&a.out, &nodes, &a.clients)
        .map_err(|e| anyhow::anyhow!("cannot write certificates: {e}"))?;
    output.emit(
        json!({"dir": a.out, "nodes": nodes.len(), "clients": a.clients}),
        || {
            format!(
                "wrote ca.pem, {} node and {} client certificates to {}",
                nodes.len(),
                a.clients.len(),
                a.out.display()
            )
        },
    );
    Ok(())
}
