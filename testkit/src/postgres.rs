//! A real PostgreSQL server for tests: started with the distribution's `initdb` and `pg_ctl` in a
//! temporary directory (listening on a Unix socket there only, so tests never collide on a port),
//! or the server `MESH_TEST_POSTGRES_URL` names. Each test takes a fresh database of its own.
//!
//! Without either, [`database`] says plainly that the test is skipped, and returns `None`; under CI
//! (`CI` set) it fails the test instead. The shared server of a test binary is stopped, and its
//! directory removed, when the binary exits: a watcher process waits on a pipe only this process
//! holds, and stops the server once the pipe closes, however the process ended.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A server of the tests' own, or the one `MESH_TEST_POSTGRES_URL` names.
pub struct Postgres {
    bin: PathBuf,
    /// The directory holding the data and the socket (a server of our own).
    dir: Option<PathBuf>,
    /// For a server named by `MESH_TEST_POSTGRES_URL`: that address.
    url: Option<String>,
    /// Runs the server's programs as the user owning its files (PostgreSQL refuses root).
    owner: Option<(u32, u32)>,
    /// Kept open for the life of the process; its closing stops the server.
    _watcher: Option<(Child, ChildStdin)>,
}

static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The address of a new, empty database on the tests' server (started on first use), or `None`
/// when there is no PostgreSQL here (the test says it is skipped; under CI it fails instead).
pub fn database() -> Option<String> {
    SHARED.get_or_init(Postgres::shared).as_ref().map(Postgres::create_database)
}

/// The directory of the PostgreSQL server programs: `pg_config --bindir`, else the newest under
/// `/usr/lib/postgresql`.
pub fn bindir() -> Option<PathBuf> {
    let from_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let has_server = |d: &PathBuf| d.join("initdb").exists() && d.join("pg_ctl").exists();
    if let Some(dir) = from_config.filter(has_server) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// The rows `sql` returns from the database at `url`, one line each, columns separated by `|` (psql's
/// unaligned output): for tests that look at what the brokers stored.
pub fn query(url: &str, sql: &str) -> String {
    let bin = bindir().expect("PostgreSQL's programs (psql)");
    let out = Command::new(bin.join("psql"))
        .arg(url)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .expect("running psql");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Postgres {
    fn shared() -> Option<Postgres> {
        if let Ok(url) = std::env::var("MESH_TEST_POSTGRES_URL") {
            let bin = bindir_or_skip("createdb, to make each test a database on MESH_TEST_POSTGRES_URL")?;
            return Some(Postgres { bin, dir: None, url: Some(url), owner: None, _watcher: None });
        }
        let bin = bindir_or_skip("initdb and pg_ctl")?;
        let server = Postgres::start_in(bin, true);
        Some(server)
    }

    /// Starts a server of its own (stopped when dropped), or `None` when there is no PostgreSQL
    /// here (said; a failure under CI).
    pub fn start() -> Option<Postgres> {
        Some(Postgres::start_in(bindir_or_skip("initdb and pg_ctl")?, false))
    }

    fn start_in(bin: PathBuf, watched: bool) -> Postgres {
        let dir = tempfile::Builder::new().prefix("mesh-pg-").tempdir_in("/tmp").expect("temporary directory").keep();
        let owner = server_owner();
        if let Some((uid, gid)) = owner {
            nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into())).expect("giving the server its directory");
        }
        let mut server = Postgres { bin, dir: Some(dir.clone()), url: None, owner, _watcher: None };
        let data = dir.join("data");
        server.run_as_owner(
            server.tool("initdb").arg("-D").arg(&data).args([
                "-U",
                "mesh",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]),
            "initdb",
        );
        if watched {
            server._watcher = Some(server.watch());
        }
        server.start_server();
        server
    }

    /// Starts the server on its data directory (after [`Postgres::stop`]).
    pub fn start_server(&self) {
        let dir = self.dir.as_ref().expect("a server of the tests' own");
        // Unix socket only, in the directory; fsync off (nothing here outlives the machine staying
        // up), but commits wait for their WAL as in production.
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=off -c max_connections=400 -c shared_buffers=64MB",
            dir.display()
        );
        self.run_as_owner(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(dir.join("data"))
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"]),
            "pg_ctl start",
        );
    }

    /// Stops the server: `fast` lets it finish cleanly, else it is killed (`immediate`) and recovers
    /// from its WAL at the next start.
    pub fn stop(&self, fast: bool) {
        let dir = self.dir.as_ref().expect("a server of the tests' own");
        let mode = if fast { "fast" } else { "immediate" };
        self.run_as_owner(
            self.tool("pg_ctl").arg("-D").arg(dir.join("data")).args(["-w", "-m", mode, "stop"]),
            "pg_ctl stop",
        );
    }

    /// A new, empty database; its address.
    pub fn create_database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let mut createdb = self.tool("createdb");
        match (&self.url, &self.dir) {
            (Some(url), _) => createdb.arg(format!("--maintenance-db={url}")),
            (None, Some(dir)) => createdb.arg("-h").arg(dir).args(["-U", "mesh"]),
            (None, None) => unreachable!("a server has an address or a directory"),
        };
        let out = createdb.arg(&name).output().expect("running createdb");
        assert!(out.status.success(), "createdb {name}: {}", String::from_utf8_lossy(&out.stderr));
        match (&self.url, &self.dir) {
            (Some(url), _) => with_database(url, &name),
            (_, Some(dir)) => format!("postgres://mesh@/{name}?host={}", dir.display()),
            (None, None) => unreachable!("a server has an address or a directory"),
        }
    }

    /// The server's log (a server of the tests' own).
    pub fn log(&self) -> String {
        self.dir.as_ref().and_then(|d| std::fs::read_to_string(d.join("server.log")).ok()).unwrap_or_default()
    }

    fn tool(&self, name: &str) -> Command {
        Command::new(self.bin.join(name))
    }

    fn run_as_owner(&self, cmd: &mut Command, what: &str) {
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// A process that stops the server and removes its directory once its stdin closes.
    fn watch(&self) -> (Child, ChildStdin) {
        let dir = self.dir.as_ref().expect("a server of the tests' own");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"cat >/dev/null; "$0" -D "$1/data" -m immediate stop >/dev/null 2>&1; rm -rf "$1""#,
            &self.bin.join("pg_ctl").to_string_lossy(),
            &dir.to_string_lossy(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("starting the server's watcher");
        let stdin = child.stdin.take().expect("watcher stdin");
        (child, stdin)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self._watcher.is_some() {
            return;
        }
        if let Some(dir) = self.dir.take() {
            let mut stop = self.tool("pg_ctl");
            stop.arg("-D").arg(dir.join("data")).args(["-w", "-m", "immediate", "stop"]);
            if let Some((uid, gid)) = self.owner {
                stop.uid(uid).gid(gid);
            }
            let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The programs' directory, or `None` after saying the test is skipped (a failure under CI).
fn bindir_or_skip(needed: &str) -> Option<PathBuf> {
    if let Some(dir) = bindir() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!("PostgreSQL ({needed}) is required under CI: install the `postgresql` package");
    }
    eprintln!(
        "skipped: PostgreSQL not found ({needed}; install the `postgresql` package, or set \
         MESH_TEST_POSTGRES_URL to a server where this user may create databases); this test did not run"
    );
    None
}

/// Who runs the server: this user, unless it is root (PostgreSQL refuses root): then `postgres`,
/// else `nobody`.
fn server_owner() -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .or_else(|| nix::unistd::User::from_name("nobody").ok().flatten())
        .expect("a user other than root to run PostgreSQL (postgres or nobody)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_replaces_the_one_in_the_address() {
        assert_eq!(
            super::with_database("postgres://u:p@h:5/db?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(super::with_database("postgres://u@h", "t1"), "postgres://u@h/t1");
    }
}
