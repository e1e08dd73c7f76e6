//! Agent sessions: `/v1/sessions`, `/v1/session…`.

use serde::{Deserialize, Serialize};

use super::*;

/// `POST /v1/sessions`: register a launch. The daemon writes the session's token to a 0600 file and
/// returns its path; the token itself never appears in an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// The process that will run as the session (the launcher, which then executes the command).
    pub pid: u32,
    /// When the session is live already and its process is `pid` (an agent whose MCP server or
    /// hook asks again), answer with it rather than `name_taken`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
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
