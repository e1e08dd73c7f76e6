//! The outbox: one row per send, committed before the sender is answered.
//!
//! States: `pending → inflight → done`; `inflight → pending` after a transient failure (with
//! exponential backoff and jitter) or when its lease runs out; `→ dead` on a permanent error, at the
//! attempt cap or past its TTL; `→ aborted` by the user. A row keeps every routing field (mesh, sender,
//! target, nonce, ciphertext, signature) for its whole life, so a retry sends exactly the same message.

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::{
    EventBody, OutboxCounts, OutboxEntry, OutboxEvent, OutboxQuery, OutboxStatus, ReceiptEvent, ReceiptKindName,
    TargetInfo, TargetKind,
};
use mesh_proto::wire::{Receipt, ReceiptKind};
use mesh_proto::{Identity, MeshId, PublicKey, Sig, Target};
use rand::Rng;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::events;
use crate::store::opt_ms;

/// Attempts before a row is dead.
pub const MAX_ATTEMPTS: u32 = 25;
const BACKOFF_BASE_MS: u64 = 500;
const BACKOFF_CAP_MS: u64 = 30_000;
/// The least wait before a send the broker could not store (`internal`: its storage failing) goes
/// again; such answers do not count as attempts.
pub const STORAGE_RETRY_MS: u64 = 5_000;
/// How long an `inflight` row may wait for the broker's answer before it is sent again.
pub const LEASE_MS: u64 = 30_000;
/// A row not accepted by a broker within this time is dead.
pub const TTL_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// Delay before attempt `attempts + 1`: 500 ms · 2^(attempts-1), capped at 30 s, with full jitter in
/// its upper half so that many rows failing together do not retry together.
pub fn backoff_ms(attempts: u32) -> u64 {
    let exp = BACKOFF_BASE_MS.saturating_mul(1u64 << attempts.saturating_sub(1).min(20)).min(BACKOFF_CAP_MS);
    rand::thread_rng().gen_range(exp / 2..=exp)
}

pub struct NewRow {
    pub client_message_id: String,
    pub fingerprint: String,
    pub mesh_id: MeshId,
    pub sender: PublicKey,
    pub session: Option<String>,
    pub target: TargetInfo,
    pub body: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub sig: Sig,
    /// For a broadcast or group message: the epoch of the mesh key it is sealed under.
    pub key_epoch: Option<u64>,
}

fn kind_str(k: TargetKind) -> &'static str {
    match k {
        TargetKind::Direct => "direct",
        TargetKind::Group => "group",
        TargetKind::Broadcast => "broadcast",
    }
}

fn parse_kind(s: &str) -> TargetKind {
    match s {
        "group" => TargetKind::Group,
        "broadcast" => TargetKind::Broadcast,
        _ => TargetKind::Direct,
    }
}

/// The fingerprint of a stored request, to compare with a resend under the same id.
pub fn lookup(conn: &Connection, client_message_id: &str) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row("SELECT id, fingerprint FROM outbox WHERE client_message_id = ?1", [client_message_id], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Inserts a pending row; `None` when the `client_message_id` is already taken.
pub fn insert(conn: &Connection, row: &NewRow, now: u64) -> rusqlite::Result<Option<i64>> {
    let n = conn.execute(
        "INSERT INTO outbox (client_message_id, fingerprint, mesh_id, sender, session, target, target_kind,
            target_label, target_name, body, nonce, ciphertext, sig, status, next_attempt_at, enqueued_at, expires_at,
            key_epoch)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'pending', ?14, ?14, ?15, ?16)
         ON CONFLICT (client_message_id) DO NOTHING",
        params![
            row.client_message_id,
            row.fingerprint,
            row.mesh_id.to_string(),
            row.sender.to_string(),
            row.session,
            row.target.address,
            kind_str(row.target.kind),
            row.target.label,
            row.target.name,
            row.body,
            row.nonce,
            row.ciphertext,
            row.sig.to_string(),
            now as i64,
            (now + TTL_MS) as i64,
            row.key_epoch.map(|e| e as i64),
        ],
    )?;
    Ok((n == 1).then(|| conn.last_insert_rowid()))
}

const ENTRY_COLUMNS: &str =
    "o.id, o.client_message_id, COALESCE(m.name, o.mesh_id), o.target, o.target_kind, o.target_label,
    o.target_name, o.body, o.status, o.attempts, o.last_error, o.message_id, o.enqueued_at, o.sent_at, o.delivered_at,
    o.delivered_count, o.read_at, o.recipients, o.session, o.expired_count, o.read_count, o.mesh_id, o.sender,
    o.next_attempt_at, o.revoked_count";

fn entry_from_row(r: &Row<'_>) -> rusqlite::Result<OutboxEntry> {
    let status: String = r.get(8)?;
    let kind: String = r.get(4)?;
    Ok(OutboxEntry {
        id: r.get(0)?,
        client_message_id: r.get(1)?,
        mesh: r.get(2)?,
        target: TargetInfo { kind: parse_kind(&kind), address: r.get(3)?, label: r.get(5)?, name: r.get(6)? },
        body: r.get(7)?,
        status: OutboxStatus::parse(&status).unwrap_or(OutboxStatus::Pending),
        attempts: r.get(9)?,
        last_error: r.get(10)?,
        message_id: r.get(11)?,
        enqueued_at: r.get::<_, i64>(12)? as u64,
        sent_at: opt_ms(r, 13)?,
        delivered_at: opt_ms(r, 14)?,
        delivered_count: r.get(15)?,
        read_at: opt_ms(r, 16)?,
        recipients: r.get(17)?,
        session: r.get(18)?,
        expired_count: r.get(19)?,
        read_count: r.get(20)?,
        mesh_id: r.get(21)?,
        sender: r.get(22)?,
        next_attempt_at: if status == "pending" { opt_ms(r, 23)? } else { None },
        revoked_count: r.get(24)?,
        link: None,
    })
}

pub fn entry(conn: &Connection, id: i64) -> rusqlite::Result<Option<OutboxEntry>> {
    conn.query_row(
        &format!("SELECT {ENTRY_COLUMNS} FROM outbox o LEFT JOIN meshes m ON m.id = o.mesh_id WHERE o.id = ?1"),
        [id],
        entry_from_row,
    )
    .optional()
}

/// The newest rows (oldest first), of `sender` only and in `mesh` only when given.
pub fn list(
    conn: &Connection,
    q: &OutboxQuery,
    sender: Option<&PublicKey>,
    mesh: Option<&MeshId>,
) -> rusqlite::Result<Vec<OutboxEntry>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM outbox o LEFT JOIN meshes m ON m.id = o.mesh_id
         WHERE (?1 IS NULL OR o.status = ?1) AND (?3 IS NULL OR o.sender = ?3) AND (?4 IS NULL OR o.mesh_id = ?4)
         ORDER BY o.id DESC LIMIT ?2"
    ))?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let mut rows: Vec<OutboxEntry> = stmt
        .query_map(
            params![
                q.status.map(OutboxStatus::as_str),
                limit,
                sender.map(PublicKey::to_string),
                mesh.map(MeshId::to_string)
            ],
            entry_from_row,
        )?
        .collect::<Result<_, _>>()?;
    rows.reverse();
    Ok(rows)
}

pub fn counts(conn: &Connection, mesh: Option<&MeshId>) -> rusqlite::Result<OutboxCounts> {
    let mut stmt =
        conn.prepare_cached("SELECT status, COUNT(*) FROM outbox WHERE (?1 IS NULL OR mesh_id = ?1) GROUP BY status")?;
    let mut c = OutboxCounts::default();
    for row in stmt.query_map([mesh.map(|m| m.to_string())], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (status, n) = row?;
        let n = n as u64;
        match OutboxStatus::parse(&status) {
            Some(OutboxStatus::Pending) => c.pending = n,
            Some(OutboxStatus::Inflight) => c.inflight = n,
            Some(OutboxStatus::Done) => c.done = n,
            Some(OutboxStatus::Dead) => c.dead = n,
            Some(OutboxStatus::Aborted) => c.aborted = n,
            None => {}
        }
    }
    Ok(c)
}

/// A row taken by a drain to send.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: i64,
    pub client_message_id: String,
    pub target: Target,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub sig: Sig,
    pub expires_at: u64,
    /// For a broadcast or group message: the epoch of the mesh key it is sealed under.
    pub key_epoch: Option<u64>,
}

/// Kills the pending rows of one connection that can no longer be sent: past their TTL, or out of
/// attempts without an answer (their leases kept running out). An event each; returns how many.
pub fn bury(conn: &Connection, mesh: &MeshId, sender: &PublicKey, now: u64) -> rusqlite::Result<usize> {
    let dying: Vec<(i64, bool)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT id, expires_at <= ?3 FROM outbox
             WHERE mesh_id = ?1 AND sender = ?2 AND status = 'pending' AND (expires_at <= ?3 OR attempts >= ?4)",
        )?;
        stmt.query_map(params![mesh.to_string(), sender.to_string(), now as i64, MAX_ATTEMPTS], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?
    };
    for (id, expired) in &dying {
        let why = if *expired {
            "expired: not accepted by a broker within its TTL".to_owned()
        } else {
            format!("gave up after {MAX_ATTEMPTS} attempts without an answer from the broker")
        };
        conn.execute("UPDATE outbox SET status = 'dead', last_error = ?2 WHERE id = ?1", params![id, why])?;
        emit_state(conn, *id, now)?;
    }
    Ok(dying.len())
}

/// Kills every row of `mesh` not yet accepted (the member left it: no connection will ever send
/// them), with `why`. An event each; returns how many.
pub fn kill_mesh(conn: &Connection, mesh: &MeshId, why: &str, now: u64) -> rusqlite::Result<usize> {
    let ids: Vec<i64> = conn
        .prepare_cached("SELECT id FROM outbox WHERE mesh_id = ?1 AND status IN ('pending', 'inflight')")?
        .query_map([mesh.to_string()], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        conn.execute(
            "UPDATE outbox SET status = 'dead', last_error = ?2, lease_until = NULL WHERE id = ?1",
            params![id, why],
        )?;
        emit_state(conn, *id, now)?;
    }
    Ok(ids.len())
}

/// Moves up to `limit` due pending rows of one connection (mesh + sender key) to `inflight` with a
/// lease, oldest first. Call [`bury`] first: it does not look at TTLs or attempt counts.
pub fn claim(
    conn: &mut Connection,
    mesh: &MeshId,
    sender: &Identity,
    limit: usize,
    now: u64,
) -> rusqlite::Result<Vec<Claimed>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut rows: Vec<(Claimed, bool, String)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id, client_message_id, target, nonce, ciphertext, sig, expires_at, key_epoch, reseal, body FROM outbox
             WHERE mesh_id = ?1 AND sender = ?2 AND status = 'pending' AND next_attempt_at <= ?3
             ORDER BY id LIMIT ?4",
        )?;
        stmt.query_map(params![mesh.to_string(), sender.key().to_string(), now as i64, limit as i64], |r| {
            Ok((
                Claimed {
                    id: r.get(0)?,
                    client_message_id: r.get(1)?,
                    target: parse_col(r.get(2)?)?,
                    nonce: r.get(3)?,
                    ciphertext: r.get(4)?,
                    sig: parse_col(r.get(5)?)?,
                    expires_at: r.get::<_, i64>(6)? as u64,
                    key_epoch: r.get::<_, Option<i64>>(7)?.map(|e| e as u64),
                },
                r.get(8)?,
                r.get(9)?,
            ))
        })?
        .collect::<Result<_, _>>()?
    };
    for (row, reseal, body) in &mut rows {
        if *reseal {
            reseal_row(&tx, mesh, sender, row, body)?;
        }
    }
    {
        let mut mark = tx.prepare_cached(
            "UPDATE outbox SET status = 'inflight', attempts = attempts + 1, lease_until = ?2, sent_at = COALESCE(sent_at, ?3)
             WHERE id = ?1",
        )?;
        for (row, _, _) in &rows {
            mark.execute(params![row.id, (now + LEASE_MS) as i64, now as i64])?;
        }
    }
    tx.commit()?;
    Ok(rows.into_iter().map(|(row, _, _)| row).collect())
}

/// Seals a broadcast or group row again under the mesh's current key: the broker refused it as
/// sealed under a replaced key, so it stored nothing of it, and the new bytes conflict with nothing.
/// The body and every routing field are kept.
fn reseal_row(
    tx: &Connection,
    mesh: &MeshId,
    sender: &Identity,
    row: &mut Claimed,
    body: &str,
) -> rusqlite::Result<()> {
    let Some(current) = crate::meshes::get(tx, mesh)? else { return Ok(()) };
    let content = mesh_proto::message::Content { body: body.to_owned(), reply_to: None };
    let sealed = mesh_proto::message::seal(
        sender,
        mesh,
        &row.client_message_id,
        &row.target,
        mesh_proto::message::SealKey::Group(&current.group_key),
        &content,
    );
    tx.execute(
        "UPDATE outbox SET nonce = ?2, ciphertext = ?3, sig = ?4, key_epoch = ?5, reseal = 0 WHERE id = ?1",
        params![row.id, sealed.nonce, sealed.ciphertext, sealed.sig.to_string(), current.key_epoch as i64],
    )?;
    tracing::info!(row = row.id, epoch = current.key_epoch, "sealed again under the mesh's current key");
    row.nonce = sealed.nonce;
    row.ciphertext = sealed.ciphertext;
    row.sig = sealed.sig;
    row.key_epoch = Some(current.key_epoch);
    Ok(())
}

/// Whether the mesh of row `id` has a newer key here than the one the row is sealed under.
pub fn newer_key_held(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COALESCE(m.key_epoch > COALESCE(o.key_epoch, 0), 0) FROM outbox o JOIN meshes m ON m.id = o.mesh_id
         WHERE o.id = ?1",
        [id],
        |r| r.get(0),
    )
    .optional()
    .map(|v| v.unwrap_or(false))
}

/// The broker refused the row as sealed under a replaced mesh key: it is sealed again before its next
/// attempt (when the new key is here).
pub fn needs_reseal(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.execute("UPDATE outbox SET reseal = 1 WHERE id = ?1", [id])?;
    Ok(())
}

/// The broker accepted the row.
pub fn mark_done(conn: &Connection, id: i64, message_id: &str, recipients: u32) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE outbox SET status = 'done', message_id = ?2, recipients = ?3, lease_until = NULL, last_error = NULL
         WHERE id = ?1 AND status = 'inflight'",
        params![id, message_id, recipients],
    )?;
    Ok(())
}

/// A failed attempt: dead when `permanent` or at the attempt cap, else back to pending after backoff
/// (or after the broker's `retry_after_ms`, when longer). When `counts` is false (the broker asked us
/// to slow down) the attempt is given back and never brings the row nearer the cap.
#[allow(clippy::too_many_arguments)]
pub fn mark_failed(
    conn: &Connection,
    id: i64,
    error: &str,
    permanent: bool,
    retry_after_ms: Option<u64>,
    counts: bool,
    now: u64,
) -> rusqlite::Result<OutboxStatus> {
    if !counts {
        conn.execute("UPDATE outbox SET attempts = MAX(attempts - 1, 0) WHERE id = ?1 AND status = 'inflight'", [id])?;
    }
    let attempts: Option<u32> =
        conn.query_row("SELECT attempts FROM outbox WHERE id = ?1", [id], |r| r.get(0)).optional()?;
    let Some(attempts) = attempts else { return Ok(OutboxStatus::Dead) };
    if permanent || attempts >= MAX_ATTEMPTS {
        let why = if permanent { error.to_owned() } else { format!("{error} (gave up after {attempts} attempts)") };
        conn.execute(
            "UPDATE outbox SET status = 'dead', last_error = ?2, lease_until = NULL WHERE id = ?1 AND status = 'inflight'",
            params![id, why],
        )?;
        return Ok(OutboxStatus::Dead);
    }
    let delay = backoff_ms(attempts).max(retry_after_ms.unwrap_or(0));
    conn.execute(
        "UPDATE outbox SET status = 'pending', last_error = ?2, next_attempt_at = ?3, lease_until = NULL
         WHERE id = ?1 AND status = 'inflight'",
        params![id, error, (now + delay) as i64],
    )?;
    Ok(OutboxStatus::Pending)
}

/// Rows a drain had in flight when its connection went away: pending again, due now. The broker
/// dedupes by `client_message_id`, so resending one it did accept is harmless.
pub fn release(conn: &Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "UPDATE outbox SET status = 'pending', lease_until = NULL WHERE id = ?1 AND status = 'inflight'",
    )?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// At start-up every `inflight` row is orphaned: back to pending.
pub fn recover_inflight(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute("UPDATE outbox SET status = 'pending', lease_until = NULL WHERE status = 'inflight'", [])
}

/// Inflight rows whose lease ran out: pending again.
pub fn expire_leases(conn: &Connection, now: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE outbox SET status = 'pending', lease_until = NULL, last_error = 'no answer from the broker within the lease'
         WHERE status = 'inflight' AND lease_until <= ?1",
        [now as i64],
    )
}

/// Which connection a row goes out on: its mesh and sender key.
pub fn route_of(conn: &Connection, id: i64) -> rusqlite::Result<Option<(MeshId, PublicKey)>> {
    conn.query_row("SELECT mesh_id, sender FROM outbox WHERE id = ?1", [id], |r| {
        Ok((parse_col(r.get(0)?)?, parse_col(r.get(1)?)?))
    })
    .optional()
}

/// The outcome of a user's action on a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Done(OutboxStatus),
    NotFound,
    WrongState(OutboxStatus),
    /// Its mesh is gone from here (the member left it): nothing can send it.
    MeshGone,
}

fn status_of(conn: &Connection, id: i64, sender: Option<&PublicKey>) -> rusqlite::Result<Option<OutboxStatus>> {
    let status: Option<String> = conn
        .query_row(
            "SELECT status FROM outbox WHERE id = ?1 AND (?2 IS NULL OR sender = ?2)",
            params![id, sender.map(PublicKey::to_string)],
            |r| r.get(0),
        )
        .optional()?;
    Ok(status.and_then(|s| OutboxStatus::parse(&s)))
}

/// A `dead` or `aborted` row back to `pending`, due now, with a fresh attempt budget and TTL. Every
/// routing field (mesh, sender, target, nonce, ciphertext, signature, client_message_id) is kept, so the
/// retry is the same message: a DM stays a DM to the same key, and the broker dedupes it if an earlier
/// attempt did land. `sender` limits the action to one identity's rows (a session's own).
pub fn retry(conn: &mut Connection, id: i64, sender: Option<&PublicKey>, now: u64) -> rusqlite::Result<Transition> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let outcome = match status_of(&tx, id, sender)? {
        None => Transition::NotFound,
        Some(s @ (OutboxStatus::Pending | OutboxStatus::Inflight | OutboxStatus::Done)) => Transition::WrongState(s),
        Some(OutboxStatus::Dead | OutboxStatus::Aborted)
            if !tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM meshes m JOIN outbox o ON o.mesh_id = m.id WHERE o.id = ?1)",
                [id],
                |r| r.get::<_, bool>(0),
            )? =>
        {
            Transition::MeshGone
        }
        Some(OutboxStatus::Dead | OutboxStatus::Aborted) => {
            tx.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?2, lease_until = NULL,
                   last_error = NULL, expires_at = MAX(expires_at, ?3)
                 WHERE id = ?1",
                params![id, now as i64, (now + TTL_MS) as i64],
            )?;
            Transition::Done(OutboxStatus::Pending)
        }
    };
    tx.commit()?;
    Ok(outcome)
}

/// A `pending` row to `aborted`. A row in flight cannot be stopped: the broker may already hold it.
pub fn abort(conn: &mut Connection, id: i64, sender: Option<&PublicKey>) -> rusqlite::Result<Transition> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let outcome = match status_of(&tx, id, sender)? {
        None => Transition::NotFound,
        Some(OutboxStatus::Pending) => {
            tx.execute("UPDATE outbox SET status = 'aborted', lease_until = NULL WHERE id = ?1", [id])?;
            Transition::Done(OutboxStatus::Aborted)
        }
        Some(s) => Transition::WrongState(s),
    };
    tx.commit()?;
    Ok(outcome)
}

/// When the next pending row of a connection becomes due.
pub fn next_due(conn: &Connection, mesh: &MeshId, sender: &PublicKey) -> rusqlite::Result<Option<u64>> {
    let t: Option<i64> = conn.query_row(
        "SELECT MIN(next_attempt_at) FROM outbox WHERE mesh_id = ?1 AND sender = ?2 AND status = 'pending'",
        params![mesh.to_string(), sender.to_string()],
        |r| r.get(0),
    )?;
    Ok(t.map(|t| t as u64))
}

/// Records a receipt on the row it is about, once per (message, kind, recipient): a receipt the broker
/// delivers again is recognised and changes nothing. Appends a `receipt` event for the row's sender.
/// Receipts for unknown messages are ignored. Rows are matched on `client_message_id`, unique in this
/// outbox, because a receipt can be read before the broker's `accepted` has been recorded.
pub fn apply_receipt(conn: &Connection, receipt: &Receipt, now: u64) -> rusqlite::Result<()> {
    let kind = match receipt.kind {
        ReceiptKind::Delivered => ReceiptKindName::Delivered,
        ReceiptKind::Read => ReceiptKindName::Read,
        ReceiptKind::Expired => ReceiptKindName::Expired,
        ReceiptKind::Revoked => ReceiptKindName::Revoked,
    };
    let kind_str = match kind {
        ReceiptKindName::Delivered => "delivered",
        ReceiptKindName::Read => "read",
        ReceiptKindName::Expired => "expired",
        ReceiptKindName::Revoked => "revoked",
    };
    let cmid = &receipt.client_message_id;
    let row: Option<(i64, String, String)> = conn
        .query_row("SELECT id, mesh_id, sender FROM outbox WHERE client_message_id = ?1", [cmid], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((id, mesh, sender)) = row else { return Ok(()) };
    let new = conn.execute(
        "INSERT OR IGNORE INTO receipts (client_message_id, kind, recipient, at) VALUES (?1, ?2, ?3, ?4)",
        params![cmid, kind_str, receipt.recipient.to_string(), receipt.at as i64],
    )?;
    if new == 0 {
        return Ok(());
    }
    let at = receipt.at as i64;
    match receipt.kind {
        ReceiptKind::Delivered => conn.execute(
            "UPDATE outbox SET delivered_at = COALESCE(delivered_at, ?2), delivered_count = delivered_count + 1 WHERE id = ?1",
            params![id, at],
        )?,
        ReceiptKind::Read => conn.execute(
            "UPDATE outbox SET read_at = COALESCE(read_at, ?2), read_count = read_count + 1 WHERE id = ?1",
            params![id, at],
        )?,
        ReceiptKind::Expired => conn.execute(
            "UPDATE outbox SET last_error = ?2, expired_count = expired_count + 1 WHERE id = ?1",
            params![id, format!("expired undelivered for {}", receipt.recipient.short())],
        )?,
        ReceiptKind::Revoked => conn.execute(
            "UPDATE outbox SET last_error = ?2, revoked_count = revoked_count + 1 WHERE id = ?1",
            params![id, format!("{} left the mesh before taking it", receipt.recipient.short())],
        )?,
    };
    let mesh: MeshId = parse_col(mesh)?;
    let event = EventBody::Receipt(ReceiptEvent {
        outbox_id: id,
        client_message_id: cmid.clone(),
        message_id: receipt.message_id.clone(),
        kind,
        recipient: receipt.recipient.to_string(),
        recipient_name: crate::roster::name_of(conn, &mesh, &receipt.recipient)?,
        at: receipt.at,
    });
    let sender: PublicKey = parse_col(sender)?;
    events::append(conn, Some(&mesh), Some(&sender), &event, now)?;
    Ok(())
}

/// Appends an `outbox` event with the row's current state, for its sender.
pub fn emit_state(conn: &Connection, id: i64, now: u64) -> rusqlite::Result<()> {
    let row = conn
        .query_row(
            "SELECT mesh_id, sender, client_message_id, status, last_error, message_id FROM outbox WHERE id = ?1",
            [id],
            |r| {
                let status: String = r.get(3)?;
                let event = OutboxEvent {
                    id,
                    client_message_id: r.get(2)?,
                    status: OutboxStatus::parse(&status).unwrap_or(OutboxStatus::Pending),
                    last_error: r.get(4)?,
                    message_id: r.get(5)?,
                };
                Ok((parse_col::<MeshId>(r.get(0)?)?, parse_col::<PublicKey>(r.get(1)?)?, event))
            },
        )
        .optional()?;
    let Some((mesh, sender, event)) = row else { return Ok(()) };
    events::append(conn, Some(&mesh), Some(&sender), &EventBody::Outbox(event), now)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm_row(cmid: &str, sender: &Identity, to: &PublicKey) -> NewRow {
        NewRow {
            client_message_id: cmid.into(),
            fingerprint: "fp".into(),
            mesh_id: MeshId([7; 16]),
            sender: sender.key(),
            session: None,
            target: TargetInfo {
                kind: TargetKind::Direct,
                label: "bob".into(),
                address: to.to_string(),
                name: Some("bob".into()),
            },
            body: "hi".into(),
            nonce: vec![1; 24],
            ciphertext: vec![2; 40],
            sig: sender.sign("test", &[b"x"]),
            key_epoch: None,
        }
    }

    type Routing = (String, String, String, String, Vec<u8>, Vec<u8>, String, String);

    fn routing(c: &Connection, id: i64) -> Routing {
        c.query_row(
            "SELECT mesh_id, sender, target, target_kind, nonce, ciphertext, sig, client_message_id FROM outbox WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)),
        )
        .expect("row")
    }

    /// The mesh the test rows are in (a dead row is retried only while its mesh is here).
    fn with_mesh(c: &Connection) -> rusqlite::Result<()> {
        crate::meshes::insert(
            c,
            &crate::meshes::MeshRow {
                id: MeshId([7; 16]),
                name: "team".into(),
                broker_url: "ws://127.0.0.1:1".into(),
                role: mesh_proto::wire::Role::Member,
                group_key: mesh_proto::crypto::GroupKey::generate(),
                key_epoch: 0,
                embedded: false,
                joined_at: 1,
                my_name: None,
                tls_pin: None,
            },
        )
    }

    #[test]
    fn retry_of_a_dead_dm_keeps_every_routing_field() {
        let (_dir, db) = crate::store::temp_db();
        let (me, bob) = (Identity::generate(), Identity::generate());
        db.call_blocking(|c| {
            with_mesh(c)?;
            let id = insert(c, &dm_row("c1", &me, &bob.key()), 1)?.expect("inserted");
            let before = routing(c, id);
            let claimed = claim(c, &MeshId([7; 16]), &me, 10, 1)?;
            assert_eq!(claimed.len(), 1);
            assert_eq!(mark_failed(c, id, "recipient_unknown: gone", true, None, true, 2)?, OutboxStatus::Dead);
            assert_eq!(retry(c, id, None, 3)?, Transition::Done(OutboxStatus::Pending));
            assert_eq!(routing(c, id), before, "retry changed a routing field");
            let again = claim(c, &MeshId([7; 16]), &me, 10, 3)?;
            assert_eq!(again[0].target, Target::Key(bob.key()), "a DM stays a DM to the same key");
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn retry_and_abort_only_from_the_right_states_and_only_own_rows() {
        let (_dir, db) = crate::store::temp_db();
        let (me, other, bob) = (Identity::generate(), Identity::generate(), Identity::generate());
        db.call_blocking(|c| {
            with_mesh(c)?;
            let id = insert(c, &dm_row("c1", &me, &bob.key()), 1)?.expect("inserted");
            assert_eq!(retry(c, id, None, 1)?, Transition::WrongState(OutboxStatus::Pending));
            assert_eq!(abort(c, id, Some(&other.key()))?, Transition::NotFound, "another sender cannot touch it");
            assert_eq!(abort(c, id, Some(&me.key()))?, Transition::Done(OutboxStatus::Aborted));
            assert!(claim(c, &MeshId([7; 16]), &me, 10, 2)?.is_empty(), "aborted rows are never sent");
            assert_eq!(retry(c, id, Some(&me.key()), 2)?, Transition::Done(OutboxStatus::Pending));
            claim(c, &MeshId([7; 16]), &me, 10, 3)?;
            assert_eq!(abort(c, id, None)?, Transition::WrongState(OutboxStatus::Inflight));
            assert_eq!(abort(c, 999, None)?, Transition::NotFound);
            // Once its mesh is gone from here (left), a dead row stays dead.
            abort(c, id, None).ok();
            c.execute("UPDATE outbox SET status = 'dead' WHERE id = ?1", [id])?;
            c.execute("DELETE FROM meshes WHERE id = ?1", [MeshId([7; 16]).to_string()])?;
            assert_eq!(retry(c, id, None, 4)?, Transition::MeshGone);
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn rows_are_claimed_only_by_their_own_sender() {
        let (_dir, db) = crate::store::temp_db();
        let (session, member, bob) = (Identity::generate(), Identity::generate(), Identity::generate());
        db.call_blocking(|c| {
            insert(c, &dm_row("from-session", &session, &bob.key()), 1)?;
            let member_claims = claim(c, &MeshId([7; 16]), &member, 10, 1)?;
            assert!(member_claims.is_empty(), "a session's row was claimed for the member's connection");
            assert_eq!(claim(c, &MeshId([7; 16]), &session, 10, 1)?.len(), 1);
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn rate_limiting_never_uses_up_attempts_but_failures_do() {
        let (_dir, db) = crate::store::temp_db();
        let (me, bob) = (Identity::generate(), Identity::generate());
        let mesh = MeshId([7; 16]);
        db.call_blocking(|c| {
            let id = insert(c, &dm_row("c1", &me, &bob.key()), 0)?.expect("inserted");
            let mut now = 0;
            for _ in 0..(MAX_ATTEMPTS * 2) {
                now += 60_000;
                assert_eq!(claim(c, &mesh, &me, 1, now)?.len(), 1);
                assert_eq!(mark_failed(c, id, "rate_limited", false, Some(5), false, now)?, OutboxStatus::Pending);
            }
            for attempt in 1..=MAX_ATTEMPTS {
                now += 60_000;
                assert_eq!(claim(c, &mesh, &me, 1, now)?.len(), 1);
                let status = mark_failed(c, id, "internal", false, None, true, now)?;
                let expected = if attempt == MAX_ATTEMPTS { OutboxStatus::Dead } else { OutboxStatus::Pending };
                assert_eq!(status, expected, "attempt {attempt}");
            }
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn an_inflight_row_whose_lease_runs_out_is_pending_again_and_start_up_recovers_all() {
        let (_dir, db) = crate::store::temp_db();
        let (me, bob) = (Identity::generate(), Identity::generate());
        let mesh = MeshId([7; 16]);
        db.call_blocking(|c| {
            let a = insert(c, &dm_row("a", &me, &bob.key()), 0)?.expect("inserted");
            claim(c, &mesh, &me, 10, 0)?;
            assert_eq!(expire_leases(c, LEASE_MS - 1)?, 0, "the lease still holds");
            assert_eq!(expire_leases(c, LEASE_MS)?, 1);
            assert_eq!(entry(c, a)?.expect("row").status, OutboxStatus::Pending);
            claim(c, &mesh, &me, 10, LEASE_MS)?;
            assert_eq!(recover_inflight(c)?, 1);
            assert_eq!(entry(c, a)?.expect("row").status, OutboxStatus::Pending);
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn a_row_whose_attempts_ran_out_without_answers_dies_when_next_claimed() {
        let (_dir, db) = crate::store::temp_db();
        let (me, bob) = (Identity::generate(), Identity::generate());
        let mesh = MeshId([7; 16]);
        db.call_blocking(|c| {
            let id = insert(c, &dm_row("c1", &me, &bob.key()), 0)?.expect("inserted");
            for i in 0..MAX_ATTEMPTS {
                let now = u64::from(i) * (LEASE_MS + 1);
                assert_eq!(claim(c, &mesh, &me, 10, now)?.len(), 1, "attempt {i}");
                expire_leases(c, now + LEASE_MS)?;
            }
            assert_eq!(bury(c, &mesh, &me.key(), u64::from(MAX_ATTEMPTS) * (LEASE_MS + 1))?, 1);
            let e = entry(c, id)?.expect("row");
            assert_eq!(e.status, OutboxStatus::Dead);
            assert!(e.last_error.expect("reason").contains("gave up"));
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn expired_rows_die_instead_of_being_sent() {
        let (_dir, db) = crate::store::temp_db();
        let (me, bob) = (Identity::generate(), Identity::generate());
        db.call_blocking(|c| {
            let id = insert(c, &dm_row("c1", &me, &bob.key()), 0)?.expect("inserted");
            assert_eq!(bury(c, &MeshId([7; 16]), &me.key(), TTL_MS + 1)?, 1);
            assert!(claim(c, &MeshId([7; 16]), &me, 10, TTL_MS + 1)?.is_empty());
            let e = entry(c, id)?.expect("row");
            assert_eq!(e.status, OutboxStatus::Dead);
            assert!(e.last_error.expect("reason").contains("expired"));
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        for attempts in 1..40 {
            let d = backoff_ms(attempts);
            assert!(d <= BACKOFF_CAP_MS, "{attempts}: {d}");
            assert!(d >= BACKOFF_BASE_MS / 2);
        }
        assert!(backoff_ms(1) <= BACKOFF_BASE_MS);
        assert!(backoff_ms(30) >= BACKOFF_CAP_MS / 2);
    }
}
