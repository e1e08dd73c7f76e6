//! Messages, queues and receipts on PostgreSQL (the rules are SQLite's; see `store::sqlite::queue`).
//!
//! Rows leave the queue only through `DELETE … RETURNING`: an ack and the janitor, or two janitors,
//! racing for one row each see it once at most, so one receipt is queued for it. Leases are claimed
//! in one statement with `FOR UPDATE SKIP LOCKED`.

use deadpool_postgres::GenericClient;
use mesh_proto::wire::{Receipt, ReceiptKind};
use mesh_proto::{MeshId, PublicKey, Target};

use super::{TxError, parse};
use crate::store::receipts::{RECEIPT_TTL_MS, ReceiptsBySender, receipt_json};
use crate::store::{Enqueued, Expired, Lease, Leased, NewMessage, Receipted, SentRecord, StoreError};

/// Queues items for recipients: `(mesh, recipient, item JSON)` each, expiring at `expires_at`.
async fn queue_items(
    tx: &impl GenericClient,
    items: &[(String, String, String)],
    expires_at: u64,
) -> Result<(), TxError> {
    if items.is_empty() {
        return Ok(());
    }
    let meshes: Vec<&str> = items.iter().map(|(m, _, _)| m.as_str()).collect();
    let recipients: Vec<&str> = items.iter().map(|(_, r, _)| r.as_str()).collect();
    let jsons: Vec<&str> = items.iter().map(|(_, _, j)| j.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO queue (mesh_id, recipient, receipt, expires_at)
             SELECT m, r, j, $4 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) WITH ORDINALITY AS t(m, r, j, n)
             ORDER BY n",
        )
        .await?;
    tx.execute(&stmt, &[&meshes, &recipients, &jsons, &(expires_at as i64)]).await?;
    Ok(())
}

/// Queues a membership notice for each of `members` (kept as long as a receipt).
pub(super) async fn queue_notices(
    tx: &impl GenericClient,
    mesh: &str,
    members: &[String],
    item_json: &str,
    now: u64,
) -> Result<(), TxError> {
    let rows: Vec<(String, String, String)> =
        members.iter().map(|m| (mesh.to_owned(), m.clone(), item_json.to_owned())).collect();
    queue_items(tx, &rows, now + RECEIPT_TTL_MS).await
}

/// Queues key grants `(mesh, member, item JSON)` (kept for [`crate::store::GRANT_TTL_MS`]).
pub(super) async fn queue_grants(
    tx: &impl GenericClient,
    rows: &[(String, String, String)],
    now: u64,
) -> Result<(), TxError> {
    queue_items(tx, rows, now + crate::store::GRANT_TTL_MS).await
}

/// Deletes every item queued for `keys` (peers leaving the mesh), queueing a `revoked` receipt for
/// each message's sender. Returns the senders to wake.
pub(super) async fn drop_queues(
    tx: &impl GenericClient,
    mesh: &MeshId,
    keys: &[PublicKey],
    now: u64,
) -> Result<Vec<PublicKey>, TxError> {
    let keys_s: Vec<String> = keys.iter().map(ToString::to_string).collect();
    let stmt = tx
        .prepare_cached(
            "DELETE FROM queue WHERE mesh_id = $1 AND recipient = ANY($2) RETURNING id, recipient, message_seq",
        )
        .await?;
    let mut rows: Vec<(i64, String, Option<i64>)> =
        tx.query(&stmt, &[&mesh.to_string(), &keys_s]).await?.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    rows.sort_by_key(|(id, _, _)| *id);
    let seqs: Vec<(i64, String)> = rows.into_iter().filter_map(|(_, recipient, seq)| Some((seq?, recipient))).collect();
    let mut receipts = ReceiptsBySender::default();
    add_receipts(tx, &mut receipts, &seqs, ReceiptKind::Revoked, now).await?;
    forget_bodies_if_done(tx, &seqs.iter().map(|(s, _)| *s).collect::<Vec<_>>()).await?;
    queue_receipts(tx, receipts, now).await?.into_iter().map(|(_, sender)| parse(&sender)).collect()
}

/// Adds a receipt of `kind` from `recipient` for the sender of each message in `seqs` still known,
/// in the order of `seqs`. Locks the messages' rows (in `seq` order, so that transactions taking
/// several never deadlock), so that the last of several acks of one message sees the others.
async fn add_receipts(
    tx: &impl GenericClient,
    receipts: &mut ReceiptsBySender,
    seqs: &[(i64, String)],
    kind: ReceiptKind,
    now: u64,
) -> Result<(), TxError> {
    if seqs.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = seqs.iter().map(|(s, _)| *s).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT seq, mesh_id, sender, message_id, client_message_id FROM messages
             WHERE seq = ANY($1) ORDER BY seq FOR UPDATE",
        )
        .await?;
    let rows = tx.query(&stmt, &[&ids]).await?;
    let known: std::collections::HashMap<i64, &tokio_postgres::Row> = rows.iter().map(|r| (r.get(0), r)).collect();
    for (seq, recipient) in seqs {
        let Some(r) = known.get(seq) else { continue };
        let receipt =
            Receipt { message_id: r.get(3), client_message_id: r.get(4), kind, recipient: parse(recipient)?, at: now };
        receipts.push(r.get(1), r.get(2), receipt);
    }
    Ok(())
}

/// Queues the gathered receipts; returns the (mesh, sender) pairs to wake.
async fn queue_receipts(
    tx: &impl GenericClient,
    receipts: ReceiptsBySender,
    now: u64,
) -> Result<Vec<(String, String)>, TxError> {
    let mut rows = Vec::new();
    let mut woken = Vec::new();
    for ((mesh, sender), items) in receipts.into_items() {
        for item in items {
            rows.push((mesh.clone(), sender.clone(), item));
        }
        woken.push((mesh, sender));
    }
    queue_items(tx, &rows, now + RECEIPT_TTL_MS).await?;
    Ok(woken)
}

/// Drops the stored ciphertext of messages no queue row needs any more; the rows stay until their
/// TTL for idempotency.
async fn forget_bodies_if_done(tx: &impl GenericClient, seqs: &[i64]) -> Result<(), TxError> {
    if seqs.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE messages SET item = NULL WHERE seq = ANY($1) AND item IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM queue WHERE message_seq = messages.seq)",
        )
        .await?;
    tx.execute(&stmt, &[&seqs]).await?;
    Ok(())
}

pub(super) async fn find_sent(
    c: &impl GenericClient,
    mesh: &str,
    sender: &str,
    client_message_id: &str,
) -> Result<Option<SentRecord>, TxError> {
    let stmt = c
        .prepare_cached(
            "SELECT fingerprint, message_id, recipients FROM messages
             WHERE mesh_id = $1 AND sender = $2 AND client_message_id = $3",
        )
        .await?;
    Ok(c.query_opt(&stmt, &[&mesh, &sender, &client_message_id]).await?.map(|r| SentRecord {
        fingerprint: r.get::<_, Vec<u8>>(0).try_into().unwrap_or([0; 32]),
        message_id: r.get(1),
        recipients: r.get::<_, i64>(2) as u32,
    }))
}

/// The answer to a send whose (mesh, sender, client_message_id) was stored before.
fn duplicate(msg: &NewMessage, first: SentRecord) -> Result<Enqueued, TxError> {
    if first.fingerprint != msg.fingerprint {
        return Err(TxError::Domain(StoreError::IdempotencyConflict(msg.client_message_id.clone())));
    }
    Ok(Enqueued { message_id: first.message_id, duplicate: true, woken: vec![], recipients: first.recipients })
}

/// Queues `msg` for each recipient of its target, or answers a duplicate with the first send. Every
/// refusal comes before the first write.
pub(super) async fn enqueue(tx: &impl GenericClient, msg: &NewMessage) -> Result<Enqueued, TxError> {
    let mesh = msg.mesh_id.to_string();
    let sender = msg.sender.to_string();
    if let Some(first) = find_sent(tx, &mesh, &sender, &msg.client_message_id).await? {
        return duplicate(msg, first);
    }
    if !matches!(msg.target, Target::Key(_)) {
        // Sealed under the mesh key: the one in force now, or refused before anything is written.
        let stmt = tx.prepare_cached("SELECT key_epoch FROM meshes WHERE id = $1").await?;
        let current: i64 = tx.query_opt(&stmt, &[&mesh]).await?.map_or(0, |r| r.get(0));
        if (msg.key_epoch.unwrap_or(0) as i64) < current {
            return Err(TxError::Domain(StoreError::StaleKey { current: current as u64 }));
        }
    }
    let recipients: Vec<String> = match &msg.target {
        Target::Key(key) => {
            let stmt = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM peers WHERE mesh_id = $1 AND key = $2 AND NOT revoked)")
                .await?;
            let known: bool = tx.query_one(&stmt, &[&mesh, &key.to_string()]).await?.get(0);
            if !known {
                return Err(TxError::Domain(StoreError::RecipientUnknown(key.to_string())));
            }
            vec![key.to_string()]
        }
        Target::All => {
            let stmt = tx
                .prepare_cached(
                    "SELECT key FROM peers WHERE mesh_id = $1 AND NOT revoked AND ended_at IS NULL AND key != $2
                     ORDER BY key",
                )
                .await?;
            tx.query(&stmt, &[&mesh, &sender]).await?.iter().map(|r| r.get(0)).collect()
        }
        Target::Group(group) => {
            let stmt = tx
                .prepare_cached(
                    "SELECT g.key FROM group_members g JOIN peers p ON p.mesh_id = g.mesh_id AND p.key = g.key
                     WHERE g.mesh_id = $1 AND g.group_name = $2 AND g.key != $3 AND NOT p.revoked
                       AND p.ended_at IS NULL
                     ORDER BY g.key",
                )
                .await?;
            let keys: Vec<String> = tx.query(&stmt, &[&mesh, group, &sender]).await?.iter().map(|r| r.get(0)).collect();
            if keys.is_empty() {
                return Err(TxError::Domain(StoreError::RecipientUnknown(format!("@{group} has no other members"))));
            }
            keys
        }
    };
    // The same send through another replica at the same moment: the unique key decides, and the
    // loser (which waited for the winner's commit) answers as a duplicate.
    let stmt = tx
        .prepare_cached(
            "INSERT INTO messages (mesh_id, sender, client_message_id, fingerprint, message_id, recipients, item,
                 created_at, expires_at, target)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (mesh_id, sender, client_message_id) DO NOTHING RETURNING seq",
        )
        .await?;
    let inserted = tx
        .query_opt(
            &stmt,
            &[
                &mesh,
                &sender,
                &msg.client_message_id,
                &msg.fingerprint.as_slice(),
                &msg.message_id,
                &(recipients.len() as i64),
                &msg.item_json,
                &(msg.created_at as i64),
                &(msg.expires_at as i64),
                &msg.target.to_string(),
            ],
        )
        .await?;
    let Some(row) = inserted else {
        let first = find_sent(tx, &mesh, &sender, &msg.client_message_id).await?;
        let first = first.ok_or_else(|| TxError::Corrupt("a conflicting send vanished".into()))?;
        return duplicate(msg, first);
    };
    let seq: i64 = row.get(0);
    let stmt = tx
        .prepare_cached(
            "INSERT INTO queue (mesh_id, recipient, message_seq, expires_at)
             SELECT $1, r, $2, $3 FROM UNNEST($4::TEXT[]) WITH ORDINALITY AS t(r, n) ORDER BY n",
        )
        .await?;
    tx.execute(&stmt, &[&mesh, &seq, &(msg.expires_at as i64), &recipients]).await?;
    let woken = recipients.iter().map(|r| parse(r)).collect::<Result<Vec<PublicKey>, _>>()?;
    Ok(Enqueued { message_id: msg.message_id.clone(), duplicate: false, recipients: woken.len() as u32, woken })
}

/// [`enqueue`] for a batch of DMs from one sender in one mesh (what one connection's burst of sends
/// is), in four statements whatever its size instead of four per message. `None` when the batch is
/// not of that shape (a broadcast, a group, a client id twice): [`enqueue`] each then.
pub(super) async fn enqueue_direct(
    tx: &impl GenericClient,
    msgs: &[NewMessage],
) -> Result<Option<Vec<Result<Enqueued, StoreError>>>, TxError> {
    let Some(first) = msgs.first() else { return Ok(Some(vec![])) };
    let mut cmids = std::collections::HashSet::new();
    let direct = msgs.iter().all(|m| {
        matches!(m.target, Target::Key(_))
            && m.mesh_id == first.mesh_id
            && m.sender == first.sender
            && cmids.insert(m.client_message_id.as_str())
    });
    if !direct {
        return Ok(None);
    }
    let (mesh, sender) = (first.mesh_id.to_string(), first.sender.to_string());
    let cmids: Vec<&str> = msgs.iter().map(|m| m.client_message_id.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT client_message_id, fingerprint, message_id, recipients FROM messages
             WHERE mesh_id = $1 AND sender = $2 AND client_message_id = ANY($3)",
        )
        .await?;
    let mut sent: std::collections::HashMap<String, SentRecord> = tx
        .query(&stmt, &[&mesh, &sender, &cmids])
        .await?
        .iter()
        .map(|r| {
            let record = SentRecord {
                fingerprint: r.get::<_, Vec<u8>>(1).try_into().unwrap_or([0; 32]),
                message_id: r.get(2),
                recipients: r.get::<_, i64>(3) as u32,
            };
            (r.get(0), record)
        })
        .collect();
    let key_of = |m: &NewMessage| match &m.target {
        Target::Key(k) => k.to_string(),
        _ => String::new(),
    };
    let keys: Vec<String> = msgs.iter().map(key_of).collect();
    let stmt = tx.prepare_cached("SELECT key FROM peers WHERE mesh_id = $1 AND key = ANY($2) AND NOT revoked").await?;
    let known: std::collections::HashSet<String> =
        tx.query(&stmt, &[&mesh, &keys]).await?.iter().map(|r| r.get(0)).collect();
    // Each message's answer, or `None` while it is to be stored.
    let mut out: Vec<Option<Result<Enqueued, StoreError>>> = Vec::with_capacity(msgs.len());
    let mut new = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let to = key_of(m);
        out.push(if let Some(first) = sent.remove(&m.client_message_id) {
            Some(duplicate(m, first).map_err(StoreError::from))
        } else if !known.contains(&to) {
            Some(Err(StoreError::RecipientUnknown(to)))
        } else {
            new.push((i, to));
            None
        });
    }
    if !new.is_empty() {
        let pick = |f: &dyn Fn(&NewMessage) -> String| new.iter().map(|(i, _)| f(&msgs[*i])).collect::<Vec<_>>();
        let (cmids, ids, items, targets) = (
            pick(&|m| m.client_message_id.clone()),
            pick(&|m| m.message_id.clone()),
            pick(&|m| m.item_json.clone()),
            pick(&|m| m.target.to_string()),
        );
        let fingerprints: Vec<&[u8]> = new.iter().map(|(i, _)| msgs[*i].fingerprint.as_slice()).collect();
        let created: Vec<i64> = new.iter().map(|(i, _)| msgs[*i].created_at as i64).collect();
        let expires: Vec<i64> = new.iter().map(|(i, _)| msgs[*i].expires_at as i64).collect();
        // A plain insert (cheaper than `ON CONFLICT`): none of these was stored when looked up above.
        // The same send through another replica at the same moment breaks the unique key; the
        // transaction is run again ([`TxError::is_retryable`]) and answers it as a duplicate.
        let stmt = tx
            .prepare_cached(
                "INSERT INTO messages (mesh_id, sender, client_message_id, fingerprint, message_id, recipients, item,
                     created_at, expires_at, target)
                 SELECT $1, $2, c, f, i, 1, j, ca, e, t
                 FROM UNNEST($3::TEXT[], $4::BYTEA[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::TEXT[])
                     WITH ORDINALITY AS u(c, f, i, j, ca, e, t, n)
                 ORDER BY n
                 RETURNING client_message_id, seq",
            )
            .await?;
        let stored: std::collections::HashMap<String, i64> = tx
            .query(&stmt, &[&mesh, &sender, &cmids, &fingerprints, &ids, &items, &created, &expires, &targets])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let (mut recipients, mut seqs, mut expiry) = (Vec::new(), Vec::new(), Vec::new());
        for (i, to) in &new {
            let m = &msgs[*i];
            let seq = stored.get(&m.client_message_id).copied();
            seqs.push(seq.ok_or_else(|| TxError::Corrupt("a batch of sends was stored in part".into()))?);
            recipients.push(to.clone());
            expiry.push(m.expires_at as i64);
            out[*i] = Some(Ok(Enqueued {
                message_id: m.message_id.clone(),
                duplicate: false,
                recipients: 1,
                woken: vec![parse(to)?],
            }));
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO queue (mesh_id, recipient, message_seq, expires_at)
                 SELECT $1, r, s, e FROM UNNEST($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) WITH ORDINALITY AS u(r, s, e, n)
                 ORDER BY n",
            )
            .await?;
        tx.execute(&stmt, &[&mesh, &recipients, &seqs, &expiry]).await?;
    }
    Ok(Some(out.into_iter().map(|o| o.unwrap_or_else(|| Err(StoreError::Backend("unanswered send".into())))).collect()))
}

/// Leases up to `limit` of `recipient`'s free items (never leased, or whose lease ran out) to
/// connection `conn` of replica `replica`, oldest first: one statement, rows locked by another
/// replica's claim at the same moment are skipped rather than waited for.
#[allow(clippy::too_many_arguments)]
pub(super) async fn lease(
    c: &impl GenericClient,
    replica: i64,
    mesh: MeshId,
    recipient: PublicKey,
    conn: u64,
    limit: u32,
    now: u64,
    lease_ms: u64,
) -> Result<Lease, TxError> {
    let (mesh, recipient) = (mesh.to_string(), recipient.to_string());
    let stmt = c
        .prepare_cached(
            "WITH picked AS (
                 SELECT id, lease_until IS NOT NULL AS again FROM queue
                 WHERE mesh_id = $1 AND recipient = $2 AND (lease_until IS NULL OR lease_until <= $3)
                   AND expires_at > $3
                 ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED
             ), leased AS (
                 UPDATE queue q SET lease_until = $5, lease_replica = $6, lease_conn = $7, attempts = q.attempts + 1
                 FROM picked WHERE q.id = picked.id
                 RETURNING q.id, q.receipt, q.message_seq, picked.again
             )
             SELECT l.id, COALESCE(l.receipt, m.item), l.again FROM leased l
             LEFT JOIN messages m ON m.seq = l.message_seq ORDER BY l.id",
        )
        .await?;
    let rows = c
        .query(
            &stmt,
            &[
                &mesh,
                &recipient,
                &(now as i64),
                &i64::from(limit),
                &((now + lease_ms) as i64),
                &replica,
                &(conn as i64),
            ],
        )
        .await?;
    let short = rows.len() < limit as usize;
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        let id: i64 = r.get(0);
        match r.get::<_, Option<String>>(1) {
            Some(item_json) => items.push(Leased { delivery_id: id as u64, item_json, redelivery: r.get(2) }),
            None => tracing::error!(delivery_id = id, "queue row without an item; skipped"),
        }
    }
    let next_foreign_expiry = if short {
        let stmt = c
            .prepare_cached(
                "SELECT MIN(lease_until) FROM queue
                 WHERE mesh_id = $1 AND recipient = $2 AND lease_until > $3 AND expires_at > $3",
            )
            .await?;
        c.query_one(&stmt, &[&mesh, &recipient, &(now as i64)]).await?.get::<_, Option<i64>>(0).map(|t| t as u64)
    } else {
        None
    };
    Ok(Lease { items, next_foreign_expiry })
}

/// Deletes acked items and queues `delivered` receipts for their senders; returns the senders.
pub(super) async fn ack(
    tx: &impl GenericClient,
    mesh: MeshId,
    recipient: PublicKey,
    delivery_ids: &[u64],
    now: u64,
) -> Result<Receipted, TxError> {
    let (mesh, recipient) = (mesh.to_string(), recipient.to_string());
    let ids: Vec<i64> = delivery_ids.iter().map(|&id| id as i64).collect();
    let stmt = tx
        .prepare_cached(
            "DELETE FROM queue WHERE id = ANY($1) AND mesh_id = $2 AND recipient = $3 RETURNING id, message_seq",
        )
        .await?;
    let deleted = tx.query(&stmt, &[&ids, &mesh, &recipient]).await?;
    // Receipts in the order the recipient acked.
    let gone: std::collections::HashMap<i64, Option<i64>> = deleted.iter().map(|r| (r.get(0), r.get(1))).collect();
    let seqs: Vec<(i64, String)> =
        ids.iter().filter_map(|id| gone.get(id).copied().flatten()).map(|seq| (seq, recipient.clone())).collect();
    let mut receipts = ReceiptsBySender::default();
    add_receipts(tx, &mut receipts, &seqs, ReceiptKind::Delivered, now).await?;
    forget_bodies_if_done(tx, &seqs.iter().map(|(s, _)| *s).collect::<Vec<_>>()).await?;
    let count = receipts.count();
    let woken = queue_receipts(tx, receipts, now).await?.iter().map(|(_, s)| parse(s)).collect::<Result<_, _>>()?;
    Ok(Receipted { woken, receipts: count })
}

/// Drops items past their TTL with `expired` receipts, and idempotency records past retention.
/// Rows another replica's janitor is expiring at the same moment are skipped.
pub(super) async fn expire(tx: &impl GenericClient, now: u64) -> Result<Expired, TxError> {
    let mut out = Expired::default();
    let stmt = tx
        .prepare_cached(
            "DELETE FROM queue WHERE id IN (
                 SELECT id FROM queue WHERE expires_at <= $1 ORDER BY id LIMIT 10000 FOR UPDATE SKIP LOCKED)
             RETURNING id, recipient, message_seq",
        )
        .await?;
    let mut rows: Vec<(i64, String, Option<i64>)> =
        tx.query(&stmt, &[&(now as i64)]).await?.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    rows.sort_by_key(|(id, _, _)| *id);
    let mut seqs = Vec::new();
    for (_, recipient, seq) in rows {
        match seq {
            Some(seq) => {
                out.messages_expired += 1;
                seqs.push((seq, recipient));
            }
            None => out.receipts_dropped += 1,
        }
    }
    let mut receipts = ReceiptsBySender::default();
    add_receipts(tx, &mut receipts, &seqs, ReceiptKind::Expired, now).await?;
    forget_bodies_if_done(tx, &seqs.iter().map(|(s, _)| *s).collect::<Vec<_>>()).await?;
    out.receipts = receipts.count();
    for (mesh, sender) in queue_receipts(tx, receipts, now).await? {
        out.woken.push((parse(&mesh)?, parse(&sender)?));
    }
    let stmt = tx
        .prepare_cached(
            "DELETE FROM messages WHERE expires_at <= $1
               AND NOT EXISTS (SELECT 1 FROM queue WHERE message_seq = messages.seq)",
        )
        .await?;
    tx.execute(&stmt, &[&(now as i64)]).await?;
    let stmt = tx
        .prepare_cached(
            "DELETE FROM reads WHERE NOT EXISTS
               (SELECT 1 FROM messages m WHERE m.mesh_id = reads.mesh_id AND m.message_id = reads.message_id)",
        )
        .await?;
    tx.execute(&stmt, &[]).await?;
    out.woken.sort();
    out.woken.dedup();
    Ok(out)
}

/// Records reads by `reader` (addressees only, once each) and queues `read` receipts.
pub(super) async fn record_reads(
    tx: &impl GenericClient,
    mesh: MeshId,
    reader: PublicKey,
    message_ids: &[String],
    now: u64,
) -> Result<Receipted, TxError> {
    let (mesh_s, reader_s) = (mesh.to_string(), reader.to_string());
    let mut senders = Vec::new();
    let mut receipts = 0;
    let find = tx
        .prepare_cached("SELECT sender, client_message_id, target FROM messages WHERE mesh_id = $1 AND message_id = $2")
        .await?;
    for message_id in message_ids {
        let Some(row) = tx.query_opt(&find, &[&mesh_s, message_id]).await? else { continue };
        let (sender, client_message_id, target): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let addressed = match target.parse::<Target>() {
            Ok(Target::Key(k)) => k == reader,
            Ok(Target::All) => sender != reader_s,
            Ok(Target::Group(g)) => {
                let stmt = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM group_members WHERE mesh_id = $1 AND group_name = $2 AND key = $3)",
                    )
                    .await?;
                tx.query_one(&stmt, &[&mesh_s, &g, &reader_s]).await?.get(0)
            }
            Err(_) => false,
        };
        if !addressed {
            continue;
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO reads (mesh_id, message_id, reader, at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await?;
        if tx.execute(&stmt, &[&mesh_s, message_id, &reader_s, &(now as i64)]).await? == 1 {
            let receipt = Receipt {
                message_id: message_id.clone(),
                client_message_id,
                kind: ReceiptKind::Read,
                recipient: reader,
                at: now,
            };
            queue_items(tx, &[(mesh_s.clone(), sender.clone(), receipt_json(receipt))], now + RECEIPT_TTL_MS).await?;
            senders.push(parse(&sender)?);
            receipts += 1;
        }
    }
    senders.sort();
    senders.dedup();
    Ok(Receipted { woken: senders, receipts })
}
