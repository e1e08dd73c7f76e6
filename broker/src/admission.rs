//! Admission of connections that have not authenticated yet: how many may wait for their `hello` at
//! once, in all and from one address. Past either bound a new connection is refused before the
//! WebSocket upgrade (HTTP 503), so connections that never say hello cost the broker a bounded amount
//! of memory, and one address cannot crowd out the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_address: usize,
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A connection admitted and not yet authenticated; its place is given back when this is dropped.
#[derive(Debug)]
pub struct Pending {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admission {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Admission> {
        Arc::new(Admission { max_total, max_per_address, waiting: Mutex::default() })
    }

    /// A place for a connection from `address`, or why there is none.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Pending, &'static str> {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if w.total >= self.max_total {
            return Err("too many connections are waiting to authenticate; retry shortly");
        }
        let from = w.by_address.entry(address).or_default();
        if *from >= self.max_per_address {
            return Err("too many connections from this address are waiting to authenticate; retry shortly");
        }
        *from += 1;
        w.total += 1;
        Ok(Pending { admission: self.clone(), address })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut w = self.admission.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        w.total = w.total.saturating_sub(1);
        if let Some(n) = w.by_address.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_in_all_and_per_address_and_given_back() {
        let admission = Admission::new(3, 2);
        let (a, b) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let a1 = admission.admit(a).expect("first");
        let _a2 = admission.admit(a).expect("second");
        assert!(admission.admit(a).is_err(), "per address");
        let _b1 = admission.admit(b).expect("another address");
        assert!(admission.admit(b).is_err(), "in all");
        drop(a1);
        admission.admit(b).expect("a place given back");
    }
}
