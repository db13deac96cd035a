//! The client-facing gRPC services: the mailbox service front ends use, and
//! one service per operator concern (cluster, tenants, access, audit,
//! backups, two-person operations).

mod access;
mod append;
mod audit;
mod backups;
mod cluster;
mod mailbox;
mod messages;
mod operations;
mod operator;
mod tenant_keys;
mod tenants;
mod watch;

pub use access::AccessService;
pub use audit::AuditService;
pub use backups::BackupsService;
pub use cluster::ClusterService;
pub use mailbox::MailboxService;
pub use operations::OperationsService;
pub use tenants::TenantsService;
