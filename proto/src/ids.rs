//! Identifiers that appear on the wire: mesh ids and message targets.

use crate::ProtoError;
use crate::codec::{self, string_serde};
use crate::keys::PublicKey;
use crate::names;

/// A mesh: 16 random bytes chosen by its creator, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MeshId(pub [u8; 16]);

impl MeshId {
    pub fn generate() -> Self {
        MeshId(crate::crypto::random_bytes())
    }

    fn encode(&self) -> String {
        hex::encode(self.0)
    }

    fn decode(s: &str) -> Result<Self, ProtoError> {
        if s.len() != 32 {
            return Err(ProtoError::encoding("mesh id", "expected 32 hex digits"));
        }
        Ok(MeshId(codec::unhex_array("mesh id", s)?))
    }
}
string_serde!(MeshId);

impl std::fmt::Debug for MeshId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshId({})", self.encode())
    }
}

/// Whom a message is for: one key, a named group (`@name`) or everyone in the mesh (`*`).
/// Names of peers are resolved to keys by the daemon before a message is queued; the broker never
/// matches names or prefixes.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Target {
    Key(PublicKey),
    Group(String),
    All,
}

impl Target {
    fn encode(&self) -> String {
        match self {
            Target::Key(k) => k.to_string(),
            Target::Group(g) => format!("@{g}"),
            Target::All => "*".to_owned(),
        }
    }

    fn decode(s: &str) -> Result<Self, ProtoError> {
        if s == "*" {
            return Ok(Target::All);
        }
        if let Some(group) = s.strip_prefix('@') {
            names::validate_group(group)?;
            return Ok(Target::Group(group.to_owned()));
        }
        Ok(Target::Key(s.parse()?))
    }

    /// Whether the message is sealed under the group key (broadcasts and groups) rather than crypto_box.
    pub fn is_group_sealed(&self) -> bool {
        !matches!(self, Target::Key(_))
    }
}
string_serde!(Target);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip() {
        let key = crate::Identity::generate().key();
        for t in [Target::All, Target::Group("ops".into()), Target::Key(key)] {
            assert_eq!(t.to_string().parse::<Target>().expect("parses"), t);
        }
        assert!("@".parse::<Target>().is_err());
        assert!("alice".parse::<Target>().is_err());
    }
}
