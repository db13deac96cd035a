//! `run()`: the node's boot sequence, which reads like a boot log:
//! config → master key → store → raft → bootstrap → listeners → shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mailvault_proto::raft::raft_peer_server::RaftPeerServer;
use mailvault_proto::v1::access_server::AccessServer;
use mailvault_proto::v1::audit_server::AuditServer;
use mailvault_proto::v1::backups_server::BackupsServer;
use mailvault_proto::v1::cluster_server::ClusterServer;
use mailvault_proto::v1::mailbox_server::MailboxServer;
use mailvault_proto::v1::operations_server::OperationsServer;
use mailvault_proto::v1::tenants_server::TenantsServer;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::TcpListener;
use tonic_reflection::server::v1::ServerReflectionServer;

use crate::access::rules::{HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA};
use crate::access::{follow_audit_log, AccessLayer, Against, Denials, Gate, Lockout, REFUSED};
use crate::api::{
    AccessService, AuditService, BackupsService, ClusterService, MailboxService, OperationsService,
    TenantsService,
};
use crate::audit::AuditRecorder;
use crate::backups::{run_schedule, Backups, BackupsParts, Offsite};
use crate::config::Config;
use crate::crypto::{Keyring, MasterKey};
use crate::ctx::Ctx;
use crate::forward::Router;
use crate::proposer::Proposer;
use crate::raft::{
    bootstrap_if_fresh, place_leadership, raft_config, resend_held_back_commits, schedule_snapshots,
    snapshot_schedule, PeerClients, PeerNetwork, PeerService, ReadBarrier, ReadFence, PEER_MAX_MESSAGE_BYTES,
};
use crate::state::types::Raft;
use crate::store::{LogStore, MailReader, StateMachine};
use crate::test_modes::TestModes;
use crate::tls::{accept_loop, client_tls, server_config, CertIdentity, HandshakeFailure, Peer};
use crate::workers::{Kind, Supervisor};

/// How long the workers get to stop by themselves at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Runs a node until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let id = config.node_id;
    tracing::info!(
        node = id,
        role = config.me().role.as_str(),
        "starting mailvault-node"
    );

    let test_modes = TestModes::from_env()?;
    if test_modes.any() {
        tracing::error!(
            ?test_modes,
            "UNSAFE TEST MODES ACTIVE: never run this node in production"
        );
    }
    let master = MasterKey::load(&config.master_key_file)?;
    let keyring = Keyring::new(&master);
    drop(master);
    tracing::info!("master key loaded");

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let stores = crate::store::open(&config.data_dir)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let (db, state) = (stores.log, stores.state);
    // Before anything reads the store: refuse a newer data version, upgrade an older one.
    let found = crate::store::data_version::upgrade(&state.get(), &keyring)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    tracing::info!(
        found = ?found,
        data_version = crate::state::version::DATA_VERSION,
        "data version checked"
    );
    let workers = Supervisor::new();
    let mut log_store = LogStore::supervised(db.clone(), config.raft.log_cache_mib << 20, &workers)?;
    #[cfg(feature = "test-modes")]
    if test_modes.ack_before_fsync {
        log_store = log_store.without_append_sync();
    }
    if config.raft.pipeline_leader_fsync {
        log_store = log_store.with_leader_pipelining(id);
    }
    #[cfg(feature = "test-modes")]
    if test_modes.slow_leader_sync {
        log_store = log_store.with_leader_sync_delay(
            crate::test_modes::SLOW_LEADER_SYNC,
            config.data_dir.join(crate::test_modes::SLOW_LEADER_SYNC_FILE),
        );
    }
    let durability = log_store.durability();
    let state_machine =
        StateMachine::open(state.clone(), keyring.clone(), &config.data_dir.join("snapshots"))?
            .applying_synced(durability.clone());
    let applied = state_machine.applied_index();
    let audit_changes = state_machine.audit_changes();
    tracing::info!(applied = *applied.borrow(), "store opened");

    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;

    let server_tls = server_config(&config.tls).context("cannot load the TLS certificates")?;
    let local = Some(config.raft_listen.ip()).filter(|ip| !ip.is_unspecified());
    let peers = PeerClients::new(
        client_tls(&config.tls).context("cannot load the TLS certificates")?,
        local,
    );
    tracing::info!("certificates loaded");
    let health = {
        let (cert_pem, key_pem) = config
            .tls
            .identity_pem()
            .context("cannot load the TLS certificates")?;
        let cert_der = mailvault_proto::approval::certificate_der(&cert_pem)
            .map_err(|e| anyhow::anyhow!("cannot read this node's certificate: {e}"))?;
        let d = durability.clone();
        crate::raft::Health::new(
            id,
            crate::raft::health::SelfInfo {
                cluster_name: config.cluster_name.clone(),
                member: crate::state::Member::from(config.me()),
                region: config.region.clone(),
                data_dir: config.data_dir.clone(),
                cert_der,
                key_pem,
            },
            Duration::from_secs(config.heal.down_after_secs),
            Arc::new(move || d.sync_failures()),
        )
    };
    let raft = Raft::new(
        id,
        Arc::new(raft_config(&config)?),
        PeerNetwork::new(peers.clone(), durability.clone()),
        log_store,
        state_machine.clone(),
    )
    .await?;
    let r = raft.clone();
    workers.spawn("held-back-commits", Kind::Background, async move {
        resend_held_back_commits(r, durability).await;
        Ok(())
    });
    let (r, schedule, sm) = (raft.clone(), snapshot_schedule(&config), state_machine.clone());
    workers.spawn("snapshot-schedule", Kind::Background, async move {
        schedule_snapshots(r, sm, schedule).await;
        Ok(())
    });
    // Listen for peers before bootstrapping, so the first election can reach us.
    let raft_listener = bind(config.raft_listen, "raft").await?;
    let client_listener = bind(config.client_listen, "client").await?;
    let ops_listener = bind(config.ops_listen, "ops").await?;

    let proposer = Proposer::start(
        raft.clone(),
        config.raft.max_batch_bytes,
        config.raft.max_batches_in_flight,
        Duration::from_millis(config.limits.write_timeout_ms),
        &workers,
    );
    let audit = AuditRecorder::start(
        id,
        raft.clone(),
        proposer.clone(),
        peers.clone(),
        config.audit.fail_closed,
        &workers,
    );
    let lockout = Lockout::new(
        id,
        config.access.lockout_threshold,
        Duration::from_secs(config.access.lockout_minutes * 60),
    );
    let denials = Denials::new(lockout.clone(), audit.clone());
    let reader = MailReader::new(state.clone(), keyring.binding().clone());

    let fence = ReadFence::new(raft.clone());
    let handover = {
        let p = proposer.clone();
        let writes: crate::raft::HoldWrites = Arc::new(move |d| match d {
            Some(d) => p.hold_for(d),
            None => p.release(),
        });
        crate::raft::Handover::new(
            raft.clone(),
            peers.clone(),
            fence.clone(),
            writes,
            Duration::from_millis(config.raft.election_timeout_min_ms),
            Duration::from_millis(config.raft.election_timeout_max_ms),
        )
    };
    let peer_svc = RaftPeerServer::new(PeerService::new(
        raft.clone(),
        proposer.clone(),
        fence.clone(),
        state_machine.clone(),
        reader.clone(),
        health.clone(),
    ))
    .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
    .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES);
    // The peer listener admits node certificates only.
    let peer_incoming = {
        let (denials, reader) = (denials.clone(), reader.clone());
        accept_loop(
            raft_listener,
            server_tls.clone(),
            move |peer: &Peer| match peer.identity {
                CertIdentity::Node(_) if !reader.serial_revoked(&peer.serial).unwrap_or(true) => Ok(()),
                CertIdentity::Node(_) => Err("node certificate revoked".into()),
                CertIdentity::User(_) => Err("only node certificates may use the peer listener".into()),
            },
            // Not counted towards lockout: a node whose certificate lapsed must
            // not get its address locked out of the client listeners too.
            move |f| record_refused(&denials, "raft-peer-connect", false, f),
        )
    };
    let stop = workers.stopping();
    workers.spawn_graceful("raft-listener", Kind::Essential, async move {
        tonic::transport::Server::builder()
            // openraft gives an AppendEntries call one heartbeat interval and
            // then drops it, which resets its HTTP/2 stream. Past h2's default
            // of 20 pending reset streams the whole peer connection is torn
            // down, so a slow follower (lossy link, one-way partition) would
            // lose its connection again and again.
            .http2_max_pending_accept_reset_streams(Some(10_000))
            .add_service(peer_svc)
            .serve_with_incoming_shutdown(peer_incoming, stop)
            .await
            .context("raft listener failed")
    });

    if bootstrap_if_fresh(&raft, &config).await? {
        tracing::info!("bootstrapped a fresh cluster");
    }

    let reads = ReadBarrier::new(
        id,
        raft.clone(),
        fence,
        peers.clone(),
        applied.clone(),
        test_modes.stale_reads,
    );
    let offsite = Offsite::open(&config.offsite_url(), &config.backup)
        .context("cannot open the off-site backup store")?;
    let backups = Backups::new(BackupsParts {
        id,
        cluster: config.cluster_name.clone(),
        config: config.backup.clone(),
        root: config.backup_dir(),
        state: state.clone(),
        keyring: keyring.clone(),
        raft: raft.clone(),
        proposer: proposer.clone(),
        peers: peers.clone(),
        audit: audit.clone(),
        reader: reader.clone(),
        offsite,
        pause_backup: test_modes
            .pause_backup
            .then(|| config.data_dir.join(crate::test_modes::PAUSE_BACKUP_FILE)),
        pause_restore: test_modes
            .pause_restore
            .then(|| config.data_dir.join(crate::test_modes::PAUSE_RESTORE_FILE)),
    });
    let (b, r) = (backups.clone(), reads.clone());
    workers.spawn("backup-schedule", Kind::Background, async move {
        run_schedule(b, r).await;
        Ok(())
    });
    let ctx = Arc::new(Ctx {
        id,
        config: config.clone(),
        raft: raft.clone(),
        reader: reader.clone(),
        keyring,
        proposer,
        router: Router::new(id, raft.clone(), peers.clone(), health.clone()),
        reads,
        applied,
        audit: audit.clone(),
        gate: Gate {
            reader: reader.clone(),
            denials: denials.clone(),
            audit: audit.clone(),
            operators: config.access.operators.clone().into(),
            unaudited_reads: test_modes.unaudited_reads,
            member: {
                let router = Router::new(id, raft.clone(), peers.clone(), health.clone());
                Arc::new(move || router.check_member())
            },
        },
        backups,
        damage: crate::damage::DamageReport::new(id, audit.clone()),
        workers: workers.clone(),
        peers: peers.clone(),
        health: health.clone(),
        handover: handover.clone(),
        test_modes,
    });
    workers.spawn("raft-watch", Kind::Essential, watch_leader(raft.clone()));
    if config.access.operators.len() < 2 {
        tracing::warn!(
            operators = config.access.operators.len(),
            "fewer than two bootstrap operators ([access] operators): no two-person operation can be \
             approved until a second operator is configured"
        );
    }
    workers.spawn(
        "operation-executor",
        Kind::Background,
        crate::operations::run_executor(ctx.clone()),
    );
    workers.spawn("repair", Kind::Background, crate::repair::run(ctx.clone()));
    workers.spawn(
        "housekeeping",
        Kind::Background,
        crate::housekeeping::run(ctx.clone()),
    );
    // Every node watches the members; its own part in elections follows the membership.
    let (h, r, p, me_removed) = (health.clone(), raft.clone(), peers.clone(), reader.clone());
    let probe_every = Duration::from_millis(config.heal.probe_every_ms);
    workers.spawn("member-watch", Kind::Background, async move {
        let removed: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || {
            me_removed
                .member_record(id)
                .ok()
                .flatten()
                .is_some_and(|r| r.removed.is_some())
        });
        crate::raft::health::run(h, r, p, probe_every, removed).await;
        Ok(())
    });
    // Leadership returns to the active node; a backup campaigns only as a last resort.
    let (h, r) = (health.clone(), raft.clone());
    let role: crate::raft::RoleNow = Arc::new(move || {
        if h.removed() {
            return None;
        }
        let m = r.metrics().borrow().membership_config.clone();
        let m = m.membership();
        m.voter_ids()
            .any(|v| v == id)
            .then(|| m.get_node(&id).map(|n| n.role))
            .flatten()
    });
    let r = raft.clone();
    let election_timeout = Duration::from_millis(config.raft.election_timeout_max_ms);
    let held_by = reader.clone();
    let hold: crate::raft::Hold = Arc::new(move || {
        held_by
            .leadership_pin()
            .ok()
            .flatten()
            .filter(|p| p.until_ms > crate::clock::now_ms())
            .map(|p| p.node)
    });
    let placement_peers = peers.clone();
    workers.spawn("leadership-placement", Kind::Background, async move {
        place_leadership(id, role, r, placement_peers, handover, election_timeout, hold).await;
        Ok(())
    });
    // Lockouts and failures recorded by other nodes reach this one through
    // the audit log; those of the last period are replayed before serving.
    let follow_from = lockout
        .replay(&ctx.reader)
        .context("cannot replay recent lockouts from the audit log")?;
    let (l, r, a) = (lockout.clone(), ctx.reader.clone(), audit.clone());
    workers.spawn("audit-follower", Kind::Background, async move {
        follow_audit_log(l, r, a, audit_changes, follow_from).await;
        Ok(())
    });

    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<MailboxServer<MailboxService>>()
        .await;
    let (reflection, reflection_v1alpha) = reflection()?;
    let max = ctx.max_frame();
    let mailbox = MailboxServer::new(MailboxService::new(ctx.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let cluster = ClusterServer::new(ClusterService::new(ctx.clone()));
    let tenants = TenantsServer::new(TenantsService::new(ctx.clone()));
    let access_api = AccessServer::new(AccessService::new(ctx.clone()));
    let audit_api = AuditServer::new(AuditService::new(ctx.clone()));
    let backups_api = BackupsServer::new(BackupsService::new(ctx.clone()));
    let operations_api = OperationsServer::new(OperationsService::new(ctx.clone()));
    // The client listener admits any certificate of the cluster CA that names
    // an identity; the access layer then decides per call. No address is
    // refused before its handshake: a lockout of an address (after failed
    // authentications) must not keep out the authenticated callers and the
    // nodes behind it.
    let client_incoming = {
        let d = denials.clone();
        accept_loop(
            client_listener,
            server_tls,
            |_| Ok(()),
            move |f| record_refused(&d, "client-connect", true, f),
        )
    };
    let access = AccessLayer::new(ctx.gate.clone());
    let stop = workers.stopping();
    workers.spawn_graceful("client-listener", Kind::Essential, async move {
        tonic::transport::Server::builder()
            .layer(access)
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(mailbox)
            .add_service(cluster)
            .add_service(tenants)
            .add_service(access_api)
            .add_service(audit_api)
            .add_service(backups_api)
            .add_service(operations_api)
            .serve_with_incoming_shutdown(client_incoming, stop)
            .await
            .context("client listener failed")
    });

    let ops = crate::ops::router(ctx.clone(), prometheus);
    let stop = workers.stopping();
    workers.spawn_graceful("ops-listener", Kind::Essential, async move {
        axum::serve(ops_listener, ops)
            .with_graceful_shutdown(stop)
            .await
            .context("ops listener failed")
    });
    tracing::info!(
        client = %config.client_listen,
        raft = %config.raft_listen,
        ops = %config.ops_listen,
        "serving"
    );

    let res = tokio::select! {
        _ = shutdown => {
            tracing::info!("shutdown requested");
            Ok(())
        }
        why = workers.essential_ended() => {
            tracing::error!(why = %why, "stopping: an essential worker ended");
            Err(anyhow::anyhow!("stopping: {why}"))
        }
    };
    workers
        .shutdown(SHUTDOWN_GRACE, async {
            raft.shutdown().await.ok();
        })
        .await;
    // Nothing applies any more. State-machine writes bypass the WAL, and
    // RocksDB flushes them on close only if the database is dropped before
    // the process exits, which the log syncer thread can outlive: flush here,
    // so a cleanly stopped node's data directory holds all it applied.
    if let Err(e) = crate::store::flush_state(&state) {
        tracing::warn!(error = %e, "flushing the state machine at shutdown failed; the log replays it");
    }
    tracing::info!("stopped");
    res
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Counts leader changes for `/metrics` and logs them. Ends with an error
/// when Raft stops by itself (a storage write or read failed, e.g. a full
/// disk): the node then exits non-zero, as a crash-only service should, so
/// its supervisor restarts it rather than leaving a member that answers but
/// can do nothing.
async fn watch_leader(raft: Raft) -> anyhow::Result<()> {
    let mut rx = raft.metrics();
    let mut last = None;
    loop {
        let (leader, running) = {
            let m = rx.borrow_and_update();
            (m.current_leader, m.running_state.clone())
        };
        if let Err(fatal) = running {
            anyhow::bail!("raft stopped: {fatal}");
        }
        if leader != last {
            metrics::counter!("mailvault_leader_changes_total").increment(1);
            tracing::info!(leader = ?leader, "leader changed");
            last = leader;
        }
        if rx.changed().await.is_err() {
            anyhow::bail!("raft stopped");
        }
    }
}

/// Audits a refused connection and, with `count`, counts it against its
/// source (and identity).
fn record_refused(denials: &Denials, action: &'static str, count: bool, f: HandshakeFailure) {
    let identity = f
        .peer
        .as_ref()
        .map(|p| p.identity.to_string())
        .unwrap_or_else(|| "-".into());
    tracing::warn!(source = %f.addr, reason = %f.reason, "connection refused");
    metrics::counter!("mailvault_connections_refused_total").increment(1);
    let denials = denials.clone();
    tokio::spawn(async move {
        let source = Some(f.addr.ip());
        if !count {
            let result = format!("{REFUSED}{}", f.reason);
            denials.refuse(&identity, source, action, &result).await;
        } else if denials.address_locked_until(source).is_some() {
            denials.refuse_locked(&identity, source, action).await;
        } else {
            // A failed authentication: counted against the address.
            denials
                .deny(&identity, source, action, "-", &f.reason, Against::Address)
                .await;
        }
    });
}

/// gRPC server reflection for the client port, in both versions common tools
/// use (`v1` and `v1alpha`): it lists exactly what that port serves — the
/// `mailvault.v1` services, health and reflection — and describes their
/// types; the peer protocol, served only on the Raft port, is not in it.
#[allow(clippy::type_complexity)]
fn reflection() -> anyhow::Result<(
    ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        let names = mailvault_proto::CLIENT_API_SERVICES.iter().copied().chain([
            HEALTH_SERVICE,
            REFLECTION_V1,
            REFLECTION_V1ALPHA,
        ]);
        names.fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(mailvault_proto::CLIENT_API_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name),
        )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
