//! The access domain: identity policies and revoked certificate serials.
//!
//! `Command::Access` changes one part of one policy, decided against the
//! policy as it is now: a grant needs the tenant to exist and the identity
//! not to be revoked; an allowlist change with an expectation needs the
//! allowlist to be what the operator saw. A change already in place is done,
//! and reported unchanged (`before == after`), so retries are safe.

use super::{Decided, Tx};
use crate::state::command::{AccessChange, CommandResult, Refusal, RoleGrant};
use crate::state::keys;
use crate::state::policy::{IdentityPolicy, ANY_TENANT};

impl Tx<'_> {
    pub(super) fn put_identity(&mut self, identity: &str, policy: &IdentityPolicy) -> Decided {
        self.put(keys::identity(identity), policy);
        Ok(Ok(CommandResult::Done))
    }

    pub(super) fn revoke_serial(&mut self, serial: &str) -> Decided {
        self.put(keys::revoked_serial(serial), &());
        Ok(Ok(CommandResult::Done))
    }

    pub(super) fn change_access(&mut self, change: AccessChange) -> Decided {
        let key = keys::identity(change.identity());
        let before: IdentityPolicy = self.get(&key)?.unwrap_or_default();
        let mut after = before.clone();
        match change {
            AccessChange::Grant { role, .. } => {
                if before.revoked {
                    return Ok(Err(Refusal::IdentityRevoked));
                }
                match role {
                    RoleGrant::Tenant { tenant, role } => {
                        if tenant != ANY_TENANT && self.get_raw(&keys::tenant(&tenant))?.is_none() {
                            return Ok(Err(Refusal::NoTenant));
                        }
                        after.tenant_roles.entry(tenant).or_default().insert(role);
                    }
                    RoleGrant::Cluster(role) => {
                        after.cluster_roles.insert(role);
                    }
                }
            }
            AccessChange::Ungrant { role, .. } => match role {
                RoleGrant::Tenant { tenant, role } => {
                    if let Some(roles) = after.tenant_roles.get_mut(&tenant) {
                        roles.remove(&role);
                        if roles.is_empty() {
                            after.tenant_roles.remove(&tenant);
                        }
                    }
                }
                RoleGrant::Cluster(role) => {
                    after.cluster_roles.remove(&role);
                }
            },
            AccessChange::SetAllowlist {
                networks, expected, ..
            } => {
                if expected.is_some_and(|e| e != before.allow_from) {
                    return Ok(Err(Refusal::AllowlistChanged));
                }
                after.allow_from = networks;
            }
            AccessChange::Revoke { .. } => after.revoked = true,
        }
        if after != before {
            self.put(key, &after);
        }
        Ok(Ok(CommandResult::Policy { before, after }))
    }
}
