//! The node's TOML configuration: every field documented, defaults in one place,
//! and a `validate()` with a typed error so a bad config fails at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::Role;

/// One member of the initial cluster, as written in `[members.<id>]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's role.
    pub role: Role,
    /// Address of the member's client API listener (`host:port`).
    pub client_addr: String,
    /// Address of the member's Raft peer listener (`host:port`).
    pub raft_addr: String,
    /// Address of the member's ops listener (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub ops_addr: String,
}

impl From<&MemberConfig> for crate::state::Member {
    fn from(m: &MemberConfig) -> Self {
        crate::state::Member {
            role: m.role,
            client_addr: m.client_addr.clone(),
            raft_addr: m.raft_addr.clone(),
            ops_addr: m.ops_addr.clone(),
        }
    }
}

/// How members watch each other (the leader probes every member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealConfig {
    /// A member not heard from for this long is `down`.
    pub down_after_secs: u64,
    /// How often each member is probed (its peer `Probe`: identity, disk
    /// space, failed syncs, applied index, clock), milliseconds.
    pub probe_every_ms: u64,
    /// A voter not heard from for this long is replaced by a healthy,
    /// caught-up spare, without a person (0: never automatically).
    pub replace_after_secs: u64,
    /// The window over which failed members are counted…
    pub window_secs: u64,
    /// …and how many may fail in it before all automatic repair freezes
    /// (until a two-person unfreeze).
    pub max_failures: u32,
}

impl Default for HealConfig {
    fn default() -> Self {
        HealConfig {
            down_after_secs: 30,
            probe_every_ms: 2000,
            replace_after_secs: 120,
            window_secs: 600,
            max_failures: 1,
        }
    }
}

/// Raft timing and batching knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Leader heartbeat interval in milliseconds. openraft 0.9 also gives
    /// each AppendEntries call this long to complete (calls carry at most
    /// about 1 MiB of entries, see `raft::network`).
    pub heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout in milliseconds.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout in milliseconds.
    /// openraft 0.9 also holds a leader lease of this long: a follower that
    /// last heard its leader waits the lease plus a random election timeout
    /// before it campaigns, so failover takes 1.5–2× this (plus up to 1.5
    /// heartbeats: openraft checks the timer on that tick).
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one
    /// at least (and see `snapshot_growth_percent`); as many entries are kept
    /// in the log after it, for followers that lag.
    pub snapshot_every: u64,
    /// …and only once the client commands applied since the last snapshot
    /// amount to this percentage of its size, so that a node holding much
    /// mail does not dump all of it every `snapshot_every` entries (0: the
    /// entry count alone decides).
    pub snapshot_growth_percent: u64,
    /// MiB of the newest Raft log entries also kept in memory, from which
    /// the node replicates and applies them without reading them back from
    /// disk (0: none; every read goes to RocksDB).
    pub log_cache_mib: usize,
    /// Upper bound of the bytes of client commands packed into one Raft entry.
    pub max_batch_bytes: usize,
    /// Raft entries of client commands smaller than `max_batch_bytes`
    /// proposed and not yet committed, at most (full batches go at once, up to
    /// four). openraft 0.9 sends one AppendEntries call at a time to each
    /// follower, so entries beyond that only wait in its queue; fewer in
    /// flight means commands queue in the proposer instead and share larger
    /// entries (fewer fsyncs).
    pub max_batches_in_flight: usize,
    /// The leader reports its own appends written before their fsync, so
    /// openraft replicates an entry while the leader syncs it (openraft 0.9
    /// otherwise waits for that sync first: two fsyncs per commit in a row).
    /// Commits are still applied, acknowledged and told to followers only
    /// once the leader's copy is on disk (`store::durability`). On by
    /// default; `false`: the leader syncs before it replicates.
    pub pipeline_leader_fsync: bool,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 150,
            election_timeout_min_ms: 350,
            election_timeout_max_ms: 600,
            snapshot_every: 5000,
            snapshot_growth_percent: 25,
            log_cache_mib: 64,
            max_batch_bytes: 1024 * 1024,
            max_batches_in_flight: 1,
            pipeline_leader_fsync: true,
        }
    }
}

/// Limits on client input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest raw message accepted by `AppendMessage`, in bytes.
    pub max_message_bytes: u64,
    /// Size of the encrypted chunks a message is stored as, in bytes.
    pub chunk_bytes: usize,
    /// How long a write waits for its Raft commit before failing `UNAVAILABLE`.
    pub write_timeout_ms: u64,
    /// An upload staged chunk by chunk and idle this long without its final
    /// `Append` (its leader died mid-upload) loses its chunks, in seconds.
    pub staged_expiry_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 50 * 1024 * 1024,
            chunk_bytes: 1024 * 1024,
            write_timeout_ms: 10_000,
            staged_expiry_secs: 3600,
        }
    }
}

/// Access control settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Identities that are always operators (the bootstrap of the policy);
    /// two at least, for two-person operations.
    pub operators: Vec<String>,
    /// Failed authentications or denied calls that lock an identity or address out.
    pub lockout_threshold: usize,
    /// Window for counting failures, and length of a lockout, in minutes.
    pub lockout_minutes: u64,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            operators: Vec::new(),
            lockout_threshold: 5,
            lockout_minutes: 15,
        }
    }
}

/// Audit log settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// When true, an access whose audit record cannot be committed fails.
    pub fail_closed: bool,
}

/// Backups: taken by the `backup` node (or, while it has recorded none for
/// two intervals, by the leader standing in), kept locally, listed in the
/// replicated catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Where this node keeps the backups it takes (empty: `<data_dir>/backups`).
    pub dir: PathBuf,
    /// Seconds between two backups.
    pub interval_secs: u64,
    /// Backups this node keeps; older ones are removed once a newer one verified.
    pub keep_local: usize,
    /// The off-site store: `file:///path` or `s3://bucket/prefix` (empty:
    /// `<data_dir>/offsite`, on this machine: for development only).
    pub offsite: String,
    /// The time of day (UTC, `HH:MM`) the newest backup is shipped.
    pub ship_at: String,
    /// Ship every this many seconds instead of once a day at `ship_at` (0: daily).
    pub ship_interval_secs: u64,
    /// Off-site copies kept; older ones are deleted once a newer one verified.
    pub keep_offsite: usize,
    /// No verified off-site copy newer than this (seconds) is an alert condition.
    pub max_offsite_age_secs: u64,
    /// How to reach an `s3://` store.
    pub s3: S3Config,
}

/// An S3-compatible off-site store. Credentials come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or a
/// file, never from a command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The endpoint URL (empty: AWS's, from the region).
    pub endpoint: String,
    /// The region.
    pub region: String,
    /// A TOML file with `access_key_id`, `secret_access_key` and optionally
    /// `session_token` (empty: the environment).
    pub credentials_file: PathBuf,
    /// Allow a plain-HTTP endpoint (test servers only).
    pub allow_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: "us-east-1".into(),
            credentials_file: PathBuf::new(),
            allow_http: false,
        }
    }
}

/// `HH:MM` as minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: PathBuf::new(),
            interval_secs: 3600,
            keep_local: 48,
            offsite: String::new(),
            ship_at: "02:00".into(),
            ship_interval_secs: 0,
            keep_offsite: 30,
            max_offsite_age_secs: 26 * 3600,
            s3: S3Config::default(),
        }
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id; a key of `members`, unless the node joins an existing
    /// cluster (`join`).
    pub node_id: u64,
    /// This node's region label (e.g. its datacenter), shown in the
    /// cluster's status and recorded when the node is added.
    #[serde(default)]
    pub region: String,
    /// Set on a node that joins an existing cluster (a spare, a DR copy, a
    /// voter added later): its role and the addresses it is reached at. It
    /// starts empty and waits, serving nothing, until a two-person add-node
    /// operation adds it; `members` may then be empty.
    #[serde(default)]
    pub join: Option<MemberConfig>,
    /// Name of the cluster, checked by peers.
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Directory holding RocksDB and snapshots. Created if missing.
    pub data_dir: PathBuf,
    /// Client API listener (mailbox + admin gRPC, health, reflection).
    pub client_listen: SocketAddr,
    /// Raft peer listener (node-to-node only).
    pub raft_listen: SocketAddr,
    /// Ops listener: `/healthz`, `/readyz`, `/metrics`.
    pub ops_listen: SocketAddr,
    /// File holding the 256-bit master key as 64 hex characters. Must not be
    /// readable by group or others.
    pub master_key_file: PathBuf,
    /// Certificates: every listener requires mTLS with certificates from this CA.
    pub tls: crate::tls::TlsFiles,
    /// Access control.
    #[serde(default)]
    pub access: AccessConfig,
    /// Audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Backups.
    #[serde(default)]
    pub backup: BackupConfig,
    /// The initial members of the cluster, keyed by node id. The lowest id
    /// bootstraps a fresh cluster once; later starts never bootstrap again.
    /// After that the membership lives in the replicated state (add-node,
    /// remove-node, replace-node) and this list is not read again.
    #[serde(default)]
    pub members: BTreeMap<u64, MemberConfig>,
    /// How the members watch each other and repair the cluster.
    #[serde(default)]
    pub heal: HealConfig,
    /// Raft tuning.
    #[serde(default)]
    pub raft: RaftTuning,
    /// Client input limits.
    #[serde(default)]
    pub limits: Limits,
    /// Log filter (tracing `EnvFilter` syntax), overridden by `RUST_LOG`.
    #[serde(default = "default_log")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[serde(default)]
    pub log_json: bool,
}

fn default_cluster_name() -> String {
    "mailvault".to_string()
}

fn default_log() -> String {
    "info".to_string()
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path given.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        match &self.join {
            None => {
                if self.members.is_empty() {
                    return bad("`members` must list at least one node (or `join` be set)".into());
                }
                if !self.members.contains_key(&self.node_id) {
                    return bad(format!(
                        "node_id {} is not a key of `members` (a node joining an existing cluster sets `join`)",
                        self.node_id
                    ));
                }
                if !self.members.values().any(|m| m.role.may_campaign()) {
                    return bad("at least one member must be `active` or `standby`".into());
                }
            }
            Some(j) => {
                if self.members.contains_key(&self.node_id) {
                    return bad(format!(
                        "node_id {} is a key of `members` and `join` is set: a joining node is not an initial member",
                        self.node_id
                    ));
                }
                if j.raft_addr.is_empty() || j.client_addr.is_empty() {
                    return bad("join.raft_addr and join.client_addr are required".into());
                }
            }
        }
        if self.region.len() > 64 || self.region.chars().any(|c| c.is_control()) {
            return bad("region is at most 64 characters, none a control character".into());
        }
        let h = &self.heal;
        if h.replace_after_secs != 0 && h.replace_after_secs < h.down_after_secs {
            return bad("heal.replace_after_secs must be 0 (off) or at least heal.down_after_secs".into());
        }
        if h.window_secs == 0 {
            return bad("heal.window_secs must be positive".into());
        }
        if h.down_after_secs == 0 || h.probe_every_ms < 100 {
            return bad("heal.down_after_secs must be positive and heal.probe_every_ms at least 100".into());
        }
        let listens = [self.client_listen, self.raft_listen, self.ops_listen];
        if listens[0] == listens[1] || listens[0] == listens[2] || listens[1] == listens[2] {
            return bad("client_listen, raft_listen and ops_listen must differ".into());
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return bad("raft.election_timeout_min_ms must exceed twice raft.heartbeat_ms".into());
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad("raft.election_timeout_max_ms must exceed the minimum".into());
        }
        if r.max_batch_bytes < 64 * 1024 {
            return bad("raft.max_batch_bytes must be at least 65536".into());
        }
        if r.snapshot_every == 0 || r.snapshot_growth_percent > 1000 {
            return bad(
                "raft.snapshot_every must be positive and raft.snapshot_growth_percent at most 1000".into(),
            );
        }
        if !(1..=64).contains(&r.max_batches_in_flight) {
            return bad("raft.max_batches_in_flight must be between 1 and 64".into());
        }
        let l = &self.limits;
        if l.chunk_bytes < 4096 || l.chunk_bytes > 8 * 1024 * 1024 {
            return bad("limits.chunk_bytes must be between 4096 and 8388608".into());
        }
        if l.max_message_bytes == 0 || l.max_message_bytes > 1024 * 1024 * 1024 {
            return bad("limits.max_message_bytes must be between 1 and 1073741824".into());
        }
        if l.staged_expiry_secs == 0 {
            return bad("limits.staged_expiry_secs must be positive".into());
        }
        if self.access.lockout_threshold == 0 || self.access.lockout_minutes == 0 {
            return bad("access.lockout_threshold and access.lockout_minutes must be positive".into());
        }
        if l.write_timeout_ms < 100 {
            return bad("limits.write_timeout_ms must be at least 100".into());
        }
        if self.backup.interval_secs == 0 || self.backup.keep_local == 0 {
            return bad("backup.interval_secs and backup.keep_local must be positive".into());
        }
        if parse_time_of_day(&self.backup.ship_at).is_none() {
            return bad(format!(
                "backup.ship_at {:?} is not a time of day HH:MM",
                self.backup.ship_at
            ));
        }
        if self.backup.keep_offsite == 0 || self.backup.max_offsite_age_secs == 0 {
            return bad("backup.keep_offsite and backup.max_offsite_age_secs must be positive".into());
        }
        let o = &self.backup.offsite;
        if !(o.is_empty() || o.starts_with("file:///") || o.starts_with("s3://")) {
            return bad(format!(
                "backup.offsite {o:?} is neither file:///path nor s3://bucket/prefix"
            ));
        }
        Ok(())
    }

    /// The off-site store's URL (`file:///…` or `s3://…`).
    pub fn offsite_url(&self) -> String {
        match self.backup.offsite.as_str() {
            "" => format!("file://{}", self.data_dir.join("offsite").display()),
            url => url.to_string(),
        }
    }

    /// Where this node keeps its backups.
    pub fn backup_dir(&self) -> PathBuf {
        if self.backup.dir.as_os_str().is_empty() {
            self.data_dir.join("backups")
        } else {
            self.backup.dir.clone()
        }
    }

    /// This node's own member entry: from `members`, or `join` for a
    /// joining node. Its role is the one it starts with; the replicated
    /// membership decides from then on.
    pub fn me(&self) -> &MemberConfig {
        match &self.join {
            Some(j) => j,
            None => &self.members[&self.node_id],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/mailvault.example.toml");

    #[test]
    fn example_config_parses_and_validates() {
        let c: Config = toml::from_str(EXAMPLE).expect("example parses");
        c.validate().expect("example validates");
    }

    #[test]
    fn example_config_matches_the_defaults() {
        let c: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(
            c.raft,
            RaftTuning::default(),
            "example [raft] drifted from defaults"
        );
        assert_eq!(
            c.limits,
            Limits::default(),
            "example [limits] drifted from defaults"
        );
        assert_eq!(
            c.backup,
            BackupConfig::default(),
            "example [backup] drifted from defaults"
        );
        assert_eq!(
            c.heal,
            HealConfig::default(),
            "example [heal] drifted from defaults"
        );
        assert_eq!(c.cluster_name, default_cluster_name());
        assert_eq!(c.log, default_log());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = format!("{EXAMPLE}\nsurprise = 1\n");
        let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
    }

    #[test]
    fn node_id_must_be_a_member() {
        let mut c: Config = toml::from_str(EXAMPLE).unwrap();
        c.node_id = 99;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("node_id 99"), "{err}");
    }

    #[test]
    fn election_timeout_must_exceed_heartbeats() {
        let mut c: Config = toml::from_str(EXAMPLE).unwrap();
        c.raft.election_timeout_min_ms = c.raft.heartbeat_ms;
        assert!(c.validate().is_err());
    }
}
