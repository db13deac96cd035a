//! A whole-cluster restore as a two-person operation, offline.
//!
//! No cluster is up to hold the record of a whole-cluster restore, so its
//! plan is a file. One operator rehearses the restore (`backup restore
//! --plan-out`: the configs and the copy checked as the restore checks them,
//! nothing written) and signs the plan; a second operator reads it and signs
//! it too (`backup approve-restore`); the restore (`backup restore --plan`)
//! runs only on a plan that is unchanged ([`SignedPlan::plan_hash`] covers
//! every field), unexpired, for exactly the backup, store, configs and master
//! key given, signed by two different identities with two different keys
//! whose certificates the configs' CA issued and which are operators in the
//! backup's own policy (or the configs' `[access] operators`), not revoked
//! there. A signature is over `mailvault_proto::approval::message(plan id,
//! plan hash)`, made with the key of the signer's client certificate, as an
//! online approval is; a plan's id is not an operation's, so neither counts
//! for the other.

use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::ops::hex;
use crate::tls::{identity_of, verify_client_certificate, CertIdentity, TlsFiles};

/// The plan file's format.
pub const PLAN_FORMAT: u32 = 1;

/// How long a plan may be signed and run, by default.
pub const DEFAULT_EXPIRY_MS: i64 = 3_600_000;

/// The longest a plan may live.
pub const MAX_EXPIRY_MS: i64 = 24 * 3_600_000;

/// One node of the new cluster, as its config describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanNode {
    /// Its id.
    pub id: u64,
    /// Its role (`active`, `standby`, `backup`, …).
    pub role: String,
    /// Whether it votes (voters are the ones written).
    pub voter: bool,
    /// Its client address.
    pub client_addr: String,
    /// Its Raft address.
    pub raft_addr: String,
    /// Its data directory (empty for a member not written here).
    pub data_dir: String,
}

/// What a whole-cluster restore will do, rehearsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePlan {
    /// [`PLAN_FORMAT`].
    pub format: u32,
    /// `restore-` and 8 hex digits.
    pub id: String,
    /// Why (e.g. a ticket number).
    pub reason: String,
    /// Who rehearsed it (the identity of the certificate that signed first).
    pub proposer: String,
    /// When, ms since the Unix epoch.
    pub created_ms: i64,
    /// Until when it may be signed and run.
    pub expires_ms: i64,
    /// The store holding the backup.
    pub from: String,
    /// The backup's id.
    pub backup: String,
    /// SHA-256 of the backup's authenticated manifest (JSON), hex.
    pub manifest_sha256: String,
    /// The cluster the backup was taken of.
    pub source_cluster: String,
    /// The backup's log index.
    pub applied_index: u64,
    /// When the backup was taken (RFC 3339).
    pub taken: String,
    /// The new cluster's name (its configs' `cluster_name`).
    pub cluster_name: String,
    /// The configs' master key fingerprint (the backup's).
    pub master_key_fingerprint: String,
    /// The new cluster's members.
    pub nodes: Vec<PlanNode>,
    /// The steps, in words.
    pub steps: Vec<String>,
    /// The predicted effect, in words.
    pub effect: Vec<String>,
    /// The preconditions checked by the rehearsal.
    pub checks: Vec<String>,
    /// Who may sign: the operators of the backup's policy and the configs'
    /// `[access] operators`, none revoked.
    pub approvers: Vec<String>,
}

/// One operator's signature of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSignature {
    /// The identity its certificate names.
    pub identity: String,
    /// The fingerprint of its certificate's key.
    pub key: String,
    /// Its certificate, DER, base64.
    pub certificate: String,
    /// Its signature over the approval message, base64.
    pub signature: String,
    /// When it signed, ms since the Unix epoch.
    pub signed_ms: i64,
}

/// A plan file: the plan, its hash, and who signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPlan {
    /// The plan.
    pub plan: RestorePlan,
    /// SHA-256 of the plan's canonical JSON, hex.
    pub plan_hash: String,
    /// The signatures, the proposer's first.
    pub signatures: Vec<PlanSignature>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// SHA-256 of a value's JSON, hex (a manifest's, a plan's).
pub fn json_sha256<T: Serialize>(value: &T) -> String {
    hex(&Sha256::digest(serde_json::to_vec(value).expect("serializable")))
}

/// The identity a client certificate names and its serial, or why not.
fn user_of(der: &[u8]) -> Result<(String, String), String> {
    match identity_of(der) {
        Some((CertIdentity::User(u), serial)) => Ok((u, serial)),
        Some((CertIdentity::Node(n), _)) => Err(format!(
            "the certificate is node {n}'s: a person signs with their own client certificate"
        )),
        None => Err("the certificate names no identity".into()),
    }
}

impl RestorePlan {
    /// The plan's hash.
    pub fn hash(&self) -> String {
        json_sha256(self)
    }
}

impl SignedPlan {
    /// A new plan, signed by its proposer (`cert`: DER, `key`: PEM).
    pub fn new(mut plan: RestorePlan, cert: &[u8], key: &[u8]) -> Result<SignedPlan, String> {
        let (identity, _) = user_of(cert)?;
        plan.proposer = identity;
        let plan_hash = plan.hash();
        let mut signed = SignedPlan {
            plan,
            plan_hash,
            signatures: Vec::new(),
        };
        let at = signed.plan.created_ms;
        signed.sign(cert, key, at)?;
        Ok(signed)
    }

    /// Reads a plan file; a file whose plan no longer hashes to its hash
    /// (edited after it was made) is refused.
    pub fn load(path: &Path) -> Result<SignedPlan, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let signed: SignedPlan = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a restore plan: {e}", path.display()))?;
        if signed.plan.format != PLAN_FORMAT {
            return Err(format!(
                "{} is a plan of format {}, this build reads {PLAN_FORMAT}",
                path.display(),
                signed.plan.format
            ));
        }
        if signed.plan.hash() != signed.plan_hash {
            return Err(format!(
                "{} was changed after it was rehearsed: its plan does not hash to {}; rehearse it again",
                path.display(),
                signed.plan_hash
            ));
        }
        Ok(signed)
    }

    /// Writes the plan file whole (beside it, then renamed in).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".writing");
        let tmp = path.with_file_name(name);
        let mut json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        json.push(b'\n');
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }

    /// Adds a signature with `cert` (DER) and `key` (PEM) at `now_ms`: refused
    /// for an expired plan, and for an identity or a key that signed it
    /// already.
    pub fn sign(&mut self, cert: &[u8], key: &[u8], now_ms: i64) -> Result<&PlanSignature, String> {
        let (identity, _) = user_of(cert)?;
        let fingerprint = mailvault_proto::approval::key_fingerprint(cert)?;
        if now_ms > self.plan.expires_ms {
            return Err(format!(
                "plan {} expired at {}: rehearse it again",
                self.plan.id,
                rfc3339(self.plan.expires_ms)
            ));
        }
        if let Some(s) = self.signatures.iter().find(|s| s.identity == identity) {
            return Err(format!("{} signed plan {} already", s.identity, self.plan.id));
        }
        if let Some(s) = self.signatures.iter().find(|s| s.key == fingerprint) {
            return Err(format!(
                "this certificate's key signed plan {} already, as {}: a second person signs with a key of their own",
                self.plan.id, s.identity
            ));
        }
        let message = mailvault_proto::approval::message(&self.plan.id, &self.plan_hash);
        let signature = mailvault_proto::approval::sign(key, cert, &message)?;
        self.signatures.push(PlanSignature {
            identity,
            key: fingerprint,
            certificate: b64().encode(cert),
            signature: b64().encode(signature),
            signed_ms: now_ms,
        });
        Ok(self.signatures.last().expect("just pushed"))
    }

    /// Checks that two people approved the plan, at `now_ms`: the plan
    /// unchanged and unexpired; every signature verifying against its
    /// certificate, which names its identity, has its key and was issued by
    /// the CA of `tls` and is valid; `may_sign` accepting each signer (an
    /// operator of the backup's policy, not revoked: identity and serial);
    /// the proposer among the signers; at least two of them, with different
    /// identities and different keys. Returns the signers, the proposer
    /// first.
    pub fn check(
        &self,
        now_ms: i64,
        tls: &TlsFiles,
        may_sign: impl Fn(&str, &str) -> Result<(), String>,
    ) -> Result<Vec<String>, String> {
        let p = &self.plan;
        if p.hash() != self.plan_hash {
            return Err("the plan was changed after it was rehearsed: rehearse it again".into());
        }
        if now_ms > p.expires_ms {
            return Err(format!(
                "plan {} expired at {}: rehearse it again and have it signed again",
                p.id,
                rfc3339(p.expires_ms)
            ));
        }
        let message = mailvault_proto::approval::message(&p.id, &self.plan_hash);
        let mut signers: Vec<(String, String)> = Vec::new();
        for s in &self.signatures {
            let bad = |why: String| format!("{}'s signature is refused: {why}", s.identity);
            let cert = b64()
                .decode(&s.certificate)
                .map_err(|_| bad("its certificate is not base64".into()))?;
            let signature = b64()
                .decode(&s.signature)
                .map_err(|_| bad("the signature is not base64".into()))?;
            let (identity, serial) = user_of(&cert).map_err(bad)?;
            if identity != s.identity {
                return Err(bad(format!("its certificate names {identity}")));
            }
            if mailvault_proto::approval::key_fingerprint(&cert).map_err(bad)? != s.key {
                return Err(bad("its certificate's key is not the one named".into()));
            }
            mailvault_proto::approval::verify(&cert, &message, &signature).map_err(bad)?;
            verify_client_certificate(tls, &cert).map_err(|e| {
                bad(format!(
                    "its certificate is not valid for the new cluster's CA: {e}"
                ))
            })?;
            if let Some((other, _)) = signers.iter().find(|(_, k)| *k == s.key) {
                return Err(format!(
                    "{} and {other} signed with one key: two people sign with two keys",
                    s.identity
                ));
            }
            if signers.iter().any(|(i, _)| *i == identity) {
                return Err(format!("{identity} signed twice: a second person must sign"));
            }
            may_sign(&identity, &serial).map_err(bad)?;
            signers.push((identity, s.key.clone()));
        }
        if !signers.iter().any(|(i, _)| *i == p.proposer) {
            return Err(format!("{}, who rehearsed it, did not sign it", p.proposer));
        }
        if signers.len() < 2 {
            return Err(format!(
                "plan {} is signed by {} only: a second operator must sign it (`mailvault-admin backup approve-restore PLAN`)",
                p.id, p.proposer
            ));
        }
        let mut out: Vec<String> = signers.into_iter().map(|(i, _)| i).collect();
        out.sort_by_key(|i| *i != p.proposer);
        Ok(out)
    }
}

/// An RFC 3339 UTC time (to the second).
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A fresh plan id.
pub fn new_plan_id() -> Result<String, String> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|_| "random source unavailable".to_string())?;
    Ok(format!("restore-{}", hex(&b)))
}
