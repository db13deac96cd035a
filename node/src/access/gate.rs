//! What the access checks need of the node, and nothing more: its copy of the
//! replicated policies, the handling of denials, the audit recorder and the
//! config's bootstrap operators.

use std::sync::Arc;

use super::denials::Denials;
use crate::audit::AuditRecorder;
use crate::store::MailReader;

/// The narrow handle [`super::AccessLayer`] and [`super::authorize`] work with.
#[derive(Clone)]
pub struct Gate {
    /// This node's copy of the replicated identity policies and revocations.
    pub reader: MailReader,
    /// Denied attempts: audit, failure counters and lockouts.
    pub denials: Denials,
    /// Records allowed tenant access.
    pub audit: AuditRecorder,
    /// Identities that are always operators (`[access] operators`).
    pub operators: Arc<[String]>,
    /// Test mode `unaudited-reads`: allowed reads are not audited.
    pub unaudited_reads: bool,
    /// Refuses (`NOT_A_MEMBER`) while this node is not a member: it waits
    /// to be added, or was removed. Every call but health, reflection and
    /// `NodeStatus` is refused then, before anything else is checked.
    pub member: Arc<dyn Fn() -> Result<(), tonic::Status> + Send + Sync>,
}
