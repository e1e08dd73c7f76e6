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
];

pub fn open(path: &Path) -> Result<Db, DbError> {
    Db::open(path, MIGRATIONS)
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
