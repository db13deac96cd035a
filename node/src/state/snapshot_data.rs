//! A snapshot as openraft hands it around, and the offer that starts a
//! snapshot transfer between nodes.
//!
//! From data version 4 on, a snapshot is a **checkpoint**: the files of one
//! state-machine database (RocksDB SST and blob files, hard links to the live
//! ones, plus its `MANIFEST`, `OPTIONS` and `CURRENT`), taken at one applied
//! log id. A leader sends one file by file over the peer RPC
//! `TransferCheckpoint` (a `types::CheckpointOffer` first, then every file in
//! chunks, each file closed by its SHA-256), and the follower installs the
//! directory it received by swapping it in. Up to data version 3 a snapshot
//! was one file of key/value pairs sent in openraft's chunks (`Legacy`): a
//! node still receives those from a leader of an older build.

use std::pin::Pin;
use std::task::{Context, Poll};

/// One file of a checkpoint, open for reading.
#[derive(Debug)]
pub struct CheckpointFile {
    /// Its name in the checkpoint directory.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// The open file (kept open so that a newer snapshot replacing this one
    /// cannot remove it from under a transfer).
    pub file: std::fs::File,
}

/// A snapshot's data.
#[derive(Debug)]
pub enum SnapshotData {
    /// A checkpoint of this node, every file open: what a leader sends.
    Checkpoint(Vec<CheckpointFile>),
    /// A checkpoint received from the leader into this directory, its files
    /// checked against their checksums, waiting to be installed.
    Received(std::path::PathBuf),
    /// A snapshot in the format of data version 3 and before (a dump of the
    /// state's key/value pairs, `MVSNAP01`), being received by openraft's
    /// chunks from a node of an older build, or received whole.
    Legacy(tokio::fs::File),
}

/// Whether `name` may name a file of a received checkpoint: a plain file
/// name as RocksDB writes them (no path, nothing hidden).
pub fn is_checkpoint_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn not_a_stream() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a checkpoint snapshot is sent file by file (TransferCheckpoint), not as one stream",
    )
}

impl tokio::io::AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Legacy(f) => Pin::new(f).poll_read(cx, buf),
            _ => Poll::Ready(Err(not_a_stream())),
        }
    }
}

impl tokio::io::AsyncWrite for SnapshotData {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            SnapshotData::Legacy(f) => Pin::new(f).poll_write(cx, buf),
            _ => Poll::Ready(Err(not_a_stream())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Legacy(f) => Pin::new(f).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Legacy(f) => Pin::new(f).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl tokio::io::AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        match self.get_mut() {
            SnapshotData::Legacy(f) => Pin::new(f).start_seek(position),
            _ => Err(not_a_stream()),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match self.get_mut() {
            SnapshotData::Legacy(f) => Pin::new(f).poll_complete(cx),
            _ => Poll::Ready(Err(not_a_stream())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_rocksdb_file_names_are_accepted_from_a_peer() {
        for ok in [
            "000123.sst",
            "000124.blob",
            "MANIFEST-000005",
            "CURRENT",
            "OPTIONS-000007",
            "000004.log",
        ] {
            assert!(is_checkpoint_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../CURRENT",
            "a/b",
            ".hidden",
            "/etc/passwd",
            "x\0y",
            &"a".repeat(65),
        ] {
            assert!(!is_checkpoint_file_name(bad), "{bad:?}");
        }
    }
}
