//! Group memberships of this daemon's identities (the member and its sessions), as wanted by the
//! user and as confirmed by the broker. A change is recorded here first and sent by the identity's
//! drain, so it survives the broker being away and the daemon restarting.

use mesh_broker::sqlite::parse_col;
use mesh_proto::{MeshId, PublicKey};
use rusqlite::{Connection, params};

/// Records that `key` wants to be in (`join`) or out of `@name` in `mesh`; the drain tells the broker.
pub fn want(conn: &Connection, mesh: &MeshId, key: &PublicKey, name: &str, join: bool) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO groups (mesh_id, key, name, wanted, synced) VALUES (?1, ?2, ?3, ?4, 0)
         ON CONFLICT (mesh_id, key, name) DO UPDATE SET wanted = excluded.wanted, synced = 0",
        params![mesh.to_string(), key.to_string(), name, join],
    )?;
    Ok(())
}

/// Whether `key` is in (or joining) `@name` in `mesh`.
pub fn is_in(conn: &Connection, mesh: &MeshId, key: &PublicKey, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM groups WHERE mesh_id = ?1 AND key = ?2 AND name = ?3 AND wanted = 1)",
        params![mesh.to_string(), key.to_string(), name],
        |r| r.get(0),
    )
}

/// Changes the broker has not confirmed yet: (group, join?).
pub fn to_sync(conn: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<Vec<(String, bool)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, wanted FROM groups WHERE mesh_id = ?1 AND key = ?2 AND synced = 0 ORDER BY name",
    )?;
    stmt.query_map(params![mesh.to_string(), key.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

/// The broker confirmed (or finally refused) the change to `wanted`; a newer change stays unsynced.
pub fn synced(conn: &Connection, mesh: &MeshId, key: &PublicKey, name: &str, wanted: bool) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE groups SET synced = 1 WHERE mesh_id = ?1 AND key = ?2 AND name = ?3 AND wanted = ?4",
        params![mesh.to_string(), key.to_string(), name, wanted],
    )?;
    conn.execute("DELETE FROM groups WHERE synced = 1 AND wanted = 0", [])?;
    Ok(())
}

/// A membership of one of our identities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub mesh: MeshId,
    pub key: PublicKey,
    pub name: String,
    pub joined: bool,
    pub synced: bool,
}

pub fn list(conn: &Connection, key: Option<&PublicKey>) -> rusqlite::Result<Vec<Membership>> {
    let mut stmt = conn.prepare_cached(
        "SELECT mesh_id, key, name, wanted, synced FROM groups WHERE (?1 IS NULL OR key = ?1) ORDER BY name, mesh_id",
    )?;
    stmt.query_map([key.map(PublicKey::to_string)], |r| {
        Ok(Membership {
            mesh: parse_col(r.get(0)?)?,
            key: parse_col(r.get(1)?)?,
            name: r.get(2)?,
            joined: r.get(3)?,
            synced: r.get(4)?,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_wait_until_confirmed_and_a_newer_change_is_not_lost() {
        let (_dir, db) = crate::store::temp_db();
        let (mesh, key) = (MeshId([1; 16]), PublicKey([2; 32]));
        db.call_blocking(|c| {
            want(c, &mesh, &key, "ops", true)?;
            assert_eq!(to_sync(c, &mesh, &key)?, vec![("ops".to_owned(), true)]);
            want(c, &mesh, &key, "ops", false)?;
            synced(c, &mesh, &key, "ops", true)?;
            assert_eq!(to_sync(c, &mesh, &key)?, vec![("ops".to_owned(), false)], "the leave is still to send");
            synced(c, &mesh, &key, "ops", false)?;
            assert!(to_sync(c, &mesh, &key)?.is_empty());
            assert!(list(c, Some(&key))?.is_empty(), "a confirmed leave leaves nothing behind");
            Ok(())
        })
        .expect("db");
    }
}
