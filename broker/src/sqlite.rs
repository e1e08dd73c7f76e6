//! SQLite plumbing shared by the broker's store and the daemon: opening a file with the project's
//! pragmas and permissions, numbered append-only migrations checked against `user_version`, and running
//! blocking calls off the async threads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("opening database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("creating database file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path} is corrupt ({detail}); it was moved aside to {moved_to}")]
    Corrupt { path: PathBuf, detail: String, moved_to: PathBuf },
    #[error("database {path} has schema version {found}, newer than this build knows ({known}); upgrade mesh")]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("migrating database {path} to version {version}")]
    Migrate {
        path: PathBuf,
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("database task failed: {0}")]
    Task(String),
}

/// One SQLite connection shared by the tasks of a process. Calls run on tokio's blocking pool, one at a
/// time; a call is a transaction or a single statement, so they never interleave.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({})", self.path.display())
    }
}

impl Db {
    /// Opens (creating with mode 0600) the database at `path` and applies `migrations` in order:
    /// migration `i` takes the schema from `user_version` `i` to `i + 1`. A file that fails SQLite's
    /// quick check is renamed aside (`<name>.corrupt-<ms>`) and reported, never silently replaced.
    pub fn open(path: &Path, migrations: &[&str]) -> Result<Db, DbError> {
        create_private(path)?;
        let conn = Connection::open(path).map_err(|source| DbError::Open { path: path.to_owned(), source })?;
        let check = conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .and_then(|()| conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)));
        match check {
            Ok(ok) if ok == "ok" => {}
            other => {
                let detail = match other {
                    Ok(msg) => msg,
                    Err(e) => e.to_string(),
                };
                drop(conn);
                return Err(move_aside(path, detail));
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&conn, path, migrations)?;
        Ok(Db { conn: Arc::new(Mutex::new(conn)), path: Arc::new(path.to_owned()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<F, R>(&self, f: F) -> Result<R, DbError>
    where
        F: FnOnce(&mut Connection) -> Result<R, rusqlite::Error> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
        .map_err(DbError::Sqlite)
    }

    /// Runs `f` with the connection on the current thread (for start-up and tests).
    pub fn call_blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, rusqlite::Error>,
    ) -> Result<R, DbError> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard).map_err(DbError::Sqlite)
    }
}

/// Parses a text column into a typed value; stored text that does not parse is a conversion error.
pub fn parse_col<T: std::str::FromStr>(s: String) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    T::from_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("invalid stored value {s:?}: {e}").into(),
        )
    })
}

fn create_private(path: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| DbError::Create { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(err)?;
    Ok(())
}

fn move_aside(path: &Path, detail: String) -> DbError {
    let mut moved_to = path.as_os_str().to_owned();
    moved_to.push(format!(".corrupt-{}", mesh_proto::now_ms()));
    let moved_to = PathBuf::from(moved_to);
    for suffix in ["", "-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let mut to = moved_to.as_os_str().to_owned();
        to.push(suffix);
        let _ = std::fs::rename(&from, &to);
    }
    DbError::Corrupt { path: path.to_owned(), detail, moved_to }
}

fn migrate(conn: &Connection, path: &Path, migrations: &[&str]) -> Result<(), DbError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = migrations.len() as i64;
    if current > known {
        return Err(DbError::TooNew { path: path.to_owned(), found: current, known });
    }
    for (i, sql) in migrations.iter().enumerate().skip(current as usize) {
        let version = i + 1;
        let apply = || -> Result<(), rusqlite::Error> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version as i64)?;
            tx.commit()
        };
        apply().map_err(|source| DbError::Migrate { path: path.to_owned(), version, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let v1 = ["CREATE TABLE a(x INTEGER);"];
        Db::open(&path, &v1).expect("v1");
        let v2 = ["CREATE TABLE a(x INTEGER);", "ALTER TABLE a ADD COLUMN y TEXT;"];
        let db = Db::open(&path, &v2).expect("v2 on top of v1");
        let version: i64 =
            db.call_blocking(|c| c.pragma_query_value(None, "user_version", |r| r.get(0))).expect("version");
        assert_eq!(version, 2);
        assert!(matches!(Db::open(&path, &v1), Err(DbError::TooNew { found: 2, known: 1, .. })));
    }

    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.db");
        Db::open(&path, &[]).expect("opens");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn corrupt_file_is_moved_aside_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        std::fs::write(&path, b"this is not a database, just some bytes that are long enough to look like one....")
            .expect("write");
        let err = Db::open(&path, &[]).expect_err("must refuse");
        let DbError::Corrupt { moved_to, .. } = err else { panic!("unexpected {err}") };
        assert!(moved_to.exists(), "the corrupt file is kept");
        assert!(!path.exists() || std::fs::metadata(&path).expect("stat").len() == 0);
    }
}
