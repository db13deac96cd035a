//! Client helpers used by the tests.

use std::future::Future;
use std::time::{Duration, Instant};

use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::*;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Status};

pub use mailvault_proto::client::FRAME_BYTES;

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
    let header = AppendHeader {
        tenant: tenant.into(),
        mailbox: mailbox.into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    mailvault_proto::client::append_frames(header, body)
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
    let request = GetMessageRequest {
        tenant: tenant.into(),
        mailbox: mailbox.into(),
        uid,
    };
    let (meta, body) = mailvault_proto::client::read_message(c, request).await?;
    Ok((meta.ok_or_else(|| Status::internal("no metadata frame"))?, body))
}

/// Every message summary of a mailbox.
pub async fn list_all(
    c: &mut MailboxClient<Channel>,
    tenant: &str,
    mailbox: &str,
) -> Result<Vec<MessageSummary>, Status> {
    let request = ListMessagesRequest {
        tenant: tenant.into(),
        mailbox: mailbox.into(),
        ..Default::default()
    };
    mailvault_proto::client::list_all(c, request).await
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
    let admin = cluster.admin(i).await.tenants;
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
        let a = cluster.admin(i).await.cluster;
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
    mailvault_proto::client::scrape_metrics(ops_addr, Duration::from_secs(10)).await
}

/// Reads one counter or gauge from a node's `/metrics` (0 when not yet recorded).
pub async fn scrape_metric(ops_addr: &str, name: &str) -> Option<f64> {
    let page = scrape_metrics(ops_addr).await?;
    Some(mailvault_proto::client::metric_value(&page, name))
}

/// Node `i`'s backup catalog (retried while the cluster settles).
pub async fn list_backups(cluster: &crate::Cluster, i: usize) -> mailvault_proto::v1::ListBackupsResponse {
    let b = cluster.admin(i).await.backups;
    retry(Duration::from_secs(20), || {
        let mut b = b.clone();
        async move {
            b.list_backups(mailvault_proto::v1::ListBackupsRequest {})
                .await
                .map(|r| r.into_inner())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("ListBackups on node {}: {e:?}", i + 1))
}

/// Waits until node `i`'s backup catalog satisfies `f` (at most `timeout`;
/// then dumps the node logs and panics naming `what`).
pub async fn wait_backups(
    cluster: &crate::Cluster,
    i: usize,
    timeout: Duration,
    what: &str,
    f: impl Fn(&mailvault_proto::v1::ListBackupsResponse) -> bool,
) -> mailvault_proto::v1::ListBackupsResponse {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let l = list_backups(cluster, i).await;
        if f(&l) {
            return l;
        }
        if std::time::Instant::now() > deadline {
            cluster.dump_logs();
            panic!(
                "the backup catalog never showed {what}: {:?} (duty node {}, standing in {})",
                l.backups
                    .iter()
                    .map(|b| (
                        &b.id,
                        b.node,
                        b.local,
                        b.shipped.is_some(),
                        b.drill.as_ref().map(|d| d.passed)
                    ))
                    .collect::<Vec<_>>(),
                l.duty_node,
                l.standing_in
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until node `i`'s catalog shows backup `id` drilled and restorable
/// (at most `timeout`; then panics naming `what`, as [`wait_backups`]).
pub async fn wait_drilled(
    cluster: &crate::Cluster,
    i: usize,
    id: &str,
    timeout: Duration,
    what: &str,
) -> mailvault_proto::v1::ListBackupsResponse {
    wait_backups(cluster, i, timeout, what, |l| {
        l.backups
            .iter()
            .any(|b| b.id == id && b.drill.as_ref().is_some_and(|d| d.passed))
    })
    .await
}

/// A mailvault error's gRPC code and stable reason (empty without one).
pub fn code_and_reason(s: &tonic::Status) -> (tonic::Code, String) {
    use tonic_types::StatusExt;
    let r = s.get_details_error_info().map(|i| i.reason).unwrap_or_default();
    (s.code(), r)
}
