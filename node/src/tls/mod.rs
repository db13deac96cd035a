//! mTLS for every listener: certificate loading, identities from certificates,
//! the accepting side (with audited handshake failures) and the connecting side.

mod acceptor;
mod connector;
pub mod devcerts;
mod identity;

pub use acceptor::{accept_loop, server_config, verify_client_certificate, HandshakeFailure};
pub use connector::{client_tls, TlsFiles};
pub use identity::{identity_of, CertIdentity, Peer};
