//! A front end tells failures apart by the `google.rpc.ErrorInfo` of the
//! status (the rich error model), not by parsing messages: the reasons of
//! `proto/mailvault/v1/errors.proto`, each with its documented code.

use std::net::IpAddr;
use std::time::Duration;

use mailvault_chaos::*;
use mailvault_proto::v1::append_message_request::Frame;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::*;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const T: &str = "acme";
const M: &str = "support";

/// The reason of a status as a front end reads it, checked against its code.
fn reason(e: &Status) -> (Code, String) {
    let info = e
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {e:?}"));
    assert_eq!(info.domain, "mailvault", "{e:?}");
    let known = ErrorReason::from_str_name(&info.reason);
    assert!(known.is_some(), "{} is not an ErrorReason", info.reason);
    (e.code(), info.reason)
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_end_reads_a_stable_reason_for_every_kind_of_failure() {
    let mut cluster = Cluster::start(ClusterOptions {
        max_message_bytes: 2 * 1024 * 1024,
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    let body = test_message("s", "a@b.example", "m", 1000);
    // On a follower too: a forwarded call's reason reaches the caller.
    for i in 0..cluster.len() {
        let mut c = cluster.mailbox(i).await;
        let e = append(&mut c, "nobody", M, "k", &body).await.unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::NotFound, "TENANT_NOT_FOUND".into()),
            "node {i}"
        );
        let e = append(&mut c, T, "nowhere", "k", &body).await.unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::NotFound, "MAILBOX_NOT_FOUND".into()),
            "node {i}"
        );
        let e = fetch(&mut c, T, M, 999).await.unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::NotFound, "MESSAGE_NOT_FOUND".into()),
            "node {i}"
        );
        let e = append(&mut c, T, M, "big", &vec![b'x'; 3 * 1024 * 1024])
            .await
            .unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::ResourceExhausted, "MESSAGE_TOO_LARGE".into()),
            "node {i}"
        );
        let max = e.get_details_error_info().unwrap().metadata["max_bytes"].clone();
        assert_eq!(max, (2 * 1024 * 1024).to_string());
        let mut two_headers = append_frames(T, M, "k2", &body);
        two_headers.push(two_headers[0].clone());
        let e = c
            .append_message(tokio_stream::iter(two_headers))
            .await
            .unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::InvalidArgument, "DUPLICATE_STREAM_HEADER".into()),
            "node {i}"
        );
        let chunk_first = vec![AppendMessageRequest {
            frame: Some(Frame::Chunk(b"hello".to_vec())),
        }];
        let e = c
            .append_message(tokio_stream::iter(chunk_first))
            .await
            .unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::InvalidArgument, "STREAM_HEADER_MISSING".into()),
            "node {i}"
        );
        let e = append(&mut c, T, "bad\0name", "k", &body).await.unwrap_err();
        assert_eq!(
            reason(&e),
            (Code::InvalidArgument, "INVALID_NAME".into()),
            "node {i}"
        );
    }

    // The loser of a claim race.
    let mut c = cluster.mailbox(1).await;
    let uid = append(&mut c, T, M, "claimed", &body).await.unwrap().uid;
    let claim = |agent: &str| ClaimMessageRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uid,
        agent: agent.into(),
    };
    c.claim_message(claim("ann")).await.unwrap();
    let e = c.claim_message(claim("bob")).await.unwrap_err();
    assert_eq!(
        reason(&e),
        (Code::FailedPrecondition, "CLAIMED_BY_ANOTHER_AGENT".into())
    );
    assert_eq!(e.get_details_error_info().unwrap().metadata["claimed_by"], "ann");

    // An identity without a role on the tenant, until it is locked out.
    let mut mallory = MailboxClient::new(cluster.channel_as(0, "mallory", ip("127.0.4.1")));
    let status = |c: &mut MailboxClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.get_mailbox_status(GetMailboxStatusRequest {
                tenant: T.into(),
                mailbox: M.into(),
            })
            .await
        }
    };
    for _ in 0..5 {
        let e = status(&mut mallory).await.unwrap_err();
        assert_eq!(reason(&e), (Code::PermissionDenied, "NO_TENANT_ROLE".into()));
    }
    let mut elsewhere = MailboxClient::new(cluster.channel_as(1, "mallory", ip("127.0.4.2")));
    let e = retry(Duration::from_secs(20), || {
        let mut c = elsewhere.clone();
        async move {
            match status(&mut c).await {
                Err(e) if e.code() == Code::PermissionDenied && e.message().contains("locked out") => Ok(e),
                Err(e) if e.code() == Code::PermissionDenied => Err(Status::unavailable("not yet applied")),
                other => panic!("mallory got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(reason(&e), (Code::PermissionDenied, "LOCKED_OUT".into()));
    let _ = &mut elsewhere;

    // A write the leader cannot commit: its outcome is unknown.
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let mut c = cluster.mailbox(leader).await;
    let followers: Vec<usize> = (0..cluster.len()).filter(|&i| i != leader).collect();
    for &f in &followers {
        cluster.pause(f);
    }
    let e = append(&mut c, T, M, "unknown-outcome", &body).await.unwrap_err();
    for &f in &followers {
        cluster.resume(f);
    }
    assert_eq!(
        reason(&e),
        (Code::Unavailable, "WRITE_OUTCOME_UNKNOWN".into()),
        "{e:?}"
    );
    // Retrying with the same key is safe: one message, whatever happened.
    let again = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        let body = body.clone();
        async move { append(&mut c, T, M, "unknown-outcome", &body).await }
    })
    .await
    .unwrap();
    // Leadership may still be settling after the pause: the listing is retried.
    let listed = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { list_all(&mut c, T, M).await }
    })
    .await
    .unwrap();
    assert_eq!(listed.iter().filter(|m| m.uid == again.uid).count(), 1);
    assert_eq!(
        listed.len(),
        2,
        "the claimed message and the retried one: {listed:?}"
    );
}
