//! Opening RocksDB.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

/// Column family of Raft log entries: big-endian index → entry.
pub const CF_LOG: &str = "log";
/// Column family of Raft metadata: vote, committed, last purged.
pub const CF_META: &str = "meta";
/// Column family of the state machine (layout in [`crate::state::keys`]).
pub const CF_SM: &str = "sm";

/// The shared database handle.
pub type Db = Arc<DB>;

/// Options both databases share: created if missing, no compression (mail
/// is ciphertext, which does not compress; compression would only cost CPU,
/// and would hide plaintext from the at-rest scan test), and a WAL that
/// tolerates only an incomplete record at its tail (see `open_db`).
pub(super) fn base_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    opts.set_max_background_jobs(2);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    opts
}

/// Opens (or creates) the database under `dir`.
pub fn open_db(dir: &Path) -> Result<Db, rocksdb::Error> {
    let opts = base_options();
    // The WAL holds the Raft log, whose synced entries this node has
    // acknowledged to the leader. RocksDB's default (point-in-time recovery)
    // silently drops everything after a corrupted record, so a node with a
    // damaged WAL came back having forgotten acknowledged entries: its
    // leader's openraft panicked on a follower whose log went backwards
    // (found by the corruption test), and a voter that forgets could help
    // elect a leader without a committed entry. Only an incomplete record at
    // the tail (an unsynced write cut off by a crash, never acknowledged) is
    // tolerated; any other corruption refuses to open, and the node must be
    // re-seeded.
    let cfs = [CF_LOG, CF_META, CF_SM].map(|name| {
        let mut o = Options::default();
        o.set_compression_type(rocksdb::DBCompressionType::None);
        if name != CF_META {
            separate_large_values(&mut o);
        }
        ColumnFamilyDescriptor::new(name, o)
    });
    Ok(Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?))
}

/// Values at least this long (log entries carrying mail, mail chunks) are
/// kept in blob files, out of the LSM tree.
pub const MIN_BLOB_SIZE: u64 = 4096;

/// Keeps large values in blob files (RocksDB's integrated BlobDB), so that
/// compactions move only keys and references: with values inline, each
/// message was rewritten by every compaction that passed over it — in the
/// log, which is purged soon after, and again in the state machine. Blob
/// files whose values are all deleted (purged log entries, expunged mail)
/// are dropped, and compaction moves live values out of the oldest quarter
/// of blob files (forced once half of those is garbage), so space is
/// reclaimed.
pub(super) fn separate_large_values(o: &mut Options) {
    o.set_enable_blob_files(true);
    o.set_min_blob_size(MIN_BLOB_SIZE);
    o.set_blob_file_size(64 << 20);
    o.set_blob_compression_type(rocksdb::DBCompressionType::None);
    o.set_enable_blob_gc(true);
    o.set_blob_gc_age_cutoff(0.25);
    o.set_blob_gc_force_threshold(0.5);
}

/// Batches up to this size are written on the calling task's thread.
pub const INLINE_WRITE_BYTES: usize = 64 * 1024;

/// Writes `batch` (WAL, no sync), without ever blocking an async worker on
/// RocksDB for long: a small batch is written on the calling thread with
/// `no_slowdown` — a write into the memtable and the OS's copy of the WAL,
/// tens of microseconds, where handing it to the blocking pool and back cost
/// more than the write (measured on the Raft log append: 0.2–0.4 ms of the
/// single-client p50). If RocksDB would stall it (memtables full, too many
/// L0 files), and for large batches, it is written on a blocking thread
/// instead.
pub async fn write_batch(db: &Db, batch: WriteBatch) -> std::io::Result<()> {
    let batch = if batch.size_in_bytes() <= INLINE_WRITE_BYTES {
        // Kept to retry with: a refused batch is consumed by the attempt.
        let copy = WriteBatch::from_data(batch.data());
        let mut wo = WriteOptions::default();
        wo.set_no_slowdown(true);
        match db.write_opt(batch, &wo) {
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
                metrics::counter!("mailvault_write_stalls_total").increment(1);
                copy
            }
            done => return done.map_err(std::io::Error::other),
        }
    } else {
        batch
    };
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.write(batch))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)
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
