//! The client-facing gRPC services.

mod admin;
mod append;
mod mailbox;
mod messages;
mod tenant_keys;
mod watch;

pub use admin::AdminService;
pub use mailbox::MailboxService;
