//! Development certificates: a CA, node certificates and client identities.
//! Used by the local cluster script (`mailvault-admin dev-certs`) and the tests.
//! Not for production: keys are written unencrypted.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Pems {
    /// The certificate.
    pub cert: String,
    /// The private key.
    pub key: String,
}

impl Pems {
    /// Writes `<name>.pem` and `<name>.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path, name: &str) -> std::io::Result<()> {
        std::fs::write(dir.join(format!("{name}.pem")), &self.cert)?;
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, &self.key)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and key.
    pub pems: Pems,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

/// Certificate generation failed.
pub type Error = rcgen::Error;

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mailvault development");
    dn.push(DnType::CommonName, cn);
    dn
}

/// A user certificate's subject: CN and the SAN URI `mailvault://user/<user>`.
fn user_params(user: &str) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(user);
    params
        .subject_alt_names
        .push(SanType::URI(format!("mailvault://user/{user}").try_into()?));
    Ok(params)
}

impl DevCa {
    /// A new CA named `cn`.
    pub fn new(cn: &str) -> Result<DevCa, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pems = Pems {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            pems,
        })
    }

    fn issue(&self, params: CertificateParams, server: bool) -> Result<Pems, Error> {
        self.issue_on(params, server, KeyPair::generate()?)
    }

    fn issue_on(&self, mut params: CertificateParams, server: bool, key: KeyPair) -> Result<Pems, Error> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pems {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// A node certificate: server and client auth, valid for `ips` and `localhost`.
    pub fn node(&self, id: u64, ips: &[IpAddr]) -> Result<Pems, Error> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.distinguished_name = name(&format!("node-{id}"));
        params
            .subject_alt_names
            .push(SanType::URI(format!("mailvault://node/{id}").try_into()?));
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        self.issue(params, true)
    }

    /// A client certificate for user `user`.
    pub fn client(&self, user: &str) -> Result<Pems, Error> {
        self.client_valid(user, None)
    }

    /// A client certificate for user `user` on an existing key (PEM): two
    /// identities sharing one key, for tests of two-person operations.
    pub fn client_with_key(&self, user: &str, key_pem: &str) -> Result<Pems, Error> {
        self.issue_on(user_params(user)?, false, KeyPair::from_pem(key_pem)?)
    }

    /// A client certificate valid between two dates `(y, m, d)` (for expiry tests).
    pub fn client_valid(
        &self,
        user: &str,
        valid: Option<((i32, u8, u8), (i32, u8, u8))>,
    ) -> Result<Pems, Error> {
        let mut params = user_params(user)?;
        if let Some(((y0, m0, d0), (y1, m1, d1))) = valid {
            params.not_before = date_time_ymd(y0, m0, d0);
            params.not_after = date_time_ymd(y1, m1, d1);
        }
        self.issue(params, false)
    }
}

/// Writes a CA, one certificate per node and one per client user into `dir`:
/// `ca.pem`, `node-<id>.pem/.key`, `client-<user>.pem/.key`.
pub fn write_all(
    dir: &Path,
    nodes: &[(u64, Vec<IpAddr>)],
    users: &[String],
) -> Result<DevCa, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let ca = DevCa::new("mailvault development CA")?;
    ca.pems.save(dir, "ca")?;
    for (id, ips) in nodes {
        ca.node(*id, ips)?.save(dir, &format!("node-{id}"))?;
    }
    for u in users {
        ca.client(u)?.save(dir, &format!("client-{u}"))?;
    }
    Ok(ca)
}
