//! Backups of SQLite state, for the broker and the daemon alike: a consistent copy of a database in
//! use (`VACUUM INTO`, a snapshot of one read transaction, so writers go on meanwhile), and the
//! archive the copies travel in — a tar file whose first entry is a manifest naming every other
//! entry with its size and SHA-256, written 0600 under a temporary name and linked into place only
//! when complete (an existing file is never overwritten). Reading one checks everything before the
//! caller replaces anything: the manifest, each file's digest, and each database's integrity and
//! schema version.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The archive's first entry.
pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "mesh-backup";
const FORMAT_VERSION: u32 = 1;
/// A manifest is a few hundred bytes; anything much larger is not one.
const MAX_MANIFEST: u64 = 64 * 1024;

/// What an archive holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// `daemon` or `broker`.
    pub kind: String,
    /// When the copies were taken (ms since the epoch).
    pub created_at: u64,
    /// The mesh version that took it.
    pub mesh_version: String,
    /// For a daemon's backup: the member's identity key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    pub files: Vec<ArchivedFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchivedFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} already exists; name a new file (a backup never overwrites one)")]
    Exists(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("copying the database {db}: {source}")]
    Copy {
        db: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path} is not a mesh backup: {why}")]
    NotABackup { path: PathBuf, why: String },
    #[error("{path} is a backup of a {found}, not of a {expected}")]
    WrongKind { path: PathBuf, found: String, expected: String },
    #[error("{path} is damaged: {why}; nothing was replaced")]
    Damaged { path: PathBuf, why: String },
    #[error("{path} was made by a newer mesh ({why}); upgrade mesh to restore it")]
    Newer { path: PathBuf, why: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// Copies the database `conn` is open on into `to` (which must not exist, or be empty) as of one
/// read transaction: a consistent copy, whatever other connections write meanwhile.
pub fn vacuum_into(conn: &Connection, to: &Path) -> Result<(), BackupError> {
    let db = conn.path().map(PathBuf::from).unwrap_or_default();
    let target = to.to_str().ok_or_else(|| BackupError::Io {
        what: format!("{}", to.display()),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8"),
    })?;
    conn.execute("VACUUM INTO ?1", [target]).map_err(|source| BackupError::Copy { db, source })?;
    Ok(())
}

/// Copies the database file `db`, in use by another connection or process, into `to` (see
/// [`vacuum_into`]). The database is opened read-only: nothing of it changes.
pub fn snapshot(db: &Path, to: &Path) -> Result<(), BackupError> {
    let copy_err = |source| BackupError::Copy { db: db.to_owned(), source };
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(copy_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(copy_err)?;
    vacuum_into(&conn, to)
}

/// The tables a broker's database has, and a daemon's.
pub const BROKER_TABLES: &[&str] = &["queue", "messages", "invite_uses"];
pub const DAEMON_TABLES: &[&str] = &["outbox", "inbox", "mesh_keys"];

/// Whether the database at `db` has every one of `tables` (so is the kind of database they name).
fn has_tables(conn: &Connection, tables: &[&str]) -> rusqlite::Result<bool> {
    for table in tables {
        let found: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )?;
        if !found {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks a database restored from an archive: SQLite's full integrity check, the tables of its kind
/// (`tables`), and a schema version this build knows (`1..=known`). `name` is how the archive calls
/// it.
pub fn check_database(archive: &Path, name: &str, db: &Path, known: usize, tables: &[&str]) -> Result<(), BackupError> {
    let damaged = |why: String| BackupError::Damaged { path: archive.to_owned(), why: format!("{name}: {why}") };
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| damaged(e.to_string()))?;
    let check: String =
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(|e| damaged(e.to_string()))?;
    if check != "ok" {
        return Err(damaged(format!("SQLite's integrity check says {check:?}")));
    }
    let version: i64 =
        conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| damaged(e.to_string()))?;
    if version < 1 || !has_tables(&conn, tables).map_err(|e| damaged(e.to_string()))? {
        return Err(damaged("not the database this archive says it holds".into()));
    }
    if version > known as i64 {
        return Err(BackupError::Newer {
            path: archive.to_owned(),
            why: format!("{name} has schema version {version}; this build knows {known}"),
        });
    }
    Ok(())
}

/// A file to put in an archive: its name there, and where it is now.
pub struct Source<'a> {
    pub name: &'a str,
    pub path: &'a Path,
}

/// Writes the archive `to` (0600; refused when it exists) holding `files`, with a manifest of `kind`
/// (and `member`) listing them with their digests. The archive appears under its name only when it
/// is complete and on disk.
pub fn write_archive(
    to: &Path,
    kind: &str,
    member: Option<String>,
    files: &[Source<'_>],
) -> Result<Manifest, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    check_destination(to)?;
    let mut listed = Vec::with_capacity(files.len());
    for file in files {
        let (bytes, sha256) = digest(file.path)?;
        listed.push(ArchivedFile { name: file.name.to_owned(), bytes, sha256 });
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        kind: kind.to_owned(),
        created_at: mesh_proto::now_ms(),
        mesh_version: env!("CARGO_PKG_VERSION").to_owned(),
        member,
        files: listed,
    };
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(format!(".partial-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| -> Result<(), BackupError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(format!("creating {}", tmp.display())))?;
        let mut tar = tar::Builder::new(io::BufWriter::new(file));
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        append(&mut tar, MANIFEST, json.len() as u64, json.as_slice(), &tmp)?;
        for (file, listed) in files.iter().zip(&manifest.files) {
            let reader = std::fs::File::open(file.path).map_err(io_err(format!("reading {}", file.path.display())))?;
            // The size recorded is the size read: a file that changed since would fail the digest.
            append(&mut tar, file.name, listed.bytes, reader.take(listed.bytes), &tmp)?;
        }
        let buffered = tar.into_inner().map_err(io_err(format!("writing {}", tmp.display())))?;
        let file = buffered
            .into_inner()
            .map_err(|e| BackupError::Io { what: format!("writing {}", tmp.display()), source: e.into_error() })?;
        file.sync_all().map_err(io_err(format!("writing {}", tmp.display())))?;
        // A hard link never replaces an existing file: a backup made meanwhile under the same name
        // is kept, and this one is refused.
        std::fs::hard_link(&tmp, to).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => BackupError::Exists(to.to_owned()),
            _ => BackupError::Io { what: format!("creating {}", to.display()), source: e },
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    written?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The new name on disk too.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(manifest)
}

/// Refuses a destination an archive cannot be written to: a directory, a file (or link) that exists
/// (a backup never overwrites one), or a path whose directory does not exist (rather than naming a
/// temporary file in it). Checked before any copy is taken, and again when the archive is written.
pub fn check_destination(to: &Path) -> Result<(), BackupError> {
    if to.is_dir() {
        return Err(BackupError::Io {
            what: format!("{}", to.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "is a directory; name a file in it"),
        });
    }
    if to.symlink_metadata().is_ok() {
        return Err(BackupError::Exists(to.to_owned()));
    }
    let parent = to.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(BackupError::Io {
            what: format!("{}", to.display()),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!("the directory {} does not exist", parent.display()),
            ),
        });
    }
    Ok(())
}

fn append<W: Write, R: Read>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: R,
    archive: &Path,
) -> Result<(), BackupError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(mesh_proto::now_ms() / 1000);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append_data(&mut header, name, data).map_err(io_err(format!("writing {}", archive.display())))
}

fn digest(path: &Path) -> Result<(u64, String), BackupError> {
    let mut file = std::fs::File::open(path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut file, &mut hasher).map_err(io_err(format!("reading {}", path.display())))?;
    Ok((bytes, format!("{:x}", hasher.finalize())))
}

/// Reads the archive `from` into the directory `into` (which must exist, private and empty): a
/// `kind` backup, each file one of `allowed`, listed once in the manifest, of the size and digest
/// listed. Returns the manifest; the files are at `into/<name>`.
pub fn read_archive(from: &Path, kind: &str, into: &Path, allowed: &[&str]) -> Result<Manifest, BackupError> {
    let not_backup = |why: String| BackupError::NotABackup { path: from.to_owned(), why };
    let damaged = |why: String| BackupError::Damaged { path: from.to_owned(), why };
    let file = std::fs::File::open(from).map_err(io_err(format!("opening {}", from.display())))?;
    if !file.metadata().map_err(io_err(format!("reading {}", from.display())))?.is_file() {
        return Err(not_backup("not a regular file".into()));
    }
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut entries = archive.entries().map_err(|_| not_backup("it is not a tar archive".into()))?;
    let manifest: Manifest = {
        let mut first = match entries.next() {
            Some(Ok(entry)) => entry,
            Some(Err(_)) => return Err(not_backup("it is not a tar archive".into())),
            None => return Err(not_backup("it is empty".into())),
        };
        let name = first.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        if name != MANIFEST || first.size() > MAX_MANIFEST {
            return Err(not_backup(format!("its first entry is {name:?}, not a manifest")));
        }
        let mut json = Vec::new();
        first.read_to_end(&mut json).map_err(|e| damaged(e.to_string()))?;
        serde_json::from_slice(&json).map_err(|e| not_backup(format!("its manifest does not read: {e}")))?
    };
    if manifest.format != FORMAT {
        return Err(not_backup(format!("its manifest is of format {:?}", manifest.format)));
    }
    if manifest.version > FORMAT_VERSION {
        return Err(BackupError::Newer {
            path: from.to_owned(),
            why: format!("archive format {}; this build reads {FORMAT_VERSION}", manifest.version),
        });
    }
    if manifest.kind != kind {
        return Err(BackupError::WrongKind {
            path: from.to_owned(),
            found: manifest.kind.clone(),
            expected: kind.to_owned(),
        });
    }
    let mut seen: Vec<&str> = Vec::new();
    for listed in &manifest.files {
        if !allowed.contains(&listed.name.as_str()) || seen.contains(&listed.name.as_str()) {
            return Err(not_backup(format!("its manifest lists {:?}, which no {kind} backup holds", listed.name)));
        }
        seen.push(&listed.name);
    }
    let mut found: Vec<String> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(e.to_string()))?;
        let name = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(listed) = manifest.files.iter().find(|f| f.name == name) else {
            return Err(not_backup(format!("it holds {name:?}, which its manifest does not list")));
        };
        if !entry.header().entry_type().is_file() || found.contains(&name) {
            return Err(not_backup(format!("{name:?} is not one regular file")));
        }
        if entry.size() != listed.bytes {
            return Err(damaged(format!("{name} holds {} bytes, its manifest says {}", entry.size(), listed.bytes)));
        }
        // `name` is one of `allowed`: a plain file name, never a path out of `into`.
        let to = into.join(&name);
        let mut out = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&to)
                .map_err(io_err(format!("creating {}", to.display())))?
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(|e| damaged(format!("{name}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(format!("writing {}", to.display())))?;
            copied += n as u64;
        }
        out.sync_all().map_err(io_err(format!("writing {}", to.display())))?;
        if copied != listed.bytes || format!("{:x}", hasher.finalize()) != listed.sha256 {
            return Err(damaged(format!("{name} does not match its digest")));
        }
        found.push(name);
    }
    if let Some(missing) = manifest.files.iter().find(|f| !found.contains(&f.name)) {
        return Err(damaged(format!("{} is missing (cut short?)", missing.name)));
    }
    Ok(manifest)
}

/// A private directory for a restore's or a backup's files, under `parent`, removed when dropped.
pub fn work_dir(parent: &Path, what: &str) -> Result<tempfile::TempDir, BackupError> {
    tempfile::Builder::new()
        .prefix(&format!(".{what}-"))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(io_err(format!("creating a directory in {}", parent.display())))
}

/// Moves `path` (and its `-wal` and `-shm` files) into `dir`, if it exists (an empty file, as a
/// lock leaves behind, is just removed). Whether anything moved.
pub fn move_into(path: &Path, dir: &Path) -> Result<bool, BackupError> {
    let mut moved = false;
    for suffix in ["", "-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let from = PathBuf::from(from);
        match from.symlink_metadata() {
            Err(_) => continue,
            Ok(meta) if meta.is_file() && meta.len() == 0 => {
                std::fs::remove_file(&from).map_err(io_err(format!("removing {}", from.display())))?;
                continue;
            }
            Ok(_) => {}
        }
        let name = from.file_name().map(|n| n.to_owned()).unwrap_or_default();
        let to = dir.join(name);
        std::fs::rename(&from, &to).map_err(io_err(format!("moving {} to {}", from.display(), to.display())))?;
        moved = true;
    }
    Ok(moved)
}

/// A broker's backup: its database and, when there is one beside it, its self-signed certificate
/// and key (so that a restored broker keeps the pin its meshes verify it by).
pub const BROKER_KIND: &str = "broker";
const BROKER_DB: &str = "broker.db";
const BROKER_FILES: [&str; 3] = [BROKER_DB, crate::tls::SELF_SIGNED_CERT, crate::tls::SELF_SIGNED_KEY];

/// Writes a backup of the broker database `db` (in use or not) to `to`, with the self-signed
/// certificate pair kept in `files_dir` when there is one.
pub fn take_broker(db: &Path, files_dir: &Path, to: &Path) -> Result<Manifest, BackupError> {
    if !db.is_file() || std::fs::metadata(db).map(|m| m.len()).unwrap_or(0) == 0 {
        return Err(BackupError::Io {
            what: format!("{}", db.display()),
            source: io::Error::new(io::ErrorKind::NotFound, "no broker database here"),
        });
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|source| BackupError::Copy { db: db.to_owned(), source })?;
    let is_broker =
        has_tables(&conn, BROKER_TABLES).map_err(|source| BackupError::Copy { db: db.to_owned(), source })?;
    drop(conn);
    if !is_broker {
        return Err(BackupError::Io {
            what: format!("{}", db.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a broker's database"),
        });
    }
    check_destination(to)?;
    let parent = to.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let work = work_dir(parent, "mesh-backup")?;
    let copy = work.path().join(BROKER_DB);
    snapshot(db, &copy)?;
    let (cert, key) = (files_dir.join(crate::tls::SELF_SIGNED_CERT), files_dir.join(crate::tls::SELF_SIGNED_KEY));
    let mut files = vec![Source { name: BROKER_DB, path: &copy }];
    if cert.is_file() && key.is_file() {
        files.push(Source { name: crate::tls::SELF_SIGNED_CERT, path: &cert });
        files.push(Source { name: crate::tls::SELF_SIGNED_KEY, path: &key });
    }
    write_archive(to, BROKER_KIND, None, &files)
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("a broker is serving {0} (its lock is held); stop it first")]
    Running(PathBuf),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Db(crate::sqlite::DbError),
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// Where the files it replaced were moved (`None` when there were none).
    pub replaced: Option<PathBuf>,
}

/// Restores the broker backup `from` as the database `db` (and its certificate pair into
/// `files_dir`, when the backup has one), with no broker serving `db`.
pub fn restore_broker(db: &Path, files_dir: &Path, from: &Path) -> Result<Restored, RestoreError> {
    let existed = db.symlink_metadata().is_ok();
    let restored = restore_broker_locked(db, files_dir, from);
    if restored.is_err() && !existed && std::fs::metadata(db).is_ok_and(|m| m.len() == 0) {
        // Only the lock made it: a failed restore leaves nothing behind.
        let _ = std::fs::remove_file(db);
    }
    restored
}

fn restore_broker_locked(db: &Path, files_dir: &Path, from: &Path) -> Result<Restored, RestoreError> {
    // Held for the whole swap: a broker cannot start on half-restored files.
    let _lock = crate::sqlite::lock_exclusive(db).map_err(|e| match e {
        crate::sqlite::DbError::InUse { path, .. } => RestoreError::Running(path),
        other => RestoreError::Db(other),
    })?;
    // What is there now must be a broker's database (or nothing): never a daemon's, or anything else.
    if std::fs::metadata(db).is_ok_and(|m| m.len() > 0) {
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX);
        let is_broker = conn.ok().and_then(|c| has_tables(&c, BROKER_TABLES).ok()).unwrap_or(false);
        if !is_broker {
            return Err(BackupError::Io {
                what: format!("{}", db.display()),
                source: io::Error::new(io::ErrorKind::InvalidInput, "is not a broker's database; nothing was replaced"),
            }
            .into());
        }
    }
    let dir = db.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let work = work_dir(dir, "mesh-restore")?;
    let manifest = read_archive(from, BROKER_KIND, work.path(), &BROKER_FILES)?;
    let has = |name: &str| manifest.files.iter().any(|f| f.name == name);
    if !has(BROKER_DB) {
        return Err(BackupError::Damaged { path: from.to_owned(), why: "it holds no broker.db".into() }.into());
    }
    check_database(from, BROKER_DB, &work.path().join(BROKER_DB), crate::store::sqlite::SCHEMA_VERSION, BROKER_TABLES)?;
    let with_tls = has(crate::tls::SELF_SIGNED_CERT) && has(crate::tls::SELF_SIGNED_KEY);
    if with_tls {
        let (cert, key) =
            (work.path().join(crate::tls::SELF_SIGNED_CERT), work.path().join(crate::tls::SELF_SIGNED_KEY));
        crate::tls::ServerTls::from_files(&cert, &key)
            .map_err(|e| BackupError::Damaged { path: from.to_owned(), why: format!("its certificate pair: {e}") })?;
    }
    let db_name = db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| BROKER_DB.into());
    let aside = dir.join(format!("{db_name}.replaced-{}", mesh_proto::now_ms()));
    let mut places = vec![(BROKER_DB, db.to_owned())];
    if with_tls {
        places.push((crate::tls::SELF_SIGNED_CERT, files_dir.join(crate::tls::SELF_SIGNED_CERT)));
        places.push((crate::tls::SELF_SIGNED_KEY, files_dir.join(crate::tls::SELF_SIGNED_KEY)));
    }
    let out: Vec<PathBuf> = places.iter().map(|(_, p)| p.clone()).collect();
    let replaced = put_in_place(work.path(), &places, &out, &aside)?;
    Ok(Restored { manifest, replaced })
}

/// The last step of a restore, once everything is checked: the files at `out` (and their `-wal` and
/// `-shm`) move into the new private directory `aside`, then each `(name, place)` file read into
/// `work` takes its place. Returns `aside`, or `None` (and no directory) when nothing was there.
pub fn put_in_place(
    work: &Path,
    places: &[(&str, PathBuf)],
    out: &[PathBuf],
    aside: &Path,
) -> Result<Option<PathBuf>, BackupError> {
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(aside)
            .map_err(io_err(format!("creating {}", aside.display())))?;
    }
    let mut moved = false;
    for path in out {
        moved |= move_into(path, aside)?;
    }
    for (name, to) in places {
        let from = work.join(name);
        std::fs::rename(&from, to).map_err(io_err(format!("moving {} to {}", from.display(), to.display())))?;
    }
    if !moved {
        let _ = std::fs::remove_dir(aside);
    }
    Ok(moved.then(|| aside.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(path: &Path, rows: i64) {
        let conn = Connection::open(path).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
        conn.execute_batch("CREATE TABLE t(x INTEGER); PRAGMA user_version = 3;").expect("schema");
        for i in 0..rows {
            conn.execute("INSERT INTO t VALUES (?1)", [i]).expect("row");
        }
    }

    #[test]
    fn an_archive_round_trips_and_every_damage_is_refused_before_anything_is_written_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("live.db");
        database(&db, 100);
        let copy = dir.path().join("copy.db");
        snapshot(&db, &copy).expect("snapshot");
        let note = dir.path().join("note.json");
        std::fs::write(&note, b"{\"k\":1}").expect("note");
        let archive = dir.path().join("backup.tar");
        let files = [Source { name: "a.db", path: &copy }, Source { name: "note.json", path: &note }];
        write_archive(&archive, "broker", None, &files).expect("archive");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&archive).expect("stat").permissions().mode() & 0o777, 0o600);
        assert!(matches!(write_archive(&archive, "broker", None, &files), Err(BackupError::Exists(_))));

        let out = work_dir(dir.path(), "restore").expect("dir");
        let manifest = read_archive(&archive, "broker", out.path(), &["a.db", "note.json"]).expect("read");
        assert_eq!(manifest.files.len(), 2);
        check_database(&archive, "a.db", &out.path().join("a.db"), 3, &["t"]).expect("checks");
        let rows: i64 = Connection::open(out.path().join("a.db"))
            .expect("open")
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 100);
        assert!(matches!(
            check_database(&archive, "a.db", &out.path().join("a.db"), 2, &["t"]),
            Err(BackupError::Newer { .. })
        ));
        assert!(matches!(
            check_database(&archive, "a.db", &out.path().join("a.db"), 3, &["outbox"]),
            Err(BackupError::Damaged { .. })
        ));

        let fresh = || work_dir(dir.path(), "restore").expect("dir");
        assert!(matches!(
            read_archive(&archive, "daemon", fresh().path(), &["a.db", "note.json"]),
            Err(BackupError::WrongKind { .. })
        ));
        assert!(matches!(
            read_archive(&archive, "broker", fresh().path(), &["a.db"]),
            Err(BackupError::NotABackup { .. })
        ));
        // One byte changed in the middle of the copy: the digest says so.
        let mut bytes = std::fs::read(&archive).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        let flipped = dir.path().join("flipped.tar");
        std::fs::write(&flipped, &bytes).expect("write");
        assert!(read_archive(&flipped, "broker", fresh().path(), &["a.db", "note.json"]).is_err());
        // Cut short.
        let cut = dir.path().join("cut.tar");
        std::fs::write(&cut, &std::fs::read(&archive).expect("read")[..4096]).expect("write");
        assert!(read_archive(&cut, "broker", fresh().path(), &["a.db", "note.json"]).is_err());
        // Not an archive at all.
        assert!(matches!(
            read_archive(&note, "broker", fresh().path(), &["a.db"]),
            Err(BackupError::NotABackup { .. })
        ));
    }
}
