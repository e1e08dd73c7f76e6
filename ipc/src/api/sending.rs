//! Sending and the outbox: `/v1/send`, `/v1/outbox…`.

use serde::{Deserialize, Serialize};

use super::*;

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
    /// Something the sender should know: a name resolved from a roster that could not be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
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
    /// Recipients that left the mesh (or were removed) before their daemon took it.
    #[serde(default)]
    pub revoked_count: u32,
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
    /// How many recipients left the mesh (or were removed) before their daemon took it.
    #[serde(default)]
    pub revoked_count: u32,
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
            || (self != WaitFor::Accepted && e.expired_count + e.revoked_count > 0)
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
