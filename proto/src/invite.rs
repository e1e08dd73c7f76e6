//! Invite tokens.
//!
//! A token is a bearer secret handed to a joiner out of band. It has two parts:
//! - `invite`: claims signed by an admin (mesh, broker URL, role, expiry, use count, the public half of a
//!   one-time *auth key*, and the mesh group key sealed with crypto_secretbox under a one-time *box key*).
//!   The joiner shows this part to the broker.
//! - the secrets: the auth key's seed, with which the joiner signs the broker's challenge to prove it
//!   holds the whole token, and the box key, which opens the group key. Neither ever reaches a broker.

use serde::{Deserialize, Serialize};

use crate::ProtoError;
use crate::codec;
use crate::crypto::{self, GroupKey, KEY_LEN};
use crate::ids::MeshId;
use crate::keys::{Identity, PublicKey, Sig};
use crate::pin::CertPin;
use crate::signed::{Claims, Signed};
use crate::wire::Role;

pub const TOKEN_PREFIX: &str = "mesh-invite-v1.";
const PROOF_DOMAIN: &str = "mesh/invite-proof/v1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteClaims {
    pub v: u32,
    /// 32 hex digits; the broker counts uses per invite id.
    pub invite_id: String,
    pub mesh_id: MeshId,
    pub mesh_name: String,
    pub broker_url: String,
    /// For a broker whose certificate no authority vouches for (self-signed): the certificate the
    /// joiner must find there. Invites before pins have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pin: Option<CertPin>,
    pub role: Role,
    pub issued_by: PublicKey,
    pub issued_at: u64,
    pub expires_at: u64,
    /// `None`: any number of uses until expiry.
    pub max_uses: Option<u32>,
    pub auth_key: PublicKey,
    #[serde(with = "codec::b64_bytes")]
    pub group_key_nonce: Vec<u8>,
    #[serde(with = "codec::b64_bytes")]
    pub sealed_group_key: Vec<u8>,
    /// The epoch of the mesh key sealed in it (0: the mesh's first key).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Claims for InviteClaims {
    const DOMAIN: &'static str = "mesh/invite/v1";
    fn signer(&self) -> &PublicKey {
        &self.issued_by
    }
}

/// What an admin chooses when minting an invite.
#[derive(Clone, Debug)]
pub struct InviteParams {
    pub mesh_id: MeshId,
    pub mesh_name: String,
    pub broker_url: String,
    pub tls_pin: Option<CertPin>,
    pub role: Role,
    pub issued_at: u64,
    pub expires_at: u64,
    pub max_uses: Option<u32>,
    /// The epoch of the mesh key the invite carries.
    pub key_epoch: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct TokenBody {
    invite: Signed,
    auth_seed: String,
    box_key: String,
}

/// A decoded token. `Debug` never shows the secrets.
#[derive(Clone)]
pub struct InviteToken {
    pub invite: Signed,
    pub claims: InviteClaims,
    auth: Identity,
    box_key: GroupKey,
}

impl std::fmt::Debug for InviteToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteToken").field("invite_id", &self.claims.invite_id).finish_non_exhaustive()
    }
}

impl InviteToken {
    /// Mints a token signed by `admin` that carries `group_key`.
    pub fn mint(admin: &Identity, params: InviteParams, group_key: &GroupKey) -> InviteToken {
        let auth = Identity::from_secrets(crypto::random_bytes(), crypto::random_bytes());
        let box_key = GroupKey::generate();
        let sealed = crypto::secretbox_seal(&box_key, group_key.as_bytes());
        let claims = InviteClaims {
            v: 1,
            invite_id: hex::encode(crypto::random_bytes::<16>()),
            mesh_id: params.mesh_id,
            mesh_name: params.mesh_name,
            broker_url: params.broker_url,
            tls_pin: params.tls_pin,
            role: params.role,
            issued_by: admin.key(),
            issued_at: params.issued_at,
            expires_at: params.expires_at,
            max_uses: params.max_uses,
            auth_key: auth.key(),
            group_key_nonce: sealed.nonce.to_vec(),
            sealed_group_key: sealed.ciphertext,
            key_epoch: params.key_epoch,
        };
        let invite = Signed::sign(admin, &claims);
        InviteToken { invite, claims, auth, box_key }
    }

    pub fn encode(&self) -> String {
        let body = TokenBody {
            invite: self.invite.clone(),
            auth_seed: codec::b64(&self.auth.sign_seed()),
            box_key: codec::b64(self.box_key.as_bytes()),
        };
        let json = serde_json::to_vec(&body).expect("token body serialises");
        format!("{TOKEN_PREFIX}{}", codec::b64url(&json))
    }

    /// Parses a token and checks the admin's signature and that the secrets match the claims.
    /// Expiry and use counts are the broker's to enforce.
    pub fn decode(token: &str) -> Result<InviteToken, ProtoError> {
        let bad = |why: &str| ProtoError::BadToken(why.to_owned());
        let rest = token.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| bad("does not start with mesh-invite-v1."))?;
        let json = codec::unb64url("invite token", rest).map_err(|_| bad("not base64url"))?;
        let body: TokenBody = serde_json::from_slice(&json).map_err(|e| bad(&format!("malformed: {e}")))?;
        let claims: InviteClaims = body.invite.open().map_err(|e| bad(&format!("signature: {e}")))?;
        if claims.v != 1 {
            return Err(bad("unsupported invite version"));
        }
        let seed: [u8; 32] = codec::unb64_array("auth seed", &body.auth_seed).map_err(|_| bad("bad auth seed"))?;
        let auth = Identity::from_secrets(seed, [0u8; 32]);
        if auth.key() != claims.auth_key {
            return Err(bad("auth seed does not match the invite"));
        }
        let box_key: [u8; KEY_LEN] = codec::unb64_array("box key", &body.box_key).map_err(|_| bad("bad box key"))?;
        Ok(InviteToken { invite: body.invite, claims, auth, box_key: GroupKey::from_bytes(box_key) })
    }

    /// Opens the group key the admin sealed into the invite.
    pub fn group_key(&self) -> Result<GroupKey, ProtoError> {
        let bytes = crypto::secretbox_open(&self.box_key, &self.claims.group_key_nonce, &self.claims.sealed_group_key)?;
        let key: [u8; KEY_LEN] =
            bytes.try_into().map_err(|_| ProtoError::BadToken("sealed group key has the wrong length".into()))?;
        Ok(GroupKey::from_bytes(key))
    }

    /// Proof of possession for the broker: the auth key's signature over the challenge and the joiner's key.
    pub fn prove(&self, challenge: &[u8], joiner: &PublicKey) -> Sig {
        self.auth.sign(PROOF_DOMAIN, &[challenge, &joiner.0])
    }
}

/// The broker's check of a joiner's proof of possession.
pub fn verify_proof(
    claims: &InviteClaims,
    challenge: &[u8],
    joiner: &PublicKey,
    proof: &Sig,
) -> Result<(), ProtoError> {
    claims.auth_key.verify(PROOF_DOMAIN, &[challenge, &joiner.0], proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> InviteParams {
        InviteParams {
            mesh_id: MeshId::generate(),
            mesh_name: "team".into(),
            broker_url: "ws://127.0.0.1:1".into(),
            tls_pin: Some(CertPin::of_der(b"broker")),
            role: Role::Member,
            issued_at: 1,
            expires_at: 2,
            max_uses: Some(1),
            key_epoch: 0,
        }
    }

    #[test]
    fn token_round_trip_carries_group_key_and_proves() {
        let admin = Identity::generate();
        let gk = GroupKey::generate();
        let token = InviteToken::mint(&admin, params(), &gk);
        let decoded = InviteToken::decode(&token.encode()).expect("decodes");
        assert_eq!(decoded.claims, token.claims);
        assert_eq!(decoded.group_key().expect("opens"), gk);
        let joiner = Identity::generate().key();
        let proof = decoded.prove(b"challenge", &joiner);
        verify_proof(&decoded.claims, b"challenge", &joiner, &proof).expect("proof verifies");
        assert!(verify_proof(&decoded.claims, b"other", &joiner, &proof).is_err());
    }

    #[test]
    fn garbage_tokens_are_typed_errors() {
        for t in ["", "mesh-invite-v1.", "mesh-invite-v1.!!!", "hello", "mesh-invite-v1.e30"] {
            assert!(matches!(InviteToken::decode(t), Err(ProtoError::BadToken(_))), "{t}");
        }
    }

    #[test]
    fn swapped_secrets_are_rejected() {
        let admin = Identity::generate();
        let a = InviteToken::mint(&admin, params(), &GroupKey::generate());
        let b = InviteToken::mint(&admin, params(), &GroupKey::generate());
        let mixed = InviteToken {
            invite: a.invite.clone(),
            claims: a.claims.clone(),
            auth: b.auth.clone(),
            box_key: b.box_key.clone(),
        };
        assert!(InviteToken::decode(&mixed.encode()).is_err());
    }
}
