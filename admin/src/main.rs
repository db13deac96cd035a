//! `mailvault-admin`: the operator CLI. Works remotely over gRPC.
//! Data goes to stdout, diagnostics to stderr; `--output json` everywhere.

mod access;
mod audit;
mod backup;
mod bench;
mod client;
mod devcerts;
mod mail;
mod op;
mod output;
mod progress;
mod restore;
mod status;

pub use output::Output;

use clap::{Parser, Subcommand};

/// Operator CLI for a mailvault cluster.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// Client API endpoint of any node.
    #[arg(
        long,
        global = true,
        env = "MAILVAULT_ENDPOINT",
        default_value = "127.0.0.1:7101"
    )]
    endpoint: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    tls: client::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Members, roles, leader, term, log and applied index, per-node health.
    Status,
    /// Tenants.
    #[command(subcommand)]
    Tenant(mail::TenantCmd),
    /// Mailboxes.
    #[command(subcommand)]
    Mailbox(mail::MailboxCmd),
    /// Messages: append a file, list, fetch.
    #[command(subcommand)]
    Mail(mail::MailCmd),
    /// Load generator: appends with N concurrent clients; prints throughput and latency.
    Bench(bench::BenchArgs),
    /// Access policy: roles, allowlists, revocation (operator).
    #[command(subcommand)]
    Access(access::AccessCmd),
    /// The audit log: list, verify, export (auditor); verify offline on a data directory.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Two-person operations: plan, propose, list, show, approve, reject, cancel, watch.
    #[command(subcommand)]
    Op(op::OpCmd),
    /// Backups: the catalog, one backup's manifest, take one now, verify one (operator; list and show also auditor).
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Generates a development CA, node certificates and client identities.
    DevCerts(devcerts::DevCertsArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    if let Err(e) = client::init_tls(&cli.tls) {
        eprintln!("mailvault-admin: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let res = match cli.command {
        Command::Status => status::run(&cli.endpoint, cli.output).await,
        Command::Tenant(c) => mail::tenant(&cli.endpoint, cli.output, c).await,
        Command::Mailbox(c) => mail::mailbox(&cli.endpoint, cli.output, c).await,
        Command::Mail(c) => mail::mail(&cli.endpoint, cli.output, c).await,
        Command::Bench(a) => bench::run(&cli.endpoint, cli.output, a).await,
        Command::Access(c) => access::run(&cli.endpoint, cli.output, c).await,
        Command::Audit(c) => audit::run(&cli.endpoint, cli.output, c).await,
        Command::Backup(c) => backup::run(&cli.endpoint, cli.output, c).await,
        Command::Op(c) => op::run(&cli.endpoint, cli.output, c).await,
        Command::DevCerts(a) => devcerts::run(cli.output, a),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailvault-admin: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
