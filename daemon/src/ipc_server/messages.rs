//! Sending and reading: `/v1/send`, `/v1/inbox`, `/v1/outbox` and the outbox row actions.
//! The send handler is the daemon's accept path: request → committed outbox row → answer.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::MAX_MESSAGE_BYTES;
use mesh_ipc::api::*;
use mesh_proto::PublicKey;
use mesh_proto::message::{self, Content, SealKey};
use sha2::Digest;

use super::{Body, Caller, Failure, Params, RowId, list_scope, own_mesh};
use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::inbox;
use crate::outbox::{self, Transition};
use crate::roster::{self, SealWith};

const MAX_CLIENT_MESSAGE_ID: usize = 128;
/// Longer than any name, key or group: refused rather than looked up and echoed back.
const MAX_TARGET_CHARS: usize = 80;
const TARGET_HINT: &str = "a target is a name, a key or a 4+ digit key prefix (see `mesh peers`), @group, or *";
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Within the IPC idle timeout ([`crate::ipc_guard::IDLE_TIMEOUT`]).
pub(super) const MAX_WAIT: Duration = Duration::from_secs(600);
/// How long a replay waits for the worker before answering with the row as it stands.
const REPLAY_WAIT: Duration = Duration::from_secs(10);

/// The request fingerprint of a send, hex SHA-256 over its JSON array of fields (see docs/protocol.md).
/// The sender's key is part of it: one identity's row never answers another identity's request.
fn send_fingerprint(req: &SendRequest, sender: &mesh_proto::PublicKey) -> String {
    let fields = serde_json::json!([req.to, req.mesh, req.body, sender.to_string()]);
    hex::encode(sha2::Sha256::digest(fields.to_string().as_bytes()))
}

fn row_vanished() -> Failure {
    Failure::new(ApiErrorCode::Internal, "the outbox row vanished".into())
}

fn response_of(e: OutboxEntry, duplicate: bool) -> SendResponse {
    SendResponse {
        outbox_id: e.id,
        client_message_id: e.client_message_id,
        status: e.status,
        mesh: e.mesh,
        target: e.target,
        duplicate,
        sender: e.sender,
        wait: None,
        warning: None,
    }
}

/// Answers a resend of an existing `client_message_id`: the stored row when the request is the same,
/// a conflict when it is not.
async fn existing_send(d: &Daemon, id: i64, fingerprint: &str, stored: &str) -> Result<Json<SendResponse>, Failure> {
    if stored != fingerprint {
        return Err(Failure::new(
            ApiErrorCode::Conflict,
            "this client_message_id (idempotency key) was already used for a different message".into(),
        ));
    }
    let entry = d.db.call(move |c| outbox::entry(c, id)).await?.ok_or_else(row_vanished)?;
    Ok(Json(response_of(entry, true)))
}

pub async fn send(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<SendRequest>,
) -> Result<Json<SendResponse>, Failure> {
    accept(&d, &caller, req).await
}

/// The accept path, callable without HTTP (for tests and benchmarks).
pub async fn accept(d: &Arc<Daemon>, caller: &Caller, req: SendRequest) -> Result<Json<SendResponse>, Failure> {
    let cmid = req.client_message_id.clone();
    if cmid.is_empty() || cmid.len() > MAX_CLIENT_MESSAGE_ID || cmid.chars().any(char::is_control) {
        return Err(Failure::bad_request("client_message_id must be 1-128 printable characters"));
    }
    if req.body.is_empty() {
        return Err(Failure::bad_request("the message is empty"));
    }
    if req.to.trim().is_empty() {
        return Err(Failure::bad_request("the target is empty").with_hint(TARGET_HINT));
    }
    if req.to.chars().count() > MAX_TARGET_CHARS {
        return Err(Failure::bad_request(format!(
            "the target is {} characters long; no name or key is",
            req.to.chars().count()
        ))
        .with_hint(TARGET_HINT));
    }
    if req.body.len() > MAX_MESSAGE_BYTES {
        return Err(Failure::new(
            ApiErrorCode::PayloadTooLarge,
            format!("the message is {} bytes; the limit is {MAX_MESSAGE_BYTES} bytes (64 KiB)", req.body.len()),
        ));
    }
    let fingerprint = send_fingerprint(&req, &caller.key(d));

    // One database call for the idempotency lookup and the routing, one for the commit: the accept
    // path is two hops to the database thread, with the sealing in between.
    enum Route {
        Resend(i64, String),
        New(Box<roster::Resolved>),
    }
    let session_mesh = match caller {
        Caller::Member => None,
        Caller::Session(s) => Some((s.mesh_id, s.name.clone())),
    };
    let (lookup_id, to, asked_mesh) = (cmid.clone(), req.to.clone(), req.mesh.clone());
    let sender_key = caller.key(d);
    let route =
        d.db.call(move |c| {
            // Idempotency first: a resend is answered from the stored row, whatever the roster says now.
            if let Some((id, stored)) = outbox::lookup(c, &lookup_id)? {
                return Ok(Ok(Route::Resend(id, stored)));
            }
            // A session speaks in its own mesh only.
            let mesh = match session_mesh {
                None => asked_mesh,
                Some((id, name)) => {
                    let Some(own) = crate::meshes::get(c, &id)? else {
                        return Ok(Err(Failure::new(ApiErrorCode::UnknownMesh, "this session's mesh is gone".into())));
                    };
                    if let Some(asked) = &asked_mesh
                        && *asked != own.name
                        && *asked != own.id.to_string()
                    {
                        return Ok(Err(Failure::bad_request(format!(
                            "session {name:?} belongs to mesh {:?}, not {asked:?}",
                            own.name
                        ))));
                    }
                    Some(own.id.to_string())
                }
            };
            let scope = match super::target_scope(c, mesh.as_deref()) {
                Ok(scope) => scope,
                Err(e) => return Ok(Err(Failure::from(e))),
            };
            Ok(roster::resolve(c, &to, &scope, &sender_key).map(|r| Route::New(Box::new(r))).map_err(Failure::from))
        })
        .await??;
    let resolved = match route {
        Route::Resend(id, stored) => return existing_send(d, id, &fingerprint, &stored).await,
        Route::New(r) => *r,
    };
    // Nothing can go out in a mesh this member was removed from (or whose owner deleted it).
    if super::meshes::removed_from(d, &resolved.mesh) {
        return Err(super::meshes::no_longer_in(d, &resolved.mesh));
    }
    let sender = caller.identity(d);
    let content = Content { body: req.body.clone(), reply_to: None };
    let (key, key_epoch) = match &resolved.seal {
        SealWith::Direct(enc) => (SealKey::Direct(enc), None),
        SealWith::Group => (SealKey::Group(&resolved.mesh.group_key), Some(resolved.mesh.key_epoch)),
    };
    let sealed = message::seal(&sender, &resolved.mesh.id, &cmid, &resolved.target, key, &content);
    let row = outbox::NewRow {
        client_message_id: cmid.clone(),
        fingerprint: fingerprint.clone(),
        mesh_id: resolved.mesh.id,
        sender: sender.key(),
        session: caller.session_name().map(str::to_owned),
        target: resolved.info.clone(),
        body: req.body,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        sig: sealed.sig,
        key_epoch,
    };
    let committed =
        d.db.call(move |c| match outbox::insert(c, &row, now_ms())? {
            Some(id) => Ok(Ok(outbox::entry(c, id)?)),
            // Another request with this id won the race: answer as a resend.
            None => Ok(Err(outbox::lookup(c, &row.client_message_id)?)),
        })
        .await?;
    match committed {
        Ok(entry) => {
            d.wake_drain(&resolved.mesh.id, &sender.key());
            let mut resp = response_of(entry.ok_or_else(row_vanished)?, false);
            resp.warning = stale_roster_warning(d, &resolved);
            Ok(Json(resp))
        }
        Err(existing) => {
            let (id, stored) = existing.ok_or_else(row_vanished)?;
            existing_send(d, id, &fingerprint, &stored).await
        }
    }
}

/// A name resolved while the mesh's connection is down was resolved against the roster as last seen:
/// say so, with the key it went to (a key is always exact).
fn stale_roster_warning(d: &Daemon, r: &roster::Resolved) -> Option<String> {
    let by_name = r.info.kind == TargetKind::Direct && r.info.label.to_ascii_lowercase() != r.info.address;
    let link = d.link_status(&r.mesh.id, &d.member.identity.key());
    (by_name && link.state != LinkState::Online).then(|| {
        format!(
            "mesh {} is not connected to its broker; {:?} was resolved from the roster as last seen, to key {}",
            r.mesh.name,
            r.info.label,
            &r.info.address[..8]
        )
    })
}

pub async fn inbox(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Params(q): Params<InboxQuery>,
) -> Result<Json<Vec<InboxMessage>>, Failure> {
    let mesh = match &caller {
        Caller::Session(s) => Some(own_mesh(&d, s, q.mesh.as_deref()).await?.id),
        Caller::Member => list_scope(&d, q.mesh.clone(), q.all_meshes).await?.map(|m| m.id),
    };
    let me = caller.key(&d);
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(Failure::bad_request(format!("wait_ms is at most {} (10 minutes)", MAX_WAIT.as_millis())));
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut changed = d.subscribe();
    loop {
        changed.borrow_and_update();
        let (q, recipients) = (q.clone(), vec![me]);
        let rows =
            d.db.call(move |c| {
                // `--from` names a sender as a target does (name, key or prefix) and filters by its key,
                // so a name someone else holds now never brings their messages in.
                let from = match q.from.as_deref() {
                    None => None,
                    Some(f) if inbox::has_sender(c, &recipients, f)? => Some(f.to_ascii_lowercase()),
                    Some(f) => {
                        let scope = match mesh {
                            Some(id) => crate::roster::Scope {
                                meshes: crate::meshes::get(c, &id)?.into_iter().collect(),
                                chosen_by: None,
                            },
                            None => roster::Scope { meshes: crate::meshes::list(c)?, chosen_by: None },
                        };
                        match roster::resolve(c, f, &scope, &PublicKey([0; 32])) {
                            Ok(r) => Some(r.info.address),
                            Err(e) => return Ok(Err(Failure::from(e))),
                        }
                    }
                };
                Ok(Ok(inbox::list(c, &recipients, mesh.as_ref(), &InboxQuery { from, ..q })?))
            })
            .await??;
        // A row still being filed (`received`) is not worth waking a waiter for: its body comes next.
        if rows.iter().any(|m| m.status != InboxStatus::Received) || wait.is_zero() {
            return Ok(Json(rows));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err(Failure::stopping()) },
            () = d.shutdown.cancelled() => return Err(Failure::stopping()),
            () = tokio::time::sleep_until(deadline) => return Ok(Json(rows)),
        }
    }
}

pub async fn outbox(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Params(q): Params<OutboxQuery>,
) -> Result<Json<Vec<OutboxEntry>>, Failure> {
    let scope = caller.scope();
    let mesh = match &caller {
        Caller::Session(s) => Some(own_mesh(&d, s, q.mesh.as_deref()).await?.id),
        Caller::Member => list_scope(&d, q.mesh.clone(), q.all_meshes).await?.map(|m| m.id),
    };
    let mut rows = d.db.call(move |c| outbox::list(c, &q, scope.as_ref(), mesh.as_ref())).await?;
    for row in &mut rows {
        with_link(&d, row);
    }
    Ok(Json(rows))
}

/// A row the broker has not accepted yet says which connection it waits for, and how that stands.
fn with_link(d: &Daemon, row: &mut OutboxEntry) {
    if !matches!(row.status, OutboxStatus::Pending | OutboxStatus::Inflight) {
        return;
    }
    if let (Ok(mesh), Ok(sender)) = (row.mesh_id.parse(), row.sender.parse()) {
        row.link = Some(d.link_status(&mesh, &sender));
    }
}

pub async fn ack(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<InboxAckRequest>,
) -> Result<Json<InboxAckResponse>, Failure> {
    if req.ids.is_empty() && !req.all {
        return Err(Failure::bad_request("name the messages to mark read, or pass all"));
    }
    let recipients = vec![caller.key(&d)];
    let ids = (!req.all).then_some(req.ids);
    let asked = ids.clone().unwrap_or_default();
    let (marked, owned) =
        d.db.call(move |c| {
            let owned = match &ids {
                Some(ids) => inbox::owned_ids(c, &recipients, ids)?,
                None => Vec::new(),
            };
            Ok((inbox::ack(c, &recipients, ids.as_deref(), now_ms())?, owned))
        })
        .await?;
    let acked: Vec<i64> = marked.iter().map(|(id, _, _)| *id).collect();
    let not_found: Vec<i64> = asked.iter().copied().filter(|id| !owned.contains(id)).collect();
    let already_read: Vec<i64> = owned.iter().copied().filter(|id| !acked.contains(id)).collect();
    let mut links: Vec<(mesh_proto::MeshId, mesh_proto::PublicKey)> = marked.iter().map(|(_, m, k)| (*m, *k)).collect();
    links.sort();
    links.dedup();
    for (mesh, key) in links {
        d.wake_drain(&mesh, &key);
    }
    d.notify_changed();
    Ok(Json(InboxAckResponse { acked, already_read, not_found }))
}

pub async fn flush(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<InboxFlushRequest>,
) -> Result<Json<InboxFlushResponse>, Failure> {
    let recipients = vec![caller.key(&d)];
    let deleted = d.db.call(move |c| inbox::flush(c, &recipients, req.before, req.all)).await?;
    if deleted > 0 {
        d.db.call(|c| crate::store::forget_deleted(c)).await?;
    }
    tracing::info!(deleted, "inbox flushed");
    Ok(Json(InboxFlushResponse { deleted: deleted as u64 }))
}

pub async fn delete(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<InboxDeleteRequest>,
) -> Result<Json<InboxDeleteResponse>, Failure> {
    let recipients = vec![caller.key(&d)];
    let ids = req.ids.clone();
    let deleted = d.db.call(move |c| inbox::delete(c, &recipients, &ids)).await?;
    if !deleted.is_empty() {
        d.db.call(|c| crate::store::forget_deleted(c)).await?;
    }
    let not_found = req.ids.into_iter().filter(|id| !deleted.contains(id)).collect();
    Ok(Json(InboxDeleteResponse { deleted, not_found }))
}

/// Processes one of the caller's rows again and answers with the result.
pub async fn replay(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<InboxMessage>, Failure> {
    let recipients = vec![caller.key(&d)];
    let mut changed = d.subscribe();
    changed.borrow_and_update();
    let requeued = d.db.call(move |c| inbox::requeue(c, &recipients, id)).await?;
    if !requeued {
        let recipients = vec![caller.key(&d)];
        let mine = d.db.call(move |c| inbox::owned(c, &recipients, id)).await?;
        return Err(if mine {
            Failure::new(
                ApiErrorCode::Conflict,
                format!("inbox row #{id} could not be parsed at all; it cannot be processed again"),
            )
        } else {
            Failure::new(ApiErrorCode::NotFound, format!("no inbox row #{id} of yours"))
        });
    }
    d.inbox_wake.notify_one();
    let deadline = tokio::time::Instant::now() + REPLAY_WAIT;
    loop {
        let row = d.db.call(move |c| inbox::get(c, id)).await?;
        if row.status != InboxStatus::Received {
            return Ok(Json(row));
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(deadline) => return Ok(Json(row)),
            () = d.shutdown.cancelled() => return Err(Failure::stopping()),
        }
    }
}

fn transition_answer(id: i64, t: Transition, verb: &str, allowed: &str) -> Result<(), Failure> {
    match t {
        Transition::Done(_) => Ok(()),
        Transition::NotFound => Err(Failure::new(ApiErrorCode::NotFound, format!("no outbox row #{id} of yours"))),
        Transition::WrongState(s) => Err(Failure::new(
            ApiErrorCode::Conflict,
            format!("outbox row #{id} is {}; only {allowed} rows can be {verb}", s.as_str()),
        )),
        Transition::MeshGone => Err(Failure::new(
            ApiErrorCode::Conflict,
            format!("outbox row #{id} is for a mesh you left; nothing can send it there"),
        )),
    }
}

async fn entry_of(d: &Daemon, id: i64) -> Result<Json<OutboxEntry>, Failure> {
    Ok(Json(d.db.call(move |c| outbox::entry(c, id)).await?.ok_or_else(row_vanished)?))
}

pub async fn retry(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<OutboxEntry>, Failure> {
    let scope = caller.scope();
    let t = d.db.call(move |c| outbox::retry(c, id, scope.as_ref(), now_ms())).await?;
    transition_answer(id, t, "retried", "dead or aborted")?;
    let entry = entry_of(&d, id).await?;
    tracing::info!(row = id, "outbox row retried by the user");
    d.notify_changed();
    if let Some((mesh, sender)) = d.db.call(move |c| outbox::route_of(c, id)).await? {
        d.wake_drain(&mesh, &sender);
    }
    Ok(entry)
}

pub async fn abort(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
) -> Result<Json<OutboxEntry>, Failure> {
    let scope = caller.scope();
    let t = d.db.call(move |c| outbox::abort(c, id, scope.as_ref())).await?;
    transition_answer(id, t, "aborted", "pending")?;
    tracing::info!(row = id, "outbox row aborted by the user");
    d.notify_changed();
    entry_of(&d, id).await
}

/// Long-polls one row until it reaches `until`, dies, is aborted, or the timeout passes. Wake-ups come
/// from the daemon's outbox-changed signal; the answer is always re-read from SQLite.
pub async fn wait(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    RowId(id): RowId,
    Params(q): Params<WaitQuery>,
) -> Result<Json<WaitResponse>, Failure> {
    let timeout = q.timeout_ms.map_or(DEFAULT_WAIT, Duration::from_millis).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + timeout;
    let scope = caller.scope();
    let mut changed = d.subscribe();
    loop {
        changed.borrow_and_update();
        let entry =
            d.db.call(move |c| {
                let e = outbox::entry(c, id)?;
                let mine = match scope {
                    None => true,
                    Some(key) => outbox::route_of(c, id)?.is_some_and(|(_, sender)| sender == key),
                };
                Ok(e.filter(|_| mine))
            })
            .await?
            .ok_or_else(|| Failure::new(ApiErrorCode::NotFound, format!("no outbox row #{id} of yours")))?;
        if q.until.reached(&entry) || q.until.unreachable(&entry) {
            return Ok(Json(WaitResponse { reached: q.until.reached(&entry), entry }));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err(Failure::stopping()) },
            () = d.shutdown.cancelled() => return Err(Failure::stopping()),
            () = tokio::time::sleep_until(deadline) => return Ok(Json(WaitResponse { reached: false, entry })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmid: &str, to: &str, body: &str, mesh: Option<&str>) -> SendRequest {
        SendRequest { client_message_id: cmid.into(), to: to.into(), body: body.into(), mesh: mesh.map(str::to_owned) }
    }

    /// Every stored state × a resend with the same or a different request.
    #[tokio::test]
    async fn resends_are_answered_from_the_row_in_every_state_and_changed_requests_conflict() {
        let (_dir, d) = crate::daemon::for_tests();
        for status in ["pending", "inflight", "done", "dead", "aborted"] {
            let cmid = format!("key-{status}");
            let first = accept(&d, &Caller::Member, req(&cmid, "alice", "hello", None)).await.expect("accepted").0;
            assert!(!first.duplicate);
            let id = first.outbox_id;
            d.db.call_blocking(|c| {
                c.execute("UPDATE outbox SET status = ?2 WHERE id = ?1", rusqlite::params![id, status])
            })
            .expect("set state");

            let same = accept(&d, &Caller::Member, req(&cmid, "alice", "hello", None)).await.expect("same request").0;
            assert!(same.duplicate, "{status}");
            assert_eq!((same.outbox_id, same.status.as_str()), (id, status), "answered from the stored row");

            for changed in [
                req(&cmid, "alice", "another body", None),
                req(&cmid, "*", "hello", None),
                req(&cmid, "alice", "hello", Some("team")),
            ] {
                let err = accept(&d, &Caller::Member, changed).await.expect_err("a changed request must conflict");
                assert_eq!(err.0.code, ApiErrorCode::Conflict, "{status}: {}", err.0.message);
                assert!(err.0.message.contains("already used for a different message"));
            }
        }
        let count: i64 =
            d.db.call_blocking(|c| c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))).expect("count");
        assert_eq!(count, 5, "no resend added a row");
    }

    #[tokio::test]
    async fn the_idempotency_check_comes_before_target_resolution() {
        let (_dir, d) = crate::daemon::for_tests();
        let _first = accept(&d, &Caller::Member, req("k", "alice", "hi", None)).await.expect("accepted");
        d.db.call_blocking(|c| c.execute("DELETE FROM peers", [])).expect("forget the roster");
        let again = accept(&d, &Caller::Member, req("k", "alice", "hi", None)).await.expect("still answered").0;
        assert!(again.duplicate);
        let fresh = accept(&d, &Caller::Member, req("k2", "alice", "hi", None)).await.expect_err("unknown now");
        assert_eq!(fresh.0.code, ApiErrorCode::UnknownTarget);
    }
}
