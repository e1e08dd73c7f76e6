//! The inbox: accept fast, process after.
//!
//! A pushed frame is committed raw (the frame's text plus the few fields needed to dedupe and list it)
//! in one small insert and then acked to the broker. A worker later verifies, decrypts and files it:
//! `received → ready`, or `→ failed` with the reason (`invalid`, `decrypt_failed`). Nothing is lost to a
//! parse or decrypt error. Rows are per recipient key and deduped on (recipient, message id) and on
//! (recipient, sender, client_message_id).

use std::collections::HashMap;

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::{EventBody, InboxCounts, InboxMessage, InboxQuery, InboxStatus, TargetKind};
use mesh_proto::wire::{DeliveryItem, Envelope, ServerFrame};
use mesh_proto::{MeshId, PublicKey, Target, message};
use rusqlite::{Connection, Row, params};

use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::events;
use crate::keys::KeyRing;

/// Commits a delivered envelope for `recipient`; false when it was already there (a redelivery).
pub fn accept(conn: &Connection, recipient: &PublicKey, env: &Envelope, raw: &str, now: u64) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO inbox (mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
            status, sent_at, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'received', ?9, ?10)",
        params![
            env.mesh_id.to_string(),
            recipient.to_string(),
            env.message_id,
            env.from.to_string(),
            env.from_name,
            env.client_message_id,
            env.to.to_string(),
            raw,
            env.sent_at as i64,
            now as i64,
        ],
    )?;
    Ok(n == 1)
}

/// Commits a delivered frame that could not even be parsed, as `failed`, so it is kept and acked
/// rather than redelivered forever.
pub fn accept_unparsable(
    conn: &Connection,
    mesh: &MeshId,
    recipient: &PublicKey,
    delivery_id: u64,
    raw: &str,
    detail: &str,
    now: u64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO inbox (mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
            status, last_error, sent_at, received_at)
         VALUES (?1, ?2, ?3, '', '', ?3, '', ?4, 'failed', ?5, ?6, ?6)",
        params![mesh.to_string(), recipient.to_string(), unparsable_id(mesh, delivery_id, raw), raw, format!("invalid: {detail}"), now as i64],
    )?;
    Ok(())
}

/// The inbox's message id for a frame that could not be parsed: the same for a redelivery of the same
/// frame (so it is stored once), different for any other frame, whichever mesh or broker sent it (a
/// delivery id alone is unique only per broker database).
fn unparsable_id(mesh: &MeshId, delivery_id: u64, raw: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new().chain_update(mesh.to_string()).chain_update([0]).chain_update(raw).finalize();
    format!("unparsable-{delivery_id}-{}", hex::encode(&digest[..16]))
}

/// Marks rows of `recipients` read (the given ids, or every unread row) and queues a read receipt for
/// each one that was filed (`ready`); appends a `read` event per recipient. Returns the rows newly
/// marked, with their mesh and recipient, so their links can be woken.
pub fn ack(
    conn: &Connection,
    recipients: &[PublicKey],
    ids: Option<&[i64]>,
    now: u64,
) -> rusqlite::Result<Vec<(i64, MeshId, PublicKey)>> {
    let recipients = keys_json(recipients);
    let ids = ids.map(|ids| serde_json::to_string(ids).expect("ids serialise"));
    let mut stmt = conn.prepare_cached(
        "UPDATE inbox SET read_at = ?3,
           read_receipt = CASE WHEN status = 'ready' THEN 'pending' ELSE read_receipt END
         WHERE read_at IS NULL AND recipient IN (SELECT value FROM json_each(?1))
           AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))
         RETURNING id, mesh_id, recipient",
    )?;
    let marked: Vec<(i64, MeshId, PublicKey)> = stmt
        .query_map(params![recipients, ids, now as i64], |r| {
            Ok((r.get(0)?, parse_col(r.get(1)?)?, parse_col(r.get(2)?)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut by_audience: std::collections::BTreeMap<(MeshId, PublicKey), Vec<i64>> = Default::default();
    for (id, mesh, key) in &marked {
        by_audience.entry((*mesh, *key)).or_default().push(*id);
    }
    for ((mesh, key), mut ids) in by_audience {
        ids.sort_unstable();
        events::append(conn, Some(&mesh), Some(&key), &EventBody::Read { ids }, now)?;
    }
    Ok(marked)
}

fn keys_json(keys: &[PublicKey]) -> String {
    serde_json::to_string(&keys.iter().map(PublicKey::to_string).collect::<Vec<_>>()).expect("keys serialise")
}

/// Deletes rows of `recipients`: read ones (and, with `all`, unread and failed ones too), received
/// before `before` when given. Returns how many.
pub fn flush(conn: &Connection, recipients: &[PublicKey], before: Option<u64>, all: bool) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM inbox WHERE recipient IN (SELECT value FROM json_each(?1))
           AND (?3 OR read_at IS NOT NULL) AND (?2 IS NULL OR received_at < ?2)",
        params![keys_json(recipients), before.map(|t| t as i64), all],
    )
}

/// Deletes the given rows of `recipients`; returns the ids that were deleted (others are not theirs,
/// or gone).
pub fn delete(conn: &Connection, recipients: &[PublicKey], ids: &[i64]) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM inbox WHERE recipient IN (SELECT value FROM json_each(?1)) AND id IN (SELECT value FROM json_each(?2))
         RETURNING id",
    )?;
    let ids = serde_json::to_string(ids).expect("ids serialise");
    let mut deleted: Vec<i64> =
        stmt.query_map(params![keys_json(recipients), ids], |r| r.get(0))?.collect::<Result<_, _>>()?;
    deleted.sort_unstable();
    Ok(deleted)
}

/// Puts a row of `recipients` back to `received` so the worker processes it again (replay). Its
/// attempts are kept. False when it is not theirs.
pub fn requeue(conn: &Connection, recipients: &[PublicKey], id: i64) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE inbox SET status = 'received', body = NULL, last_error = NULL
         WHERE id = ?1 AND recipient IN (SELECT value FROM json_each(?2)) AND message_id NOT LIKE 'unparsable-%'",
        params![id, keys_json(recipients)],
    )?;
    Ok(n == 1)
}

/// Whether row `id` belongs to one of `recipients`.
pub fn owned(conn: &Connection, recipients: &[PublicKey], id: i64) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE id = ?1 AND recipient IN (SELECT value FROM json_each(?2)))",
        params![id, keys_json(recipients)],
        |r| r.get(0),
    )
}

/// Which of `ids` are rows of `recipients`, in ascending order.
pub fn owned_ids(conn: &Connection, recipients: &[PublicKey], ids: &[i64]) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM inbox WHERE recipient IN (SELECT value FROM json_each(?1))
           AND id IN (SELECT value FROM json_each(?2)) ORDER BY id",
    )?;
    let ids = serde_json::to_string(ids).expect("ids serialise");
    stmt.query_map(params![keys_json(recipients), ids], |r| r.get(0))?.collect()
}

/// Read receipts of (mesh, recipient) waiting to be sent: marked `sending`, oldest first.
pub fn claim_reads(
    conn: &Connection,
    mesh: &MeshId,
    recipient: &PublicKey,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE inbox SET read_receipt = 'sending'
         WHERE id IN (SELECT id FROM inbox WHERE mesh_id = ?1 AND recipient = ?2 AND read_receipt = 'pending' ORDER BY id LIMIT ?3)
         RETURNING id, message_id",
    )?;
    let mut rows: Vec<(i64, String)> = stmt
        .query_map(params![mesh.to_string(), recipient.to_string(), limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    rows.sort_unstable();
    Ok(rows)
}

pub fn reads_sent(conn: &Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare_cached("UPDATE inbox SET read_receipt = 'sent' WHERE id = ?1 AND read_receipt = 'sending'")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

pub fn release_reads(conn: &Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare_cached("UPDATE inbox SET read_receipt = 'pending' WHERE id = ?1 AND read_receipt = 'sending'")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// At start-up, receipts that were being sent are pending again.
pub fn recover_reads(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute("UPDATE inbox SET read_receipt = 'pending' WHERE read_receipt = 'sending'", [])
}

/// Rows waiting for the worker.
fn to_process(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<(i64, String, String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, mesh_id, recipient, raw FROM inbox WHERE status = 'received' ORDER BY id LIMIT ?1",
    )?;
    stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect()
}

fn file_result(conn: &Connection, id: i64, result: Result<String, String>, now: u64) -> rusqlite::Result<()> {
    match result {
        Ok(body) => conn.execute(
            "UPDATE inbox SET status = 'ready', body = ?2, last_error = NULL, attempts = attempts + 1 WHERE id = ?1",
            params![id, body],
        )?,
        Err(reason) => conn.execute(
            "UPDATE inbox SET status = 'failed', last_error = ?2, attempts = attempts + 1 WHERE id = ?1",
            params![id, reason],
        )?,
    };
    let (mesh, recipient): (String, String) =
        conn.query_row("SELECT mesh_id, recipient FROM inbox WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let message = get(conn, id)?;
    let (mesh, recipient): (MeshId, PublicKey) = (parse_col(mesh)?, parse_col(recipient)?);
    events::append(conn, Some(&mesh), Some(&recipient), &EventBody::Message(message), now)?;
    Ok(())
}

/// One row as the API shows it.
pub fn get(conn: &Connection, id: i64) -> rusqlite::Result<InboxMessage> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM inbox i LEFT JOIN meshes m ON m.id = i.mesh_id WHERE i.id = ?1"),
        [id],
        message_from_row,
    )
}

/// Verifies and decrypts one raw row, with the keys its mesh has here (`ring`).
fn open_raw(daemon: &Daemon, mesh: &str, recipient: &str, raw: &str, ring: Option<&KeyRing>) -> Result<String, String> {
    let env = match mesh_proto::wire::decode_server(raw) {
        Ok(ServerFrame::Deliver(d)) => match d.item {
            DeliveryItem::Message(env) => env,
            DeliveryItem::Receipt(_)
            | DeliveryItem::Receipts(_)
            | DeliveryItem::Membership(_)
            | DeliveryItem::MeshKey(_) => {
                return Err("invalid: a receipt or a notice stored as a message".into());
            }
        },
        Ok(_) => return Err("invalid: not a deliver frame".into()),
        Err(e) => return Err(format!("invalid: {}", e.detail)),
    };
    let recipient: PublicKey = recipient.parse().map_err(|e| format!("invalid: recipient: {e}"))?;
    let identity =
        daemon.identity_for(&recipient).ok_or_else(|| "decrypt_failed: no key for this recipient".to_owned())?;
    let mesh_id: MeshId = mesh.parse().map_err(|e| format!("invalid: mesh: {e}"))?;
    if env.mesh_id != mesh_id {
        return Err("invalid: delivered on another mesh's connection".into());
    }
    if daemon.take_injected_fault() {
        return Err("decrypt_failed: injected fault (MESH_FAULT_DECRYPT_FAILURES)".into());
    }
    let keys = ring.map(|r| r.keys.as_slice()).unwrap_or_default();
    let (content, epoch) = message::open_with(&env, &identity, keys).map_err(|e| format!("{}: {e}", e.reason()))?;
    if let (Some(epoch), Some(ring)) = (epoch, ring)
        && let Some(why) = ring.refusal(epoch, env.sent_at)
    {
        return Err(why);
    }
    Ok(content.body)
}

/// Files every `received` row, then waits for more. Never stops on a bad row.
pub async fn run_worker(daemon: std::sync::Arc<Daemon>) {
    loop {
        let batch = daemon
            .db
            .call(|c| {
                let rows = to_process(c, 256)?;
                let mut rings: HashMap<String, KeyRing> = HashMap::new();
                for (_, mesh, _, _) in &rows {
                    if !rings.contains_key(mesh) {
                        let ring = match mesh.parse::<MeshId>() {
                            Ok(id) => crate::keys::ring(c, &id)?,
                            Err(_) => KeyRing::default(),
                        };
                        rings.insert(mesh.clone(), ring);
                    }
                }
                Ok((rows, rings))
            })
            .await;
        match batch {
            Ok((rows, rings)) if !rows.is_empty() => {
                let results: Vec<(i64, Result<String, String>)> = rows
                    .iter()
                    .map(|(id, mesh, recipient, raw)| (*id, open_raw(&daemon, mesh, recipient, raw, rings.get(mesh))))
                    .collect();
                for (id, r) in &results {
                    if let Err(reason) = r {
                        tracing::warn!(inbox_id = id, %reason, "inbox row failed processing; kept as failed");
                    }
                }
                if let Err(e) = daemon
                    .db
                    .call(move |c| {
                        let tx = c.transaction()?;
                        let now = now_ms();
                        for (id, r) in results {
                            file_result(&tx, id, r, now)?;
                        }
                        tx.commit()
                    })
                    .await
                    .inspect(|()| daemon.notify_changed())
                {
                    tracing::error!(error = %mesh_proto::error::chain(&e), "filing inbox rows; will retry");
                    tokio::select! {
                        () = daemon.shutdown.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "reading the inbox; will retry"),
        }
        tokio::select! {
            () = daemon.shutdown.cancelled() => return,
            () = daemon.inbox_wake.notified() => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}

const COLUMNS: &str =
    "i.id, COALESCE(m.name, i.mesh_id), i.message_id, i.sender, i.sender_name, i.target, i.status, i.body,
    i.last_error, i.sent_at, i.received_at, i.read_at";

fn message_from_row(r: &Row<'_>) -> rusqlite::Result<InboxMessage> {
    let target: String = r.get(5)?;
    let status: String = r.get(6)?;
    let kind = match target.parse::<Target>() {
        Ok(Target::All) => TargetKind::Broadcast,
        Ok(Target::Group(_)) => TargetKind::Group,
        _ => TargetKind::Direct,
    };
    Ok(InboxMessage {
        id: r.get(0)?,
        mesh: r.get(1)?,
        message_id: r.get(2)?,
        from: r.get(3)?,
        from_name: r.get(4)?,
        kind,
        to: target,
        status: InboxStatus::parse(&status).unwrap_or(InboxStatus::Received),
        body: r.get(7)?,
        error: r.get(8)?,
        sent_at: r.get::<_, i64>(9)? as u64,
        received_at: r.get::<_, i64>(10)? as u64,
        read_at: r.get::<_, Option<i64>>(11)?.map(|t| t as u64),
        deleted: false,
    })
}

/// Lists the rows of `recipients` (oldest first, the newest `limit`). Never marks anything read.
pub fn list(
    conn: &Connection,
    recipients: &[PublicKey],
    mesh: Option<&MeshId>,
    q: &InboxQuery,
) -> rusqlite::Result<Vec<InboxMessage>> {
    let recipients = keys_json(recipients);
    let from = q.from.as_deref();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM inbox i LEFT JOIN meshes m ON m.id = i.mesh_id
         WHERE i.recipient IN (SELECT value FROM json_each(?1))
           AND (?2 IS NULL OR i.mesh_id = ?2)
           AND (?3 = 0 OR i.read_at IS NULL)
           AND (?4 IS NULL OR i.sender = ?4)
           AND (?6 IS NULL OR i.id = ?6)
         ORDER BY i.id DESC LIMIT ?5"
    ))?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let mut rows: Vec<InboxMessage> = stmt
        .query_map(params![recipients, mesh.map(|m| m.to_string()), q.unread, from, limit, q.id], message_from_row)?
        .collect::<Result<_, _>>()?;
    rows.reverse();
    Ok(rows)
}

/// Whether `key` (a full key) sent any of the rows of `recipients`: a sender that has left every
/// roster is still named by its key.
pub fn has_sender(conn: &Connection, recipients: &[PublicKey], key: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE recipient IN (SELECT value FROM json_each(?1)) AND sender = ?2)",
        params![keys_json(recipients), key.to_ascii_lowercase()],
        |r| r.get(0),
    )
}

pub fn counts(conn: &Connection) -> rusqlite::Result<InboxCounts> {
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(read_at IS NULL AND status != 'failed'), 0), COALESCE(SUM(status = 'failed'), 0) FROM inbox",
        [],
        |r| {
            Ok(InboxCounts {
                total: r.get::<_, i64>(0)? as u64,
                unread: r.get::<_, i64>(1)? as u64,
                failed: r.get::<_, i64>(2)? as u64,
            })
        },
    )
}
