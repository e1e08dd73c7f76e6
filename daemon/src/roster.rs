//! The daemon's copy of each mesh's roster (from `welcome`, `roster` and `presence` frames), and
//! target resolution: what a user typed becomes a full key, `@group` or `*` in one mesh here, before
//! anything is queued. The rules (docs/addressing.md):
//!
//! - A full key; else an exact name or a key prefix of at least 4 hex digits (the 8 shown
//!   everywhere), which must together point to one peer; an ambiguous match is an error listing the
//!   candidates, and an unknown one offers the closest names ("did you mean").
//! - The meshes searched are the context's (`--mesh`, `MESH_CONTEXT`, `mesh use`) or, without one,
//!   all of them. A peer found in several meshes under one key is one identity: the mesh where it is
//!   live is chosen (not ended, online, seen last, joined first).
//! - `*` and `@group` need one mesh: the context's, the only one, or (for a group) the only mesh
//!   whose roster has that group.

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::{Candidate, PeerInfo, TargetInfo, TargetKind};
use mesh_proto::wire::{Peer, PeerKind, Role};
use mesh_proto::{EncPublicKey, MeshId, PublicKey, Target, names};
use rusqlite::{Connection, Row, params};

use crate::meshes::MeshRow;

const COLUMNS: &str = "mesh_id, key, kind, member, name, enc_key, enc_sig, role, online, last_seen, groups, ended_at, joined_at, invited_by";

/// The shortest key prefix accepted as a target.
pub const MIN_PREFIX: usize = 4;
/// Candidates offered with an unknown or ambiguous target, at most.
const MAX_CANDIDATES: usize = 5;

#[derive(Clone, Debug)]
pub struct PeerRow {
    pub mesh_id: MeshId,
    pub peer: Peer,
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<PeerRow> {
    let kind: String = r.get(2)?;
    let role: String = r.get(7)?;
    let groups: Option<String> = r.get(10)?;
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
            groups: groups.and_then(|g| serde_json::from_str(&g).ok()),
            ended_at: r.get::<_, Option<i64>>(11)?.map(|t| t as u64),
            joined_at: r.get::<_, Option<i64>>(12)?.map(|t| t as u64),
            invited_by: r.get::<_, Option<String>>(13)?.map(parse_col).transpose()?,
        },
    })
}

/// Stores what a roster or presence frame says of a peer. Groups a presence frame leaves out are
/// kept as they were, and so is a session's end when an offline frame does not mention it (frames
/// can cross: a session's own last "offline" after its member's "ended"); coming online clears it.
pub fn upsert(conn: &Connection, mesh: &MeshId, p: &Peer) -> rusqlite::Result<()> {
    let groups = p.groups.as_ref().map(|g| serde_json::to_string(g).expect("groups serialise"));
    conn.execute(
        &format!(
            "INSERT INTO peers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (mesh_id, key) DO UPDATE SET kind = excluded.kind, member = excluded.member,
               name = excluded.name, enc_key = excluded.enc_key, enc_sig = excluded.enc_sig, role = excluded.role,
               online = excluded.online, last_seen = COALESCE(excluded.last_seen, peers.last_seen),
               groups = COALESCE(excluded.groups, peers.groups),
               joined_at = COALESCE(excluded.joined_at, peers.joined_at),
               invited_by = COALESCE(excluded.invited_by, peers.invited_by),
               ended_at = CASE WHEN excluded.online THEN excluded.ended_at
                               ELSE COALESCE(excluded.ended_at, peers.ended_at) END"
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
            groups,
            p.ended_at.map(|t| t as i64),
            p.joined_at.map(|t| t as i64),
            p.invited_by.map(|k| k.to_string()),
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

/// One peer of a mesh's roster, if it is there.
pub fn get(conn: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<Option<PeerRow>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM peers WHERE mesh_id = ?1 AND key = ?2"),
        params![mesh.to_string(), key.to_string()],
        from_row,
    )
    .optional()
}

/// Forgets a peer that left the roster.
pub fn remove(conn: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM peers WHERE mesh_id = ?1 AND key = ?2", params![mesh.to_string(), key.to_string()])?;
    Ok(())
}

/// Marks every peer of a mesh offline (our link to its broker is down: we no longer know).
pub fn mark_all_offline(conn: &Connection, mesh: &MeshId) -> rusqlite::Result<()> {
    conn.execute("UPDATE peers SET online = 0 WHERE mesh_id = ?1", [mesh.to_string()])?;
    Ok(())
}

/// Marks a session of ours offline and ended.
pub fn mark_ended(conn: &Connection, mesh: &MeshId, key: &PublicKey, at: Option<u64>) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE peers SET online = 0, ended_at = COALESCE(?3, ended_at) WHERE mesh_id = ?1 AND key = ?2",
        params![mesh.to_string(), key.to_string(), at.map(|t| t as i64)],
    )?;
    Ok(())
}

pub fn list(conn: &Connection, mesh: Option<&MeshId>) -> rusqlite::Result<Vec<PeerRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM peers WHERE (?1 IS NULL OR mesh_id = ?1) ORDER BY mesh_id, kind, name, key"
    ))?;
    stmt.query_map([mesh.map(|m| m.to_string())], from_row)?.collect()
}

/// The name shown for `key` in `mesh`, if the roster knows it.
pub fn name_of(conn: &Connection, mesh: &MeshId, key: &PublicKey) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT name FROM peers WHERE mesh_id = ?1 AND key = ?2",
        params![mesh.to_string(), key.to_string()],
        |r| r.get(0),
    )
    .optional()
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
        groups: p.groups.clone().unwrap_or_default(),
        ended_at: p.ended_at,
        joined_at: p.joined_at,
        invited_by: p.invited_by.map(|k| k.to_string()),
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

/// What a resolution looks in: one mesh (the context's) or every mesh.
#[derive(Clone, Debug)]
pub struct Scope {
    pub meshes: Vec<MeshRow>,
    /// How the single mesh was chosen, when it was (for messages): "--mesh", "`mesh use`", ….
    pub chosen_by: Option<String>,
}

/// An unknown or ambiguous target, with what the user may have meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Miss {
    pub message: String,
    pub hint: Option<String>,
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no mesh named {0:?}; see `mesh meshes`")]
    UnknownMesh(String),
    #[error("not in any mesh yet; create one with `mesh create` or join with `mesh join`")]
    NoMeshes,
    #[error("{}", .0.message)]
    Unknown(Miss),
    #[error("{}", .0.message)]
    Ambiguous(Miss),
    #[error("the roster entry for {0} is not signed by its key; refusing to encrypt to it")]
    BadBinding(String),
    #[error("reading the roster: {0}")]
    Db(String),
}

impl From<rusqlite::Error> for ResolveError {
    fn from(e: rusqlite::Error) -> Self {
        ResolveError::Db(e.to_string())
    }
}

const CONTEXT_HINT: &str =
    "pass --mesh NAME, set MESH_CONTEXT=NAME for this shell, or choose a default with `mesh use NAME`";

fn mesh_names(meshes: &[MeshRow]) -> String {
    meshes.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Resolves what a user typed (`name`, key, key prefix, `@group`, `*`) to a wire target in one mesh,
/// for a message from `me`.
pub fn resolve(conn: &Connection, to: &str, scope: &Scope, me: &PublicKey) -> Result<Resolved, ResolveError> {
    if scope.meshes.is_empty() {
        return Err(ResolveError::NoMeshes);
    }
    if to == "*" || to.starts_with('@') {
        return resolve_fanout(conn, to, scope, me);
    }
    let ids: Vec<String> = scope.meshes.iter().map(|m| m.id.to_string()).collect();
    let rows = rows_in(conn, &ids)?;
    let wanted = names::normalize(to);
    let lower = to.to_ascii_lowercase();
    let is_hex = !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_hexdigit());
    let by_key: Vec<&PeerRow> = if is_hex && lower.len() == 64 {
        rows.iter().filter(|r| r.peer.key.to_string() == lower).collect()
    } else {
        vec![]
    };
    let by_name: Vec<&PeerRow> = rows.iter().filter(|r| r.peer.name == wanted).collect();
    let by_prefix: Vec<&PeerRow> = if is_hex && lower.len() >= MIN_PREFIX && lower.len() < 64 {
        rows.iter().filter(|r| r.peer.key.to_string().starts_with(&lower)).collect()
    } else {
        vec![]
    };
    // A full key wins. Otherwise a name and a key prefix count together, so a peer whose name is
    // another's key prefix makes that prefix ambiguous rather than capturing it.
    let matches = if by_key.is_empty() { by_name.into_iter().chain(by_prefix).collect() } else { by_key };
    let mut keys: Vec<PublicKey> = matches.iter().map(|r| r.peer.key).collect();
    keys.sort();
    keys.dedup();
    match keys.len() {
        0 => Err(ResolveError::Unknown(unknown(conn, to, scope, &rows, me)?)),
        1 => {
            let row = pick_mesh_of(&matches, &scope.meshes);
            let mesh = scope.meshes.iter().find(|m| m.id == row.mesh_id).expect("rows come from the scope").clone();
            let peer = row.peer.clone();
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
            let candidates: Vec<Candidate> = matches.iter().map(|r| candidate(r, &scope.meshes)).collect();
            let several_meshes = candidates.iter().any(|c| c.mesh != candidates[0].mesh);
            let listed: Vec<String> = candidates.iter().map(describe).collect();
            let example = &candidates[0].key[..8];
            let mut hint = format!("send to the key prefix shown, e.g. `mesh send {example} …`");
            if several_meshes {
                hint.push_str(", or pass --mesh");
            }
            Err(ResolveError::Ambiguous(Miss {
                message: format!("{to:?} matches {n} peers: {}", listed.join("; ")),
                hint: Some(hint),
                candidates,
            }))
        }
    }
}

fn rows_in(conn: &Connection, mesh_ids: &[String]) -> rusqlite::Result<Vec<PeerRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM peers WHERE mesh_id IN (SELECT value FROM json_each(?1)) ORDER BY mesh_id, key"
    ))?;
    let ids = serde_json::to_string(mesh_ids).expect("ids serialise");
    stmt.query_map([ids], from_row)?.collect()
}

/// One identity found in several meshes: the mesh where it is live (not ended, online, seen last),
/// else the one joined first.
fn pick_mesh_of<'a>(matches: &[&'a PeerRow], meshes: &[MeshRow]) -> &'a PeerRow {
    let joined = |r: &PeerRow| meshes.iter().position(|m| m.id == r.mesh_id).unwrap_or(usize::MAX);
    matches
        .iter()
        .copied()
        .min_by_key(|r| {
            (r.peer.ended_at.is_some(), !r.peer.online, std::cmp::Reverse(r.peer.last_seen.unwrap_or(0)), joined(r))
        })
        .expect("at least one match")
}

fn candidate(r: &PeerRow, meshes: &[MeshRow]) -> Candidate {
    let mesh = meshes.iter().find(|m| m.id == r.mesh_id).map_or_else(|| r.mesh_id.to_string(), |m| m.name.clone());
    Candidate { mesh, name: r.peer.name.clone(), key: r.peer.key.to_string(), kind: r.peer.kind }
}

fn describe(c: &Candidate) -> String {
    format!("{} ({}, {} in mesh {})", c.name, &c.key[..8], c.kind.as_str(), c.mesh)
}

/// An unknown target: where else it is (outside the context) and which names are close.
fn unknown(conn: &Connection, to: &str, scope: &Scope, rows: &[PeerRow], me: &PublicKey) -> Result<Miss, ResolveError> {
    let place = match &scope.chosen_by {
        Some(how) => format!("mesh {} ({how})", scope.meshes[0].name),
        None if scope.meshes.len() == 1 => format!("mesh {}", scope.meshes[0].name),
        None => "any of your meshes".to_owned(),
    };
    let message = format!("no peer {to:?} in {place}");
    // Outside the context: the same target in another mesh.
    if scope.chosen_by.is_some() {
        let all = crate::meshes::list(conn)?;
        let others: Vec<MeshRow> = all.into_iter().filter(|m| m.id != scope.meshes[0].id).collect();
        if !others.is_empty() {
            let wider = Scope { meshes: others, chosen_by: None };
            if let Ok(found) = resolve(conn, to, &wider, me) {
                let hint = format!("{to} is in mesh {}: pass --mesh {}", found.mesh.name, found.mesh.name);
                return Ok(Miss { message, hint: Some(hint), candidates: vec![] });
            }
        }
    }
    let wanted = names::normalize(to).to_lowercase();
    let mut close: Vec<(usize, &PeerRow)> = rows
        .iter()
        .filter(|r| r.peer.key != *me)
        .filter_map(|r| {
            let name = r.peer.name.to_lowercase();
            let distance = strsim::damerau_levenshtein(&wanted, &name);
            let near = distance <= (wanted.chars().count() / 4).max(1)
                || (wanted.chars().count() >= 3 && (name.starts_with(&wanted) || name.contains(&wanted)));
            near.then_some((distance, r))
        })
        .collect();
    close.sort_by_key(|(d, r)| (*d, r.peer.name.clone()));
    let candidates: Vec<Candidate> =
        close.into_iter().take(MAX_CANDIDATES).map(|(_, r)| candidate(r, &scope.meshes)).collect();
    let hint = if candidates.is_empty() {
        "`mesh peers` lists who you can reach; a target is a name, a key, or a key prefix of 4+ hex digits".to_owned()
    } else {
        format!("did you mean {}?", candidates.iter().map(describe).collect::<Vec<_>>().join(", or "))
    };
    Ok(Miss { message, hint: Some(hint), candidates })
}

/// `*` or `@group`: one mesh, and someone there to receive it.
fn resolve_fanout(conn: &Connection, to: &str, scope: &Scope, me: &PublicKey) -> Result<Resolved, ResolveError> {
    let target: Target = to.parse().map_err(|e: mesh_proto::ProtoError| {
        ResolveError::Unknown(Miss { message: e.to_string(), hint: None, candidates: vec![] })
    })?;
    let ids: Vec<String> = scope.meshes.iter().map(|m| m.id.to_string()).collect();
    let rows = rows_in(conn, &ids)?;
    let group = match &target {
        Target::Group(g) => Some(g.as_str()),
        _ => None,
    };
    // Whether a roster says `key` is in the group (None: this roster does not know groups).
    let in_group = |r: &PeerRow, g: &str| r.peer.groups.as_ref().map(|gs| gs.iter().any(|x| x == g));
    let mesh = match (scope.meshes.as_slice(), group) {
        ([only], _) => only.clone(),
        (meshes, Some(g)) => {
            let with: Vec<&MeshRow> = meshes
                .iter()
                .filter(|m| rows.iter().any(|r| r.mesh_id == m.id && in_group(r, g) == Some(true)))
                .collect();
            match with.as_slice() {
                [only] => (*only).clone(),
                [] => {
                    return Err(ResolveError::Unknown(Miss {
                        message: format!("no one is in {to} in any of your meshes ({})", mesh_names(meshes)),
                        hint: Some("`mesh peers` shows who is in which group; `mesh group join NAME` joins one".into()),
                        candidates: vec![],
                    }));
                }
                several => {
                    let names: Vec<MeshRow> = several.iter().map(|m| (*m).clone()).collect();
                    return Err(ResolveError::Ambiguous(Miss {
                        message: format!("{to} exists in {} of your meshes ({})", names.len(), mesh_names(&names)),
                        hint: Some(CONTEXT_HINT.into()),
                        candidates: vec![],
                    }));
                }
            }
        }
        (meshes, None) => {
            return Err(ResolveError::Ambiguous(Miss {
                message: format!(
                    "* could mean everyone in any of your {} meshes ({})",
                    meshes.len(),
                    mesh_names(meshes)
                ),
                hint: Some(CONTEXT_HINT.into()),
                candidates: vec![],
            }));
        }
    };
    // Who would receive it, as far as this roster knows: live peers but the sender.
    let here: Vec<&PeerRow> =
        rows.iter().filter(|r| r.mesh_id == mesh.id && r.peer.key != *me && r.peer.ended_at.is_none()).collect();
    let knows_groups = rows.iter().filter(|r| r.mesh_id == mesh.id).all(|r| r.peer.groups.is_some());
    let nobody = match group {
        None => here.is_empty(),
        Some(g) => knows_groups && !here.iter().any(|r| in_group(r, g) == Some(true)),
    };
    if nobody && !rows.iter().all(|r| r.mesh_id != mesh.id) {
        let (message, hint) = match group {
            None => (
                format!("no one else is in mesh {} to receive it", mesh.name),
                "invite someone with `mesh invite`".to_owned(),
            ),
            Some(_) => (
                format!("no one else is in {to} in mesh {}", mesh.name),
                "`mesh peers` shows who is in which group; they join with `mesh group join NAME`".to_owned(),
            ),
        };
        return Err(ResolveError::Unknown(Miss { message, hint: Some(hint), candidates: vec![] }));
    }
    let kind = if target == Target::All { TargetKind::Broadcast } else { TargetKind::Group };
    let info = TargetInfo { kind, label: to.to_owned(), address: target.to_string(), name: None };
    Ok(Resolved { mesh, target, seal: SealWith::Group, info })
}
