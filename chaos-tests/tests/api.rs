//! The mailbox API against a real cluster: bad input gets the right status and
//! stores nothing; claims, conditional flags, moves, expunges and watches behave.

use std::time::Duration;

use mailvault_chaos::*;
use mailvault_proto::v1::append_message_request::Frame;
use mailvault_proto::v1::*;
use tokio_stream::StreamExt;
use tonic::Code;

const T: &str = "acme";
const M: &str = "support";

async fn cluster_with_mailbox(max: u64) -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        max_message_bytes: max,
        ..Default::default()
    })
    .await;
    create_tenant_and_mailbox(&cluster, 0, T, M).await;
    cluster
}

async fn count(c: &mut mailvault_proto::v1::mailbox_client::MailboxClient<tonic::transport::Channel>) -> u64 {
    c.get_mailbox_status(GetMailboxStatusRequest {
        tenant: T.into(),
        mailbox: M.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_stores_nothing() {
    let cluster = cluster_with_mailbox(2 * 1024 * 1024).await;
    let body = test_message("s", "a@b.example", "m", 1000);
    for i in 0..cluster.len() {
        let mut c = cluster.mailbox(i).await;
        // Unknown tenant and mailbox.
        let e = append(&mut c, "nobody", M, "k", &body).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "node {i}: {e:?}");
        let e = append(&mut c, T, "nowhere", "k", &body).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "node {i}: {e:?}");
        let e = fetch(&mut c, T, M, 999).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = c
            .list_mailboxes(ListMailboxesRequest {
                tenant: "nobody".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        // Over-size, declared and undeclared (staged chunks are dropped again).
        let big = vec![b'x'; 3 * 1024 * 1024];
        let e = append(&mut c, T, M, "big", &big).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "node {i}: {e:?}");
        let mut frames = append_frames(T, M, "big2", b"x");
        if let Some(Frame::Header(h)) = &mut frames[0].frame {
            h.size = 100 * 1024 * 1024;
        }
        let e = c.append_message(tokio_stream::iter(frames)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);

        // Malformed and out-of-order frames.
        let chunk_first = vec![AppendMessageRequest {
            frame: Some(Frame::Chunk(b"hello".to_vec())),
        }];
        let e = c
            .append_message(tokio_stream::iter(chunk_first))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "node {i}: {e:?}");
        let mut two_headers = append_frames(T, M, "k2", &body);
        two_headers.push(two_headers[0].clone());
        let e = c
            .append_message(tokio_stream::iter(two_headers))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = c
            .append_message(tokio_stream::iter(append_frames(T, M, "k3", b"")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "empty message");
        let e = append(&mut c, T, M, "", &body).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "missing idempotency key");
        let e = append(&mut c, T, "bad\0name", "k", &body).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let mut wrong_size = append_frames(T, M, "k4", &body);
        if let Some(Frame::Header(h)) = &mut wrong_size[0].frame {
            h.size = 5;
        }
        let e = c
            .append_message(tokio_stream::iter(wrong_size))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = c
            .append_message(tokio_stream::iter(vec![AppendMessageRequest { frame: None }]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            count(&mut c).await,
            0,
            "node {i}: a rejected append stored something"
        );
    }
    // A rejected key is still free to use afterwards.
    let mut c = cluster.mailbox(0).await;
    let ok = append(&mut c, T, M, "big", &body).await.unwrap();
    assert!(!ok.duplicate);
    assert_eq!(count(&mut c).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_race_has_exactly_one_winner_and_flags_are_conditional() {
    let cluster = cluster_with_mailbox(50 * 1024 * 1024).await;
    let mut c = cluster.mailbox(0).await;
    let body = test_message("help", "a@b.example", "m", 1000);
    let uid = append(&mut c, T, M, "k", &body).await.unwrap().uid;

    let mut racers = Vec::new();
    for agent in 0..6 {
        let mut c = cluster.mailbox(agent % cluster.len()).await;
        racers.push(tokio::spawn(async move {
            c.claim_message(ClaimMessageRequest {
                tenant: T.into(),
                mailbox: M.into(),
                uid,
                agent: format!("agent-{agent}"),
            })
            .await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for r in racers {
        match r.await.unwrap() {
            Ok(resp) => winners.push(resp.into_inner().claimed_by),
            Err(s) => losers.push(s),
        }
    }
    assert_eq!(winners.len(), 1, "winners {winners:?}, losers {losers:?}");
    for s in &losers {
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains(&winners[0]),
            "the loser is told the owner: {s:?}"
        );
    }
    // Only the owner can release.
    let e = c
        .release_claim(ReleaseClaimRequest {
            tenant: T.into(),
            mailbox: M.into(),
            uid,
            agent: "someone-else".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.release_claim(ReleaseClaimRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uid,
        agent: winners[0].clone(),
    })
    .await
    .unwrap();

    // Conditional flag update: a stale MODSEQ fails, a current one succeeds.
    let (meta, _) = fetch(&mut c, T, M, uid).await.unwrap();
    let upd = |since: u64, flag: &str| UpdateFlagsRequest {
        tenant: T.into(),
        mailbox: M.into(),
        uid,
        add: vec![flag.into()],
        remove: vec![],
        unchanged_since: Some(since),
    };
    let r = c
        .update_flags(upd(meta.modseq, "\\Answered"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.modseq > meta.modseq);
    assert_eq!(r.flags, vec!["\\Answered".to_string()]);
    let e = c.update_flags(upd(meta.modseq, "$Escalated")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .claim_message(ClaimMessageRequest {
            tenant: T.into(),
            mailbox: M.into(),
            uid: 4242,
            agent: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_expunges_and_watches_keep_uids_and_modseqs_monotonic() {
    let cluster = cluster_with_mailbox(50 * 1024 * 1024).await;
    let mut c = cluster.mailbox(1).await;
    retry(Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            c.create_mailbox(CreateMailboxRequest {
                tenant: T.into(),
                mailbox: "archive".into(),
            })
            .await
        }
    })
    .await
    .unwrap();
    let mut uids = Vec::new();
    for n in 0..4 {
        let body = test_message(&format!("m{n}"), "a@b.example", "x", 1500 * 1024 * (n % 2) + 100);
        uids.push(append(&mut c, T, M, &format!("k{n}"), &body).await.unwrap().uid);
    }
    assert_eq!(uids, vec![1, 2, 3, 4]);

    // A watcher from MODSEQ 0 sees every append, in order.
    let mut w = c
        .watch_mailbox(WatchMailboxRequest {
            tenant: T.into(),
            mailbox: M.into(),
            since_modseq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(w.next().await.unwrap().unwrap());
    }
    assert_eq!(seen.iter().map(|c| c.uid).collect::<Vec<_>>(), uids);
    assert!(seen.windows(2).all(|p| p[0].modseq < p[1].modseq));

    // Move a multi-chunk message; its bytes survive re-encryption.
    let (_, before) = fetch(&mut c, T, M, 2).await.unwrap();
    let moved = c
        .move_message(MoveMessageRequest {
            tenant: T.into(),
            mailbox: M.into(),
            uid: 2,
            destination: "archive".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, after) = fetch(&mut c, T, "archive", moved.uid).await.unwrap();
    assert_eq!(before, after);
    assert_eq!(fetch(&mut c, T, M, 2).await.unwrap_err().code(), Code::NotFound);

    // The live watcher sees the move-out as an expunge.
    let ch = w.next().await.unwrap().unwrap();
    assert_eq!((ch.uid, ch.kind), (2, ChangeKind::Expunged as i32));
    let resume_from = ch.modseq;
    drop(w);

    let r = c
        .expunge_messages(ExpungeMessagesRequest {
            tenant: T.into(),
            mailbox: M.into(),
            uids: vec![1, 3, 99],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.expunged, vec![1, 3]);

    // A new UID is never a reused one.
    let body = test_message("new", "a@b.example", "x", 100);
    let uid = append(&mut c, T, M, "k-new", &body).await.unwrap().uid;
    assert_eq!(uid, 5);

    // A reconnecting watcher resumes after its last MODSEQ with no gap, on another node.
    let mut other = cluster.mailbox(2).await;
    let mut w = other
        .watch_mailbox(WatchMailboxRequest {
            tenant: T.into(),
            mailbox: M.into(),
            since_modseq: resume_from,
        })
        .await
        .unwrap()
        .into_inner();
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(w.next().await.unwrap().unwrap());
    }
    assert_eq!(rest[0].modseq, resume_from + 1);
    assert_eq!(
        rest.iter().map(|c| (c.uid, c.kind)).collect::<Vec<_>>(),
        vec![
            (1, ChangeKind::Expunged as i32),
            (3, ChangeKind::Expunged as i32),
            (5, ChangeKind::Appended as i32)
        ]
    );
    let status = c
        .get_mailbox_status(GetMailboxStatusRequest {
            tenant: T.into(),
            mailbox: M.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.messages, status.uidnext), (2, 6));
}

/// `mailvault-admin` against node 1 as `identity`.
fn admin_cli(cluster: &Cluster, identity: &str) -> tokio::process::Command {
    cluster.admin_command(&cluster.client_addr(0), identity).into()
}

/// Runs `mailvault-admin --output json bench ARGS` as `identity`; its JSON report.
async fn admin_bench(cluster: &Cluster, identity: &str, args: &[&str]) -> serde_json::Value {
    let out = admin_cli(cluster, identity)
        .args(["--output", "json", "bench"])
        .args(args)
        .output()
        .await
        .expect("run mailvault-admin");
    assert!(
        out.status.success(),
        "mailvault-admin bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// `mailvault-admin bench` against a real cluster: it stores the count it
/// was given and reports it, with fsyncs per append from the ops endpoints
/// it is given or (`--ops auto`, for an operator) finds, and the reason when
/// it has none. A tenant identity makes at most the one denied call it asked
/// for, so benchmarking does not lock the front end out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bench_stores_what_it_reports_and_says_why_fsyncs_are_missing() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, "bench", "inbox").await;
    // The bootstrap operator may read the cluster status; give it the tenant too.
    cluster.grant(ADMIN, "bench", "tenant-admin").await;
    let inbox = || async {
        cluster
            .mailbox(0)
            .await
            .get_mailbox_status(GetMailboxStatusRequest {
                tenant: "bench".into(),
                mailbox: "inbox".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .messages
    };
    let ops = (0..cluster.len())
        .map(|i| cluster.ops_addr(i))
        .collect::<Vec<_>>()
        .join(",");
    let load = ["--clients", "4", "--size", "2048", "--count", "40"];
    let fsyncs = |r: &serde_json::Value| {
        assert_eq!(
            (r["workload"].as_str(), r["ops"].as_u64(), r["errors"].as_u64()),
            (Some("append"), Some(40), Some(0)),
            "{r}"
        );
        (
            r["fsyncs_per_append_all_nodes"].as_f64(),
            r["fsyncs_unavailable"].as_str().map(str::to_owned),
        )
    };

    // Every acknowledged append was synced by the leader and a follower at
    // least, one sync shared by at most the 4 appends in flight: >= 0.5.
    let r = admin_bench(&cluster, ADMIN, &[&load[..], &["--ops", "auto"]].concat()).await;
    let (f, why) = fsyncs(&r);
    assert!(f.is_some_and(|f| f >= 0.5) && why.is_none(), "{r}");
    assert_eq!(inbox().await, 40);

    // The front end's identity has tenant roles only: the ops endpoints given
    // need none, without them there are no fsyncs, and `auto` is refused.
    let r = admin_bench(&cluster, FRONTEND, &[&load[..], &["--ops", &ops]].concat()).await;
    let (f, why) = fsyncs(&r);
    assert!(f.is_some_and(|f| f >= 0.5) && why.is_none(), "{r}");
    let r = admin_bench(&cluster, FRONTEND, &load).await;
    let (f, why) = fsyncs(&r);
    assert!(
        f.is_none() && why.is_some_and(|w| w.contains("not measured")),
        "{r}"
    );
    let r = admin_bench(&cluster, FRONTEND, &[&load[..], &["--ops", "auto"]].concat()).await;
    let (f, why) = fsyncs(&r);
    assert!(
        f.is_none() && why.is_some_and(|w| w.contains("operator or auditor cluster role")),
        "{r}"
    );
    assert_eq!(inbox().await, 160);

    // A missing tenant: the front end may not create it, and says so.
    let out = admin_cli(&cluster, FRONTEND)
        .args(["bench", "--tenant", "nosuch", "--count", "1"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("tenant nosuch does not exist"),
        "{err}"
    );

    // Two denied calls in all: the front end is not locked out.
    let r = admin_bench(&cluster, FRONTEND, &load).await;
    fsyncs(&r);
    assert_eq!(inbox().await, 200);
}

/// Every node names its background workers and their state, in the cluster
/// status (for `mailvault-admin status`) and in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_reports_its_workers_in_status_and_metrics() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let expected = [
        "wal-sync",
        "held-back-commits",
        "snapshot-schedule",
        "proposer",
        "audit-recorder",
        "raft-listener",
        "raft-watch",
        "leadership-placement",
        "audit-follower",
        "backup-schedule",
        "operation-executor",
        "member-watch",
        "repair",
        "housekeeping",
        "client-listener",
        "ops-listener",
    ];
    for i in 0..cluster.len() {
        let s = cluster.node_status(i).await;
        let names: Vec<_> = s.workers.iter().map(|w| w.name.as_str()).collect();
        for name in expected {
            assert!(names.contains(&name), "node {i} lacks worker {name}: {names:?}");
        }
        for w in &s.workers {
            assert_eq!((w.state.as_str(), w.detail.as_str()), ("running", ""), "{w:?}");
            assert!(w.since_ms > 0);
        }
        let page = scrape_metrics(&cluster.ops_addr(i)).await.unwrap();
        for name in expected {
            let line = format!("mailvault_worker_up{{worker=\"{name}\"}} 1");
            assert!(page.contains(&line), "node {i}: no {line:?} in /metrics");
        }
    }
    let out = cluster
        .admin_command(&cluster.client_addr(0), ADMIN)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("{} running", expected.len())), "{text}");
}
