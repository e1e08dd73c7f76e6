//! The daemon itself: `/v1/status`.

use serde::{Deserialize, Serialize};

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
    #[serde(default)]
    pub webhooks: crate::api::WebhookStatus,
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
    /// How the connection to the broker is protected.
    #[serde(default)]
    pub transport: Transport,
    /// For a broker verified by pin: the pin (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pin: Option<String>,
    pub connection: LinkStatus,
    pub peers_online: u32,
    pub peers_total: u32,
    pub outbox: OutboxCounts,
}

/// How a mesh's broker connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// `ws://` to this machine: nothing leaves it.
    #[default]
    Loopback,
    /// `wss://`, verified by the platform's certificate authorities.
    Tls,
    /// `wss://`, verified by the pin of the broker's certificate.
    TlsPinned,
    /// `ws://` to another machine: who talks to whom, when and how much is visible on the path
    /// (message bodies stay end-to-end encrypted).
    Unencrypted,
}

impl Transport {
    pub fn of(broker_url: &str, pinned: bool, unencrypted: bool) -> Transport {
        match (broker_url.starts_with("wss://"), pinned, unencrypted) {
            (true, true, _) => Transport::TlsPinned,
            (true, false, _) => Transport::Tls,
            (false, _, true) => Transport::Unencrypted,
            (false, _, false) => Transport::Loopback,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Loopback => "loopback",
            Transport::Tls => "TLS",
            Transport::TlsPinned => "TLS, pinned certificate",
            Transport::Unencrypted => "unencrypted transport",
        }
    }
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
    /// The broker's clock minus this machine's, in ms, as measured at the last `welcome`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_ms: Option<i64>,
    /// While refused for the broker's TLS certificate: the one it presented (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// While online: the broker address it is connected to (one of the mesh's addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
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

/// `POST /v1/backup`: a consistent copy of the daemon's state, written to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    /// An absolute path that does not exist yet.
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub path: String,
    /// When the copies were taken (ms).
    pub created_at: u64,
    /// The archive's size.
    pub bytes: u64,
    pub files: Vec<BackupFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    pub name: String,
    pub bytes: u64,
}
