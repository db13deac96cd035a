//! A 3-member etcd cluster (Debian's `etcd-server` 3.4) on loopback, durable
//! (etcd always fsyncs its WAL before acknowledging), with TLS between
//! members and mutual TLS for clients, like mailvault. Each member has its
//! own loopback address; every process is killed and the directory removed
//! on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use mailvault_node::tls::devcerts::DevCa;
use mailvault_proto::etcd::kv_client::KvClient;
use mailvault_proto::etcd::maintenance_client::MaintenanceClient;
use mailvault_proto::etcd::{PutRequest, StatusRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::load::{value, Target};

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
const METRICS_PORT: u16 = 2381;

/// A running etcd cluster.
pub struct Etcd {
    dir: tempfile::TempDir,
    ips: Vec<Ipv4Addr>,
    procs: Vec<Option<Child>>,
    tls: ClientTlsConfig,
}

/// The etcd binary, if installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Etcd {
    /// Starts `n` members and waits until they have a leader.
    pub async fn start(n: usize) -> anyhow::Result<Etcd> {
        binary().context("etcd is not installed (Debian package `etcd-server`)")?;
        let dir = tempfile::Builder::new()
            .prefix("mailvault-bench-etcd")
            .tempdir()?;
        let base = crate::cluster::random_base();
        let ips: Vec<Ipv4Addr> = (0..n)
            .map(|i| format!("{base}.{}", 20 + i).parse())
            .collect::<Result<_, _>>()?;
        let ca = DevCa::new("bench etcd CA")?;
        ca.pems.save(dir.path(), "ca")?;
        for (i, ip) in ips.iter().enumerate() {
            ca.node(i as u64 + 1, &[(*ip).into()])?
                .save(dir.path(), &format!("m{i}"))?;
        }
        let client = ca.client("bench")?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.pems.cert))
            .identity(Identity::from_pem(&client.cert, &client.key));
        let mut e = Etcd {
            dir,
            ips,
            procs: (0..n).map(|_| None).collect(),
            tls,
        };
        for i in 0..n {
            e.start_member(i)?;
        }
        e.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(e)
    }

    fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let d = self.dir.path();
        let cluster: Vec<String> = self
            .ips
            .iter()
            .enumerate()
            .map(|(j, ip)| format!("m{j}=https://{ip}:{PEER_PORT}"))
            .collect();
        let ip = self.ips[i];
        let f = |name: &str| d.join(name).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(format!("m{i}.log")))?;
        let child = Command::new(binary().context("etcd")?)
            .args(["--name", &format!("m{i}")])
            .args(["--data-dir", &f(&format!("m{i}.data"))])
            .args(["--listen-client-urls", &format!("https://{ip}:{CLIENT_PORT}")])
            .args(["--advertise-client-urls", &format!("https://{ip}:{CLIENT_PORT}")])
            .args(["--listen-peer-urls", &format!("https://{ip}:{PEER_PORT}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("https://{ip}:{PEER_PORT}"),
            ])
            .args(["--listen-metrics-urls", &format!("http://{ip}:{METRICS_PORT}")])
            .args(["--initial-cluster", &cluster.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "bench",
            ])
            .args([
                "--cert-file",
                &f(&format!("m{i}.pem")),
                "--key-file",
                &f(&format!("m{i}.key")),
            ])
            .args(["--trusted-ca-file", &f("ca.pem"), "--client-cert-auth"])
            .args([
                "--peer-cert-file",
                &f(&format!("m{i}.pem")),
                "--peer-key-file",
                &f(&format!("m{i}.key")),
            ])
            .args(["--peer-trusted-ca-file", &f("ca.pem"), "--peer-client-cert-auth"])
            // 1 MiB values need more than the default 1.5 MiB request limit's margin,
            // and the runs write gigabytes.
            .args([
                "--max-request-bytes",
                "4194304",
                "--quota-backend-bytes",
                "8589934592",
            ])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start etcd")?;
        self.procs[i] = Some(child);
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// A channel to member `i`'s client port.
    pub fn channel(&self, i: usize) -> Channel {
        Channel::from_shared(format!("https://{}:{CLIENT_PORT}", self.ips[i]))
            .expect("valid uri")
            .tls_config(self.tls.clone())
            .expect("tls config")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect_lazy()
    }

    /// The member every running member names as leader, if they agree.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = vec![0u64; self.len()];
        let mut leader = None;
        for (i, id) in ids.iter_mut().enumerate() {
            if self.procs[i].is_none() {
                continue;
            }
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            let s = MaintenanceClient::new(self.channel(i))
                .status(req)
                .await
                .ok()?
                .into_inner();
            *id = s.header.map(|h| h.member_id).unwrap_or(0);
            if s.leader == 0 || leader.is_some_and(|l| l != s.leader) {
                return None;
            }
            leader = Some(s.leader);
        }
        let leader = leader?;
        ids.iter().position(|&id| id == leader)
    }

    /// Waits until the members agree on a leader; returns its index.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "etcd has no leader within {timeout:?}; see {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.start_member(i)
    }

    /// Process ids of the running members.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().flatten().map(|c| c.id()).collect()
    }

    /// The fsyncs of every member so far: WAL syncs plus backend commits.
    pub async fn fsyncs(&self) -> Option<f64> {
        let mut total = 0.0;
        for ip in &self.ips {
            let addr = format!("{ip}:{METRICS_PORT}");
            total += crate::scrape_metric(&addr, "etcd_disk_wal_fsync_duration_seconds_count").await?;
            total += crate::scrape_metric(&addr, "etcd_disk_backend_commit_duration_seconds_count").await?;
        }
        Some(total)
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A load target putting values of `size` bytes under unique keys.
    pub fn target(&self, clients: usize, size: usize, run: &str) -> Arc<dyn Target> {
        let kv = (0..clients)
            .map(|_| (0..self.len()).map(|i| KvClient::new(self.channel(i))).collect())
            .collect();
        Arc::new(EtcdTarget {
            kv,
            size,
            run: run.to_string(),
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
    }
}

struct EtcdTarget {
    kv: Vec<Vec<KvClient<Channel>>>,
    size: usize,
    run: String,
}

impl Target for EtcdTarget {
    fn endpoints(&self) -> usize {
        self.kv.first().map(Vec::len).unwrap_or(0)
    }

    fn write(&self, client: usize, endpoint: usize, n: u64) -> BoxFuture<'static, Result<(), String>> {
        let mut kv = self.kv[client][endpoint].clone();
        let req = PutRequest {
            key: format!("bench/{}/{n}", self.run).into_bytes(),
            value: value(self.size, n),
        };
        Box::pin(async move { kv.put(req).await.map(|_| ()).map_err(|s| s.code().to_string()) })
    }
}
