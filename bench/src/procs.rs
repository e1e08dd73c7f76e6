//! The processes a benchmark measures: `mesh broker serve`, `mesh daemon`, `nats-server`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The `mesh` binary: `--mesh-bin`, else `MESH_BIN`, else beside this executable.
pub fn mesh_bin(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match explicit.or_else(|| std::env::var_os("MESH_BIN").map(PathBuf::from)) {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("mesh"),
    };
    if !path.exists() {
        bail!("no mesh binary at {} (build it: cargo build --release -p mesh-cli, or pass --mesh-bin)", path.display());
    }
    Ok(path)
}

/// Peak resident memory (VmHWM) of a process, in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system) the process has used so far, from `/proc/<pid>/stat` (clock ticks of
/// 1/100 s, the Linux default).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some((utime + stime) / 100.0)
}

/// A broker process on a free loopback port with a fresh database; killed on drop.
pub struct Broker {
    child: Child,
    pub url: String,
    /// Where protocol-level peers connect, and how they trust a TLS broker.
    pub endpoint: crate::peer::Endpoint,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start(bin: &Path) -> anyhow::Result<Broker> {
        Broker::start_on(bin, false, None)
    }

    /// With `tls`, the broker serves `wss://` with a self-signed certificate, which peers trust. With
    /// `postgres`, it is a replica on that database; else it has a SQLite file of its own.
    pub fn start_on(bin: &Path, tls: bool, postgres: Option<&str>) -> anyhow::Result<Broker> {
        let dir = tempfile::Builder::new().prefix("mesh-bench-").tempdir_in("/tmp")?;
        let db = match postgres {
            Some(url) => std::ffi::OsString::from(url),
            None => dir.path().join("broker.db").into_os_string(),
        };
        let tls_args: &[&str] = if tls { &["--tls-self-signed", "localhost,127.0.0.1"] } else { &[] };
        let mut child = Command::new(bin)
            .args([
                "broker",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--sends-per-sec",
                "100000000",
                "--send-burst",
                "100000000",
                // Every simulated peer connects from this one address; real ones have their own.
                "--handshakes-per-sec-per-address",
                "1000000",
                "--max-pending-per-address",
                "100000",
            ])
            .args(tls_args)
            .arg("--db")
            .arg(db)
            // A replica keeps its self-signed certificate in its home's data directory.
            .env("MESH_HOME", dir.path())
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting mesh broker serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("ws://") || w.starts_with("wss://"))
            .context("broker ready line")?
            .to_owned();
        let cert_dir = if postgres.is_some() { dir.path().join("data") } else { dir.path().to_owned() };
        let trust = if tls { Some(crate::peer::trusting(&cert_dir.join("broker-tls-cert.pem"))?) } else { None };
        let endpoint = crate::peer::Endpoint { url: url.clone(), tls: trust };
        Ok(Broker { child, url, endpoint, _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a run's brokers keep their state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// One broker with a SQLite file.
    Sqlite,
    /// Replicas on one PostgreSQL database (a server of the run's own, from the distribution's
    /// `initdb`).
    Postgres,
}

impl Store {
    pub fn as_str(self) -> &'static str {
        match self {
            Store::Sqlite => "sqlite",
            Store::Postgres => "postgres",
        }
    }
}

/// How a run's brokers are set up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// `wss://` (self-signed) instead of `ws://`.
    pub tls: bool,
    pub store: Store,
    /// Brokers sharing the store (PostgreSQL only).
    pub replicas: usize,
}

impl Setup {
    pub fn plain() -> Setup {
        Setup { tls: false, store: Store::Sqlite, replicas: 1 }
    }

    pub fn tls() -> Setup {
        Setup { tls: true, ..Setup::plain() }
    }
}

/// The brokers of one run: one on SQLite, or replicas on one fresh PostgreSQL database; stopped on
/// drop.
pub struct Brokers {
    pub all: Vec<Broker>,
    _postgres: Option<mesh_testkit::postgres::Postgres>,
}

impl Brokers {
    pub fn start(bin: &Path, store: Store, replicas: usize, tls: bool) -> anyhow::Result<Brokers> {
        match store {
            Store::Sqlite => {
                if replicas > 1 {
                    bail!("replicas share a PostgreSQL database: --store postgres");
                }
                Ok(Brokers { all: vec![Broker::start_on(bin, tls, None)?], _postgres: None })
            }
            Store::Postgres => {
                let pg = mesh_testkit::postgres::Postgres::start()
                    .context("PostgreSQL's server programs are needed (apt-get install postgresql)")?;
                let url = pg.create_database();
                let all =
                    (0..replicas.max(1)).map(|_| Broker::start_on(bin, tls, Some(&url))).collect::<Result<_, _>>()?;
                Ok(Brokers { all, _postgres: Some(pg) })
            }
        }
    }

    /// Where peers connect: peer `i` of a mesh goes to `endpoints()[i % n]`.
    pub fn endpoints(&self) -> Vec<crate::peer::Endpoint> {
        self.all.iter().map(|b| b.endpoint.clone()).collect()
    }

    /// CPU seconds all brokers have used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.all.iter().map(|b| cpu_seconds(b.pid())).sum()
    }

    /// The largest peak RSS of one broker, in MB.
    pub fn peak_rss_mb(&self) -> Option<f64> {
        self.all.iter().filter_map(|b| peak_rss_mb(b.pid())).reduce(f64::max)
    }
}

/// A daemon on a temporary `MESH_HOME` with its embedded local mesh; stopped on drop.
pub struct Daemon {
    pub bin: PathBuf,
    pub home: tempfile::TempDir,
}

impl Daemon {
    pub fn start(bin: &Path, name: &str) -> anyhow::Result<Daemon> {
        let home = tempfile::Builder::new().prefix("mesh-bench-").tempdir_in("/tmp")?;
        let d = Daemon { bin: bin.to_owned(), home };
        d.run(&["init", "--name", name])?;
        d.run(&["daemon", "up"])?;
        Ok(d)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("MESH_HOME", self.home.path()).env_remove("MESH_SESSION_FILE").stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output()?;
        if !out.status.success() {
            bail!("mesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn paths(&self) -> mesh_ipc::Home {
        mesh_ipc::Home::at(self.home.path())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.command(&["daemon", "down"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// `nats-server -js` with file storage on a free loopback port; killed on drop.
pub struct Nats {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> anyhow::Result<Nats> {
        let dir = tempfile::Builder::new().prefix("mesh-bench-nats-").tempdir_in("/tmp")?;
        let port = free_port()?;
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server (apt-get install nats-server)")?;
        Ok(Nats { child, url: format!("nats://127.0.0.1:{port}"), _dir: dir })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
