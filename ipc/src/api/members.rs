//! Who belongs to a mesh: `/v1/members/*` (remove, leave, role) and the mesh's invites
//! (`GET /v1/invites`, `/v1/invites/revoke`).

use mesh_proto::wire::Role;
use serde::{Deserialize, Serialize};

/// `POST /v1/members/remove`: take a member (and its sessions) out of the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// A name, a key prefix (4 or more hex digits) or a full key, resolved among the mesh's members.
    pub member: String,
}

/// `POST /v1/members/leave`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Only forget the mesh here, without telling its broker (a broker gone for good).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forget: bool,
}

/// `POST /v1/members/role`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    pub member: String,
    pub role: Role,
}

/// What a membership request did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    pub mesh: String,
    /// `remove`, `leave` or `set_role`.
    pub change: String,
    /// The member it is about.
    pub key: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// For a removal: the epoch of the mesh key the remaining members were given (its broadcasts
    /// are sealed under it from now on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<u64>,
    /// Something the caller should know (a removal whose new key could not be made yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `POST /v1/meshes/rotate-key`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// The mesh's key after `POST /v1/meshes/rotate-key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotated {
    pub mesh: String,
    pub key_epoch: u64,
}

/// `GET /v1/invites?mesh=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitesQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// One invite of the mesh, as its broker lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    pub id: String,
    pub mesh: String,
    pub issued_by: String,
    /// The issuer's name in the roster, when it is still there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_by_name: Option<String>,
    pub role: Role,
    pub issued_at: u64,
    pub expires_at: u64,
    /// `None`: any number of uses until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    /// `open`, `expired`, `used_up`, `revoked`, or `issuer_not_admin` (its issuer left, was removed or
    /// is no longer an owner or admin: no one joins with it).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// `POST /v1/invites/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeInviteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    pub id: String,
}
