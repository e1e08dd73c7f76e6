//! Request and response bodies of the IPC routes. Every body is JSON; every failure is an
//! [`ApiError`] with a code from a closed list and an HTTP status in the 4xx/5xx range.

use mesh_proto::wire::PeerKind;
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
    /// For a refused broker certificate: the one presented (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
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
    /// The mesh's rules do not let this member do that (remove the owner, change a role as an admin).
    Forbidden,
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
    /// A `wss://` broker whose certificate no authority here vouches for: pin it (the error's
    /// `certificate` is the one it presented) after checking it with the broker's operator.
    CertificateUntrusted,
    /// The broker's certificate was refused: not the pinned one, expired, for another host.
    CertificateRefused,
    /// Plain `ws://` to another machine without `insecure`.
    InsecureTransport,
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
            | ApiErrorCode::VersionMismatch
            | ApiErrorCode::InsecureTransport => 400,
            ApiErrorCode::Unauthorized => 401,
            ApiErrorCode::Forbidden => 403,
            ApiErrorCode::NotFound | ApiErrorCode::UnknownMesh => 404,
            ApiErrorCode::MethodNotAllowed => 405,
            ApiErrorCode::Conflict | ApiErrorCode::NameTaken => 409,
            ApiErrorCode::PayloadTooLarge => 413,
            ApiErrorCode::UnsupportedMediaType => 415,
            ApiErrorCode::BrokerRefused => 422,
            ApiErrorCode::BrokerUnreachable | ApiErrorCode::CertificateUntrusted | ApiErrorCode::CertificateRefused => {
                502
            }
            ApiErrorCode::ShuttingDown => 503,
            ApiErrorCode::Internal | ApiErrorCode::Unknown => 500,
        }
    }
}

mod daemon;
mod events;
mod groups;
mod inbox;
mod members;
mod meshes;
mod sending;
mod sessions;
mod webhooks;

pub use daemon::*;
pub use events::*;
pub use groups::*;
pub use inbox::*;
pub use members::*;
pub use meshes::*;
pub use sending::*;
pub use sessions::*;
pub use webhooks::*;
