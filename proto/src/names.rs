//! Rules for the names people type: display names of members and sessions, mesh names, group names.

use crate::ProtoError;

pub const MAX_NAME_LEN: usize = 64;

/// A display name (of a member or a session) or a mesh name: 1 to 64 characters, no control characters,
/// no leading or trailing space, not starting with `@` or `*` (those are targets), and not 64 hex digits
/// (that would read as a key).
pub fn validate_display(name: &str) -> Result<(), ProtoError> {
    let bad = |why: &str| Err(ProtoError::BadName(format!("{name:?}: {why}")));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.chars().count() > MAX_NAME_LEN {
        return bad("longer than 64 characters");
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if name.trim() != name {
        return bad("has leading or trailing spaces");
    }
    if name.starts_with('@') || name.starts_with('*') {
        return bad("must not start with '@' or '*'");
    }
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("must not look like a public key");
    }
    Ok(())
}

/// A group name (after the `@`): 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn validate_group(name: &str) -> Result<(), ProtoError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(ProtoError::BadName(format!("group {name:?}: use 1-64 of a-z 0-9 - _ ."))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names() {
        for good in ["alice", "Alice Smith", "agent-1", "ユーザー"] {
            validate_display(good).expect(good);
        }
        for bad in ["", " alice", "alice ", "@ops", "*", "a\nb", &"a".repeat(65), &"ab".repeat(32)] {
            assert!(validate_display(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn group_names() {
        validate_group("ops-team_1.x").expect("valid");
        assert!(validate_group("Ops").is_err());
        assert!(validate_group("").is_err());
    }
}
