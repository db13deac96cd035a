//! The encoding of every stored and replicated value: postcard (positional,
//! compact). Frozen: a change of encoding is a data-version migration.

use serde::{Deserialize, Serialize};

/// Encodes a record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("in-memory encoding cannot fail")
}

/// Decodes a record.
pub fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
