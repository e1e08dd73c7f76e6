//! The daemon's backup and restore (docs/operations.md, "Backups").
//!
//! A backup is taken by the running daemon (it alone opens `daemon.db`): while it holds its
//! database, so that nothing of its state moves meanwhile, it copies the embedded broker's database
//! (when there is one) and then its own, each as one consistent snapshot; then it archives them with
//! the identity and the settings. Copying the embedded broker first, with the daemon's own state
//! still, means the broker's copy holds everything the daemon's copy counts as sent: a send the
//! broker has but the daemon's copy still shows pending is sent again and deduplicated.
//!
//! A restore is run with the daemon stopped: it takes the daemon's lock for the whole swap, reads
//! and checks the archive in full before anything is replaced, and moves the files it replaces into
//! a directory of their own rather than deleting them.

use std::path::{Path, PathBuf};

use mesh_broker::backup::{self, BackupError, Manifest, Source};
use mesh_ipc::Home;

use crate::daemon::Daemon;
use crate::lifecycle::{DaemonLock, LockOutcome};

/// What a daemon backup holds, by its names in the archive.
const DAEMON_DB: &str = "daemon.db";
const BROKER_DB: &str = "broker.db";
const IDENTITY: &str = "identity.json";
const SETTINGS: &str = "daemon.json";
const FILES: [&str; 4] = [DAEMON_DB, BROKER_DB, IDENTITY, SETTINGS];

/// Archive kind of a daemon's backup.
pub const KIND: &str = "daemon";

fn settings_path(home: &Home) -> PathBuf {
    home.config_dir.join(SETTINGS)
}

/// Writes a backup of this daemon's state to `to` (an absolute path that must not exist).
pub async fn take(daemon: &Daemon, to: PathBuf) -> Result<Manifest, BackupError> {
    // Before the daemon holds its writes for a copy that could not be kept.
    backup::check_destination(&to)?;
    let home = daemon.home.clone();
    let work = backup::work_dir(&home.data_dir, "backup")?;
    let (daemon_copy, broker_copy) = (work.path().join(DAEMON_DB), work.path().join(BROKER_DB));
    let broker_db = home.embedded_broker_db();
    let with_broker = broker_db.exists();
    let copies = (daemon_copy.clone(), broker_copy.clone());
    let copied = daemon
        .db
        .call(move |conn| {
            Ok((|| {
                if with_broker {
                    backup::snapshot(&broker_db, &copies.1)?;
                }
                backup::vacuum_into(conn, &copies.0)
            })())
        })
        .await
        .map_err(|e| BackupError::Io { what: "the daemon's database".into(), source: std::io::Error::other(e) })?;
    copied?;
    let member = daemon.member.identity.key().to_string();
    tokio::task::spawn_blocking(move || {
        let identity = home.identity_path();
        let settings = settings_path(&home);
        let mut files =
            vec![Source { name: DAEMON_DB, path: &daemon_copy }, Source { name: IDENTITY, path: &identity }];
        if with_broker {
            files.push(Source { name: BROKER_DB, path: &broker_copy });
        }
        if settings.exists() {
            files.push(Source { name: SETTINGS, path: &settings });
        }
        let manifest = backup::write_archive(&to, KIND, Some(member), &files);
        drop(work);
        manifest
    })
    .await
    .map_err(|e| BackupError::Io { what: "writing the backup".into(), source: std::io::Error::other(e) })?
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("a daemon is running on this home (pid {}); stop it first with `mesh daemon down`", pid.map_or("unknown".to_owned(), |p| p.to_string()))]
    Running { pid: Option<u32> },
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("{path}: its identity does not read: {detail}; nothing was replaced")]
    Identity { path: PathBuf, detail: String },
    #[error(
        "this home is member {here}, the backup is member {theirs}: restoring it replaces this home's identity; nothing was replaced"
    )]
    OtherMember { here: String, theirs: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// Where the files it replaced were moved (`None` when there were none).
    pub replaced: Option<PathBuf>,
}

/// Restores the backup `from` into `home`, whose daemon must not be running. A home that already has
/// another member's identity is replaced only with `replace_identity`.
pub fn restore(home: &Home, from: &Path, replace_identity: bool) -> Result<Restored, RestoreError> {
    let io = |what: String| move |source| RestoreError::Io { what, source };
    home.ensure_dirs().map_err(io(format!("creating {}", home.data_dir.display())))?;
    // Held for the whole swap: a daemon cannot start on half-restored files.
    let _lock = match DaemonLock::acquire(home).map_err(io(home.lock_path().display().to_string()))? {
        LockOutcome::Acquired(lock) => lock,
        LockOutcome::Held { pid } => return Err(RestoreError::Running { pid }),
    };
    let work = backup::work_dir(&home.data_dir, "restore")?;
    let manifest = backup::read_archive(from, KIND, work.path(), &FILES)?;
    let has = |name: &str| manifest.files.iter().any(|f| f.name == name);
    for needed in [DAEMON_DB, IDENTITY] {
        if !has(needed) {
            return Err(BackupError::Damaged { path: from.to_owned(), why: format!("it holds no {needed}") }.into());
        }
    }
    backup::check_database(
        from,
        DAEMON_DB,
        &work.path().join(DAEMON_DB),
        crate::store::SCHEMA_VERSION,
        backup::DAEMON_TABLES,
    )?;
    if has(BROKER_DB) {
        backup::check_database(
            from,
            BROKER_DB,
            &work.path().join(BROKER_DB),
            mesh_broker::store::sqlite::SCHEMA_VERSION,
            backup::BROKER_TABLES,
        )?;
    }
    let identity_err = |detail: String| RestoreError::Identity { path: from.to_owned(), detail };
    let member = crate::identity::read(&work.path().join(IDENTITY))
        .map_err(|e| identity_err(mesh_proto::error::chain(&e)))?
        .ok_or_else(|| identity_err("missing".into()))?;
    if manifest.member.as_deref() != Some(member.identity.key().to_string().as_str()) {
        return Err(identity_err("it is not the identity its manifest names".into()));
    }
    if let Ok(Some(here)) = crate::identity::load(home)
        && here.identity.key() != member.identity.key()
        && !replace_identity
    {
        return Err(RestoreError::OtherMember {
            here: here.identity.key().short(),
            theirs: member.identity.key().short(),
        });
    }
    if has(SETTINGS) {
        crate::retention::parse(&std::fs::read_to_string(work.path().join(SETTINGS)).unwrap_or_default())
            .map_err(|e| BackupError::Damaged { path: from.to_owned(), why: format!("{SETTINGS}: {e}") })?;
    }

    // Everything checked: the files in place move aside, then the restored ones take their place.
    let aside = home.data_dir.join(format!("replaced-{}", mesh_proto::now_ms()));
    let out = [home.daemon_db(), home.embedded_broker_db(), home.identity_path(), settings_path(home)];
    let places: Vec<(&str, PathBuf)> =
        FILES.iter().copied().zip(out.iter().cloned()).filter(|(name, _)| has(name)).collect();
    let replaced = backup::put_in_place(work.path(), &places, &out, &aside)?;
    crate::mark_created(home).map_err(io("the database's marker".into()))?;
    Ok(Restored { manifest, replaced })
}
