//! `POST /v1/notices/claim`: the caller's unread messages not yet announced on a channel.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;

use super::messages::MAX_WAIT;
use super::{Body, Caller, Failure};
use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::notices;

/// Messages one claim returns at most.
const MAX_CLAIM: u32 = 100;

/// Claims the caller's own unread messages on a channel; with a wait, waits for one to arrive, until
/// the wait ends or a newer waiting claim on the same channel takes over.
pub async fn claim(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<ClaimNoticesRequest>,
) -> Result<Json<ClaimNoticesResponse>, Failure> {
    let limit = match req.limit {
        Some(0) => return Err(Failure::bad_request("limit must be at least 1")),
        Some(n) => n.min(MAX_CLAIM),
        None => MAX_CLAIM,
    };
    let wait = Duration::from_millis(req.wait_ms);
    if wait > MAX_WAIT {
        return Err(Failure::bad_request(format!("wait_ms is at most {} (10 minutes)", MAX_WAIT.as_millis())));
    }
    if req.claimant.as_ref().is_some_and(|c| c.is_empty() || c.len() > 64) {
        return Err(Failure::bad_request("claimant is 1 to 64 characters"));
    }
    let deadline = tokio::time::Instant::now() + wait;
    let recipient = caller.key(&d);
    let waiter = (!wait.is_zero()).then(|| d.claimants.enter(recipient, req.channel));
    let mut changed = d.subscribe();
    loop {
        changed.borrow_and_update();
        if waiter.as_ref().is_some_and(|w| !w.is_current()) {
            return Ok(Json(ClaimNoticesResponse { messages: Vec::new(), more: 0, superseded: true }));
        }
        let (channel, claimant) = (req.channel, req.claimant.clone());
        let (messages, more) =
            d.db.call(move |c| notices::claim(c, &recipient, channel, claimant.as_deref(), limit, now_ms())).await?;
        if !messages.is_empty() || wait.is_zero() {
            return Ok(Json(ClaimNoticesResponse { messages, more, superseded: false }));
        }
        let superseded = async {
            match &waiter {
                Some(w) => w.superseded.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err(Failure::stopping()) },
            () = superseded => {}
            () = d.shutdown.cancelled() => return Err(Failure::stopping()),
            () = tokio::time::sleep_until(deadline) => {
                return Ok(Json(ClaimNoticesResponse { messages: Vec::new(), more, superseded: false }));
            }
        }
    }
}

/// Confirms the caller's own claim: what it claimed was delivered.
pub async fn confirm(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<ConfirmNoticesRequest>,
) -> Result<Json<ConfirmNoticesResponse>, Failure> {
    let recipient = caller.key(&d);
    let confirmed = d.db.call(move |c| notices::confirm(c, &recipient, req.channel, &req.claimant, &req.ids)).await?;
    Ok(Json(ConfirmNoticesResponse { confirmed: confirmed as u64 }))
}
