//! Starting, killing and restarting node processes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailvault_node::tls::devcerts::DevCa;

use crate::disk::LoopFs;
use mailvault_proto::v1::access_client::AccessClient;
use mailvault_proto::v1::audit_client::AuditClient;
use mailvault_proto::v1::backups_client::BackupsClient;
use mailvault_proto::v1::cluster_client::ClusterClient;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::operations_client::OperationsClient;
use mailvault_proto::v1::tenants_client::TenantsClient;
use mailvault_proto::v1::NodeStatusRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Knobs for a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes (node 1 active, 2 standby, 3 backup, further ones standby).
    pub nodes: usize,
    /// `raft.snapshot_every`.
    pub snapshot_every: u64,
    /// `limits.max_message_bytes`.
    pub max_message_bytes: u64,
    /// `audit.fail_closed`.
    pub audit_fail_closed: bool,
    /// Unsafe test modes for every node (`MAILVAULT_TEST_MODES`), empty for none.
    pub test_modes: String,
    /// When non-zero, every node's data directory is a loop-mounted ext4 of
    /// this many MiB (for power cuts and full disks; needs root).
    pub loop_fs_mb: u64,
    /// Run every node under libfaketime, its wall clock set by
    /// [`Cluster::set_clock`] (monotonic time stays real).
    pub fake_clock: bool,
    /// Keep the production Raft timing (heartbeat and election timeouts of
    /// the node's defaults) instead of the faster timing of test clusters.
    pub production_timing: bool,
    /// Extra TOML lines for every node's `[raft]` table (tuning experiments).
    /// Defaults to `MAILVAULT_CHAOS_EXTRA_RAFT`, so that any test can be run
    /// with a setting that is not the default (each line ends in `\n`).
    pub extra_raft: String,
    /// TOML lines for every node's `[backup]` table (each ends in `\n`);
    /// empty: the node's defaults (one backup an hour, which no test waits for).
    pub backup: String,
    /// The master key as 64 hex characters; empty: a random one.
    pub master_key: String,
    /// Start the nodes (else only their directories and configs are made,
    /// e.g. for a restore into them; then [`Cluster::start_all`]).
    pub start_nodes: bool,
    /// Further nodes, after the initial members, that start with a `[join]`
    /// setting in these roles (`spare`, `dr`, `standby`…) and wait to be
    /// added by a two-person add-node operation. A `dr` node's region is
    /// `dc2`, every other node's `dc1`.
    pub joining: Vec<String>,
    /// TOML lines for every node's `[heal]` table (each ends in `\n`).
    pub heal: String,
    /// Further TOML lines for every node's `[limits]` table (each ends in `\n`).
    pub limits: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            snapshot_every: 5000,
            max_message_bytes: 50 * 1024 * 1024,
            audit_fail_closed: false,
            test_modes: String::new(),
            loop_fs_mb: 0,
            fake_clock: false,
            production_timing: false,
            extra_raft: std::env::var("MAILVAULT_CHAOS_EXTRA_RAFT")
                .map(|s| s.replace("\\n", "\n"))
                .unwrap_or_default(),
            backup: String::new(),
            master_key: String::new(),
            start_nodes: true,
            joining: Vec::new(),
            heal: String::new(),
            limits: String::new(),
        }
    }
}

struct NodeProc {
    id: u64,
    ip: String,
    dir: PathBuf,
    child: Option<Child>,
    fs: Option<LoopFs>,
}

/// A running test cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<NodeProc>,
    ca: DevCa,
    ca_pem: String,
    test_modes: String,
    fake_clock: bool,
}

/// The identity [`Cluster::admin`] uses: a bootstrap operator.
pub const ADMIN: &str = "admin";
/// The second bootstrap operator, who approves what [`ADMIN`] proposes.
pub const ADMIN2: &str = "admin2";
/// The identity [`Cluster::mailbox`] uses: tenant-admin on every tenant.
pub const FRONTEND: &str = "frontend";

/// The `mailvault-node` binary: `$MAILVAULT_NODE_BIN`, or beside the test binary.
pub fn node_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MAILVAULT_NODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("mailvault-node");
    assert!(
        bin.exists(),
        "{} not built; run the tests through cargo",
        bin.display()
    );
    bin
}

/// The harness's node binary with the unsafe test modes compiled in
/// (`mailvault-node-test-modes`, package `chaos-tests/test-node`), beside
/// `mailvault-node`: used only for nodes started with test modes.
pub fn test_modes_node_binary() -> PathBuf {
    let bin = node_binary().with_file_name("mailvault-node-test-modes");
    assert!(
        bin.exists(),
        "{} not built; run the tests through cargo",
        bin.display()
    );
    bin
}

/// libfaketime's preload library, if installed.
pub fn libfaketime() -> Option<PathBuf> {
    [
        // The thread-safe variant: nodes are multi-threaded.
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The `mailvault-admin` binary, beside `mailvault-node`.
pub fn admin_binary() -> PathBuf {
    node_binary().with_file_name("mailvault-admin")
}

/// A random `127.a.b` prefix, so clusters started at once never share an address.
pub fn random_base() -> String {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).expect("random");
    format!("127.{}.{}", 1 + b[0] % 250, 1 + b[1] % 250)
}

const CLIENT_PORT: u16 = 7101;
const RAFT_PORT: u16 = 7201;
const OPS_PORT: u16 = 7301;

impl Cluster {
    /// Starts a cluster and waits until it has a leader.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("mailvault-test")
            .tempdir()
            .expect("tempdir");
        let key = dir.path().join("master.key");
        let hex = match opts.master_key.is_empty() {
            false => opts.master_key.clone(),
            true => {
                let mut hex = [0u8; 32];
                getrandom::fill(&mut hex).expect("random");
                hex.iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        std::fs::write(&key, hex).expect("write key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let base = random_base();
        let total = (opts.nodes + opts.joining.len()) as u64;
        let mut nodes: Vec<NodeProc> = (1..=total)
            .map(|id| NodeProc {
                id,
                ip: format!("{base}.{}", 10 + id),
                dir: dir.path().join(format!("node{id}")),
                child: None,
                fs: None,
            })
            .collect();
        let mut members = String::new();
        let joiner_role =
            |id: u64| (id as usize > opts.nodes).then(|| opts.joining[id as usize - opts.nodes - 1].clone());
        for n in nodes.iter().filter(|n| joiner_role(n.id).is_none()) {
            let role = match n.id {
                1 => "active",
                3 => "backup",
                _ => "standby",
            };
            members.push_str(&format!(
                "[members.{id}]\nrole = \"{role}\"\nclient_addr = \"{ip}:{CLIENT_PORT}\"\nraft_addr = \"{ip}:{RAFT_PORT}\"\nops_addr = \"{ip}:{OPS_PORT}\"\n\n",
                id = n.id,
                ip = n.ip
            ));
        }
        let ca = DevCa::new("test CA").expect("CA");
        ca.pems.save(dir.path(), "ca").expect("write CA");
        for n in &mut nodes {
            std::fs::create_dir_all(&n.dir).expect("node dir");
            if opts.loop_fs_mb > 0 {
                let image = dir.path().join(format!("node{}.img", n.id));
                let fs = LoopFs::create(&image, &n.dir.join("data"), opts.loop_fs_mb)
                    .expect("loop-mounted data directory (needs root and loop devices)");
                n.fs = Some(fs);
            }
            let ip: std::net::IpAddr = n.ip.parse().expect("ip");
            ca.node(n.id, &[ip])
                .expect("node cert")
                .save(&n.dir, "node")
                .expect("write node cert");
            let (region, membership) = match joiner_role(n.id) {
                None => ("dc1", members.clone()),
                Some(role) => (
                    if role == "dr" { "dc2" } else { "dc1" },
                    format!(
                        "[join]\nrole = \"{role}\"\nclient_addr = \"{ip}:{CLIENT_PORT}\"\nraft_addr = \"{ip}:{RAFT_PORT}\"\nops_addr = \"{ip}:{OPS_PORT}\"\n\n",
                        ip = n.ip
                    ),
                ),
            };
            let cfg = format!(
                "node_id = {id}\nregion = \"{region}\"\ndata_dir = \"{data}\"\nclient_listen = \"{ip}:{CLIENT_PORT}\"\nraft_listen = \"{ip}:{RAFT_PORT}\"\nops_listen = \"{ip}:{OPS_PORT}\"\nmaster_key_file = \"{key}\"\nlog = \"info,openraft=warn\"\n\n[tls]\nca_file = \"{ca}\"\ncert_file = \"{nd}/node.pem\"\nkey_file = \"{nd}/node.key\"\n\n[access]\noperators = [\"{ADMIN}\", \"{ADMIN2}\"]\n\n[audit]\nfail_closed = {fail_closed}\n\n[heal]\n{heal}\n{membership}[raft]\n{timing}{extra}snapshot_every = {snap}\n\n[limits]\nmax_message_bytes = {max}\n{limits}\n[backup]\n{backup}",
                id = n.id,
                data = n.dir.join("data").display(),
                ip = n.ip,
                key = key.display(),
                snap = opts.snapshot_every,
                extra = opts.extra_raft,
                backup = opts.backup,
                max = opts.max_message_bytes,
                ca = dir.path().join("ca.pem").display(),
                nd = n.dir.display(),
                fail_closed = opts.audit_fail_closed,
                heal = opts.heal,
                limits = opts.limits,
                timing = match opts.production_timing {
                    true => "",
                    false => "heartbeat_ms = 100\nelection_timeout_min_ms = 800\nelection_timeout_max_ms = 1600\n",
                },
            );
            std::fs::write(n.dir.join("node.toml"), cfg).expect("write config");
        }
        let ca_pem = ca.pems.cert.clone();
        let mut c = Cluster {
            dir,
            nodes,
            ca,
            ca_pem,
            test_modes: opts.test_modes.clone(),
            fake_clock: opts.fake_clock,
        };
        if c.fake_clock {
            for i in 0..c.nodes.len() {
                c.set_clock(i, "+0");
            }
        }
        if !opts.start_nodes {
            return c;
        }
        c.start_all().await;
        c.grant(FRONTEND, "*", "tenant-admin").await;
        c
    }

    /// Starts every node and waits until the cluster has a leader.
    pub async fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_node(i);
        }
        self.wait_for_leader(Duration::from_secs(30)).await;
    }

    /// The master key file every node reads.
    pub fn master_key_file(&self) -> PathBuf {
        self.dir.path().join("master.key")
    }

    /// Node `i`'s config file.
    pub fn config_file(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("node.toml")
    }

    /// Grants `identity` a tenant role: a two-person operation, proposed by
    /// [`ADMIN`] and approved by [`ADMIN2`] through node 0; returns once
    /// every node applied it.
    pub async fn grant(&self, identity: &str, tenant: &str, role: &str) {
        use mailvault_proto::v1::{role, Role, TenantRole};
        let role = Role {
            role: Some(role::Role::Tenant(TenantRole {
                tenant: tenant.into(),
                role: role.into(),
            })),
        };
        self.grant_role(identity, role).await;
    }

    /// Grants `identity` a cluster role (`operator`, `auditor`), as
    /// [`Cluster::grant`] does.
    pub async fn grant_cluster_role(&self, identity: &str, role: &str) {
        use mailvault_proto::v1::{role, Role};
        let role = Role {
            role: Some(role::Role::Cluster(role.into())),
        };
        self.grant_role(identity, role).await;
    }

    async fn grant_role(&self, identity: &str, role: mailvault_proto::v1::Role) {
        use mailvault_proto::v1::{operation_kind::Kind, GrantOperation, OperationKind};
        let kind = OperationKind {
            kind: Some(Kind::Grant(GrantOperation {
                identity: identity.into(),
                role: Some(role),
            })),
        };
        let op = self.two_person(0, kind, "test setup").await;
        assert_eq!(op.status, "succeeded", "the grant ran: {op:?}");
        self.wait_all_applied().await;
    }

    /// Approves, as a two-person operation, `exporter`'s export of one
    /// mailbox for the next hour; returns once every node applied it.
    pub async fn approve_export(&self, exporter: &str, tenant: &str, mailbox: &str) {
        use mailvault_proto::v1::{operation_kind::Kind, ExportOperation, OperationKind};
        let until_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + 3_600_000;
        let kind = OperationKind {
            kind: Some(Kind::Export(ExportOperation {
                exporter: exporter.into(),
                tenant: tenant.into(),
                mailbox: mailbox.into(),
                until_ms,
            })),
        };
        let op = self.two_person(0, kind, "test setup").await;
        assert_eq!(op.status, "succeeded", "the export approval ran: {op:?}");
        self.wait_all_applied().await;
    }

    /// Takes a backup through node 0 (`Backups.TakeBackup`, retried while
    /// no node holds the duty yet, as right after a start): the backup once
    /// verified and recorded.
    pub async fn take_backup(&self) -> mailvault_proto::v1::Backup {
        let b = self.admin(0).await.backups;
        crate::client::retry(Duration::from_secs(60), || {
            let mut b = b.clone();
            async move { b.take_backup(mailvault_proto::v1::TakeBackupRequest {}).await }
        })
        .await
        .expect("take a backup")
        .into_inner()
        .backup
        .expect("a backup")
    }

    /// Restores mailbox `from` of `tenant` in backup `backup` (an id, or
    /// `latest`) as `into`, the way operators do: proposed with
    /// `mailvault-admin backup restore-mailbox … --reason` as [`ADMIN`],
    /// approved by [`ADMIN2`] through node `i`. The operation once it ended,
    /// or the CLI's refusal of the proposal.
    pub async fn restore_mailbox(
        &self,
        i: usize,
        backup: &str,
        tenant: &str,
        from: &str,
        into: &str,
    ) -> Result<mailvault_proto::v1::Operation, String> {
        let args = [
            "backup",
            "restore-mailbox",
            backup,
            "--tenant",
            tenant,
            "--mailbox",
            from,
            "--as",
            into,
            "--reason",
            "test: restore a mailbox",
        ];
        let (ok, proposed, err) = tokio::task::block_in_place(|| self.admin_json(i, &args));
        if !ok {
            return Err(err);
        }
        let (id, hash) = (
            proposed["id"].as_str().expect("an operation id"),
            proposed["plan_hash"].as_str().expect("a plan hash"),
        );
        assert_eq!(proposed["status"], "proposed", "{proposed}");
        self.approve(i, ADMIN2, id, hash)
            .await
            .expect("approve the restore");
        Ok(self.wait_operation_ended(i, id).await)
    }

    /// Where [`Cluster::restore_offline`] keeps its plan.
    pub fn restore_plan_file(&self) -> PathBuf {
        self.dir.path().join("restore-plan.json")
    }

    /// Every node's config file.
    pub fn config_files(&self) -> Vec<PathBuf> {
        (0..self.len()).map(|i| self.config_file(i)).collect()
    }

    /// Builds the data directories of the (stopped) nodes whose `configs`
    /// are given from `backup` (an id or `latest`) in the store `from`,
    /// offline, the way two operators
    /// do: rehearsed and signed by `proposer` (`backup restore --plan-out`),
    /// signed by `approver` (`backup approve-restore --yes --plan-hash`),
    /// then run (`backup restore --plan`), each with this cluster's
    /// certificates. Whether every stage succeeded, the last stage's JSON,
    /// and the first failing stage's stderr.
    pub fn restore_offline(
        &self,
        from: &str,
        backup: &str,
        configs: &[PathBuf],
        proposer: &str,
        approver: &str,
    ) -> (bool, serde_json::Value, String) {
        let plan = self.restore_plan_file();
        let plan = plan.to_str().expect("a UTF-8 path");
        let _ = std::fs::remove_file(plan);
        let configs: Vec<String> = configs.iter().map(|c| c.display().to_string()).collect();
        let mut rehearse = vec![
            "backup",
            "restore",
            "--from",
            from,
            "--backup",
            backup,
            "--reason",
            "test: restore",
            "--plan-out",
            plan,
        ];
        for c in &configs {
            rehearse.extend(["--config", c.as_str()]);
        }
        let (ok, planned, err) = self.admin_json_as(0, proposer, &rehearse);
        if !ok {
            return (false, planned, err);
        }
        let hash = planned["plan_hash"].as_str().expect("a plan hash").to_string();
        let (ok, signed, err) = self.admin_json_as(
            0,
            approver,
            &["backup", "approve-restore", plan, "--yes", "--plan-hash", &hash],
        );
        if !ok {
            return (false, signed, err);
        }
        let mut run = vec!["backup", "restore", "--plan", plan];
        for c in &configs {
            run.extend(["--config", c.as_str()]);
        }
        self.admin_json_as(0, proposer, &run)
    }

    /// Runs one two-person operation through node `i`: proposed by
    /// [`ADMIN`], approved by [`ADMIN2`]; returns it once it ended.
    pub async fn two_person(
        &self,
        i: usize,
        kind: mailvault_proto::v1::OperationKind,
        reason: &str,
    ) -> mailvault_proto::v1::Operation {
        use mailvault_proto::v1::ProposeOperationRequest;
        let a = self.admin(i).await;
        let proposed = crate::client::retry(Duration::from_secs(20), || {
            let mut a = a.operations.clone();
            let req = ProposeOperationRequest {
                kind: Some(kind.clone()),
                reason: reason.into(),
                expires_in_secs: 0,
            };
            async move { a.propose_operation(req).await }
        })
        .await
        .expect("propose")
        .into_inner();
        self.approve(i, ADMIN2, &proposed.id, &proposed.plan_hash)
            .await
            .expect("approve");
        self.wait_operation_ended(i, &proposed.id).await
    }

    /// Approves operation `id` as `identity` through node `i`, signing
    /// `plan_hash` with the key of `identity`'s certificate.
    pub async fn approve(
        &self,
        i: usize,
        identity: &str,
        id: &str,
        plan_hash: &str,
    ) -> Result<mailvault_proto::v1::Operation, tonic::Status> {
        let (cert, key) = self.identity_files(identity);
        let message = mailvault_proto::approval::message(id, plan_hash);
        let signature = mailvault_proto::approval::sign(&key, &cert, &message).expect("sign the approval");
        let a = self.admin_as(i, identity).await;
        crate::client::retry(Duration::from_secs(20), || {
            let mut a = a.operations.clone();
            let req = mailvault_proto::v1::ApproveOperationRequest {
                id: id.into(),
                plan_hash: plan_hash.into(),
                certificate: cert.clone(),
                signature: signature.clone(),
            };
            async move { a.approve_operation(req).await }
        })
        .await
        .map(|r| r.into_inner())
    }

    /// Issues `identity` a certificate on `owner`'s key (two identities
    /// sharing one key), written where [`Cluster::tls_for`] finds it.
    pub fn issue_on_key_of(&self, identity: &str, owner: &str) {
        let (_, key) = self.identity_files(owner);
        self.ca
            .client_with_key(identity, std::str::from_utf8(&key).expect("a PEM key"))
            .expect("client cert on a shared key")
            .save(self.dir.path(), &format!("client-{identity}"))
            .expect("write client cert");
    }

    /// The whole audit log, read through node `i` as `auditor` (who must
    /// hold the auditor role).
    pub async fn audit_records(&self, i: usize, auditor: &str) -> Vec<mailvault_proto::v1::AuditRecord> {
        let mut a = self.admin_as(i, auditor).await.audit;
        a.list_audit(mailvault_proto::v1::ListAuditRequest {
            from_seq: 1,
            limit: 100_000,
        })
        .await
        .expect("list the audit log")
        .into_inner()
        .records
    }

    /// `identity`'s certificate (DER) and private key (PEM), issued on first use.
    pub fn identity_files(&self, identity: &str) -> (Vec<u8>, Vec<u8>) {
        let _ = self.tls_for(identity);
        let read = |ext: &str| {
            std::fs::read(self.dir.path().join(format!("client-{identity}.{ext}"))).expect("read cert")
        };
        let cert = mailvault_proto::approval::certificate_der(&read("pem")).expect("a certificate");
        (cert, read("key"))
    }

    /// Waits (up to 60 s) until operation `id` ended, as node `i` sees it.
    pub async fn wait_operation_ended(&self, i: usize, id: &str) -> mailvault_proto::v1::Operation {
        let a = self.admin(i).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = crate::client::retry(Duration::from_secs(20), || {
                let mut a = a.operations.clone();
                let req = mailvault_proto::v1::GetOperationRequest { id: id.into() };
                async move { a.get_operation(req).await }
            })
            .await
            .expect("get the operation")
            .into_inner();
            if !matches!(got.status.as_str(), "proposed" | "approved" | "executing") {
                return got;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("operation {id} did not end: {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node has applied what the most advanced
    /// one has (a follower authorizes from its own copy of the policies, so
    /// a change made through the leader reaches it a heartbeat later).
    pub async fn wait_all_applied(&self) {
        let mut target = 0;
        for i in 0..self.len() {
            target = target.max(self.applied_index(i).await.unwrap_or(0));
        }
        for i in (0..self.len()).filter(|&i| self.nodes[i].child.is_some()) {
            if !self.is_member(i).await {
                continue;
            }
            crate::client::retry(Duration::from_secs(20), || async move {
                match self.applied_index(i).await {
                    Some(a) if a >= target => Ok(()),
                    other => Err(tonic::Status::unavailable(format!(
                        "node {} applied {other:?} of {target}",
                        i + 1
                    ))),
                }
            })
            .await
            .expect("every running node applies the change");
        }
    }

    /// Waits (at most a minute) until the state digests of the listed
    /// nodes agree at one applied index.
    pub async fn wait_same_digest(&self, nodes: &[usize]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut seen = Vec::new();
            for &i in nodes {
                let mut a = self.admin(i).await.cluster;
                if let Ok(d) = a.state_digest(mailvault_proto::v1::StateDigestRequest {}).await {
                    let d = d.into_inner();
                    seen.push((d.applied_index, d.sha256));
                }
            }
            if seen.len() == nodes.len() && seen.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "digests differ: {seen:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Whether node `i` says it is a member (not waiting to be added, not
    /// removed); a node that does not answer counts as one.
    pub async fn is_member(&self, i: usize) -> bool {
        let mut a = self.admin(i).await;
        let mut req = tonic::Request::new(NodeStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        match a.cluster.node_status(req).await {
            Ok(s) => s.into_inner().membership == "member",
            Err(_) => true,
        }
    }

    /// The cluster's CA (to issue more certificates).
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// TLS config presenting a certificate for `identity` (issued and cached on first use).
    pub fn tls_for(&self, identity: &str) -> ClientTlsConfig {
        let cert = self.dir.path().join(format!("client-{identity}.pem"));
        if !cert.exists() {
            self.ca
                .client(identity)
                .expect("client cert")
                .save(self.dir.path(), &format!("client-{identity}"))
                .expect("write client cert");
        }
        let read = |ext: &str| {
            std::fs::read(self.dir.path().join(format!("client-{identity}.{ext}"))).expect("read cert")
        };
        self.tls_with(Identity::from_pem(read("pem"), read("key")))
    }

    /// A `mailvault-admin` command against `endpoint` as `identity` (its
    /// certificate written on first use), trusting the cluster CA.
    pub fn admin_command(&self, endpoint: &str, identity: &str) -> std::process::Command {
        let _ = self.tls_for(identity);
        let d = self.dir.path();
        let mut c = std::process::Command::new(admin_binary());
        c.arg("--endpoint")
            .arg(endpoint)
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .arg("--cert")
            .arg(d.join(format!("client-{identity}.pem")))
            .arg("--key")
            .arg(d.join(format!("client-{identity}.key")));
        c
    }

    /// Runs `mailvault-admin --output json ARGS` against node `i` as the
    /// bootstrap operator: whether it succeeded, its JSON (null if none),
    /// its stderr.
    pub fn admin_json(&self, i: usize, args: &[&str]) -> (bool, serde_json::Value, String) {
        self.admin_json_as(i, ADMIN, args)
    }

    /// Like [`Cluster::admin_json`], as `identity`.
    pub fn admin_json_as(
        &self,
        i: usize,
        identity: &str,
        args: &[&str],
    ) -> (bool, serde_json::Value, String) {
        let out = self
            .admin_command(&self.client_addr(i), identity)
            .args(["--output", "json"])
            .args(args)
            .output()
            .expect("run mailvault-admin");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
        (
            out.status.success(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// TLS config presenting `identity`, trusting the cluster CA.
    pub fn tls_with(&self, identity: Identity) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(identity)
    }

    /// A channel to node `i`'s client listener as `identity`, from `local` if given.
    pub fn channel_as(&self, i: usize, identity: &str, local: Option<std::net::IpAddr>) -> Channel {
        crate::client::lazy_channel(&self.client_addr(i), self.tls_for(identity), local)
    }

    /// Node `i`'s Raft peer address.
    pub fn raft_addr(&self, i: usize) -> String {
        format!("{}:{RAFT_PORT}", self.nodes[i].ip)
    }

    /// A mailbox client for node `i` as `identity`.
    pub async fn mailbox_as(&self, i: usize, identity: &str) -> MailboxClient<Channel> {
        MailboxClient::new(self.channel_as(i, identity, None))
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// The operator services' clients for node `i` as `identity`.
    pub async fn admin_as(&self, i: usize, identity: &str) -> Admin {
        Admin::new(self.channel_as(i, identity, None))
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The cluster's temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    /// Node `i`'s client address.
    pub fn client_addr(&self, i: usize) -> String {
        format!("{}:{CLIENT_PORT}", self.nodes[i].ip)
    }

    /// Node `i`'s ops address.
    pub fn ops_addr(&self, i: usize) -> String {
        format!("{}:{OPS_PORT}", self.nodes[i].ip)
    }

    /// Starts (or restarts) node `i`.
    pub fn start_node(&mut self, i: usize) {
        if self.exited(i).is_some() {
            self.nodes[i].child = None;
        }
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} already running", n.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("node.log"))
            .expect("node log");
        // The shipped binary, unless the test asks for unsafe modes.
        let mut cmd = match self.test_modes.is_empty() {
            true => Command::new(node_binary()),
            false => Command::new(test_modes_node_binary()),
        };
        if self.fake_clock {
            let lib = libfaketime().expect("libfaketime (Debian package `faketime`) not installed");
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", n.dir.join("faketime"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        let child = cmd
            .env(mailvault_node::test_modes::ENV, &self.test_modes)
            .arg("--config")
            .arg(n.dir.join("node.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn mailvault-node");
        n.child = Some(child);
    }

    /// Sets the unsafe test modes of nodes started from now on.
    pub fn set_test_modes(&mut self, modes: &str) {
        self.test_modes = modes.to_string();
    }

    /// Stops every node (SIGTERM, then SIGKILL after 10 s) and starts them
    /// again with the current test modes; waits for a leader.
    pub async fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
        for i in 0..self.nodes.len() {
            self.start_node(i);
        }
        self.wait_for_leader(Duration::from_secs(30)).await;
    }

    /// Stops node `i` gracefully (SIGTERM; SIGKILL if it has not exited within 10 s).
    pub fn stop(&mut self, i: usize) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let Some(mut c) = self.nodes[i].child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Cuts node `i`'s power: kills it and throws away every write its
    /// filesystem had not synced. Needs `loop_fs_mb`. Start it again after.
    pub fn power_cut(&mut self, i: usize) {
        self.kill(i);
        self.nodes[i]
            .fs
            .as_mut()
            .expect("power cuts need ClusterOptions::loop_fs_mb")
            .power_cut()
            .expect("power cut");
    }

    /// Sets node `i`'s wall clock (needs `fake_clock`), in libfaketime's
    /// syntax: `+0` is real time, `-90s x1.5` 90 s behind and running 1.5×.
    /// Takes effect within a second, without a restart.
    pub fn set_clock(&self, i: usize, spec: &str) {
        std::fs::write(self.nodes[i].dir.join("faketime"), format!("{spec}\n")).expect("write faketime spec");
    }

    /// Node `i`'s data filesystem, when it has one of its own.
    pub fn data_fs(&self, i: usize) -> Option<&LoopFs> {
        self.nodes[i].fs.as_ref()
    }

    /// Node `i`'s own loopback address (its listeners and its peer traffic).
    pub fn ip(&self, i: usize) -> std::net::Ipv4Addr {
        self.nodes[i].ip.parse().expect("node ip")
    }

    /// A name for this cluster, unique among clusters running at once.
    pub fn tag(&self) -> String {
        self.nodes[0].ip.replace('.', "_")
    }

    /// Stops node `i`'s process with SIGSTOP (it keeps its sockets, answers nothing).
    pub fn pause(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused node `i` run again (SIGCONT).
    pub fn resume(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&mut self, i: usize, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.nodes[i].child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Kills node `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            // A paused process dies of SIGKILL too; SIGCONT is harmless otherwise.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Node `i`'s process id, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }

    /// How node `i`'s process ended, if it ended by itself (not killed by the harness).
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// A mailbox client for node `i` as [`FRONTEND`].
    pub async fn mailbox(&self, i: usize) -> MailboxClient<Channel> {
        self.mailbox_as(i, FRONTEND).await
    }

    /// The operator services' clients for node `i` as [`ADMIN`].
    pub async fn admin(&self, i: usize) -> Admin {
        self.admin_as(i, ADMIN).await
    }

    /// Index of the node every running node agrees leads, waiting up to `timeout`.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader_now().await {
                return l;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn leader_now(&mut self) -> Option<usize> {
        let mut leader = None;
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                continue;
            }
            let mut a = self.admin(i).await;
            let mut req = tonic::Request::new(NodeStatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            let s = a.cluster.node_status(req).await.ok()?.into_inner();
            if s.membership == "waiting" || s.membership == "removed" {
                continue;
            }
            if !s.has_leader {
                return None;
            }
            let idx = self.nodes.iter().position(|n| n.id == s.leader_id)?;
            if leader.is_some_and(|l| l != idx) {
                return None;
            }
            leader = Some(idx);
        }
        leader.filter(|&l| self.nodes[l].child.is_some())
    }

    /// Node `i`'s status (panics if it does not answer).
    pub async fn node_status(&self, i: usize) -> mailvault_proto::v1::NodeStatusResponse {
        let mut a = self.admin(i).await;
        a.cluster
            .node_status(NodeStatusRequest {})
            .await
            .unwrap_or_else(|e| panic!("NodeStatus of node {}: {e:?}", i + 1))
            .into_inner()
    }

    /// Node `i`'s applied index.
    pub async fn applied_index(&self, i: usize) -> Option<u64> {
        let mut a = self.admin(i).await;
        Some(
            a.cluster
                .node_status(NodeStatusRequest {})
                .await
                .ok()?
                .into_inner()
                .applied_index,
        )
    }

    /// Prints the tail of every node's log (for failing tests).
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(n.dir.join("node.log")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            // A panic's message comes before its backtrace, which can push
            // it out of the tail: print it first.
            for (i, l) in lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.contains("panicked at"))
            {
                eprintln!("----- node {} panicked -----\n{l}", n.id);
                for l in lines.iter().skip(i + 1).take(3) {
                    eprintln!("{l}");
                }
            }
            eprintln!("----- node {} log (last 40 lines) -----", n.id);
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        // `MAILVAULT_CHAOS_KEEP_LOGS=<dir>` keeps every node's log, for a
        // run that passed but looked wrong (the temp dir goes below).
        if let Some(keep) = std::env::var_os("MAILVAULT_CHAOS_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            for n in &self.nodes {
                let _ = std::fs::copy(n.dir.join("node.log"), keep.join(format!("node{}.log", n.id)));
            }
        }
        // Unmount before the temp directory is removed.
        for n in &mut self.nodes {
            n.fs.take();
        }
    }
}

/// Clients of the operator services (cluster, tenants, access, audit, backups) on one
/// channel, as one identity.
#[derive(Clone)]
pub struct Admin {
    /// Status, digest, snapshots.
    pub cluster: ClusterClient<Channel>,
    /// Tenants.
    pub tenants: TenantsClient<Channel>,
    /// Roles, allowlists, revocation.
    pub access: AccessClient<Channel>,
    /// The audit log.
    pub audit: AuditClient<Channel>,
    /// Backups.
    pub backups: BackupsClient<Channel>,
    /// Two-person operations.
    pub operations: OperationsClient<Channel>,
}

impl Admin {
    /// The clients over `ch`.
    pub fn new(ch: Channel) -> Admin {
        Admin {
            cluster: ClusterClient::new(ch.clone()),
            tenants: TenantsClient::new(ch.clone()),
            access: AccessClient::new(ch.clone()),
            audit: AuditClient::new(ch.clone()),
            backups: BackupsClient::new(ch.clone()),
            operations: OperationsClient::new(ch),
        }
    }
}
