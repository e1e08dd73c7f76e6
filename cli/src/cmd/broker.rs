//! `mesh broker serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use mesh_broker::store::postgres::{PgOptions, PgStore, check_address, is_postgres_address, not_a_file, redacted};
use mesh_broker::{BrokerConfig, SqliteStore, Store};
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand, Debug)]
pub enum BrokerCommand {
    /// Serve a broker until SIGINT or SIGTERM
    Serve(Box<ServeArgs>),
    /// Install a user service (systemd or launchd; one per MESH_HOME) running `mesh broker serve`
    /// with the options given after `--`, e.g. `mesh broker install-service -- --listen 0.0.0.0:7777`
    InstallService {
        /// Write the unit file only; do not enable or start it
        #[arg(long)]
        no_start: bool,
        /// Options for `mesh broker serve`
        #[arg(last = true)]
        serve: Vec<String>,
    },
    /// Stop and remove the broker's user service
    UninstallService,
    /// Write a consistent copy of a SQLite broker's database (and its self-signed certificate pair),
    /// while it serves, to a new file. A PostgreSQL broker is backed up with PostgreSQL's own tools
    Backup {
        /// The file to write (refused if it exists)
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// The broker's database, as `mesh broker serve --db` names it
        #[arg(long, value_name = "FILE", env = "MESH_BROKER_DB", hide_env_values = true)]
        db: Option<String>,
    },
    /// Replace a SQLite broker's database with a backup, with the broker stopped; the files replaced
    /// are kept in a directory beside the database
    Restore {
        /// The backup to restore
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The broker's database, as `mesh broker serve --db` names it
        #[arg(long, value_name = "FILE", env = "MESH_BROKER_DB", hide_env_values = true)]
        db: Option<String>,
    },
}

/// The broker's service for this home, serving with `serve` options: a relative `--db` made absolute
/// (the service does not run where this command did), and the create token (from `--create-token` or
/// `MESH_BROKER_CREATE_TOKEN`) moved into the unit's environment, out of the command line.
fn service(serve: Vec<String>) -> anyhow::Result<super::service::Service> {
    let mut args: Vec<String> = ["broker", "serve"].map(str::to_owned).to_vec();
    let mut token = std::env::var(CREATE_TOKEN_ENV).ok().filter(|t| !t.is_empty());
    // A PostgreSQL address may carry a password: it goes to the unit's environment, like the token.
    // `MESH_BROKER_DB` as `serve` reads it: overridden by a `--db`.
    let from_env = std::env::var(DB_ENV).ok().filter(|d| !d.trim().is_empty());
    let mut postgres = from_env.clone().filter(|d| is_postgres_address(d));
    let mut file_given = false;
    let mut words = serve.into_iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--db" => {
                let db = words.next().unwrap_or_default();
                if is_postgres_address(&db) {
                    postgres = Some(db.trim().to_owned());
                } else {
                    refuse_foreign(&db)?;
                    (postgres, file_given) = (None, true);
                    args.extend(["--db".to_owned(), absolute_db(&db)?]);
                }
            }
            w if w.starts_with("--db=") && is_postgres_address(&w["--db=".len()..]) => {
                postgres = Some(w["--db=".len()..].trim().to_owned());
            }
            "--create-token" => token = words.next(),
            "--tls-cert" | "--tls-key" => {
                let file = words.next().unwrap_or_default();
                args.extend([word, absolute_db(&file)?]);
            }
            w if w.starts_with("--db=") => {
                refuse_foreign(&w["--db=".len()..])?;
                (postgres, file_given) = (None, true);
                args.push(format!("--db={}", absolute_db(&w["--db=".len()..])?));
            }
            w if w.starts_with("--tls-cert=") || w.starts_with("--tls-key=") => {
                let (flag, file) = w.split_once('=').unwrap_or((w, ""));
                args.push(format!("{flag}={}", absolute_db(file)?));
            }
            w if w.starts_with("--create-token=") => token = Some(w["--create-token=".len()..].to_owned()),
            _ => args.push(word),
        }
    }
    // A file named by `MESH_BROKER_DB` alone: the service is given it, made absolute.
    if let Some(db) = from_env.filter(|d| postgres.is_none() && !file_given && !is_postgres_address(d)) {
        refuse_foreign(&db)?;
        args.extend(["--db".to_owned(), absolute_db(&db)?]);
    }
    // A PostgreSQL address the broker would refuse at every start is refused now, before a unit is
    // written (never echoing it: it may hold a password).
    if let Some(address) = &postgres {
        check_address(address).map_err(|e| {
            crate::output::fail("usage", format!("--db: {e}"), Some("the service would never start with it".into()))
        })?;
    }
    Ok(super::service::Service {
        kind: "broker",
        description: "mesh broker: store-and-forward relay between mesh daemons",
        args,
        mesh_home: super::service::mesh_home_env()?,
        env: token
            .map(|t| (CREATE_TOKEN_ENV.to_owned(), t))
            .into_iter()
            .chain(postgres.map(|d| (DB_ENV.to_owned(), d)))
            .collect(),
    })
}

const CREATE_TOKEN_ENV: &str = "MESH_BROKER_CREATE_TOKEN";
const DB_ENV: &str = "MESH_BROKER_DB";
/// The database of `mesh broker serve` without `--db`, in mesh's data directory.
const STANDALONE_DB: &str = "standalone-broker.db";

/// A path given to the service, made absolute.
fn absolute_db(db: &str) -> anyhow::Result<String> {
    Ok(super::service::absolute(std::path::Path::new(db))?.display().to_string())
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (use 0.0.0.0:PORT to accept other machines)
    #[arg(long, default_value = "127.0.0.1:7777")]
    pub listen: SocketAddr,
    /// Where to keep the broker's state: a SQLite file (default: standalone-broker.db in mesh's data
    /// directory), or postgres://USER@HOST:PORT/DB, a PostgreSQL database several replicas share
    #[arg(long, value_name = "FILE|URL", env = "MESH_BROKER_DB", hide_env_values = true)]
    pub db: Option<String>,
    /// Connections to PostgreSQL this replica holds at most (2 to 1000; PostgreSQL only)
    #[arg(long, default_value_t = PgOptions::default().pool_size as u64, value_parser = clap::value_parser!(u64).range(2..=1000))]
    pub db_pool: u64,
    /// Require this token to create meshes on this broker
    #[arg(long, env = "MESH_BROKER_CREATE_TOKEN", hide_env_values = true)]
    pub create_token: Option<String>,
    /// Largest frame accepted, in bytes
    #[arg(long, default_value_t = BrokerConfig::default().max_frame_bytes)]
    pub max_frame_bytes: usize,
    /// Default time-to-live of a queued message, e.g. 7d, 12h
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub default_ttl: std::time::Duration,
    /// Most connections one mesh may hold open (a member's own connection is always let in)
    #[arg(long, default_value_t = BrokerConfig::default().max_connections_per_mesh)]
    pub max_connections_per_mesh: usize,
    /// Most connections one member may hold in a mesh, its sessions' included
    #[arg(long, default_value_t = BrokerConfig::default().max_connections_per_member)]
    pub max_connections_per_member: usize,
    /// Most sessions one member may have in a mesh that have not ended
    #[arg(long, default_value_t = BrokerConfig::default().max_sessions_per_member)]
    pub max_sessions_per_member: usize,
    /// Most connections that have not authenticated yet, in all
    #[arg(long, default_value_t = BrokerConfig::default().max_pending_handshakes)]
    pub max_pending_handshakes: usize,
    /// Most connections that have not authenticated yet, from one address
    #[arg(long, default_value_t = BrokerConfig::default().max_pending_per_address)]
    pub max_pending_per_address: usize,
    /// New connections one address may open a second (bursts of twice --max-pending-per-address)
    #[arg(long, default_value_t = BrokerConfig::default().handshakes_per_sec_per_address, value_parser = clap::value_parser!(u32).range(1..))]
    pub handshakes_per_sec_per_address: u32,
    /// Peers per roster page (a welcome carries the first page; clients fetch the rest)
    #[arg(long, default_value_t = BrokerConfig::default().roster_page as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub roster_page: u64,
    /// Sends per second per member (its sessions share it), sustained
    #[arg(long, default_value_t = BrokerConfig::default().sends_per_sec)]
    pub sends_per_sec: u32,
    /// Sends a member may make at once before the rate applies
    #[arg(long, default_value_t = BrokerConfig::default().send_burst)]
    pub send_burst: u32,
    /// How long a delivery waits for its ack before it is sent again, e.g. 30s
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: std::time::Duration,
    /// A session not connected for this long is ended (no more broadcasts or group messages)
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub session_stale: std::time::Duration,
    /// How long an ended session stays in the roster (DMs to it wait for its next launch)
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub session_grace: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given; keep it on a private
    /// address, e.g. 127.0.0.1:9464)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve TLS (wss://) with this PEM certificate chain, leaf first (reloaded on SIGHUP)
    #[arg(long, value_name = "FILE", requires = "tls_key", conflicts_with = "tls_self_signed")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (reloaded on SIGHUP)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve TLS (wss://) with a self-signed certificate for these host names or addresses
    /// (comma-separated), made on first start beside the database and reused after; members pin it
    #[arg(long, value_name = "HOSTS", value_delimiter = ',', num_args = 1)]
    pub tls_self_signed: Option<Vec<String>>,
    /// For tests: announce a time this many ms off (a broker whose clock is wrong)
    #[arg(long, hide = true, default_value_t = 0, allow_negative_numbers = true)]
    pub test_clock_offset_ms: i64,
}

pub fn run(cmd: BrokerCommand) -> anyhow::Result<()> {
    match cmd {
        BrokerCommand::Serve(args) => serve(*args),
        BrokerCommand::InstallService { no_start, serve } => {
            // The options are checked now, not when the service first starts.
            #[derive(clap::Parser)]
            struct Check {
                #[command(flatten)]
                serve: ServeArgs,
            }
            let checked = <Check as clap::Parser>::try_parse_from(
                std::iter::once("serve".to_owned()).chain(serve.iter().cloned()),
            )
            .map_err(|e| {
                crate::output::fail(
                    "usage",
                    format!("options for `mesh broker serve`: {}", e.kind()),
                    Some(e.to_string()),
                )
            })?;
            // Files named now must serve now: a unit that cannot start would restart forever.
            check_tls_options(&checked.serve)?;
            if checked.serve.listen.port() == 0 {
                return Err(crate::output::fail(
                    "usage",
                    "a service needs a fixed port: with port 0 it would listen elsewhere after every restart, and invites carry the address",
                    Some("for example -- --listen 0.0.0.0:7777".into()),
                ));
            }
            let done = super::service::install(&service(serve)?, no_start, || {})?;
            super::service::report_installed(&done)
        }
        BrokerCommand::UninstallService => {
            let svc = service(vec![])?;
            let removed = super::service::uninstall(&svc)?;
            super::service::report_uninstalled(&svc, removed)
        }
        BrokerCommand::Backup { to, db } => backup(&to, db.as_deref()),
        BrokerCommand::Restore { from, db } => restore(&from, db.as_deref()),
    }
}

/// The SQLite file a backup or restore works on: PostgreSQL has tools of its own.
fn sqlite_file(db: Option<&str>, verb: &str) -> anyhow::Result<Database> {
    match Database::of(db)? {
        Database::Postgres(url) => Err(crate::output::fail(
            "usage",
            format!("{} is a PostgreSQL database: {verb} with PostgreSQL's own tools", redacted(&url)),
            Some(
                "pg_dump for a copy, continuous archiving for point-in-time recovery (docs/operations.md, \"Backups\")"
                    .into(),
            ),
        )),
        file => Ok(file),
    }
}

fn backup(to: &std::path::Path, db: Option<&str>) -> anyhow::Result<()> {
    let database = sqlite_file(db, "back it up")?;
    let Database::File(path) = &database else { unreachable!("sqlite_file returns a file") };
    let manifest = mesh_broker::backup::take_broker(path, &database.files_dir()?, to).map_err(|e| match &e {
        mesh_broker::backup::BackupError::Exists(_) => crate::output::fail("conflict", e.to_string(), None),
        _ => crate::output::fail("failed", mesh_proto::error::chain(&e), None),
    })?;
    let bytes = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    if crate::output::json() {
        return super::print_json(&serde_json::json!({
            "path": std::path::absolute(to).unwrap_or_else(|_| to.to_owned()),
            "created_at": manifest.created_at,
            "bytes": bytes,
            "files": manifest.files.iter().map(|f| serde_json::json!({"name": f.name, "bytes": f.bytes})).collect::<Vec<_>>(),
        }));
    }
    let files: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    outln!("backed up {database} to {} ({}: {})", to.display(), crate::output::bytes(bytes), files.join(", "));
    if files.len() > 1 {
        outln!("it holds the broker's TLS private key: keep it as a secret (it is 0600)");
    }
    Ok(())
}

fn restore(from: &std::path::Path, db: Option<&str>) -> anyhow::Result<()> {
    use mesh_broker::backup::RestoreError;
    let database = sqlite_file(db, "restore it")?;
    let Database::File(path) = &database else { unreachable!("sqlite_file returns a file") };
    let restored = mesh_broker::backup::restore_broker(path, &database.files_dir()?, from).map_err(|e| match &e {
        RestoreError::Running(_) => crate::output::fail("broker_running", e.to_string(), None),
        _ => crate::output::fail("failed", mesh_proto::error::chain(&e), None),
    })?;
    if crate::output::json() {
        return super::print_json(&serde_json::json!({
            "restored_from": std::path::absolute(from).unwrap_or_else(|_| from.to_owned()),
            "db": path,
            "created_at": restored.manifest.created_at,
            "files": restored.manifest.files.iter().map(|f| serde_json::json!({"name": f.name, "bytes": f.bytes})).collect::<Vec<_>>(),
            "replaced": restored.replaced,
        }));
    }
    outln!("restored {database} from the backup taken {}", crate::output::time(restored.manifest.created_at));
    if let Some(dir) = &restored.replaced {
        outln!("the files it replaced are in {}", dir.display());
    }
    outln!(
        "messages acked after the backup was taken will not be delivered again; messages accepted after it are gone from the broker, and their senders' daemons send them again only if they had not yet seen them accepted"
    );
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging();
    let db = Database::of(args.db.as_deref())?;
    let tls = server_tls(&args, &db.files_dir()?)?;
    let config = BrokerConfig {
        create_token: args.create_token,
        max_frame_bytes: args.max_frame_bytes,
        default_ttl_ms: args.default_ttl.as_millis() as u64,
        max_connections_per_mesh: args.max_connections_per_mesh,
        max_connections_per_member: args.max_connections_per_member,
        max_sessions_per_member: args.max_sessions_per_member,
        max_pending_handshakes: args.max_pending_handshakes,
        max_pending_per_address: args.max_pending_per_address,
        handshakes_per_sec_per_address: args.handshakes_per_sec_per_address,
        roster_page: usize::try_from(args.roster_page).unwrap_or(usize::MAX),
        sends_per_sec: args.sends_per_sec,
        send_burst: args.send_burst,
        lease: args.lease.max(std::time::Duration::from_millis(1)),
        session_stale: args.session_stale,
        session_grace: args.session_grace,
        clock_offset_ms: args.test_clock_offset_ms,
        ..BrokerConfig::default()
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let served = runtime.block_on(async move {
        let (store, replica): (Arc<dyn Store>, Option<i64>) = match &db {
            Database::File(path) => (Arc::new(SqliteStore::open(path)?), None),
            Database::Postgres(url) => {
                let options = PgOptions { pool_size: usize::try_from(args.db_pool).unwrap_or(usize::MAX) };
                let store = PgStore::connect(url, options).await?;
                let replica = store.replica();
                (Arc::new(store), Some(replica))
            }
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let metrics = match args.metrics_listen {
            Some(at) => Some(
                tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening for metrics on {at}"))?,
            ),
            None => None,
        };
        let metrics_url = match &metrics {
            Some(l) => Some(format!("http://{}/metrics", l.local_addr()?)),
            None => None,
        };
        // SIGHUP is caught before the ready line, with TLS or without: one sent right after it (or a
        // renewal hook signalling every broker on the host) must not end the broker.
        let hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("listening for SIGHUP")?;
        tokio::spawn(reload_on_hangup(tls.clone(), hangup));
        // The first line of stdout says where to connect (port 0 picks a free port), and with TLS
        // the pin of the certificate, for `mesh create --pin`.
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let pin = tls.as_ref().map(|t| t.pin().to_string());
        // Where the certificate is: a self-signed one is made here, and every replica needs it.
        let cert = tls.as_ref().map(|t| t.cert_path().display().to_string());
        if crate::output::json() {
            let ready = serde_json::json!({
                "listening": format!("{scheme}://{addr}"),
                "database": db.to_string(),
                "replica": replica,
                "metrics": metrics_url,
                "tls_pin": pin,
                "tls_cert": cert,
            });
            outln!("{ready}");
        } else {
            let metrics = metrics_url.map(|u| format!(", metrics at {u}")).unwrap_or_default();
            let pin = pin.zip(cert).map(|(p, c)| format!(", certificate {p} from {c}")).unwrap_or_default();
            let replica = replica.map(|r| format!(" as replica {r}")).unwrap_or_default();
            outln!("mesh broker listening on {scheme}://{addr} (database {db}{replica}{pin}{metrics})");
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signals(shutdown.clone()));
        mesh_broker::run_with(listener, store, config, shutdown, mesh_broker::Extras { metrics, tls })
            .await
            .context("serving")?;
        anyhow::Ok(())
    });
    // A certificate reload stuck on a file (a hung network mount) must not keep a stopped broker alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// The TLS options of a service to be installed, checked as `serve` will use them (without making a
/// self-signed pair yet).
fn check_tls_options(args: &ServeArgs) -> anyhow::Result<()> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        mesh_broker::tls::ServerTls::from_files(cert, key)?;
    }
    if let Some(hosts) = &args.tls_self_signed {
        self_signed_hosts(hosts)?;
        mesh_broker::tls::check_self_signed_files(&Database::of(args.db.as_deref())?.files_dir()?)?;
    }
    Ok(())
}

/// The hosts of `--tls-self-signed`, at least one, each a name or an address.
fn self_signed_hosts(hosts: &[String]) -> anyhow::Result<Vec<String>> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        return Err(crate::output::fail(
            "usage",
            "--tls-self-signed needs the host names or addresses members use to reach this broker",
            Some("for example --tls-self-signed broker.example.com,203.0.113.7".into()),
        ));
    }
    mesh_broker::tls::check_hosts(&hosts).map_err(|e| crate::output::fail("usage", e.to_string(), None))?;
    Ok(hosts)
}

/// Refuses a `--db` that is no file name (an address of another kind, a misspelt or quoted PostgreSQL
/// one, a control character) rather than making a SQLite file of that name, which would hold its
/// password; says why, never the value.
fn refuse_foreign(db: &str) -> anyhow::Result<()> {
    match not_a_file(db) {
        Some(why) => Err(crate::output::fail(
            "usage",
            format!("--db (or MESH_BROKER_DB) is neither a SQLite file nor a PostgreSQL address: {why}"),
            Some("a PostgreSQL database is postgres://USER:PASSWORD@HOST:PORT/DB; a file is a path".into()),
        )),
        None => Ok(()),
    }
}

/// Where the broker keeps its state.
enum Database {
    File(PathBuf),
    /// A PostgreSQL address (shown only without its password).
    Postgres(String),
}

impl Database {
    fn of(db: Option<&str>) -> anyhow::Result<Database> {
        Ok(match db.filter(|d| !d.is_empty()) {
            Some(url) if is_postgres_address(url) => {
                // An address the broker cannot use is a usage error, as `install-service` says too.
                check_address(url).map_err(|e| crate::output::fail("usage", format!("--db: {e}"), None))?;
                Database::Postgres(url.trim().to_owned())
            }
            Some(path) => {
                refuse_foreign(path)?;
                Database::File(PathBuf::from(path))
            }
            None => Database::File(super::home()?.data_dir.join(STANDALONE_DB)),
        })
    }

    /// The directory of the files kept beside the state (a self-signed certificate): the SQLite
    /// file's, or mesh's data directory for PostgreSQL.
    fn files_dir(&self) -> anyhow::Result<PathBuf> {
        match self {
            Database::File(path) => match path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) => Ok(dir.to_owned()),
                None => Ok(PathBuf::from(".")),
            },
            Database::Postgres(_) => {
                let home = super::home()?;
                home.ensure_dirs().context("creating mesh's directories")?;
                Ok(home.data_dir)
            }
        }
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::File(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => f.write_str(&redacted(url)),
        }
    }
}

/// The certificate to serve, from files or made once and kept in `dir`.
fn server_tls(args: &ServeArgs, dir: &std::path::Path) -> anyhow::Result<Option<Arc<mesh_broker::tls::ServerTls>>> {
    use mesh_broker::tls::ServerTls;
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_self_signed) {
        (Some(cert), Some(key), _) => ServerTls::from_files(cert, key)?,
        (_, _, Some(hosts)) => {
            let hosts = self_signed_hosts(hosts)?;
            ServerTls::self_signed(dir, &hosts)?
        }
        _ => return Ok(None),
    };
    tracing::info!(cert = %tls.cert_path().display(), pin = %tls.pin(), "serving TLS");
    Ok(Some(Arc::new(tls)))
}

/// SIGHUP reads the certificate and key again; connections already up are not touched.
async fn reload_on_hangup(tls: Option<Arc<mesh_broker::tls::ServerTls>>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: this broker serves no TLS certificate; nothing to reload");
            continue;
        };
        // File reads off the async threads: a slow disk never holds up the connections.
        let reloading = tls.clone();
        let reloaded = match tokio::task::spawn_blocking(move || reloading.reload()).await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "the certificate reload stopped");
                continue;
            }
        };
        match reloaded {
            Ok(pin) => tracing::info!(%pin, "reloaded the TLS certificate; new connections get it"),
            Err(e) => {
                tracing::error!(error = %e, "reloading the TLS certificate failed; still serving the previous one")
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a service's standard error ends up in a journal or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A closed standard error (a pipe whose reader left) must not stop the broker: the formatter's
    // own report of a failed write would panic in the task that logged.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .try_init();
}

async fn stop_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
    tracing::info!("shutting down");
}
