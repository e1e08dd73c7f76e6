//! Meshes, invites, names, the context and rosters: `/v1/meshes…`, `/v1/context`, `/v1/invites`, `/v1/peers`.

use mesh_proto::wire::{MeshLimits, PeerKind, Role};
use serde::{Deserialize, Serialize};

/// `GET /v1/meshes` lists these; `POST /v1/meshes` and `POST /v1/meshes/join` return one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshInfo {
    pub id: String,
    pub name: String,
    pub broker: String,
    pub role: Role,
    /// True for the local mesh served by this daemon's embedded broker.
    pub embedded: bool,
    /// How the connection to the broker is protected.
    #[serde(default)]
    pub transport: super::Transport,
    /// For a broker verified by pin: the pin (`sha256:…`), which invites carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pin: Option<String>,
    pub joined_at: u64,
    /// The member's display name in this mesh.
    #[serde(default)]
    pub my_name: String,
    /// Whether this is the context set by `mesh use`.
    #[serde(default)]
    pub context: bool,
    /// After a join that took a suffixed name: the name asked for, which was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_was_taken: Option<String>,
    /// The epoch of the mesh key this member seals with (0: the mesh's first key).
    #[serde(default)]
    pub key_epoch: u64,
}

/// `POST /v1/meshes`: create a mesh on a broker; the caller becomes its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateMeshRequest {
    pub name: String,
    /// `wss://host:port` or `ws://host:port` (the `/v1/ws` path is added when missing).
    pub broker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_token: Option<String>,
    /// For `wss://`: the SHA-256 of the broker's certificate (`sha256:…`), which then verifies it
    /// instead of the platform's certificate authorities, now and for everyone invited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Allow plain `ws://` to another machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// The member's display name in the new mesh (default: the identity's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// `POST /v1/meshes/join`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinMeshRequest {
    pub token: String,
    /// A local name for the mesh, when the invite's name is already taken here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_name: Option<String>,
    /// The member's display name in the mesh (default: the identity's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// When the name is taken: take the first free `NAME-2`, `NAME-3`, … instead of failing with
    /// `name_taken`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suffix_if_taken: bool,
    /// Allow an invite's plain `ws://` broker on another machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Reach the mesh through this broker address (or comma-separated list) instead of the invite's:
    /// an internal name, one replica. Kept for this member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
}

/// `POST /v1/meshes/repin`: the pin of a mesh's broker certificate. Without `pin`, nothing changes:
/// the answer says what the broker presents now. With it, the broker must present exactly that
/// certificate, which then becomes the mesh's pin (for this member; invites made after carry it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepinRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Drop the mesh's pin: the platform's certificate authorities verify the broker from now on
    /// (they must vouch for what it presents now).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpin: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepinResponse {
    pub mesh: String,
    pub broker: String,
    /// The certificate the broker presents now.
    pub presented: String,
    /// The mesh's pin before this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Whether the mesh is now pinned to `presented`.
    pub pinned: bool,
    /// Whether this machine's certificate authorities vouch for the presented certificate.
    pub trusted_by_platform: bool,
    /// When they do not: why (no authority, expired, another host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_refused: Option<String>,
    /// For a pinned mesh (before this request): why the broker is refused with its pin, if it is
    /// (another certificate, or the pinned one out of its dates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_refused: Option<String>,
    /// Why a pin of the presented certificate would be refused (it has expired, say), if it would:
    /// then pinning it is no fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presented_refused: Option<String>,
}

/// `POST /v1/meshes/rename`: the member's display name in one mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// `GET /v1/meshes/limits`: one mesh's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// `POST /v1/meshes/limits`: change one mesh's limits (its owner or an admin, as the member). A value
/// given replaces the mesh's setting, one left out keeps it; `reset` first returns every setting to
/// the broker's value. Each value is between 1 and the broker's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLimitsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_per_member: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_member: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
}

/// A mesh's limits, as its broker announced them when the daemon last connected (or as just set).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshLimitsInfo {
    /// The mesh's local name.
    pub mesh: String,
    /// In force in the mesh.
    pub limits: MeshLimits,
    /// The broker's values: the most a mesh can set, and what a reset returns to.
    pub broker: MeshLimits,
    /// Whether this member (an owner or admin) can change them.
    pub can_change: bool,
}

/// `GET` and `PUT /v1/context`: the mesh commands mean when they do not say (`mesh use`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The mesh's local name; `None` (on `PUT`: clear it) when there is no context.
    #[serde(default)]
    pub mesh: Option<String>,
}

/// `POST /v1/invites`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateInviteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Default: 24 hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// Default: 1. `0` means unlimited until expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// Default: member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteResponse {
    pub token: String,
    /// The invite's id, to revoke it with (`POST /v1/invites/revoke`).
    #[serde(default)]
    pub id: String,
    pub mesh: String,
    pub broker: String,
    /// The broker certificate's pin the invite carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pin: Option<String>,
    pub expires_at: u64,
    pub max_uses: Option<u32>,
    pub role: Role,
}

/// `GET /v1/peers?mesh=M`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub mesh: String,
    pub key: String,
    pub name: String,
    pub kind: PeerKind,
    pub member: String,
    pub role: Role,
    pub online: bool,
    pub last_seen: Option<u64>,
    /// This daemon's own member key.
    pub is_self: bool,
    /// The groups it is in (as far as the roster knows).
    #[serde(default)]
    pub groups: Vec<String>,
    /// For a session that ended: when (it gets no broadcasts; DMs wait for its next launch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// When it joined the mesh (a member) or first connected (a session), as the broker says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_at: Option<u64>,
    /// For a member who joined with an invite: who issued it (a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invited_by: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Ignore the context: every mesh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_meshes: bool,
}
