//! The meshes this member belongs to: id, local name, broker URL, role and group key.

use mesh_broker::sqlite::parse_col;
use mesh_ipc::api::{MeshInfo, Transport};
use mesh_proto::MeshId;
use mesh_proto::crypto::GroupKey;
use mesh_proto::pin::CertPin;
use mesh_proto::wire::Role;
use rusqlite::{Connection, OptionalExtension, Row, params};

#[derive(Clone, Debug)]
pub struct MeshRow {
    pub id: MeshId,
    pub name: String,
    pub broker_url: String,
    pub role: Role,
    /// The mesh's current key (the one this member seals with), of epoch `key_epoch`.
    pub group_key: GroupKey,
    pub key_epoch: u64,
    pub embedded: bool,
    pub joined_at: u64,
    /// The member's display name in this mesh; `None`: the identity's name.
    pub my_name: Option<String>,
    /// The broker's certificate, for a `wss://` broker verified by pin instead of the platform's roots.
    pub tls_pin: Option<CertPin>,
}

impl MeshRow {
    /// The mesh as the IPC shows it; `me` is the identity's name, for meshes with no name of their own.
    pub fn info(&self, me: &str) -> MeshInfo {
        MeshInfo {
            id: self.id.to_string(),
            name: self.name.clone(),
            broker: self.broker_url.clone(),
            role: self.role,
            embedded: self.embedded,
            transport: self.transport(),
            tls_pin: self.tls_pin.map(|p| p.to_string()),
            joined_at: self.joined_at,
            my_name: self.display_name(me).to_owned(),
            context: false,
            name_was_taken: None,
            key_epoch: self.key_epoch,
        }
    }

    /// How the connection to its broker is protected.
    pub fn transport(&self) -> Transport {
        Transport::of(&self.broker_url, self.tls_pin.is_some(), crate::link::unencrypted(&self.broker_url))
    }

    /// The member's name in this mesh.
    pub fn display_name<'a>(&'a self, me: &'a str) -> &'a str {
        self.my_name.as_deref().unwrap_or(me)
    }
}

const COLUMNS: &str = "id, name, broker_url, role, group_key, embedded, joined_at, my_name, tls_pin, key_epoch";

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
        my_name: r.get(7)?,
        tls_pin: r.get::<_, Option<String>>(8)?.map(parse_col).transpose()?,
        key_epoch: r.get::<_, i64>(9)? as u64,
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

/// Whether a mesh here has this name, or one that looks the same (`team`, `TEAM`, `tеam`, `ΤΕΑΜ`).
pub fn name_taken(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    let keys = mesh_proto::names::name_keys(name);
    let mut stmt = conn.prepare_cached("SELECT name FROM meshes")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    for existing in names {
        if mesh_proto::names::name_keys(&existing?).collides(&keys) {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn insert(conn: &Connection, m: &MeshRow) -> rusqlite::Result<()> {
    conn.execute(
        &format!("INSERT INTO meshes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
        params![
            m.id.to_string(),
            m.name,
            m.broker_url,
            m.role.as_str(),
            m.group_key.as_bytes().as_slice(),
            m.embedded,
            m.joined_at as i64,
            m.my_name,
            m.tls_pin.map(|p| p.to_string()),
            m.key_epoch as i64,
        ],
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO mesh_keys (mesh_id, epoch, key, received_at) VALUES (?1, ?2, ?3, ?4)",
        params![m.id.to_string(), m.key_epoch as i64, m.group_key.as_bytes().as_slice(), m.joined_at as i64],
    )?;
    Ok(())
}

/// Records (or, with `None`, drops) the pin of the broker's certificate for `mesh`.
pub fn set_tls_pin(conn: &Connection, mesh: &MeshId, pin: Option<&CertPin>) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meshes SET tls_pin = ?2 WHERE id = ?1",
        params![mesh.to_string(), pin.map(ToString::to_string)],
    )?;
    Ok(())
}

/// Records the member's display name in `mesh`.
pub fn set_my_name(conn: &Connection, mesh: &MeshId, name: &str) -> rusqlite::Result<()> {
    conn.execute("UPDATE meshes SET my_name = ?2 WHERE id = ?1", params![mesh.to_string(), name])?;
    Ok(())
}

/// The settings key of the mesh context (`mesh use`).
const CONTEXT_SETTING: &str = "context";

/// The mesh context set by `mesh use`, by mesh id.
pub fn context(conn: &Connection) -> rusqlite::Result<Option<MeshId>> {
    Ok(crate::store::get_setting(conn, CONTEXT_SETTING)?.and_then(|id| id.parse().ok()))
}

/// Sets (or, with `None`, clears) the mesh context.
pub fn set_context(conn: &Connection, mesh: Option<&MeshId>) -> rusqlite::Result<()> {
    match mesh {
        Some(m) => crate::store::set_setting(conn, CONTEXT_SETTING, &m.to_string()),
        None => conn.execute("DELETE FROM settings WHERE key = ?1", [CONTEXT_SETTING]).map(drop),
    }
}

/// The mesh a command means when it names one, or the context (docs/addressing.md): `asked` (from
/// `--mesh` or `MESH_CONTEXT`), else the mesh set by `mesh use`; with how it was chosen.
pub fn context_mesh(
    conn: &Connection,
    asked: Option<&str>,
) -> Result<Option<(MeshRow, &'static str)>, crate::roster::ResolveError> {
    if let Some(asked) = asked {
        let row = find(conn, asked)?.ok_or_else(|| crate::roster::ResolveError::UnknownMesh(asked.to_owned()))?;
        return Ok(Some((row, "from --mesh or MESH_CONTEXT")));
    }
    match context(conn)? {
        Some(id) => Ok(get(conn, &id)?.map(|row| (row, "your context, set by `mesh use`"))),
        None => Ok(None),
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_mesh_name_that_looks_like_one_here_is_taken() {
        let (_dir, d) = crate::daemon::for_tests();
        d.db.call_blocking(|c| {
            for alike in ["team", "TEAM", "t\u{0435}am", "\u{03A4}\u{0395}\u{0391}\u{039C}"] {
                assert!(super::name_taken(c, alike)?, "{alike:?} looks like team");
            }
            assert!(!super::name_taken(c, "tram")?);
            assert_eq!(super::free_name(c, "\u{03A4}\u{0395}\u{0391}\u{039C}")?, "\u{03A4}\u{0395}\u{0391}\u{039C}-2");
            Ok(())
        })
        .expect("names");
    }
}
