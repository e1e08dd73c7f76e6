//! The inbox: `/v1/inbox` and its actions (ack, flush, delete, replay).

use serde::{Deserialize, Serialize};

use super::*;

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
    /// Only the row with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// When nothing matches: wait up to this long (at most 10 minutes) for a message that does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
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
    /// In the event log only: the row was deleted since, and its body with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// How an agent is told of a message: each message is announced at most once per channel to its
/// recipient, and announcing never marks it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeChannel {
    /// Pushed into the agent's context while it works (`mesh mcp`'s notifications).
    Push,
    /// Woke the idle agent (the wait hook), or kept it working (Codex's Stop hook).
    Wake,
    /// Put in the agent's context at the start of a turn (the prompt hook).
    Context,
}

impl NoticeChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeChannel::Push => "push",
            NoticeChannel::Wake => "wake",
            NoticeChannel::Context => "context",
        }
    }
}

/// `POST /v1/notices/claim`: the caller's unread messages not yet announced on `channel`, each
/// recorded as announced there in the same step (so no two claimants announce one message). With
/// `wait_ms`, waits that long for one to arrive; a newer waiting claim by the same recipient on the
/// same channel ends this one (`superseded`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimNoticesRequest {
    pub channel: NoticeChannel,
    /// At most 10 minutes; `0` answers at once.
    #[serde(default)]
    pub wait_ms: u64,
    /// Messages claimed at most (default and most: 100); the oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Who claims (a random id per process, at most 64 characters). With it, the claim stands once
    /// confirmed (`POST /v1/notices/confirm`) after the messages were delivered; claimed and never
    /// confirmed (the claimant died), they go to the next claimant. Without it the claim is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimant: Option<String>,
}

/// `POST /v1/notices/confirm`: the claimant delivered these messages it claimed on `channel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmNoticesRequest {
    pub channel: NoticeChannel,
    pub claimant: String,
    pub ids: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmNoticesResponse {
    pub confirmed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimNoticesResponse {
    /// Claimed now, oldest first: announce them.
    pub messages: Vec<InboxMessage>,
    /// Unread and not yet announced on the channel, beyond `limit`: claim again.
    pub more: u64,
    /// A newer waiting claim on the same channel took over; nothing was claimed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}
