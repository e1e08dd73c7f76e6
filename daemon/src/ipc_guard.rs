//! What one IPC connection may hold: a place among a bounded number of connections (a client that
//! cannot get one waits in the kernel's backlog; the connections already open are served on), its
//! request headers within 10 s of connecting, and no more than 11 minutes without a byte either way
//! (longer than the longest long-poll, 10 minutes; an event stream sends a keep-alive every 15 s).
//! The guard itself is the broker's ([`mesh_broker::guard`]).

use std::time::Duration;

use interprocess::local_socket::tokio::Stream;
use mesh_broker::guard::{Guarded, Rules};
use tokio::sync::OwnedSemaphorePermit;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// From connecting to the end of the first request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// With nothing read or written.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(11 * 60);

pub type GuardedStream = Guarded<Stream>;

/// An accepted connection holding `place` for its whole life, with the IPC's deadlines.
pub fn guard(inner: Stream, place: OwnedSemaphorePermit) -> GuardedStream {
    let rules = Rules { header_timeout: HEADER_TIMEOUT, idle_timeout: Some(IDLE_TIMEOUT), release_at_headers: false };
    Guarded::new(inner, Box::new(place), rules, None)
}
