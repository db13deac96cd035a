//! Client helpers used by the tests.

use std::future::Future;
use std::time::{Duration, Instant};

use mailvault_proto::v1::append_message_request::Frame;
use mailvault_proto::v1::get_message_response::Frame as GetFrame;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::*;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Status};

/// Bytes per frame when streaming a message in.
pub const FRAME_BYTES: usize = 256 * 1024;

/// A lazily connecting mTLS channel to `addr`, optionally from a given local address.
pub fn lazy_channel(addr: &str, tls: ClientTlsConfig, local: Option<std::net::IpAddr>) -> Channel {
    Channel::from_shared(format!("https://{addr}"))
        .expect("valid uri")
        .tls_config(tls)
        .expect("tls config")
        .local_address(local)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect_lazy()
}

/// The frames of an append.
pub fn append_frames(tenant: &str, mailbox: &str, key: &str, body: &[u8]) -> Vec<AppendMessageRequest> {
    let mut frames = vec![AppendMessageRequest {
        frame: Some(Frame::Header(AppendHeader {
            tenant: tenant.into(),
            mailbox: mailbox.into(),
            idempotency_key: key.into(),
            ..Default::default()
        })),
    }];
    frames.extend(body.chunks(FRAME_BYTES).map(|c| AppendMessageRequest {
        frame: Some(Frame::Chunk(c.to_vec())),
    }));
    frames
}

/// Appends `body` with idempotency key `key`.
pub async fn append(
    c: &mut MailboxClient<Channel>,
    tenant: &str,
    mailbox: &str,
    key: &str,
    body: &[u8],
) -> Result<AppendMessageResponse, Status> {
    let frames = append_frames(tenant, mailbox, key, body);
    c.append_message(tokio_stream::iter(frames))
        .await
        .map(|r| r.into_inner())
}

/// Fetches a message's summary and raw bytes.
pub async fn fetch(
    c: &mut MailboxClient<Channel>,
    tenant: &str,
    mailbox: &str,
    uid: u32,
) -> Result<(MessageSummary, Vec<u8>), Status> {
    let mut s = c
        .get_message(GetMessageRequest {
            tenant: tenant.into(),
            mailbox: mailbox.into(),
            uid,
        })
        .await?
        .into_inner();
    let mut meta = None;
    let mut body = Vec::new();
    while let Some(f) = s.next().await {
        match f?.frame {
            Some(GetFrame::Metadata(m)) => meta = Some(m),
            Some(GetFrame::Chunk(b)) => body.extend_from_slice(&b),
            None => {}
        }
    }
    Ok((meta.ok_or_else(|| Status::internal("no metadata frame"))?, body))
}

/// Every message summary of a mailbox.
pub async fn list_all(
    c: &mut MailboxClient<Channel>,
    tenant: &str,
    mailbox: &str,
) -> Result<Vec<MessageSummary>, Status> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_messages(ListMessagesRequest {
                tenant: tenant.into(),
                mailbox: mailbox.into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        all.extend(r.messages);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        token = r.next_page_token;
    }
}

/// Retries `f` while it fails with a transient status, up to `timeout`.
pub async fn retry<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Err(s) if transient(&s) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// Whether a status is worth retrying.
pub fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// Creates a tenant and a mailbox through node `i`, retrying while the cluster settles.
pub async fn create_tenant_and_mailbox(cluster: &crate::Cluster, i: usize, tenant: &str, mailbox: &str) {
    let admin = cluster.admin(i).await;
    retry(Duration::from_secs(20), || {
        let mut a = admin.clone();
        async move {
            match a
                .create_tenant(CreateTenantRequest {
                    tenant: tenant.into(),
                })
                .await
            {
                Err(s) if s.code() == Code::AlreadyExists => Ok(()),
                r => r.map(|_| ()),
            }
        }
    })
    .await
    .expect("create tenant");
    create_mailbox(cluster, i, tenant, mailbox)
        .await
        .expect("create mailbox");
}

/// Creates a mailbox through node `i`, retrying while the cluster settles; a
/// mailbox that exists already (an earlier attempt went through) is fine.
pub async fn create_mailbox(
    cluster: &crate::Cluster,
    i: usize,
    tenant: &str,
    mailbox: &str,
) -> Result<(), Status> {
    let mb = cluster.mailbox(i).await;
    retry(Duration::from_secs(20), || {
        let mut m = mb.clone();
        async move {
            let req = CreateMailboxRequest {
                tenant: tenant.into(),
                mailbox: mailbox.into(),
            };
            match m.create_mailbox(req).await {
                Err(s) if s.code() == Code::AlreadyExists => Ok(()),
                r => r.map(|_| ()),
            }
        }
    })
    .await
}

/// Builds a snapshot on every node (which syncs and flushes its store),
/// retrying while the cluster settles.
pub async fn snapshot_every_node(cluster: &crate::Cluster) -> Result<(), Status> {
    for i in 0..cluster.len() {
        let a = cluster.admin(i).await;
        retry(Duration::from_secs(20), || {
            let mut a = a.clone();
            async move {
                a.trigger_snapshot(TriggerSnapshotRequest { purge_log: false })
                    .await
            }
        })
        .await?;
    }
    Ok(())
}

/// A recognisable test message.
pub fn test_message(subject: &str, from: &str, body_marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Customer <{from}>\r\nTo: support@shop.example\r\nSubject: {subject}\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n\r\n{body_marker}\r\n"
    )
    .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        m.extend_from_slice(format!("line {i} of the body\r\n").as_bytes());
        i += 1;
    }
    m
}

/// The whole `/metrics` page of the node whose ops listener is `ops_addr`.
pub async fn scrape_metrics(ops_addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ops_addr).await.ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {ops_addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// Reads one counter or gauge from a node's `/metrics` (0 when not yet recorded).
pub async fn scrape_metric(ops_addr: &str, name: &str) -> Option<f64> {
    let body = scrape_metrics(ops_addr).await?;
    Some(
        body.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
    )
}
