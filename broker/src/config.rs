//! Broker configuration: every limit is a value here, announced to clients in `welcome`.

use std::time::Duration;

use mesh_proto::wire::{Limits, MeshLimits};

use crate::store::MeshLimitSettings;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// When set, creating a mesh requires this token in the `create` intent.
    pub create_token: Option<String>,
    /// Largest text frame accepted, in bytes; larger ones get `frame_too_large`.
    pub max_frame_bytes: usize,
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub sends_per_sec: u32,
    pub send_burst: u32,
    /// Connections one mesh may hold. A member's own connection is always let in: only sessions are
    /// refused at this limit, so no member can lock the others out.
    pub max_connections_per_mesh: usize,
    /// Connections one member may hold in a mesh, its sessions' included.
    pub max_connections_per_member: usize,
    /// Sessions one member may have in a mesh that have not ended.
    pub max_sessions_per_member: usize,
    /// Connections that have not authenticated yet, in all and from one address; past either, a new
    /// connection takes the place of the one waiting longest (which is closed).
    pub max_pending_handshakes: usize,
    pub max_pending_per_address: usize,
    /// New connections one address may open a second (bursts of twice `max_pending_per_address`);
    /// past it, HTTP 503. At the bounds above a new connection takes the place of the one that has
    /// waited longest, so only opening connections faster than this could hold places.
    pub handshakes_per_sec_per_address: u32,
    /// Peers in one roster page (`welcome` carries the first; `roster` requests fetch the rest).
    pub roster_page: usize,
    /// Unacked deliveries per connection before the broker pauses it.
    pub deliver_window: u32,
    /// How long a delivery waits for its ack before it is sent again.
    pub lease: Duration,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    /// A connection silent this long (no frame, no pong) is closed.
    pub idle_timeout: Duration,
    pub janitor_interval: Duration,
    /// A session not seen for this long (and not connected) is ended: it no longer counts as a
    /// recipient of broadcasts and group messages.
    pub session_stale: Duration,
    /// An ended session stays in the roster this long (DMs to it still queue for its next launch),
    /// then leaves it.
    pub session_grace: Duration,
    /// Added to the time this broker announces (`server_time`): for testing clients against a
    /// broker whose clock is off. 0 in production.
    pub clock_offset_ms: i64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            create_token: None,
            max_frame_bytes: 256 * 1024,
            default_ttl_ms: 7 * 24 * 60 * 60 * 1000,
            max_ttl_ms: 30 * 24 * 60 * 60 * 1000,
            sends_per_sec: 1000,
            send_burst: 2000,
            max_connections_per_mesh: 1000,
            max_connections_per_member: 100,
            max_sessions_per_member: 64,
            max_pending_handshakes: 256,
            max_pending_per_address: 64,
            handshakes_per_sec_per_address: 64,
            roster_page: 500,
            deliver_window: 256,
            lease: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            janitor_interval: Duration::from_secs(60),
            session_stale: Duration::from_secs(24 * 60 * 60),
            session_grace: Duration::from_secs(60 * 60),
            clock_offset_ms: 0,
        }
    }
}

impl BrokerConfig {
    /// The limits announced to a connection of a mesh with these settings.
    pub fn limits(&self, mesh: &MeshLimitSettings) -> Limits {
        Limits {
            mesh: self.mesh_limits(mesh),
            broker: self.broker_mesh_limits(),
            max_frame_bytes: self.max_frame_bytes as u64,
            default_ttl_ms: self.default_ttl_ms,
            max_ttl_ms: self.max_ttl_ms,
            sends_per_sec: self.sends_per_sec,
            send_burst: self.send_burst,
            deliver_window: self.deliver_window,
        }
    }

    /// The broker's values of the limits a mesh can set.
    pub fn broker_mesh_limits(&self) -> MeshLimits {
        let u32_of = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        MeshLimits {
            sessions_per_member: u32_of(self.max_sessions_per_member),
            connections_per_member: u32_of(self.max_connections_per_member),
            connections: u32_of(self.max_connections_per_mesh),
        }
    }

    /// The limits in force in a mesh with these settings: each the smaller of the mesh's and the
    /// broker's (an operator who lowers a limit lowers it for every mesh).
    pub fn mesh_limits(&self, mesh: &MeshLimitSettings) -> MeshLimits {
        let broker = self.broker_mesh_limits();
        let pick = |set: Option<u32>, max: u32| set.map_or(max, |v| v.min(max));
        MeshLimits {
            sessions_per_member: pick(mesh.sessions_per_member, broker.sessions_per_member),
            connections_per_member: pick(mesh.connections_per_member, broker.connections_per_member),
            connections: pick(mesh.connections, broker.connections),
        }
    }
}
