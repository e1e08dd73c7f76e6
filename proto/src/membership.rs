//! Membership changes: signed by the member who makes them, verified and recorded by the broker, and
//! told to every remaining member (`docs/protocol.md`, "Membership").

use serde::{Deserialize, Serialize};

use crate::ids::MeshId;
use crate::keys::PublicKey;
use crate::signed::Claims;
use crate::wire::Role;

/// How far a change's clock may be from the broker's (a change signed long ago is not accepted).
pub const MAX_SKEW_MS: u64 = 10 * 60 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// An owner or admin removed `target` (and its sessions) from the mesh.
    Remove,
    /// `target` (the signer) left the mesh.
    Leave,
    /// The owner gave `target` the role `role` (`owner`: ownership handed over; the old owner
    /// becomes an admin).
    SetRole,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Remove => "remove",
            ChangeKind::Leave => "leave",
            ChangeKind::SetRole => "set_role",
        }
    }
}

/// What a member signs to change the mesh's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipAction {
    pub v: u32,
    pub mesh_id: MeshId,
    pub kind: ChangeKind,
    pub target: PublicKey,
    /// For `set_role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub by: PublicKey,
    pub at: u64,
}

impl Claims for MembershipAction {
    const DOMAIN: &'static str = "mesh/membership/v1";
    fn signer(&self) -> &PublicKey {
        &self.by
    }
}
