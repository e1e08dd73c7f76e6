//! Members, sessions and their names, invites and groups: the `peers`, `invite_uses` and
//! `group_members` tables.
//!
//! A name is unique in a mesh up to confusables: `name_key`, `name_key_cased` and `name_key_upper`
//! hold each peer's [`names::NameKeys`], and a peer taking a name (joining, renaming, a session's first
//! connection) is refused while another peer holds the same key. An ended session gives its name
//! up: it leaves the roster at once when someone claims the name, else after the grace period.

use mesh_proto::membership::ChangeKind;
use mesh_proto::names;
use mesh_proto::wire::{DeliveryItem, InviteInfo, PeerKind, Role};
use mesh_proto::{MeshId, PublicKey};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{TxError, bad_text};
use crate::sqlite::parse_col as parse;
use crate::store::{
    Claimed, Ended, InviteRecord, MembershipChange, MembershipOutcome, PeerRecord, Reaped, RosterEntry, StoreError,
};

pub const PEER_COLUMNS: &str =
    "key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked, ended_at, invited_by, revoked_at";

pub fn peer_from_row(row: &Row<'_>) -> rusqlite::Result<PeerRecord> {
    peer_from_row_at(row, 0)
}

/// Inserts a peer, or refreshes its name, keys and last sighting; a session that comes back is no
/// longer ended.
pub fn insert_peer(tx: &Connection, mesh: &MeshId, p: &PeerRecord) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO peers (mesh_id, key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked,
             name_key, name_key_cased, name_key_upper, ended_at, invited_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, NULL, ?15)
         ON CONFLICT (mesh_id, key) DO UPDATE SET
           name = excluded.name, enc_key = excluded.enc_key, enc_sig = excluded.enc_sig, last_seen = excluded.last_seen,
           name_key = excluded.name_key, name_key_cased = excluded.name_key_cased,
           name_key_upper = excluded.name_key_upper, ended_at = NULL
         WHERE peers.revoked = 0",
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
        p.invited_by.map(|k| k.to_string()),
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

/// Counts a use of `invite` and adds `peer` as a member, unless the invite was revoked or is used up,
/// or the name is taken (then nothing is consumed). A removed member coming back with a newer invite
/// (the handshake checked it is newer) starts afresh: its old row goes.
pub fn join(tx: &Connection, mesh: &MeshId, invite: &InviteRecord, peer: &PeerRecord) -> Result<Claimed, TxError> {
    let mesh_s = mesh.to_string();
    let revoked: Option<Option<i64>> = tx
        .prepare_cached("SELECT revoked_at FROM invites WHERE mesh_id = ?1 AND invite_id = ?2")?
        .query_row(params![mesh_s, invite.invite_id], |r| r.get(0))
        .optional()?;
    if matches!(revoked, Some(Some(_))) {
        return Err(TxError::Domain(StoreError::InviteRevoked));
    }
    let uses: i64 = tx
        .prepare_cached("SELECT uses FROM invite_uses WHERE mesh_id = ?1 AND invite_id = ?2")?
        .query_row(params![mesh_s, invite.invite_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if invite.max_uses.is_some_and(|max| uses >= i64::from(max)) {
        return Err(TxError::Domain(StoreError::InviteExhausted));
    }
    let claimed = claim_name(tx, mesh, &peer.key, &peer.name)?;
    record_invite(tx, mesh, invite)?;
    tx.prepare_cached(
        "INSERT INTO invite_uses (mesh_id, invite_id, uses) VALUES (?1, ?2, 1)
         ON CONFLICT (mesh_id, invite_id) DO UPDATE SET uses = uses + 1",
    )?
    .execute(params![mesh_s, invite.invite_id])?;
    tx.prepare_cached("DELETE FROM peers WHERE mesh_id = ?1 AND key = ?2 AND revoked = 1")?
        .execute(params![mesh_s, peer.key.to_string()])?;
    insert_peer(tx, mesh, peer)?;
    // A joiner holding an older key than the mesh's gets the current one with the next key.
    tx.prepare_cached(
        "UPDATE meshes SET rekey_wanted_at = COALESCE(rekey_wanted_at, ?3) WHERE id = ?1 AND key_epoch > ?2",
    )?
    .execute(params![mesh_s, invite.key_epoch as i64, peer.joined_at as i64])?;
    Ok(claimed)
}

/// Deletes the mesh for its owner (see [`crate::store::Store::delete_mesh`]).
pub fn delete_mesh(tx: &Connection, mesh: &MeshId, by: &PublicKey) -> Result<Vec<PublicKey>, TxError> {
    match live_member(tx, mesh, by)? {
        Some(p) if p.role == Role::Owner => {}
        _ => return Err(TxError::Domain(StoreError::Forbidden("only the mesh's owner deletes it".into()))),
    }
    let mesh_s = mesh.to_string();
    let keys: Vec<PublicKey> = tx
        .prepare_cached("SELECT key FROM peers WHERE mesh_id = ?1 AND revoked = 0")?
        .query_map([&mesh_s], |r| r.get::<_, String>(0))?
        .map(|k| parse(k?))
        .collect::<Result<_, _>>()?;
    for table in ["queue", "messages", "reads", "invites", "invite_uses", "group_members", "peers"] {
        tx.execute(&format!("DELETE FROM {table} WHERE mesh_id = ?1"), [&mesh_s])?;
    }
    tx.execute("DELETE FROM meshes WHERE id = ?1", [&mesh_s])?;
    Ok(keys)
}

/// Makes `epoch` the mesh's key (see [`crate::store::Store::rotate_key`]).
pub fn rotate_key(
    tx: &Connection,
    mesh: &MeshId,
    by: &PublicKey,
    epoch: u64,
    grants: &[(PublicKey, String)],
    now: u64,
) -> Result<Vec<PublicKey>, TxError> {
    live_admin(tx, mesh, by, "make a new mesh key")?;
    let mesh_s = mesh.to_string();
    let current: i64 =
        tx.prepare_cached("SELECT key_epoch FROM meshes WHERE id = ?1")?.query_row([&mesh_s], |r| r.get(0))?;
    // Newer than the mesh's: the next one, or later (members may hold a later epoch than a broker
    // restored from an older backup).
    if epoch <= current as u64 {
        return Err(TxError::Domain(StoreError::RotationConflict(format!(
            "the mesh's key is epoch {current} already: a new key is epoch {} or later",
            current + 1
        ))));
    }
    let members: Vec<PublicKey> = tx
        .prepare_cached("SELECT key FROM peers WHERE mesh_id = ?1 AND kind = 'member' AND revoked = 0")?
        .query_map([&mesh_s], |r| r.get::<_, String>(0))?
        .map(|k| parse(k?))
        .collect::<Result<_, _>>()?;
    if let Some(why) = crate::store::grants_mismatch(&members, grants) {
        return Err(TxError::Domain(StoreError::RotationConflict(why)));
    }
    tx.prepare_cached("UPDATE meshes SET key_epoch = ?2, rekey_wanted_at = NULL WHERE id = ?1")?
        .execute(params![mesh_s, epoch as i64])?;
    for (member, item) in grants {
        super::queue::queue_grant(tx, &mesh_s, &member.to_string(), item, now)?;
    }
    Ok(members)
}

/// Records an invite (kept as first recorded when it is known already).
pub fn record_invite(tx: &Connection, mesh: &MeshId, invite: &InviteRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO invites (mesh_id, invite_id, issued_by, role, issued_at, expires_at, max_uses)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        mesh.to_string(),
        invite.invite_id,
        invite.issued_by.to_string(),
        invite.role.as_str(),
        invite.issued_at as i64,
        invite.expires_at as i64,
        invite.max_uses,
    ])?;
    Ok(())
}

/// `key`, a live member of `mesh` that is its owner or an admin; else `Forbidden` (saying it may not
/// `what`).
pub fn live_admin(tx: &Connection, mesh: &MeshId, key: &PublicKey, what: &str) -> Result<PeerRecord, TxError> {
    match live_member(tx, mesh, key)? {
        Some(p) if p.role.is_admin() => Ok(p),
        _ => Err(TxError::Domain(StoreError::Forbidden(format!("only the mesh's owner and admins may {what}")))),
    }
}

fn live_member(tx: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<Option<PeerRecord>> {
    Ok(get_peer(tx, mesh, key)?.filter(|p| p.kind == PeerKind::Member && !p.revoked))
}

pub fn invites(conn: &Connection, mesh: &MeshId) -> rusqlite::Result<Vec<InviteInfo>> {
    conn.prepare_cached(
        "SELECT i.invite_id, i.issued_by, i.role, i.issued_at, i.expires_at, i.max_uses, COALESCE(u.uses, 0),
                i.revoked_at, i.revoked_by
         FROM invites i LEFT JOIN invite_uses u ON u.mesh_id = i.mesh_id AND u.invite_id = i.invite_id
         WHERE i.mesh_id = ?1 ORDER BY i.issued_at DESC, i.invite_id LIMIT 1000",
    )?
    .query_map([mesh.to_string()], |r| {
        let role: String = r.get(2)?;
        Ok(InviteInfo {
            invite_id: r.get(0)?,
            issued_by: parse(r.get(1)?)?,
            role: Role::parse(&role).ok_or_else(|| bad_text("role", &role))?,
            issued_at: r.get::<_, i64>(3)? as u64,
            expires_at: r.get::<_, i64>(4)? as u64,
            max_uses: r.get(5)?,
            uses: r.get(6)?,
            revoked_at: r.get::<_, Option<i64>>(7)?.map(|t| t as u64),
            revoked_by: r.get::<_, Option<String>>(8)?.map(parse).transpose()?,
        })
    })?
    .collect()
}

pub fn revoke_invite(tx: &Connection, mesh: &MeshId, invite_id: &str, by: &PublicKey, now: u64) -> Result<(), TxError> {
    live_admin(tx, mesh, by, "revoke invites")?;
    let changed = tx
        .prepare_cached(
            "UPDATE invites SET revoked_at = COALESCE(revoked_at, ?3), revoked_by = COALESCE(revoked_by, ?4)
             WHERE mesh_id = ?1 AND invite_id = ?2",
        )?
        .execute(params![mesh.to_string(), invite_id, now as i64, by.to_string()])?;
    if changed == 0 {
        return Err(TxError::Domain(StoreError::UnknownInvite(invite_id.to_owned())));
    }
    Ok(())
}

/// Checks and applies a membership change (see [`crate::store::Store::change_membership`]).
pub fn change_membership(
    tx: &Connection,
    mesh: &MeshId,
    change: &MembershipChange,
) -> Result<MembershipOutcome, TxError> {
    let forbidden = |why: &str| TxError::Domain(StoreError::Forbidden(why.to_owned()));
    let Some(by) = live_member(tx, mesh, &change.by)? else {
        return Err(forbidden("only a member of the mesh can change its membership"));
    };
    let target = match live_member(tx, mesh, &change.target)? {
        Some(t) => t,
        None => {
            return Err(TxError::Domain(StoreError::UnknownMember(format!(
                "{} is not a member of this mesh",
                change.target.short()
            ))));
        }
    };
    let rule = crate::store::membership_rule(&by, &target, change);
    if let Err(why) = rule {
        return Err(forbidden(&why));
    }
    let mesh_s = mesh.to_string();
    let mut out = MembershipOutcome::default();
    match change.kind {
        ChangeKind::Remove | ChangeKind::Leave => {
            let sessions: Vec<PeerRecord> = tx
                .prepare_cached(&format!(
                    "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 AND member = ?2 AND kind = 'session'"
                ))?
                .query_map(params![mesh_s, target.key.to_string()], peer_from_row)?
                .collect::<Result<_, _>>()?;
            for session in &sessions {
                remove_peer(tx, mesh, &session.key)?;
            }
            tx.prepare_cached("DELETE FROM group_members WHERE mesh_id = ?1 AND key = ?2")?
                .execute(params![mesh_s, target.key.to_string()])?;
            tx.prepare_cached(
                "UPDATE peers SET revoked = 1, revoked_at = ?3, revoked_by = ?4 WHERE mesh_id = ?1 AND key = ?2",
            )?
            .execute(params![mesh_s, target.key.to_string(), change.at as i64, change.by.to_string()])?;
            let gone: Vec<PublicKey> = std::iter::once(target.key).chain(sessions.iter().map(|p| p.key)).collect();
            out.woken = super::queue::drop_queues(tx, mesh, &gone, change.at)?;
            tx.prepare_cached("UPDATE meshes SET rekey_wanted_at = COALESCE(rekey_wanted_at, ?2) WHERE id = ?1")?
                .execute(params![mesh_s, change.at as i64])?;
            out.removed.push(PeerRecord { revoked: true, revoked_at: Some(change.at), ..target.clone() });
            out.removed.extend(sessions);
        }
        ChangeKind::DeleteMesh => {
            return Err(TxError::Domain(StoreError::Forbidden("a mesh is deleted with delete_mesh".into())));
        }
        ChangeKind::SetRole => {
            let role = change.role.unwrap_or(Role::Member);
            if target.role == role {
                return Ok(out);
            }
            let set = |key: &PublicKey, role: Role| -> rusqlite::Result<usize> {
                tx.prepare_cached("UPDATE peers SET role = ?3 WHERE mesh_id = ?1 AND key = ?2")?.execute(params![
                    mesh_s,
                    key.to_string(),
                    role.as_str()
                ])
            };
            set(&target.key, role)?;
            out.changed.push(PeerRecord { role, ..target.clone() });
            if role == Role::Owner {
                // Ownership handed over: the owner who gave it stays an admin.
                set(&by.key, Role::Admin)?;
                tx.prepare_cached("UPDATE meshes SET owner = ?2 WHERE id = ?1")?
                    .execute(params![mesh_s, target.key.to_string()])?;
                out.changed.push(PeerRecord { role: Role::Admin, ..by.clone() });
            }
        }
    }
    let notice = crate::store::notice_of(change, &target, &by);
    let json = serde_json::to_string(&DeliveryItem::Membership(notice.clone())).expect("notices serialise");
    let members: Vec<String> = tx
        .prepare_cached("SELECT key FROM peers WHERE mesh_id = ?1 AND kind = 'member' AND revoked = 0")?
        .query_map([&mesh_s], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for member in members {
        super::queue::queue_notice(tx, &mesh_s, &member, &json, change.at)?;
        out.woken.push(parse(member)?);
    }
    out.woken.sort();
    out.woken.dedup();
    out.notice = Some(notice);
    Ok(out)
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
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = ?1 AND revoked = 0 ORDER BY joined_at, key"
    ))?;
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
             WHERE kind = 'session' AND ended_at IS NULL AND revoked = 0 AND COALESCE(last_seen, joined_at) < ?1"
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
        invited_by: row.get::<_, Option<String>>(offset + 11)?.map(parse).transpose()?,
        revoked_at: row.get::<_, Option<i64>>(offset + 12)?.map(|t| t as u64),
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
