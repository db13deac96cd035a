//! Encryption at rest: the master key, the envelope format, the tenant
//! keyring and the cipher of one message's parts.

mod envelope;
mod keyring;
mod master_key;
mod message;

pub use envelope::{open, seal, Aad, CryptoError, FORMAT_VERSION, HEADERS_CHUNK};
pub use keyring::Keyring;
pub use master_key::{MasterKey, MasterKeyError};
pub use message::MessageCipher;
