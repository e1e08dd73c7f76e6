//! The SQLite implementation of [`Store`]: one file, WAL; every write runs in a group-committed
//! `BEGIN IMMEDIATE` transaction ([`Db::batch`]), reads run on the blocking pool.

use std::path::Path;

use async_trait::async_trait;
use mesh_proto::{MeshId, PublicKey};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Claimed, Ended, Enqueued, Expired, InviteRecord, JoinOutcome, Lease, MembershipChange, MembershipOutcome,
    MeshLimitSettings, MeshRecord, NewMessage, PeerRecord, QueueStat, Reaped, Receipted, RosterEntry, SentRecord,
    Store, StoreError,
};
use crate::sqlite::{Db, DbError, parse_col as parse};

mod peers;
mod queue;

use peers::{PEER_COLUMNS, get_peer, insert_peer, peer_from_row};
use queue::{enqueue_in, wrote_then_refused};

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
    // Names are unique in a mesh up to confusables (`name_key`, filled in at open for older rows);
    // sessions can end.
    r#"
ALTER TABLE peers ADD COLUMN name_key TEXT;
ALTER TABLE peers ADD COLUMN ended_at INTEGER;
CREATE INDEX peers_by_name_key ON peers(mesh_id, name_key);
"#,
    // Owners and admins set a mesh's limits within the broker's; NULL is the broker's value.
    r#"
ALTER TABLE meshes ADD COLUMN max_sessions_per_member INTEGER;
ALTER TABLE meshes ADD COLUMN max_connections_per_member INTEGER;
ALTER TABLE meshes ADD COLUMN max_connections INTEGER;
"#,
    // Names are compared by three keys (`names::NameKeys`): also as written and in upper case, so
    // that capitals of other scripts cannot pass for a name. Every key is filled in again at open.
    r#"
ALTER TABLE peers ADD COLUMN name_key_cased TEXT;
ALTER TABLE peers ADD COLUMN name_key_upper TEXT;
UPDATE peers SET name_key = NULL;
CREATE INDEX peers_by_name_key_cased ON peers(mesh_id, name_key_cased);
CREATE INDEX peers_by_name_key_upper ON peers(mesh_id, name_key_upper);
"#,
    // The three keys keep their case now (`name_key` in lower case, `name_key_cased` as written,
    // `name_key_upper`) and are compared any to any: filled in again at open.
    r#"
UPDATE peers SET name_key = NULL;
"#,
    // Membership: who invited whom, removals, the invites issuers registered (listed, revocable),
    // and the epoch of the mesh's key with whether it is wanted anew after a removal.
    r#"
ALTER TABLE peers ADD COLUMN invited_by TEXT;
ALTER TABLE peers ADD COLUMN revoked_at INTEGER;
ALTER TABLE peers ADD COLUMN revoked_by TEXT;
CREATE TABLE invites (
    mesh_id TEXT NOT NULL,
    invite_id TEXT NOT NULL,
    issued_by TEXT NOT NULL,
    role TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    max_uses INTEGER,
    revoked_at INTEGER,
    revoked_by TEXT,
    PRIMARY KEY (mesh_id, invite_id)
);
ALTER TABLE meshes ADD COLUMN key_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE meshes ADD COLUMN rekey_wanted_at INTEGER;
"#,
];

/// The schema version this build writes (a backup of a newer one is refused).
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

#[derive(Clone, Debug)]
pub struct SqliteStore {
    db: Db,
    /// The lock that makes this process the database's only broker.
    _lock: std::sync::Arc<std::fs::File>,
}

impl SqliteStore {
    /// Opens the store. A SQLite store belongs to one broker process, so no connection of a previous
    /// process can still hold a lease: they are all released here, and queued items go out as soon
    /// as their recipients connect.
    pub fn open(path: &Path) -> Result<SqliteStore, DbError> {
        // A second broker on the same file would release the first one's leases and serve its
        // recipients twice: one process per database.
        let lock = crate::sqlite::lock_exclusive(path)?;
        let db = Db::open(path, MIGRATIONS)?;
        let released = db.call_blocking(|c| {
            c.execute("UPDATE queue SET lease_until = NULL, lease_conn = NULL WHERE lease_until IS NOT NULL", [])
        })?;
        if released > 0 {
            tracing::info!(released, "released the leases of the previous broker process");
        }
        let keyed = db.call_blocking(|c| peers::backfill_name_keys(c))?;
        if keyed > 0 {
            tracing::info!(peers = keyed, "computed the name keys of peers stored by an earlier version");
        }
        Ok(SqliteStore { db, _lock: std::sync::Arc::new(lock) })
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
                c.query_row(
                    "SELECT id, name, owner, created_at, max_sessions_per_member, max_connections_per_member, \
                     max_connections, key_epoch, rekey_wanted_at FROM meshes WHERE id = ?1",
                    [id.to_string()],
                    |r| {
                        Ok(MeshRecord {
                            id: parse(r.get(0)?)?,
                            name: r.get(1)?,
                            owner: parse(r.get(2)?)?,
                            created_at: r.get::<_, i64>(3)? as u64,
                            limits: MeshLimitSettings {
                                sessions_per_member: r.get(4)?,
                                connections_per_member: r.get(5)?,
                                connections: r.get(6)?,
                            },
                            key_epoch: r.get::<_, i64>(7)? as u64,
                            rekey_wanted: r.get::<_, Option<i64>>(8)?.is_some(),
                        })
                    },
                )
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

    async fn join(&self, mesh: MeshId, invite: InviteRecord, peer: PeerRecord) -> Result<JoinOutcome, StoreError> {
        self.write(move |tx| {
            if let Some(existing) = get_peer(tx, &mesh, &peer.key)?.filter(|p| !p.revoked) {
                return Ok(JoinOutcome::AlreadyMember(existing));
            }
            let claimed = peers::join(tx, &mesh, &invite, &peer)?;
            Ok(JoinOutcome::Joined(peer.clone(), claimed))
        })
        .await
    }

    async fn register_invite(&self, mesh: MeshId, invite: InviteRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            peers::live_admin(tx, &mesh, &invite.issued_by, "mint invites")?;
            peers::record_invite(tx, &mesh, &invite)?;
            Ok(())
        })
        .await
    }

    async fn invites(&self, mesh: MeshId) -> Result<Vec<mesh_proto::wire::InviteInfo>, StoreError> {
        Ok(self.db.call(move |c| peers::invites(c, &mesh)).await?)
    }

    async fn revoke_invite(&self, mesh: MeshId, invite_id: String, by: PublicKey, now: u64) -> Result<(), StoreError> {
        self.write(move |tx| peers::revoke_invite(tx, &mesh, &invite_id, &by, now)).await
    }

    async fn change_membership(&self, mesh: MeshId, change: MembershipChange) -> Result<MembershipOutcome, StoreError> {
        self.write(move |tx| peers::change_membership(tx, &mesh, &change)).await
    }

    async fn rotate_key(
        &self,
        mesh: MeshId,
        by: PublicKey,
        epoch: u64,
        grants: Vec<(PublicKey, String)>,
        now: u64,
    ) -> Result<Vec<PublicKey>, StoreError> {
        self.write(move |tx| peers::rotate_key(tx, &mesh, &by, epoch, &grants, now)).await
    }

    async fn want_rekey(&self, mesh: MeshId, have: u64, now: u64) -> Result<bool, StoreError> {
        self.write(move |tx| {
            Ok(tx
                .prepare_cached(
                    "UPDATE meshes SET rekey_wanted_at = COALESCE(rekey_wanted_at, ?3) WHERE id = ?1 AND key_epoch > ?2",
                )?
                .execute(params![mesh.to_string(), have as i64, now as i64])?
                == 1)
        })
        .await
    }

    async fn delete_mesh(&self, mesh: MeshId, by: PublicKey) -> Result<Vec<PublicKey>, StoreError> {
        self.write(move |tx| peers::delete_mesh(tx, &mesh, &by)).await
    }

    async fn upsert_peer(&self, mesh: MeshId, peer: PeerRecord) -> Result<Claimed, StoreError> {
        self.write(move |tx| peers::upsert(tx, &mesh, &peer)).await
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

    async fn live_sessions(&self, mesh: MeshId, member: PublicKey) -> Result<usize, StoreError> {
        Ok(self
            .db
            .call(move |c| {
                c.prepare_cached(
                    "SELECT COUNT(*) FROM peers
                     WHERE mesh_id = ?1 AND member = ?2 AND kind = 'session' AND ended_at IS NULL AND revoked = 0",
                )?
                .query_row(params![mesh.to_string(), member.to_string()], |r| r.get::<_, i64>(0))
            })
            .await? as usize)
    }

    async fn roster(&self, mesh: MeshId) -> Result<Vec<RosterEntry>, StoreError> {
        Ok(self.db.call(move |c| peers::roster(c, &mesh)).await?)
    }

    async fn rename(&self, mesh: MeshId, key: PublicKey, name: String) -> Result<(PeerRecord, Claimed), StoreError> {
        self.write(move |tx| peers::rename(tx, &mesh, &key, &name)).await
    }

    async fn end_session(
        &self,
        mesh: MeshId,
        member: PublicKey,
        session: PublicKey,
        now: u64,
        keep_ended: usize,
    ) -> Result<Ended, StoreError> {
        self.write(move |tx| peers::end_session(tx, &mesh, &member, &session, now, keep_ended)).await
    }

    async fn reap_sessions(
        &self,
        now: u64,
        stale_ms: u64,
        grace_ms: u64,
        online: Vec<(MeshId, PublicKey)>,
    ) -> Result<Reaped, StoreError> {
        self.write(move |tx| Ok(peers::reap_sessions(tx, now, stale_ms, grace_ms, &online)?)).await
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
        self.write(move |tx| queue::lease(tx, mesh, recipient, conn, limit, now, lease_ms)).await
    }

    async fn ack(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        delivery_ids: Vec<u64>,
        now: u64,
    ) -> Result<Receipted, StoreError> {
        self.write(move |tx| queue::ack(tx, mesh, recipient, &delivery_ids, now)).await
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
        self.write(move |tx| queue::expire(tx, now)).await
    }

    async fn queue_stats(&self, now: u64) -> Result<Vec<QueueStat>, StoreError> {
        let rows: Vec<(String, i64, Option<i64>)> = self
            .db
            .call(|c| {
                c.prepare_cached(
                    "SELECT me.id, COUNT(q.id), MIN(m.created_at) FROM meshes me
                     LEFT JOIN queue q ON q.mesh_id = me.id LEFT JOIN messages m ON m.seq = q.message_seq
                     GROUP BY me.id",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
            })
            .await?;
        rows.into_iter()
            .map(|(mesh, depth, oldest)| {
                Ok(QueueStat {
                    mesh: parse(mesh)?,
                    depth: depth as u64,
                    oldest_ms: oldest.map_or(0, |t| now.saturating_sub(t.max(0) as u64)),
                })
            })
            .collect::<Result<_, rusqlite::Error>>()
            .map_err(|e| StoreError::from(DbError::Sqlite(e)))
    }

    fn observe_commits(&self, observer: crate::sqlite::CommitObserver) {
        self.db.observe_commits(observer);
    }

    async fn record_reads(
        &self,
        mesh: MeshId,
        reader: PublicKey,
        message_ids: Vec<String>,
        now: u64,
    ) -> Result<Receipted, StoreError> {
        self.write(move |tx| queue::record_reads(tx, mesh, reader, &message_ids, now)).await
    }

    async fn set_group(
        &self,
        mesh: MeshId,
        key: PublicKey,
        group: String,
        member: bool,
    ) -> Result<Vec<String>, StoreError> {
        self.write(move |tx| Ok(peers::set_group(tx, &mesh, &key, &group, member)?)).await
    }

    async fn set_mesh_limits(
        &self,
        mesh: MeshId,
        reset: bool,
        change: MeshLimitSettings,
    ) -> Result<MeshLimitSettings, StoreError> {
        self.write(move |tx| {
            // Each column: the new value when one is given; else NULL on reset; else unchanged.
            let changed = tx
                .prepare_cached(
                    "UPDATE meshes SET \
                     max_sessions_per_member = CASE WHEN ?3 IS NOT NULL THEN ?3 WHEN ?2 THEN NULL \
                         ELSE max_sessions_per_member END, \
                     max_connections_per_member = CASE WHEN ?4 IS NOT NULL THEN ?4 WHEN ?2 THEN NULL \
                         ELSE max_connections_per_member END, \
                     max_connections = CASE WHEN ?5 IS NOT NULL THEN ?5 WHEN ?2 THEN NULL \
                         ELSE max_connections END \
                     WHERE id = ?1 \
                     RETURNING max_sessions_per_member, max_connections_per_member, max_connections",
                )?
                .query_row(
                    params![
                        mesh.to_string(),
                        reset,
                        change.sessions_per_member,
                        change.connections_per_member,
                        change.connections
                    ],
                    |r| {
                        Ok(MeshLimitSettings {
                            sessions_per_member: r.get(0)?,
                            connections_per_member: r.get(1)?,
                            connections: r.get(2)?,
                        })
                    },
                )
                .optional()?;
            changed.ok_or_else(|| TxError::Domain(StoreError::Backend(format!("mesh {mesh} is not in the database"))))
        })
        .await
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
            name: p.key.short().to_string(),
            enc_key: p.enc_key,
            enc_sig: p.enc_sig,
            role,
            joined_at: 1,
            last_seen: None,
            revoked: false,
            ended_at: None,
            invited_by: None,
            revoked_at: None,
        }
    }

    /// A new mesh of `owner`'s.
    fn mesh_owned_by(id: MeshId, owner: &Identity) -> MeshRecord {
        MeshRecord {
            id,
            name: "m".into(),
            owner: owner.key(),
            created_at: 1,
            limits: Default::default(),
            key_epoch: 0,
            rekey_wanted: false,
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
            key_epoch: None,
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
        // A database at the last schema that reused ids, with items 1..=3 queued for b.
        {
            let old = Db::open(&path, &MIGRATIONS[..3]).expect("old schema");
            old.call_blocking(|c| {
                for _ in 1..=3 {
                    c.execute(
                        "INSERT INTO queue (mesh_id, recipient, receipt, expires_at) VALUES (?1, ?2, '{}', ?3)",
                        params![mesh.to_string(), b.key().to_string(), i64::MAX / 2],
                    )?;
                }
                Ok(())
            })
            .expect("old rows");
        }
        let store = SqliteStore::open(&path).expect("upgraded");
        let record = mesh_owned_by(mesh, &a);
        store.create_mesh(record, peer(&a, Role::Owner)).await.expect("mesh");
        store.upsert_peer(mesh, peer(&b, Role::Member)).await.expect("peer");
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

    #[test]
    fn one_process_per_database_and_its_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new/dirs/b.db");
        let first = SqliteStore::open(&path).expect("open");
        for d in [dir.path().join("new"), dir.path().join("new/dirs")] {
            assert_eq!(std::fs::metadata(&d).expect("dir").permissions().mode() & 0o777, 0o700, "{}", d.display());
        }
        match SqliteStore::open(&path) {
            Err(DbError::InUse { .. }) => {}
            other => panic!("a second store on the same file: {other:?}"),
        }
        drop(first);
        SqliteStore::open(&path).expect("free again once the first is gone");
    }

    #[tokio::test]
    async fn leases_of_a_previous_process_are_released_when_the_store_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let (a, b) = (Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        {
            let store = SqliteStore::open(&path).expect("open");
            let record = mesh_owned_by(mesh, &a);
            store.create_mesh(record, peer(&a, Role::Owner)).await.expect("mesh");
            store.upsert_peer(mesh, peer(&b, Role::Member)).await.expect("peer");
            let msg = NewMessage {
                mesh_id: mesh,
                sender: a.key(),
                client_message_id: "c".into(),
                fingerprint: [0; 32],
                target: Target::Key(b.key()),
                message_id: "m1".into(),
                key_epoch: None,
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
