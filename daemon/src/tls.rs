//! How the daemon trusts a `wss://` broker: by the platform's roots (what this machine's other
//! programs trust: the system store on Linux, honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`; the OS's own
//! verifier on macOS and Windows; `rustls-platform-verifier`), or, for a broker no authority vouches
//! for, by a **pin**: the SHA-256 of the exact certificate, recorded at `mesh create` and carried by
//! every invite. A pinned certificate may be self-signed or issued by anyone: it must be exactly the
//! pinned one, within its validity dates, and prove it holds its key; its issuer and host names are not
//! checked (the pin names the certificate more exactly than either).
//!
//! Whatever the trust, the certificate the broker presented is recorded, so a refusal can say which
//! one it was (`expected …, got …`).

use std::sync::{Arc, Mutex, OnceLock};

use mesh_proto::pin::CertPin;
use rustls::client::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// What a broker's certificate is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    Platform,
    Pinned(CertPin),
}

impl Trust {
    pub fn from_pin(pin: Option<CertPin>) -> Trust {
        pin.map_or(Trust::Platform, Trust::Pinned)
    }
}

/// Why a broker's certificate was refused. Each is permanent until someone acts: the daemon does not
/// fall back to anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error(
        "broker certificate changed: expected {expected}, got {got}; if the operator rotated it, run `mesh repin --mesh {mesh}`"
    )]
    Changed { expected: CertPin, got: CertPin, mesh: String },
    #[error("the broker's certificate ({got}) is not signed by an authority this machine trusts")]
    Untrusted { got: CertPin },
    #[error("the broker's certificate ({got}) has expired")]
    Expired { got: CertPin },
    #[error("the broker's certificate ({got}) is not valid yet (is this machine's clock right?)")]
    NotYetValid { got: CertPin },
    #[error("the broker's certificate ({got}) is not for {host}")]
    WrongName { host: String, got: CertPin },
    #[error("the broker's certificate{} was refused: {detail}", .got.map(|g| format!(" ({g})")).unwrap_or_default())]
    Other { got: Option<CertPin>, detail: String },
}

impl CertError {
    /// The certificate the broker presented.
    pub fn presented(&self) -> Option<CertPin> {
        match self {
            CertError::Changed { got, .. }
            | CertError::Untrusted { got }
            | CertError::Expired { got }
            | CertError::NotYetValid { got }
            | CertError::WrongName { got, .. } => Some(*got),
            CertError::Other { got, .. } => *got,
        }
    }
}

/// The pin did not match (carried through rustls as the verifier's own error).
#[derive(Debug)]
struct PinMismatch;

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the certificate does not match the pin")
    }
}

impl std::error::Error for PinMismatch {}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// The platform's verifier, made once (loading the system's roots is not free).
fn platform() -> Result<Arc<rustls_platform_verifier::Verifier>, String> {
    static PLATFORM: OnceLock<Result<Arc<rustls_platform_verifier::Verifier>, String>> = OnceLock::new();
    PLATFORM
        .get_or_init(|| {
            rustls_platform_verifier::Verifier::new(provider())
                .map(Arc::new)
                .map_err(|e| format!("loading this machine's trusted certificate authorities: {e}"))
        })
        .clone()
}

/// One connection attempt's verifier: checks by `trust` and remembers what was presented.
#[derive(Debug)]
pub struct Verifier {
    trust: Trust,
    platform: Option<Arc<rustls_platform_verifier::Verifier>>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<CertPin>>,
}

impl Verifier {
    pub fn new(trust: Trust) -> Arc<Verifier> {
        let platform = match trust {
            Trust::Platform => platform()
                .inspect_err(
                    |e| tracing::warn!(error = %e, "no certificate authorities: only pinned brokers can be verified"),
                )
                .ok(),
            Trust::Pinned(_) => None,
        };
        Arc::new(Verifier { trust, platform, provider: provider(), seen: Mutex::new(None) })
    }

    /// The leaf certificate the broker presented, once it has.
    pub fn presented(&self) -> Option<CertPin> {
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A client configuration that verifies with this verifier.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, String> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A failed TLS handshake, in words a user can act on; `None` when it was not about the
    /// certificate. `host` is the name connected to, `mesh` the mesh's local name.
    pub fn explain(&self, error: &rustls::Error, host: &str, mesh: &str) -> Option<CertError> {
        let rustls::Error::InvalidCertificate(why) = error else {
            return None;
        };
        let got = self.presented();
        let Some(got) = got else {
            return Some(CertError::Other { got, detail: why.to_string() });
        };
        Some(match why {
            CertificateError::Other(other) if other.0.downcast_ref::<PinMismatch>().is_some() => {
                let Trust::Pinned(expected) = self.trust else {
                    return Some(CertError::Other { got: Some(got), detail: why.to_string() });
                };
                CertError::Changed { expected, got, mesh: mesh.to_owned() }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => CertError::Expired { got },
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                CertError::NotYetValid { got }
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                CertError::WrongName { host: host.to_owned(), got }
            }
            // Without a pin, whatever else stops the authorities here from vouching for it (no issuer
            // they know, a self-signed certificate marked as an authority, one whose issuer name only
            // looks like a root's) leaves it unvouched for: the user may check and pin it.
            _ if self.trust == Trust::Platform => CertError::Untrusted { got },
            other => CertError::Other { got: Some(got), detail: other.to_string() },
        })
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = CertPin::of_der(end_entity);
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(got);
        match (&self.trust, &self.platform) {
            (Trust::Pinned(pin), _) => {
                if got != *pin {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                        Arc::new(PinMismatch),
                    ))));
                }
                // Exactly the pinned certificate, whoever issued it: only its dates are checked here
                // (the handshake's signature, checked below, proves the broker holds its key).
                let facts = mesh_broker::tls::CertFacts::of(end_entity.as_ref())
                    .ok_or(rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
                let at = now.as_secs() as i64;
                if at < facts.not_before {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::NotValidYet));
                }
                if at > facts.not_after {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
                }
                Ok(ServerCertVerified::assertion())
            }
            (Trust::Platform, Some(platform)) => {
                platform.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            // No authority could be loaded here, so none vouches for it.
            (Trust::Platform, None) => Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.platform {
            Some(p) => p.verify_tls12_signature(message, cert, dss),
            None => rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            ),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.platform {
            Some(p) => p.verify_tls13_signature(message, cert, dss),
            None => rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            ),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match &self.platform {
            Some(p) => p.supported_verify_schemes(),
            None => self.provider.signature_verification_algorithms.supported_schemes(),
        }
    }
}
