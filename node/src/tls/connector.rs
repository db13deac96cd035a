//! The connecting side: a node's (or a tool's) client TLS config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The certificate files of a node or a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM); peers must be issued by it.
    pub ca_file: PathBuf,
    /// This node's certificate (PEM).
    pub cert_file: PathBuf,
    /// This node's private key (PEM); must not be readable by group or others.
    pub key_file: PathBuf,
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl TlsFiles {
    /// Reads the CA certificate.
    pub fn ca_pem(&self) -> std::io::Result<Vec<u8>> {
        read(&self.ca_file)
    }

    /// Reads the certificate and key.
    pub fn identity_pem(&self) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        Ok((read(&self.cert_file)?, read(&self.key_file)?))
    }
}

/// A tonic client TLS config presenting `files`' identity and trusting its CA.
pub fn client_tls(files: &TlsFiles) -> std::io::Result<ClientTlsConfig> {
    let (cert, key) = files.identity_pem()?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(files.ca_pem()?))
        .identity(Identity::from_pem(cert, key)))
}
