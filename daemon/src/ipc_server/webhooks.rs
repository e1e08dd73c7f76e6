//! Webhook endpoints: `/v1/webhooks…` and `/v1/webhook-deliveries/{id}…` (docs/webhooks.md).
//!
//! A session registers, sees and manages its own endpoints only; the member every endpoint of this
//! daemon. An endpoint receives its owner's events only, like the owner's event stream.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;
use mesh_proto::Target;

use super::{Body, Caller, Failure, Params, RowId, own_mesh};
use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::webhooks::{self, Config, Redeliver, UrlError, Visible};

const MAX_URL_BYTES: usize = 2048;
const MAX_DESCRIPTION_CHARS: usize = 200;

fn config(d: &Daemon) -> Config {
    d.webhook_config.get().cloned().unwrap_or_default()
}

/// A session sees its own endpoints; the member all of them.
fn visible(caller: &Caller) -> Visible {
    match caller {
        Caller::Member => Visible::All,
        Caller::Session(s) => Visible::OwnedBy(s.key()),
    }
}

fn no_webhook(id: i64) -> Failure {
    Failure::not_found(format!("no webhook #{id}")).with_hint("`mesh webhook list` shows yours")
}

pub async fn add(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<AddWebhookRequest>,
) -> Result<Json<AddWebhookResponse>, Failure> {
    if req.url.len() > MAX_URL_BYTES {
        return Err(Failure::bad_request(format!("the URL is longer than {MAX_URL_BYTES} bytes")));
    }
    if req.description.as_ref().is_some_and(|t| t.chars().count() > MAX_DESCRIPTION_CHARS) {
        return Err(Failure::bad_request(format!("a description is at most {MAX_DESCRIPTION_CHARS} characters")));
    }
    let events = event_kinds(&req.events)?;
    let url = checked_url(&d, &req.url, req.allow_insecure_http).await?;
    let owner = caller.key(&d);
    let (owner_mesh, mesh) = match &caller {
        Caller::Session(s) => (
            Some(s.mesh_id),
            match &req.mesh {
                Some(asked) => Some(own_mesh(&d, s, Some(asked)).await?.id),
                None => None,
            },
        ),
        Caller::Member => (
            None,
            match req.mesh.clone() {
                Some(asked) => Some(
                    d.db.call(move |c| Ok(crate::meshes::context_mesh(c, Some(&asked))))
                        .await?
                        .map_err(Failure::from)?
                        .map(|(row, _)| row.id)
                        .ok_or_else(|| Failure::new(ApiErrorCode::UnknownMesh, "no such mesh".into()))?,
                ),
                None => None,
            },
        ),
    };
    let peer = match req.from.clone() {
        None => None,
        Some(from) if from.trim() == "*" || from.trim().starts_with('@') => {
            return Err(Failure::bad_request("--from names one peer, not a group or everyone"));
        }
        Some(from) => {
            // Looked up in the endpoint's mesh (or the session's), else in every mesh: the context
            // (`mesh use`, MESH_CONTEXT) does not apply to webhooks.
            let scope_mesh = mesh.or(owner_mesh);
            let resolved =
                d.db.call(move |c| {
                    let meshes =
                        crate::meshes::list(c)?.into_iter().filter(|m| scope_mesh.is_none_or(|s| s == m.id)).collect();
                    Ok(crate::roster::resolve(c, &from, &crate::roster::Scope { meshes, chosen_by: None }, &owner))
                })
                .await?
                .map_err(Failure::from)?;
            match resolved.target {
                Target::Key(k) => Some(k),
                Target::Group(_) | Target::All => {
                    return Err(Failure::bad_request("--from names one peer, not a group or everyone"));
                }
            }
        }
    };
    let new = webhooks::NewWebhook {
        owner,
        owner_mesh,
        url: url.to_string(),
        events,
        mesh,
        peer,
        description: req.description.filter(|t| !t.trim().is_empty()),
        allow_insecure_http: req.allow_insecure_http,
    };
    let (webhook, secret) =
        d.db.call(move |c| {
            let (id, secret) = webhooks::add(c, &new, now_ms())?;
            Ok((webhooks::get(c, Visible::All, id)?, secret))
        })
        .await?;
    let webhook = webhook.ok_or_else(|| no_webhook(0))?;
    tracing::info!(webhook = webhook.id, owner = %owner, "webhook added");
    Ok(Json(AddWebhookResponse { webhook, secret }))
}

/// The kinds asked for, checked; none means the default.
fn event_kinds(asked: &[String]) -> Result<Vec<String>, Failure> {
    let mut kinds: Vec<String> = Vec::new();
    for k in asked.iter().flat_map(|k| k.split(',')).map(str::trim).filter(|k| !k.is_empty()) {
        if !WEBHOOK_EVENT_KINDS.contains(&k) {
            return Err(Failure::bad_request(format!(
                "{k:?} is not an event kind a webhook can receive; choose from {}",
                WEBHOOK_EVENT_KINDS.join(", ")
            )));
        }
        if !kinds.iter().any(|x| x == k) {
            kinds.push(k.to_owned());
        }
    }
    if kinds.is_empty() && !asked.is_empty() {
        return Err(Failure::bad_request(format!(
            "--events names no kind; choose from {} (or leave it out for message,receipt)",
            WEBHOOK_EVENT_KINDS.join(", ")
        )));
    }
    if kinds.is_empty() {
        kinds = DEFAULT_WEBHOOK_EVENTS.iter().map(|k| k.to_string()).collect();
    }
    Ok(kinds)
}

/// Checks a URL against the rules (docs/webhooks.md), with this machine's brokers as they are now.
async fn checked_url(d: &Daemon, url: &str, allow_insecure_http: bool) -> Result<reqwest::Url, Failure> {
    webhooks::check_url_now(d, url, allow_insecure_http).await?.map_err(url_failure)
}

fn url_failure(e: UrlError) -> Failure {
    let hint = match e {
        UrlError::InsecureHttp(_) => Some("use https://, or pass --allow-insecure-http if this network is yours"),
        _ => None,
    };
    let f = Failure::bad_request(e.to_string());
    match hint {
        Some(h) => f.with_hint(h),
        None => f,
    }
}

pub async fn list(State(d): State<Arc<Daemon>>, caller: Caller) -> Result<Json<Vec<WebhookInfo>>, Failure> {
    let vis = visible(&caller);
    Ok(Json(d.db.call(move |c| webhooks::list(c, vis)).await?))
}

/// Runs `f` on the caller's endpoint `id`; a missing one (or another's) is `not_found`.
async fn with_webhook<R: Send + 'static>(
    d: &Daemon,
    caller: &Caller,
    id: i64,
    f: impl FnOnce(&mut rusqlite::Connection, Visible) -> rusqlite::Result<Option<R>> + Send + 'static,
) -> Result<R, Failure> {
    let vis = visible(caller);
    d.db.call(move |c| f(c, vis)).await?.ok_or_else(|| no_webhook(id))
}

pub async fn show(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<WebhookInfo>, Failure> {
    Ok(Json(with_webhook(&d, &caller, id, move |c, vis| webhooks::get(c, vis, id)).await?))
}

pub async fn rotate(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<RotateWebhookResponse>, Failure> {
    let overlap = config(&d).rotation_overlap;
    let (secret, until, webhook) = with_webhook(&d, &caller, id, move |c, vis| {
        let tx = c.transaction()?;
        let Some((secret, until)) = webhooks::rotate(&tx, vis, id, overlap, now_ms())? else { return Ok(None) };
        let info = webhooks::get(&tx, vis, id)?;
        tx.commit()?;
        Ok(info.map(|w| (secret, until, w)))
    })
    .await?;
    tracing::info!(webhook = id, "webhook secret rotated");
    Ok(Json(RotateWebhookResponse { webhook, secret, previous_valid_until: until }))
}

async fn set_enabled(d: Arc<Daemon>, caller: Caller, id: i64, enabled: bool) -> Result<Json<WebhookInfo>, Failure> {
    let info = with_webhook(&d, &caller, id, move |c, vis| {
        let tx = c.transaction()?;
        let reason = (!enabled).then_some("disabled by `mesh webhook disable`");
        if !webhooks::set_enabled(&tx, vis, id, enabled, reason, now_ms())? {
            return Ok(None);
        }
        let info = webhooks::get(&tx, vis, id)?;
        tx.commit()?;
        Ok(info)
    })
    .await?;
    d.notify_changed();
    Ok(Json(info))
}

pub async fn disable(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<WebhookInfo>, Failure> {
    set_enabled(d, caller, id, false).await
}

pub async fn enable(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<WebhookInfo>, Failure> {
    set_enabled(d, caller, id, true).await
}

pub async fn remove(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<WebhookInfo>, Failure> {
    let info = with_webhook(&d, &caller, id, move |c, vis| {
        let tx = c.transaction()?;
        let Some(info) = webhooks::get(&tx, vis, id)? else { return Ok(None) };
        webhooks::remove(&tx, vis, id)?;
        tx.commit()?;
        Ok(Some(info))
    })
    .await?;
    d.notify_changed();
    Ok(Json(info))
}

pub async fn deliveries(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
    Params(q): Params<DeliveriesQuery>,
) -> Result<Json<Vec<DeliveryInfo>>, Failure> {
    if q.limit.is_some_and(|l| !(1..=10_000).contains(&l)) {
        return Err(Failure::bad_request("limit is 1 to 10000"));
    }
    Ok(Json(
        with_webhook(&d, &caller, id, move |c, vis| {
            if webhooks::get(c, vis, id)?.is_none() {
                return Ok(None);
            }
            webhooks::deliveries(c, id, &q).map(Some)
        })
        .await?,
    ))
}

pub async fn delivery(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<DeliveryInfo>, Failure> {
    let vis = visible(&caller);
    d.db.call(move |c| webhooks::delivery(c, vis, id))
        .await?
        .map(Json)
        .ok_or_else(|| Failure::not_found(format!("no webhook delivery #{id}")))
}

pub async fn redeliver_dead(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<RedeliverResponse>, Failure> {
    let deadline = config(&d).deadline;
    let (n, endpoint_enabled) = with_webhook(&d, &caller, id, move |c, vis| {
        let Some(w) = webhooks::get(c, vis, id)? else { return Ok(None) };
        Ok(Some((webhooks::redeliver(c, Redeliver::AllDead(id), now_ms(), deadline)?, w.enabled)))
    })
    .await?;
    d.notify_changed();
    Ok(Json(RedeliverResponse { redelivered: n as u64, endpoint_enabled }))
}

pub async fn redeliver_one(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<RedeliverResponse>, Failure> {
    let deadline = config(&d).deadline;
    let vis = visible(&caller);
    let (n, endpoint_enabled) =
        d.db.call(move |c| {
            let Some(delivery) = webhooks::delivery(c, vis, id)? else { return Ok(None) };
            let enabled = webhooks::get(c, Visible::All, delivery.webhook_id)?.is_some_and(|w| w.enabled);
            Ok(Some((webhooks::redeliver(c, Redeliver::One(id), now_ms(), deadline)?, enabled)))
        })
        .await?
        .ok_or_else(|| Failure::not_found(format!("no webhook delivery #{id}")))?;
    d.notify_changed();
    Ok(Json(RedeliverResponse { redelivered: n as u64, endpoint_enabled }))
}

/// Queues a test delivery and waits for its first attempt (at most the request timeout and a margin).
pub async fn test(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<TestWebhookResponse>, Failure> {
    let cfg = config(&d);
    let deadline = cfg.deadline;
    let delivery = with_webhook(&d, &caller, id, move |c, vis| {
        match webhooks::get(c, vis, id)? {
            Some(w) if !w.enabled => return Ok(Some(Err(w.disabled_reason))),
            Some(_) => {}
            None => return Ok(None),
        }
        webhooks::enqueue_test(c, vis, id, now_ms(), deadline).map(|d| d.map(Ok))
    })
    .await?
    .map_err(|reason| {
        Failure::bad_request(format!("webhook #{id} is disabled ({})", reason.unwrap_or_default()))
            .with_hint(format!("`mesh webhook enable {id}` first"))
    })?;
    let mut changed = d.subscribe();
    d.notify_changed();
    let wait = cfg.timeout + Duration::from_secs(5);
    let give_up = tokio::time::sleep(wait);
    tokio::pin!(give_up);
    loop {
        changed.borrow_and_update();
        let info =
            d.db.call(move |c| webhooks::delivery(c, Visible::All, delivery))
                .await?
                .ok_or_else(|| Failure::not_found(format!("the test delivery #{delivery} was removed")))?;
        if info.last_attempt_at.is_some() || info.status != DeliveryStatus::Pending {
            return Ok(Json(TestWebhookResponse { delivery: info }));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err(Failure::stopping()) },
            () = &mut give_up => return Ok(Json(TestWebhookResponse { delivery: info })),
            () = d.shutdown.cancelled() => return Err(Failure::stopping()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_are_checked_split_and_deduplicated() {
        assert_eq!(event_kinds(&[]).expect("default"), ["message", "receipt"]);
        assert!(event_kinds(&["".into()]).is_err(), "given but empty is a mistake, not the default");
        assert!(event_kinds(&[",".into()]).is_err());
        assert_eq!(event_kinds(&["presence,message".into(), "message".into()]).expect("ok"), ["presence", "message"]);
        assert!(event_kinds(&["messages".into()]).is_err());
        assert!(event_kinds(&["webhook".into()]).is_err(), "an endpoint's own state is not an event it can get");
    }
}
