//! Access control: who may call what, on which tenant, from where.
//!
//! The [`layer::AccessLayer`] authenticates every call on the client listener
//! (identity from the client certificate; lockout, revocation, IP allowlist,
//! the method's rule in [`rules`]) and puts a [`Principal`] into the request. Tenant-scoped
//! checks, which need the request body, all go through [`authorize`].

mod denials;
mod gate;
mod layer;
mod lockout;
mod masking;
mod principal;
pub mod rules;

pub use denials::{Against, Denials};
pub use gate::Gate;
pub use layer::{AccessLayer, ON_BEHALF_KEY, ON_BEHALF_OF, ON_BEHALF_SERIAL, ON_BEHALF_SOURCE};
pub use lockout::{
    follow_audit_log, id_key, ip_key, is_key, Locked, Lockout, Started, DENIED, DENIED_UNAUTHENTICATED,
    LOCKOUT_ACTION, LOCKOUT_STARTED, REFUSED, REFUSED_LOCKED, UNLOCKED, UNLOCK_ACTION,
};
pub use masking::{mask_address, mask_addresses_in};
pub use principal::{authorize, Principal};
