//! The access domain: identity policies and revoked certificate serials.

use super::{Decided, Tx};
use crate::state::command::CommandResult;
use crate::state::keys;
use crate::state::policy::IdentityPolicy;

impl Tx<'_> {
    pub(super) fn put_identity(&mut self, identity: &str, policy: &IdentityPolicy) -> Decided {
        self.put(keys::identity(identity), policy);
        Ok(Ok(CommandResult::Done))
    }

    pub(super) fn revoke_serial(&mut self, serial: &str) -> Decided {
        self.put_raw(keys::revoked_serial(serial), Vec::new());
        Ok(Ok(CommandResult::Done))
    }
}
