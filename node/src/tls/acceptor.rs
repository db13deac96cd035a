//! The accepting side: our own rustls handshake in front of tonic, so a failed
//! handshake (no certificate, unknown CA, expired) is seen, audited and
//! counted against the source address, and a connection is admitted only
//! when its certificate names the right kind of peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::connector::TlsFiles;
use super::identity::{identity_of, Peer};

/// A connection that did not become an admitted TLS session.
#[derive(Debug, Clone)]
pub struct HandshakeFailure {
    /// Where it came from.
    pub addr: SocketAddr,
    /// Why it failed (never contains key material).
    pub reason: String,
    /// The certificate's identity, if the handshake itself succeeded.
    pub peer: Option<Peer>,
}

/// A rustls server config that requires a client certificate issued by the CA.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let ca = files.ca_pem()?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert?)?;
    }
    let verifier = Arc::new(NamedIdentity(
        WebPkiClientVerifier::builder(Arc::new(roots)).build()?,
    ));
    let (cert, key) = files.identity_pem()?;
    let chain = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|_| anyhow::anyhow!("cannot parse the private key in {}", files.key_file.display()))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Checks that `der` is a client certificate the cluster's CA issued, valid
/// now, naming an identity: what the handshake checks, for a certificate that
/// arrives in a request body (an approval's).
pub fn verify_client_certificate(files: &TlsFiles, der: &[u8]) -> Result<(), String> {
    let ca = files.ca_pem().map_err(|e| e.to_string())?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| e.to_string())?;
    NamedIdentity(verifier)
        .verify_client_cert(&CertificateDer::from(der), &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("the certificate is not one the cluster's CA issued and trusts now ({e})"))
}

/// The CA's verifier, which also refuses a certificate that names no
/// identity (neither a node nor a user), in the handshake: the client gets the
/// `access_denied` alert instead of a session every call of which is denied.
#[derive(Debug)]
struct NamedIdentity(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for NamedIdentity {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        match identity_of(end_entity) {
            Some(_) => Ok(verified),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accepts TCP connections, performs the TLS handshake, and yields the admitted
/// sessions. `admit` decides on the authenticated peer; `on_fail` hears about
/// every refused connection.
pub fn accept_loop<A, F>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    admit: A,
    on_fail: F,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>
where
    A: Fn(&Peer) -> Result<(), String> + Send + Sync + 'static,
    F: Fn(HandshakeFailure) + Send + Sync + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let hooks = Arc::new((admit, on_fail));
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx, hooks) = (acceptor.clone(), tx.clone(), hooks.clone());
            tokio::spawn(async move {
                let (admit, on_fail) = &*hooks;
                let fail =
                    |reason: String, peer: Option<Peer>| on_fail(HandshakeFailure { addr, reason, peer });
                let _ = tcp.set_nodelay(true);
                // A refused handshake ends with the alert that says why
                // (rustls writes it before the error comes back).
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return fail(format!("TLS handshake failed: {e}"), None),
                    Err(_) => return fail("TLS handshake timed out".into(), None),
                };
                let leaf = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                let Some((identity, serial)) = leaf.as_deref().and_then(identity_of) else {
                    return fail("client certificate names no identity".into(), None);
                };
                let peer = Peer {
                    identity,
                    serial,
                    addr: Some(addr),
                };
                if let Err(reason) = admit(&peer) {
                    return fail(reason, Some(peer));
                }
                let _ = tx.send(Ok(tls)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
