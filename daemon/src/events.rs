//! The durable event log behind `GET /v1/events`.
//!
//! Every change a subscriber may care about appends an event row in the same transaction as the change
//! itself (a message filed, a receipt recorded, an outbox row settled, presence, a connection state).
//! Ids come from `AUTOINCREMENT`, so they only grow, even across pruning. Each event has an audience
//! (the key it belongs to) or none (presence, for everyone in its mesh); a subscriber's scope selects
//! rows by audience, and it reads them from SQLite at its own pace, so a slow subscriber is never
//! skipped. The in-memory [`Changed`] signal only says "look again".

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::{Event, EventBody};
use mesh_proto::{MeshId, PublicKey};
use rusqlite::{Connection, params};

/// A hint that daemon state changed (events appended, outbox rows settled); waiters re-read SQLite.
#[derive(Debug)]
pub struct Changed(tokio::sync::watch::Sender<u64>);

impl Changed {
    pub fn new() -> std::sync::Arc<Changed> {
        std::sync::Arc::new(Changed(tokio::sync::watch::channel(0).0))
    }

    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Appends one event, and queues its webhook deliveries; call inside the transaction of the change
/// it reports.
pub fn append(
    conn: &Connection,
    mesh: Option<&MeshId>,
    audience: Option<&PublicKey>,
    body: &EventBody,
    now: u64,
) -> rusqlite::Result<i64> {
    let data = match body {
        EventBody::Message(m) => serde_json::to_string(m),
        EventBody::Read { ids } => serde_json::to_string(&serde_json::json!({ "ids": ids })),
        EventBody::Receipt(r) => serde_json::to_string(r),
        EventBody::Outbox(o) => serde_json::to_string(o),
        EventBody::Presence(p) => serde_json::to_string(p),
        EventBody::Membership(m) => serde_json::to_string(m),
        EventBody::Connection(c) => serde_json::to_string(c),
        EventBody::Webhook(w) => serde_json::to_string(w),
        EventBody::Resync { first_id } => serde_json::to_string(&serde_json::json!({ "first_id": first_id })),
    }
    .expect("event payloads serialise");
    conn.execute(
        "INSERT INTO events (at, kind, mesh_id, audience, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now as i64, body.kind(), mesh.map(MeshId::to_string), audience.map(PublicKey::to_string), data],
    )?;
    let id = conn.last_insert_rowid();
    crate::webhooks::enqueue(conn, id, mesh, audience, body, now)?;
    Ok(id)
}

/// Which events a subscriber sees.
#[derive(Clone, Debug)]
pub enum Scope {
    /// Events of these keys, and presence of these meshes.
    Own { keys: Vec<PublicKey>, meshes: Vec<MeshId> },
    /// Everything.
    All,
}

/// Events after `after` in `scope`, oldest first, at most `limit`.
pub fn read(conn: &Connection, scope: &Scope, after: i64, limit: usize) -> rusqlite::Result<Vec<Event>> {
    let (all, keys, meshes) = match scope {
        Scope::All => (true, "[]".to_owned(), "[]".to_owned()),
        Scope::Own { keys, meshes } => (
            false,
            serde_json::to_string(&keys.iter().map(PublicKey::to_string).collect::<Vec<_>>()).expect("json"),
            serde_json::to_string(&meshes.iter().map(MeshId::to_string).collect::<Vec<_>>()).expect("json"),
        ),
    };
    let mut stmt = conn.prepare_cached(
        "SELECT e.id, e.at, e.kind, COALESCE(m.name, e.mesh_id), e.audience, e.data FROM events e
         LEFT JOIN meshes m ON m.id = e.mesh_id
         WHERE e.id > ?1 AND (?2 OR e.audience IN (SELECT value FROM json_each(?3))
                              OR (e.audience IS NULL AND e.mesh_id IN (SELECT value FROM json_each(?4))))
         ORDER BY e.id LIMIT ?5",
    )?;
    let rows = stmt.query_map(params![after, all, keys, meshes, limit as i64], |r| {
        let kind: String = r.get(2)?;
        let data: String = r.get(5)?;
        Ok(Event {
            id: r.get(0)?,
            at: r.get::<_, i64>(1)? as u64,
            mesh: r.get(3)?,
            audience: r.get(4)?,
            body: decode_body(&kind, data)?,
        })
    })?;
    rows.collect()
}

fn decode_body(kind: &str, data: String) -> rusqlite::Result<EventBody> {
    let tagged = format!(r#"{{"kind":{},"data":{data}}}"#, serde_json::Value::String(kind.to_owned()));
    parse_col::<JsonBody>(tagged).map(|b| b.0)
}

/// [`EventBody`] parsed from its stored form, for [`parse_col`].
struct JsonBody(EventBody);

impl std::str::FromStr for JsonBody {
    type Err = serde_json::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_str(s).map(JsonBody)
    }
}

/// The oldest id still stored, to tell a subscriber resuming from before it that it missed events.
pub fn first_id(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT MIN(id) FROM events", [], |r| r.get(0))
}

/// Drops events older than `before` (ms).
pub fn prune(conn: &Connection, before: u64) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM events WHERE at < ?1", [before as i64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_ipc::api::{ConnectionEvent, LinkState, PresenceEvent};
    use mesh_proto::wire::PeerKind;

    #[test]
    fn scopes_select_by_audience_and_mesh_and_ids_only_grow() {
        let (_dir, db) = crate::store::temp_db();
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (m1, m2) = (MeshId([1; 16]), MeshId([2; 16]));
        let conn_event = |k: &PublicKey| {
            EventBody::Connection(ConnectionEvent { key: k.to_string(), state: LinkState::Online, last_error: None })
        };
        let presence = EventBody::Presence(PresenceEvent {
            key: "k".into(),
            name: "n".into(),
            kind: PeerKind::Member,
            online: true,
            ended_at: None,
            removed: false,
        });
        db.call_blocking(|c| {
            let e1 = append(c, Some(&m1), Some(&a), &conn_event(&a), 1)?;
            let e2 = append(c, Some(&m1), Some(&b), &conn_event(&b), 2)?;
            let e3 = append(c, Some(&m1), None, &presence, 3)?;
            let e4 = append(c, Some(&m2), None, &presence, 4)?;
            let mine = read(c, &Scope::Own { keys: vec![a], meshes: vec![m1] }, 0, 100)?;
            assert_eq!(mine.iter().map(|e| e.id).collect::<Vec<_>>(), vec![e1, e3]);
            assert_eq!(mine[0].body, conn_event(&a));
            assert_eq!(read(c, &Scope::All, e1, 100)?.len(), 3);
            let bs = read(c, &Scope::Own { keys: vec![b], meshes: vec![] }, 0, 100)?;
            assert_eq!(bs.iter().map(|e| e.id).collect::<Vec<_>>(), vec![e2]);
            prune(c, 5)?;
            let e5 = append(c, None, Some(&a), &conn_event(&a), 6)?;
            assert!(e5 > e4, "ids never go back after pruning");
            assert_eq!(first_id(c)?, Some(e5));
            Ok(())
        })
        .expect("db");
    }
}
