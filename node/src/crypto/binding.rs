//! Binding a stored record to its place: every bound record's value is its
//! encoding followed by a tag, a MAC over the record's key and encoding under
//! a key derived from the master key. A record copied to another key (another
//! message's UID, another mailbox, another identity), swapped with another or
//! edited fails its tag, and is refused like a damaged ciphertext.
//!
//! The tag does not tell an older value of the same record at the same key
//! from the current one (a record replayed in place); the replicas' state
//! digests differ then (see `Cluster.StateDigest`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::master_key::MasterKey;

/// Bytes of the tag after a bound record's encoding.
pub const TAG_BYTES: usize = 16;

/// The HKDF `info` of the binding key: changing it is a data-version step.
const BINDING_INFO: &[u8] = b"mailvault record binding v1";

/// Computes and checks the tags of bound records.
pub struct RecordBinding {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for RecordBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordBinding(<redacted>)")
    }
}

impl RecordBinding {
    /// The binding under `master`'s derived key.
    pub fn new(master: &MasterKey) -> RecordBinding {
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<Sha256>::new(None, master.bytes())
            .expand(BINDING_INFO, key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        RecordBinding {
            mac: Hmac::<Sha256>::new_from_slice(key.as_ref()).expect("HMAC takes any key length"),
        }
    }

    fn mac(&self, key: &[u8], encoded: &[u8]) -> Hmac<Sha256> {
        let mut m = self.mac.clone();
        m.update(&(key.len() as u64).to_be_bytes());
        m.update(key);
        m.update(encoded);
        m
    }

    /// The stored value of `encoded` at `key`: the encoding and its tag.
    pub fn bind(&self, key: &[u8], mut encoded: Vec<u8>) -> Vec<u8> {
        let tag = self.mac(key, &encoded).finalize().into_bytes();
        encoded.extend_from_slice(&tag[..TAG_BYTES]);
        encoded
    }

    /// The encoding in a stored value at `key`, if its tag is right.
    pub fn open<'a>(&self, key: &[u8], stored: &'a [u8]) -> Option<&'a [u8]> {
        let split = stored.len().checked_sub(TAG_BYTES)?;
        let (encoded, tag) = stored.split_at(split);
        self.mac(key, encoded)
            .verify_truncated_left(tag)
            .ok()
            .map(|()| encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(hex: &str) -> RecordBinding {
        RecordBinding::new(&MasterKey::from_hex(&hex.repeat(32)).unwrap())
    }

    #[test]
    fn a_record_opens_only_at_its_own_key_unedited_under_its_own_master_key() {
        let b = binding("11");
        let stored = b.bind(b"\x30t\0m\0\0\0\0\x01", b"record".to_vec());
        assert_eq!(stored.len(), 6 + TAG_BYTES);
        assert_eq!(b.open(b"\x30t\0m\0\0\0\0\x01", &stored), Some(&b"record"[..]));
        assert_eq!(b.open(b"\x30t\0m\0\0\0\0\x02", &stored), None, "moved");
        let mut edited = stored.clone();
        edited[0] ^= 1;
        assert_eq!(b.open(b"\x30t\0m\0\0\0\0\x01", &edited), None, "edited");
        assert_eq!(
            b.open(b"\x30t\0m\0\0\0\0\x01", &stored[..TAG_BYTES - 1]),
            None,
            "short"
        );
        assert_eq!(b.open(b"\x30t\0m\0\0\0\0\x01", b"record"), None, "untagged");
        assert_eq!(
            binding("22").open(b"\x30t\0m\0\0\0\0\x01", &stored),
            None,
            "other key"
        );
    }
}
