//! SQLite plumbing shared by the broker's store and the daemon: opening a file with the project's
//! pragmas and permissions, numbered append-only migrations checked against `user_version`, running
//! blocking calls off the async threads, and group commit ([`Db::batch`]): concurrent writers share one
//! transaction, each in its own savepoint.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::thread::JoinHandle;

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
    #[error("database {path} is in use by another process (its lock {lock} is held); one process per database")]
    InUse { path: PathBuf, lock: PathBuf },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("database task failed: {0}")]
    Task(String),
}

/// One SQLite connection shared by the tasks of a process. Calls run on tokio's blocking pool, one at a
/// time; a call is a transaction or a single statement, so they never interleave.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    batcher: OnceLock<Batcher>,
    observer: Arc<OnceLock<CommitObserver>>,
}

/// Told the size and duration of every group commit (for metrics).
pub type CommitObserver = Arc<dyn Fn(usize, std::time::Duration) + Send + Sync>;

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({})", self.inner.path.display())
    }
}

/// Most jobs one shared transaction takes: bounds the latency a job adds to the others of its batch.
const MAX_BATCH: usize = 512;

/// How one run of a job went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// Keep its changes.
    Done,
    /// A domain refusal: nothing to keep.
    Refused,
    /// A SQLite error or a panic: its changes, if any, must be undone.
    Failed,
}

/// A write waiting for the batch thread. It may run twice: once in the shared transaction, and again
/// in its own savepoint if another job of the batch failed and the batch was run again.
trait Job: Send {
    fn run(&mut self, conn: &Connection) -> Ran;
    /// Answers the caller with the last run's result, given how the transaction ended.
    fn answer(self: Box<Self>, committed: Result<(), &rusqlite::Error>);
}

struct BatchJob<F, R, E> {
    f: F,
    last: LastRun<Result<Result<R, E>, rusqlite::Error>>,
    reply: tokio::sync::oneshot::Sender<Result<Result<R, E>, DbError>>,
}

enum LastRun<T> {
    /// The transaction could not begin.
    NotRun,
    Panicked,
    Finished(T),
}

impl<F, R, E> Job for BatchJob<F, R, E>
where
    F: FnMut(&Connection) -> Result<Result<R, E>, rusqlite::Error> + Send,
    R: Send,
    E: Send,
{
    fn run(&mut self, conn: &Connection) -> Ran {
        self.last = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.f)(conn))) {
            Ok(result) => LastRun::Finished(result),
            Err(_) => LastRun::Panicked,
        };
        match &self.last {
            LastRun::Finished(Ok(Ok(_))) => Ran::Done,
            LastRun::Finished(Ok(Err(_))) => Ran::Refused,
            _ => Ran::Failed,
        }
    }

    fn answer(self: Box<Self>, committed: Result<(), &rusqlite::Error>) {
        let answer = match (committed, self.last) {
            (_, LastRun::Panicked) => Err(DbError::Task("a database batch job panicked".into())),
            (_, LastRun::Finished(Err(e))) => Err(DbError::Sqlite(e)),
            (Err(e), LastRun::NotRun | LastRun::Finished(Ok(Ok(_)))) => Err(DbError::Sqlite(clone_error(e))),
            (Ok(()), LastRun::NotRun) => Err(DbError::Task("a database batch job was not run".into())),
            (_, LastRun::Finished(Ok(r))) => Ok(r),
        };
        let _ = self.reply.send(answer);
    }
}

/// The thread that runs [`Db::batch`] jobs. Dropped with the last `Db`: the queue closes and the thread
/// finishes what it holds before the connection is closed.
struct Batcher {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Batcher {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// Takes every job waiting (up to [`MAX_BATCH`]) and runs them in one `BEGIN IMMEDIATE` transaction,
/// commits once, then answers them all.
///
/// Fast path: the jobs run one after another with no savepoints (a savepoint copies every page it
/// touches). That is sound as long as every job either succeeds or refuses before writing anything,
/// which is checked (`total_changes`). When a job fails, or refuses after writing, the whole
/// transaction is rolled back and the batch runs again with each job in its own savepoint, so that
/// the failing job is undone alone and the others still commit.
fn batch_loop(
    conn: Arc<Mutex<Connection>>,
    jobs: mpsc::Receiver<Box<dyn Job>>,
    observer: Arc<OnceLock<CommitObserver>>,
) {
    // This thread checkpoints (below), not each commit: a checkpoint inside a commit delays every
    // caller of that batch.
    if let Err(e) = conn.lock().unwrap_or_else(PoisonError::into_inner).pragma_update(None, "wal_autocheckpoint", 0) {
        tracing::warn!(error = %e, "turning off automatic checkpoints; commits will checkpoint");
    }
    let mut commits_since_checkpoint = 0u32;
    let mut last_checkpoint = std::time::Instant::now();
    let mut next = jobs.recv().ok();
    while let Some(first) = next.take() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        let committed = run_batch(&guard, &mut batch);
        drop(guard);
        if let Some(observe) = observer.get() {
            observe(batch.len(), started.elapsed());
        }
        for job in batch {
            job.answer(committed.as_ref().map(|_| ()));
        }
        commits_since_checkpoint += 1;
        next = jobs.try_recv().ok();
        // Checkpoint every so many commits, or when idle a while after the last one. The only writer
        // does it between its own transactions, so it always completes and the log starts over.
        let idle_due = next.is_none() && last_checkpoint.elapsed() >= CHECKPOINT_IDLE_EVERY;
        // (commits_since_checkpoint is at least 1 here: this loop just committed.)
        if commits_since_checkpoint >= CHECKPOINT_AFTER_COMMITS || idle_due {
            let guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) =
                guard.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)").and_then(|mut s| s.query([])?.next().map(drop))
            {
                tracing::warn!(error = %e, "checkpointing the write-ahead log");
            }
            drop(guard);
            commits_since_checkpoint = 0;
            last_checkpoint = std::time::Instant::now();
        }
        if next.is_none() {
            next = jobs.recv().ok();
        }
    }
}

/// Commits after which the batch thread checkpoints, busy or not, so the log stays bounded.
const CHECKPOINT_AFTER_COMMITS: u32 = 256;
/// An idle batch thread checkpoints what was committed since, at most this often.
const CHECKPOINT_IDLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> rusqlite::Result<()> {
    let result = run_batch_in_transaction(conn, batch);
    if result.is_err() && !conn.is_autocommit() {
        // Whatever failed, the connection leaves no transaction open behind it.
        let _ = exec_cached(conn, "ROLLBACK");
    }
    result
}

fn run_batch_in_transaction(conn: &Connection, batch: &mut [Box<dyn Job>]) -> rusqlite::Result<()> {
    exec_cached(conn, "BEGIN IMMEDIATE")?;
    let clean = batch.iter_mut().all(|job| {
        let before = conn.total_changes();
        match job.run(conn) {
            Ran::Done => true,
            Ran::Refused => conn.total_changes() == before,
            Ran::Failed => false,
        }
    });
    if !clean {
        exec_cached(conn, "ROLLBACK")?;
        exec_cached(conn, "BEGIN IMMEDIATE")?;
        for job in batch.iter_mut() {
            exec_cached(conn, "SAVEPOINT job")?;
            if job.run(conn) != Ran::Done {
                exec_cached(conn, "ROLLBACK TO job")?;
            }
            exec_cached(conn, "RELEASE job")?;
        }
    }
    exec_cached(conn, "COMMIT")
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
        // Savepoints (one per write of a group commit) keep their undo pages in memory, not a temp file.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // 16 MiB of page cache (the default is 2 MiB): hot index pages are not read again under load.
        conn.pragma_update(None, "cache_size", -16_384)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(64);
        // Plans never depend on bound values: without this, a statement with a range on a bound
        // value (`lease_until <= ?`) is prepared again whenever the value changes.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        migrate(&conn, path, migrations)?;
        let inner = Inner {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
            batcher: OnceLock::new(),
            observer: Default::default(),
        };
        Ok(Db { inner: Arc::new(inner) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Tells `observer` of every group commit from now on (the first observer set stays).
    pub fn observe_commits(&self, observer: CommitObserver) {
        let _ = self.inner.observer.set(observer);
    }

    /// Runs `f` in a write transaction shared with the other `batch` calls waiting at the same time
    /// (group commit), and answers once that transaction has committed. `Ok(Err(domain))` is a
    /// refusal: `f` must decide it before writing anything (checked; a refusal after writing is
    /// treated as a failure). A SQLite error undoes `f`'s changes alone. `f` may be called twice (see
    /// [`batch_loop`]), so it must not consume what it captures. When the shared commit fails, every
    /// caller of the batch gets that error, so nothing is acknowledged that is not on disk.
    pub async fn batch<F, R, E>(&self, f: F) -> Result<Result<R, E>, DbError>
    where
        F: FnMut(&Connection) -> Result<Result<R, E>, rusqlite::Error> + Send + 'static,
        R: Send + 'static,
        E: Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Box<dyn Job> = Box::new(BatchJob { f, last: LastRun::NotRun, reply });
        let batcher = self.inner.batcher.get_or_init(|| {
            let (jobs, queue) = mpsc::channel();
            let conn = self.inner.conn.clone();
            let thread = std::thread::Builder::new()
                .name("db-batch".into())
                .spawn({
                    let observer = self.inner.observer.clone();
                    move || batch_loop(conn, queue, observer)
                })
                .expect("spawning the database batch thread");
            Batcher { jobs: Some(jobs), thread: Some(thread) }
        });
        let sent = batcher.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(DbError::Task("the database batch thread has stopped".into()));
        }
        rx.await.map_err(|_| DbError::Task("the database batch thread has stopped".into()))?
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<F, R>(&self, f: F) -> Result<R, DbError>
    where
        F: FnOnce(&mut Connection) -> Result<R, rusqlite::Error> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.inner.conn.clone();
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
        let mut guard = self.inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard).map_err(DbError::Sqlite)
    }
}

/// Runs a statement kept prepared in the connection's cache: parsing is a large part of a small write.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// A copy of a SQLite error for each caller of a failed batch (the error type is not `Clone`).
fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => rusqlite::Error::SqliteFailure(*code, msg.clone()),
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
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
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let err = |source| DbError::Create { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Directories it creates are private, like every other directory of mesh's.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(err)?;
    Ok(())
}

/// An exclusive lock on `<path>.lock`, held while the returned file lives (the kernel releases it when
/// the process dies): a database that only one process may serve.
pub fn lock_exclusive(path: &Path) -> Result<std::fs::File, DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    create_private(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock)
        .map_err(|source| DbError::Create { path: lock.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DbError::InUse { path: path.to_owned(), lock }),
        Err(std::fs::TryLockError::Error(source)) => Err(DbError::Create { path: lock, source }),
    }
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

    fn counter_db(dir: &tempfile::TempDir) -> Db {
        Db::open(&dir.path().join("b.db"), &["CREATE TABLE t(x INTEGER PRIMARY KEY);"]).expect("open")
    }

    fn rows(db: &Db) -> Vec<i64> {
        db.call_blocking(|c| c.prepare("SELECT x FROM t ORDER BY x")?.query_map([], |r| r.get(0))?.collect())
            .expect("select")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_keeps_each_job_apart_and_commits_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = counter_db(&dir);
        let jobs = (0..200i64).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                db.batch(move |c| {
                    c.execute("INSERT INTO t(x) VALUES (?1)", [i])?;
                    match i % 10 {
                        // A domain refusal after writing: its row must not survive.
                        3 => Ok(Err("refused")),
                        // A SQLite failure after writing (duplicate key): rolled back, reported.
                        7 => c.execute("INSERT INTO t(x) VALUES (?1)", [i]).map(|_| Ok(())),
                        // A panic after writing: rolled back, the batcher lives on.
                        9 if i == 99 => panic!("job panics"),
                        _ => Ok(Ok(())),
                    }
                })
                .await
            })
        });
        let results: Vec<_> =
            futures_util::future::join_all(jobs).await.into_iter().map(|r| r.expect("task")).collect();
        for (i, r) in results.iter().enumerate() {
            match (i % 10, r) {
                (3, Ok(Err("refused"))) | (7, Err(DbError::Sqlite(_))) => {}
                (9, Err(DbError::Task(_))) if i == 99 => {}
                (_, Ok(Ok(()))) if i % 10 != 3 && i % 10 != 7 && i != 99 => {}
                other => panic!("job {i}: unexpected {other:?}"),
            }
        }
        let expected: Vec<i64> = (0..200).filter(|i| i % 10 != 3 && i % 10 != 7 && *i != 99).collect();
        assert_eq!(rows(&db), expected);
        // Still serving after the panic.
        db.batch(|c| c.execute("INSERT INTO t(x) VALUES (1000)", []).map(|_| Ok::<_, ()>(())))
            .await
            .expect("db")
            .expect("ok");
        assert_eq!(rows(&db).last(), Some(&1000));
    }

    #[tokio::test]
    async fn batched_writes_are_on_disk_once_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = counter_db(&dir);
        db.batch(|c| c.execute("INSERT INTO t(x) VALUES (1)", []).map(|_| Ok::<_, ()>(())))
            .await
            .expect("db")
            .expect("ok");
        // A second connection (another process) sees the row: it is committed, not just in a savepoint.
        let other = Connection::open(dir.path().join("b.db")).expect("open");
        let n: i64 = other.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 1);
    }

    #[test]
    fn plans_do_not_depend_on_bound_values() {
        // Otherwise every statement with a range on a bound value is prepared again on each use.
        let dir = tempfile::tempdir().expect("tempdir");
        let db = counter_db(&dir);
        let qpsg = db.call_blocking(|c| c.db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG));
        assert!(qpsg.expect("db_config"));
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
