//! Connecting to a node.

use anyhow::Context;
use mailvault_proto::v1::admin_client::AdminClient;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use tonic::transport::{Channel, Endpoint};

/// Largest frame accepted from a node.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A channel to `endpoint` (an `http://host:port` URL or `host:port`).
pub async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid endpoint {url}"))?
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

/// An admin client.
pub async fn admin(endpoint: &str) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(endpoint).await?))
}

/// Turns a gRPC status into an error that names its code.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
