//! Agent sessions: a process acting as a named identity of its own in one mesh.
//!
//! A session's keys are created on its first launch and kept for the same (mesh, name), so messages
//! queued for it while it was away still decrypt. A launch registers the launching process (pid and
//! start time, so a reused pid is never mistaken for it) and a random token; the token is written to a
//! 0600 file whose path the process gets as `MESH_SESSION_FILE`, and only its SHA-256 is stored. A
//! session is live while that process runs, with no time limit; the reaper ends it when the process is
//! gone. The registry survives daemon restarts. Nothing here ever returns a secret key or a token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mesh_broker::sqlite::parse_col;
use mesh_proto::{Identity, MeshId, PublicKey, codec, crypto};
use rusqlite::{Connection, OptionalExtension, Row, params};
use sha2::Digest;

use crate::process::{self, ProcessId};

/// A session as registered; replaced (not mutated) on each launch and end.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: i64,
    pub mesh_id: MeshId,
    pub name: String,
    pub identity: Identity,
    pub created_at: u64,
    /// The launch that is (or was last) running it.
    pub process: Option<ProcessId>,
    pub launched_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub token_file: Option<PathBuf>,
    token_hash: Option<String>,
}

impl Session {
    pub fn key(&self) -> PublicKey {
        self.identity.key()
    }

    pub fn is_live(&self) -> bool {
        self.token_hash.is_some()
    }
}

pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

const COLUMNS: &str = "id, mesh_id, name, sign_seed, enc_secret, created_at, token_hash, token_file, pid, pid_start, launched_at, ended_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Session> {
    let blob32 = |i: usize| -> rusqlite::Result<[u8; 32]> {
        let v: Vec<u8> = r.get(i)?;
        v.try_into().map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                rusqlite::types::Type::Blob,
                "session key is not 32 bytes".into(),
            )
        })
    };
    let pid: Option<i64> = r.get(8)?;
    let start: Option<String> = r.get(9)?;
    Ok(Session {
        id: r.get(0)?,
        mesh_id: parse_col(r.get(1)?)?,
        name: r.get(2)?,
        identity: Identity::from_secrets(blob32(3)?, blob32(4)?),
        created_at: r.get::<_, i64>(5)? as u64,
        token_hash: r.get(6)?,
        token_file: r.get::<_, Option<String>>(7)?.map(PathBuf::from),
        process: pid.map(|pid| ProcessId { pid: pid as u32, start: start.unwrap_or_default() }),
        launched_at: r.get::<_, Option<i64>>(10)?.map(|t| t as u64),
        ended_at: r.get::<_, Option<i64>>(11)?.map(|t| t as u64),
    })
}

pub fn load_all(conn: &Connection) -> rusqlite::Result<Vec<Session>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM sessions ORDER BY id"))?;
    stmt.query_map([], from_row)?.collect()
}

fn get(conn: &Connection, id: i64) -> rusqlite::Result<Session> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"), [id], from_row)
}

/// Why a launch was refused.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("a session named {name:?} is already running in this mesh (pid {pid}); pick another name")]
    NameTaken { name: String, pid: u32 },
    #[error("writing the session token file {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] mesh_broker::sqlite::DbError),
}

/// A granted launch: the session and the previous launch it replaced, if that one had died unnoticed.
pub struct Launched {
    pub session: Session,
    pub replaced_stale: bool,
}

/// Registers a launch of (mesh, name) by `proc` in one transaction: creates the session's keys on first
/// use, refuses a name held by a live process, writes the token file, records the launch.
pub fn launch(
    conn: &mut Connection,
    sessions_dir: &Path,
    mesh: &MeshId,
    name: &str,
    proc: &ProcessId,
    now: u64,
) -> Result<Launched, LaunchError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let existing: Option<Session> = tx
        .query_row(
            &format!("SELECT {COLUMNS} FROM sessions WHERE mesh_id = ?1 AND name = ?2"),
            params![mesh.to_string(), name],
            from_row,
        )
        .optional()?;
    let mut replaced_stale = false;
    let id = match existing {
        Some(s) => {
            if s.is_live() {
                match &s.process {
                    Some(p) if process::is_alive(p) => {
                        return Err(LaunchError::NameTaken { name: name.to_owned(), pid: p.pid });
                    }
                    _ => replaced_stale = true,
                }
                if let Some(f) = &s.token_file {
                    let _ = std::fs::remove_file(f);
                }
            }
            s.id
        }
        None => {
            let identity = Identity::generate();
            tx.execute(
                "INSERT INTO sessions (mesh_id, name, key, sign_seed, enc_secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    mesh.to_string(),
                    name,
                    identity.key().to_string(),
                    identity.sign_seed().as_slice(),
                    identity.enc_secret().as_slice(),
                    now as i64
                ],
            )?;
            tx.last_insert_rowid()
        }
    };
    let token = codec::b64url(&crypto::random_bytes::<32>());
    let path = sessions_dir.join(format!("session-{id}.token"));
    let file_err = |source| LaunchError::TokenFile { path: path.clone(), source };
    mesh_ipc::paths::create_private_dir(sessions_dir).map_err(file_err)?;
    mesh_ipc::paths::write_private_file(&path, token.as_bytes()).map_err(file_err)?;
    tx.execute(
        "UPDATE sessions SET token_hash = ?2, token_file = ?3, pid = ?4, pid_start = ?5, launched_at = ?6, ended_at = NULL,
             end_synced = 1
         WHERE id = ?1",
        params![id, token_hash(&token), path.display().to_string(), proc.pid, proc.start, now as i64],
    )?;
    let session = get(&tx, id)?;
    tx.commit()?;
    Ok(Launched { session, replaced_stale })
}

/// Ends the launch `launch` describes (its process is gone, or it asked to end) and removes its
/// token. Only that launch: if the session has been launched again since, nothing changes, so a late
/// reaper can never end the new launch.
pub fn end(conn: &Connection, launch: &Session, now: u64) -> rusqlite::Result<Option<Session>> {
    let Some(hash) = &launch.token_hash else { return Ok(None) };
    let changed = conn.execute(
        "UPDATE sessions SET token_hash = NULL, token_file = NULL, ended_at = ?3, end_synced = 0
         WHERE id = ?1 AND token_hash = ?2",
        params![launch.id, hash, now as i64],
    )?;
    if changed == 0 {
        return Ok(None);
    }
    if let Some(f) = &launch.token_file {
        let _ = std::fs::remove_file(f);
    }
    get(conn, launch.id).map(Some)
}

/// The key of session `name` of `mesh`, if it was ever launched here.
pub fn key_of(conn: &Connection, mesh: &MeshId, name: &str) -> rusqlite::Result<Option<PublicKey>> {
    conn.query_row("SELECT key FROM sessions WHERE mesh_id = ?1 AND name = ?2", params![mesh.to_string(), name], |r| {
        parse_col(r.get(0)?)
    })
    .optional()
}

/// Keys of `mesh`'s sessions that ended without the broker being told yet, for the member's link.
pub fn ends_to_sync(conn: &Connection, mesh: &MeshId) -> rusqlite::Result<Vec<PublicKey>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key FROM sessions WHERE mesh_id = ?1 AND ended_at IS NOT NULL AND end_synced = 0 ORDER BY id",
    )?;
    stmt.query_map([mesh.to_string()], |r| parse_col(r.get(0)?))?.collect()
}

/// The broker knows that the session with `key` ended (unless it was launched again since).
pub fn end_synced(conn: &Connection, key: &PublicKey) -> rusqlite::Result<()> {
    conn.execute("UPDATE sessions SET end_synced = 1 WHERE key = ?1 AND ended_at IS NOT NULL", [key.to_string()])?;
    Ok(())
}

/// The in-memory view of the registry: every session by key (their keys open their messages even
/// after they end), and the live ones by token hash.
#[derive(Default)]
pub struct SessionRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<PublicKey, Arc<Session>>,
    live_by_token: HashMap<String, PublicKey>,
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the current state of a session (after load, launch or end).
    pub fn put(&self, s: Session) -> Arc<Session> {
        let s = Arc::new(s);
        let mut inner = self.lock();
        inner.live_by_token.retain(|_, k| *k != s.key());
        if let Some(h) = &s.token_hash {
            inner.live_by_token.insert(h.clone(), s.key());
        }
        inner.by_key.insert(s.key(), s.clone());
        s
    }

    pub fn by_token(&self, token: &str) -> Option<Arc<Session>> {
        let inner = self.lock();
        let key = inner.live_by_token.get(&token_hash(token))?;
        inner.by_key.get(key).cloned()
    }

    pub fn by_key(&self, key: &PublicKey) -> Option<Arc<Session>> {
        self.lock().by_key.get(key).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self.lock().by_key.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn live(&self) -> Vec<Arc<Session>> {
        self.all().into_iter().filter(|s| s.is_live()).collect()
    }

    /// The live session named `name` in `mesh`, if there is one.
    pub fn live_named(&self, mesh: &MeshId, name: &str) -> Option<Arc<Session>> {
        self.lock().by_key.values().find(|s| s.is_live() && s.mesh_id == *mesh && s.name == name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_per_mesh_and_name_and_a_live_name_is_refused() {
        let (dir, db) = crate::store::temp_db();
        let mesh = MeshId::generate();
        let me = process::lookup(std::process::id()).expect("alive");
        let first = db.call_blocking(|c| Ok(launch(c, dir.path(), &mesh, "s1", &me, 1))).expect("db").expect("launch");
        assert!(first.session.is_live());
        let token = std::fs::read_to_string(first.session.token_file.as_ref().expect("file")).expect("token");
        assert_eq!(first.session.token_hash.as_deref(), Some(token_hash(&token).as_str()));

        let again = db.call_blocking(|c| Ok(launch(c, dir.path(), &mesh, "s1", &me, 2))).expect("db");
        assert!(matches!(again, Err(LaunchError::NameTaken { .. })));

        let ended = db.call_blocking(|c| end(c, &first.session, 3)).expect("end").expect("was live");
        assert!(!ended.is_live());
        assert!(!first.session.token_file.as_ref().expect("file").exists(), "token file removed");

        let relaunch =
            db.call_blocking(|c| Ok(launch(c, dir.path(), &mesh, "s1", &me, 4))).expect("db").expect("launch");
        assert_eq!(relaunch.session.key(), first.session.key(), "same (mesh, name), same keys");
        let other = db
            .call_blocking(|c| Ok(launch(c, dir.path(), &MeshId::generate(), "s1", &me, 5)))
            .expect("db")
            .expect("launch");
        assert_ne!(other.session.key(), first.session.key(), "another mesh, another identity");
    }

    #[test]
    fn a_dead_launch_does_not_hold_its_name() {
        let (dir, db) = crate::store::temp_db();
        let mesh = MeshId::generate();
        let ghost = ProcessId { pid: std::process::id(), start: "not-our-start-time".into() };
        db.call_blocking(|c| Ok(launch(c, dir.path(), &mesh, "s", &ghost, 1))).expect("db").expect("launch");
        let me = process::lookup(std::process::id()).expect("alive");
        let stale = db.call_blocking(|c| load_all(c)).expect("load").remove(0);
        let taken = db.call_blocking(|c| Ok(launch(c, dir.path(), &mesh, "s", &me, 2))).expect("db").expect("launch");
        assert!(taken.replaced_stale);
        // A reaper that saw the dead launch ends it late: the new launch is untouched.
        assert!(db.call_blocking(|c| end(c, &stale, 3)).expect("end").is_none());
        assert!(db.call_blocking(|c| load_all(c)).expect("load")[0].is_live());
    }

    #[test]
    fn registry_finds_live_sessions_by_token_only() {
        let (dir, db) = crate::store::temp_db();
        let me = process::lookup(std::process::id()).expect("alive");
        let l =
            db.call_blocking(|c| Ok(launch(c, dir.path(), &MeshId::generate(), "s", &me, 1))).expect("db").expect("ok");
        let token = std::fs::read_to_string(l.session.token_file.as_ref().expect("file")).expect("token");
        let reg = SessionRegistry::default();
        reg.put(l.session.clone());
        assert_eq!(reg.by_token(&token).expect("live").key(), l.session.key());
        assert!(reg.by_token("wrong").is_none());
        let ended = db.call_blocking(|c| end(c, &l.session, 2)).expect("end").expect("live");
        reg.put(ended);
        assert!(reg.by_token(&token).is_none(), "an ended session's token is dead");
        assert!(reg.by_key(&l.session.key()).is_some(), "its key still opens its messages");
    }
}
