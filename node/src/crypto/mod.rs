//! Encryption at rest: the master key, the envelope format, the tenant
//! keyring, the cipher of one message's parts, the binding of stored records
//! to their keys and the protection of stored names.

mod backup_seal;
mod binding;
mod envelope;
mod keyring;
mod master_key;
mod message;
mod names;

pub use backup_seal::BackupSeal;
pub use binding::{RecordBinding, TAG_BYTES};
pub use envelope::{open, seal, Aad, CryptoError, FORMAT_VERSION, HEADERS_CHUNK};
#[cfg(test)]
pub(crate) use keyring::test_keyring;
pub use keyring::Keyring;
pub use master_key::{MasterKey, MasterKeyError};
pub use message::MessageCipher;
pub use names::{is_protected, is_system_flag, NameKind, TenantNames, PROTECTED};
