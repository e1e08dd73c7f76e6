//! Process lifecycle: the singleton lock, detaching, logging, the IPC socket.
//!
//! The daemon is a singleton by an OS file lock (`flock` via `File::try_lock`) on `daemon.lock` in the
//! data directory, held for the whole life of the process and released by the kernel when it dies,
//! even by SIGKILL. Whoever holds the lock owns the socket: a socket file found at start-up is stale
//! and is replaced. Clients never delete the socket.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use mesh_ipc::Home;

/// The held singleton lock; dropping it (or dying) releases it.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

#[derive(Debug)]
pub enum LockOutcome {
    Acquired(DaemonLock),
    /// Another live daemon holds it; its pid as it wrote it.
    Held {
        pid: Option<u32>,
    },
}

fn open_lock(home: &Home) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(home.lock_path())
}

impl DaemonLock {
    pub fn acquire(home: &Home) -> io::Result<LockOutcome> {
        let mut file = open_lock(home)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                file.rewind()?;
                write!(file, "{}", std::process::id())?;
                file.sync_all()?;
                Ok(LockOutcome::Acquired(DaemonLock { _file: file }))
            }
            Err(TryLockError::WouldBlock) => Ok(LockOutcome::Held { pid: read_pid(home) }),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

/// The pid the running (or last) daemon wrote into the lock file.
pub fn read_pid(home: &Home) -> Option<u32> {
    let mut s = String::new();
    File::open(home.lock_path()).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether a live daemon holds the lock of this home (tries to take it, and lets go at once).
pub fn is_running(home: &Home) -> bool {
    match open_lock(home) {
        Ok(f) => matches!(f.try_lock(), Err(TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// Starts a new session so the daemon outlives the terminal that started it.
pub fn detach_from_terminal() -> io::Result<()> {
    nix::unistd::setsid().map(|_| ()).map_err(io::Error::from)
}

/// Binds the IPC socket (mode 0600, in the 0700 run directory). Only the lock holder calls this, so
/// an existing socket file is a crashed daemon's and is removed first.
pub fn bind_socket(home: &Home) -> io::Result<Listener> {
    let path = home.socket_path();
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket left by a previous daemon"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let name = path.as_path().to_fs_name::<GenericFilePath>()?;
    ListenerOptions::new().name(name).mode(0o600).reclaim_name(true).create_tokio()
}

/// How often the listener checks that its socket file is still there.
const SOCKET_CHECK: Duration = Duration::from_secs(2);

/// The IPC listener as axum sees it. It binds its socket again when the file is deleted (a daemon
/// whose socket is gone could be neither reached nor stopped), and a failed accept (no file
/// descriptors left, say) only slows new connections: it is retried after a pause.
pub struct IpcListener {
    /// `None` between losing the socket and binding it again.
    listener: Option<Listener>,
    home: Home,
    bound: Option<u64>,
    /// Places for connections ([`crate::ipc_guard`]).
    places: std::sync::Arc<tokio::sync::Semaphore>,
    /// When a failed accept (out of file descriptors, say) was last logged: once per
    /// [`ACCEPT_WARN_EVERY`], not once per retry.
    accept_warned: Option<tokio::time::Instant>,
}

/// A failing accept is retried after this long (connections already open are served meanwhile).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

impl IpcListener {
    pub fn new(listener: Listener, home: Home) -> IpcListener {
        let bound = socket_inode(&home);
        let places = std::sync::Arc::new(tokio::sync::Semaphore::new(crate::ipc_guard::MAX_CONNECTIONS));
        IpcListener { listener: Some(listener), home, bound, places, accept_warned: None }
    }

    fn rebind_if_gone(&mut self) {
        if self.listener.is_some() && self.bound.is_some() && socket_inode(&self.home) == self.bound {
            return;
        }
        // The old listener goes first: dropping it unlinks whatever is at the path, which must not be
        // the new socket.
        self.listener = None;
        match bind_socket(&self.home) {
            Ok(listener) => {
                tracing::warn!(socket = %self.home.socket_path().display(), "the IPC socket was removed or replaced; bound it again");
                self.listener = Some(listener);
                self.bound = socket_inode(&self.home);
            }
            Err(e) => {
                tracing::error!(error = %mesh_proto::error::chain(&e), "binding the IPC socket again failed; will retry")
            }
        }
    }
}

fn socket_inode(home: &Home) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::symlink_metadata(home.socket_path()).ok().filter(|m| m.file_type().is_socket()).map(|m| m.ino())
}

/// Accepts on `listener`, or never when there is none.
async fn accept_on(listener: Option<&Listener>) -> io::Result<Stream> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

impl axum::serve::Listener for IpcListener {
    type Io = crate::ipc_guard::GuardedStream;
    type Addr = ();

    async fn accept(&mut self) -> (crate::ipc_guard::GuardedStream, ()) {
        // A place first: with none free, new clients wait in the backlog while open ones are served.
        let place = self.places.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            tokio::select! {
                accepted = accept_on(self.listener.as_ref()) => match accepted {
                    Ok(s) => return (crate::ipc_guard::guard(s, place), ()),
                    Err(e) => {
                        if self.accept_warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                            tracing::warn!(
                                error = %mesh_proto::error::chain(&e),
                                "accepting an IPC connection failed; new clients wait (logged at most every 10 s)"
                            );
                            self.accept_warned = Some(tokio::time::Instant::now());
                        }
                        tokio::time::sleep(ACCEPT_RETRY).await;
                    }
                },
                () = tokio::time::sleep(SOCKET_CHECK) => self.rebind_if_gone(),
            }
        }
    }

    fn local_addr(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Logs to a daily-rotated file in the log directory (7 kept), and to stderr when asked.
/// The filter comes from `MESH_LOG` (default `info`). Returns the guard that flushes the file.
pub fn init_logging(log_dir: &Path, stderr: bool) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    init_logging_as("daemon", log_dir, stderr)
}

/// [`init_logging`] for another of mesh's processes (`mcp`): its files are `<process>.<date>.log`.
pub fn init_logging_as(
    process: &str,
    log_dir: &Path,
    stderr: bool,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, fmt};

    // Whatever the process creates from here on (logs, which may quote a peer or an endpoint) is
    // its user's only: 0600 files, 0700 directories.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Logs an earlier version left readable by others are tightened too.
    if let Ok(entries) = std::fs::read_dir(log_dir) {
        use std::os::unix::fs::PermissionsExt;
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()) {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
    }
    let filter = || EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix(process)
        .filename_suffix("log")
        .max_log_files(7)
        .build(log_dir);
    let (file_layer, guard) = match appender {
        Ok(a) => {
            let (writer, guard) = tracing_appender::non_blocking(a);
            (
                Some(
                    fmt::layer().with_ansi(false).with_writer(writer).log_internal_errors(false).with_filter(filter()),
                ),
                Some(guard),
            )
        }
        Err(e) => {
            eprintln!("mesh {process}: cannot open the log in {}: {e}", log_dir.display());
            (None, None)
        }
    };
    // Colours only on a terminal: under a service manager standard error goes to a journal.
    let ansi = std::io::IsTerminal::is_terminal(&io::stderr());
    let stderr_layer = stderr
        .then(|| fmt::layer().with_ansi(ansi).with_writer(io::stderr).log_internal_errors(false).with_filter(filter()));
    let _ = tracing_subscriber::registry().with(file_layer).with(stderr_layer).try_init();
    guard
}
