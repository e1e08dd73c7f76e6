//! The meshes this member belongs to: id, local name, broker URL, role and group key.

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::MeshInfo;
use mesh_proto::MeshId;
use mesh_proto::crypto::GroupKey;
use mesh_proto::wire::Role;
use rusqlite::{Connection, OptionalExtension, Row, params};

#[derive(Clone, Debug)]
pub struct MeshRow {
    pub id: MeshId,
    pub name: String,
    pub broker_url: String,
    pub role: Role,
    pub group_key: GroupKey,
    pub embedded: bool,
    pub joined_at: u64,
}

impl MeshRow {
    pub fn info(&self) -> MeshInfo {
        MeshInfo {
            id: self.id.to_string(),
            name: self.name.clone(),
            broker: self.broker_url.clone(),
            role: self.role,
            embedded: self.embedded,
            joined_at: self.joined_at,
        }
    }
}

const COLUMNS: &str = "id, name, broker_url, role, group_key, embedded, joined_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<MeshRow> {
    let role: String = r.get(3)?;
    let key: Vec<u8> = r.get(4)?;
    let key: [u8; 32] = key.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Blob, "group key is not 32 bytes".into())
    })?;
    Ok(MeshRow {
        id: parse_col(r.get(0)?)?,
        name: r.get(1)?,
        broker_url: r.get(2)?,
        role: Role::parse(&role).unwrap_or(Role::Member),
        group_key: GroupKey::from_bytes(key),
        embedded: r.get(5)?,
        joined_at: r.get::<_, i64>(6)? as u64,
    })
}

pub fn list(conn: &Connection) -> rusqlite::Result<Vec<MeshRow>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM meshes ORDER BY joined_at, name"))?;
    stmt.query_map([], from_row)?.collect()
}

pub fn get(conn: &Connection, id: &MeshId) -> rusqlite::Result<Option<MeshRow>> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM meshes WHERE id = ?1"), [id.to_string()], from_row).optional()
}

/// A mesh by local name or by id.
pub fn find(conn: &Connection, name_or_id: &str) -> rusqlite::Result<Option<MeshRow>> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM meshes WHERE name = ?1 OR id = ?1"), [name_or_id], from_row)
        .optional()
}

pub fn name_taken(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS (SELECT 1 FROM meshes WHERE name = ?1)", [name], |r| r.get(0))
}

pub fn insert(conn: &Connection, m: &MeshRow) -> rusqlite::Result<()> {
    conn.execute(
        &format!("INSERT INTO meshes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
        params![
            m.id.to_string(),
            m.name,
            m.broker_url,
            m.role.as_str(),
            m.group_key.as_bytes().as_slice(),
            m.embedded,
            m.joined_at as i64
        ],
    )?;
    Ok(())
}

/// A free local name: `wanted`, else `wanted-2`, `wanted-3`, …
pub fn free_name(conn: &Connection, wanted: &str) -> rusqlite::Result<String> {
    if !name_taken(conn, wanted)? {
        return Ok(wanted.to_owned());
    }
    for n in 2.. {
        let candidate = format!("{wanted}-{n}");
        if !name_taken(conn, &candidate)? {
            return Ok(candidate);
        }
    }
    unreachable!("an unbounded range always yields a free name")
}
