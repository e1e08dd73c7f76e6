//! Members, sessions and their names, invites and groups: the `peers`, `invite_uses` and
//! `group_members` tables.
//!
//! A name is unique in a mesh up to confusables: `name_key`, `name_key_cased` and `name_key_upper`
//! hold each peer's [`names::NameKeys`], and a peer taking a name (joining, renaming, a session's first
//! connection) is refused while another peer holds the same key. An ended session gives its name
//! up: it leaves the roster at once when someone claims the name, else after the grace period.

use mesh_proto::names;
use mesh_proto::wire::{PeerKind, Role};
use mesh_proto::{MeshId, PublicKey};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{TxError, bad_text};
use crate::sqlite::parse_col as parse;
use crate::store::{Claimed, Ended, PeerRecord, Reaped, RosterEntry, StoreError};

pub const PEER_COLUMNS: &str =
    "key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked, ended_at";

pub fn peer_from_row(row: &Row<'_>) -> rusqlite::Result<PeerRecord> {
    peer_from_row_at(row, 0)
}

/// Inserts a peer, or refreshes its name, keys and last sighting; a session that comes back is no
/// longer ended.
pub fn insert_peer(tx: &Connection, mesh: &MeshId, p: &PeerRecord) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO peers (mesh_id, key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked,
             name_key, name_key_cased, name_key_upper, ended_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, NULL)
         ON CONFLICT (mesh_id, key) DO UPDATE SET
           name = excluded.name, enc_key = excluded.enc_key, enc_sig = excluded.enc_sig, last_seen = excluded.last_seen,
           name_key = excluded.name_key, name_key_cased = excluded.name_key_cased,
           name_key_upper = excluded.name_key_upper, ended_at = NULL",
    )?;
    let keys = names::name_keys(&p.name);
    insert.execute(params![
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
        keys.lower,
        keys.written,
        keys.upper,
    ])?;
    Ok(())
}

pub fn get_peer(tx: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<Option<PeerRecord>> {
    tx.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 AND key = ?2"))?
        .query_row(params![mesh.to_string(), key.to_string()], peer_from_row)
        .optional()
}

/// Lets `key` take `name` in `mesh`: refused (before anything is written) while another peer that
/// has not ended holds a name with the same skeleton key; ended sessions holding it are removed.
pub fn claim_name(tx: &Connection, mesh: &MeshId, key: &PublicKey, name: &str) -> Result<Claimed, TxError> {
    let keys = names::name_keys(name);
    let holders: Vec<PeerRecord> = tx
        .prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 AND key != ?2 AND revoked = 0
               AND (name_key IN (?3, ?4, ?5) OR name_key_cased IN (?3, ?4, ?5) OR name_key_upper IN (?3, ?4, ?5))"
        ))?
        .query_map(params![mesh.to_string(), key.to_string(), keys.lower, keys.written, keys.upper], peer_from_row)?
        .collect::<Result<_, _>>()?;
    if let Some(live) = holders.iter().find(|p| p.ended_at.is_none()) {
        return Err(TxError::Domain(StoreError::NameTaken { name: name.to_owned(), holder: live.describe() }));
    }
    for ended in &holders {
        remove_peer(tx, mesh, &ended.key)?;
    }
    Ok(Claimed { reaped: holders })
}

fn remove_peer(tx: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<()> {
    let (mesh, key) = (mesh.to_string(), key.to_string());
    tx.prepare_cached("DELETE FROM group_members WHERE mesh_id = ?1 AND key = ?2")?.execute(params![mesh, key])?;
    tx.prepare_cached("DELETE FROM peers WHERE mesh_id = ?1 AND key = ?2")?.execute(params![mesh, key])?;
    Ok(())
}

/// A peer connecting: inserted or refreshed, claiming its name when it is new or changed it.
pub fn upsert(tx: &Connection, mesh: &MeshId, peer: &PeerRecord) -> Result<Claimed, TxError> {
    let existing = get_peer(tx, mesh, &peer.key)?;
    let claimed = match &existing {
        Some(p) if p.name == peer.name => Claimed::default(),
        _ => claim_name(tx, mesh, &peer.key, &peer.name)?,
    };
    insert_peer(tx, mesh, peer)?;
    Ok(claimed)
}

/// Counts a use of invite `invite_id` and adds `peer` as a member, unless the invite is used up or
/// the name is taken (then nothing is consumed).
pub fn join(
    tx: &Connection,
    mesh: &MeshId,
    invite_id: &str,
    max_uses: Option<u32>,
    peer: &PeerRecord,
) -> Result<Claimed, TxError> {
    let uses: i64 = tx
        .prepare_cached("SELECT uses FROM invite_uses WHERE mesh_id = ?1 AND invite_id = ?2")?
        .query_row(params![mesh.to_string(), invite_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if max_uses.is_some_and(|max| uses >= i64::from(max)) {
        return Err(TxError::Domain(StoreError::InviteExhausted));
    }
    let claimed = claim_name(tx, mesh, &peer.key, &peer.name)?;
    tx.prepare_cached(
        "INSERT INTO invite_uses (mesh_id, invite_id, uses) VALUES (?1, ?2, 1)
         ON CONFLICT (mesh_id, invite_id) DO UPDATE SET uses = uses + 1",
    )?
    .execute(params![mesh.to_string(), invite_id])?;
    insert_peer(tx, mesh, peer)?;
    Ok(claimed)
}

pub fn rename(tx: &Connection, mesh: &MeshId, key: &PublicKey, name: &str) -> Result<(PeerRecord, Claimed), TxError> {
    let Some(mut peer) = get_peer(tx, mesh, key)? else {
        return Err(TxError::Domain(StoreError::RecipientUnknown(key.to_string())));
    };
    if peer.name == name {
        return Ok((peer, Claimed::default()));
    }
    let claimed = claim_name(tx, mesh, key, name)?;
    let keys = names::name_keys(name);
    tx.prepare_cached(
        "UPDATE peers SET name = ?3, name_key = ?4, name_key_cased = ?5, name_key_upper = ?6
         WHERE mesh_id = ?1 AND key = ?2",
    )?
    .execute(params![mesh.to_string(), key.to_string(), name, keys.lower, keys.written, keys.upper])?;
    peer.name = name.to_owned();
    Ok((peer, claimed))
}

pub fn end_session(
    tx: &Connection,
    mesh: &MeshId,
    member: &PublicKey,
    session: &PublicKey,
    now: u64,
    keep_ended: usize,
) -> Result<Ended, TxError> {
    let Some(peer) = get_peer(tx, mesh, session)? else {
        return Err(TxError::Domain(StoreError::Forbidden(format!("no session {} in this mesh", session.short()))));
    };
    if peer.kind != PeerKind::Session || peer.member != *member {
        return Err(TxError::Domain(StoreError::Forbidden(format!("{} is not one of your sessions", session.short()))));
    }
    if peer.ended_at.is_some() {
        return Ok(Ended::default());
    }
    tx.prepare_cached("UPDATE peers SET ended_at = ?3 WHERE mesh_id = ?1 AND key = ?2")?.execute(params![
        mesh.to_string(),
        session.to_string(),
        now as i64
    ])?;
    // The member's ended sessions beyond the newest `keep_ended` leave the roster now rather than
    // after the grace period: starting and ending sessions in a loop cannot grow the roster.
    let removed: Vec<PeerRecord> = tx
        .prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers
             WHERE mesh_id = ?1 AND member = ?2 AND kind = 'session' AND ended_at IS NOT NULL
             ORDER BY ended_at DESC, key LIMIT -1 OFFSET ?3"
        ))?
        .query_map(params![mesh.to_string(), member.to_string(), keep_ended as i64], peer_from_row)?
        .collect::<Result<_, _>>()?;
    for gone in &removed {
        remove_peer(tx, mesh, &gone.key)?;
    }
    Ok(Ended { ended: Some(PeerRecord { ended_at: Some(now), ..peer }), removed })
}

pub fn set_group(
    tx: &Connection,
    mesh: &MeshId,
    key: &PublicKey,
    group: &str,
    member: bool,
) -> rusqlite::Result<Vec<String>> {
    let (mesh, key) = (mesh.to_string(), key.to_string());
    let sql = if member {
        "INSERT OR IGNORE INTO group_members (mesh_id, group_name, key) VALUES (?1, ?2, ?3)"
    } else {
        "DELETE FROM group_members WHERE mesh_id = ?1 AND group_name = ?2 AND key = ?3"
    };
    tx.prepare_cached(sql)?.execute(params![mesh, group, key])?;
    tx.prepare_cached("SELECT group_name FROM group_members WHERE mesh_id = ?1 AND key = ?2 ORDER BY group_name")?
        .query_map(params![mesh, key], |r| r.get(0))?
        .collect()
}

pub fn roster(conn: &Connection, mesh: &MeshId) -> rusqlite::Result<Vec<RosterEntry>> {
    let mut groups: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
    let mut stmt =
        conn.prepare_cached("SELECT key, group_name FROM group_members WHERE mesh_id = ?1 ORDER BY group_name")?;
    for row in stmt.query_map([mesh.to_string()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (key, group) = row?;
        groups.entry(key).or_default().push(group);
    }
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 ORDER BY joined_at, key"))?;
    stmt.query_map([mesh.to_string()], peer_from_row)?
        .map(|p| {
            let peer = p?;
            let groups = groups.remove(&peer.key.to_string()).unwrap_or_default();
            Ok(RosterEntry { peer, groups })
        })
        .collect()
}

pub fn reap_sessions(
    tx: &Connection,
    now: u64,
    stale_ms: u64,
    grace_ms: u64,
    online: &[(MeshId, PublicKey)],
) -> rusqlite::Result<Reaped> {
    let online: std::collections::HashSet<(String, String)> =
        online.iter().map(|(m, k)| (m.to_string(), k.to_string())).collect();
    let mut out = Reaped::default();
    let stale: Vec<(String, PeerRecord)> = tx
        .prepare_cached(&format!(
            "SELECT mesh_id, {PEER_COLUMNS} FROM peers
             WHERE kind = 'session' AND ended_at IS NULL AND COALESCE(last_seen, joined_at) < ?1"
        ))?
        .query_map([now.saturating_sub(stale_ms) as i64], |r| Ok((r.get(0)?, peer_from_row_at(r, 1)?)))?
        .collect::<Result<_, _>>()?;
    for (mesh, peer) in stale {
        if online.contains(&(mesh.clone(), peer.key.to_string())) {
            continue;
        }
        tx.prepare_cached("UPDATE peers SET ended_at = ?3 WHERE mesh_id = ?1 AND key = ?2")?.execute(params![
            mesh,
            peer.key.to_string(),
            now as i64
        ])?;
        out.ended.push((parse(mesh)?, PeerRecord { ended_at: Some(now), ..peer }));
    }
    let gone: Vec<(String, PeerRecord)> = tx
        .prepare_cached(&format!(
            "SELECT mesh_id, {PEER_COLUMNS} FROM peers WHERE kind = 'session' AND ended_at IS NOT NULL AND ended_at < ?1"
        ))?
        .query_map([now.saturating_sub(grace_ms) as i64], |r| Ok((r.get(0)?, peer_from_row_at(r, 1)?)))?
        .collect::<Result<_, _>>()?;
    for (mesh, peer) in gone {
        let mesh: MeshId = parse(mesh)?;
        if online.contains(&(mesh.to_string(), peer.key.to_string())) {
            continue;
        }
        remove_peer(tx, &mesh, &peer.key)?;
        out.removed.push((mesh, peer));
    }
    Ok(out)
}

/// [`peer_from_row`] for a row whose peer columns start at `offset`.
fn peer_from_row_at(row: &Row<'_>, offset: usize) -> rusqlite::Result<PeerRecord> {
    let kind: String = row.get(offset + 1)?;
    let role: String = row.get(offset + 6)?;
    Ok(PeerRecord {
        key: parse(row.get(offset)?)?,
        kind: PeerKind::parse(&kind).ok_or_else(|| bad_text("peer kind", &kind))?,
        member: parse(row.get(offset + 2)?)?,
        name: row.get(offset + 3)?,
        enc_key: parse(row.get(offset + 4)?)?,
        enc_sig: parse(row.get(offset + 5)?)?,
        role: Role::parse(&role).ok_or_else(|| bad_text("role", &role))?,
        joined_at: row.get::<_, i64>(offset + 7)? as u64,
        last_seen: row.get::<_, Option<i64>>(offset + 8)?.map(|t| t as u64),
        revoked: row.get(offset + 9)?,
        ended_at: row.get::<_, Option<i64>>(offset + 10)?.map(|t| t as u64),
    })
}

/// Fills the name keys of peers stored before names were compared by them.
pub fn backfill_name_keys(conn: &Connection) -> rusqlite::Result<usize> {
    let rows: Vec<(String, String, String)> = conn
        .prepare("SELECT mesh_id, key, name FROM peers WHERE name_key IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut update = conn.prepare(
        "UPDATE peers SET name_key = ?3, name_key_cased = ?4, name_key_upper = ?5 WHERE mesh_id = ?1 AND key = ?2",
    )?;
    for (mesh, key, name) in &rows {
        let keys = names::name_keys(name);
        update.execute(params![mesh, key, keys.lower, keys.written, keys.upper])?;
    }
    Ok(rows.len())
}
