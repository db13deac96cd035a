//! The client port as gRPC tools find it: reflection (both versions) lists
//! what the port serves and nothing else, exploring it never counts towards
//! a lockout, and a refused TLS handshake names its reason in the alert the
//! client receives.

use std::net::IpAddr;

use mailvault_chaos::*;
use mailvault_node::tls::devcerts::{DevCa, Pems};
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::*;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_reflection::pb::{v1, v1alpha};

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

/// The services reflection v1 lists, and the answer to describing `symbol`.
async fn list_v1(ch: Channel, symbol: &str) -> Result<(Vec<String>, bool), tonic::Status> {
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch);
    let req = |m| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        req(MessageRequest::ListServices(String::new())),
        req(MessageRequest::FileContainingSymbol(symbol.into())),
    ];
    let mut answers = c
        .server_reflection_info(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut names = Vec::new();
    let mut described = false;
    while let Some(a) = answers.next().await {
        match a?.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                names.extend(l.service.into_iter().map(|s| s.name))
            }
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                described = !f.file_descriptor_proto.is_empty()
            }
            _ => {}
        }
    }
    names.sort();
    Ok((names, described))
}

/// The services reflection v1alpha lists.
async fn list_v1alpha(ch: Channel) -> Result<Vec<String>, tonic::Status> {
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let reqs = vec![v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }];
    let mut answers = c
        .server_reflection_info(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(a) = answers.next().await {
        if let Some(MessageResponse::ListServicesResponse(l)) = a?.message_response {
            names.extend(l.service.into_iter().map(|s| s.name));
        }
    }
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_what_the_client_port_serves_and_exploring_counts_nothing() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, "acme", "inbox").await;
    let mut want: Vec<String> = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "mailvault.v1.Access",
        "mailvault.v1.Audit",
        "mailvault.v1.Backups",
        "mailvault.v1.Cluster",
        "mailvault.v1.Mailbox",
        "mailvault.v1.Operations",
        "mailvault.v1.Tenants",
    ]
    .map(String::from)
    .to_vec();
    want.sort();
    // A person with no role at all, from the address everyone else shares:
    // far more calls than the lockout threshold.
    let explorer = || cluster.channel_as(0, "explorer", ip("127.0.0.1"));
    for round in 0..4 {
        let (names, described) = list_v1(explorer(), "mailvault.v1.Mailbox").await.unwrap();
        assert_eq!(names, want, "reflection v1 lists what the port serves");
        assert!(described, "the mailbox service is described");
        let (_, peer_described) = list_v1(explorer(), "mailvault.raft.v1.RaftPeer")
            .await
            .map_err(|e| format!("{e:?}"))
            .unwrap_or((Vec::new(), false));
        assert!(
            !peer_described,
            "the peer protocol is not described on the client port"
        );
        assert_eq!(
            list_v1alpha(explorer()).await.unwrap(),
            want,
            "reflection v1alpha"
        );
        let mut health = tonic_health::pb::health_client::HealthClient::new(explorer());
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_or_else(|e| panic!("health in round {round}: {e:?}"));
        // The peer protocol is not served here: not a denial either.
        let e = mailvault_proto::raft::raft_peer_client::RaftPeerClient::new(explorer())
            .read_index(mailvault_proto::raft::ReadIndexRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    }
    // None of it counted: the explorer is not locked out, and neither is
    // anyone else at its address.
    let mut c = MailboxClient::new(explorer());
    let e = c
        .get_mailbox_status(GetMailboxStatusRequest {
            tenant: "acme".into(),
            mailbox: "inbox".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        !e.message().contains("locked out"),
        "exploring locked the explorer out: {e:?}"
    );
    let mut frontend = cluster.mailbox(0).await;
    list_all(&mut frontend, "acme", "inbox").await.unwrap();
}

/// What a TLS client presenting `cert` (or none) hears from node `i` of
/// `cluster` when it connects from `from`: the handshake's or the first
/// read's error (a TLS 1.3 client finishes its side before the server has
/// checked its certificate, so the alert arrives as the answer to its first
/// bytes).
async fn tls_refusal(cluster: &Cluster, i: usize, from: IpAddr, cert: Option<&Pems>) -> String {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cluster.ca().pems.cert.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match cert {
        Some(p) => {
            let chain = CertificateDer::pem_slice_iter(p.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(p.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let tcp = socket
        .connect(cluster.client_addr(i).parse().unwrap())
        .await
        .unwrap();
    let name = ServerName::IpAddress(std::net::IpAddr::V4(cluster.ip(i)).into());
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return e.to_string(),
    };
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf)).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(n)) => format!("no alert: read {n} bytes"),
        Err(_) => "no alert: nothing within 10 s".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refused_handshake_names_its_reason_in_the_tls_alert() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let foreign = DevCa::new("someone else's CA")
        .unwrap()
        .client("acme-agent")
        .unwrap();
    let expired = cluster
        .ca()
        .client_valid("acme-agent", Some(((2020, 1, 1), (2021, 1, 1))))
        .unwrap();
    // Of the cluster CA, but no identity: an empty user name and no common name.
    let nameless = cluster.ca().client("").unwrap();
    let cases = [
        ("no certificate", None, "CertificateRequired"),
        ("another CA's certificate", Some(&foreign), "UnknownCA"),
        ("an expired certificate", Some(&expired), "CertificateExpired"),
        (
            "a certificate naming no identity",
            Some(&nameless),
            "AccessDenied",
        ),
    ];
    for (n, (what, cert, alert)) in cases.into_iter().enumerate() {
        // Several times, each from its own address, on every node: the alert
        // must arrive every time, not only when the connection closes slowly.
        for attempt in 0..6 {
            let from: IpAddr = format!("127.0.6.{}", n * 10 + attempt + 1).parse().unwrap();
            let heard = tls_refusal(&cluster, attempt % cluster.len(), from, cert).await;
            assert_eq!(
                heard,
                format!("received fatal alert: {alert}"),
                "{what} (attempt {attempt})"
            );
        }
        // A gRPC client gets a transport error, never a session.
        let from = ip(&format!("127.0.6.{}", n * 10 + 9));
        let tls = match cert {
            Some(p) => cluster.tls_with(Identity::from_pem(&p.cert, &p.key)),
            None => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cluster.ca().pems.cert)),
        };
        let mut c = tonic_health::pb::health_client::HealthClient::new(lazy_channel(
            &cluster.client_addr(0),
            tls,
            from,
        ));
        let e = c
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect_err(what);
        assert!(
            matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Cancelled),
            "{what}: {e:?}"
        );
    }
}
