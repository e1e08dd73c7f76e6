//! Test-only helpers: temporary homes driven through the real `mesh` binary, brokers as real
//! processes, and polling with a deadline instead of fixed sleeps. Failures print the command, its
//! output and the tail of the daemon's log.

pub mod postgres;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Default deadline for [`eventually`].
pub const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(POLL);
    }
}

fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    // Unix socket paths are short: keep homes near the root.
    tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("creating a temporary directory")
}

/// One user's `MESH_HOME`, with its daemon stopped (or killed) on drop.
pub struct TestHome {
    dir: tempfile::TempDir,
    bin: PathBuf,
    env: Vec<(String, std::ffi::OsString)>,
}

impl TestHome {
    /// `bin` is the `mesh` binary under test (`env!("CARGO_BIN_EXE_mesh")`).
    pub fn new(bin: &str) -> TestHome {
        TestHome { dir: short_tempdir("mesh-"), bin: PathBuf::from(bin), env: Vec::new() }
    }

    /// Every command of this home (and the daemon it starts) runs with `key` set to `value`.
    pub fn with_env(mut self, key: &str, value: impl Into<std::ffi::OsString>) -> TestHome {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn paths(&self) -> mesh_ipc::Home {
        mesh_ipc::Home::at(self.dir.path())
    }

    /// A `mesh` command in this home.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("MESH_HOME", self.dir.path()).env_remove("MESH_SESSION_FILE").stdin(Stdio::null());
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running mesh")
    }

    /// Runs `mesh args…`, failing the test with full context unless it exits 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        if !out.status.success() {
            panic!("{}", self.report(args, &out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `mesh args… --json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("mesh {all:?} printed invalid JSON ({e}):\n{out}"))
    }

    /// Runs a command expected to fail with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        if out.status.code() != Some(code) {
            panic!("expected exit code {code}\n{}", self.report(args, &out));
        }
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn report(&self, args: &[&str], out: &Output) -> String {
        format!(
            "mesh {args:?} (MESH_HOME={}) exited {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- daemon log (tail)\n{}",
            self.dir.path().display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(40)
        )
    }

    /// The last `n` lines of the daemon's logs.
    pub fn log_tail(&self, n: usize) -> String {
        let home = self.paths();
        let mut lines = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&home.log_dir) {
            let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for f in files {
                if let Ok(text) = std::fs::read_to_string(&f) {
                    lines.extend(text.lines().map(str::to_owned));
                }
            }
        }
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }

    /// The pid the daemon wrote into its lock file.
    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.paths().lock_path()).ok()?.trim().parse().ok()
    }

    /// SIGKILLs the daemon and waits until it is gone.
    pub fn kill9_daemon(&self) {
        let pid = self.daemon_pid().expect("a daemon pid in the lock file");
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9 the daemon");
        eventually("the killed daemon to disappear", WAIT, || nix::sys::signal::kill(pid, None).is_err().then_some(()));
    }

    /// Starts `mesh launch --name NAME [--mesh M]` running a command that stays up, and waits until the
    /// session is registered. The session ends when the returned process is killed or dropped.
    pub fn launch(&self, name: &str, mesh: Option<&str>) -> SessionProcess {
        let file_note = self.dir.path().join(format!("launched-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&file_note);
        let mut args = vec!["launch", "--name", name];
        if let Some(m) = mesh {
            args.extend(["--mesh", m]);
        }
        let script = format!("printf '%s' \"$MESH_SESSION_FILE\" > '{}'; exec sleep 600", file_note.display());
        args.extend(["--", "sh", "-c", &script]);
        let mut child = self.cmd(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("mesh launch");
        let token_file = eventually(&format!("session {name} to start"), WAIT, || {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("mesh launch --name {name} exited {status}: {err}\n--- daemon log\n{}", self.log_tail(30));
            }
            std::fs::read_to_string(&file_note).ok().filter(|s| !s.is_empty()).map(PathBuf::from)
        });
        SessionProcess { child, token_file, home: self.dir.path().to_owned(), bin: self.bin.clone() }
    }

    /// Polls `mesh args… --json` until `check` accepts the value.
    pub fn eventually_json(
        &self,
        what: &str,
        args: &[&str],
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.json(args);
            if check(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what}; last `mesh {args:?} --json`:\n{}\n--- daemon log (tail)\n{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for TestHome {
    fn drop(&mut self) {
        let pid = self.daemon_pid();
        let _ = self.cmd(&["daemon", "down"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(pid) = pid {
            // Whatever `down` managed, no daemon outlives its test.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A process running as a session (`mesh launch … -- sleep`).
pub struct SessionProcess {
    child: Child,
    /// The session's `MESH_SESSION_FILE`.
    pub token_file: PathBuf,
    home: PathBuf,
    bin: PathBuf,
}

impl SessionProcess {
    /// A `mesh` command run inside this session.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("MESH_HOME", &self.home).env("MESH_SESSION_FILE", &self.token_file).stdin(Stdio::null());
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("running mesh");
        assert!(
            out.status.success(),
            "mesh {args:?} in a session exited {:?}\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).expect("JSON")
    }

    /// Ends the session's process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SessionProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `mesh broker serve` as a real process on a loopback port.
pub struct BrokerProcess {
    child: Child,
    pub url: String,
    pub port: u16,
    /// `http://ADDR/metrics` when started with `--metrics-listen`.
    pub metrics: Option<String>,
    /// With TLS: the pin of the certificate it serves (`sha256:…`).
    pub tls_pin: Option<String>,
    pub db: PathBuf,
    extra: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    /// Starts a broker on a free port with a fresh database.
    pub fn start(bin: &str) -> BrokerProcess {
        BrokerProcess::start_with(bin, &[])
    }

    /// Like [`BrokerProcess::start`], with more `mesh broker serve` options (kept across restarts).
    pub fn start_with(bin: &str, extra: &[&str]) -> BrokerProcess {
        let dir = short_tempdir("mesh-broker-");
        let db = dir.path().join("broker.db");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let mut b = BrokerProcess::spawn(bin, &db, 0, &extra);
        b._dir = Some(dir);
        b
    }

    /// Starts a replica on a free port serving the PostgreSQL database at `url`.
    pub fn replica(bin: &str, url: &str, extra: &[&str]) -> BrokerProcess {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        BrokerProcess::spawn(bin, Path::new(url), 0, &extra)
    }

    /// Starts a broker on `port` with the database at `db` (to restart one).
    pub fn spawn(bin: &str, db: &Path, port: u16, extra: &[String]) -> BrokerProcess {
        let mut child = Command::new(bin)
            .args(["broker", "serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
            .arg(db)
            .args(extra)
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting mesh broker serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading the broker's ready line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("ws://") || w.starts_with("wss://"))
            .unwrap_or_else(|| panic!("no ws:// URL in the broker's ready line {line:?}"))
            .to_owned();
        let tls_pin = line
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned());
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the broker URL");
        let metrics = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned());
        BrokerProcess { child, url, port, metrics, tls_pin, db: db.to_owned(), extra: extra.to_vec(), _dir: None }
    }

    /// The broker process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker's resident memory now, in bytes (from `/proc`).
    /// How many file descriptors the broker holds (0 where `/proc` cannot tell).
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Whether the broker process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends the broker a signal (SIGHUP: reload its certificate).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).expect("signalling the broker");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills this broker (SIGKILL) and starts a new one on the same port and database.
    pub fn restart(&mut self, bin: &str) {
        self.kill9();
        self.start_again(bin);
    }

    /// Starts a broker again on this one's port and database (after [`BrokerProcess::kill9`]).
    pub fn start_again(&mut self, bin: &str) {
        let dir = self._dir.take();
        let next = BrokerProcess::spawn(bin, &self.db, self.port, &self.extra);
        drop(std::mem::replace(self, next));
        self._dir = dir;
    }

    /// The database's bytes (main file and WAL), to check what the broker stored.
    pub fn stored_bytes(&self) -> Vec<u8> {
        let mut bytes = std::fs::read(&self.db).unwrap_or_default();
        let mut wal = self.db.as_os_str().to_owned();
        wal.push("-wal");
        bytes.extend(std::fs::read(PathBuf::from(wal)).unwrap_or_default());
        bytes
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `haystack` contains `needle` anywhere.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
