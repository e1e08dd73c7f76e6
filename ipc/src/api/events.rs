//! The event stream: `GET /v1/events` and its event kinds.

use mesh_proto::wire::PeerKind;
use serde::{Deserialize, Serialize};

use super::*;

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
    /// The mesh's membership changed: a member was removed, left, or got another role.
    Membership(MembershipEvent),
    /// The audience's broker connection changed state.
    Connection(ConnectionEvent),
    /// One of the audience's webhook endpoints was disabled (it answered 410 Gone, or kept failing)
    /// or enabled again.
    Webhook(crate::api::WebhookEvent),
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
            EventBody::Membership(_) => "membership",
            EventBody::Connection(_) => "connection",
            EventBody::Webhook(_) => "webhook",
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
    /// The recipient left the mesh (or was removed) before its daemon took the message.
    Revoked,
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

/// A membership change, as the broker told every remaining member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipEvent {
    /// `remove`, `leave`, `set_role` or `rotate_key` (a new mesh key, made by `by`).
    pub change: String,
    /// The member it is about.
    pub key: String,
    pub name: String,
    /// Who made it (the member itself for `leave`).
    pub by: String,
    pub by_name: String,
    /// For `set_role`: the new role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<mesh_proto::wire::Role>,
    pub at: u64,
    /// The change carries `by`'s valid signature (else the broker's word alone says so).
    pub signed: bool,
    /// For `rotate_key`: the new key's epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    pub key: String,
    pub state: LinkState,
    pub last_error: Option<String>,
}
