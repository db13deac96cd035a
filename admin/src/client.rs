//! Connecting to a node over mTLS.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use mailvault_proto::v1::access_client::AccessClient;
use mailvault_proto::v1::audit_client::AuditClient;
use mailvault_proto::v1::backups_client::BackupsClient;
use mailvault_proto::v1::cluster_client::ClusterClient;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::operations_client::OperationsClient;
use mailvault_proto::v1::tenants_client::TenantsClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest frame accepted from a node.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The certificate files this CLI presents.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Cluster CA certificate (PEM).
    #[arg(long, global = true, env = "MAILVAULT_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, env = "MAILVAULT_CERT")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "MAILVAULT_KEY")]
    pub key: Option<PathBuf>,
}

/// The TLS files (CA, certificate, key), read when a connection is made —
/// so offline commands (`audit verify --data-dir`, `dev-certs`) never need
/// them to exist.
static TLS: OnceLock<Option<(PathBuf, PathBuf, PathBuf)>> = OnceLock::new();
/// The certificate and key files, for signing approvals.
static IDENTITY: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

/// Sets the TLS files for every connection this process makes.
pub fn init_tls(args: &TlsArgs) -> anyhow::Result<()> {
    let files = match (&args.ca, &args.cert, &args.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let _ = IDENTITY.set((cert.clone(), key.clone()));
            Some((ca.clone(), cert.clone(), key.clone()))
        }
        (None, None, None) => None,
        _ => anyhow::bail!("--ca, --cert and --key go together"),
    };
    let _ = TLS.set(files);
    Ok(())
}

/// The client TLS configuration of the files given.
fn tls_config() -> anyhow::Result<ClientTlsConfig> {
    let (ca, cert, key) = TLS.get().cloned().flatten().context(
        "every listener requires mTLS: give --ca, --cert and --key (or MAILVAULT_CA, MAILVAULT_CERT, MAILVAULT_KEY)",
    )?;
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ca)?))
        .identity(Identity::from_pem(read(&cert)?, read(&key)?)))
}

/// A channel to `endpoint` (`host:port`, or a URL whose scheme is ignored).
pub async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let hostport = endpoint.split("://").last().unwrap_or(endpoint);
    let tls = tls_config()?;
    let url = format!("https://{hostport}");
    Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid endpoint {url}"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// A mailbox client.
pub async fn mailbox(endpoint: &str) -> anyhow::Result<MailboxClient<Channel>> {
    Ok(MailboxClient::new(channel(endpoint).await?)
        .max_decoding_message_size(MAX_FRAME)
        .max_encoding_message_size(MAX_FRAME))
}

/// A client of the cluster service (status, digest, snapshots).
pub async fn cluster(endpoint: &str) -> anyhow::Result<ClusterClient<Channel>> {
    Ok(ClusterClient::new(channel(endpoint).await?))
}

/// A client of the tenants service.
pub async fn tenants(endpoint: &str) -> anyhow::Result<TenantsClient<Channel>> {
    Ok(TenantsClient::new(channel(endpoint).await?))
}

/// A client of the access service (roles, allowlists, revocation).
pub async fn access(endpoint: &str) -> anyhow::Result<AccessClient<Channel>> {
    Ok(AccessClient::new(channel(endpoint).await?))
}

/// A client of the audit service.
pub async fn audit(endpoint: &str) -> anyhow::Result<AuditClient<Channel>> {
    Ok(AuditClient::new(channel(endpoint).await?))
}

/// A client of the backups service.
pub async fn backups(endpoint: &str) -> anyhow::Result<BackupsClient<Channel>> {
    Ok(BackupsClient::new(channel(endpoint).await?)
        .max_decoding_message_size(MAX_FRAME)
        .max_encoding_message_size(MAX_FRAME))
}

/// A client of the operations service (two-person operations).
pub async fn operations(endpoint: &str) -> anyhow::Result<OperationsClient<Channel>> {
    Ok(OperationsClient::new(channel(endpoint).await?))
}

/// This CLI's certificate (DER) and private key (PEM), which sign approvals.
pub fn signing_identity() -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let (cert, key) = IDENTITY
        .get()
        .context("no client certificate: give --cert and --key")?;
    let pem = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let der = mailvault_proto::approval::certificate_der(&pem).map_err(anyhow::Error::msg)?;
    let key = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
    Ok((der, key))
}

/// The stable reason of a failed call, if it carries one.
pub fn reason_of(s: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    s.get_details_error_info().map(|i| i.reason)
}

/// A failed call as the CLI reports it: the code, the message and the stable
/// reason of its `ErrorInfo` (see `proto/mailvault/v1/errors.proto`).
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    match s.get_details_error_info() {
        Some(info) => anyhow::anyhow!("{:?}: {} (reason {})", s.code(), s.message(), info.reason),
        None => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
    }
}
