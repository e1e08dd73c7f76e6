//! The member identity on disk: `identity.json` (mode 0600) in the config directory, holding the
//! ed25519 seed, the X25519 secret and the display name. Created by `mesh init` or on first use.

use std::io;
use std::path::{Path, PathBuf};

use mesh_ipc::Home;
use mesh_ipc::paths::write_private_file;
use mesh_proto::{Identity, codec, names, now_ms};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid identity file: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error(transparent)]
    Name(#[from] mesh_proto::ProtoError),
}

/// The member: its keys and display name.
#[derive(Clone, Debug)]
pub struct Member {
    pub identity: Identity,
    pub name: String,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    v: u32,
    name: String,
    /// The public key, for people reading the file; ignored on load.
    key: String,
    sign_seed: String,
    enc_secret: String,
    created_at: u64,
}

/// The default display name: the login name (`$USER`, `$LOGNAME`, else the account's name).
pub fn default_name() -> String {
    let account = || nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name);
    [std::env::var("USER").ok(), std::env::var("LOGNAME").ok(), account()]
        .into_iter()
        .flatten()
        .find(|n| names::validate_display(n).is_ok())
        .unwrap_or_else(|| "member".to_owned())
}

pub fn load(home: &Home) -> Result<Option<Member>, IdentityError> {
    read(&home.identity_path())
}

/// The identity in the file at `path` (`None` when there is no file).
pub fn read(path: &Path) -> Result<Option<Member>, IdentityError> {
    let path = path.to_owned();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IdentityError::Read { path, source }),
    };
    tighten_mode(&path);
    let invalid = |detail: String| IdentityError::Invalid { path: path.clone(), detail };
    let file: IdentityFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if file.v != 1 {
        return Err(invalid(format!("unknown version {}", file.v)));
    }
    let seed = codec::unb64_array("sign_seed", &file.sign_seed).map_err(|e| invalid(e.to_string()))?;
    let enc = codec::unb64_array("enc_secret", &file.enc_secret).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(Member { identity: Identity::from_secrets(seed, enc), name: file.name }))
}

/// Writes a new identity; refuses to overwrite an existing one.
pub fn create(home: &Home, name: &str) -> Result<Member, IdentityError> {
    names::validate_display(name)?;
    let path = home.identity_path();
    if path.exists() {
        return Err(IdentityError::Invalid { path, detail: "already exists; refusing to replace an identity".into() });
    }
    let member = Member { identity: Identity::generate(), name: name.to_owned() };
    save(home, &member)?;
    Ok(member)
}

pub fn save(home: &Home, member: &Member) -> Result<(), IdentityError> {
    let path = home.identity_path();
    let write_err = |source| IdentityError::Write { path: path.clone(), source };
    home.ensure_dirs().map_err(write_err)?;
    let file = IdentityFile {
        v: 1,
        name: member.name.clone(),
        key: member.identity.key().to_string(),
        sign_seed: codec::b64(&member.identity.sign_seed()),
        enc_secret: codec::b64(&member.identity.enc_secret()),
        created_at: now_ms(),
    };
    let json = serde_json::to_vec_pretty(&file).expect("identity serialises");
    write_private_file(&path, &json).map_err(write_err)
}

/// The member's bearer token, created (random, mode 0600) on first use.
pub fn member_token(home: &Home) -> Result<String, IdentityError> {
    let path = home.member_token_path();
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            tighten_mode(&path);
            return Ok(t.trim().to_owned());
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(IdentityError::Read { path, source }),
    }
    let token = codec::b64url(&mesh_proto::crypto::random_bytes::<32>());
    home.ensure_dirs().map_err(|source| IdentityError::Write { path: path.clone(), source })?;
    write_private_file(&path, token.as_bytes()).map_err(|source| IdentityError::Write { path, source })?;
    Ok(token)
}

/// The identity, created with the default name when there is none yet.
pub fn load_or_create(home: &Home) -> Result<Member, IdentityError> {
    match load(home)? {
        Some(m) => Ok(m),
        None => create(home, &default_name()),
    }
}

/// Keys must not be readable by others; a looser file (copied in, say) is tightened and logged.
fn tighten_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "identity file was readable by others; setting mode 0600");
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_load_and_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path());
        assert!(load(&home).expect("load").is_none());
        let m = create(&home, "alice").expect("create");
        let back = load(&home).expect("load").expect("exists");
        assert_eq!(back.identity.public(), m.identity.public());
        assert_eq!(back.name, "alice");
        let mode = std::fs::metadata(home.identity_path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(create(&home, "again").is_err(), "never overwrites");
        std::fs::set_permissions(home.identity_path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        load(&home).expect("load");
        let mode = std::fs::metadata(home.identity_path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path());
        home.ensure_dirs().expect("dirs");
        std::fs::write(home.identity_path(), "{").expect("write");
        assert!(matches!(load(&home), Err(IdentityError::Invalid { .. })));
    }
}
