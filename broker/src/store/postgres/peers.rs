//! Members, sessions and their names, invites and groups on PostgreSQL (the rules are SQLite's; see
//! `store::sqlite::peers`). Names are claimed under the mesh's advisory lock, so two replicas cannot
//! give one name to two peers; invite uses are counted by one conditional upsert, so two replicas
//! cannot both take an invite's last use.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use mesh_proto::membership::ChangeKind;
use mesh_proto::names;
use mesh_proto::wire::{DeliveryItem, InviteInfo, PeerKind, Role};
use mesh_proto::{MeshId, PublicKey};
use tokio_postgres::Row;

use super::{TxError, lock_names, parse};
use crate::store::{
    Claimed, Ended, InviteRecord, MembershipChange, MembershipOutcome, PeerRecord, Reaped, RosterEntry, StoreError,
};

const PEER_COLUMNS: &str =
    "key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen, revoked, ended_at, invited_by, revoked_at";

/// A peer from a row whose peer columns ([`PEER_COLUMNS`]) start at `at`.
fn peer_from_row(row: &Row, at: usize) -> Result<PeerRecord, TxError> {
    let kind: &str = row.get(at + 1);
    let role: &str = row.get(at + 6);
    Ok(PeerRecord {
        key: parse(row.get(at))?,
        kind: PeerKind::parse(kind).ok_or_else(|| TxError::Corrupt(format!("unexpected peer kind {kind:?}")))?,
        member: parse(row.get(at + 2))?,
        name: row.get(at + 3),
        enc_key: parse(row.get(at + 4))?,
        enc_sig: parse(row.get(at + 5))?,
        role: Role::parse(role).ok_or_else(|| TxError::Corrupt(format!("unexpected role {role:?}")))?,
        joined_at: row.get::<_, i64>(at + 7) as u64,
        last_seen: row.get::<_, Option<i64>>(at + 8).map(|t| t as u64),
        revoked: row.get(at + 9),
        ended_at: row.get::<_, Option<i64>>(at + 10).map(|t| t as u64),
        invited_by: row.get::<_, Option<&str>>(at + 11).map(parse).transpose()?,
        revoked_at: row.get::<_, Option<i64>>(at + 12).map(|t| t as u64),
    })
}

/// Inserts a peer, or refreshes its name, keys and last sighting; a session that comes back is no
/// longer ended.
pub(super) async fn insert_peer(tx: &impl GenericClient, mesh: &MeshId, p: &PeerRecord) -> Result<(), TxError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO peers (mesh_id, key, kind, member, name, enc_key, enc_sig, role, joined_at, last_seen,
                 revoked, name_key, name_key_cased, name_key_upper, ended_at, invited_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, NULL, $15)
             ON CONFLICT (mesh_id, key) DO UPDATE SET
               name = excluded.name, enc_key = excluded.enc_key, enc_sig = excluded.enc_sig,
               last_seen = excluded.last_seen, name_key = excluded.name_key,
               name_key_cased = excluded.name_key_cased, name_key_upper = excluded.name_key_upper, ended_at = NULL
             WHERE NOT peers.revoked",
        )
        .await?;
    let keys = names::name_keys(&p.name);
    tx.execute(
        &stmt,
        &[
            &mesh.to_string(),
            &p.key.to_string(),
            &p.kind.as_str(),
            &p.member.to_string(),
            &p.name,
            &p.enc_key.to_string(),
            &p.enc_sig.to_string(),
            &p.role.as_str(),
            &(p.joined_at as i64),
            &p.last_seen.map(|t| t as i64),
            &p.revoked,
            &keys.lower,
            &keys.written,
            &keys.upper,
            &p.invited_by.map(|k| k.to_string()),
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn get_peer(
    c: &impl GenericClient,
    mesh: &MeshId,
    key: &PublicKey,
) -> Result<Option<PeerRecord>, TxError> {
    let stmt = c.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = $1 AND key = $2")).await?;
    c.query_opt(&stmt, &[&mesh.to_string(), &key.to_string()]).await?.map(|r| peer_from_row(&r, 0)).transpose()
}

/// Lets `key` take `name` in `mesh`: refused (before anything is written) while another peer that
/// has not ended holds a name that looks the same; ended sessions holding it are removed. Holds the
/// mesh's name lock until the transaction ends.
async fn claim_name(tx: &impl GenericClient, mesh: &MeshId, key: &PublicKey, name: &str) -> Result<Claimed, TxError> {
    lock_names(tx, mesh).await?;
    let keys = names::name_keys(name);
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = $1 AND key != $2 AND NOT revoked
               AND (name_key IN ($3, $4, $5) OR name_key_cased IN ($3, $4, $5) OR name_key_upper IN ($3, $4, $5))"
        ))
        .await?;
    let holders = tx
        .query(&stmt, &[&mesh.to_string(), &key.to_string(), &keys.lower, &keys.written, &keys.upper])
        .await?
        .iter()
        .map(|r| peer_from_row(r, 0))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(live) = holders.iter().find(|p| p.ended_at.is_none()) {
        return Err(TxError::Domain(StoreError::NameTaken { name: name.to_owned(), holder: live.describe() }));
    }
    for ended in &holders {
        remove_peer(tx, mesh, &ended.key).await?;
    }
    Ok(Claimed { reaped: holders })
}

async fn remove_peer(tx: &impl GenericClient, mesh: &MeshId, key: &PublicKey) -> Result<(), TxError> {
    let (mesh, key) = (mesh.to_string(), key.to_string());
    let groups = tx.prepare_cached("DELETE FROM group_members WHERE mesh_id = $1 AND key = $2").await?;
    tx.execute(&groups, &[&mesh, &key]).await?;
    let peer = tx.prepare_cached("DELETE FROM peers WHERE mesh_id = $1 AND key = $2").await?;
    tx.execute(&peer, &[&mesh, &key]).await?;
    Ok(())
}

/// A peer connecting: inserted or refreshed, claiming its name when it is new or changed it.
pub(super) async fn upsert(tx: &impl GenericClient, mesh: &MeshId, peer: &PeerRecord) -> Result<Claimed, TxError> {
    let existing = get_peer(tx, mesh, &peer.key).await?;
    let claimed = match &existing {
        Some(p) if p.name == peer.name => Claimed::default(),
        _ => claim_name(tx, mesh, &peer.key, &peer.name).await?,
    };
    insert_peer(tx, mesh, peer).await?;
    Ok(claimed)
}

/// Counts a use of `invite` and adds `peer` as a member, unless the invite was revoked or is used up,
/// or the name is taken (then the transaction rolls back and nothing is consumed). A removed member
/// coming back with a newer invite starts afresh: its old row goes.
pub(super) async fn join(
    tx: &impl GenericClient,
    mesh: &MeshId,
    invite: &InviteRecord,
    peer: &PeerRecord,
) -> Result<Claimed, TxError> {
    let mesh_s = mesh.to_string();
    // Shared with a revocation's update: a revocation that commits first is seen here.
    let stmt =
        tx.prepare_cached("SELECT revoked_at FROM invites WHERE mesh_id = $1 AND invite_id = $2 FOR SHARE").await?;
    if let Some(row) = tx.query_opt(&stmt, &[&mesh_s, &invite.invite_id]).await?
        && row.get::<_, Option<i64>>(0).is_some()
    {
        return Err(TxError::Domain(StoreError::InviteRevoked));
    }
    let max = invite.max_uses.map_or(i64::MAX, i64::from);
    if max == 0 {
        return Err(TxError::Domain(StoreError::InviteExhausted));
    }
    // One statement counts the use only while uses remain: of two replicas taking the last use at
    // once, the second waits for the first's row and then finds it used up.
    let stmt = tx
        .prepare_cached(
            "INSERT INTO invite_uses (mesh_id, invite_id, uses) VALUES ($1, $2, 1)
             ON CONFLICT (mesh_id, invite_id) DO UPDATE SET uses = invite_uses.uses + 1 WHERE invite_uses.uses < $3",
        )
        .await?;
    if tx.execute(&stmt, &[&mesh_s, &invite.invite_id, &max]).await? == 0 {
        return Err(TxError::Domain(StoreError::InviteExhausted));
    }
    let claimed = claim_name(tx, mesh, &peer.key, &peer.name).await?;
    record_invite(tx, mesh, invite).await?;
    let stmt = tx.prepare_cached("DELETE FROM peers WHERE mesh_id = $1 AND key = $2 AND revoked").await?;
    tx.execute(&stmt, &[&mesh_s, &peer.key.to_string()]).await?;
    insert_peer(tx, mesh, peer).await?;
    // A joiner holding an older key than the mesh's gets the current one with the next key.
    let stmt = tx
        .prepare_cached(
            "UPDATE meshes SET rekey_wanted_at = COALESCE(rekey_wanted_at, $3) WHERE id = $1 AND key_epoch > $2",
        )
        .await?;
    tx.execute(&stmt, &[&mesh_s, &(invite.key_epoch as i64), &(peer.joined_at as i64)]).await?;
    Ok(claimed)
}

/// Deletes the mesh for its owner (see [`crate::store::Store::delete_mesh`]), under the mesh's name
/// lock.
pub(super) async fn delete_mesh(
    tx: &impl GenericClient,
    mesh: &MeshId,
    by: &PublicKey,
) -> Result<Vec<PublicKey>, TxError> {
    lock_names(tx, mesh).await?;
    match live_member(tx, mesh, by).await? {
        Some(p) if p.role == Role::Owner => {}
        _ => return Err(TxError::Domain(StoreError::Forbidden("only the mesh's owner deletes it".into()))),
    }
    let mesh_s = mesh.to_string();
    let stmt = tx.prepare_cached("SELECT key FROM peers WHERE mesh_id = $1 AND NOT revoked").await?;
    let keys: Vec<PublicKey> =
        tx.query(&stmt, &[&mesh_s]).await?.iter().map(|r| parse(r.get(0))).collect::<Result<_, _>>()?;
    for table in ["queue", "messages", "reads", "invites", "invite_uses", "group_members", "connections", "peers"] {
        tx.execute(&format!("DELETE FROM {table} WHERE mesh_id = $1"), &[&mesh_s]).await?;
    }
    tx.execute("DELETE FROM meshes WHERE id = $1", &[&mesh_s]).await?;
    Ok(keys)
}

/// Makes `epoch` the mesh's key (see [`crate::store::Store::rotate_key`]), under the mesh's name
/// lock: membership changes and joins wait for it, so the members it checks are the members.
pub(super) async fn rotate_key(
    tx: &impl GenericClient,
    mesh: &MeshId,
    by: &PublicKey,
    epoch: u64,
    grants: &[(PublicKey, String)],
    now: u64,
) -> Result<Vec<PublicKey>, TxError> {
    lock_names(tx, mesh).await?;
    live_admin(tx, mesh, by, "make a new mesh key").await?;
    let mesh_s = mesh.to_string();
    let stmt = tx.prepare_cached("SELECT key_epoch FROM meshes WHERE id = $1").await?;
    let current: i64 = tx.query_one(&stmt, &[&mesh_s]).await?.get(0);
    // Newer than the mesh's: the next one, or later (members may hold a later epoch than a broker
    // restored from an older backup).
    if epoch <= current as u64 {
        return Err(TxError::Domain(StoreError::RotationConflict(format!(
            "the mesh's key is epoch {current} already: a new key is epoch {} or later",
            current + 1
        ))));
    }
    let stmt =
        tx.prepare_cached("SELECT key FROM peers WHERE mesh_id = $1 AND kind = 'member' AND NOT revoked").await?;
    let members: Vec<PublicKey> =
        tx.query(&stmt, &[&mesh_s]).await?.iter().map(|r| parse(r.get(0))).collect::<Result<_, _>>()?;
    if let Some(why) = crate::store::grants_mismatch(&members, grants) {
        return Err(TxError::Domain(StoreError::RotationConflict(why)));
    }
    let stmt = tx.prepare_cached("UPDATE meshes SET key_epoch = $2, rekey_wanted_at = NULL WHERE id = $1").await?;
    tx.execute(&stmt, &[&mesh_s, &(epoch as i64)]).await?;
    let rows: Vec<(String, String, String)> =
        grants.iter().map(|(member, item)| (mesh_s.clone(), member.to_string(), item.clone())).collect();
    super::queue::queue_grants(tx, &rows, now).await?;
    Ok(members)
}

/// Records an invite (kept as first recorded when it is known already).
pub(super) async fn record_invite(
    tx: &impl GenericClient,
    mesh: &MeshId,
    invite: &InviteRecord,
) -> Result<(), TxError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO invites (mesh_id, invite_id, issued_by, role, issued_at, expires_at, max_uses)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &mesh.to_string(),
            &invite.invite_id,
            &invite.issued_by.to_string(),
            &invite.role.as_str(),
            &(invite.issued_at as i64),
            &(invite.expires_at as i64),
            &invite.max_uses.map(i64::from),
        ],
    )
    .await?;
    Ok(())
}

async fn live_member(tx: &impl GenericClient, mesh: &MeshId, key: &PublicKey) -> Result<Option<PeerRecord>, TxError> {
    Ok(get_peer(tx, mesh, key).await?.filter(|p| p.kind == PeerKind::Member && !p.revoked))
}

/// `key`, a live owner or admin of `mesh`; else `Forbidden` (saying it may not `what`).
pub(super) async fn live_admin(
    tx: &impl GenericClient,
    mesh: &MeshId,
    key: &PublicKey,
    what: &str,
) -> Result<PeerRecord, TxError> {
    match live_member(tx, mesh, key).await? {
        Some(p) if p.role.is_admin() => Ok(p),
        _ => Err(TxError::Domain(StoreError::Forbidden(format!("only the mesh's owner and admins may {what}")))),
    }
}

pub(super) async fn invites(c: &impl GenericClient, mesh: &MeshId) -> Result<Vec<InviteInfo>, TxError> {
    let stmt = c
        .prepare_cached(
            "SELECT i.invite_id, i.issued_by, i.role, i.issued_at, i.expires_at, i.max_uses, COALESCE(u.uses, 0),
                    i.revoked_at, i.revoked_by
             FROM invites i LEFT JOIN invite_uses u ON u.mesh_id = i.mesh_id AND u.invite_id = i.invite_id
             WHERE i.mesh_id = $1 ORDER BY i.issued_at DESC, i.invite_id LIMIT 1000",
        )
        .await?;
    c.query(&stmt, &[&mesh.to_string()])
        .await?
        .iter()
        .map(|r| {
            let role: &str = r.get(2);
            Ok(InviteInfo {
                invite_id: r.get(0),
                issued_by: parse(r.get(1))?,
                role: Role::parse(role).ok_or_else(|| TxError::Corrupt(format!("unexpected role {role:?}")))?,
                issued_at: r.get::<_, i64>(3) as u64,
                expires_at: r.get::<_, i64>(4) as u64,
                max_uses: r.get::<_, Option<i64>>(5).and_then(|m| u32::try_from(m).ok()),
                uses: u32::try_from(r.get::<_, i64>(6)).unwrap_or(u32::MAX),
                revoked_at: r.get::<_, Option<i64>>(7).map(|t| t as u64),
                revoked_by: r.get::<_, Option<&str>>(8).map(parse).transpose()?,
            })
        })
        .collect()
}

pub(super) async fn revoke_invite(
    tx: &impl GenericClient,
    mesh: &MeshId,
    invite_id: &str,
    by: &PublicKey,
    now: u64,
) -> Result<(), TxError> {
    live_admin(tx, mesh, by, "revoke invites").await?;
    let stmt = tx
        .prepare_cached(
            "UPDATE invites SET revoked_at = COALESCE(revoked_at, $3), revoked_by = COALESCE(revoked_by, $4)
             WHERE mesh_id = $1 AND invite_id = $2",
        )
        .await?;
    if tx.execute(&stmt, &[&mesh.to_string(), &invite_id, &(now as i64), &by.to_string()]).await? == 0 {
        return Err(TxError::Domain(StoreError::UnknownInvite(invite_id.to_owned())));
    }
    Ok(())
}

/// Checks and applies a membership change (see [`crate::store::Store::change_membership`]), under
/// the mesh's name lock: changes to one mesh's membership, joins and name claims happen one at a
/// time across replicas.
pub(super) async fn change_membership(
    tx: &impl GenericClient,
    mesh: &MeshId,
    change: &MembershipChange,
) -> Result<MembershipOutcome, TxError> {
    lock_names(tx, mesh).await?;
    let forbidden = |why: &str| TxError::Domain(StoreError::Forbidden(why.to_owned()));
    let Some(by) = live_member(tx, mesh, &change.by).await? else {
        return Err(forbidden("only a member of the mesh can change its membership"));
    };
    let Some(target) = live_member(tx, mesh, &change.target).await? else {
        return Err(TxError::Domain(StoreError::UnknownMember(format!(
            "{} is not a member of this mesh",
            change.target.short()
        ))));
    };
    if let Err(why) = crate::store::membership_rule(&by, &target, change) {
        return Err(forbidden(&why));
    }
    let mesh_s = mesh.to_string();
    let mut out = MembershipOutcome::default();
    match change.kind {
        ChangeKind::Remove | ChangeKind::Leave => {
            let stmt = tx
                .prepare_cached(&format!(
                    "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = $1 AND member = $2 AND kind = 'session'"
                ))
                .await?;
            let sessions = tx
                .query(&stmt, &[&mesh_s, &target.key.to_string()])
                .await?
                .iter()
                .map(|r| peer_from_row(r, 0))
                .collect::<Result<Vec<_>, _>>()?;
            for session in &sessions {
                remove_peer(tx, mesh, &session.key).await?;
            }
            let stmt = tx.prepare_cached("DELETE FROM group_members WHERE mesh_id = $1 AND key = $2").await?;
            tx.execute(&stmt, &[&mesh_s, &target.key.to_string()]).await?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE peers SET revoked = TRUE, revoked_at = $3, revoked_by = $4 WHERE mesh_id = $1 AND key = $2",
                )
                .await?;
            tx.execute(&stmt, &[&mesh_s, &target.key.to_string(), &(change.at as i64), &change.by.to_string()]).await?;
            let gone: Vec<PublicKey> = std::iter::once(target.key).chain(sessions.iter().map(|p| p.key)).collect();
            out.woken = super::queue::drop_queues(tx, mesh, &gone, change.at).await?;
            let stmt = tx
                .prepare_cached("UPDATE meshes SET rekey_wanted_at = COALESCE(rekey_wanted_at, $2) WHERE id = $1")
                .await?;
            tx.execute(&stmt, &[&mesh_s, &(change.at as i64)]).await?;
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
            let set = tx.prepare_cached("UPDATE peers SET role = $3 WHERE mesh_id = $1 AND key = $2").await?;
            tx.execute(&set, &[&mesh_s, &target.key.to_string(), &role.as_str()]).await?;
            out.changed.push(PeerRecord { role, ..target.clone() });
            if role == Role::Owner {
                // Ownership handed over: the owner who gave it stays an admin.
                tx.execute(&set, &[&mesh_s, &by.key.to_string(), &Role::Admin.as_str()]).await?;
                let stmt = tx.prepare_cached("UPDATE meshes SET owner = $2 WHERE id = $1").await?;
                tx.execute(&stmt, &[&mesh_s, &target.key.to_string()]).await?;
                out.changed.push(PeerRecord { role: Role::Admin, ..by.clone() });
            }
        }
    }
    let notice = crate::store::notice_of(change, &target, &by);
    let json = serde_json::to_string(&DeliveryItem::Membership(notice.clone())).expect("notices serialise");
    let stmt = tx
        .prepare_cached("SELECT key FROM peers WHERE mesh_id = $1 AND kind = 'member' AND NOT revoked ORDER BY key")
        .await?;
    let members: Vec<String> = tx.query(&stmt, &[&mesh_s]).await?.iter().map(|r| r.get(0)).collect();
    super::queue::queue_notices(tx, &mesh_s, &members, &json, change.at).await?;
    for member in members {
        out.woken.push(parse(&member)?);
    }
    out.woken.sort();
    out.woken.dedup();
    out.notice = Some(notice);
    Ok(out)
}

pub(super) async fn rename(
    tx: &impl GenericClient,
    mesh: &MeshId,
    key: &PublicKey,
    name: &str,
) -> Result<(PeerRecord, Claimed), TxError> {
    let Some(mut peer) = get_peer(tx, mesh, key).await? else {
        return Err(TxError::Domain(StoreError::RecipientUnknown(key.to_string())));
    };
    if peer.name == name {
        return Ok((peer, Claimed::default()));
    }
    let claimed = claim_name(tx, mesh, key, name).await?;
    let keys = names::name_keys(name);
    let stmt = tx
        .prepare_cached(
            "UPDATE peers SET name = $3, name_key = $4, name_key_cased = $5, name_key_upper = $6
             WHERE mesh_id = $1 AND key = $2",
        )
        .await?;
    tx.execute(&stmt, &[&mesh.to_string(), &key.to_string(), &name, &keys.lower, &keys.written, &keys.upper]).await?;
    peer.name = name.to_owned();
    Ok((peer, claimed))
}

pub(super) async fn end_session(
    tx: &impl GenericClient,
    mesh: &MeshId,
    member: &PublicKey,
    session: &PublicKey,
    now: u64,
    keep_ended: usize,
) -> Result<Ended, TxError> {
    // The member's sessions end one at a time, so that the ones kept are counted once.
    lock_names(tx, mesh).await?;
    let Some(peer) = get_peer(tx, mesh, session).await? else {
        return Err(TxError::Domain(StoreError::Forbidden(format!("no session {} in this mesh", session.short()))));
    };
    if peer.kind != PeerKind::Session || peer.member != *member {
        return Err(TxError::Domain(StoreError::Forbidden(format!("{} is not one of your sessions", session.short()))));
    }
    if peer.ended_at.is_some() {
        return Ok(Ended::default());
    }
    let stmt = tx.prepare_cached("UPDATE peers SET ended_at = $3 WHERE mesh_id = $1 AND key = $2").await?;
    tx.execute(&stmt, &[&mesh.to_string(), &session.to_string(), &(now as i64)]).await?;
    // The member's ended sessions beyond the newest `keep_ended` leave the roster now.
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers
             WHERE mesh_id = $1 AND member = $2 AND kind = 'session' AND ended_at IS NOT NULL
             ORDER BY ended_at DESC, key OFFSET $3"
        ))
        .await?;
    let removed = tx
        .query(&stmt, &[&mesh.to_string(), &member.to_string(), &(keep_ended as i64)])
        .await?
        .iter()
        .map(|r| peer_from_row(r, 0))
        .collect::<Result<Vec<_>, _>>()?;
    for gone in &removed {
        remove_peer(tx, mesh, &gone.key).await?;
    }
    Ok(Ended { ended: Some(PeerRecord { ended_at: Some(now), ..peer }), removed })
}

pub(super) async fn set_group(
    tx: &impl GenericClient,
    mesh: &MeshId,
    key: &PublicKey,
    group: &str,
    member: bool,
) -> Result<Vec<String>, TxError> {
    let (mesh, key) = (mesh.to_string(), key.to_string());
    let sql = if member {
        "INSERT INTO group_members (mesh_id, group_name, key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM group_members WHERE mesh_id = $1 AND group_name = $2 AND key = $3"
    };
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, &[&mesh, &group, &key]).await?;
    let stmt = tx
        .prepare_cached("SELECT group_name FROM group_members WHERE mesh_id = $1 AND key = $2 ORDER BY group_name")
        .await?;
    Ok(tx.query(&stmt, &[&mesh, &key]).await?.iter().map(|r| r.get(0)).collect())
}

pub(super) async fn roster(c: &impl GenericClient, mesh: &MeshId) -> Result<Vec<RosterEntry>, TxError> {
    let mesh = mesh.to_string();
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let stmt =
        c.prepare_cached("SELECT key, group_name FROM group_members WHERE mesh_id = $1 ORDER BY group_name").await?;
    for row in c.query(&stmt, &[&mesh]).await? {
        groups.entry(row.get(0)).or_default().push(row.get(1));
    }
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers WHERE mesh_id = $1 AND NOT revoked ORDER BY joined_at, key"
        ))
        .await?;
    c.query(&stmt, &[&mesh])
        .await?
        .iter()
        .map(|r| {
            let peer = peer_from_row(r, 0)?;
            let groups = groups.remove(&peer.key.to_string()).unwrap_or_default();
            Ok(RosterEntry { peer, groups })
        })
        .collect()
}

/// Ends stale sessions and removes ended ones past the grace period. Each is one `UPDATE`/`DELETE …
/// RETURNING`, so of two replicas reaping at once, each session is reported by one.
pub(super) async fn reap_sessions(
    tx: &impl GenericClient,
    now: u64,
    stale_ms: u64,
    grace_ms: u64,
    online: &[(MeshId, PublicKey)],
) -> Result<Reaped, TxError> {
    let online_meshes: Vec<String> = online.iter().map(|(m, _)| m.to_string()).collect();
    let online_keys: Vec<String> = online.iter().map(|(_, k)| k.to_string()).collect();
    // Sessions connected now, here or to another replica, are neither ended nor removed, however
    // long unseen.
    let not_online = |meshes: u8, keys: u8| {
        format!(
            "NOT EXISTS (SELECT 1 FROM UNNEST(${meshes}::TEXT[], ${keys}::TEXT[]) AS o(mesh_id, key)
             WHERE o.mesh_id = peers.mesh_id AND o.key = peers.key)
             AND NOT EXISTS (SELECT 1 FROM connections c WHERE c.mesh_id = peers.mesh_id AND c.key = peers.key)"
        )
    };
    let mut out = Reaped::default();
    let ended = tx
        .query(
            &format!(
                "UPDATE peers SET ended_at = $1
                 WHERE kind = 'session' AND ended_at IS NULL AND NOT revoked AND COALESCE(last_seen, joined_at) < $2
                   AND {}
                 RETURNING mesh_id, {PEER_COLUMNS}",
                not_online(3, 4)
            ),
            &[&(now as i64), &(now.saturating_sub(stale_ms) as i64), &online_meshes, &online_keys],
        )
        .await?;
    for r in &ended {
        out.ended.push((parse(r.get(0))?, peer_from_row(r, 1)?));
    }
    let removed = tx
        .query(
            &format!(
                "DELETE FROM peers WHERE kind = 'session' AND ended_at IS NOT NULL AND ended_at < $1 AND {}
                 RETURNING mesh_id, {PEER_COLUMNS}",
                not_online(2, 3)
            ),
            &[&(now.saturating_sub(grace_ms) as i64), &online_meshes, &online_keys],
        )
        .await?;
    let gone_meshes: Vec<String> = removed.iter().map(|r| r.get(0)).collect();
    let gone_keys: Vec<String> = removed.iter().map(|r| r.get(1)).collect();
    tx.execute(
        "DELETE FROM group_members g USING UNNEST($1::TEXT[], $2::TEXT[]) AS gone(mesh_id, key)
         WHERE g.mesh_id = gone.mesh_id AND g.key = gone.key",
        &[&gone_meshes, &gone_keys],
    )
    .await?;
    for r in &removed {
        out.removed.push((parse(r.get(0))?, peer_from_row(r, 1)?));
    }
    Ok(out)
}
