//! The deliverer of one connection: it leases the peer's queue and pushes it within a window of
//! unacked items, on wake-ups, acks and lease timers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::{MeshId, PublicKey, now_ms, wire};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::hub::Outbound;

/// Leases the peer's queue and pushes it, keeping at most `deliver_window` deliveries unacked. Runs on
/// wake-ups (new items), acks (room in the window) and a timer for the earliest lease to run out, so an
/// unacked delivery is sent again without waiting for any other event.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn deliver_loop(
    shared: Arc<Shared>,
    mesh: MeshId,
    key: PublicKey,
    conn_id: u64,
    wake: Arc<Notify>,
    mut acked: mpsc::UnboundedReceiver<Vec<u64>>,
    out: mpsc::Sender<Outbound>,
    stop: CancellationToken,
) {
    let window = shared.config.deliver_window as usize;
    let lease_ms = shared.config.lease.as_millis() as u64;
    let mut inflight: HashMap<u64, u64> = HashMap::new();
    let mut retry_at: Option<Instant> = None;
    // Leases held by a connection that is gone (or by another one) run out on their own: wake then.
    let mut foreign: Option<u64> = None;
    // Whether the queue may hold items this connection could take. Cleared by a lease that found fewer
    // than it asked for; set by a wake-up (new or released items) and by any lease running out. An ack
    // alone adds nothing to the queue, so it does not cost a lease that would find it empty.
    let mut more = true;
    loop {
        let now = now_ms();
        let held = inflight.len();
        inflight.retain(|_, until| *until > now);
        more |= inflight.len() < held;
        // Lease again once half the window is free: fewer, larger leases under load, and at once when
        // idle (an empty window is always below half).
        let refill = |inflight: &HashMap<u64, u64>| inflight.len() <= window / 2;
        if more && refill(&inflight) && retry_at.is_none_or(|t| t <= Instant::now()) {
            retry_at = None;
            let asked = window - inflight.len();
            match shared.store.lease(mesh, key, conn_id, asked as u32, now, lease_ms).await {
                Ok(lease) => {
                    more = lease.items.len() >= asked;
                    foreign = lease.next_foreign_expiry;
                    for item in lease.items {
                        if item.redelivery {
                            shared.metrics.redeliveries.inc();
                        } else {
                            shared.metrics.deliveries.inc();
                        }
                        inflight.insert(item.delivery_id, now + lease_ms);
                        let frame = wire::deliver_frame_json(item.delivery_id, &item.item_json);
                        // A peer that stops reading fills the buffer; stopping must not wait for it.
                        tokio::select! {
                            sent = out.send(Outbound::Text(frame)) => if sent.is_err() { return },
                            () = stop.cancelled() => return,
                        }
                    }
                }
                Err(e) => {
                    crate::store::log_failure("leasing deliveries; retrying in 1 s", &e);
                    foreign = None;
                    retry_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
        let now = now_ms();
        let next_expiry = inflight
            .values()
            .copied()
            .chain(foreign.filter(|_| refill(&inflight)))
            .min()
            .map(|until| Instant::now() + Duration::from_millis(until.saturating_sub(now)));
        let deadline = match (next_expiry, retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => more = true,
            ids = acked.recv() => match ids {
                Some(ids) => for id in ids { inflight.remove(&id); },
                None => return,
            },
            // A lease ran out (this connection's or another's), or a failed lease is due again.
            () = sleep_until_opt(deadline) => more = true,
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
