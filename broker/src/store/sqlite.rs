//! The SQLite implementation of [`Store`]: one file, WAL; every write runs in a group-committed
//! `BEGIN IMMEDIATE` transaction ([`Db::batch`]), reads run on the blocking pool.

use std::path::Path;

use async_trait::async_trait;
use mesh_proto::wire::{DeliveryItem, PeerKind, Receipt, ReceiptBatch, ReceiptKind, Role};
use mesh_proto::{MeshId, PublicKey, Target};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    Enqueued, Expired, JoinOutcome, Lease, Leased, MeshRecord, NewMessage, PeerRecord, SentRecord, Store, StoreError,
};
use crate::sqlite::{Db, DbError, parse_col as parse};

/// Receipts live as long as a message's default TTL: the sender may be offline for that long.
const RECEIPT_TTL_MS: u64 = 7 * 24 * 60 * 60 * 1000;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meshes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE peers (
    mesh_id TEXT NOT NULL REFERENCES meshes(id),
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    member TEXT NOT NULL,
    name TEXT NOT NULL,
    enc_key TEXT NOT NULL,
    enc_sig TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    last_seen INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mesh_id, key)
);
CREATE TABLE invite_uses (
    mesh_id TEXT NOT NULL,
    invite_id TEXT NOT NULL,
    uses INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, invite_id)
);
CREATE TABLE group_members (
    mesh_id TEXT NOT NULL,
    group_name TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (mesh_id, group_name, key)
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    client_message_id TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    message_id TEXT NOT NULL,
    recipients INTEGER NOT NULL,
    item TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    UNIQUE (mesh_id, sender, client_message_id)
);
CREATE INDEX messages_by_expiry ON messages(expires_at);
CREATE TABLE queue (
    id INTEGER PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_seq INTEGER REFERENCES messages(seq),
    receipt TEXT,
    lease_until INTEGER,
    lease_conn INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL
);
CREATE INDEX queue_by_recipient ON queue(mesh_id, recipient, id);
CREATE INDEX queue_by_message ON queue(message_seq) WHERE message_seq IS NOT NULL;
CREATE INDEX queue_by_expiry ON queue(expires_at);
"#,
    r#"
CREATE INDEX messages_by_id ON messages(mesh_id, message_id);
ALTER TABLE messages ADD COLUMN target TEXT;
CREATE TABLE reads (
    mesh_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    reader TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, message_id, reader)
);
"#,
    // Free items of a recipient are found without walking the ones leased out: never-leased rows sit
    // together (lease_until NULL) in id order.
    r#"
DROP INDEX queue_by_recipient;
CREATE INDEX queue_by_lease ON queue(mesh_id, recipient, lease_until, id);
"#,
    // A queue id is the `delivery_id` on the wire, and acks are idempotent: an id handed out again
    // (SQLite reuses the largest rowid once it is deleted) would let a late, repeated ack delete a
    // different, undelivered item. AUTOINCREMENT never hands an id out twice. The copy keeps every
    // id; an id above the largest kept one can only have been given to a connection of an earlier
    // process (this runs at start-up, before any connection), and acks never outlive their
    // connection, so none can reach the new ids.
    r#"
CREATE TABLE queue_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mesh_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_seq INTEGER REFERENCES messages(seq),
    receipt TEXT,
    lease_until INTEGER,
    lease_conn INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL
);
INSERT INTO queue_v4 (id, mesh_id, recipient, message_seq, receipt, lease_until, lease_conn, attempts, expires_at)
    SELECT id, mesh_id, recipient, message_seq, receipt, lease_until, lease_conn, attempts, expires_at FROM queue;
DROP TABLE queue;
ALTER TABLE queue_v4 RENAME TO queue;
CREATE INDEX queue_by_lease ON queue(mesh_id, recipient, lease_until, id);
CREATE INDEX queue_by_message ON queue(message_seq) WHERE message_seq IS NOT NULL;
CREATE INDEX queue_by_expiry ON queue(expires_at);
"#,
];

#[derive(Clone, Debug)]
pub struct SqliteStore {
    db: Db,
}

impl SqliteStore {
    /// Opens the store. A SQLite store belongs to one broker process, so no connection of a previous
    /// process can still hold a lease: they are all released here, and queued items go out as soon
    /// as their recipients connect.
    pub fn open(path: &Path) -> Result<SqliteStore, DbError> {
        let db = Db::open(path, MIGRATIONS)?;
        let released = db.call_blocking(|c| {
            c.execute("UPDATE queue SET lease_until = NULL, lease_conn = NULL WHERE lease_until IS NOT NULL", [])
        })?;
        if released > 0 {
            tracing::info!(released, "released the leases of the previous broker process");
        }
        Ok(SqliteStore { db })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Runs `f` in the store's group commit ([`Db::batch`]): a transaction shared with the other writes
    /// waiting at the same moment. A domain refusal must come before `f` writes anything.
    async fn write<F, R>(&self, mut f: F) -> Result<R, StoreError>
    where
        F: FnMut(&Connection) -> Result<R, TxError> + Send + 'static,
        R: Send + 'static,
    {
        self.db
            .batch(move |conn| match f(conn) {
                Ok(r) => Ok(Ok(r)),
                Err(TxError::Sqlite(e)) => Err(e),
                Err(TxError::Domain(e)) => Ok(Err(e)),
            })
            .await?
    }
}

/// Inside a transaction: a domain outcome that rolls back, or a database failure.
enum TxError {
    Domain(StoreError),
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sqlite(e)
    }
}

fn bad_text(what: &str, s: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unexpected {what} {s:?} in database").into(),
    )
}

const PEER_COLUMNS: &str = "key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked";

fn peer_from_row(row: &Row<'_>) -> rusqlite::Result<PeerRecord> {
    let kind: String = row.get(1)?;
    let role: String = row.get(6)?;
    Ok(PeerRecord {
        key: parse(row.get(0)?)?,
        kind: PeerKind::parse(&kind).ok_or_else(|| bad_text("peer kind", &kind))?,
        member: parse(row.get(2)?)?,
        name: row.get(3)?,
        enc_key: parse(row.get(4)?)?,
        enc_sig: parse(row.get(5)?)?,
        role: Role::parse(&role).ok_or_else(|| bad_text("role", &role))?,
        joined_at: row.get::<_, i64>(7)? as u64,
        last_seen: row.get::<_, Option<i64>>(8)?.map(|t| t as u64),
        revoked: row.get(9)?,
    })
}

fn insert_peer(tx: &Connection, mesh: &MeshId, p: &PeerRecord) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO peers (mesh_id, key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (mesh_id, key) DO UPDATE SET
           name = excluded.name, enc_key = excluded.enc_key, enc_sig = excluded.enc_sig, last_seen = excluded.last_seen")?.execute(params![
            mesh.to_string(),
            p.key.to_string(),
            p.kind.as_str(),
            p.member.to_string(),
            p.name,
            p.enc_key.to_string(),
            p.enc_sig.to_string(),
            p.role.as_str(),
            p.joined_at as i64,
            p.last_seen.map(|t| t as i64),
            p.revoked,
        ],
    )?;
    Ok(())
}

fn get_peer(tx: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<Option<PeerRecord>> {
    tx.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 AND key = ?2"))?
        .query_row(params![mesh.to_string(), key.to_string()], peer_from_row)
        .optional()
}

fn queue_receipt(tx: &Connection, mesh: &str, to: &str, receipt: &Receipt, expires_at: u64) -> rusqlite::Result<()> {
    queue_item(tx, mesh, to, &DeliveryItem::Receipt(receipt.clone()), expires_at)
}

fn queue_item(tx: &Connection, mesh: &str, to: &str, item: &DeliveryItem, expires_at: u64) -> rusqlite::Result<()> {
    let json = serde_json::to_string(item).expect("receipts serialise");
    tx.prepare_cached("INSERT INTO queue (mesh_id, recipient, receipt, expires_at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![mesh, to, json, expires_at as i64])?;
    Ok(())
}

/// Most receipts one queued `receipts` item carries.
const RECEIPTS_PER_ITEM: usize = 256;

/// Receipts gathered in one transaction, queued as one item per sender (`receipts`), or `receipt`
/// when there is one: a sender whose 100 messages were acked in one frame gets one delivery, not 100.
#[derive(Default)]
struct ReceiptsBySender(std::collections::BTreeMap<(String, String), Vec<Receipt>>);

impl ReceiptsBySender {
    /// Adds a receipt of `kind` from `recipient` for the sender of message `seq`, if it is still known.
    fn add(&mut self, tx: &Connection, seq: i64, kind: ReceiptKind, recipient: &str, now: u64) -> rusqlite::Result<()> {
        let row: Option<(String, String, String, String)> = tx
            .prepare_cached("SELECT mesh_id, sender, message_id, client_message_id FROM messages WHERE seq = ?1")?
            .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        if let Some((mesh, sender, message_id, client_message_id)) = row {
            let receipt =
                Receipt { message_id, client_message_id, kind, recipient: parse(recipient.to_owned())?, at: now };
            self.0.entry((mesh, sender)).or_default().push(receipt);
        }
        Ok(())
    }

    /// Queues them; returns the (mesh, sender) pairs to wake.
    fn queue(self, tx: &Connection, now: u64) -> rusqlite::Result<Vec<(String, String)>> {
        let mut woken = Vec::with_capacity(self.0.len());
        for ((mesh, sender), receipts) in self.0 {
            for chunk in receipts.chunks(RECEIPTS_PER_ITEM) {
                let item = match chunk {
                    [one] => DeliveryItem::Receipt(one.clone()),
                    many => DeliveryItem::Receipts(ReceiptBatch { receipts: many.to_vec() }),
                };
                queue_item(tx, &mesh, &sender, &item, now + RECEIPT_TTL_MS)?;
            }
            woken.push((mesh, sender));
        }
        Ok(woken)
    }
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
fn wrote_then_refused(e: &StoreError) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERNAL),
        Some(format!("a send was refused after writing ({e})")),
    )
}

/// Queues `msg` for each recipient of its target, or answers a duplicate with the first send. Every
/// refusal comes before the first write.
fn enqueue_in(tx: &Connection, msg: &NewMessage) -> Result<Enqueued, TxError> {
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
                "SELECT key FROM peers WHERE mesh_id = ?1 AND revoked = 0 AND key != ?2 ORDER BY key",
            )?;
            stmt.query_map(params![mesh, sender], |r| r.get(0))?.collect::<Result<_, _>>()?
        }
        Target::Group(group) => {
            let mut stmt = tx.prepare_cached(
                "SELECT g.key FROM group_members g JOIN peers p ON p.mesh_id = g.mesh_id AND p.key = g.key
                 WHERE g.mesh_id = ?1 AND g.group_name = ?2 AND g.key != ?3 AND p.revoked = 0 ORDER BY g.key",
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

#[async_trait]
impl Store for SqliteStore {
    async fn create_mesh(&self, mesh: MeshRecord, owner: PeerRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            let exists: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM meshes WHERE id = ?1)")?
                .query_row([mesh.id.to_string()], |r| r.get(0))?;
            if exists {
                return Err(TxError::Domain(StoreError::MeshExists));
            }
            tx.prepare_cached("INSERT INTO meshes (id, name, owner, created_at) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![mesh.id.to_string(), mesh.name, mesh.owner.to_string(), mesh.created_at as i64])?;
            insert_peer(tx, &mesh.id, &owner)?;
            Ok(())
        })
        .await
    }

    async fn mesh(&self, id: MeshId) -> Result<Option<MeshRecord>, StoreError> {
        Ok(self
            .db
            .call(move |c| {
                c.query_row("SELECT id, name, owner, created_at FROM meshes WHERE id = ?1", [id.to_string()], |r| {
                    Ok(MeshRecord {
                        id: parse(r.get(0)?)?,
                        name: r.get(1)?,
                        owner: parse(r.get(2)?)?,
                        created_at: r.get::<_, i64>(3)? as u64,
                    })
                })
                .optional()
            })
            .await?)
    }

    async fn peer(&self, mesh: MeshId, key: PublicKey) -> Result<Option<PeerRecord>, StoreError> {
        Ok(self
            .db
            .call(move |c| {
                c.query_row(
                    &format!("SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 AND key = ?2"),
                    params![mesh.to_string(), key.to_string()],
                    peer_from_row,
                )
                .optional()
            })
            .await?)
    }

    async fn join(
        &self,
        mesh: MeshId,
        invite_id: &str,
        max_uses: Option<u32>,
        peer: PeerRecord,
    ) -> Result<JoinOutcome, StoreError> {
        let invite_id = invite_id.to_owned();
        self.write(move |tx| {
            if let Some(existing) = get_peer(tx, &mesh, &peer.key)? {
                return Ok(JoinOutcome::AlreadyMember(existing));
            }
            let uses: i64 = tx
                .query_row(
                    "SELECT uses FROM invite_uses WHERE mesh_id = ?1 AND invite_id = ?2",
                    params![mesh.to_string(), invite_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            if max_uses.is_some_and(|max| uses >= i64::from(max)) {
                return Err(TxError::Domain(StoreError::InviteExhausted));
            }
            tx.prepare_cached(
                "INSERT INTO invite_uses (mesh_id, invite_id, uses) VALUES (?1, ?2, 1)
                 ON CONFLICT (mesh_id, invite_id) DO UPDATE SET uses = uses + 1",
            )?
            .execute(params![mesh.to_string(), invite_id])?;
            insert_peer(tx, &mesh, &peer)?;
            Ok(JoinOutcome::Joined(peer.clone()))
        })
        .await
    }

    async fn upsert_peer(&self, mesh: MeshId, peer: PeerRecord) -> Result<(), StoreError> {
        self.write(move |tx| Ok(insert_peer(tx, &mesh, &peer)?)).await
    }

    async fn touch_peer(&self, mesh: MeshId, key: PublicKey, seen_at: u64) -> Result<(), StoreError> {
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE peers SET last_seen = ?3 WHERE mesh_id = ?1 AND key = ?2",
                    params![mesh.to_string(), key.to_string(), seen_at as i64],
                )
            })
            .await?;
        Ok(())
    }

    async fn roster(&self, mesh: MeshId) -> Result<Vec<PeerRecord>, StoreError> {
        Ok(self
            .db
            .call(move |c| {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 ORDER BY joined_at, key"
                ))?;
                stmt.query_map([mesh.to_string()], peer_from_row)?.collect()
            })
            .await?)
    }

    async fn enqueue_many(&self, msgs: Vec<NewMessage>) -> Result<Vec<Result<Enqueued, StoreError>>, StoreError> {
        self.write(move |tx| {
            let mut out = Vec::with_capacity(msgs.len());
            for msg in &msgs {
                let before = tx.total_changes();
                out.push(match enqueue_in(tx, msg) {
                    Ok(done) => Ok(done),
                    // `enqueue_in` refuses before it writes, so a refused send leaves nothing behind.
                    Err(TxError::Domain(e)) if tx.total_changes() == before => Err(e),
                    Err(TxError::Domain(e)) => return Err(TxError::Sqlite(wrote_then_refused(&e))),
                    Err(TxError::Sqlite(e)) => return Err(TxError::Sqlite(e)),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn find_sent(
        &self,
        mesh: MeshId,
        sender: PublicKey,
        client_message_id: &str,
    ) -> Result<Option<SentRecord>, StoreError> {
        let cmid = client_message_id.to_owned();
        let row: Option<(Vec<u8>, String, i64)> = self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT fingerprint, message_id, recipients FROM messages
                     WHERE mesh_id = ?1 AND sender = ?2 AND client_message_id = ?3",
                    params![mesh.to_string(), sender.to_string(), cmid],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
            })
            .await?;
        Ok(row.map(|(fp, message_id, recipients)| SentRecord {
            fingerprint: fp.try_into().unwrap_or([0; 32]),
            message_id,
            recipients: recipients as u32,
        }))
    }

    async fn lease(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        conn: u64,
        limit: u32,
        now: u64,
        lease_ms: u64,
    ) -> Result<Lease, StoreError> {
        self.write(move |tx| {
            // Leases that ran out first (the older items, and few), then never-leased items in id order.
            // No `LIMIT ?`: SQLite re-plans a statement whose bound LIMIT changes; rows are read lazily,
            // so taking `limit` of them reads no more.
            let (mesh_s, recipient_s) = (mesh.to_string(), recipient.to_string());
            let mut rows: Vec<(i64, Option<String>)> = Vec::new();
            for sql in [
                "SELECT q.id, COALESCE(q.receipt, m.item) FROM queue q LEFT JOIN messages m ON m.seq = q.message_seq
                 WHERE q.mesh_id = ?1 AND q.recipient = ?2 AND q.lease_until <= ?3 AND q.expires_at > ?3
                 ORDER BY q.id",
                "SELECT q.id, COALESCE(q.receipt, m.item) FROM queue q LEFT JOIN messages m ON m.seq = q.message_seq
                 WHERE q.mesh_id = ?1 AND q.recipient = ?2 AND q.lease_until IS NULL AND q.expires_at > ?3
                 ORDER BY q.id",
            ] {
                let want = limit as usize - rows.len();
                if want == 0 {
                    break;
                }
                let mut pick = tx.prepare_cached(sql)?;
                let picked =
                    pick.query_map(params![mesh_s, recipient_s, now as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                for row in picked.take(want) {
                    rows.push(row?);
                }
            }
            let mut mark = tx.prepare_cached(
                "UPDATE queue SET lease_until = ?2, lease_conn = ?3, attempts = attempts + 1 WHERE id = ?1",
            )?;
            let short = rows.len() < limit as usize;
            let mut out = Vec::with_capacity(rows.len());
            for (id, item) in rows {
                mark.execute(params![id, (now + lease_ms) as i64, conn as i64])?;
                match item {
                    Some(item_json) => out.push(Leased { delivery_id: id as u64, item_json }),
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
        })
        .await
    }

    async fn ack(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        delivery_ids: Vec<u64>,
        now: u64,
    ) -> Result<Vec<PublicKey>, StoreError> {
        self.write(move |tx| {
            let mesh = mesh.to_string();
            let recipient = recipient.to_string();
            let mut receipts = ReceiptsBySender::default();
            let mut delete = tx.prepare_cached(
                "DELETE FROM queue WHERE id = ?1 AND mesh_id = ?2 AND recipient = ?3 RETURNING message_seq",
            )?;
            for &id in &delivery_ids {
                let seq: Option<Option<i64>> =
                    delete.query_row(params![id as i64, mesh, recipient], |r| r.get(0)).optional()?;
                if let Some(Some(seq)) = seq {
                    receipts.add(tx, seq, ReceiptKind::Delivered, &recipient, now)?;
                    forget_body_if_done(tx, seq)?;
                }
            }
            let senders = receipts.queue(tx, now)?;
            Ok(senders.into_iter().map(|(_, sender)| parse(sender)).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn release(&self, mesh: MeshId, recipient: PublicKey, conn: u64) -> Result<(), StoreError> {
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE queue SET lease_until = NULL, lease_conn = NULL
                     WHERE mesh_id = ?1 AND recipient = ?2 AND lease_conn = ?3",
                    params![mesh.to_string(), recipient.to_string(), conn as i64],
                )
            })
            .await?;
        Ok(())
    }

    async fn expire(&self, now: u64) -> Result<Expired, StoreError> {
        self.write(move |tx| {
            let mut out = Expired::default();
            let rows: Vec<(i64, String, String, Option<i64>)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id, mesh_id, recipient, message_seq FROM queue WHERE expires_at <= ?1 ORDER BY id LIMIT 10000",
                )?;
                stmt.query_map([now as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<Result<_, _>>()?
            };
            let mut receipts = ReceiptsBySender::default();
            for (id, _mesh, recipient, seq) in rows {
                tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?.execute([id])?;
                match seq {
                    Some(seq) => {
                        out.messages_expired += 1;
                        receipts.add(tx, seq, ReceiptKind::Expired, &recipient, now)?;
                        forget_body_if_done(tx, seq)?;
                    }
                    None => out.receipts_dropped += 1,
                }
            }
            for (mesh, sender) in receipts.queue(tx, now)? {
                out.woken.push((parse(mesh)?, parse(sender)?));
            }
            tx.prepare_cached("DELETE FROM messages WHERE expires_at <= ?1 AND NOT EXISTS (SELECT 1 FROM queue WHERE message_seq = messages.seq)")?.execute([now as i64],
            )?;
            tx.prepare_cached("DELETE FROM reads WHERE NOT EXISTS
                   (SELECT 1 FROM messages m WHERE m.mesh_id = reads.mesh_id AND m.message_id = reads.message_id)")?.execute([],
            )?;
            out.woken.sort();
            out.woken.dedup();
            Ok(out)
        })
        .await
    }

    async fn record_reads(
        &self,
        mesh: MeshId,
        reader: PublicKey,
        message_ids: Vec<String>,
        now: u64,
    ) -> Result<Vec<PublicKey>, StoreError> {
        self.write(move |tx| {
            let (mesh_s, reader_s) = (mesh.to_string(), reader.to_string());
            let mut senders = Vec::new();
            for message_id in &message_ids {
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
                    Some(Ok(Target::Group(g))) => tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM group_members WHERE mesh_id = ?1 AND group_name = ?2 AND key = ?3)")?.query_row(params![mesh_s, g, reader_s],
                        |r| r.get(0),
                    )?,
                    _ => false,
                };
                if !addressed {
                    continue;
                }
                let new = tx.prepare_cached("INSERT OR IGNORE INTO reads (mesh_id, message_id, reader, at) VALUES (?1, ?2, ?3, ?4)")?.execute(params![mesh_s, message_id, reader_s, now as i64],
                )?;
                if new == 1 {
                    let receipt = Receipt {
                        message_id: message_id.clone(),
                        client_message_id,
                        kind: ReceiptKind::Read,
                        recipient: reader,
                        at: now,
                    };
                    queue_receipt(tx, &mesh_s, &sender, &receipt, now + RECEIPT_TTL_MS)?;
                    senders.push(parse(sender)?);
                }
            }
            senders.sort();
            senders.dedup();
            Ok(senders)
        })
        .await
    }

    async fn set_group(&self, mesh: MeshId, key: PublicKey, group: String, member: bool) -> Result<(), StoreError> {
        self.write(move |tx| {
            if member {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO group_members (mesh_id, group_name, key) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![mesh.to_string(), group, key.to_string()])?;
            } else {
                tx.prepare_cached("DELETE FROM group_members WHERE mesh_id = ?1 AND group_name = ?2 AND key = ?3")?
                    .execute(params![mesh.to_string(), group, key.to_string()])?;
            }
            Ok(())
        })
        .await
    }

    async fn enqueue_receipt(
        &self,
        mesh: MeshId,
        to: PublicKey,
        receipt: Receipt,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.write(move |tx| Ok(queue_receipt(tx, &mesh.to_string(), &to.to_string(), &receipt, expires_at)?)).await
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::wire::{PeerKind, Role};
    use mesh_proto::{Identity, MeshId, Target};

    use super::*;

    fn peer(id: &Identity, role: Role) -> PeerRecord {
        let p = id.public();
        PeerRecord {
            key: p.key,
            kind: PeerKind::Member,
            member: p.key,
            name: "x".into(),
            enc_key: p.enc_key,
            enc_sig: p.enc_sig,
            role,
            joined_at: 1,
            last_seen: None,
            revoked: false,
        }
    }

    fn dm_to(mesh: MeshId, from: &Identity, to: &Identity, cmid: &str) -> NewMessage {
        NewMessage {
            mesh_id: mesh,
            sender: from.key(),
            client_message_id: cmid.into(),
            fingerprint: [0; 32],
            target: Target::Key(to.key()),
            message_id: format!("m-{cmid}"),
            item_json: "{}".into(),
            created_at: 1,
            expires_at: u64::MAX / 2,
        }
    }

    #[tokio::test]
    async fn delivery_ids_are_never_reused_across_acks_and_the_upgrade_that_made_them_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let (a, b) = (Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        // A database at the last schema that reused ids, with items 1..=3 queued and 3 then acked.
        {
            let old = Db::open(&path, &MIGRATIONS[..3]).expect("old schema");
            let store = SqliteStore { db: old };
            let record = MeshRecord { id: mesh, name: "m".into(), owner: a.key(), created_at: 1 };
            store.create_mesh(record, peer(&a, Role::Owner)).await.expect("mesh");
            store.upsert_peer(mesh, peer(&b, Role::Member)).await.expect("peer");
            let msgs = (1..=3).map(|i| dm_to(mesh, &a, &b, &format!("c{i}"))).collect();
            store.enqueue_many(msgs).await.expect("enqueue");
            let ids = store.db.call_blocking(|c| {
                c.query_row("SELECT MIN(id), MAX(id) FROM queue WHERE receipt IS NULL", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
            });
            assert_eq!(ids.expect("ids"), (1, 3));
        }
        let store = SqliteStore::open(&path).expect("upgraded");
        let leased = store.lease(mesh, b.key(), 1, 10, 2, 60_000).await.expect("lease");
        let ids: Vec<u64> = leased.items.iter().map(|l| l.delivery_id).collect();
        assert_eq!(ids, [1, 2, 3], "queued items keep their ids");
        // Ack the newest; every later item (receipts included) takes an id never handed out before.
        store.ack(mesh, b.key(), vec![3], 3).await.expect("ack");
        let mut seen: std::collections::BTreeSet<u64> = ids.into_iter().collect();
        for i in 4..=6 {
            store.enqueue_many(vec![dm_to(mesh, &a, &b, &format!("c{i}"))]).await.expect("enqueue");
            let leased = store.lease(mesh, b.key(), 1, 10, 4, 60_000).await.expect("lease");
            for item in leased.items {
                assert!(seen.insert(item.delivery_id), "delivery id {} handed out twice", item.delivery_id);
                store.ack(mesh, b.key(), vec![item.delivery_id], 5).await.expect("ack");
            }
            for item in store.lease(mesh, a.key(), 2, 10, 5, 60_000).await.expect("receipts").items {
                assert!(seen.insert(item.delivery_id), "delivery id {} handed out twice", item.delivery_id);
                store.ack(mesh, a.key(), vec![item.delivery_id], 5).await.expect("ack");
            }
        }
        // A repeated ack of an id already acked removes nothing.
        store.ack(mesh, b.key(), vec![3], 7).await.expect("repeated ack");
        let pending: Vec<i64> = store
            .db
            .call_blocking(|c| {
                c.prepare("SELECT id FROM queue WHERE recipient = ?1 ORDER BY id")?
                    .query_map([b.key().to_string()], |r| r.get(0))?
                    .collect()
            })
            .expect("queued");
        assert_eq!(pending, [1, 2], "items 1 and 2 are still queued");
    }

    #[tokio::test]
    async fn leases_of_a_previous_process_are_released_when_the_store_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let (a, b) = (Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        {
            let store = SqliteStore::open(&path).expect("open");
            let record = MeshRecord { id: mesh, name: "m".into(), owner: a.key(), created_at: 1 };
            store.create_mesh(record, peer(&a, Role::Owner)).await.expect("mesh");
            store.upsert_peer(mesh, peer(&b, Role::Member)).await.expect("peer");
            let msg = NewMessage {
                mesh_id: mesh,
                sender: a.key(),
                client_message_id: "c".into(),
                fingerprint: [0; 32],
                target: Target::Key(b.key()),
                message_id: "m1".into(),
                item_json: "{}".into(),
                created_at: 1,
                expires_at: u64::MAX / 2,
            };
            let stored = store.enqueue_many(vec![msg]).await.expect("enqueue");
            assert!(stored[0].is_ok());
            let leased = store.lease(mesh, b.key(), 1, 10, 2, 60_000).await.expect("lease");
            assert_eq!(leased.items.len(), 1);
            let other = store.lease(mesh, b.key(), 2, 10, 3, 60_000).await.expect("lease");
            assert!(other.items.is_empty(), "held");
            assert_eq!(other.next_foreign_expiry, Some(2 + 60_000), "free again when the first lease runs out");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(
            store.lease(mesh, b.key(), 3, 10, 4, 60_000).await.expect("lease").items.len(),
            1,
            "released on open"
        );
    }
}
