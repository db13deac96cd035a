//! Encryption at rest: the master key, the envelope format and the tenant keyring.

mod envelope;
mod keyring;
mod master_key;

pub use envelope::{open, seal, Aad, CryptoError, FORMAT_VERSION, HEADERS_CHUNK};
pub use keyring::Keyring;
pub use master_key::{MasterKey, MasterKeyError};
