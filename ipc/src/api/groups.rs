//! Groups: `/v1/groups…`.

use serde::{Deserialize, Serialize};

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
