//! mesh-ipc: the contract between the `mesh` CLI (and TUI) and the daemon.
//!
//! It owns where files live ([`paths`]), the routes ([`routes`]), their request and response bodies
//! ([`api`]) and the client ([`client`]). Only these types cross the CLI↔daemon boundary; the daemon's
//! server implements exactly these routes. Transport: HTTP/1.1 with JSON bodies on a Unix socket
//! (mode 0600, in a 0700 directory), one request per connection.

pub mod api;
pub mod client;
pub mod events;
pub mod paths;

pub use client::{IpcClient, IpcError};
pub use paths::Home;

/// The version of this contract. It is in the socket's file name and in every request's
/// [`VERSION_HEADER`]; a daemon refuses requests of another version with `version_mismatch`.
pub const IPC_VERSION: u32 = 1;

/// Header carrying [`IPC_VERSION`] on every request.
pub const VERSION_HEADER: &str = "x-mesh-ipc";

/// With the member's token: act as the session with this key (the TUI's all-sessions view).
pub const AS_SESSION_HEADER: &str = "x-mesh-as-session";

/// Largest request body the daemon reads.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Largest message body `POST /v1/send` accepts (bytes of UTF-8).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

pub mod routes {
    pub const VERSION: &str = "/v1/version";
    pub const STATUS: &str = "/v1/status";
    pub const SHUTDOWN: &str = "/v1/shutdown";
    pub const BACKUP: &str = "/v1/backup";
    pub const MESHES: &str = "/v1/meshes";
    pub const MESHES_JOIN: &str = "/v1/meshes/join";
    pub const MESHES_RENAME: &str = "/v1/meshes/rename";
    pub const MESHES_REPIN: &str = "/v1/meshes/repin";
    /// `GET` a mesh's limits; `POST` changes them.
    pub const MESHES_LIMITS: &str = "/v1/meshes/limits";
    pub const MESHES_ROTATE_KEY: &str = "/v1/meshes/rotate-key";
    pub const MESHES_DELETE: &str = "/v1/meshes/delete";
    pub const CONTEXT: &str = "/v1/context";
    pub const INVITES: &str = "/v1/invites";
    pub const INVITES_REVOKE: &str = "/v1/invites/revoke";
    pub const MEMBERS_REMOVE: &str = "/v1/members/remove";
    pub const MEMBERS_LEAVE: &str = "/v1/members/leave";
    pub const MEMBERS_ROLE: &str = "/v1/members/role";
    pub const PEERS: &str = "/v1/peers";
    pub const SEND: &str = "/v1/send";
    pub const INBOX: &str = "/v1/inbox";
    pub const OUTBOX: &str = "/v1/outbox";
    /// `POST`: a dead or aborted row back to pending.
    pub const OUTBOX_RETRY: &str = "/v1/outbox/{id}/retry";
    /// `POST`: a pending row to aborted.
    pub const OUTBOX_ABORT: &str = "/v1/outbox/{id}/abort";
    /// `GET`: long-poll until the row is accepted or delivered.
    pub const OUTBOX_WAIT: &str = "/v1/outbox/{id}/wait";
    pub const SESSIONS: &str = "/v1/sessions";
    /// The calling session itself (`GET`), or its end (`POST /v1/session/end`).
    pub const SESSION: &str = "/v1/session";
    pub const SESSION_END: &str = "/v1/session/end";
    pub const INBOX_ACK: &str = "/v1/inbox/ack";
    /// `POST`: claim unread messages not yet announced to the caller on a channel (push, wake).
    pub const NOTICES_CLAIM: &str = "/v1/notices/claim";
    /// `POST`: confirm a claim once its messages were delivered.
    pub const NOTICES_CONFIRM: &str = "/v1/notices/confirm";
    pub const INBOX_FLUSH: &str = "/v1/inbox/flush";
    pub const INBOX_DELETE: &str = "/v1/inbox/delete";
    /// `POST`: process a row again (after a decrypt failure, say).
    pub const INBOX_REPLAY: &str = "/v1/inbox/{id}/replay";
    pub const GROUPS: &str = "/v1/groups";
    pub const GROUPS_JOIN: &str = "/v1/groups/join";
    pub const GROUPS_LEAVE: &str = "/v1/groups/leave";
    /// `GET`: Server-Sent Events of the caller (needs a bearer token).
    pub const EVENTS: &str = "/v1/events";
    /// `GET`: Prometheus metrics of the daemon (the member's bearer token).
    pub const METRICS: &str = "/v1/metrics";
    /// `GET` the caller's webhook endpoints; `POST` adds one.
    pub const WEBHOOKS: &str = "/v1/webhooks";
    /// `GET`: one endpoint.
    pub const WEBHOOK: &str = "/v1/webhooks/{id}";
    /// `POST`: queue a `webhook.test` delivery and wait for its first attempt.
    pub const WEBHOOK_TEST: &str = "/v1/webhooks/{id}/test";
    /// `POST`: a new signing secret; the previous one still signs during the overlap.
    pub const WEBHOOK_ROTATE: &str = "/v1/webhooks/{id}/rotate";
    pub const WEBHOOK_DISABLE: &str = "/v1/webhooks/{id}/disable";
    /// `POST`: enable again; its pending deliveries are due at once.
    pub const WEBHOOK_ENABLE: &str = "/v1/webhooks/{id}/enable";
    /// `POST`: remove the endpoint and its deliveries.
    pub const WEBHOOK_REMOVE: &str = "/v1/webhooks/{id}/remove";
    /// `GET`: its deliveries, newest first (`?status=&limit=`).
    pub const WEBHOOK_DELIVERIES: &str = "/v1/webhooks/{id}/deliveries";
    /// `POST`: every dead delivery of the endpoint pending again.
    pub const WEBHOOK_REDELIVER: &str = "/v1/webhooks/{id}/redeliver";
    /// `GET`: one delivery.
    pub const DELIVERY: &str = "/v1/webhook-deliveries/{id}";
    /// `POST`: one delivery pending again, whatever its state.
    pub const DELIVERY_REDELIVER: &str = "/v1/webhook-deliveries/{id}/redeliver";

    /// A route template with its `{id}` filled in.
    pub fn with_id(template: &str, id: i64) -> String {
        template.replace("{id}", &id.to_string())
    }
}

/// Names the file holding a session's token, for `mesh` commands run inside `mesh launch`.
pub const SESSION_FILE_ENV: &str = "MESH_SESSION_FILE";

/// Names the mesh a command means when it does not say (`--mesh`), for one shell or one session;
/// it overrides the context set by `mesh use`.
pub const CONTEXT_ENV: &str = "MESH_CONTEXT";
