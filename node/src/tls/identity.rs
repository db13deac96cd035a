//! Who a certificate names.
//!
//! A certificate's identity is taken from its first SAN URI of the form
//! `mailvault://node/<id>` (a cluster node) or `mailvault://user/<name>` (a
//! person or service). Without such a URI the subject CN names a user.

use std::net::SocketAddr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The identity a certificate proves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertIdentity {
    /// A cluster node.
    Node(u64),
    /// A user or service.
    User(String),
}

impl std::fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertIdentity::Node(id) => write!(f, "node:{id}"),
            CertIdentity::User(u) => f.write_str(u),
        }
    }
}

/// An authenticated connection's peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Who the certificate names.
    pub identity: CertIdentity,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// Where the connection comes from.
    pub addr: Option<SocketAddr>,
}

/// Parses the identity and serial of a DER certificate.
pub fn identity_of(der: &[u8]) -> Option<(CertIdentity, String)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let serial = cert
        .tbs_certificate
        .raw_serial_as_string()
        .replace(':', "")
        .to_lowercase();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix("mailvault://node/") {
                    return Some((CertIdentity::Node(id.parse().ok()?), serial));
                }
                if let Some(user) = uri.strip_prefix("mailvault://user/") {
                    if !user.is_empty() {
                        return Some((CertIdentity::User(user.to_string()), serial));
                    }
                }
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    (!cn.is_empty()).then_some((CertIdentity::User(cn), serial))
}
