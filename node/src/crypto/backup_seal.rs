//! What authenticates a backup's manifest, and the fingerprint that names
//! the master key a backup's data keys are wrapped by — both derived from the
//! master key (HKDF), never the key itself.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::master_key::MasterKey;

const MANIFEST_INFO: &[u8] = b"mailvault backup manifest v1";
const FINGERPRINT_INFO: &[u8] = b"mailvault master key fingerprint v1";

/// The manifest MAC key and the master key's fingerprint.
#[derive(Clone)]
pub struct BackupSeal {
    mac: Hmac<Sha256>,
    fingerprint: String,
}

impl std::fmt::Debug for BackupSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupSeal(master key {})", self.fingerprint)
    }
}

impl BackupSeal {
    /// Derived from `master`.
    pub fn new(master: &MasterKey) -> BackupSeal {
        let hk = hkdf::Hkdf::<Sha256>::new(None, master.bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        hk.expand(MANIFEST_INFO, key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        let mut print = [0u8; 16];
        hk.expand(FINGERPRINT_INFO, &mut print)
            .expect("16 bytes is a valid HKDF-SHA256 length");
        BackupSeal {
            mac: Hmac::<Sha256>::new_from_slice(key.as_ref()).expect("HMAC takes any key length"),
            fingerprint: print.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// The fingerprint of the master key (32 hex digits; one-way).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The MAC of a manifest's canonical bytes.
    pub fn mac(&self, manifest: &[u8]) -> [u8; 32] {
        let mut m = self.mac.clone();
        m.update(manifest);
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `manifest` (constant time).
    pub fn verify(&self, manifest: &[u8], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        m.update(manifest);
        m.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(hex: &str) -> BackupSeal {
        BackupSeal::new(&MasterKey::from_hex(&hex.repeat(32)).unwrap())
    }

    #[test]
    fn a_manifest_mac_fails_for_another_manifest_or_master_key_and_the_fingerprint_hides_the_key() {
        let (a, b) = (seal("5a"), seal("5b"));
        let tag = a.mac(b"manifest");
        assert!(a.verify(b"manifest", &tag));
        assert!(!a.verify(b"manifesT", &tag));
        assert!(!b.verify(b"manifest", &tag));
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), seal("5a").fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
        assert!(!a.fingerprint().contains("5a5a"), "not the key itself");
    }
}
