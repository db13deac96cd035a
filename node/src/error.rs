//! Every error a client sees is built here: a typed [`ApiError`] with a stable
//! [`Reason`] (the `mailvault.v1.ErrorReason` of `proto/mailvault/v1/errors.proto`),
//! turned into a `tonic::Status` by one conversion, which attaches a
//! `google.rpc.ErrorInfo` (domain [`DOMAIN`], the reason's name, metadata).
//! The status code follows from the reason alone ([`code_of`]). The internal
//! errors of the layers below (refusals, proposals, reads, ciphertexts, names)
//! are mapped to reasons here too. Messages and metadata name ids and reasons,
//! never mail content, customer addresses or key material.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use mailvault_proto::v1::ErrorReason as Reason;

use crate::crypto::CryptoError;
use crate::names::BadName;
use crate::proposer::ProposeError;
use crate::state::command::Refusal;
use crate::state::ops::OpRefusal;
use crate::store::ReadError;

/// The `ErrorInfo.domain` of every mailvault error.
pub const DOMAIN: &str = "mailvault";

/// An error as a client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    reason: Reason,
    message: String,
    metadata: Vec<(&'static str, String)>,
}

impl ApiError {
    /// An error for `reason`, with a message for people.
    pub fn new(reason: Reason, message: impl Into<String>) -> ApiError {
        ApiError {
            reason,
            message: message.into(),
            metadata: Vec::new(),
        }
    }

    /// Adds a metadata entry to the `ErrorInfo` (ids and numbers only).
    pub fn with(mut self, key: &'static str, value: impl ToString) -> ApiError {
        self.metadata.push((key, value.to_string()));
        self
    }
}

/// The one conversion to the wire.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let metadata: HashMap<String, String> =
            e.metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let details = ErrorDetails::with_error_info(e.reason.as_str_name(), DOMAIN, metadata);
        Status::with_error_details(code_of(e.reason), e.message, details)
    }
}

/// A ciphertext that failed, as the client sees it (see [`crypto`]).
impl From<CryptoError> for Status {
    fn from(e: CryptoError) -> Status {
        crypto(e).into()
    }
}

/// The status code of a reason (as documented in `errors.proto`).
pub fn code_of(reason: Reason) -> Code {
    use Reason::*;
    match reason {
        TenantNotFound | MailboxNotFound | MessageNotFound | BackupNotFound | OperationNotFound => {
            Code::NotFound
        }
        TenantExists | MailboxExists | NothingToDo => Code::AlreadyExists,
        ClaimedByAnotherAgent
        | NotClaimant
        | ModifiedSince
        | IdentityRevoked
        | BackupNotLocal
        | BackupNotShipped
        | TwoPersonRequired
        | OperationExpired
        | OperationDecided
        | PlanHashMismatch
        | PreconditionViolated => Code::FailedPrecondition,
        IncompleteBody | AllowlistChanged | StateChanged => Code::Aborted,
        UidsExhausted | MessageTooLarge => Code::ResourceExhausted,
        InvalidName
        | StreamHeaderMissing
        | DuplicateStreamHeader
        | EmptyFrame
        | EmptyMessage
        | SizeMismatch
        | InvalidRequest => Code::InvalidArgument,
        WriteOutcomeUnknown
        | NotLeader
        | NoLeader
        | LeaderUnreachable
        | LeadershipChanged
        | LeadershipUnconfirmed
        | ReplicaBehind
        | ShuttingDown
        | AuditUnavailable
        | BackupNodeUnreachable
        | OffsiteUnavailable
        | NotAMember => Code::Unavailable,
        DataDamaged => Code::DataLoss,
        InternalError | BackupFailed | Unspecified => Code::Internal,
        TimedOut => Code::DeadlineExceeded,
        NoIdentity | Revoked => Code::Unauthenticated,
        NoTenantRole
        | NoClusterRole
        | SourceNotAllowed
        | NodeNotAllowed
        | LockedOut
        | CertificateWithoutIdentity
        | SelfApproval
        | SameKey
        | ApprovalSignatureInvalid
        | NotProposer
        | ExportNotApproved => Code::PermissionDenied,
    }
}

/// A refused command.
pub fn refusal(r: Refusal) -> ApiError {
    let msg = r.to_string();
    match r {
        Refusal::NoTenant => ApiError::new(Reason::TenantNotFound, msg),
        Refusal::NoMailbox => ApiError::new(Reason::MailboxNotFound, msg),
        Refusal::NoMessage => ApiError::new(Reason::MessageNotFound, msg),
        Refusal::TenantExists => ApiError::new(Reason::TenantExists, msg),
        Refusal::MailboxExists => ApiError::new(Reason::MailboxExists, msg),
        Refusal::ClaimedBy(agent) => {
            ApiError::new(Reason::ClaimedByAnotherAgent, msg).with("claimed_by", agent)
        }
        Refusal::NotClaimant => ApiError::new(Reason::NotClaimant, msg),
        Refusal::Modified(modseq) => ApiError::new(Reason::ModifiedSince, msg).with("modseq", modseq),
        Refusal::IncompleteBody => ApiError::new(Reason::IncompleteBody, msg),
        Refusal::UidsExhausted => ApiError::new(Reason::UidsExhausted, msg),
        Refusal::IdentityRevoked => ApiError::new(Reason::IdentityRevoked, msg),
        Refusal::AllowlistChanged => ApiError::new(Reason::AllowlistChanged, msg),
        Refusal::NoBackup => ApiError::new(Reason::BackupNotFound, msg),
        Refusal::BackupIdTaken => ApiError::new(Reason::BackupFailed, msg),
        Refusal::Operation(r) => op_refusal(r),
        Refusal::Repair(_) => ApiError::new(Reason::PreconditionViolated, msg),
    }
}

/// A refused change to a two-person operation, or a rehearsal that found a
/// precondition violated.
pub fn op_refusal(r: OpRefusal) -> ApiError {
    let msg = r.to_string();
    match r {
        OpRefusal::NotFound => ApiError::new(Reason::OperationNotFound, msg),
        OpRefusal::Expired => ApiError::new(Reason::OperationExpired, msg),
        OpRefusal::Decided(status) => ApiError::new(Reason::OperationDecided, msg).with("status", status),
        OpRefusal::SelfApproval => ApiError::new(Reason::SelfApproval, msg),
        OpRefusal::SameKey => ApiError::new(Reason::SameKey, msg),
        OpRefusal::PlanChanged => ApiError::new(Reason::PlanHashMismatch, msg),
        OpRefusal::FenceChanged(changed) => {
            ApiError::new(Reason::StateChanged, msg).with("changed", changed.join("; "))
        }
        OpRefusal::BadSignature(_) => ApiError::new(Reason::ApprovalSignatureInvalid, msg),
        OpRefusal::NotProposer => ApiError::new(Reason::NotProposer, msg),
        OpRefusal::ProposerRejects => invalid(msg),
        OpRefusal::Precondition(_) => ApiError::new(Reason::PreconditionViolated, msg),
        OpRefusal::NothingToDo(_) => ApiError::new(Reason::NothingToDo, msg),
        OpRefusal::IdTaken | OpRefusal::NotNextStep(_) => ApiError::new(Reason::InternalError, msg),
    }
}

/// A failed proposal.
pub fn propose(e: ProposeError) -> ApiError {
    match e {
        ProposeError::NotLeader(_) => ApiError::new(
            Reason::NotLeader,
            "not the leader; retry (idempotency keys make retries safe)",
        ),
        ProposeError::Unknown(why) => ApiError::new(
            Reason::WriteOutcomeUnknown,
            format!("write outcome unknown ({why}); retry with the same idempotency key"),
        ),
        ProposeError::Stopped => ApiError::new(Reason::ShuttingDown, "node is shutting down"),
    }
}

/// A failed local read.
pub fn read(e: ReadError) -> ApiError {
    tracing::error!(error = %e, "local read failed");
    match e {
        ReadError::Corrupt => {
            metrics::counter!("mailvault_record_check_failures_total").increment(1);
            damaged("a stored record failed its check (damaged, moved or edited); it is not served")
        }
        ReadError::Db(_) | ReadError::Unkeyed => ApiError::new(Reason::InternalError, "storage read failed"),
    }
}

/// A ciphertext that did not decrypt: the stored data is damaged or misplaced.
pub fn crypto(e: CryptoError) -> ApiError {
    tracing::error!(error = %e, "stored ciphertext did not decrypt");
    metrics::counter!("mailvault_decrypt_failures_total").increment(1);
    damaged("stored message failed authentication; it is not served")
}

/// A message record that failed its binding to its key here.
pub fn damaged_record() -> ApiError {
    metrics::counter!("mailvault_record_check_failures_total").increment(1);
    damaged("the stored message record failed its check (damaged, moved or edited); it is not served")
}

/// Stored data that is damaged or missing a part.
pub fn damaged(message: &str) -> ApiError {
    ApiError::new(Reason::DataDamaged, message)
}

/// An invalid name in a request.
pub fn name(e: BadName) -> ApiError {
    let msg = e.to_string();
    ApiError::new(Reason::InvalidName, msg)
        .with("field", e.what)
        .with("max_bytes", e.max)
}

/// Any other malformed request field.
pub fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(Reason::InvalidRequest, message)
}

/// The failure of a write forwarded to the leader, as the caller gets it. A
/// status the leader sent carries mailvault's `ErrorInfo` and passes
/// unchanged, as do statuses that say the leader refused the call itself
/// (unimplemented, too large). One the transport made up — the connection to
/// the leader failed or broke, so the leader may or may not have committed
/// the write — becomes `WRITE_OUTCOME_UNKNOWN` (`UNAVAILABLE`): retry with the
/// same idempotency key. Never `UNKNOWN: transport error`.
pub fn from_leader(s: Status) -> Status {
    let from_leader = s.get_details_error_info().is_some_and(|i| i.domain == DOMAIN);
    let transport = matches!(
        s.code(),
        Code::Unknown | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Internal
    );
    if from_leader || !transport {
        return s;
    }
    tracing::info!(code = ?s.code(), "a forwarded write got no answer from the leader");
    metrics::counter!("mailvault_forward_outcome_unknown_total").increment(1);
    ApiError::new(
        Reason::WriteOutcomeUnknown,
        "the leader did not answer a forwarded write, which may have been committed; \
         retry with the same idempotency key",
    )
    .into()
}

/// The failure of a backup call passed on to the node that holds the
/// backup (or the duty): its own answers pass unchanged; one the transport
/// made up is `BACKUP_NODE_UNREACHABLE`.
pub fn from_backup_node(s: Status, node: u64) -> Status {
    let theirs = s.get_details_error_info().is_some_and(|i| i.domain == DOMAIN);
    if theirs {
        return s;
    }
    ApiError::new(
        Reason::BackupNodeUnreachable,
        format!("node {node}, which holds it, did not answer; retry"),
    )
    .with("node", node)
    .into()
}

/// No leader is known: nothing can be written or read linearizably now.
pub fn no_leader() -> ApiError {
    ApiError::new(Reason::NoLeader, "no leader elected; retry")
}

/// A caller locked out after repeated failures, until `until_ms`.
pub fn locked_out(until_ms: i64) -> ApiError {
    let until = std::time::UNIX_EPOCH + std::time::Duration::from_millis(until_ms.max(0) as u64);
    let until = humantime::format_rfc3339_seconds(until);
    ApiError::new(
        Reason::LockedOut,
        format!("locked out after repeated failures until {until}"),
    )
    .with("locked_until", until)
    .with("locked_until_ms", until_ms)
}

/// A call of a method this port does not serve (no access rule: the peer
/// protocol on the client port): not a denial.
pub fn not_served(path: &str) -> Status {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("-");
    Status::unimplemented(format!("{service} is not served on this port"))
}

/// A result the handler did not expect from a command: a bug.
pub fn unexpected(what: &str) -> ApiError {
    tracing::error!(what, "unexpected command result");
    ApiError::new(Reason::InternalError, format!("unexpected {what} result"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_carries_its_reason_code_and_metadata() {
        let s: Status = refusal(Refusal::Modified(7)).into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.reason, "MODIFIED_SINCE");
        assert_eq!(info.metadata.get("modseq").map(String::as_str), Some("7"));
        assert!(Status::not_found("plain").get_details_error_info().is_none());
    }

    #[test]
    fn a_transport_failure_of_a_forwarded_write_is_an_unknown_outcome() {
        let reason = |s: &Status| s.get_details_error_info().map(|i| i.reason);
        for made_up in [
            Status::unknown("transport error"),
            Status::unavailable("connection reset"),
            Status::cancelled("h2 stream reset"),
            Status::internal("h2 protocol error"),
        ] {
            let s = from_leader(made_up);
            assert_eq!(s.code(), Code::Unavailable);
            assert_eq!(reason(&s).as_deref(), Some("WRITE_OUTCOME_UNKNOWN"));
        }
        // The leader's own answers pass unchanged, whatever their code.
        let s = from_leader(ApiError::new(Reason::NoLeader, "no leader").into());
        assert_eq!(reason(&s).as_deref(), Some("NO_LEADER"));
        let s = from_leader(Status::unimplemented("no such method"));
        assert_eq!(s.code(), Code::Unimplemented);
        assert_eq!(
            not_served("/mailvault.raft.v1.RaftPeer/ReadIndex").code(),
            Code::Unimplemented
        );
    }

    #[test]
    fn every_reason_has_a_code_and_a_stable_name() {
        for n in 1..=60 {
            let r = Reason::try_from(n).expect("a reason for every number up to the last");
            assert_eq!(Reason::from_str_name(r.as_str_name()), Some(r));
            assert_ne!(code_of(r), Code::Ok);
        }
        assert!(
            Reason::try_from(61).is_err(),
            "a new reason: extend this test and errors.proto's docs"
        );
        assert_eq!(code_of(Reason::WriteOutcomeUnknown), Code::Unavailable);
        assert_eq!(code_of(Reason::IncompleteBody), Code::Aborted);
        assert_eq!(code_of(Reason::MessageTooLarge), Code::ResourceExhausted);
        assert_eq!(code_of(Reason::SelfApproval), Code::PermissionDenied);
        assert_eq!(code_of(Reason::StateChanged), Code::Aborted);
        assert_eq!(code_of(Reason::TwoPersonRequired), Code::FailedPrecondition);
        assert_eq!(code_of(Reason::NothingToDo), Code::AlreadyExists);
        assert_eq!(code_of(Reason::NotAMember), Code::Unavailable);
    }
}
