//! Tenant data keys: generated on the leader, wrapped by the master key,
//! stored wrapped in the replicated state, unwrapped into memory on use.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use aes_gcm::Aes256Gcm;
use zeroize::Zeroizing;

use super::backup_seal::BackupSeal;
use super::binding::RecordBinding;
use super::envelope::{cipher, open, seal, Aad, CryptoError};
use super::master_key::MasterKey;
use super::names::TenantNames;
use crate::state::command::WrappedKey;

/// The all-zero blob id used in the AAD of wrapped tenant keys.
const NO_BLOB: [u8; 16] = [0; 16];
/// The "mailbox" in the AAD of wrapped tenant keys.
const KEY_PLACE: &str = "\0tenant-key";

/// Unwrapped data keys, cached per tenant and version; the tenants' name
/// keys; the binding of stored records.
#[derive(Clone)]
pub struct Keyring {
    kek: Arc<Aes256Gcm>,
    deks: Arc<RwLock<HashMap<(String, u32), Arc<Aes256Gcm>>>>,
    /// By tenant and the wrapped first key (a tenant made again has new keys).
    names: Arc<RwLock<HashMap<(String, Vec<u8>), Arc<TenantNames>>>>,
    binding: Arc<RecordBinding>,
    backups: Arc<BackupSeal>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(<redacted>)")
    }
}

impl Keyring {
    /// A keyring under the given master key.
    pub fn new(master: &MasterKey) -> Keyring {
        Keyring {
            kek: Arc::new(cipher(master.bytes())),
            deks: Arc::default(),
            names: Arc::default(),
            binding: Arc::new(RecordBinding::new(master)),
            backups: Arc::new(BackupSeal::new(master)),
        }
    }

    /// What authenticates backup manifests, and the master key's fingerprint.
    pub fn backups(&self) -> &Arc<BackupSeal> {
        &self.backups
    }

    /// The binding of stored records to their keys.
    pub fn binding(&self) -> &Arc<RecordBinding> {
        &self.binding
    }

    fn unwrap_dek(&self, tenant: &str, key: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let dek = Zeroizing::new(open(&self.kek, &Self::aad(tenant, key.version), &key.wrapped)?);
        if dek.len() != 32 {
            return Err(CryptoError::Authentication);
        }
        Ok(dek)
    }

    /// A tenant's index and name keys, derived from its first data key
    /// (`first`, unwrapped on first use).
    pub fn names(&self, tenant: &str, first: &WrappedKey) -> Result<Arc<TenantNames>, CryptoError> {
        let id = (tenant.to_string(), first.wrapped.clone());
        if let Some(n) = self.names.read().expect("keyring lock").get(&id) {
            return Ok(n.clone());
        }
        let n = Arc::new(TenantNames::derive(&self.unwrap_dek(tenant, first)?));
        self.names.write().expect("keyring lock").insert(id, n.clone());
        Ok(n)
    }

    fn aad(tenant: &str, version: u32) -> Aad<'_> {
        Aad {
            tenant,
            mailbox: KEY_PLACE,
            blob: &NO_BLOB,
            chunk: 0,
            key_version: version,
        }
    }

    /// Generates a fresh random data key for `tenant` and wraps it.
    pub fn generate(&self, tenant: &str, version: u32) -> Result<WrappedKey, CryptoError> {
        let mut dek = Zeroizing::new([0u8; 32]);
        getrandom::fill(dek.as_mut()).map_err(|_| CryptoError::Random)?;
        let wrapped = seal(&self.kek, &Self::aad(tenant, version), dek.as_ref())?;
        Ok(WrappedKey { version, wrapped })
    }

    /// The cipher of a tenant's key version, unwrapping `wrapped` on first use.
    pub fn cipher(&self, tenant: &str, key: &WrappedKey) -> Result<Arc<Aes256Gcm>, CryptoError> {
        let id = (tenant.to_string(), key.version);
        if let Some(c) = self.deks.read().expect("keyring lock").get(&id) {
            return Ok(c.clone());
        }
        let dek = self.unwrap_dek(tenant, key)?;
        let dek: &[u8; 32] = dek
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Authentication)?;
        let c = Arc::new(cipher(dek));
        self.deks.write().expect("keyring lock").insert(id, c.clone());
        Ok(c)
    }
}

/// The keys of unit tests' stores (every record is bound and names are
/// protected under them).
#[cfg(test)]
pub(crate) fn test_keyring() -> &'static Keyring {
    static KEYS: std::sync::LazyLock<Keyring> =
        std::sync::LazyLock::new(|| Keyring::new(&MasterKey::from_hex(&"11".repeat(32)).unwrap()));
    &KEYS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_unwraps_only_for_its_tenant_under_its_master_key() {
        let ring = Keyring::new(&MasterKey::from_hex(&"11".repeat(32)).unwrap());
        let k = ring.generate("acme", 1).unwrap();
        assert!(ring.cipher("acme", &k).is_ok());
        assert!(ring.cipher("globex", &k).is_err());
        let other = Keyring::new(&MasterKey::from_hex(&"22".repeat(32)).unwrap());
        assert!(other.cipher("acme", &k).is_err());
    }
}
