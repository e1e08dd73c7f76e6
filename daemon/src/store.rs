//! The daemon's SQLite file (`daemon.db`): meshes, the cached rosters, the outbox and the inbox.
//! Only the daemon opens it. Migrations are numbered and append-only.

use std::path::Path;

use mesh_broker::sqlite::{Db, DbError};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE meshes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    broker_url TEXT NOT NULL,
    role TEXT NOT NULL,
    group_key BLOB NOT NULL,
    embedded INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL
);
CREATE TABLE peers (
    mesh_id TEXT NOT NULL REFERENCES meshes(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    member TEXT NOT NULL,
    name TEXT NOT NULL,
    enc_key TEXT NOT NULL,
    enc_sig TEXT NOT NULL,
    role TEXT NOT NULL,
    online INTEGER NOT NULL,
    last_seen INTEGER,
    PRIMARY KEY (mesh_id, key)
);
CREATE INDEX peers_by_name ON peers(name);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    client_message_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    mesh_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    session TEXT,
    target TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_label TEXT NOT NULL,
    target_name TEXT,
    body TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    sig TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until INTEGER,
    last_error TEXT,
    message_id TEXT,
    recipients INTEGER,
    enqueued_at INTEGER NOT NULL,
    sent_at INTEGER,
    delivered_at INTEGER,
    delivered_count INTEGER NOT NULL DEFAULT 0,
    read_at INTEGER,
    expires_at INTEGER NOT NULL
);
CREATE INDEX outbox_drain ON outbox(mesh_id, sender, status, next_attempt_at, id);
CREATE INDEX outbox_by_message ON outbox(message_id) WHERE message_id IS NOT NULL;
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    client_message_id TEXT NOT NULL,
    target TEXT NOT NULL,
    raw TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    body TEXT,
    sent_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    read_at INTEGER,
    UNIQUE (recipient, message_id)
);
CREATE UNIQUE INDEX inbox_by_sender_cmid ON inbox(recipient, sender, client_message_id);
CREATE INDEX inbox_to_process ON inbox(id) WHERE status = 'received';
"#,
    r#"
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    sign_seed BLOB NOT NULL,
    enc_secret BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    token_hash TEXT UNIQUE,
    token_file TEXT,
    pid INTEGER,
    pid_start TEXT,
    launched_at INTEGER,
    ended_at INTEGER,
    UNIQUE (mesh_id, name)
);
"#,
    r#"
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    mesh_id TEXT,
    audience TEXT,
    data TEXT NOT NULL
);
CREATE INDEX events_by_audience ON events(audience, id);
CREATE INDEX events_by_time ON events(at);
ALTER TABLE outbox ADD COLUMN expired_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN read_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE inbox ADD COLUMN read_receipt TEXT;
CREATE INDEX inbox_reads_to_send ON inbox(mesh_id, recipient) WHERE read_receipt IN ('pending', 'sending');
CREATE TABLE groups (
    mesh_id TEXT NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    wanted INTEGER NOT NULL,
    synced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mesh_id, key, name)
);
CREATE TABLE receipts (
    client_message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    recipient TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (client_message_id, kind, recipient)
);
"#,
    // Outbox, inbox and session ids are shown to users and taken back (`mesh inbox ack 12`, `mesh
    // outbox retry 7`) and appear in events: an id handed out again after its row was deleted would
    // make such a command act on another message. AUTOINCREMENT never hands an id out twice. The
    // copies keep every id, and each sequence starts above every id the event log still names.
    r#"
CREATE TABLE outbox_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_message_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    mesh_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    session TEXT,
    target TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_label TEXT NOT NULL,
    target_name TEXT,
    body TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    sig TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until INTEGER,
    last_error TEXT,
    message_id TEXT,
    recipients INTEGER,
    enqueued_at INTEGER NOT NULL,
    sent_at INTEGER,
    delivered_at INTEGER,
    delivered_count INTEGER NOT NULL DEFAULT 0,
    read_at INTEGER,
    expires_at INTEGER NOT NULL,
    expired_count INTEGER NOT NULL DEFAULT 0,
    read_count INTEGER NOT NULL DEFAULT 0
);
INSERT INTO outbox_v4 SELECT id, client_message_id, fingerprint, mesh_id, sender, session, target, target_kind,
    target_label, target_name, body, nonce, ciphertext, sig, status, attempts, next_attempt_at, lease_until,
    last_error, message_id, recipients, enqueued_at, sent_at, delivered_at, delivered_count, read_at, expires_at,
    expired_count, read_count FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v4 RENAME TO outbox;
CREATE INDEX outbox_drain ON outbox(mesh_id, sender, status, next_attempt_at, id);
CREATE INDEX outbox_by_message ON outbox(message_id) WHERE message_id IS NOT NULL;

CREATE TABLE inbox_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mesh_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    client_message_id TEXT NOT NULL,
    target TEXT NOT NULL,
    raw TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    body TEXT,
    sent_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    read_at INTEGER,
    read_receipt TEXT,
    UNIQUE (recipient, message_id)
);
INSERT INTO inbox_v4 SELECT id, mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
    status, attempts, last_error, body, sent_at, received_at, read_at, read_receipt FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_v4 RENAME TO inbox;
CREATE UNIQUE INDEX inbox_by_sender_cmid ON inbox(recipient, sender, client_message_id);
CREATE INDEX inbox_to_process ON inbox(id) WHERE status = 'received';
CREATE INDEX inbox_reads_to_send ON inbox(mesh_id, recipient) WHERE read_receipt IN ('pending', 'sending');

CREATE TABLE sessions_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mesh_id TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    sign_seed BLOB NOT NULL,
    enc_secret BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    token_hash TEXT UNIQUE,
    token_file TEXT,
    pid INTEGER,
    pid_start TEXT,
    launched_at INTEGER,
    ended_at INTEGER,
    UNIQUE (mesh_id, name)
);
INSERT INTO sessions_v4 SELECT id, mesh_id, name, key, sign_seed, enc_secret, created_at, token_hash, token_file,
    pid, pid_start, launched_at, ended_at FROM sessions;
DROP TABLE sessions;
ALTER TABLE sessions_v4 RENAME TO sessions;

DELETE FROM sqlite_sequence WHERE name IN ('outbox', 'inbox', 'sessions');
INSERT INTO sqlite_sequence (name, seq) VALUES
    ('outbox', COALESCE((SELECT MAX(x) FROM (
        SELECT MAX(id) AS x FROM outbox
        UNION ALL SELECT MAX(CAST(json_extract(data, '$.id') AS INTEGER)) FROM events WHERE kind = 'outbox')), 0)),
    ('inbox', COALESCE((SELECT MAX(x) FROM (
        SELECT MAX(id) AS x FROM inbox
        UNION ALL SELECT MAX(CAST(json_extract(data, '$.id') AS INTEGER)) FROM events WHERE kind = 'message'
        UNION ALL SELECT MAX(CAST(j.value AS INTEGER)) FROM events, json_each(events.data, '$.ids') j
            WHERE events.kind = 'read')), 0)),
    ('sessions', COALESCE((SELECT MAX(id) FROM sessions), 0));
"#,
    // Names per mesh (`my_name`; NULL: the identity's name), what the roster knows of groups and
    // ended sessions, and whether the broker was told that a session ended (sessions that ended
    // before this version are told once, so that brokers drop them from broadcasts).
    r#"
ALTER TABLE meshes ADD COLUMN my_name TEXT;
ALTER TABLE peers ADD COLUMN groups TEXT;
ALTER TABLE peers ADD COLUMN ended_at INTEGER;
ALTER TABLE sessions ADD COLUMN end_synced INTEGER NOT NULL DEFAULT 0;
"#,
    // Deleted means deleted: whatever removes an inbox row (flush, delete, retention) also removes
    // its body from the event log, leaving a body-less tombstone; bodies already orphaned by an
    // earlier version are scrubbed now.
    r#"
CREATE INDEX events_by_message ON events(json_extract(data, '$.id')) WHERE kind = 'message';
CREATE TRIGGER inbox_deleted_scrubs_events AFTER DELETE ON inbox BEGIN
    UPDATE events SET data = json_set(data, '$.body', NULL, '$.deleted', json('true'))
    WHERE kind = 'message' AND json_extract(data, '$.id') = old.id;
END;
UPDATE events SET data = json_set(data, '$.body', NULL, '$.deleted', json('true'))
WHERE kind = 'message' AND NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.id = json_extract(events.data, '$.id'));
"#,
    // Which messages were announced to their recipient on which channel (pushed to an agent, or
    // woke it): each at most once per channel. A deleted message takes its notices with it.
    r#"
CREATE TABLE notices (
    inbox_id INTEGER NOT NULL,
    channel TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (inbox_id, channel)
) WITHOUT ROWID;
CREATE INDEX inbox_unread ON inbox(recipient, id) WHERE read_at IS NULL AND status = 'ready';
CREATE TRIGGER inbox_deleted_drops_notices AFTER DELETE ON inbox BEGIN
    DELETE FROM notices WHERE inbox_id = old.id;
END;
"#,
    // A notice can be claimed first and confirmed once delivered: one claimed by a claimant that
    // never confirmed it (it died before delivering) goes to the next claimant.
    r#"
ALTER TABLE notices ADD COLUMN claimant TEXT;
ALTER TABLE notices ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1;
"#,
    // Webhook endpoints and their deliveries (docs/webhooks.md). A delivery carries its payload, made
    // when the event was; deleting a message scrubs its body from the payloads that report it.
    r#"
CREATE TABLE webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    owner_mesh TEXT,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    mesh_id TEXT,
    peer TEXT,
    description TEXT,
    allow_insecure_http INTEGER NOT NULL DEFAULT 0,
    secret TEXT NOT NULL,
    previous TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL DEFAULT 1,
    disabled_reason TEXT,
    failing_since INTEGER,
    failures INTEGER NOT NULL DEFAULT 0,
    last_success_at INTEGER,
    slow INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE INDEX webhooks_by_owner ON webhooks(owner);
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id INTEGER NOT NULL,
    uid TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    event_id INTEGER,
    inbox_id INTEGER,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    round_start INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until INTEGER,
    deadline INTEGER NOT NULL,
    last_attempt_at INTEGER,
    last_status INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    delivered_at INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(webhook_id, status, next_attempt_at, id);
CREATE INDEX webhook_deliveries_by_status ON webhook_deliveries(status, delivered_at);
CREATE INDEX webhook_deliveries_by_inbox ON webhook_deliveries(inbox_id) WHERE inbox_id IS NOT NULL;
CREATE TRIGGER inbox_deleted_scrubs_webhooks AFTER DELETE ON inbox BEGIN
    UPDATE webhook_deliveries SET payload = json_set(payload, '$.data.body', NULL, '$.data.deleted', json('true'))
    WHERE inbox_id = old.id;
END;
"#,
    // The pin of a broker's TLS certificate (`sha256:…`), for a broker no authority vouches for.
    "ALTER TABLE meshes ADD COLUMN tls_pin TEXT;",
    // Membership: when each peer joined and who invited it; sends a recipient never took because it
    // left the mesh.
    r#"
ALTER TABLE peers ADD COLUMN joined_at INTEGER;
ALTER TABLE peers ADD COLUMN invited_by TEXT;
ALTER TABLE outbox ADD COLUMN revoked_count INTEGER NOT NULL DEFAULT 0;
"#,
    // Mesh keys by epoch: the current one seals, every one held opens; a broadcast or group send
    // remembers the epoch it is sealed under, and is sealed again when the broker says that key
    // was replaced (`reseal`).
    r#"
ALTER TABLE meshes ADD COLUMN key_epoch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE mesh_keys (
    mesh_id TEXT NOT NULL REFERENCES meshes(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    key BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    replaced_at INTEGER,
    PRIMARY KEY (mesh_id, epoch)
);
INSERT INTO mesh_keys (mesh_id, epoch, key, received_at) SELECT id, 0, group_key, joined_at FROM meshes;
ALTER TABLE outbox ADD COLUMN key_epoch INTEGER;
ALTER TABLE outbox ADD COLUMN reseal INTEGER NOT NULL DEFAULT 0;
"#,
];

/// The schema version this build writes (a backup of a newer one is refused).
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

pub fn open(path: &Path) -> Result<Db, DbError> {
    let db = Db::open(path, MIGRATIONS)?;
    // Freed pages are zeroed, so a deleted message's text does not linger in the file.
    db.call_blocking(|c| c.pragma_update(None, "secure_delete", "ON"))?;
    Ok(db)
}

/// Moves every committed page into the database file and empties the write-ahead log, so that text
/// just deleted (zeroed in its pages by `secure_delete`) leaves no older copy in either file. Run
/// after a delete; it waits for nothing, as the daemon is the file's only user.
pub fn forget_deleted(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let (busy, _log, _moved): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    if busy != 0 {
        tracing::warn!("the write-ahead log could not be emptied after a delete; it will be at the next checkpoint");
    }
    Ok(())
}

/// A nullable time (ms) column.
pub fn opt_ms(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    Ok(r.get::<_, Option<i64>>(i)?.map(|t| t as u64))
}

pub fn get_setting(conn: &rusqlite::Connection, key: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()
}

pub fn set_setting(conn: &rusqlite::Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// A fresh `daemon.db` in a temporary directory (kept alive by the returned guard), for unit tests.
#[cfg(test)]
pub fn temp_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&dir.path().join("d.db")).expect("db");
    (dir, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_inbox(c: &rusqlite::Connection, message_id: &str) -> i64 {
        c.execute(
            "INSERT INTO inbox (mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
                 status, sent_at, received_at) VALUES ('m', 'r', ?1, 's', 'n', ?1, 't', '{}', 'ready', 1, 1)",
            [message_id],
        )
        .expect("insert");
        c.last_insert_rowid()
    }

    #[test]
    fn ids_shown_to_users_are_never_handed_out_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.db");
        // The last schema that reused ids: rows 1..=3, the newest deleted, and the event log naming
        // an inbox row 7 that is already gone.
        {
            let old = Db::open(&path, &MIGRATIONS[..3]).expect("old schema");
            old.call_blocking(|c| {
                for m in ["a", "b", "c"] {
                    insert_inbox(c, m);
                }
                c.execute("DELETE FROM inbox WHERE id = 3", [])?;
                c.execute(
                    "INSERT INTO events (at, kind, data) VALUES (1, 'read', '{\"ids\":[2,7]}'),
                         (1, 'message', '{\"id\":5}')",
                    [],
                )?;
                Ok(())
            })
            .expect("old rows");
        }
        let db = open(&path).expect("upgraded");
        db.call_blocking(|c| {
            let kept: Vec<i64> = c
                .prepare("SELECT id FROM inbox ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            assert_eq!(kept, [1, 2], "rows keep their ids");
            assert_eq!(insert_inbox(c, "d"), 8, "above every id the event log names");
            c.execute("DELETE FROM inbox WHERE id = 8", [])?;
            assert_eq!(insert_inbox(c, "e"), 9, "the deleted newest id is not handed out again");
            Ok(())
        })
        .expect("upgraded rows");
    }
}
