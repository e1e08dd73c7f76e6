//! TLS on the broker's port (`wss://`): a certificate and key read from PEM files, or a self-signed
//! pair generated once for given host names and kept beside the database. The pair in use can be
//! swapped while serving ([`ServerTls::reload`], on SIGHUP): connections already up keep the session
//! they made, new handshakes get the new certificate.
//!
//! rustls with the ring provider: nothing to install, no OpenSSL.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mesh_proto::pin::CertPin;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// File names of a generated self-signed pair in the broker's directory.
pub const SELF_SIGNED_CERT: &str = "broker-tls-cert.pem";
pub const SELF_SIGNED_KEY: &str = "broker-tls-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the key in {key} does not go with the certificate in {cert}: {detail}")]
    Mismatch { cert: PathBuf, key: PathBuf, detail: String },
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is open to others than its owner (mode {mode:o}); chmod 600 it")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{found} is there but {missing} is not; restore it, or remove both to make a new pair")]
    HalfPair { found: PathBuf, missing: PathBuf },
    #[error("{0:?} is not a host name or an IP address")]
    BadHost(String),
}

/// What a certificate says of itself: when it is valid, and for which names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// DNS names and IP addresses of its subject alternative names.
    pub names: Vec<String>,
}

impl CertFacts {
    /// `None` when `der` is not a certificate x509-parser can read.
    pub fn of(der: &[u8]) -> Option<CertFacts> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(CertFacts {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            names,
        })
    }

    /// Whether `at` (seconds since the epoch) is within its dates.
    pub fn valid_at(&self, at: i64) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

/// The certificate the broker presents, and where it comes from.
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("cert", &self.cert_path).field("pin", &self.pin()).finish_non_exhaustive()
    }
}

/// The pair handed to each new handshake.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

impl ServerTls {
    /// Serves the certificate chain in `cert` (leaf first) with the private key in `key`, both PEM.
    pub fn from_files(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = load(cert, key, &provider)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(pair))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Generate(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // A WebSocket upgrade is HTTP/1.1; /health too.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            provider,
            current,
            config: Arc::new(config),
        })
    }

    /// A self-signed certificate for `hosts` (names or IP addresses), generated in `dir` on first use
    /// (key 0600) and reused after, whatever hosts are given then: its pin is what members recorded.
    pub fn self_signed(dir: &Path, hosts: &[String]) -> Result<ServerTls, TlsError> {
        check_hosts(hosts)?;
        let (cert, key) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
        if !check_self_signed_files(dir)? {
            generate(&cert, &key, hosts)?;
            tracing::info!(cert = %cert.display(), ?hosts, "generated a self-signed TLS certificate");
        }
        let tls = ServerTls::from_files(&cert, &key)?;
        let names = tls.facts().map(|f| f.names).unwrap_or_default();
        let missing: Vec<&String> = hosts.iter().filter(|h| !names.iter().any(|n| n.eq_ignore_ascii_case(h))).collect();
        if !missing.is_empty() {
            tracing::warn!(
                cert = %cert.display(),
                ?names,
                ?missing,
                "the self-signed certificate kept here is not for every host asked for; it is served as it is \
                 (its pin is what members recorded): remove both files to make one for these hosts, then \
                 members run mesh repin"
            );
        }
        Ok(tls)
    }

    /// What the certificate now presented says of itself.
    pub fn facts(&self) -> Option<CertFacts> {
        let current = self.current.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        current.cert.first().and_then(|c| CertFacts::of(c.as_ref()))
    }

    /// Reads the files again; on success new handshakes present the new pair. On failure the pair in
    /// use stays.
    pub fn reload(&self) -> Result<CertPin, TlsError> {
        let pair = load(&self.cert_path, &self.key_path, &self.provider)?;
        let pin = pin_of(&pair);
        *self.current.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(pair);
        Ok(pin)
    }

    /// The SHA-256 of the leaf certificate now presented: what `mesh create --pin` takes.
    pub fn pin(&self) -> CertPin {
        pin_of(&self.current.0.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

fn pin_of(pair: &CertifiedKey) -> CertPin {
    CertPin::of_der(pair.cert.first().map_or(&[][..], |c| c.as_ref()))
}

/// The pair in `cert` and `key`, the key first: one other users can open is refused before anything
/// is parsed.
fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read =
        |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Read { path: path.to_owned(), detail: e.to_string() };
    let (key_pem, key_meta) = read_small(key)?;
    check_key_mode(key, &key_meta)?;
    let (cert_pem, _) = read_small(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| read(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.to_owned() });
    }
    let secret = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Read {
            path: key.to_owned(),
            detail: "no private key in it (PEM PKCS#8, PKCS#1 or SEC1, not encrypted: decrypt an encrypted key first)"
                .into(),
        },
        e => read(key, e),
    })?;
    let pair = CertifiedKey::from_der(chain, secret, provider).map_err(|e| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        detail: match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key is not the first certificate's (the file must start with the broker's own certificate, \
                 then its chain)"
                    .into()
            }
            e => e.to_string(),
        },
    })?;
    // Served all the same (the operator may be about to replace it), but said loudly.
    if let Some(facts) = pair.cert.first().and_then(|c| CertFacts::of(c.as_ref()))
        && !facts.valid_at(mesh_proto::now_ms() as i64 / 1000)
    {
        let date = |secs: i64| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0).unsigned_abs());
            humantime::format_rfc3339_seconds(at).to_string()
        };
        tracing::warn!(
            cert = %cert.display(),
            not_before = %date(facts.not_before),
            not_after = %date(facts.not_after),
            "the TLS certificate is outside its validity dates: clients will refuse it"
        );
    }
    Ok(pair)
}

/// PEM files this large hold far more than a certificate chain or a key.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A certificate or key file's bytes: a regular file of at most [`MAX_PEM_BYTES`], so that a FIFO, a
/// device or a huge file given by mistake is refused instead of blocking or filling memory.
fn read_small(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), TlsError> {
    let bad = |detail: String| TlsError::Read { path: path.to_owned(), detail };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(bad(format!("{} bytes: more than a PEM certificate chain or key (at most 1 MiB)", meta.len())));
    }
    Ok((std::fs::read(path).map_err(|e| bad(e.to_string()))?, meta))
}

/// Whether `dir` holds a self-signed pair already (`false`: neither file, one will be made); half a
/// pair is an error, never completed.
pub fn check_self_signed_files(dir: &Path) -> Result<bool, TlsError> {
    let (cert, key) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(false),
        (true, false) => Err(TlsError::HalfPair { found: cert, missing: key }),
        (false, true) => Err(TlsError::HalfPair { found: key, missing: cert }),
        (true, true) => Ok(true),
    }
}

/// Host names and addresses a self-signed certificate may be made for.
pub fn check_hosts(hosts: &[String]) -> Result<(), TlsError> {
    for host in hosts {
        let name_ok = rustls::pki_types::ServerName::try_from(host.as_str()).is_ok()
            && !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
        // `300.1.1.1` parses as neither an address nor (by these rules) a name of letters.
        let looks_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if !name_ok || (looks_numeric && host.parse::<std::net::IpAddr>().is_err()) {
            return Err(TlsError::BadHost(host.chars().take(100).collect()));
        }
    }
    Ok(())
}

fn generate(cert: &Path, key: &Path, hosts: &[String]) -> Result<(), TlsError> {
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, hosts.first().map_or("mesh broker", String::as_str));
    name.push(rcgen::DnType::OrganizationName, "mesh broker (self-signed)");
    params.distinguished_name = name;
    let pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let issued = params.self_signed(&pair).map_err(|e| TlsError::Generate(e.to_string()))?;
    // The key first, a new file created 0600 (never one already there); the certificate is public.
    write_private(key, pair.serialize_pem().as_bytes())?;
    let write_cert = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(cert)?;
        file.write_all(issued.pem().as_bytes())?;
        file.sync_all()
    };
    write_cert().map_err(|source| TlsError::Write { path: cert.to_owned(), source })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|source| TlsError::Write { path: path.to_owned(), source })
}

/// The private key is the broker's alone: refuse one other users can read or write (a group that
/// may read it, as some systems arrange for TLS keys, is allowed).
fn check_key_mode(key: &Path, meta: &std::fs::Metadata) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if mode & 0o007 != 0 || mode & 0o020 != 0 {
        return Err(TlsError::KeyMode { path: key.to_owned(), mode: mode & 0o777 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_is_made_once_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let first = ServerTls::self_signed(dir.path(), &["localhost".into(), "127.0.0.1".into()]).expect("made");
        let mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY)).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ServerTls::self_signed(dir.path(), &["other.example".into()]).expect("reused");
        assert_eq!(first.pin(), again.pin(), "the same certificate, so pins recorded stay good");
        assert_eq!(first.facts().expect("facts").names, ["localhost", "127.0.0.1"]);
        std::fs::set_permissions(dir.path().join(SELF_SIGNED_KEY), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        assert!(matches!(ServerTls::self_signed(dir.path(), &[]), Err(TlsError::KeyMode { .. })));
        // Half a pair is never completed by a new key (nor is a key others can read ever written).
        std::fs::remove_file(dir.path().join(SELF_SIGNED_CERT)).expect("rm");
        let key_before = std::fs::read(dir.path().join(SELF_SIGNED_KEY)).expect("key");
        assert!(matches!(ServerTls::self_signed(dir.path(), &["localhost".into()]), Err(TlsError::HalfPair { .. })));
        assert_eq!(std::fs::read(dir.path().join(SELF_SIGNED_KEY)).expect("key"), key_before);
    }

    #[test]
    fn hosts_that_are_not_names_or_addresses_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        for bad in ["a b", "300.1.1.1", "line\nbreak", "", "under_score!"] {
            assert!(matches!(ServerTls::self_signed(dir.path(), &[bad.into()]), Err(TlsError::BadHost(_))), "{bad:?}");
        }
        assert!(!dir.path().join(SELF_SIGNED_KEY).exists(), "nothing made");
        ServerTls::self_signed(dir.path(), &["broker.lan".into(), "10.0.0.5".into(), "::1".into()])
            .expect("good hosts");
    }

    #[test]
    fn reload_swaps_the_pair_and_keeps_the_old_one_when_the_new_files_are_bad() {
        let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
        let tls = ServerTls::self_signed(a.path(), &["localhost".into()]).expect("a");
        let before = tls.pin();
        let other = ServerTls::self_signed(b.path(), &["localhost".into()]).expect("b");
        std::fs::write(a.path().join(SELF_SIGNED_CERT), "not pem").expect("garbage");
        assert!(tls.reload().is_err());
        assert_eq!(tls.pin(), before, "a failed reload keeps serving the old pair");
        // Nothing that is not a small regular file is read: a FIFO would block, a device never end.
        std::fs::remove_file(a.path().join(SELF_SIGNED_CERT)).expect("rm");
        nix::unistd::mkfifo(&a.path().join(SELF_SIGNED_CERT), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        assert!(matches!(tls.reload(), Err(TlsError::Read { .. })));
        std::fs::remove_file(a.path().join(SELF_SIGNED_CERT)).expect("rm");
        std::fs::write(a.path().join(SELF_SIGNED_CERT), vec![b'A'; 2 * 1024 * 1024]).expect("huge");
        assert!(matches!(tls.reload(), Err(TlsError::Read { .. })));
        assert_eq!(tls.pin(), before);
        // A certificate with a key that is not its own is refused too.
        std::fs::copy(b.path().join(SELF_SIGNED_CERT), a.path().join(SELF_SIGNED_CERT)).expect("copy");
        assert!(matches!(tls.reload(), Err(TlsError::Mismatch { .. })));
        std::fs::copy(b.path().join(SELF_SIGNED_KEY), a.path().join(SELF_SIGNED_KEY)).expect("copy");
        assert_eq!(tls.reload().expect("reloaded"), other.pin());
        assert_eq!(tls.pin(), other.pin());
    }
}
