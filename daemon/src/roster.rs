//! The daemon's copy of each mesh's roster (from `welcome`, `roster` and `presence` frames), and
//! target resolution: a name or key typed by a user becomes a full key, `@group` or `*` here, before
//! anything is queued. No prefixes, no fuzzy matches: an ambiguous or unknown target is an error.

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::{PeerInfo, TargetInfo, TargetKind};
use mesh_proto::wire::{Peer, PeerKind, Role};
use mesh_proto::{EncPublicKey, MeshId, PublicKey, Target};
use rusqlite::{Connection, Row, params};

use crate::meshes::MeshRow;

const COLUMNS: &str = "mesh_id, key, kind, member, name, enc_key, enc_sig, role, online, last_seen";

#[derive(Clone, Debug)]
pub struct PeerRow {
    pub mesh_id: MeshId,
    pub peer: Peer,
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<PeerRow> {
    let kind: String = r.get(2)?;
    let role: String = r.get(7)?;
    Ok(PeerRow {
        mesh_id: parse_col(r.get(0)?)?,
        peer: Peer {
            key: parse_col(r.get(1)?)?,
            kind: PeerKind::parse(&kind).unwrap_or(PeerKind::Member),
            member: parse_col(r.get(3)?)?,
            name: r.get(4)?,
            enc_key: parse_col(r.get(5)?)?,
            enc_sig: parse_col(r.get(6)?)?,
            role: Role::parse(&role).unwrap_or(Role::Member),
            online: r.get(8)?,
            last_seen: r.get::<_, Option<i64>>(9)?.map(|t| t as u64),
        },
    })
}

pub fn upsert(conn: &Connection, mesh: &MeshId, p: &Peer) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO peers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (mesh_id, key) DO UPDATE SET kind = excluded.kind, member = excluded.member,
               name = excluded.name, enc_key = excluded.enc_key, enc_sig = excluded.enc_sig, role = excluded.role,
               online = excluded.online, last_seen = COALESCE(excluded.last_seen, peers.last_seen)"
        ),
        params![
            mesh.to_string(),
            p.key.to_string(),
            p.kind.as_str(),
            p.member.to_string(),
            p.name,
            p.enc_key.to_string(),
            p.enc_sig.to_string(),
            p.role.as_str(),
            p.online,
            p.last_seen.map(|t| t as i64),
        ],
    )?;
    Ok(())
}

/// Replaces a mesh's roster with a full snapshot (from `welcome` or a `roster` reply).
pub fn replace(conn: &mut Connection, mesh: &MeshId, peers: &[Peer]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM peers WHERE mesh_id = ?1", [mesh.to_string()])?;
    for p in peers {
        upsert(&tx, mesh, p)?;
    }
    tx.commit()
}

/// Marks every peer of a mesh offline (our link to its broker is down: we no longer know).
pub fn mark_all_offline(conn: &Connection, mesh: &MeshId) -> rusqlite::Result<()> {
    conn.execute("UPDATE peers SET online = 0 WHERE mesh_id = ?1", [mesh.to_string()])?;
    Ok(())
}

/// Marks one peer offline (a session of ours that ended).
pub fn mark_offline(conn: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE peers SET online = 0 WHERE mesh_id = ?1 AND key = ?2",
        params![mesh.to_string(), key.to_string()],
    )?;
    Ok(())
}

pub fn list(conn: &Connection, mesh: Option<&MeshId>) -> rusqlite::Result<Vec<PeerRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM peers WHERE (?1 IS NULL OR mesh_id = ?1) ORDER BY mesh_id, kind, name, key"
    ))?;
    stmt.query_map([mesh.map(|m| m.to_string())], from_row)?.collect()
}

pub fn peer_info(row: &PeerRow, mesh_name: &str, me: &PublicKey) -> PeerInfo {
    let p = &row.peer;
    PeerInfo {
        mesh: mesh_name.to_owned(),
        key: p.key.to_string(),
        name: p.name.clone(),
        kind: p.kind,
        member: p.member.to_string(),
        role: p.role,
        online: p.online,
        last_seen: p.last_seen,
        is_self: p.key == *me,
    }
}

/// How a resolved message is sealed.
#[derive(Clone, Debug)]
pub enum SealWith {
    Direct(EncPublicKey),
    Group,
}

#[derive(Clone, Debug)]
pub struct Resolved {
    pub mesh: MeshRow,
    pub target: Target,
    pub seal: SealWith,
    pub info: TargetInfo,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no mesh named {0:?}; see `mesh meshes`")]
    UnknownMesh(String),
    #[error("not in any mesh yet; create one with `mesh create` or join with `mesh join`")]
    NoMeshes,
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("the roster entry for {0} is not signed by its key; refusing to encrypt to it")]
    BadBinding(String),
}

/// Resolves what a user typed (`name`, 64-hex key, `@group`, `*`) to a wire target in one mesh.
pub fn resolve(conn: &Connection, to: &str, mesh: Option<&str>) -> Result<Resolved, ResolveError> {
    let sql = |e: rusqlite::Error| ResolveError::Unknown(format!("reading the roster: {e}"));
    let candidates: Vec<MeshRow> = match mesh {
        Some(m) => {
            vec![crate::meshes::find(conn, m).map_err(sql)?.ok_or_else(|| ResolveError::UnknownMesh(m.to_owned()))?]
        }
        None => crate::meshes::list(conn).map_err(sql)?,
    };
    if candidates.is_empty() {
        return Err(ResolveError::NoMeshes);
    }

    if to == "*" || to.starts_with('@') {
        let target: Target = to.parse().map_err(|e: mesh_proto::ProtoError| ResolveError::Unknown(e.to_string()))?;
        let [only] = candidates.as_slice() else {
            let names: Vec<_> = candidates.iter().map(|m| m.name.as_str()).collect();
            return Err(ResolveError::Ambiguous(format!(
                "{to} could mean any of your {} meshes ({}); pass --mesh",
                names.len(),
                names.join(", ")
            )));
        };
        let kind = if target == Target::All { TargetKind::Broadcast } else { TargetKind::Group };
        let info = TargetInfo { kind, label: to.to_owned(), address: target.to_string(), name: None };
        return Ok(Resolved { mesh: only.clone(), target, seal: SealWith::Group, info });
    }

    // One query over the candidate meshes, by exact key or exact name.
    let ids: Vec<String> = candidates.iter().map(|m| m.id.to_string()).collect();
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM peers WHERE mesh_id IN (SELECT value FROM json_each(?1)) AND (key = ?2 OR name = ?2)
             ORDER BY mesh_id, key"
        ))
        .map_err(sql)?;
    let ids = serde_json::to_string(&ids).expect("ids serialise");
    let rows: Vec<PeerRow> =
        stmt.query_map(params![ids, to], from_row).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
    let mut matches: Vec<(MeshRow, Peer)> = rows
        .into_iter()
        .filter_map(|r| candidates.iter().find(|m| m.id == r.mesh_id).map(|m| (m.clone(), r.peer)))
        .collect();
    match matches.len() {
        0 => {
            let scope = match mesh {
                Some(m) => format!("mesh {m:?}"),
                None => "any of your meshes".to_owned(),
            };
            Err(ResolveError::Unknown(format!(
                "no peer {to:?} in {scope}; `mesh peers` lists who you can reach (names are exact)"
            )))
        }
        1 => {
            let (mesh, peer) = matches.pop().expect("one match");
            peer.public_identity().verify().map_err(|_| ResolveError::BadBinding(peer.key.to_string()))?;
            let info = TargetInfo {
                kind: TargetKind::Direct,
                label: to.to_owned(),
                address: peer.key.to_string(),
                name: Some(peer.name),
            };
            Ok(Resolved { mesh, target: Target::Key(peer.key), seal: SealWith::Direct(peer.enc_key), info })
        }
        n => {
            let listed: Vec<String> = matches
                .iter()
                .map(|(m, p)| format!("{} ({}, {} in mesh {})", p.name, p.key, p.kind.as_str(), m.name))
                .collect();
            Err(ResolveError::Ambiguous(format!(
                "{to:?} matches {n} peers: {}; send to the full key, or pass --mesh",
                listed.join("; ")
            )))
        }
    }
}
