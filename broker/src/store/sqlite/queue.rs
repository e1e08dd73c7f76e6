//! Messages, queues and receipts: the `messages`, `queue` and `reads` tables. A message is stored
//! once and queued once per recipient; a queue row leaves only by its recipient's ack or its TTL, with
//! the sender's receipt queued in the same transaction.

use mesh_proto::wire::{Receipt, ReceiptKind};
use mesh_proto::{MeshId, PublicKey, Target};
use rusqlite::{Connection, OptionalExtension, params};

use super::TxError;
use crate::sqlite::parse_col as parse;
use crate::store::receipts::{RECEIPT_TTL_MS, ReceiptsBySender, receipt_json};
use crate::store::{Enqueued, Expired, Lease, Leased, NewMessage, Receipted, StoreError};

fn queue_item(tx: &Connection, mesh: &str, to: &str, item_json: &str, expires_at: u64) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO queue (mesh_id, recipient, receipt, expires_at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![mesh, to, item_json, expires_at as i64])?;
    Ok(())
}

/// Queues a membership notice for member `to` (kept as long as a receipt).
pub(super) fn queue_notice(tx: &Connection, mesh: &str, to: &str, item_json: &str, now: u64) -> rusqlite::Result<()> {
    queue_item(tx, mesh, to, item_json, now + RECEIPT_TTL_MS)
}

/// Queues a key grant for member `to` (kept for [`crate::store::GRANT_TTL_MS`]).
pub(super) fn queue_grant(tx: &Connection, mesh: &str, to: &str, item_json: &str, now: u64) -> rusqlite::Result<()> {
    queue_item(tx, mesh, to, item_json, now + crate::store::GRANT_TTL_MS)
}

/// Deletes every item queued for `keys` (peers leaving the mesh), queueing a `revoked` receipt for
/// each message's sender. Returns the senders to wake.
pub(super) fn drop_queues(
    tx: &Connection,
    mesh: &MeshId,
    keys: &[PublicKey],
    now: u64,
) -> rusqlite::Result<Vec<PublicKey>> {
    let mesh_s = mesh.to_string();
    let mut receipts = ReceiptsBySender::default();
    for key in keys {
        let key_s = key.to_string();
        let rows: Vec<(i64, Option<i64>)> = tx
            .prepare_cached("SELECT id, message_seq FROM queue WHERE mesh_id = ?1 AND recipient = ?2 ORDER BY id")?
            .query_map(params![mesh_s, key_s], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, seq) in rows {
            tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?.execute([id])?;
            if let Some(seq) = seq {
                add_receipt(&mut receipts, tx, seq, ReceiptKind::Revoked, &key_s, now)?;
                forget_body_if_done(tx, seq)?;
            }
        }
    }
    queue_receipts(receipts, tx, now)?.into_iter().map(|(_, sender)| parse(sender)).collect()
}

/// Adds a receipt of `kind` from `recipient` for the sender of message `seq`, if it is still known.
fn add_receipt(
    receipts: &mut ReceiptsBySender,
    tx: &Connection,
    seq: i64,
    kind: ReceiptKind,
    recipient: &str,
    now: u64,
) -> rusqlite::Result<()> {
    let row: Option<(String, String, String, String)> = tx
        .prepare_cached("SELECT mesh_id, sender, message_id, client_message_id FROM messages WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    if let Some((mesh, sender, message_id, client_message_id)) = row {
        let receipt = Receipt { message_id, client_message_id, kind, recipient: parse(recipient.to_owned())?, at: now };
        receipts.push(mesh, sender, receipt);
    }
    Ok(())
}

/// Queues the gathered receipts; returns the (mesh, sender) pairs to wake.
fn queue_receipts(receipts: ReceiptsBySender, tx: &Connection, now: u64) -> rusqlite::Result<Vec<(String, String)>> {
    let items = receipts.into_items();
    let mut woken = Vec::with_capacity(items.len());
    for ((mesh, sender), items) in items {
        for item in &items {
            queue_item(tx, &mesh, &sender, item, now + RECEIPT_TTL_MS)?;
        }
        woken.push((mesh, sender));
    }
    Ok(woken)
}

/// Drops the stored ciphertext of a message once no queue row needs it; the row itself stays until
/// its TTL for idempotency.
fn forget_body_if_done(tx: &Connection, seq: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE messages SET item = NULL WHERE seq = ?1 AND NOT EXISTS (SELECT 1 FROM queue WHERE message_seq = ?1)",
    )?
    .execute([seq])?;
    Ok(())
}

/// A refusal that came after a write: a bug, treated as a failure so that the write is undone.
pub fn wrote_then_refused(e: &StoreError) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERNAL),
        Some(format!("a send was refused after writing ({e})")),
    )
}

/// Queues `msg` for each recipient of its target, or answers a duplicate with the first send. Every
/// refusal comes before the first write.
pub fn enqueue_in(tx: &Connection, msg: &NewMessage) -> Result<Enqueued, TxError> {
    let mesh = msg.mesh_id.to_string();
    let sender = msg.sender.to_string();
    let existing: Option<(Vec<u8>, String, i64)> = tx
        .prepare_cached(
            "SELECT fingerprint, message_id, recipients FROM messages
             WHERE mesh_id = ?1 AND sender = ?2 AND client_message_id = ?3",
        )?
        .query_row(params![mesh, sender, msg.client_message_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((fingerprint, message_id, recipients)) = existing {
        if fingerprint != msg.fingerprint {
            return Err(TxError::Domain(StoreError::IdempotencyConflict(msg.client_message_id.clone())));
        }
        return Ok(Enqueued { message_id, duplicate: true, woken: vec![], recipients: recipients as u32 });
    }
    if !matches!(msg.target, Target::Key(_)) {
        // Sealed under the mesh key: the one in force now, or refused before anything is written.
        let current: i64 = tx
            .prepare_cached("SELECT key_epoch FROM meshes WHERE id = ?1")?
            .query_row([&mesh], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        if (msg.key_epoch.unwrap_or(0) as i64) < current {
            return Err(TxError::Domain(StoreError::StaleKey { current: current as u64 }));
        }
    }
    let recipients: Vec<String> = match &msg.target {
        Target::Key(key) => {
            let known: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM peers WHERE mesh_id = ?1 AND key = ?2 AND revoked = 0)")?
                .query_row(params![mesh, key.to_string()], |r| r.get(0))?;
            if !known {
                return Err(TxError::Domain(StoreError::RecipientUnknown(key.to_string())));
            }
            vec![key.to_string()]
        }
        Target::All => {
            let mut stmt = tx.prepare_cached(
                "SELECT key FROM peers WHERE mesh_id = ?1 AND revoked = 0 AND ended_at IS NULL AND key != ?2 ORDER BY key",
            )?;
            stmt.query_map(params![mesh, sender], |r| r.get(0))?.collect::<Result<_, _>>()?
        }
        Target::Group(group) => {
            let mut stmt = tx.prepare_cached(
                "SELECT g.key FROM group_members g JOIN peers p ON p.mesh_id = g.mesh_id AND p.key = g.key
                 WHERE g.mesh_id = ?1 AND g.group_name = ?2 AND g.key != ?3 AND p.revoked = 0 AND p.ended_at IS NULL
                 ORDER BY g.key",
            )?;
            let keys: Vec<String> =
                stmt.query_map(params![mesh, group, sender], |r| r.get(0))?.collect::<Result<_, _>>()?;
            if keys.is_empty() {
                return Err(TxError::Domain(StoreError::RecipientUnknown(format!("@{group} has no other members"))));
            }
            keys
        }
    };
    tx.prepare_cached("INSERT INTO messages (mesh_id, sender, client_message_id, fingerprint, message_id, recipients, item, created_at, expires_at, target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")?.execute(params![
            mesh,
            sender,
            msg.client_message_id,
            msg.fingerprint.as_slice(),
            msg.message_id,
            recipients.len() as i64,
            msg.item_json,
            msg.created_at as i64,
            msg.expires_at as i64,
            msg.target.to_string(),
        ],
    )?;
    let seq = tx.last_insert_rowid();
    let mut insert =
        tx.prepare_cached("INSERT INTO queue (mesh_id, recipient, message_seq, expires_at) VALUES (?1, ?2, ?3, ?4)")?;
    for r in &recipients {
        insert.execute(params![mesh, r, seq, msg.expires_at as i64])?;
    }
    let woken = recipients.iter().map(|r| parse(r.clone())).collect::<Result<Vec<_>, _>>()?;
    Ok(Enqueued { message_id: msg.message_id.clone(), duplicate: false, recipients: woken.len() as u32, woken })
}

/// Leases up to `limit` of `recipient`'s free items to connection `conn`, oldest first.
pub fn lease(
    tx: &Connection,
    mesh: MeshId,
    recipient: PublicKey,
    conn: u64,
    limit: u32,
    now: u64,
    lease_ms: u64,
) -> Result<Lease, TxError> {
    // Leases that ran out first (the older items, and few), then never-leased items in id order.
    // No `LIMIT ?`: SQLite re-plans a statement whose bound LIMIT changes; rows are read lazily,
    // so taking `limit` of them reads no more.
    let (mesh_s, recipient_s) = (mesh.to_string(), recipient.to_string());
    let mut rows: Vec<(i64, Option<String>, bool)> = Vec::new();
    for (again, sql) in [true, false].into_iter().zip([
        "SELECT q.id, COALESCE(q.receipt, m.item) FROM queue q LEFT JOIN messages m ON m.seq = q.message_seq
         WHERE q.mesh_id = ?1 AND q.recipient = ?2 AND q.lease_until <= ?3 AND q.expires_at > ?3
         ORDER BY q.id",
        "SELECT q.id, COALESCE(q.receipt, m.item) FROM queue q LEFT JOIN messages m ON m.seq = q.message_seq
         WHERE q.mesh_id = ?1 AND q.recipient = ?2 AND q.lease_until IS NULL AND q.expires_at > ?3
         ORDER BY q.id",
    ]) {
        let want = limit as usize - rows.len();
        if want == 0 {
            break;
        }
        let mut pick = tx.prepare_cached(sql)?;
        let picked = pick.query_map(params![mesh_s, recipient_s, now as i64], |r| Ok((r.get(0)?, r.get(1)?, again)))?;
        for row in picked.take(want) {
            rows.push(row?);
        }
    }
    let mut mark =
        tx.prepare_cached("UPDATE queue SET lease_until = ?2, lease_conn = ?3, attempts = attempts + 1 WHERE id = ?1")?;
    let short = rows.len() < limit as usize;
    let mut out = Vec::with_capacity(rows.len());
    for (id, item, redelivery) in rows {
        mark.execute(params![id, (now + lease_ms) as i64, conn as i64])?;
        match item {
            Some(item_json) => out.push(Leased { delivery_id: id as u64, item_json, redelivery }),
            None => tracing::error!(delivery_id = id, "queue row without an item; skipped"),
        }
    }
    let next_foreign_expiry = if short {
        tx.prepare_cached(
            "SELECT MIN(lease_until) FROM queue
             WHERE mesh_id = ?1 AND recipient = ?2 AND lease_until > ?3 AND expires_at > ?3",
        )?
        .query_row(params![mesh_s, recipient_s, now as i64], |r| r.get::<_, Option<i64>>(0))?
        .map(|t| t as u64)
    } else {
        None
    };
    Ok(Lease { items: out, next_foreign_expiry })
}

/// Deletes acked items and queues `delivered` receipts for their senders; returns the senders.
pub fn ack(
    tx: &Connection,
    mesh: MeshId,
    recipient: PublicKey,
    delivery_ids: &[u64],
    now: u64,
) -> Result<Receipted, TxError> {
    let mesh = mesh.to_string();
    let recipient = recipient.to_string();
    let mut receipts = ReceiptsBySender::default();
    let mut delete =
        tx.prepare_cached("DELETE FROM queue WHERE id = ?1 AND mesh_id = ?2 AND recipient = ?3 RETURNING message_seq")?;
    for &id in delivery_ids {
        let seq: Option<Option<i64>> =
            delete.query_row(params![id as i64, mesh, recipient], |r| r.get(0)).optional()?;
        if let Some(Some(seq)) = seq {
            add_receipt(&mut receipts, tx, seq, ReceiptKind::Delivered, &recipient, now)?;
            forget_body_if_done(tx, seq)?;
        }
    }
    let count = receipts.count();
    let senders = queue_receipts(receipts, tx, now)?;
    let woken = senders.into_iter().map(|(_, sender)| parse(sender)).collect::<Result<Vec<_>, _>>()?;
    Ok(Receipted { woken, receipts: count })
}

/// Drops items past their TTL with `expired` receipts, and idempotency records past retention.
pub fn expire(tx: &Connection, now: u64) -> Result<Expired, TxError> {
    let mut out = Expired::default();
    let rows: Vec<(i64, String, String, Option<i64>)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id, mesh_id, recipient, message_seq FROM queue WHERE expires_at <= ?1 ORDER BY id LIMIT 10000",
        )?;
        stmt.query_map([now as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect::<Result<_, _>>()?
    };
    let mut receipts = ReceiptsBySender::default();
    for (id, _mesh, recipient, seq) in rows {
        tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?.execute([id])?;
        match seq {
            Some(seq) => {
                out.messages_expired += 1;
                add_receipt(&mut receipts, tx, seq, ReceiptKind::Expired, &recipient, now)?;
                forget_body_if_done(tx, seq)?;
            }
            None => out.receipts_dropped += 1,
        }
    }
    out.receipts = receipts.count();
    for (mesh, sender) in queue_receipts(receipts, tx, now)? {
        out.woken.push((parse(mesh)?, parse(sender)?));
    }
    tx.prepare_cached("DELETE FROM messages WHERE expires_at <= ?1 AND NOT EXISTS (SELECT 1 FROM queue WHERE message_seq = messages.seq)")?.execute([now as i64],
    )?;
    tx.prepare_cached(
        "DELETE FROM reads WHERE NOT EXISTS
           (SELECT 1 FROM messages m WHERE m.mesh_id = reads.mesh_id AND m.message_id = reads.message_id)",
    )?
    .execute([])?;
    out.woken.sort();
    out.woken.dedup();
    Ok(out)
}

/// Records reads by `reader` (addressees only, once each) and queues `read` receipts.
pub fn record_reads(
    tx: &Connection,
    mesh: MeshId,
    reader: PublicKey,
    message_ids: &[String],
    now: u64,
) -> Result<Receipted, TxError> {
    let (mesh_s, reader_s) = (mesh.to_string(), reader.to_string());
    let mut senders = Vec::new();
    let mut receipts = 0;
    for message_id in message_ids {
        let row: Option<(String, String, Option<String>)> = tx
            .prepare_cached(
                "SELECT sender, client_message_id, target FROM messages WHERE mesh_id = ?1 AND message_id = ?2",
            )?
            .query_row(params![mesh_s, message_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((sender, client_message_id, target)) = row else { continue };
        let addressed = match target.as_deref().map(str::parse::<Target>) {
            Some(Ok(Target::Key(k))) => k == reader,
            Some(Ok(Target::All)) => sender != reader_s,
            Some(Ok(Target::Group(g))) => tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM group_members WHERE mesh_id = ?1 AND group_name = ?2 AND key = ?3)",
                )?
                .query_row(params![mesh_s, g, reader_s], |r| r.get(0))?,
            _ => false,
        };
        if !addressed {
            continue;
        }
        let new = tx
            .prepare_cached("INSERT OR IGNORE INTO reads (mesh_id, message_id, reader, at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![mesh_s, message_id, reader_s, now as i64])?;
        if new == 1 {
            let receipt = Receipt {
                message_id: message_id.clone(),
                client_message_id,
                kind: ReceiptKind::Read,
                recipient: reader,
                at: now,
            };
            queue_item(tx, &mesh_s, &sender, &receipt_json(receipt), now + RECEIPT_TTL_MS)?;
            senders.push(parse(sender)?);
            receipts += 1;
        }
    }
    senders.sort();
    senders.dedup();
    Ok(Receipted { woken: senders, receipts })
}
