//! Opening RocksDB.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

/// Column family of Raft log entries: big-endian index → entry.
pub const CF_LOG: &str = "log";
/// Column family of Raft metadata: vote, committed, last purged.
pub const CF_META: &str = "meta";
/// Column family of the state machine (layout in [`crate::keys`]).
pub const CF_SM: &str = "sm";

/// The shared database handle.
pub type Db = Arc<DB>;

/// Opens (or creates) the database under `dir`.
pub fn open_db(dir: &Path) -> Result<Db, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Mail is ciphertext, which does not compress; compression would only
    // cost CPU (and would hide plaintext from the at-rest scan test).
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    opts.set_max_background_jobs(2);
    let cfs = [CF_LOG, CF_META, CF_SM].map(|name| {
        let mut o = Options::default();
        o.set_compression_type(rocksdb::DBCompressionType::None);
        ColumnFamilyDescriptor::new(name, o)
    });
    Ok(Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?))
}

/// Opens an existing database read-only (for offline checks of a stopped node).
pub fn open_db_read_only(dir: &Path) -> Result<Db, rocksdb::Error> {
    let opts = Options::default();
    Ok(Arc::new(DB::open_cf_for_read_only(
        &opts,
        dir,
        [CF_LOG, CF_META, CF_SM],
        false,
    )?))
}
