//! The PostgreSQL schema: numbered, append-only migrations recorded in `mesh_schema`, applied at
//! start by one replica at a time under a session advisory lock (replicas starting together wait for
//! each other, and the later ones find nothing to do).
//!
//! The tables mirror SQLite's. Times are BIGINT milliseconds, keys and ids TEXT as the protocol writes
//! them. Ids that cross a process boundary (`queue.id` is the wire's `delivery_id`) are identity
//! columns: a sequence never hands a value out twice. Queue rows carry no foreign key to their
//! message: the store keeps them consistent in its transactions, and a key check on every insert
//! and delete would cost each send a row lock on the message.

use deadpool_postgres::Object;

use super::PgError;

/// The unique key of sends: (client_message_id, mesh_id, sender).
pub(super) const SEND_KEY: &str = "messages_by_client_id";

/// The lock migrations run under (any value unlikely to be used by another program on the database).
const MIGRATION_LOCK: i64 = 0x6d65_7368_5f73_6368;

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meshes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    max_sessions_per_member BIGINT,
    max_connections_per_member BIGINT,
    max_connections BIGINT
);
CREATE TABLE peers (
    mesh_id TEXT NOT NULL REFERENCES meshes(id),
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    member TEXT NOT NULL,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL,
    name_key_cased TEXT NOT NULL,
    name_key_upper TEXT NOT NULL,
    enc_key TEXT NOT NULL,
    enc_sig TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    last_seen BIGINT,
    revoked BOOLEAN NOT NULL DEFAULT FALSE,
    ended_at BIGINT,
    PRIMARY KEY (mesh_id, key)
);
CREATE INDEX peers_by_name_key ON peers(mesh_id, name_key);
CREATE INDEX peers_by_name_key_cased ON peers(mesh_id, name_key_cased);
CREATE INDEX peers_by_name_key_upper ON peers(mesh_id, name_key_upper);
CREATE INDEX peers_by_member ON peers(mesh_id, member);
CREATE INDEX peers_sessions_by_activity ON peers(kind, ended_at);
CREATE TABLE invite_uses (
    mesh_id TEXT NOT NULL,
    invite_id TEXT NOT NULL,
    uses BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, invite_id)
);
CREATE TABLE group_members (
    mesh_id TEXT NOT NULL,
    group_name TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (mesh_id, group_name, key)
);
CREATE INDEX group_members_by_key ON group_members(mesh_id, key);
CREATE TABLE messages (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    client_message_id TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    message_id TEXT NOT NULL,
    recipients BIGINT NOT NULL,
    item TEXT,
    target TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    UNIQUE (mesh_id, sender, client_message_id)
);
CREATE INDEX messages_by_id ON messages(mesh_id, message_id);
CREATE INDEX messages_by_expiry ON messages(expires_at);
CREATE TABLE queue (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_seq BIGINT,
    receipt TEXT,
    lease_until BIGINT,
    lease_replica BIGINT,
    lease_conn BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL
);
CREATE INDEX queue_by_recipient ON queue(mesh_id, recipient, id);
CREATE INDEX queue_by_message ON queue(message_seq) WHERE message_seq IS NOT NULL;
CREATE INDEX queue_by_expiry ON queue(expires_at);
CREATE INDEX queue_by_lease ON queue(lease_replica) WHERE lease_replica IS NOT NULL;
-- Every row of the queue is inserted, updated by its lease and deleted within moments: vacuum it
-- after a small share of it has changed rather than the default fifth.
ALTER TABLE queue SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02);
CREATE TABLE reads (
    mesh_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    reader TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, message_id, reader)
);
-- The broker processes sharing this database, each alive while its heartbeat is recent.
CREATE TABLE replicas (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
-- Which replica holds each key's connection: presence, supersedes and limits across replicas.
CREATE TABLE connections (
    mesh_id TEXT NOT NULL,
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    replica BIGINT NOT NULL,
    conn BIGINT NOT NULL,
    since BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, key)
);
CREATE INDEX connections_by_replica ON connections(replica);
"#,
    r#"
-- Plans are cached per connection from the first executions, often on a table still empty and never
-- analyzed: an index that leads with the column a statement looks up by is then the only sensible
-- choice, whatever the statistics say. The idempotency key leads with the client's id (a batch of
-- sends looks up many at once), the message index with the message id.
ALTER TABLE messages DROP CONSTRAINT messages_mesh_id_sender_client_message_id_key;
ALTER TABLE messages ADD CONSTRAINT messages_by_client_id UNIQUE (client_message_id, mesh_id, sender);
DROP INDEX messages_by_id;
CREATE INDEX messages_by_message_id ON messages(message_id, mesh_id);
-- Keys, ids and names compare byte by byte (as on SQLite, and without a locale's cost in every index),
-- whatever collation the database was created with.
ALTER TABLE meshes ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE peers ALTER COLUMN mesh_id TYPE TEXT COLLATE "C", ALTER COLUMN key TYPE TEXT COLLATE "C",
    ALTER COLUMN member TYPE TEXT COLLATE "C", ALTER COLUMN name_key TYPE TEXT COLLATE "C",
    ALTER COLUMN name_key_cased TYPE TEXT COLLATE "C", ALTER COLUMN name_key_upper TYPE TEXT COLLATE "C";
ALTER TABLE invite_uses ALTER COLUMN mesh_id TYPE TEXT COLLATE "C", ALTER COLUMN invite_id TYPE TEXT COLLATE "C";
ALTER TABLE group_members ALTER COLUMN mesh_id TYPE TEXT COLLATE "C",
    ALTER COLUMN group_name TYPE TEXT COLLATE "C", ALTER COLUMN key TYPE TEXT COLLATE "C";
ALTER TABLE messages ALTER COLUMN mesh_id TYPE TEXT COLLATE "C", ALTER COLUMN sender TYPE TEXT COLLATE "C",
    ALTER COLUMN client_message_id TYPE TEXT COLLATE "C", ALTER COLUMN message_id TYPE TEXT COLLATE "C";
ALTER TABLE queue ALTER COLUMN mesh_id TYPE TEXT COLLATE "C", ALTER COLUMN recipient TYPE TEXT COLLATE "C";
ALTER TABLE reads ALTER COLUMN mesh_id TYPE TEXT COLLATE "C", ALTER COLUMN message_id TYPE TEXT COLLATE "C",
    ALTER COLUMN reader TYPE TEXT COLLATE "C";
ALTER TABLE connections ALTER COLUMN mesh_id TYPE TEXT COLLATE "C", ALTER COLUMN key TYPE TEXT COLLATE "C";
-- A lease, and a message's body dropped once delivered, change no indexed column, so PostgreSQL
-- updates the row in place (a HOT update) rather than adding it to every index again; pages keep
-- room for that. A dead replica's leases are found by one scan of the queue when it is buried.
DROP INDEX queue_by_lease;
ALTER TABLE queue SET (fillfactor = 50);
ALTER TABLE messages SET (fillfactor = 90);
"#,
    r#"
-- Membership: who invited whom, removals, the invites issuers registered (listed, revocable), and
-- the epoch of the mesh's key with whether it is wanted anew after a removal.
ALTER TABLE peers ADD COLUMN invited_by TEXT COLLATE "C", ADD COLUMN revoked_at BIGINT,
    ADD COLUMN revoked_by TEXT COLLATE "C";
CREATE TABLE invites (
    mesh_id TEXT COLLATE "C" NOT NULL,
    invite_id TEXT COLLATE "C" NOT NULL,
    issued_by TEXT COLLATE "C" NOT NULL,
    role TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_uses BIGINT,
    revoked_at BIGINT,
    revoked_by TEXT COLLATE "C",
    PRIMARY KEY (mesh_id, invite_id)
);
ALTER TABLE meshes ADD COLUMN key_epoch BIGINT NOT NULL DEFAULT 0, ADD COLUMN rekey_wanted_at BIGINT;
"#,
];

/// Brings the schema up to date, holding the migration lock meanwhile.
pub(super) async fn migrate(client: &mut Object, at: &str) -> Result<(), PgError> {
    let failed = |version: usize| move |source| PgError::Migrate { at: at.to_owned(), version, source };
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(failed(0))?;
    let result = apply(client, at, MIGRATIONS).await;
    // A session lock outlives transactions: give it back (a connection that dies gives it back too).
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map_err(failed(0));
    result.and(unlocked.map(drop))
}

/// Applies the `migrations` the database has not had yet, all in one transaction: a database where
/// one cannot be applied (another program's, with a table of the same name) is left as it was.
async fn apply(client: &mut tokio_postgres::Client, at: &str, migrations: &[&str]) -> Result<(), PgError> {
    let failed = |version: usize| move |source| PgError::Migrate { at: at.to_owned(), version, source };
    let tx = client.transaction().await.map_err(failed(0))?;
    // `IF NOT EXISTS` on an existing table is a notice, not news.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS mesh_schema (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await
    .map_err(failed(0))?;
    let found: i32 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM mesh_schema", &[]).await.map_err(failed(0))?.get(0);
    let known = migrations.len() as i32;
    if found > known {
        return Err(PgError::TooNew { at: at.to_owned(), found, known });
    }
    let pending = migrations.iter().enumerate().skip(found as usize);
    let mut applied = Vec::new();
    for (i, sql) in pending {
        let version = i + 1;
        tx.batch_execute(sql).await.map_err(failed(version))?;
        tx.execute(
            "INSERT INTO mesh_schema (version, applied_at) VALUES ($1, $2)",
            &[&(version as i32), &(mesh_proto::now_ms() as i64)],
        )
        .await
        .map_err(failed(version))?;
        applied.push(version);
    }
    tx.commit().await.map_err(failed(applied.last().copied().unwrap_or(0)))?;
    for version in applied {
        tracing::info!(version, database = at, "database schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// Another program's database (a `messages` table of its own) is refused and left as it was.
    #[tokio::test]
    async fn a_database_that_cannot_be_migrated_is_left_as_it_was() {
        let Some(url) = mesh_testkit::postgres::database() else { return };
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        client.batch_execute("CREATE TABLE messages (id INTEGER)").await.expect("another program's table");
        let refused = super::super::PgStore::connect(&url, Default::default()).await.expect_err("not migratable");
        assert!(refused.to_string().contains("to version 1"), "{refused}");
        let tables: Vec<String> = client
            .query("SELECT tablename::TEXT FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(tables, ["messages"], "nothing of mesh's is left behind");
    }

    /// A database made by the first release of the schema, with a member and a message in it, is
    /// brought up to date by the next replica to start, and keeps what it held; a database newer
    /// than this build is refused in words.
    #[tokio::test]
    async fn an_older_schema_is_migrated_with_its_rows_and_a_newer_one_refused() {
        let Some(url) = mesh_testkit::postgres::database() else { return };
        let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        apply(&mut client, "test", &MIGRATIONS[..1]).await.expect("the first schema");
        let (mesh, sender) = (mesh_proto::MeshId::generate(), mesh_proto::Identity::generate().key());
        client
            .batch_execute(&format!(
                "INSERT INTO meshes (id, name, owner, created_at) VALUES ('{mesh}', 'team', '{sender}', 1);
                 INSERT INTO messages (mesh_id, sender, client_message_id, fingerprint, message_id, recipients,
                     item, target, created_at, expires_at)
                 VALUES ('{mesh}', '{sender}', 'c-1', '\\x00', 'm-1', 1, '{{}}', '{sender}', 1, 9000000000000);"
            ))
            .await
            .expect("rows at version 1");

        let store = super::super::PgStore::connect(&url, Default::default()).await.expect("migrated");
        let version: i32 = client.query_one("SELECT MAX(version) FROM mesh_schema", &[]).await.unwrap().get(0);
        assert_eq!(version as usize, MIGRATIONS.len());
        assert_eq!(store.mesh(mesh).await.unwrap().expect("the mesh kept").name, "team");
        let sent = store.find_sent(mesh, sender, "c-1").await.unwrap().expect("the send kept");
        assert_eq!(sent.message_id, "m-1");

        client.execute("INSERT INTO mesh_schema (version, applied_at) VALUES (999, 1)", &[]).await.unwrap();
        let refused = super::super::PgStore::connect(&url, Default::default()).await.expect_err("a newer schema");
        let said = refused.to_string();
        assert!(said.contains("schema version 999") && said.contains("upgrade mesh"), "{said}");
    }
}
