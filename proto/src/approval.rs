//! Approvals of two-person operations, signed by the approver's own key.
//!
//! The approver signs [`message`] — a fixed context, the operation id and
//! its plan hash — with the private key of the client certificate they call
//! with, and sends the certificate along; the nodes verify the signature
//! against that certificate ([`verify`]) and keep both in the operation's
//! record, so anyone can check the approval again and no node can make one
//! up. A signature for one operation is no approval of any other.
//!
//! Keys: ECDSA P-256 (SHA-256) and P-384 (SHA-384), ASN.1 signatures, and
//! Ed25519. RSA keys are refused (the development certificates are P-256).

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_ASN1_SIGNING, ED25519,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The message an approver signs for operation `id` with plan hash
/// `plan_hash` (lower-case hex).
pub fn message(id: &str, plan_hash: &str) -> Vec<u8> {
    let mut m = b"mailvault approval v1\n".to_vec();
    m.extend_from_slice(id.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(plan_hash.as_bytes());
    m
}

/// A key type approvals may be signed with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Ed25519,
    P256,
    P384,
}

impl KeyType {
    fn verification(self) -> &'static dyn VerificationAlgorithm {
        match self {
            KeyType::Ed25519 => &ED25519,
            KeyType::P256 => &ECDSA_P256_SHA256_ASN1,
            KeyType::P384 => &ECDSA_P384_SHA384_ASN1,
        }
    }
}

/// The certificate's key type and public key.
fn key_of(cert: &[u8]) -> Result<(KeyType, Vec<u8>), String> {
    let (_, cert) =
        X509Certificate::from_der(cert).map_err(|_| "the certificate does not parse".to_string())?;
    let spki = cert.public_key();
    let point = spki.subject_public_key.data.to_vec();
    let alg = &spki.algorithm;
    if alg.algorithm == OID_SIG_ED25519 {
        return Ok((KeyType::Ed25519, point));
    }
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        if curve.as_ref() == Some(&OID_EC_P256) {
            return Ok((KeyType::P256, point));
        }
        if curve.as_ref() == Some(&OID_NIST_EC_P384) {
            return Ok((KeyType::P384, point));
        }
    }
    Err("the certificate's key is not ECDSA P-256, P-384 or Ed25519".to_string())
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo, lower-case hex: the
/// key's fingerprint, equal for two certificates of one key.
pub fn key_fingerprint(cert: &[u8]) -> Result<String, String> {
    let (_, cert) =
        X509Certificate::from_der(cert).map_err(|_| "the certificate does not parse".to_string())?;
    let digest = Sha256::digest(cert.public_key().raw);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks `signature` over `message` against the certificate's key.
pub fn verify(cert: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
    let (key, point) = key_of(cert)?;
    UnparsedPublicKey::new(key.verification(), point)
        .verify(message, signature)
        .map_err(|_| "the signature does not match the certificate's key".to_string())
}

/// The first certificate of a PEM file, DER.
pub fn certificate_der(pem: &[u8]) -> Result<Vec<u8>, String> {
    CertificateDer::from_pem_slice(pem)
        .map(|c| c.to_vec())
        .map_err(|e| format!("no certificate in the PEM: {e}"))
}

/// Signs `message` with a private key (PEM: PKCS#8 or SEC1), for the key
/// type of `cert` (DER).
pub fn sign(key_pem: &[u8], cert: &[u8], message: &[u8]) -> Result<Vec<u8>, String> {
    let (key_type, _) = key_of(cert)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("no private key in the PEM: {e}"))?;
    let der = key.secret_der();
    let rejected = |e: aws_lc_rs::error::KeyRejected| format!("the private key is refused: {e}");
    let signed = |s: Result<aws_lc_rs::signature::Signature, _>| {
        s.map(|s| s.as_ref().to_vec())
            .map_err(|_: aws_lc_rs::error::Unspecified| "signing failed".to_string())
    };
    let rng = SystemRandom::new();
    let sig = match key_type {
        KeyType::Ed25519 => Ed25519KeyPair::from_pkcs8(der)
            .map_err(rejected)?
            .sign(message)
            .as_ref()
            .to_vec(),
        KeyType::P256 => {
            let k =
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, der).map_err(rejected)?;
            signed(k.sign(&rng, message))?
        }
        KeyType::P384 => {
            let k =
                EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, der).map_err(rejected)?;
            signed(k.sign(&rng, message))?
        }
    };
    // A key that is not the certificate's signs in vain: say so here.
    verify(cert, message, &sig).map_err(|_| "the private key is not the certificate's key".to_string())?;
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_and_key(alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, String) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), key.serialize_pem())
    }

    #[test]
    fn a_signature_verifies_for_its_message_only_and_under_its_key_only() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let (cert, key) = cert_and_key(alg);
            let m = message("op-0000abcd", "ff00");
            let sig = sign(key.as_bytes(), &cert, &m).unwrap();
            verify(&cert, &m, &sig).unwrap();
            assert!(verify(&cert, &message("op-0000abce", "ff00"), &sig).is_err());
            assert!(verify(&cert, &message("op-0000abcd", "ff01"), &sig).is_err());
            let (other, other_key) = cert_and_key(alg);
            assert!(verify(&other, &m, &sig).is_err(), "another key");
            assert_ne!(key_fingerprint(&cert).unwrap(), key_fingerprint(&other).unwrap());
            // Signing with a key that is not the certificate's is refused.
            assert!(sign(other_key.as_bytes(), &cert, &m).is_err());
            let mut flipped = sig.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            assert!(verify(&cert, &m, &flipped).is_err());
        }
    }

    #[test]
    fn two_certificates_of_one_key_have_one_fingerprint() {
        let key = rcgen::KeyPair::generate().unwrap();
        let a = rcgen::CertificateParams::new(vec!["a".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let b = rcgen::CertificateParams::new(vec!["b".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_ne!(a.der(), b.der());
        assert_eq!(
            key_fingerprint(a.der()).unwrap(),
            key_fingerprint(b.der()).unwrap()
        );
    }
}
