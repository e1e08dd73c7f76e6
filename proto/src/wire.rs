//! The daemon↔broker wire protocol, version 1: JSON text frames over one WebSocket, one frame per
//! message, tagged by `type`. See `docs/protocol.md` for the prose contract; this module is its source
//! of truth for shapes and error codes.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::ids::{MeshId, Target};
use crate::keys::{EncPublicKey, PublicIdentity, PublicKey, Sig};
use crate::signed::{Claims, Signed};

/// The path of the WebSocket endpoint on a broker.
pub const WS_PATH: &str = "/v1/ws";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    /// Owners and admins mint invites and set the mesh's limits.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    Member,
    Session,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Member => "member",
            PeerKind::Session => "session",
        }
    }

    pub fn parse(s: &str) -> Option<PeerKind> {
        match s {
            "member" => Some(PeerKind::Member),
            "session" => Some(PeerKind::Session),
            _ => None,
        }
    }
}

/// One entry of a mesh's roster: a member or a session, online or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub key: PublicKey,
    pub kind: PeerKind,
    /// The member a session belongs to; for a member, its own key.
    pub member: PublicKey,
    pub name: String,
    pub enc_key: EncPublicKey,
    pub enc_sig: Sig,
    pub role: Role,
    pub online: bool,
    /// Last time the broker saw it connected (ms), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// The groups it belongs to. Always present in a roster; absent in a presence frame that does
    /// not change them (keep what you knew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// For a session that ended (its daemon said so, or it was not seen for the broker's stale
    /// period): when. It receives no broadcasts or group messages from then on, and leaves the
    /// roster after the broker's session grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// When it joined the mesh (a member) or first connected (a session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_at: Option<u64>,
    /// For a member who joined with an invite: the admin who issued it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invited_by: Option<PublicKey>,
}

impl Peer {
    pub fn public_identity(&self) -> PublicIdentity {
        PublicIdentity { key: self.key, enc_key: self.enc_key, enc_sig: self.enc_sig }
    }
}

// ---------------------------------------------------------------------------------------------------
// client → broker

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Hello(Hello),
    Send(SendMessage),
    Ack(Ack),
    Roster(RosterRequest),
    /// The connection's key read these messages: queue `read` receipts for their senders.
    Read(ReadReceipts),
    JoinGroup(GroupRequest),
    LeaveGroup(GroupRequest),
    /// Change the connection's own display name in this mesh (answered `ok`, or `name_taken` /
    /// `invalid_name`).
    Rename(RenameRequest),
    /// From a member's connection: one of its sessions ended (its process exited).
    EndSession(EndSessionRequest),
    /// From an owner's or admin's member connection: change this mesh's limits (answered `ok`, or
    /// `forbidden` / `limit_out_of_range`).
    SetLimits(SetLimitsRequest),
    /// From an owner's or admin's member connection: an invite it minted, listed from now on and
    /// revocable (answered `ok`, or `forbidden` / `invite_invalid`).
    RegisterInvite(RegisterInviteRequest),
    /// From an owner's or admin's member connection: the mesh's invites (answered `invites`).
    Invites(InvitesRequest),
    /// From an owner's or admin's member connection: an invite no one may join with any more.
    RevokeInvite(RevokeInviteRequest),
    /// From a member's connection: a signed [`crate::membership::MembershipAction`] (remove a
    /// member, leave, change a role).
    Membership(MembershipRequest),
    /// From an owner's or admin's member connection: a new mesh key, one grant per member.
    RotateKey(RotateKeyRequest),
    /// From a member's connection: it holds only keys up to epoch `have`, older than the mesh's (its
    /// daemon was restored from a backup, say): a new key is wanted, for everyone.
    KeyWanted(KeyWantedRequest),
}

/// The only frame accepted before `welcome`: signed claims answering the broker's challenge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub v: u32,
    /// [`HelloClaims`] signed by the connecting key.
    pub auth: Signed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloClaims {
    pub v: u32,
    /// The broker's challenge nonce, base64, exactly as received on this connection.
    pub challenge: String,
    pub mesh_id: MeshId,
    pub key: PublicKey,
    pub enc_key: EncPublicKey,
    pub enc_sig: Sig,
    pub name: String,
    /// Client software and version, for the broker's logs.
    pub client: String,
    pub at: u64,
    pub intent: Intent,
    /// Present when `key` is a session key: the member's [`crate::attestation::SessionAttestation`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<Signed>,
}

impl Claims for HelloClaims {
    const DOMAIN: &'static str = "mesh/hello/v1";
    fn signer(&self) -> &PublicKey {
        &self.key
    }
}

impl HelloClaims {
    pub fn public_identity(&self) -> PublicIdentity {
        PublicIdentity { key: self.key, enc_key: self.enc_key, enc_sig: self.enc_sig }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Intent {
    /// An existing member or session reconnects.
    Connect,
    /// Create the mesh `mesh_id`; the caller becomes its owner.
    Create {
        mesh_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        create_token: Option<String>,
    },
    /// Join with an invite: the admin-signed part of the token and proof of holding its secret.
    Join { invite: Signed, proof: Sig },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessage {
    /// Request id, echoed by `accepted` or `error`.
    pub id: u64,
    pub client_message_id: String,
    pub to: Target,
    #[serde(with = "codec::b64_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "codec::b64_bytes")]
    pub ciphertext: Vec<u8>,
    /// The sender's signature, see [`crate::message`].
    pub sig: Sig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// For a broadcast or group message: the epoch of the mesh key it is sealed under (absent: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<u64>,
}

impl SendMessage {
    /// The request fingerprint for idempotency: SHA-256 of the transcript of target, nonce and
    /// ciphertext. A retry of the same stored message has the same fingerprint; reusing a
    /// `client_message_id` for other content does not.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest;
        let to = self.to.to_string();
        let bytes =
            crate::keys::transcript("mesh/send-fingerprint/v1", &[to.as_bytes(), &self.nonce, &self.ciphertext]);
        sha2::Sha256::digest(bytes).into()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub delivery_ids: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterRequest {
    pub id: u64,
    /// The page after this key (the `next` of the previous page); absent: the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<PublicKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReceipts {
    pub id: u64,
    pub message_ids: Vec<String>,
}

/// Join or leave `@group` (the connection's own key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRequest {
    pub id: u64,
    pub group: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    pub id: u64,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndSessionRequest {
    pub id: u64,
    /// The session's key; it must be a session of the connection's member.
    pub key: PublicKey,
}

/// A change to the mesh's limits. A value given replaces the mesh's own setting; one left out keeps
/// it; `reset` first returns every setting to the broker's (the operator's) value. Each value is
/// between 1 and the broker's value for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLimitsRequest {
    pub id: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_per_member: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_member: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterInviteRequest {
    pub id: u64,
    /// The signed [`crate::invite::InviteClaims`], as in the token.
    pub invite: Signed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitesRequest {
    pub id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeInviteRequest {
    pub id: u64,
    pub invite_id: String,
}

/// A new mesh key of epoch `epoch` (newer than the mesh's current one), with one signed
/// [`crate::membership::KeyGrant`] for every member of the mesh, its maker included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyRequest {
    pub id: u64,
    pub epoch: u64,
    pub grants: Vec<Signed>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyWantedRequest {
    pub id: u64,
    pub have: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRequest {
    pub id: u64,
    /// A [`crate::membership::MembershipAction`] signed by the connection's key.
    pub action: Signed,
}

// ---------------------------------------------------------------------------------------------------
// broker → client

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Challenge(Challenge),
    Welcome(Welcome),
    Accepted(Accepted),
    Deliver(Deliver),
    Roster(RosterReply),
    Presence(Presence),
    Invites(InvitesReply),
    /// The mesh's key epoch, and whether a new key is wanted (a member left): sent to every
    /// connection of the mesh when either changes.
    KeyState(KeyState),
    /// A request without a richer answer (`read`, `join_group`, `leave_group`, `rename`, `end_session`) was done.
    Ok(OkReply),
    Error(ErrorFrame),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub epoch: u64,
    /// A member left the mesh (or one joined with an older key) since the key of `epoch` was made:
    /// an owner or admin should make a new one.
    #[serde(default)]
    pub rekey_wanted: bool,
}

/// The mesh's invites, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitesReply {
    pub id: u64,
    pub invites: Vec<InviteInfo>,
}

/// One invite as the broker knows it: no secret, only what was signed and how it was used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    pub invite_id: String,
    pub issued_by: PublicKey,
    pub role: Role,
    pub issued_at: u64,
    pub expires_at: u64,
    /// `None`: any number until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    pub uses: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<PublicKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkReply {
    pub id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub v: u32,
    #[serde(with = "codec::b64_bytes")]
    pub nonce: Vec<u8>,
    pub server_time: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub v: u32,
    pub mesh_id: MeshId,
    pub mesh_name: String,
    pub you: Peer,
    /// The roster's first page, in key order.
    pub roster: Vec<Peer>,
    /// More peers follow: ask with `roster` for the page after this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster_next: Option<PublicKey>,
    pub limits: Limits,
    pub server_time: u64,
    /// The mesh key's epoch, and whether a new key is wanted.
    #[serde(default)]
    pub key: KeyState,
}

/// The broker's limits, announced in `welcome` so a client can stay inside them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: u64,
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub sends_per_sec: u32,
    pub send_burst: u32,
    /// How many deliveries the broker keeps unacked on one connection before it pauses.
    pub deliver_window: u32,
    /// The limits in force in this mesh: the owner's and admins' settings, within the broker's.
    #[serde(default)]
    pub mesh: MeshLimits,
    /// The broker's (the operator's) values: a mesh's settings can lower them, never raise them,
    /// and a mesh that sets nothing has them.
    #[serde(default)]
    pub broker: MeshLimits,
}

/// How much of a mesh one member, and everyone together, may hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshLimits {
    /// Sessions one member may have that have not ended.
    pub sessions_per_member: u32,
    /// Connections one member may hold at once, its sessions' included.
    pub connections_per_member: u32,
    /// Connections the mesh may hold at once. Members' own connections always get in; only
    /// sessions are refused at this limit.
    pub connections: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub id: u64,
    pub message_id: String,
    /// True when this (sender, client_message_id) was already accepted: nothing new was queued.
    pub duplicate: bool,
    /// How many recipient queues hold the message.
    pub recipients: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deliver {
    pub delivery_id: u64,
    pub item: DeliveryItem,
}

// Almost every item is a message; boxing it would cost an allocation per delivery for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeliveryItem {
    Message(Envelope),
    Receipt(Receipt),
    /// Several receipts for one sender, queued together (one per message acked in one `ack` frame).
    Receipts(ReceiptBatch),
    /// The mesh's membership changed (queued for every member that remains).
    Membership(MembershipNotice),
    /// A new mesh key for this member.
    MeshKey(MeshKeyItem),
}

/// A key grant as delivered: the signed grant, and when the broker recorded the new key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshKeyItem {
    pub grant: Signed,
    /// The broker's time when the key became the mesh's (messages it accepted later under an older
    /// key are refused by their recipients).
    pub at: u64,
}

/// A membership change as every remaining member is told of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipNotice {
    pub kind: crate::membership::ChangeKind,
    pub target: PublicKey,
    /// The target's name when the change was made.
    pub target_name: String,
    pub by: PublicKey,
    pub by_name: String,
    /// For `set_role`: the target's new role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// When the broker recorded it.
    pub at: u64,
    /// The signed action itself, for a member to check who signed it.
    pub action: Signed,
}

/// The body of a `receipts` item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBatch {
    pub receipts: Vec<Receipt>,
}

/// A message as stored by the broker and delivered to each recipient. Only `nonce` and `ciphertext`
/// carry content, sealed end to end; the rest is routing metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub message_id: String,
    pub mesh_id: MeshId,
    pub from: PublicKey,
    pub from_member: PublicKey,
    pub from_enc_key: EncPublicKey,
    pub from_enc_sig: Sig,
    pub from_name: String,
    pub to: Target,
    pub client_message_id: String,
    #[serde(with = "codec::b64_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "codec::b64_bytes")]
    pub ciphertext: Vec<u8>,
    pub sig: Sig,
    pub sent_at: u64,
    pub expires_at: u64,
}

impl Envelope {
    pub fn sender_identity(&self) -> PublicIdentity {
        PublicIdentity { key: self.from, enc_key: self.from_enc_key, enc_sig: self.from_enc_sig }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// The recipient's daemon committed the message.
    Delivered,
    /// The recipient acknowledged reading it.
    Read,
    /// Its TTL ran out before the recipient's daemon took it.
    Expired,
    /// The recipient was removed from the mesh (or left it) before its daemon took the message.
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub message_id: String,
    pub client_message_id: String,
    pub kind: ReceiptKind,
    pub recipient: PublicKey,
    pub at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterReply {
    pub id: u64,
    /// One page, in key order.
    pub peers: Vec<Peer>,
    /// More peers follow: ask for the page after this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<PublicKey>,
}

/// A roster change: a peer came online, went offline, or joined the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub peer: Peer,
    /// The peer left the roster (a session past its grace period): forget it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The request id this answers, when the failing frame had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: ErrorCode,
    /// True when retrying the same request can never succeed.
    pub permanent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Human-readable detail; never matched on.
    pub message: String,
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorFrame { id: None, code, permanent: code.permanent(), retry_after_ms: None, message: message.into() }
    }

    pub fn with_id(mut self, id: Option<u64>) -> Self {
        self.id = id;
        self
    }
}

impl std::fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// The closed list of error codes. Clients decide on `permanent`, never on `message`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or a known `type` with missing or ill-typed fields.
    BadFrame,
    /// A `type` this broker does not know.
    UnknownType,
    UnsupportedVersion,
    FrameTooLarge,
    /// Anything but `hello` before `welcome`.
    NotAuthenticated,
    /// A second `hello` on an authenticated connection.
    AlreadyAuthenticated,
    HandshakeTimeout,
    BadSignature,
    /// The hello does not answer this connection's challenge (a replay, or a stale signature).
    ChallengeMismatch,
    UnknownMesh,
    UnknownMember,
    Revoked,
    MeshExists,
    CreateForbidden,
    InviteInvalid,
    InviteExpired,
    InviteExhausted,
    AttestationInvalid,
    AttestationExpired,
    NameTaken,
    /// A display, mesh or group name that breaks the naming rules.
    InvalidName,
    RecipientUnknown,
    Forbidden,
    RateLimited,
    IdempotencyConflict,
    TooManyConnections,
    /// The member already has as many sessions as the broker allows one member.
    TooManySessions,
    /// A limit set outside what the broker allows (1 to the broker's own value).
    LimitOutOfRange,
    /// Another connection authenticated as the same key; this one is closed.
    Superseded,
    /// A broadcast or group message sealed under a mesh key that has been replaced: seal it again
    /// under the current one.
    StaleKey,
    /// A new mesh key that is not the next epoch, or whose grants are not for exactly the mesh's
    /// members now.
    RotationConflict,
    ShuttingDown,
    Unavailable,
    Internal,
    /// A code from a newer peer; treat as the frame's `permanent` flag says.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Whether retrying the same request can never succeed.
    pub fn permanent(self) -> bool {
        !matches!(
            self,
            ErrorCode::HandshakeTimeout
                | ErrorCode::RateLimited
                | ErrorCode::TooManyConnections
                | ErrorCode::TooManySessions
                | ErrorCode::ShuttingDown
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::StaleKey
                | ErrorCode::RotationConflict
                | ErrorCode::Unknown
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::ChallengeMismatch => "challenge_mismatch",
            ErrorCode::UnknownMesh => "unknown_mesh",
            ErrorCode::UnknownMember => "unknown_member",
            ErrorCode::Revoked => "revoked",
            ErrorCode::MeshExists => "mesh_exists",
            ErrorCode::CreateForbidden => "create_forbidden",
            ErrorCode::InviteInvalid => "invite_invalid",
            ErrorCode::InviteExpired => "invite_expired",
            ErrorCode::InviteExhausted => "invite_exhausted",
            ErrorCode::AttestationInvalid => "attestation_invalid",
            ErrorCode::AttestationExpired => "attestation_expired",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::RecipientUnknown => "recipient_unknown",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::LimitOutOfRange => "limit_out_of_range",
            ErrorCode::Superseded => "superseded",
            ErrorCode::StaleKey => "stale_key",
            ErrorCode::RotationConflict => "rotation_conflict",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// decoding with typed errors

/// Why a received text frame could not be decoded, as the error the peer should be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    /// The request id, when one could be read from the frame.
    pub id: Option<u64>,
    pub detail: String,
}

impl FrameError {
    pub fn into_error_frame(self) -> ErrorFrame {
        ErrorFrame::new(self.code, self.detail).with_id(self.id)
    }
}

const CLIENT_TYPES: &[&str] = &[
    "hello",
    "send",
    "ack",
    "roster",
    "read",
    "join_group",
    "leave_group",
    "rename",
    "end_session",
    "set_limits",
    "register_invite",
    "invites",
    "revoke_invite",
    "membership",
    "rotate_key",
    "key_wanted",
];
const SERVER_TYPES: &[&str] =
    &["challenge", "welcome", "accepted", "deliver", "roster", "presence", "invites", "key_state", "ok", "error"];

pub fn decode_client(text: &str) -> Result<ClientFrame, FrameError> {
    serde_json::from_str(text).map_err(|e| diagnose(text, CLIENT_TYPES, e))
}

pub fn decode_server(text: &str) -> Result<ServerFrame, FrameError> {
    serde_json::from_str(text).map_err(|e| diagnose(text, SERVER_TYPES, e))
}

/// Tells a frame of an unknown type from a malformed one. Only runs on the error path.
fn diagnose(text: &str, known: &[&str], err: serde_json::Error) -> FrameError {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            return FrameError { code: ErrorCode::BadFrame, id: None, detail: format!("not JSON: {err}") };
        }
    };
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    match value.get("type").and_then(serde_json::Value::as_str) {
        None => FrameError { code: ErrorCode::BadFrame, id, detail: "frame has no string field \"type\"".into() },
        Some(t) if !known.contains(&t) => {
            FrameError { code: ErrorCode::UnknownType, id, detail: format!("unknown frame type {t:?}") }
        }
        Some(t) => FrameError { code: ErrorCode::BadFrame, id, detail: format!("malformed {t:?} frame: {err}") },
    }
}

impl ClientFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("frames serialise to JSON")
    }
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("frames serialise to JSON")
    }
}

/// A `deliver` frame around an item that is already JSON, as the broker stores it.
pub fn deliver_frame_json(delivery_id: u64, item_json: &str) -> String {
    format!(r#"{{"type":"deliver","delivery_id":{delivery_id},"item":{item_json}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_malformed_frames_are_told_apart() {
        assert_eq!(decode_client("nope").unwrap_err().code, ErrorCode::BadFrame);
        assert_eq!(decode_client("{}").unwrap_err().code, ErrorCode::BadFrame);
        let e = decode_client(r#"{"type":"teleport","id":4}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownType, Some(4)));
        let e = decode_client(r#"{"type":"send","id":9}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadFrame, Some(9)));
    }

    #[test]
    fn deliver_raw_matches_typed() {
        let item = DeliveryItem::Receipt(Receipt {
            message_id: "m".into(),
            client_message_id: "c".into(),
            kind: ReceiptKind::Delivered,
            recipient: crate::Identity::generate().key(),
            at: 5,
        });
        let raw = deliver_frame_json(7, &serde_json::to_string(&item).expect("json"));
        assert_eq!(
            decode_server(&raw).expect("decodes"),
            ServerFrame::Deliver(Deliver { delivery_id: 7, item: item.clone() })
        );
        let DeliveryItem::Receipt(one) = item else { unreachable!() };
        let batch = DeliveryItem::Receipts(ReceiptBatch { receipts: vec![one.clone(), one] });
        let json = serde_json::to_string(&batch).expect("json");
        assert!(json.starts_with(r#"{"type":"receipts","receipts":[{"#), "{json}");
        let raw = deliver_frame_json(8, &json);
        assert_eq!(
            decode_server(&raw).expect("decodes"),
            ServerFrame::Deliver(Deliver { delivery_id: 8, item: batch })
        );
    }

    #[test]
    fn unknown_error_codes_decode() {
        let f = decode_server(r#"{"type":"error","code":"from_the_future","permanent":true,"message":"x"}"#)
            .expect("decodes");
        assert!(matches!(f, ServerFrame::Error(ErrorFrame { code: ErrorCode::Unknown, permanent: true, .. })));
    }

    #[test]
    fn every_code_round_trips_its_name() {
        for code in [ErrorCode::BadFrame, ErrorCode::RateLimited, ErrorCode::IdempotencyConflict, ErrorCode::Superseded]
        {
            let json = serde_json::to_string(&code).expect("json");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
