//! Where every file of a user lives. `MESH_HOME=<dir>` puts all of them under one directory (tests,
//! several users on one machine); otherwise the XDG base directories. Directories are created 0700.

use std::io;
use std::path::{Path, PathBuf};

use crate::IPC_VERSION;

pub const HOME_ENV: &str = "MESH_HOME";

/// Unix socket paths must fit `sun_path` (108 bytes on Linux, 104 on macOS).
const MAX_SOCKET_PATH: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    /// Identity keys and settings.
    pub config_dir: PathBuf,
    /// SQLite databases and the daemon's lock file.
    pub data_dir: PathBuf,
    /// The IPC socket.
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot find a home directory; set MESH_HOME to a directory for mesh's files")]
    NoHome,
    #[error("socket path {0} is too long for a Unix socket; set MESH_HOME to a shorter directory")]
    SocketPathTooLong(PathBuf),
}

impl Home {
    /// `MESH_HOME` if set and non-empty, else XDG locations.
    pub fn from_env() -> Result<Home, HomeError> {
        let home = match std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            Some(dir) => Home::at(Path::new(&dir)),
            None => Home::xdg()?,
        };
        if home.socket_path().as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HomeError::SocketPathTooLong(home.socket_path()));
        }
        Ok(home)
    }

    /// Every file under `dir`.
    pub fn at(dir: &Path) -> Home {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        Home {
            config_dir: dir.join("config"),
            data_dir: dir.join("data"),
            run_dir: dir.join("run"),
            log_dir: dir.join("logs"),
        }
    }

    fn xdg() -> Result<Home, HomeError> {
        let config = dirs::config_dir().ok_or(HomeError::NoHome)?.join("mesh");
        let data = dirs::data_dir().ok_or(HomeError::NoHome)?.join("mesh");
        let state = dirs::state_dir().unwrap_or_else(|| data.clone()).join("mesh");
        let run = dirs::runtime_dir().map(|d| d.join("mesh")).unwrap_or_else(|| data.join("run"));
        Ok(Home { config_dir: config, data_dir: data, run_dir: run, log_dir: state.join("logs") })
    }

    pub fn identity_path(&self) -> PathBuf {
        self.config_dir.join("identity.json")
    }

    /// The member's bearer token (0600): required for the member's event stream and the all-sessions
    /// view, so that those are an explicit grant and not the default of anyone holding the socket.
    pub fn member_token_path(&self) -> PathBuf {
        self.config_dir.join("member.token")
    }

    /// The daemon's socket; the contract version is part of the name, so an old CLI never speaks to a
    /// daemon of another contract by accident.
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join(format!("daemon-v{IPC_VERSION}.sock"))
    }

    /// Held (flock) by the running daemon for its whole life. It sits beside the databases, so two
    /// daemons can never share one data directory whatever their environment says about sockets.
    pub fn lock_path(&self) -> PathBuf {
        self.data_dir.join("daemon.lock")
    }

    pub fn daemon_db(&self) -> PathBuf {
        self.data_dir.join("daemon.db")
    }

    pub fn embedded_broker_db(&self) -> PathBuf {
        self.data_dir.join("broker.db")
    }

    /// The daemon's start-up output when detached, read by `mesh daemon up` if the daemon fails to start.
    pub fn startup_log(&self) -> PathBuf {
        self.log_dir.join("daemon.start.log")
    }

    /// Creates every directory with mode 0700 (and tightens existing ones).
    pub fn ensure_dirs(&self) -> io::Result<()> {
        for dir in [&self.config_dir, &self.data_dir, &self.run_dir, &self.log_dir] {
            create_private_dir(dir)?;
        }
        Ok(())
    }
}

pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `bytes` to `path` atomically (temp file + rename) with mode 0600.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn everything_under_mesh_home_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path());
        for p in [home.identity_path(), home.socket_path(), home.lock_path(), home.daemon_db(), home.startup_log()] {
            assert!(p.starts_with(dir.path()), "{} escapes MESH_HOME", p.display());
        }
        home.ensure_dirs().expect("dirs");
        for d in [&home.config_dir, &home.data_dir, &home.run_dir, &home.log_dir] {
            assert_eq!(std::fs::metadata(d).expect("stat").permissions().mode() & 0o777, 0o700);
        }
        let f = home.config_dir.join("x");
        write_private_file(&f, b"secret").expect("write");
        assert_eq!(std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777, 0o600);
    }
}
