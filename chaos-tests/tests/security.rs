//! Access control and audit against a real cluster over mTLS: every denied
//! access is refused and audited; masking; revocation; allowlists; lockout;
//! policy replication; audit-chain tamper detection.

use std::net::IpAddr;
use std::time::Duration;

use mailvault_chaos::*;
use mailvault_node::tls::devcerts::DevCa;
use mailvault_proto::raft::raft_peer_client::RaftPeerClient;
use mailvault_proto::raft::ReadIndexRequest;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::tenants_client::TenantsClient;
use mailvault_proto::v1::*;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::Code;

const ADDR: &str = "jane.customer@example.org";

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

async fn status_of(
    c: &mut MailboxClient<tonic::transport::Channel>,
    tenant: &str,
) -> Result<MailboxStatus, tonic::Status> {
    c.get_mailbox_status(GetMailboxStatusRequest {
        tenant: tenant.into(),
        mailbox: "inbox".into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn audit_records(cluster: &Cluster) -> Vec<AuditRecord> {
    cluster.audit_records(0, "auditor").await
}

/// Waits until the audit log holds a record matching `f`.
async fn wait_audited(cluster: &Cluster, what: &str, f: impl Fn(&AuditRecord) -> bool) {
    for _ in 0..100 {
        if audit_records(cluster).await.iter().any(&f) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no audit record for: {what}");
}

async fn setup() -> Cluster {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    for t in ["acme", "globex"] {
        create_tenant_and_mailbox(&cluster, 0, t, "inbox").await;
    }
    cluster.grant_cluster_role("auditor", "auditor").await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_denied_access_is_refused_and_audited() {
    let cluster = setup().await;
    cluster.grant("acme-agent", "acme", "agent").await;

    // No client certificate.
    let no_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cluster.ca().pems.cert));
    // Each refused attempt comes from its own address, or the lockout (tested
    // below) would lock out the address the test itself administers from.
    let mut c = MailboxClient::new(lazy_channel(&cluster.client_addr(0), no_cert, ip("127.0.1.1")));
    assert!(
        status_of(&mut c, "acme").await.is_err(),
        "a call without a client certificate succeeded"
    );

    // A certificate from another CA.
    let other = DevCa::new("someone else's CA")
        .unwrap()
        .client("acme-agent")
        .unwrap();
    let tls = cluster.tls_with(Identity::from_pem(&other.cert, &other.key));
    let mut c = MailboxClient::new(lazy_channel(&cluster.client_addr(0), tls, ip("127.0.1.2")));
    assert!(
        status_of(&mut c, "acme").await.is_err(),
        "a foreign CA's certificate was accepted"
    );

    // An expired certificate of the right CA.
    let old = cluster
        .ca()
        .client_valid("acme-agent", Some(((2020, 1, 1), (2021, 1, 1))))
        .unwrap();
    let tls = cluster.tls_with(Identity::from_pem(&old.cert, &old.key));
    let mut c = MailboxClient::new(lazy_channel(&cluster.client_addr(0), tls, ip("127.0.1.3")));
    assert!(
        status_of(&mut c, "acme").await.is_err(),
        "an expired certificate was accepted"
    );

    // A client certificate on the Raft peer port.
    let ch = lazy_channel(
        &cluster.raft_addr(0),
        cluster.tls_for("acme-agent"),
        ip("127.0.1.4"),
    );
    let e = RaftPeerClient::new(ch).read_index(ReadIndexRequest {}).await;
    assert!(e.is_err(), "a client certificate reached the peer service");

    // The wrong tenant: reading, listing, watching and changing are all denied.
    let mut c = MailboxClient::new(cluster.channel_as(1, "acme-agent", ip("127.0.1.5")));
    status_of(&mut c, "acme").await.unwrap();
    assert_eq!(
        status_of(&mut c, "globex").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let e = c
        .list_messages(ListMessagesRequest {
            tenant: "globex".into(),
            mailbox: "inbox".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .watch_mailbox(WatchMailboxRequest {
            tenant: "globex".into(),
            mailbox: "inbox".into(),
            since_modseq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = append(&mut c, "globex", "inbox", "k", b"Subject: x\r\n\r\nx")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nor may a tenant identity use the admin API. (Another identity: four
    // denials are all acme-agent may collect before the fifth locks it out.)
    cluster.grant("acme-reader", "acme", "reader").await;
    let e = TenantsClient::new(cluster.channel_as(0, "acme-reader", ip("127.0.1.6")))
        .create_tenant(CreateTenantRequest {
            tenant: "evil".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A revoked certificate: works, then is revoked by serial, then makes no new call.
    cluster.grant("temp", "acme", "reader").await;
    let temp = cluster.ca().client("temp").unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(temp.cert.as_bytes()).unwrap();
    let (_, serial) = mailvault_node::tls::identity_of(&der).unwrap();
    let tls = cluster.tls_with(Identity::from_pem(&temp.cert, &temp.key));
    let mut c = MailboxClient::new(lazy_channel(&cluster.client_addr(2), tls, None));
    // The grant is replicated; node 3 may apply it a moment later.
    retry(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            match status_of(&mut c, "acme").await {
                Err(e) if e.code() == Code::PermissionDenied => Err(tonic::Status::unavailable("not yet")),
                r => r,
            }
        }
    })
    .await
    .unwrap();
    cluster
        .admin(0)
        .await
        .access
        .revoke_certificate(RevokeCertificateRequest {
            serial: serial.clone(),
        })
        .await
        .unwrap();
    let mut revoked = false;
    for _ in 0..50 {
        match status_of(&mut c, "acme").await {
            Err(e) if e.code() == Code::Unauthenticated => {
                revoked = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(
        revoked,
        "a revoked certificate kept working on an open connection"
    );

    // A disallowed source address.
    cluster.grant("pinned", "acme", "reader").await;
    let mut a = cluster.admin(0).await.access;
    a.set_allowlist(SetAllowlistRequest {
        identity: "pinned".into(),
        allow_from: Some(Allowlist {
            networks: vec!["127.0.0.1/32".into()],
        }),
        expected: None,
    })
    .await
    .unwrap();
    let mut from_ok = MailboxClient::new(cluster.channel_as(0, "pinned", ip("127.0.0.1")));
    let mut from_bad = MailboxClient::new(cluster.channel_as(0, "pinned", ip("127.0.0.2")));
    retry(Duration::from_secs(5), || {
        let mut c = from_ok.clone();
        async move { status_of(&mut c, "acme").await }
    })
    .await
    .unwrap();
    assert_eq!(
        status_of(&mut from_bad, "acme").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let _ = &mut from_ok;

    // Lockout: five denied calls lock out the identity that made them — from
    // anywhere — and not its address: another identity behind it is served.
    let mut mallory = MailboxClient::new(cluster.channel_as(1, "mallory", ip("127.0.0.3")));
    for _ in 0..5 {
        assert_eq!(
            status_of(&mut mallory, "acme").await.unwrap_err().code(),
            Code::PermissionDenied
        );
    }
    wait_locked_out(&cluster, 1, "mallory", "127.0.0.4").await;
    let mut same_address = MailboxClient::new(cluster.channel_as(1, "acme-agent", ip("127.0.0.3")));
    status_of(&mut same_address, "acme").await.unwrap();
    // Every denial left an audit record.
    let denied = |r: &AuditRecord| r.result.starts_with("denied");
    wait_audited(&cluster, "no certificate", |r| {
        denied(r) && r.action == "client-connect" && r.result.contains("certificate")
    })
    .await;
    wait_audited(&cluster, "foreign CA", |r| {
        denied(r) && r.result.contains("UnknownIssuer")
    })
    .await;
    wait_audited(&cluster, "expired", |r| {
        denied(r) && r.result.to_lowercase().contains("expired")
    })
    .await;
    // Refused on the peer port, audited, but not counted towards lockout.
    wait_audited(&cluster, "peer port", |r| {
        r.result.starts_with("refused: ") && r.action == "raft-peer-connect"
    })
    .await;
    wait_audited(&cluster, "wrong tenant", |r| {
        denied(r) && r.identity == "acme-agent" && r.target.starts_with("globex")
    })
    .await;
    wait_audited(&cluster, "admin call", |r| {
        denied(r) && r.identity == "acme-reader" && r.action == "CreateTenant"
    })
    .await;
    wait_audited(&cluster, "revoked", |r| {
        denied(r) && r.identity == "temp" && r.result.contains("revoked")
    })
    .await;
    wait_audited(&cluster, "source", |r| {
        denied(r) && r.identity == "pinned" && r.source == "127.0.0.2"
    })
    .await;
    wait_audited(&cluster, "lockout", |r| {
        r.action == "lockout-started" && r.target == "id:mallory"
    })
    .await;
    wait_audited(&cluster, "refused while locked out", |r| {
        r.identity == "mallory" && r.result == "refused: locked out"
    })
    .await;
    let metric = scrape_metric(&cluster.ops_addr(1), "mailvault_lockouts_total").await;
    assert!(metric >= Some(1.0), "lockouts visible in metrics: {metric:?}");
}

/// The denials of `identity` that node `i` has applied from the audit log.
async fn denials_seen_by(cluster: &Cluster, i: usize, identity: &str) -> usize {
    let mut a = cluster.admin_as(i, "auditor").await.audit;
    let records = a
        .list_audit(ListAuditRequest {
            from_seq: 1,
            limit: 10_000,
        })
        .await
        .map(|r| r.into_inner().records)
        .unwrap_or_default();
    records
        .iter()
        .filter(|r| r.identity == identity && r.result.starts_with("denied: "))
        .count()
}

/// Calls node `i` as `identity` from `from` until the answer says "locked
/// out"; returns that answer.
async fn wait_locked_out(cluster: &Cluster, i: usize, identity: &str, from: &str) -> tonic::Status {
    let mut c = MailboxClient::new(cluster.channel_as(i, identity, ip(from)));
    for _ in 0..100 {
        match status_of(&mut c, "acme").await {
            Err(e) if e.code() == Code::PermissionDenied && e.message().contains("locked out") => return e,
            Ok(_) => panic!("{identity} from {from} got through node {i} while locked out"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("{identity} from {from} was never locked out on node {i}");
}

/// The lockouts node `i` lists, as `identity` or `address` names.
async fn lockouts_on(cluster: &Cluster, i: usize) -> Vec<String> {
    let mut a = cluster.admin(i).await.access;
    let l = a
        .list_lockouts(ListLockoutsRequest {})
        .await
        .unwrap()
        .into_inner()
        .lockouts;
    l.into_iter()
        .map(|l| match l.identity.is_empty() {
            true => format!("address {}", l.address),
            false => format!("identity {}", l.identity),
        })
        .collect()
}

/// Waits until node `i` lists exactly `want`.
async fn wait_lockouts(cluster: &Cluster, i: usize, want: &[&str]) {
    for _ in 0..100 {
        if lockouts_on(cluster, i).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {i} lists {:?}, not {want:?}", lockouts_on(cluster, i).await);
}

/// A health check from `from` presenting no certificate: a failed authentication.
async fn unauthenticated_attempt(cluster: &Cluster, i: usize, from: &str) {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cluster.ca().pems.cert));
    let mut c = tonic_health::pb::health_client::HealthClient::new(lazy_channel(
        &cluster.client_addr(i),
        tls,
        ip(from),
    ));
    assert!(c
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_hit_the_caller_not_its_neighbours_at_the_exact_threshold_cluster_wide() {
    let mut cluster = setup().await;
    cluster.grant("trudy-ok", "acme", "reader").await;
    // Four denials spread over the three nodes: no lockout anywhere.
    for (node, times) in [(0, 2), (1, 1), (2, 1)] {
        let mut c = MailboxClient::new(cluster.channel_as(node, "trudy", ip("127.0.2.1")));
        for _ in 0..times {
            let e = status_of(&mut c, "acme").await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied);
            assert!(!e.message().contains("locked out"), "locked out too early: {e:?}");
        }
    }
    for node in 0..3 {
        for _ in 0..100 {
            if denials_seen_by(&cluster, node, "trudy").await >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(denials_seen_by(&cluster, node, "trudy").await, 4);
        wait_lockouts(&cluster, node, &[]).await;
    }
    // The fifth, on any node, locks trudy out on every node, from anywhere,
    // with when it ends; not the address, where trudy-ok and the operator
    // are served as before.
    let mut c = MailboxClient::new(cluster.channel_as(2, "trudy", ip("127.0.2.1")));
    assert_eq!(
        status_of(&mut c, "acme").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    for node in 0..3 {
        let e = wait_locked_out(&cluster, node, "trudy", "127.0.2.2").await;
        let info = tonic_types::StatusExt::get_details_error_info(&e).expect("an ErrorInfo");
        assert_eq!(info.reason, "LOCKED_OUT");
        let until = &info.metadata["locked_until"];
        assert!(e.message().contains(until.as_str()), "{e:?}");
        wait_lockouts(&cluster, node, &["identity trudy"]).await;
        let mut ok = MailboxClient::new(cluster.channel_as(node, "trudy-ok", ip("127.0.2.1")));
        status_of(&mut ok, "acme").await.unwrap();
        let mut admin = cluster.admin_as(node, ADMIN).await.cluster;
        admin.node_status(NodeStatusRequest {}).await.unwrap();
    }

    // Failed authentications lock out their address: once it is locked, a
    // revoked certificate from there is told so; an identity in good
    // standing behind it is still served.
    cluster.grant("gone", "acme", "reader").await;
    let mut a = cluster.admin(0).await.access;
    a.revoke_identity(RevokeIdentityRequest {
        identity: "gone".into(),
    })
    .await
    .unwrap();
    for n in 0..5 {
        unauthenticated_attempt(&cluster, n % 3, "127.0.2.9").await;
    }
    for node in 0..3 {
        wait_lockouts(&cluster, node, &["identity trudy", "address 127.0.2.9"]).await;
        let mut gone = MailboxClient::new(cluster.channel_as(node, "gone", ip("127.0.2.9")));
        let e = status_of(&mut gone, "acme").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("locked out"), "{e:?}");
        let mut ok = MailboxClient::new(cluster.channel_as(node, "trudy-ok", ip("127.0.2.9")));
        status_of(&mut ok, "acme").await.unwrap();
    }

    // A node certificate is never locked out, however often it is denied.
    let node_cert = cluster.ca().node(9, &["127.0.2.10".parse().unwrap()]).unwrap();
    let tls = cluster.tls_with(Identity::from_pem(&node_cert.cert, &node_cert.key));
    let mut as_node = MailboxClient::new(lazy_channel(&cluster.client_addr(1), tls, ip("127.0.2.10")));
    for _ in 0..8 {
        let e = status_of(&mut as_node, "acme").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            !e.message().contains("locked out"),
            "a node was locked out: {e:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!status_of(&mut as_node, "acme")
        .await
        .unwrap_err()
        .message()
        .contains("locked out"));

    // A restarted node still enforces them (replayed before serving).
    cluster.kill(0);
    cluster.start_node(0);
    let c = MailboxClient::new(cluster.channel_as(0, "trudy", ip("127.0.2.3")));
    let e = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            match status_of(&mut c, "acme").await {
                Ok(_) => Err(tonic::Status::internal("a locked-out identity got through")),
                Err(e) if e.code() == Code::PermissionDenied => Ok(e),
                Err(e) => Err(e),
            }
        }
    })
    .await
    .unwrap();
    assert!(e.message().contains("locked out"), "after a restart: {e:?}");
    wait_lockouts(&cluster, 0, &["identity trudy", "address 127.0.2.9"]).await;

    // Only an operator may lift one; the CLI lists and lifts them, audited.
    let mut reader = cluster.admin_as(1, "trudy-ok").await.access;
    let e = reader
        .unlock(UnlockRequest {
            who: Some(unlock_request::Who::Identity("trudy".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let out = cluster
        .admin_command(&cluster.client_addr(1), ADMIN)
        .args(["access", "lockouts"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("trudy") && listed.contains("127.0.2.9"),
        "{listed}"
    );
    for args in [
        vec!["access", "unlock", "trudy"],
        vec!["access", "unlock", "--address", "127.0.2.9"],
    ] {
        let out = cluster
            .admin_command(&cluster.client_addr(1), ADMIN)
            .args(&args)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.starts_with("unlocked"),
            "{args:?}: {said}"
        );
    }
    for node in 0..3 {
        wait_lockouts(&cluster, node, &[]).await;
        let mut trudy = MailboxClient::new(cluster.channel_as(node, "trudy", ip("127.0.2.1")));
        let e = status_of(&mut trudy, "acme").await.unwrap_err();
        assert!(
            !e.message().contains("locked out"),
            "node {node} after unlock: {e:?}"
        );
    }
    wait_audited(&cluster, "unlock", |r| {
        r.action == "unlock" && r.identity == ADMIN && r.target == "id:trudy"
    })
    .await;
    let _ = &mut c.clone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_a_full_customer_address() {
    let cluster = setup().await;
    cluster.grant("reader", "acme", "reader").await;
    let body = format!(
        "From: Jane <{ADDR}>\r\nTo: support@acme.example\r\nCc: boss.person@partner.example\r\nSubject: refund\r\n\r\nPlease reply to {ADDR} or call.\r\n"
    );
    let mut agent = cluster.mailbox(0).await;
    let uid = append(&mut agent, "acme", "inbox", "k1", body.as_bytes())
        .await
        .unwrap()
        .uid;

    let mut reader = cluster.mailbox_as(1, "reader").await;
    let listed = retry(Duration::from_secs(5), || {
        let mut r = reader.clone();
        async move { list_all(&mut r, "acme", "inbox").await }
    })
    .await
    .unwrap();
    let (meta, raw) = fetch(&mut reader, "acme", "inbox", uid).await.unwrap();
    let everything = format!("{listed:?} {meta:?} {}", String::from_utf8_lossy(&raw));
    for full in [ADDR, "support@acme.example", "boss.person@partner.example"] {
        assert!(!everything.contains(full), "reader saw {full}");
    }
    assert_eq!(meta.from, "j***@example.org");
    assert!(String::from_utf8_lossy(&raw).contains("Please reply to j***@example.org"));
    let e = reader
        .export_mailbox(ExportMailboxRequest {
            tenant: "acme".into(),
            mailbox: "inbox".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // An agent sees the full address, and an exporter can export (audited).
    let (meta, raw) = fetch(&mut agent, "acme", "inbox", uid).await.unwrap();
    assert_eq!(meta.from, ADDR);
    assert_eq!(raw, body.as_bytes());
    cluster.grant("exporter", "acme", "exporter").await;
    cluster.approve_export("exporter", "acme", "inbox").await;
    let mut ex = cluster.mailbox_as(2, "exporter").await;
    let mut s = ex
        .export_mailbox(ExportMailboxRequest {
            tenant: "acme".into(),
            mailbox: "inbox".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.raw, body.as_bytes());
    assert!(s.next().await.is_none());
    wait_audited(&cluster, "export", |r| {
        r.action == "ExportMailbox" && r.identity == "exporter" && r.result == "allowed"
    })
    .await;
    wait_audited(&cluster, "read", |r| {
        r.action == "GetMessage" && r.identity == "reader"
    })
    .await;
}

/// A grant of one role: a tenant role `(tenant, role)` or a cluster role.
fn grant_request(identity: &str, tenant: Option<(&str, &str)>, cluster: Option<&str>) -> GrantRequest {
    let role = match (tenant, cluster) {
        (Some((tenant, role)), _) => role::Role::Tenant(TenantRole {
            tenant: tenant.into(),
            role: role.into(),
        }),
        (None, Some(c)) => role::Role::Cluster(c.into()),
        (None, None) => panic!("a role is needed"),
    };
    GrantRequest {
        identity: identity.into(),
        role: Some(Role { role: Some(role) }),
    }
}

fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    s.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

fn grant_kind(req: GrantRequest) -> OperationKind {
    OperationKind {
        kind: Some(operation_kind::Kind::Grant(GrantOperation {
            identity: req.identity,
            role: req.role,
        })),
    }
}

/// Grants are two-person operations, rehearsed against the policy as it is,
/// so grants proposed one after another through different nodes compose;
/// the immediate changes (removing roles, narrowing an allowlist) made by two
/// operators at once through two nodes both land (each is a server-side
/// command, not a read-modify-write of the whole policy); preconditions are
/// checked at proposal and where a change applies, with a stable reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_compose_and_preconditions_hold() {
    let cluster = setup().await;
    for (i, req) in [
        (1, grant_request("duo", Some(("acme", "agent")), None)),
        (2, grant_request("duo", Some(("globex", "reader")), None)),
        (1, grant_request("duo", None, Some("auditor"))),
        (2, grant_request("duo", Some(("acme", "exporter")), None)),
        (1, grant_request("duo", Some(("globex", "agent")), None)),
    ] {
        let op = cluster.two_person(i, grant_kind(req), "T-100").await;
        assert_eq!(op.status, "succeeded", "{op:?}");
    }
    cluster.wait_all_applied().await;
    // Two removals at once, through two nodes: both land.
    let (a1, a2) = (cluster.admin(1).await.access, cluster.admin(2).await.access);
    let removals = [
        (a1.clone(), grant_request("duo", Some(("acme", "exporter")), None)),
        (a2.clone(), grant_request("duo", Some(("globex", "agent")), None)),
    ];
    let calls = removals.into_iter().map(|(a, req)| {
        retry(Duration::from_secs(10), move || {
            let (mut a, req) = (a.clone(), req.clone());
            async move { a.ungrant(req).await }
        })
    });
    for r in futures::future::join_all(calls).await {
        assert!(r.unwrap().into_inner().changed);
    }
    cluster.wait_all_applied().await;
    let mut a0 = cluster.admin(0).await.access;
    let p = a0
        .get_identity(GetIdentityRequest {
            identity: "duo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let roles = |t: &str| {
        let mut r = p
            .tenant_roles
            .iter()
            .find(|x| x.tenant == t)
            .map(|x| x.roles.clone())
            .unwrap_or_default();
        r.sort();
        r
    };
    assert_eq!(roles("acme"), ["agent"], "{p:?}");
    assert_eq!(roles("globex"), ["reader"], "{p:?}");
    assert_eq!(p.cluster_roles, ["auditor"], "{p:?}");

    // Removing again changes nothing and says so (a retry is safe).
    let again = a0
        .ungrant(grant_request("duo", Some(("acme", "exporter")), None))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.changed && again.before == again.after, "{again:?}");

    // A grant is never made by one operator: Access.Grant refuses, and
    // nothing changes.
    let e = a0
        .grant(grant_request("duo", Some(("acme", "reader")), None))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "TWO_PERSON_REQUIRED")
    );
    assert!(e.message().contains("second operator"), "{e:?}");
    // Proposals are rehearsed: a tenant that does not exist, a role already
    // held, an unknown role are refused at once, and nothing is proposed.
    let mut ops = cluster.admin(0).await.operations;
    let propose = |req: GrantRequest| ProposeOperationRequest {
        kind: Some(grant_kind(req)),
        reason: "T-101".into(),
        expires_in_secs: 0,
    };
    let e = ops
        .propose_operation(propose(grant_request("duo", Some(("acne", "agent")), None)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "PRECONDITION_VIOLATED")
    );
    assert!(e.message().contains("tenant acne does not exist"), "{e:?}");
    let e = ops
        .propose_operation(propose(grant_request("duo", Some(("acme", "agent")), None)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::AlreadyExists, "NOTHING_TO_DO")
    );
    let e = ops
        .propose_operation(propose(grant_request("duo", Some(("acme", "god")), None)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "INVALID_REQUEST")
    );
    let listed = ops
        .list_operations(ListOperationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert!(
        listed.iter().all(|o| o.status == "succeeded"),
        "no refused rehearsal was proposed: {listed:?}"
    );

    // An allowlist change that expected another allowlist is refused; one
    // that narrows the current one (anywhere → a network) is made at once;
    // one that widens it is two-person.
    let allow = |networks: &[&str], expected: Option<&[&str]>| SetAllowlistRequest {
        identity: "duo".into(),
        allow_from: Some(Allowlist {
            networks: networks.iter().map(|n| n.to_string()).collect(),
        }),
        expected: expected.map(|e| Allowlist {
            networks: e.iter().map(|n| n.to_string()).collect(),
        }),
    };
    let e = a0
        .set_allowlist(allow(&["127.0.0.0/8"], Some(&["10.0.0.0/8"])))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Aborted, "ALLOWLIST_CHANGED")
    );
    let ok = a0
        .set_allowlist(allow(&["127.0.0.0/8"], Some(&[])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.after.unwrap().allow_from, ["127.0.0.0/8"]);
    let ok = a0
        .set_allowlist(allow(&["127.0.0.0/16"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.after.unwrap().allow_from, ["127.0.0.0/16"], "narrowed at once");
    for wider in [&["127.0.0.0/8"][..], &["127.0.0.0/16", "10.0.0.0/8"], &[]] {
        let e = a0.set_allowlist(allow(wider, None)).await.unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::FailedPrecondition, "TWO_PERSON_REQUIRED"),
            "{wider:?}"
        );
    }

    // A revoked identity gets no new role: the rehearsal says why.
    a0.revoke_identity(RevokeIdentityRequest {
        identity: "duo".into(),
    })
    .await
    .unwrap();
    cluster.wait_all_applied().await;
    let e = ops
        .propose_operation(propose(grant_request("duo", None, Some("operator"))))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "PRECONDITION_VIOLATED")
    );
    assert!(e.message().contains("identity duo is revoked"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_on_one_node_is_enforced_by_every_node() {
    let cluster = setup().await;
    // Granted through node 2 (proposed and approved there) ...
    let req = grant_request("newhire", Some(("acme", "agent")), None);
    let op = cluster.two_person(2, grant_kind(req), "T-102").await;
    assert_eq!(op.status, "succeeded", "{op:?}");
    // ... honoured by every node.
    for i in 0..cluster.len() {
        let c = cluster.mailbox_as(i, "newhire").await;
        retry(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move {
                match status_of(&mut c, "acme").await {
                    Err(e) if e.code() == Code::PermissionDenied => {
                        Err(tonic::Status::unavailable("not yet"))
                    }
                    r => r,
                }
            }
        })
        .await
        .unwrap();
    }
    // Revoked through node 1 ...
    let mut a1 = cluster.admin(1).await.access;
    a1.revoke_identity(RevokeIdentityRequest {
        identity: "newhire".into(),
    })
    .await
    .unwrap();
    // ... refused by every node.
    for i in 0..cluster.len() {
        let c = cluster.mailbox_as(i, "newhire").await;
        let r = retry(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move {
                match status_of(&mut c, "acme").await {
                    Ok(_) => Err(tonic::Status::unavailable("still allowed")),
                    Err(e) => Ok(e),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(r.code(), Code::Unauthenticated, "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_detects_an_edited_deleted_or_reordered_record() {
    let mut cluster = setup().await;
    let mut c = cluster.mailbox(0).await;
    for n in 0..5 {
        append(
            &mut c,
            "acme",
            "inbox",
            &format!("k{n}"),
            b"Subject: s\r\n\r\nbody",
        )
        .await
        .unwrap();
        fetch(&mut c, "acme", "inbox", n + 1).await.unwrap();
    }
    wait_audited(&cluster, "reads", |r| {
        r.action == "GetMessage" && r.target == "acme/inbox/5"
    })
    .await;
    let mut auditor = cluster.admin_as(0, "auditor").await.audit;
    let v = auditor
        .verify_audit(VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok && v.records >= 10, "{v:?}");

    // Kill node 3: its state machine is back at its last flush, and the
    // offline verify says that the rest is still only in its log.
    cluster.kill(2);
    let src = cluster.data_dir(2);
    let admin_bin = mailvault_chaos::admin_binary();
    // Offline: TLS files named in the environment (as an operator's shell
    // has them) are not read, and need not exist here.
    let verify = |dir: &std::path::Path| {
        std::process::Command::new(&admin_bin)
            .env("MAILVAULT_CA", "/nonexistent/ca.pem")
            .env("MAILVAULT_CERT", "/nonexistent/client.pem")
            .env("MAILVAULT_KEY", "/nonexistent/client.key")
            .args(["--output", "json", "audit", "verify", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let crashed = verify(&src);
    let note = String::from_utf8_lossy(&crashed.stderr);
    assert!(crashed.status.success(), "{note}");
    assert!(
        note.contains("not stopped cleanly"),
        "no note on unapplied entries: {note}"
    );
    // Started (it applies them) and stopped cleanly, it holds every record.
    let applied = cluster.applied_index(0).await.unwrap();
    cluster.start_node(2);
    retry(Duration::from_secs(30), || async {
        match cluster.applied_index(2).await {
            Some(i) if i >= applied => Ok(()),
            other => Err(tonic::Status::unavailable(format!(
                "node 3 applied {other:?} of {applied}"
            ))),
        }
    })
    .await
    .unwrap();
    cluster.stop(2);
    // Then copy its data directory, and tamper with each copy offline.
    let intact = verify(&src);
    let note = String::from_utf8_lossy(&intact.stderr);
    assert!(intact.status.success(), "{note}");
    assert!(!note.contains("not stopped cleanly"), "{note}");
    for tamper in ["edit", "delete", "reorder"] {
        let dir = cluster.dir().join(format!("tampered-{tamper}"));
        copy_dir(&src, &dir);
        tamper_audit(&dir, tamper);
        let out = verify(&dir);
        assert!(!out.status.success(), "verify missed a {tamper}ed record");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\"ok\":false"), "{tamper}: {text}");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Tampers with the audit records of a stopped node's store.
fn tamper_audit(data_dir: &std::path::Path, how: &str) {
    use mailvault_node::state::audit::AuditRecord as Rec;
    use mailvault_node::state::codec::{decode, encode};
    use mailvault_node::state::keys;
    let db = mailvault_node::store::open_state_dir(data_dir).unwrap();
    let cf = db.cf_handle(mailvault_node::store::CF_SM).unwrap();
    let get = |seq: u64| decode::<Rec>(&db.get_cf(cf, keys::audit(seq)).unwrap().unwrap()).unwrap();
    match how {
        "edit" => {
            let mut r = get(3);
            r.event.identity = "someone-innocent".into();
            db.put_cf(cf, keys::audit(3), encode(&r)).unwrap();
        }
        "delete" => db.delete_cf(cf, keys::audit(4)).unwrap(),
        "reorder" => {
            let (mut a, mut b) = (get(2), get(5));
            std::mem::swap(&mut a.seq, &mut b.seq);
            db.put_cf(cf, keys::audit(2), encode(&b)).unwrap();
            db.put_cf(cf, keys::audit(5), encode(&a)).unwrap();
        }
        _ => unreachable!(),
    }
    db.flush_cf(cf).unwrap();
}
