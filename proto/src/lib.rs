//! mesh-proto: everything that crosses the daemon↔broker boundary.
//!
//! It owns the wire protocol v1 ([`wire`]), identities and their keys ([`keys`]), the libsodium-compatible
//! primitives ([`crypto`]), signed claims ([`signed`]), invite tokens ([`invite`]), session attestations
//! ([`attestation`]) and the sealed message format ([`message`]). It does no I/O: no sockets, no files,
//! no clocks except where a caller passes the time in.

pub mod attestation;
pub mod codec;
pub mod crypto;
pub mod error;
pub mod ids;
pub mod invite;
pub mod keys;
pub mod membership;
pub mod message;
pub mod names;
pub mod pin;
pub mod signed;
pub mod wire;

pub use error::ProtoError;
pub use ids::{MeshId, Target};
pub use keys::{EncPublicKey, Identity, PublicIdentity, PublicKey, Sig};

/// The version of the daemon↔broker wire protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch, the only time unit on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
