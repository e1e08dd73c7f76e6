//! mesh-daemon: the local daemon of one user on one machine.
//!
//! It keeps the durable outbox ([`outbox`], drained per connection by [`drain`]), the durable inbox
//! ([`inbox`]), one broker link per mesh ([`link`]), the roster cache ([`roster`]), and serves the IPC
//! contract of `mesh-ipc` ([`ipc_server`]). Only this crate opens `daemon.db`. The entry point is
//! [`run`], which `mesh daemon up --foreground` calls; it returns when the daemon has shut down.

pub mod backup;
pub mod clock;
pub mod daemon;
pub mod drain;
pub mod embedded;
pub mod events;
pub mod groups;
pub mod identity;
pub mod inbox;
mod ipc_guard;
pub mod ipc_server;
pub mod keys;
pub mod lifecycle;
pub mod link;
pub mod membership;
pub mod meshes;
pub mod metrics;
pub mod notices;
pub mod outbox;
pub mod process;
pub mod rekey;
pub mod retention;
pub mod roster;
pub mod sessions;
pub mod store;
pub mod tls;
pub mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_ipc::Home;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::daemon::Daemon;
use crate::lifecycle::{DaemonLock, IpcListener, LockOutcome};

/// How long shutdown waits for tasks (links draining their inflight rows) before it gives up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Options {
    /// Start a local mesh on an embedded broker when this home has no mesh.
    pub embedded: bool,
    /// Also log to stderr.
    pub log_stderr: bool,
    /// Start on a new, empty database although an earlier one was found corrupt and moved aside (its
    /// meshes and group keys are then gone from this home).
    pub fresh: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the mesh daemon is already running{}", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning { pid: Option<u32> },
    #[error("preparing {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Db(#[from] mesh_broker::sqlite::DbError),
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    #[error(transparent)]
    Config(#[from] retention::ConfigError),
    #[error(
        "the daemon's database was found corrupt and moved aside to {}; mesh does not start over silently, \
         because it held your meshes and their keys. To try to recover it: \
         `sqlite3 '{}' .recover | sqlite3 '{}'`, then `mesh daemon up`. To start fresh instead (you will \
         have to join your meshes again): `mesh daemon up --fresh`",
        .aside.display(), .aside.display(), .db.display()
    )]
    CorruptDatabaseAside { aside: std::path::PathBuf, db: std::path::PathBuf },
    #[error(
        "the daemon's database {} is missing or empty, though this home had one; mesh does not start over \
         silently, because it held your meshes and their keys. Put the file back (from a backup), then \
         `mesh daemon up`; or start fresh (you will have to join your meshes again): `mesh daemon up --fresh`",
        .db.display()
    )]
    DatabaseGone { db: std::path::PathBuf },
    #[error(
        "the embedded broker's database {} {}; the local mesh {mesh:?} lived there, with the messages it had \
         not delivered yet, so mesh does not start it over silently. {}To start the local mesh again on a new \
         database (messages it still held are lost; your meshes, keys, inbox and outbox stay): \
         `mesh daemon up --fresh`",
        .db.display(),
        match .aside { Some(a) => format!("was found corrupt and moved aside to {}", a.display()), None => "is missing or empty".to_owned() },
        match .aside { Some(a) => format!("To try to recover it: `sqlite3 '{}' .recover | sqlite3 '{}'`, then `mesh daemon up`. ", a.display(), .db.display()), None => String::new() }
    )]
    EmbeddedBrokerLost { db: std::path::PathBuf, mesh: String, aside: Option<std::path::PathBuf> },
}

/// What happened to a database that held state, if anything did.
enum Lost {
    /// Moved aside as corrupt (the newest main file moved), and nothing took its place.
    Aside(std::path::PathBuf),
    /// Gone or emptied (truncated to nothing) although it had been created.
    Gone,
}

/// Whether the database at `db` was lost: moved aside as corrupt with nothing in its place, or
/// (when `created` says it existed) missing or empty. With `fresh`, what is left of it is filed
/// under `corrupt/` and `None` is returned: the caller starts on a new one.
fn lost_database(home: &Home, db: &Path, created: bool, fresh: bool) -> Result<Option<Lost>, StartError> {
    let prefix = format!("{}.corrupt-", db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let entries = std::fs::read_dir(&home.data_dir).map_err(io_err(home.data_dir.display().to_string()))?;
    let mut leftovers: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .collect();
    leftovers.sort();
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let empty = len(db).is_none_or(|n| n == 0) && len(&wal).is_none_or(|n| n == 0);
    let lost = if !leftovers.is_empty() && len(db).is_none() {
        // The main file's name, without a -wal or -shm suffix.
        let main = leftovers
            .iter()
            .rev()
            .find(|p| !p.to_string_lossy().ends_with("-wal") && !p.to_string_lossy().ends_with("-shm"));
        Some(Lost::Aside(main.or(leftovers.last()).cloned().unwrap_or_default()))
    } else if created && empty {
        Some(Lost::Gone)
    } else {
        None
    };
    if lost.is_none() || !fresh {
        return Ok(lost);
    }
    let kept = home.data_dir.join("corrupt");
    mesh_ipc::paths::create_private_dir(&kept).map_err(io_err(kept.display().to_string()))?;
    let stamp = now_ms_wall();
    for p in leftovers.into_iter().chain([db.to_owned(), wal].into_iter().filter(|p| p.exists())) {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let to = if name.contains(".corrupt-") { kept.join(name) } else { kept.join(format!("{name}.lost-{stamp}")) };
        std::fs::rename(&p, &to).map_err(io_err(p.display().to_string()))?;
    }
    tracing::warn!(db = %db.display(), kept = %kept.display(), "starting on a fresh database; what was left is kept");
    Ok(None)
}

fn now_ms_wall() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// The daemon's database must not start over silently: moved aside as corrupt, emptied or deleted
/// after it was created, the daemon refuses to start until the user recovers it or asks for a
/// fresh one (`--fresh`, which files what is left under `corrupt/`).
fn check_not_recreating(home: &Home, fresh: bool) -> Result<(), StartError> {
    let db = home.daemon_db();
    let created = created_marker(home).exists();
    match lost_database(home, &db, created, fresh)? {
        None => Ok(()),
        Some(Lost::Aside(aside)) => Err(StartError::CorruptDatabaseAside { aside, db }),
        Some(Lost::Gone) => Err(StartError::DatabaseGone { db }),
    }
}

/// Written once the daemon's database has been created: from then on, a missing or empty one is a
/// loss, not a first start. It lives beside the identity, not the database, so that removing the
/// database's files (`rm data/daemon.db*`) does not remove it too.
fn created_marker(home: &Home) -> PathBuf {
    home.config_dir.join("daemon-db-created")
}

/// Records that the daemon's database exists (see [`created_marker`]).
pub(crate) fn mark_created(home: &Home) -> std::io::Result<()> {
    mesh_ipc::paths::write_private_file(&created_marker(home), now_ms_wall().to_string().as_bytes())
}

/// The embedded broker's database must not start over silently either while the local mesh lives
/// there: it holds the messages the local broker has not delivered yet.
fn check_embedded_broker(home: &Home, meshes: &[meshes::MeshRow], fresh: bool) -> Result<bool, StartError> {
    let Some(local) = meshes.iter().find(|m| m.embedded) else { return Ok(false) };
    let db = home.embedded_broker_db();
    match lost_database(home, &db, true, fresh)? {
        None => Ok(fresh && !db.exists()),
        Some(lost) => Err(StartError::EmbeddedBrokerLost {
            db,
            mesh: local.name.clone(),
            aside: match lost {
                Lost::Aside(p) => Some(p),
                Lost::Gone => None,
            },
        }),
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// Runs the daemon in this process until it is asked to stop (IPC `shutdown`, SIGTERM, SIGINT).
pub fn run(home: Home, options: Options) -> Result<(), StartError> {
    home.ensure_dirs().map_err(io_err(format!("directories under {}", home.data_dir.display())))?;
    let lock = match DaemonLock::acquire(&home).map_err(io_err(home.lock_path().display().to_string()))? {
        LockOutcome::Acquired(lock) => lock,
        LockOutcome::Held { pid } => return Err(StartError::AlreadyRunning { pid }),
    };
    let _log = lifecycle::init_logging(&home.log_dir, options.log_stderr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mesh-daemon")
        .enable_all()
        .build()
        .map_err(io_err("the async runtime"))?;
    let result = runtime.block_on(serve(home, options));
    if let Err(e) = &result {
        tracing::error!(error = %mesh_proto::error::chain(e), "daemon failed");
    }
    drop(lock);
    result
}

async fn serve(home: Home, options: Options) -> Result<(), StartError> {
    let member = identity::load_or_create(&home)?;
    check_not_recreating(&home, options.fresh)?;
    let config = retention::load(&home)?;
    webhooks::set_deadline(config.webhooks.deadline);
    let db = store::open(&home.daemon_db())?;
    if !created_marker(&home).exists() {
        mark_created(&home).map_err(io_err(created_marker(&home).display().to_string()))?;
    }
    let recovered = db.call_blocking(|c| Ok(outbox::recover_inflight(c)? + inbox::recover_reads(c)?))?;
    tracing::info!(pid = std::process::id(), version = env!("CARGO_PKG_VERSION"), member = %member.identity.key(),
        recovered_inflight = recovered, "daemon starting");

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let daemon = Arc::new(Daemon::new(home.clone(), db, member, shutdown.clone(), tracker.clone()));
    let token = identity::member_token(&home)?;
    let _ = daemon.member_token_hash.set(sessions::token_hash(&token));
    let _ = daemon.webhook_config.set(config.webhooks.clone());
    if let Some(n) = std::env::var("MESH_FAULT_DECRYPT_FAILURES").ok().and_then(|v| v.parse().ok()) {
        tracing::warn!(failures = n, "fault injection: the next decryptions will fail");
        daemon.inject_decrypt_failures.store(n, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(ms) = std::env::var("MESH_FAULT_ACK_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        tracing::warn!(delay_ms = ms, "fault injection: acks are delayed");
        let _ = daemon.inject_ack_delay.set(std::time::Duration::from_millis(ms));
    }

    let mut meshes = daemon.db.call(|c| meshes::list(c)).await?;
    let restart_local = check_embedded_broker(&home, &meshes, options.fresh)?;
    if meshes.iter().any(|m| m.embedded) || (meshes.is_empty() && options.embedded) {
        let (url, token) = embedded::start(&daemon).await?;
        if restart_local && let Some(local) = meshes.iter().find(|m| m.embedded) {
            embedded::recreate_local_mesh(&daemon, &url, &token, local).await?;
            tracing::warn!(mesh = %local.name, "started the local mesh again on a new embedded broker database");
        }
        if meshes.is_empty() {
            let row = embedded::create_local_mesh(&daemon, &url, &token).await?;
            tracing::info!(mesh = %row.name, %url, "created the local mesh");
            meshes.push(row);
        }
    }
    for mesh in &meshes {
        daemon.attach_mesh(mesh);
    }
    daemon.rehydrate_sessions(&meshes).await?;
    tracker.spawn(inbox::run_worker(daemon.clone()));
    tracker.spawn(daemon.clone().session_reaper());
    tracker.spawn(daemon.clone().janitor(config.clone()));
    tracker.spawn(webhooks::worker::run(daemon.clone(), config.webhooks.clone()));
    tracker.spawn(daemon.clone().lease_sweeper());
    tracker.spawn(stop_on_signals(shutdown.clone()));

    let listener = lifecycle::bind_socket(&home).map_err(io_err(format!("socket {}", home.socket_path().display())))?;
    tracing::info!(socket = %home.socket_path().display(), "serving IPC");
    let app = ipc_server::router(daemon.clone());
    let serve = axum::serve(IpcListener::new(listener, home.clone()), app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    // Graceful shutdown waits for open requests (event streams, long polls); they get a moment to end.
    let give_up = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = serve => if let Err(e) = served {
            tracing::error!(error = %mesh_proto::error::chain(&e), "IPC server failed");
        },
        () = give_up => tracing::warn!("open IPC requests did not finish within the shutdown grace period"),
    }
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("some tasks did not finish within the shutdown grace period");
    }
    let _ = std::fs::remove_file(home.socket_path());
    tracing::info!("daemon stopped");
    Ok(())
}

async fn stop_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the daemon with `mesh daemon down`");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
