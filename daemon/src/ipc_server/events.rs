//! `GET /v1/events`: the caller's events as Server-Sent Events, replayable from SQLite.
//!
//! Needs a bearer token: a session's (its own events) or the member's (its own, or `scope=all`).
//! `Last-Event-ID` (or `?since=`) resumes after an event; without either the stream starts at the
//! newest event. Each subscriber reads the log at its own pace, so a slow one is never skipped; a
//! subscriber resuming from before the oldest kept event first gets a `resync` event.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use mesh_ipc::api::{ApiErrorCode, Event, EventBody, EventScope, EventsQuery};

use super::{Caller, Failure, Params};
use crate::daemon::Daemon;
use crate::events::{self, Scope};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events read from SQLite per step.
const BATCH: usize = 256;
/// Re-read at least this often, in case a wake-up was missed (the signal is only a hint).
const POLL: Duration = Duration::from_secs(5);

pub async fn stream(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    headers: HeaderMap,
    Params(q): Params<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Failure> {
    if !headers.contains_key(axum::http::header::AUTHORIZATION) {
        return Err(Failure::new(
            ApiErrorCode::Unauthorized,
            "the event stream needs a bearer token: a session's (MESH_SESSION_FILE) or the member's (config/member.token)"
                .into(),
        ));
    }
    let scope = match (q.scope, &caller) {
        (EventScope::Own, Caller::Session(s)) => Scope::Own { keys: vec![s.key()], meshes: vec![s.mesh_id] },
        (EventScope::Own, Caller::Member) => {
            let meshes = d.db.call(|c| crate::meshes::list(c)).await?.into_iter().map(|m| m.id).collect();
            Scope::Own { keys: vec![d.member.identity.key()], meshes }
        }
        (EventScope::All, Caller::Member) => Scope::All,
        (EventScope::All, Caller::Session(_)) => {
            return Err(Failure::new(
                ApiErrorCode::Unauthorized,
                "a session sees only its own events; scope=all needs the member's token".into(),
            ));
        }
    };
    // The header and `?since=` are read by the same rule: an event id, 0 or more.
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(resume_id(v.to_str().ok())?),
        None => q.since.map(|since| resume_id(Some(&since.to_string()))).transpose()?,
    };
    let (start, first) =
        d.db.call(|c| {
            let last: i64 = c.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
            Ok((last, events::first_id(c)?))
        })
        .await?;
    // An id past the newest (a client of a daemon whose log was lost) resumes from the newest.
    let resume = resume.map(|r| r.min(start));
    let after = resume.unwrap_or(start);
    let missed = match (resume, first) {
        (Some(r), Some(first)) if r.saturating_add(1) < first => Some(first),
        _ => None,
    };
    let resync = missed.map(|first_id| Event {
        id: first_id - 1,
        at: crate::clock::now_ms(),
        mesh: None,
        audience: None,
        body: EventBody::Resync { first_id },
    });
    let head = stream::iter(resync.map(|e| Ok(to_sse(&e, false))));
    let tail = follow(d, scope, after, q.follow)
        .flat_map(|batch| stream::iter(batch.into_iter().map(|e| Ok(to_sse(&e, true)))));
    Ok(Sse::new(head.chain(tail)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// A `Last-Event-ID` or `since`: an event id, 0 or more, within the range ids take.
fn resume_id(text: Option<&str>) -> Result<i64, Failure> {
    text.and_then(|s| s.trim().parse::<i64>().ok()).filter(|id| *id >= 0).ok_or_else(|| {
        Failure::bad_request("Last-Event-ID and since must be an event id (an integer from 0 to 2^63-1)")
    })
}

fn to_sse(e: &Event, with_id: bool) -> SseEvent {
    let sse = SseEvent::default()
        .event(e.body.kind())
        .json_data(e)
        .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event"));
    if with_id { sse.id(e.id.to_string()) } else { sse }
}

/// Batches of events after `after`, read from SQLite whenever the daemon signals a change; ends when
/// the daemon shuts down, or (`keep_following` false) once caught up.
fn follow(d: Arc<Daemon>, scope: Scope, after: i64, keep_following: bool) -> impl Stream<Item = Vec<Event>> {
    let changed = d.subscribe();
    stream::unfold((d, scope, after, changed), move |(d, scope, mut after, mut changed)| async move {
        loop {
            changed.borrow_and_update();
            let s = scope.clone();
            match d.db.call(move |c| events::read(c, &s, after, BATCH)).await {
                Ok(batch) if !batch.is_empty() => {
                    after = batch.last().map_or(after, |e| e.id);
                    return Some((batch, (d, scope, after, changed)));
                }
                Ok(_) if !keep_following => return None,
                Ok(_) => {}
                Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "reading events; retrying"),
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return None },
                () = d.shutdown.cancelled() => return None,
                () = tokio::time::sleep(POLL) => {}
            }
        }
    })
}
