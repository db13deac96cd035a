//! Validation of client-supplied names (tenants, mailboxes, agents, flags, keys).

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} must be 1 to {max} bytes of printable characters")]
pub struct BadName {
    /// Which field.
    pub what: &'static str,
    /// Its maximum length.
    pub max: usize,
}

/// Checks a name: non-empty, at most `max` bytes, no control characters.
pub fn check(what: &'static str, value: &str, max: usize) -> Result<(), BadName> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(BadName { what, max });
    }
    Ok(())
}

/// A tenant name.
pub fn tenant(value: &str) -> Result<(), BadName> {
    check("tenant", value, 128)
}

/// A mailbox name.
pub fn mailbox(value: &str) -> Result<(), BadName> {
    check("mailbox", value, 256)
}

/// An agent identity.
pub fn agent(value: &str) -> Result<(), BadName> {
    check("agent", value, 256)
}

/// An idempotency key.
pub fn idempotency_key(value: &str) -> Result<(), BadName> {
    check("idempotency_key", value, 128)
}

/// A flag or keyword.
pub fn flag(value: &str) -> Result<(), BadName> {
    if value.contains(' ') {
        return Err(BadName {
            what: "flag",
            max: 128,
        });
    }
    check("flag", value, 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_nul_or_control_characters_are_refused() {
        assert!(mailbox("in\0box").is_err());
        assert!(mailbox("in\nbox").is_err());
        assert!(mailbox("").is_err());
        assert!(mailbox(&"x".repeat(257)).is_err());
        assert!(mailbox("Support/Open").is_ok());
        assert!(flag("\\Seen").is_ok());
        assert!(flag("a b").is_err());
    }
}
