//! Per-member send rate limits: a token bucket per (mesh, member) in memory. A member's sessions
//! share its bucket. Limits are advisory state: a restart refills every bucket.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use mesh_proto::{MeshId, PublicKey};
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<(MeshId, PublicKey), Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter { per_sec: f64::from(per_sec.max(1)), burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Takes one send from `member`'s bucket, or says how long until one is available (ms).
    pub fn try_take(&self, mesh: MeshId, member: PublicKey) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = buckets.entry((mesh, member)).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / self.per_sec) * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_at_the_rate() {
        let l = RateLimiter::new(10, 3);
        let (mesh, who) = (MeshId([1; 16]), PublicKey([2; 32]));
        for _ in 0..3 {
            l.try_take(mesh, who).expect("within burst");
        }
        let wait = l.try_take(mesh, who).expect_err("burst used up");
        assert!((1..=100).contains(&wait), "{wait}");
        assert!(l.try_take(mesh, PublicKey([3; 32])).is_ok(), "buckets are per member");
        tokio::time::advance(std::time::Duration::from_millis(wait)).await;
        l.try_take(mesh, who).expect("refilled");
    }
}
