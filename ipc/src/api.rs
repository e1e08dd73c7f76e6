//! Request and response bodies of the IPC routes. Every body is JSON; every failure is an
//! [`ApiError`] with a code from a closed list and an HTTP status in the 4xx/5xx range.

use mesh_proto::wire::{PeerKind, Role};
use serde::{Deserialize, Serialize};

/// `GET /v1/version`: the version probe every client may start with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The daemon's build version (the `mesh` package version).
    pub version: String,
    /// The IPC contract version ([`crate::IPC_VERSION`]).
    pub ipc: u32,
    /// The broker wire protocol version it speaks.
    pub protocol: u32,
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: ApiError,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ApiErrorCode,
    pub message: String,
    /// What to do next, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// For an unknown or ambiguous target: the peers it could mean ("did you mean").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
}

/// A peer a mistyped or ambiguous target could mean.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub mesh: String,
    pub name: String,
    pub key: String,
    pub kind: PeerKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// Malformed JSON, a missing field, a value out of range.
    BadRequest,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    /// The same idempotency key was used for a different request.
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// The client speaks another IPC contract version.
    VersionMismatch,
    /// A target that matches nothing in any roster.
    UnknownTarget,
    /// A target that matches more than one peer or mesh.
    AmbiguousTarget,
    UnknownMesh,
    /// The broker refused (with its own error code in the message).
    BrokerRefused,
    /// The display name is held in that mesh by another peer (or one that looks the same).
    NameTaken,
    /// A name that breaks the naming rules (docs/addressing.md).
    InvalidName,
    /// The broker could not be reached.
    BrokerUnreachable,
    ShuttingDown,
    Internal,
    #[serde(other)]
    Unknown,
}

impl ApiErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ApiErrorCode::BadRequest
            | ApiErrorCode::InvalidName
            | ApiErrorCode::UnknownTarget
            | ApiErrorCode::AmbiguousTarget
            | ApiErrorCode::VersionMismatch => 400,
            ApiErrorCode::Unauthorized => 401,
            ApiErrorCode::NotFound | ApiErrorCode::UnknownMesh => 404,
            ApiErrorCode::MethodNotAllowed => 405,
            ApiErrorCode::Conflict | ApiErrorCode::NameTaken => 409,
            ApiErrorCode::PayloadTooLarge => 413,
            ApiErrorCode::UnsupportedMediaType => 415,
            ApiErrorCode::BrokerRefused => 422,
            ApiErrorCode::BrokerUnreachable => 502,
            ApiErrorCode::ShuttingDown => 503,
            ApiErrorCode::Internal | ApiErrorCode::Unknown => 500,
        }
    }
}

// --- daemon --------------------------------------------------------------------------------------

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub socket: String,
    pub started_at: u64,
    pub member: MemberInfo,
    pub meshes: Vec<MeshStatus>,
    pub outbox: OutboxCounts,
    pub inbox: InboxCounts,
    /// `ws://127.0.0.1:PORT` when this daemon runs an embedded broker.
    pub embedded_broker: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub key: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub id: String,
    pub name: String,
    /// The member's display name in this mesh.
    #[serde(default)]
    pub my_name: String,
    pub broker: String,
    pub connection: LinkStatus,
    pub peers_online: u32,
    pub peers_total: u32,
    pub outbox: OutboxCounts,
}

/// A broker connection as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub state: LinkState,
    /// Since when (ms) it has been in this state.
    pub since: u64,
    /// The last failure, with the broker's error code when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Connecting,
    Online,
    /// Disconnected; retrying with backoff.
    Offline,
    /// The broker refused us permanently (revoked, unknown member…); retried slowly.
    Rejected,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Online => "online",
            LinkState::Offline => "offline",
            LinkState::Rejected => "rejected",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxCounts {
    pub pending: u64,
    pub inflight: u64,
    pub done: u64,
    pub dead: u64,
    pub aborted: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxCounts {
    pub unread: u64,
    pub total: u64,
    pub failed: u64,
}

// --- meshes --------------------------------------------------------------------------------------

/// `GET /v1/meshes` lists these; `POST /v1/meshes` and `POST /v1/meshes/join` return one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshInfo {
    pub id: String,
    pub name: String,
    pub broker: String,
    pub role: Role,
    /// True for the local mesh served by this daemon's embedded broker.
    pub embedded: bool,
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
}

/// `POST /v1/meshes`: create a mesh on a broker; the caller becomes its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateMeshRequest {
    pub name: String,
    /// `ws://host:port` (the `/v1/ws` path is added when missing).
    pub broker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_token: Option<String>,
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
}

/// `POST /v1/meshes/rename`: the member's display name in one mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
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
    pub mesh: String,
    pub broker: String,
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Ignore the context: every mesh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_meshes: bool,
}

// --- sending -------------------------------------------------------------------------------------

/// `POST /v1/send`. The daemon answers once the row is committed to the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// Minted by the client; resending it returns the first request's row (same fingerprint) or a
    /// `conflict` (different fingerprint).
    pub client_message_id: String,
    /// A display name, a full public key (64 hex digits), `@group` or `*`.
    pub to: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    pub outbox_id: i64,
    pub client_message_id: String,
    pub status: OutboxStatus,
    pub mesh: String,
    pub target: TargetInfo,
    /// True when this `client_message_id` had already been accepted: nothing new was queued.
    pub duplicate: bool,
    /// The key it is sent with: the member's, or the session's.
    #[serde(default)]
    pub sender: String,
    /// With `mesh send --wait`: the receipt waited for, and where the message stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<SendWait>,
}

/// What `mesh send --wait` saw: whether the receipt waited for came from every recipient in time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendWait {
    pub until: WaitFor,
    pub reached: bool,
    pub status: OutboxStatus,
    /// How many recipients the broker queued it for (members, and sessions live at send time).
    pub recipients: Option<u32>,
    pub delivered_count: u32,
    pub read_count: u32,
    pub expired_count: u32,
}

/// A resolved target: what the user typed and what it resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub kind: TargetKind,
    /// What the sender typed.
    pub label: String,
    /// The wire target: a full key, `@group` or `*`.
    pub address: String,
    /// The recipient's name in the roster, for a direct message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Direct,
    Group,
    Broadcast,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    /// Committed; waiting for its connection (or for its backoff to pass).
    Pending,
    /// Sent on its connection; waiting for the broker's answer.
    Inflight,
    /// Accepted by the broker.
    Done,
    /// Given up: a permanent error, its TTL, or the attempt cap.
    Dead,
    /// Stopped by the user.
    Aborted,
}

impl OutboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Inflight => "inflight",
            OutboxStatus::Done => "done",
            OutboxStatus::Dead => "dead",
            OutboxStatus::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<OutboxStatus> {
        [Self::Pending, Self::Inflight, Self::Done, Self::Dead, Self::Aborted].into_iter().find(|v| v.as_str() == s)
    }
}

/// `GET /v1/outbox`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<OutboxStatus>,
    /// Only rows of this mesh (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Ignore the context: every mesh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_meshes: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub client_message_id: String,
    pub mesh: String,
    /// The session that sent it; `None` for the member.
    #[serde(default)]
    pub session: Option<String>,
    pub target: TargetInfo,
    pub body: String,
    pub status: OutboxStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The broker's id once accepted.
    pub message_id: Option<String>,
    pub enqueued_at: u64,
    pub sent_at: Option<u64>,
    /// First `delivered` receipt (for a broadcast: from any recipient).
    pub delivered_at: Option<u64>,
    pub delivered_count: u32,
    pub read_at: Option<u64>,
    /// How many recipient queues the broker put it in.
    pub recipients: Option<u32>,
    /// How many recipients' copies ran out of time before their daemon took them.
    #[serde(default)]
    pub expired_count: u32,
    /// How many recipients marked it read.
    #[serde(default)]
    pub read_count: u32,
    /// The mesh's id (`mesh` is its local name).
    #[serde(default)]
    pub mesh_id: String,
    /// The key it is sent with: the member's, or the session's.
    #[serde(default)]
    pub sender: String,
    /// For a pending row: when the next attempt is due (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
    /// For a row the broker has not accepted yet: the state of the connection it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
}

/// `GET /v1/outbox/{id}/wait?until=…&timeout_ms=…`: what to wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitFor {
    /// The broker accepted the message (status `done`).
    Accepted,
    /// Every recipient's daemon committed it (`delivered` receipts from all `recipients`).
    Delivered,
    /// Every recipient marked it read (`read` receipts from all `recipients`).
    Read,
}

impl WaitFor {
    /// Whether `e` can no longer reach this point.
    pub fn unreachable(self, e: &OutboxEntry) -> bool {
        matches!(e.status, OutboxStatus::Dead | OutboxStatus::Aborted)
            || (self != WaitFor::Accepted && e.expired_count > 0)
    }

    /// Whether `e` has reached this point.
    pub fn reached(self, e: &OutboxEntry) -> bool {
        let accepted = e.status == OutboxStatus::Done;
        match self {
            WaitFor::Accepted => accepted,
            WaitFor::Delivered => accepted && e.delivered_count >= e.recipients.unwrap_or(1),
            WaitFor::Read => accepted && e.read_count >= e.recipients.unwrap_or(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitQuery {
    pub until: WaitFor,
    /// Default 30 s, at most 1 hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The answer of a wait: the row as it stands, and whether it reached the point waited for. A row
/// that became `dead` or `aborted`, or (waiting for delivery) whose copy expired for a recipient, ends
/// the wait early with `reached: false`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitResponse {
    pub reached: bool,
    pub entry: OutboxEntry,
}

// --- inbox actions -------------------------------------------------------------------------------

/// `POST /v1/inbox/ack`: mark the caller's messages read (and tell their senders).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxAckRequest {
    #[serde(default)]
    pub ids: Vec<i64>,
    /// Every unread message of the caller.
    #[serde(default)]
    pub all: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxAckResponse {
    /// The rows newly marked read.
    pub acked: Vec<i64>,
    /// Rows named that were already read (nothing to do: acking is idempotent).
    #[serde(default)]
    pub already_read: Vec<i64>,
    /// Ids named that are not the caller's, or do not exist.
    #[serde(default)]
    pub not_found: Vec<i64>,
}

/// `POST /v1/inbox/flush`: delete the caller's read messages (`all`: every message).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxFlushRequest {
    /// Only messages received before this time (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    #[serde(default)]
    pub all: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxFlushResponse {
    pub deleted: u64,
}

/// `POST /v1/inbox/delete`: delete some of the caller's messages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxDeleteRequest {
    pub ids: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxDeleteResponse {
    pub deleted: Vec<i64>,
    /// Ids that are not the caller's, or do not exist.
    pub not_found: Vec<i64>,
}

// --- groups --------------------------------------------------------------------------------------

/// `POST /v1/groups/join` and `/v1/groups/leave`: the caller (member or session) joins or leaves
/// `@group`. Recorded at once; the caller's connection tells the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupChange {
    /// The group name, with or without the `@`.
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// `GET /v1/groups`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group: String,
    pub mesh: String,
    /// The key that is in the group (the member's or a session's).
    pub key: String,
    /// `true` once joined; `false` while a leave is on its way.
    pub joined: bool,
    /// The broker has confirmed the last change.
    pub synced: bool,
}

// --- sessions ------------------------------------------------------------------------------------

/// `POST /v1/sessions`: register a launch. The daemon writes the session's token to a 0600 file and
/// returns its path; the token itself never appears in an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// The process that will run as the session (the launcher, which then executes the command).
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchResponse {
    pub session: SessionInfo,
    /// Give it to the command as `MESH_SESSION_FILE`.
    pub token_file: String,
}

/// `GET /v1/sessions` lists these; `GET /v1/session` returns the caller's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub name: String,
    pub mesh: String,
    pub key: String,
    pub live: bool,
    pub pid: Option<u32>,
    pub created_at: u64,
    pub launched_at: Option<u64>,
    pub ended_at: Option<u64>,
    /// Its broker link, while live.
    pub connection: Option<LinkStatus>,
}

// --- events --------------------------------------------------------------------------------------

/// `GET /v1/events`: which events a stream carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventScope {
    /// The caller's own: a session's (with its token) or the member's (with the member token).
    #[default]
    #[serde(rename = "self")]
    Own,
    /// Everything on this daemon: the member and every session (member token only).
    All,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub scope: EventScope,
    /// Replay events after this id (the same as the `Last-Event-ID` header, which wins when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// `false`: end the stream once it has caught up, instead of following new events.
    #[serde(default = "yes")]
    pub follow: bool,
}

fn yes() -> bool {
    true
}

/// One event of the stream. Ids are durable and increase; `Last-Event-ID` resumes after one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub at: u64,
    /// The mesh it concerns, by local name.
    pub mesh: Option<String>,
    /// Whose event it is: the recipient of a message, the sender of a receipt or outbox change, the
    /// identity of a connection; `None` for presence, which concerns everyone in the mesh.
    pub audience: Option<String>,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum EventBody {
    /// A message was filed in an inbox (`ready`, or `failed` with the reason).
    Message(InboxMessage),
    /// Messages were marked read by their recipient.
    Read { ids: Vec<i64> },
    /// A receipt for one of the audience's sends.
    Receipt(ReceiptEvent),
    /// One of the audience's outbox rows changed state.
    Outbox(OutboxEvent),
    /// A peer of the mesh came online, went offline or joined.
    Presence(PresenceEvent),
    /// The audience's broker connection changed state.
    Connection(ConnectionEvent),
    /// Events before `first_id` were pruned: re-read state from the inbox and outbox.
    Resync { first_id: i64 },
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Message(_) => "message",
            EventBody::Read { .. } => "read",
            EventBody::Receipt(_) => "receipt",
            EventBody::Outbox(_) => "outbox",
            EventBody::Presence(_) => "presence",
            EventBody::Connection(_) => "connection",
            EventBody::Resync { .. } => "resync",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptEvent {
    pub outbox_id: i64,
    pub client_message_id: String,
    pub message_id: String,
    pub kind: ReceiptKindName,
    /// The recipient the receipt is about.
    pub recipient: String,
    /// Its name in the roster, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    pub at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKindName {
    Delivered,
    Read,
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub id: i64,
    pub client_message_id: String,
    pub status: OutboxStatus,
    pub last_error: Option<String>,
    pub message_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub key: String,
    pub name: String,
    pub kind: PeerKind,
    pub online: bool,
    /// A session that ended: it no longer receives broadcasts or group messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// It left the roster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    pub key: String,
    pub state: LinkState,
    pub last_error: Option<String>,
}

// --- inbox ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboxStatus {
    /// Committed raw; not yet verified and decrypted.
    Received,
    Ready,
    /// Could not be verified or decrypted; kept with the reason.
    Failed,
}

impl InboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InboxStatus::Received => "received",
            InboxStatus::Ready => "ready",
            InboxStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<InboxStatus> {
        [Self::Received, Self::Ready, Self::Failed].into_iter().find(|v| v.as_str() == s)
    }
}

/// `GET /v1/inbox`. Listing never marks anything read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Ignore the context: every mesh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_meshes: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unread: bool,
    /// A sender's display name or full key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    pub id: i64,
    pub mesh: String,
    pub message_id: String,
    pub from: String,
    pub from_name: String,
    pub kind: TargetKind,
    /// The wire target: our key, `@group` or `*`.
    pub to: String,
    pub status: InboxStatus,
    /// Present once the message is `ready`.
    pub body: Option<String>,
    pub error: Option<String>,
    pub sent_at: u64,
    pub received_at: u64,
    pub read_at: Option<u64>,
}
