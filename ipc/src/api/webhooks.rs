//! Webhooks: endpoints that messages and receipts are POSTed to (docs/webhooks.md).

use serde::{Deserialize, Serialize};

/// The kinds of event an endpoint can ask for (`--events`), the same names as the event stream's.
pub const WEBHOOK_EVENT_KINDS: &[&str] = &["message", "receipt", "read", "presence", "outbox", "connection"];

/// What an endpoint gets when it names no kinds.
pub const DEFAULT_WEBHOOK_EVENTS: &[&str] = &["message", "receipt"];

/// `POST /v1/webhooks`: register an endpoint for the caller (the member, or the calling session).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddWebhookRequest {
    pub url: String,
    /// Event kinds from [`WEBHOOK_EVENT_KINDS`]; empty means [`DEFAULT_WEBHOOK_EVENTS`].
    #[serde(default)]
    pub events: Vec<String>,
    /// Only events of this mesh (name or id).
    #[serde(default)]
    pub mesh: Option<String>,
    /// Only events concerning this peer (a name, key prefix or key): messages from it, receipts
    /// about it, its presence.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Allow plain `http://` to a host that is not this machine.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// An endpoint as listed; its secret is never in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookInfo {
    pub id: i64,
    pub url: String,
    pub events: Vec<String>,
    /// The mesh it is narrowed to (name), if any.
    pub mesh: Option<String>,
    /// The peer it is narrowed to (key), and that peer's name when known.
    pub from: Option<String>,
    pub from_name: Option<String>,
    pub description: Option<String>,
    /// The key whose events it receives (the member's or a session's) and that identity's name.
    pub owner: String,
    pub owner_name: String,
    /// `Some(session name)` when a session owns it.
    pub session: Option<String>,
    pub enabled: bool,
    /// Why it is disabled (the user, `410 Gone`, or failing for too long).
    pub disabled_reason: Option<String>,
    pub allow_insecure_http: bool,
    pub created_at: u64,
    /// Since when every attempt has failed (none succeeded since), and how many have.
    pub failing_since: Option<u64>,
    pub failures: u32,
    pub last_success_at: Option<u64>,
    /// Until when the secret before the last rotation is still used to sign too.
    pub previous_secret_until: Option<u64>,
    pub deliveries: WebhookDeliveryCounts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDeliveryCounts {
    pub pending: u64,
    /// Pending deliveries whose last attempt failed (a subset of `pending`).
    pub failing: u64,
    pub delivered: u64,
    pub dead: u64,
}

/// `POST /v1/webhooks` answer: the endpoint and its signing secret, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddWebhookResponse {
    pub webhook: WebhookInfo,
    /// `whsec_` + base64 of 32 random bytes.
    pub secret: String,
}

/// `POST /v1/webhooks/{id}/rotate` answer: the new secret (shown this once) and until when the
/// previous one still signs too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateWebhookResponse {
    pub webhook: WebhookInfo,
    pub secret: String,
    pub previous_valid_until: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt or its next one.
    Pending,
    Delivered,
    /// Past its deadline, or refused for good; kept to be listed and redelivered.
    Dead,
}

/// Which deliveries to list: `failed` is pending ones whose last attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryFilter {
    Pending,
    Failed,
    Delivered,
    Dead,
}

/// `GET /v1/webhooks/{id}/deliveries`: newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    #[serde(default)]
    pub status: Option<DeliveryFilter>,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryInfo {
    pub id: i64,
    pub webhook_id: i64,
    /// The `webhook-id` header: the same on every attempt of this delivery.
    pub message_id: String,
    /// The payload's `type`.
    pub event_type: String,
    /// The event it reports (its id in the event stream), none for a test.
    pub event_id: Option<i64>,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub created_at: u64,
    /// When the next attempt is due (pending, to an enabled endpoint, only).
    pub next_attempt_at: Option<u64>,
    /// After this it is dead.
    pub deadline: u64,
    pub last_attempt_at: Option<u64>,
    /// The last answer's HTTP status, when there was an answer.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_at: Option<u64>,
}

/// `POST /v1/webhooks/{id}/redeliver` (`all_dead`) or `POST /v1/webhook-deliveries/{id}/redeliver`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeliverResponse {
    /// Deliveries made pending again, due now.
    pub redelivered: u64,
    /// Whether their endpoint is enabled (a disabled one's wait until it is).
    pub endpoint_enabled: bool,
}

/// `POST /v1/webhooks/{id}/test` answer: the test delivery after its first attempt (or still
/// pending when the endpoint did not answer in time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestWebhookResponse {
    pub delivery: DeliveryInfo,
}

/// `mesh daemon status`: endpoints and their deliveries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookStatus {
    pub endpoints: u64,
    pub deliveries: WebhookDeliveryCounts,
    /// Disabled endpoints, with why.
    pub disabled: Vec<DisabledWebhook>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisabledWebhook {
    pub id: i64,
    pub url: String,
    pub reason: String,
}

/// An endpoint was disabled or enabled (on the event stream of its owner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEvent {
    pub id: i64,
    pub url: String,
    pub enabled: bool,
    pub reason: Option<String>,
}
