//! The daemon's clock: milliseconds since the Unix epoch that advance with tokio's clock.
//!
//! Read once from the wall clock, then carried forward by tokio's monotonic `Instant`, so scheduling
//! (backoff, leases, retries) is immune to wall-clock jumps and can be driven by
//! `tokio::time::pause()` in tests.

use std::sync::OnceLock;

static BASE: OnceLock<(u64, tokio::time::Instant)> = OnceLock::new();

pub fn now_ms() -> u64 {
    let (wall, start) = *BASE.get_or_init(|| (mesh_proto::now_ms(), tokio::time::Instant::now()));
    wall + tokio::time::Instant::now().saturating_duration_since(start).as_millis() as u64
}
