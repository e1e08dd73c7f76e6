//! A mesh's keys by epoch (`mesh_keys`): the current one seals this member's broadcasts and group
//! messages; every one it has held opens the messages sealed under it. A new key arrives as a grant
//! from an owner or admin; the key that opens a message is the proof of its epoch, and a message
//! sealed under a key after that key was replaced is refused (docs/security.md, "Mesh keys").

use std::collections::HashMap;

use mesh_ipc::api::{EventBody, MembershipEvent};
use mesh_proto::crypto::GroupKey;
use mesh_proto::wire::MeshKeyItem;
use mesh_proto::{Identity, MeshId};
use rusqlite::{Connection, OptionalExtension, params};

use crate::events;

/// How much later than a key's replacement a message sealed under it may have been accepted by the
/// broker and still be read: the replicas that recorded the two may keep slightly different clocks.
pub const REPLACED_GRACE_MS: u64 = 60_000;

/// The keys of one mesh held here.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    pub current: u64,
    pub keys: Vec<(u64, GroupKey)>,
    /// For each epoch that was replaced: the broker's time when the next key became the mesh's.
    pub replaced_at: HashMap<u64, u64>,
}

impl KeyRing {
    /// Why a message the broker accepted at `sent_at` under key `epoch` must not be read, if so.
    pub fn refusal(&self, epoch: u64, sent_at: u64) -> Option<String> {
        let replaced = *self.replaced_at.get(&epoch)?;
        (epoch < self.current && sent_at > replaced.saturating_add(REPLACED_GRACE_MS)).then(|| {
            format!(
                "invalid: sealed under mesh key epoch {epoch} after it was replaced (at {replaced}, by epoch {}): \
                 its sender did not hold the mesh's key (it was removed from the mesh, or is out of date)",
                self.current
            )
        })
    }
}

/// The keys of `mesh` held here.
pub fn ring(conn: &Connection, mesh: &MeshId) -> rusqlite::Result<KeyRing> {
    let current: u64 = conn
        .query_row("SELECT key_epoch FROM meshes WHERE id = ?1", [mesh.to_string()], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0) as u64;
    let mut ring = KeyRing { current, ..KeyRing::default() };
    let mut stmt =
        conn.prepare_cached("SELECT epoch, key, replaced_at FROM mesh_keys WHERE mesh_id = ?1 ORDER BY epoch")?;
    let rows = stmt.query_map([mesh.to_string()], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?, r.get::<_, Option<i64>>(2)?))
    })?;
    for row in rows {
        let (epoch, key, replaced) = row?;
        let Ok(key) = <[u8; 32]>::try_from(key) else { continue };
        ring.keys.push((epoch, GroupKey::from_bytes(key)));
        if let Some(at) = replaced {
            ring.replaced_at.insert(epoch, at as u64);
        }
    }
    Ok(ring)
}

/// Keeps `key` as epoch `epoch` of `mesh` (once), and makes it the current key when it is newer than
/// the current one, recording `at` (the broker's time) as when the older keys were replaced.
/// Whether it became the current key.
pub fn keep(conn: &Connection, mesh: &MeshId, epoch: u64, key: &GroupKey, at: u64, now: u64) -> rusqlite::Result<bool> {
    let mesh_s = mesh.to_string();
    conn.execute(
        "INSERT OR IGNORE INTO mesh_keys (mesh_id, epoch, key, received_at) VALUES (?1, ?2, ?3, ?4)",
        params![mesh_s, epoch as i64, key.as_bytes().as_slice(), now as i64],
    )?;
    let newer = conn.execute(
        "UPDATE meshes SET group_key = ?3, key_epoch = ?2 WHERE id = ?1 AND key_epoch < ?2",
        params![mesh_s, epoch as i64, key.as_bytes().as_slice()],
    )? == 1;
    if newer {
        conn.execute(
            "UPDATE mesh_keys SET replaced_at = ?3 WHERE mesh_id = ?1 AND epoch < ?2 AND replaced_at IS NULL",
            params![mesh_s, epoch as i64, at as i64],
        )?;
    }
    Ok(newer)
}

/// A grant delivered to this member (`me`): checked and opened, the key kept, and the mesh told with
/// a `membership` event (`rotate_key`). A grant that does not open is logged and dropped: it
/// changes nothing. Returns the epoch when the key became the current one.
pub fn apply_grant(
    conn: &Connection,
    mesh: &MeshId,
    me: &Identity,
    item: &MeshKeyItem,
    now: u64,
) -> rusqlite::Result<Option<u64>> {
    let (grant, key) = match mesh_proto::membership::open_grant(&item.grant, me, mesh) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(%mesh, error = %e, "a mesh key grant that does not open; ignored");
            return Ok(None);
        }
    };
    let newer = adopt(conn, mesh, grant.epoch, &key, &grant.by, item.at, now)?;
    Ok(newer.then_some(grant.epoch))
}

/// Keeps `key` (epoch `epoch`, made by `by`, the mesh's from `at`) like [`keep`]; when it becomes the
/// current key, the mesh is told with a `membership` event (`rotate_key`), and messages that arrived
/// sealed under it before it did are read now. Whether it became the current key.
pub fn adopt(
    conn: &Connection,
    mesh: &MeshId,
    epoch: u64,
    key: &GroupKey,
    by: &mesh_proto::PublicKey,
    at: u64,
    now: u64,
) -> rusqlite::Result<bool> {
    if !keep(conn, mesh, epoch, key, at, now)? {
        return Ok(false);
    }
    let by_name = crate::roster::name_of(conn, mesh, by)?.unwrap_or_else(|| by.short());
    let event = EventBody::Membership(MembershipEvent {
        change: "rotate_key".into(),
        key: by.to_string(),
        name: by_name.clone(),
        by: by.to_string(),
        by_name,
        role: None,
        at,
        signed: true,
        key_epoch: Some(epoch),
    });
    events::append(conn, Some(mesh), None, &event, now)?;
    conn.execute(
        "UPDATE inbox SET status = 'received' WHERE mesh_id = ?1 AND status = 'failed'
           AND last_error LIKE 'decrypt_failed: no mesh key held here%'",
        [mesh.to_string()],
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_becomes_the_current_key_and_older_keys_read_only_what_came_before_their_replacement() {
        let (_dir, db) = crate::store::temp_db();
        let (admin, me) = (Identity::generate(), Identity::generate());
        let mesh = MeshId([4; 16]);
        let first = GroupKey::generate();
        let row = crate::meshes::MeshRow {
            id: mesh,
            name: "team".into(),
            broker_url: "ws://127.0.0.1:1".into(),
            role: mesh_proto::wire::Role::Member,
            group_key: first.clone(),
            key_epoch: 0,
            embedded: false,
            joined_at: 1,
            my_name: None,
            tls_pin: None,
        };
        let next = GroupKey::generate();
        let grant = mesh_proto::membership::grant(&admin, mesh, 1, &me.public(), &next, 1_000);
        let forged = mesh_proto::membership::grant(&admin, mesh, 2, &admin.public(), &next, 1_000);
        let ring = db
            .call_blocking(move |c| {
                crate::meshes::insert(c, &row)?;
                assert_eq!(apply_grant(c, &mesh, &me, &MeshKeyItem { grant: forged, at: 1_000 }, 5)?, None, "not mine");
                assert_eq!(apply_grant(c, &mesh, &me, &MeshKeyItem { grant, at: 1_000 }, 5)?, Some(1));
                ring(c, &mesh)
            })
            .expect("db");
        assert_eq!(ring.current, 1);
        assert_eq!(ring.keys.len(), 2);
        assert_eq!(ring.replaced_at.get(&0), Some(&1_000));
        // Epoch 0 reads what the broker accepted before (and up to a minute after) its replacement,
        // never what came later; the current key reads anything.
        assert!(ring.refusal(0, 900).is_none());
        assert!(ring.refusal(0, 1_000 + REPLACED_GRACE_MS).is_none());
        let why = ring.refusal(0, 1_001 + REPLACED_GRACE_MS).expect("refused");
        assert!(why.contains("sealed under mesh key epoch 0 after it was replaced"), "{why}");
        assert!(ring.refusal(1, u64::MAX).is_none());
    }
}
