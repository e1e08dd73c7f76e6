//! Rate limits: a token bucket per key in memory — per (mesh, member) for sends (a member's sessions
//! share its bucket), per address for new connections. Limits are advisory state: a restart refills
//! every bucket.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// Buckets kept before full ones (unused for a while) are forgotten.
const PRUNE_AT: usize = 4096;

#[derive(Debug)]
pub struct RateLimiter<K> {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter<K> {
        RateLimiter { per_sec: f64::from(per_sec.max(1)), burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is available (ms).
    pub fn try_take(&self, key: K) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= PRUNE_AT {
            // A bucket that has filled up again is the same as none.
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst);
        }
        let b = buckets.entry(key).or_insert(Bucket { tokens: self.burst, at: now });
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
        use mesh_proto::{MeshId, PublicKey};
        let l = RateLimiter::new(10, 3);
        let (mesh, who) = (MeshId([1; 16]), PublicKey([2; 32]));
        for _ in 0..3 {
            l.try_take((mesh, who)).expect("within burst");
        }
        let wait = l.try_take((mesh, who)).expect_err("burst used up");
        assert!((1..=100).contains(&wait), "{wait}");
        assert!(l.try_take((mesh, PublicKey([3; 32]))).is_ok(), "buckets are per member");
        tokio::time::advance(std::time::Duration::from_millis(wait)).await;
        l.try_take((mesh, who)).expect("refilled");
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_forgotten_so_many_keys_cost_a_bounded_amount() {
        let l = RateLimiter::new(1000, 2);
        for k in 0..(PRUNE_AT as u32 * 3) {
            l.try_take(k).expect("a new key has its burst");
            if k % 1000 == 0 {
                tokio::time::advance(std::time::Duration::from_millis(10)).await;
            }
        }
        assert!(l.buckets.lock().expect("lock").len() <= PRUNE_AT + 1000);
    }
}
