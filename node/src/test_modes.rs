//! Unsafe modes for measurements and for proving that tests can fail.
//!
//! They exist only in builds with the `test-modes` feature, which only the
//! harness's own binary has (`mailvault-node-test-modes`, the package
//! `chaos-tests/test-node`: these sources compiled a second time), and even
//! there only when `MAILVAULT_TEST_MODES` names them. The shipped
//! `mailvault-node` has no parser of mode names, and started with the variable
//! set it refuses to start, so it can never run in one of these modes
//! (`chaos-tests/tests/shipped_binary.rs` checks both).

/// The environment variable naming the active modes, comma-separated.
pub const ENV: &str = "MAILVAULT_TEST_MODES";

/// The active unsafe modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestModes {
    /// Successful reads of mail are not written to the audit log (to measure
    /// what auditing reads costs). Denials and writes are still audited.
    pub unaudited_reads: bool,
    /// Canary: the log store reports appends flushed without syncing the
    /// WAL, so an acknowledged write can be lost in a power cut.
    pub ack_before_fsync: bool,
    /// Canary: reads are served from local state without the leader's
    /// read-index check, so a deposed or lagging node serves stale data.
    pub stale_reads: bool,
    /// Message parts are stored unencrypted (in an envelope of their own
    /// format, opened only in this mode), to measure what encryption costs.
    pub plaintext: bool,
    /// While the file [`SLOW_LEADER_SYNC_FILE`] exists in the node's data
    /// directory, each WAL sync of its pipelined leader appends waits
    /// [`SLOW_LEADER_SYNC`] first, so tests can see what waits for the
    /// leader's own copy to be on disk (`store::durability`). Slow, not unsafe.
    pub slow_leader_sync: bool,
    /// While the file [`PAUSE_BACKUP_FILE`] exists in the node's data
    /// directory, a backup being taken waits before its manifest is written
    /// (its files all in `incoming-*`), so a test can kill the node in the
    /// middle of a backup. Slow, not unsafe.
    pub pause_backup: bool,
    /// While the file [`PAUSE_OPERATION_FILE`] exists in the node's data
    /// directory, its operation executor (on the leader) takes no step of an
    /// approved operation, so a test can kill the leader between an approval
    /// and the operation's end. Slow, not unsafe.
    pub pause_operation: bool,
    /// While the file [`PAUSE_RESTORE_FILE`] exists in the node's data
    /// directory, a mailbox restore it runs waits after each message it
    /// appended, so a test can kill the leader in the middle of one. Slow,
    /// not unsafe.
    pub pause_restore: bool,
}

/// How long `slow-leader-sync` holds back each sync of a leader's appends.
pub const SLOW_LEADER_SYNC: std::time::Duration = std::time::Duration::from_secs(3);

/// The file in a node's data directory that turns `slow-leader-sync` on.
pub const SLOW_LEADER_SYNC_FILE: &str = "slow-leader-sync";

/// The file in a node's data directory that holds `pause-backup` backups.
pub const PAUSE_BACKUP_FILE: &str = "pause-backup";

/// The file in a node's data directory that holds `pause-operation` steps.
pub const PAUSE_OPERATION_FILE: &str = "pause-operation";

/// The file in a node's data directory that holds `pause-restore` restores.
pub const PAUSE_RESTORE_FILE: &str = "pause-restore";

/// The names of the modes this build can enable.
#[cfg(feature = "test-modes")]
const KNOWN: &[&str] = &[
    "unaudited-reads",
    "ack-before-fsync",
    "stale-reads",
    "plaintext",
    "slow-leader-sync",
    "pause-backup",
    "pause-operation",
    "pause-restore",
];
#[cfg(not(feature = "test-modes"))]
const KNOWN: &[&str] = &[];

/// Why the modes could not be enabled.
#[derive(Debug, thiserror::Error)]
pub enum TestModeError {
    /// The variable is set, but this build has no test modes.
    #[error("{ENV} is set, but this mailvault-node was built without the `test-modes` feature")]
    NotCompiled,
    /// The variable names a mode that does not exist.
    #[error("{ENV} names an unknown mode `{0}` (known: {known})", known = KNOWN.join(", "))]
    Unknown(String),
}

impl TestModes {
    /// The modes named by `MAILVAULT_TEST_MODES` (none when it is unset or empty).
    pub fn from_env() -> Result<TestModes, TestModeError> {
        let spec = std::env::var(ENV).unwrap_or_default();
        TestModes::parse(&spec)
    }

    /// Parses a comma-separated list of mode names.
    pub fn parse(spec: &str) -> Result<TestModes, TestModeError> {
        let mut modes = TestModes::default();
        let names: Vec<&str> = spec.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        if names.is_empty() {
            return Ok(modes);
        }
        for name in names {
            modes.enable(name)?;
        }
        Ok(modes)
    }

    #[cfg(feature = "test-modes")]
    fn enable(&mut self, name: &str) -> Result<(), TestModeError> {
        match name {
            "unaudited-reads" => self.unaudited_reads = true,
            "ack-before-fsync" => self.ack_before_fsync = true,
            "stale-reads" => self.stale_reads = true,
            "plaintext" => self.plaintext = true,
            "slow-leader-sync" => self.slow_leader_sync = true,
            "pause-backup" => self.pause_backup = true,
            "pause-operation" => self.pause_operation = true,
            "pause-restore" => self.pause_restore = true,
            other => return Err(TestModeError::Unknown(other.to_string())),
        }
        Ok(())
    }

    /// Without the feature there is no mode to enable, and no mode's name in
    /// the binary.
    #[cfg(not(feature = "test-modes"))]
    fn enable(&mut self, _name: &str) -> Result<(), TestModeError> {
        Err(TestModeError::NotCompiled)
    }

    /// Whether any mode is active.
    pub fn any(&self) -> bool {
        *self != TestModes::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_variable_means_no_modes_and_unknown_names_are_refused() {
        assert_eq!(TestModes::parse(" ").unwrap(), TestModes::default());
        if cfg!(feature = "test-modes") {
            assert!(TestModes::parse("unaudited-reads").unwrap().unaudited_reads);
            assert!(matches!(
                TestModes::parse("unaudited-reads,bogus"),
                Err(TestModeError::Unknown(_))
            ));
        } else {
            assert!(matches!(
                TestModes::parse("unaudited-reads"),
                Err(TestModeError::NotCompiled)
            ));
        }
    }
}
