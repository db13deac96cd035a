//! Every internal error mapped to its gRPC status in one place. Messages name
//! ids and reasons, never mail content, addresses or key material.

use tonic::Status;

use crate::command::Refusal;
use crate::crypto::CryptoError;
use crate::names::BadName;
use crate::proposer::ProposeError;
use crate::store::ReadError;

/// A refused command.
pub fn refusal(r: Refusal) -> Status {
    let msg = r.to_string();
    match r {
        Refusal::NoTenant | Refusal::NoMailbox | Refusal::NoMessage => Status::not_found(msg),
        Refusal::TenantExists | Refusal::MailboxExists => Status::already_exists(msg),
        Refusal::ClaimedBy(_) | Refusal::NotClaimant | Refusal::Modified(_) => {
            Status::failed_precondition(msg)
        }
        Refusal::IncompleteBody => Status::aborted(msg),
        Refusal::UidsExhausted => Status::resource_exhausted(msg),
    }
}

/// A failed proposal.
pub fn propose(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader(_) => {
            Status::unavailable("not the leader; retry (idempotency keys make retries safe)")
        }
        ProposeError::Unknown(why) => Status::unavailable(format!(
            "write outcome unknown ({why}); retry with the same idempotency key"
        )),
        ProposeError::Stopped => Status::unavailable("node is shutting down"),
    }
}

/// A failed local read.
pub fn read(e: ReadError) -> Status {
    tracing::error!(error = %e, "local read failed");
    Status::internal("storage read failed")
}

/// A ciphertext that did not decrypt: the stored data is damaged or misplaced.
pub fn crypto(e: CryptoError) -> Status {
    tracing::error!(error = %e, "stored ciphertext did not decrypt");
    metrics::counter!("mailvault_decrypt_failures_total").increment(1);
    Status::data_loss("stored message failed authentication; it is not served")
}

/// An invalid name in a request.
pub fn name(e: BadName) -> Status {
    Status::invalid_argument(e.to_string())
}
