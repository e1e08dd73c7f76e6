//! Admission of connections that have not authenticated yet: how many may wait for their `hello` at
//! once, in all and from one address, and how fast one address may open new ones.
//!
//! Connections that never say hello must cost the broker a bounded amount of memory, and must never
//! keep members out. So the places are bounded, and when they are all taken a new connection takes
//! the place of the one that has waited longest (from the same address when that address is at its
//! bound): an honest client says hello within milliseconds, so holding places only works by opening
//! connections faster than that, which the per-address rate refuses (HTTP 503, before the WebSocket
//! upgrade).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::ratelimit::RateLimiter;

#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_address: usize,
    rate: RateLimiter<IpAddr>,
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    /// Every waiting connection, the longest-waiting first.
    queue: VecDeque<Place>,
}

#[derive(Debug)]
struct Place {
    id: u64,
    address: IpAddr,
    /// Cancelled when a newer connection takes this place.
    evicted: CancellationToken,
}

/// A connection admitted and not yet authenticated; its place is given back when this is dropped.
#[derive(Debug)]
pub struct Pending {
    admission: Arc<Admission>,
    id: u64,
    evicted: CancellationToken,
}

impl Admission {
    /// At most `max_total` waiting connections, `max_per_address` from one address, and new ones from
    /// one address at `per_sec` a second (bursts of twice `max_per_address`).
    pub fn new(max_total: usize, max_per_address: usize, per_sec: u32) -> Arc<Admission> {
        let burst = u32::try_from(max_per_address.saturating_mul(2)).unwrap_or(u32::MAX);
        Arc::new(Admission {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            rate: RateLimiter::new(per_sec, burst),
            waiting: Mutex::default(),
        })
    }

    /// A place for a connection from `address`, taking the longest-waiting one's when all are
    /// taken; refused only when the address opens connections too fast.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Pending, &'static str> {
        if self.rate.try_take(address).is_err() {
            return Err("too many new connections from this address; retry shortly");
        }
        let mut w = self.lock();
        let from_address = w.queue.iter().filter(|p| p.address == address).count();
        let oldest = if from_address >= self.max_per_address {
            w.queue.iter().position(|p| p.address == address)
        } else if w.queue.len() >= self.max_total {
            Some(0)
        } else {
            None
        };
        if let Some(place) = oldest.and_then(|i| w.queue.remove(i)) {
            place.evicted.cancel();
        }
        let id = w.next;
        w.next += 1;
        let evicted = CancellationToken::new();
        w.queue.push_back(Place { id, address, evicted: evicted.clone() });
        Ok(Pending { admission: self.clone(), id, evicted })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pending {
    /// Resolves when a newer connection took this one's place.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }

    /// The same, as a future the connection's stream can own.
    pub fn eviction(&self) -> crate::guard::Eviction {
        Box::pin(self.evicted.clone().cancelled_owned())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut w = self.admission.lock();
        if let Some(i) = w.queue.iter().position(|p| p.id == self.id) {
            w.queue.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn waiting(admission: &Admission) -> usize {
        admission.lock().queue.len()
    }

    async fn is_evicted(p: &Pending) -> bool {
        tokio::time::timeout(Duration::ZERO, p.evicted()).await.is_ok()
    }

    #[tokio::test]
    async fn a_new_connection_takes_the_place_of_the_one_waiting_longest() {
        let admission = Admission::new(3, 2, 1000);
        let (a, b) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let a1 = admission.admit(a).expect("first");
        let a2 = admission.admit(a).expect("second");
        // The address is at its bound: its own oldest gives way.
        let a3 = admission.admit(a).expect("third");
        assert!(is_evicted(&a1).await && !is_evicted(&a2).await);
        assert_eq!(waiting(&admission), 2);
        // All places taken: the oldest of all gives way.
        let _b1 = admission.admit(b).expect("another address");
        let _b2 = admission.admit(b).expect("in all");
        assert!(is_evicted(&a2).await && !is_evicted(&a3).await);
        assert_eq!(waiting(&admission), 3);
        drop((a1, a2, a3));
        assert_eq!(waiting(&admission), 2, "places given back, an evicted one's only once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_opening_connections_too_fast_is_refused() {
        let admission = Admission::new(1000, 2, 10);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let burst: Vec<_> = (0..4).map(|_| admission.admit(a).expect("within the burst")).collect();
        assert!(admission.admit(a).is_err(), "past the burst");
        assert!(admission.admit("10.0.0.2".parse().expect("ip")).is_ok(), "per address");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(admission.admit(a).is_ok(), "at the rate");
        drop(burst);
    }
}
