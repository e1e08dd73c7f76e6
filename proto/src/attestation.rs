//! Session attestations: a member vouches that a session key acts for it in one mesh, for a bounded time.

use serde::{Deserialize, Serialize};

use crate::ids::MeshId;
use crate::keys::PublicKey;
use crate::signed::Claims;

/// The longest an attestation may be valid; daemons re-mint one on every connect.
pub const MAX_ATTESTATION_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAttestation {
    pub v: u32,
    pub mesh_id: MeshId,
    pub member: PublicKey,
    pub session: PublicKey,
    pub name: String,
    pub issued_at: u64,
    pub expires_at: u64,
}

impl Claims for SessionAttestation {
    const DOMAIN: &'static str = "mesh/session-attestation/v1";
    fn signer(&self) -> &PublicKey {
        &self.member
    }
}
