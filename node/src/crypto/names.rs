//! Customer identifiers that the state machine must compare but never store
//! in clear: idempotency keys become keyed hashes, keywords and claim agents
//! are sealed deterministically (AES-SIV, RFC 5297), so equal values have
//! equal sealed forms and the state machine's set and equality rules work on
//! them unchanged. Both keys are derived from the tenant's first data key,
//! so they are the same on every node and are shredded with the tenant's keys.
//!
//! Protected values start with [`PROTECTED`], a control character no client
//! name may contain (see [`crate::names`]): a value without it is clear
//! (written before data version 3, or proposed by an older leader) and is
//! protected when it is applied.

use aes_siv::siv::Aes256Siv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::envelope::CryptoError;

/// The first character of every protected value.
pub const PROTECTED: char = '\u{1}';

const INDEX_INFO: &[u8] = b"mailvault tenant index v1";
const NAMES_INFO: &[u8] = b"mailvault tenant names v1";

/// What a sealed name is; part of its associated data, so a sealed keyword
/// never opens as an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A keyword (a flag that is not a system flag).
    Keyword,
    /// The agent holding a claim.
    Agent,
}

impl NameKind {
    fn ad(self) -> &'static [u8] {
        match self {
            NameKind::Keyword => b"keyword",
            NameKind::Agent => b"agent",
        }
    }
}

/// A tenant's index and name keys.
pub struct TenantNames {
    index: Hmac<Sha256>,
    names: Zeroizing<[u8; 64]>,
}

impl std::fmt::Debug for TenantNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantNames(<redacted>)")
    }
}

/// Whether `value` is already protected.
pub fn is_protected(value: &str) -> bool {
    value.starts_with(PROTECTED)
}

/// System flags (`\Seen`, `\Flagged`, …) are the protocol's words, the same
/// for every customer: they stay readable, so the state machine and the API
/// can count unseen messages. Every other flag is a keyword.
pub fn is_system_flag(flag: &str) -> bool {
    flag.starts_with('\\')
}

impl TenantNames {
    /// The keys derived from a tenant's first data key.
    pub fn derive(dek: &[u8]) -> TenantNames {
        let hk = hkdf::Hkdf::<Sha256>::new(None, dek);
        let mut index = Zeroizing::new([0u8; 32]);
        hk.expand(INDEX_INFO, index.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        let mut names = Zeroizing::new([0u8; 64]);
        hk.expand(NAMES_INFO, names.as_mut())
            .expect("64 bytes is a valid HKDF-SHA256 length");
        TenantNames {
            index: Hmac::<Sha256>::new_from_slice(index.as_ref()).expect("HMAC takes any key length"),
            names,
        }
    }

    /// The stored form of an idempotency key: a keyed hash (one way; a
    /// protected value is returned as it is).
    pub fn idempotency_key(&self, key: &str) -> String {
        if is_protected(key) || key.is_empty() {
            return key.to_string();
        }
        let mut m = self.index.clone();
        m.update(key.as_bytes());
        protected(&m.finalize().into_bytes())
    }

    fn siv(&self) -> Aes256Siv {
        let key: &[u8; 64] = &self.names;
        Aes256Siv::new(key.into())
    }

    /// The sealed form of a name (a protected value is returned as it is).
    pub fn seal(&self, kind: NameKind, name: &str) -> String {
        if is_protected(name) {
            return name.to_string();
        }
        let sealed = self
            .siv()
            .encrypt([kind.ad()], name.as_bytes())
            .expect("AES-SIV encrypts any name a client may send");
        protected(&sealed)
    }

    /// The clear name of a sealed one (a clear one is returned as it is).
    pub fn open(&self, kind: NameKind, stored: &str) -> Result<String, CryptoError> {
        let Some(text) = stored.strip_prefix(PROTECTED) else {
            return Ok(stored.to_string());
        };
        let sealed = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| CryptoError::Authentication)?;
        let clear = self
            .siv()
            .decrypt([kind.ad()], &sealed)
            .map_err(|_| CryptoError::Authentication)?;
        String::from_utf8(clear).map_err(|_| CryptoError::Authentication)
    }

    /// A claim holder as the client sees it (empty for no claim).
    pub fn open_agent(&self, stored: Option<&str>) -> Result<String, CryptoError> {
        stored.map_or(Ok(String::new()), |a| self.open(NameKind::Agent, a))
    }

    /// A flag as stored: keywords sealed, system flags as they are.
    pub fn seal_flag(&self, flag: &str) -> String {
        if is_system_flag(flag) {
            flag.to_string()
        } else {
            self.seal(NameKind::Keyword, flag)
        }
    }

    /// Stored flags in clear, sorted.
    pub fn open_flags(&self, flags: &[String]) -> Result<Vec<String>, CryptoError> {
        let mut out = flags
            .iter()
            .map(|f| self.open(NameKind::Keyword, f))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        Ok(out)
    }
}

fn protected(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(1 + bytes.len().div_ceil(3) * 4);
    s.push(PROTECTED);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sealed_deterministically_per_tenant_and_kind_and_open_again() {
        let (a, b) = (TenantNames::derive(&[1; 32]), TenantNames::derive(&[2; 32]));
        let s = a.seal(NameKind::Keyword, "$Order-4711");
        assert!(is_protected(&s) && !s.contains("4711"), "{s:?}");
        assert_eq!(s, a.seal(NameKind::Keyword, "$Order-4711"), "deterministic");
        assert_eq!(a.seal(NameKind::Keyword, &s), s, "sealing twice changes nothing");
        assert_ne!(s, b.seal(NameKind::Keyword, "$Order-4711"), "per tenant");
        assert_ne!(s, a.seal(NameKind::Agent, "$Order-4711"), "per kind");
        assert_eq!(a.open(NameKind::Keyword, &s).unwrap(), "$Order-4711");
        assert!(a.open(NameKind::Agent, &s).is_err());
        assert!(b.open(NameKind::Keyword, &s).is_err());
        assert_eq!(a.open(NameKind::Keyword, "clear").unwrap(), "clear");
        assert_eq!(a.seal_flag("\\Seen"), "\\Seen");
        let flags = vec![a.seal_flag("zeta"), "\\Seen".into(), a.seal_flag("alpha")];
        assert_eq!(a.open_flags(&flags).unwrap(), ["\\Seen", "alpha", "zeta"]);
    }

    #[test]
    fn idempotency_keys_are_hashed_per_tenant_once() {
        let (a, b) = (TenantNames::derive(&[1; 32]), TenantNames::derive(&[2; 32]));
        let h = a.idempotency_key("<4711@shop.example>");
        assert!(is_protected(&h) && !h.contains("shop"));
        assert_eq!(h, a.idempotency_key("<4711@shop.example>"));
        assert_eq!(a.idempotency_key(&h), h);
        assert_ne!(h, b.idempotency_key("<4711@shop.example>"));
        assert_eq!(a.idempotency_key(""), "");
    }
}
