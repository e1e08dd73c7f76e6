//! Membership changes: signed by the member who makes them, verified and recorded by the broker, and
//! told to every remaining member (`docs/protocol.md`, "Membership").

use serde::{Deserialize, Serialize};

use crate::crypto::{self, GroupKey};
use crate::ids::MeshId;
use crate::keys::{EncPublicKey, Identity, PublicIdentity, PublicKey, Sig};
use crate::signed::{Claims, Signed};
use crate::wire::Role;
use crate::{ProtoError, codec};

/// How far a change's clock may be from the broker's (a change signed long ago is not accepted).
pub const MAX_SKEW_MS: u64 = 10 * 60 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// An owner or admin removed `target` (and its sessions) from the mesh.
    Remove,
    /// `target` (the signer) left the mesh.
    Leave,
    /// The owner gave `target` the role `role` (`owner`: ownership handed over; the old owner
    /// becomes an admin).
    SetRole,
    /// The owner (`target` = `by`) deleted the mesh: every member, session, queue and invite of it.
    DeleteMesh,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Remove => "remove",
            ChangeKind::Leave => "leave",
            ChangeKind::SetRole => "set_role",
            ChangeKind::DeleteMesh => "delete_mesh",
        }
    }
}

/// What a member signs to change the mesh's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipAction {
    pub v: u32,
    pub mesh_id: MeshId,
    pub kind: ChangeKind,
    pub target: PublicKey,
    /// For `set_role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub by: PublicKey,
    pub at: u64,
}

impl Claims for MembershipAction {
    const DOMAIN: &'static str = "mesh/membership/v1";
    fn signer(&self) -> &PublicKey {
        &self.by
    }
}

/// A mesh key handed to one member by an owner or admin: the 32 key bytes sealed with crypto_box
/// from `by`'s encryption key to `member`'s, the whole signed by `by`. The broker relays it and can
/// neither read the key nor change a byte of the grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGrant {
    pub v: u32,
    pub mesh_id: MeshId,
    /// The key's epoch: one more than the key it replaces (the mesh's first key is epoch 0).
    pub epoch: u64,
    /// Who it is for.
    pub member: PublicKey,
    pub by: PublicKey,
    pub by_enc_key: EncPublicKey,
    /// `by`'s signature binding `by_enc_key` to it (`mesh/enc-key/v1`).
    pub by_enc_sig: Sig,
    #[serde(with = "codec::b64_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "codec::b64_bytes")]
    pub sealed_key: Vec<u8>,
    pub at: u64,
}

impl Claims for KeyGrant {
    const DOMAIN: &'static str = "mesh/key-grant/v1";
    fn signer(&self) -> &PublicKey {
        &self.by
    }
}

/// Seals `key` (epoch `epoch` of `mesh`) for `member` and signs the grant as `by`.
pub fn grant(by: &Identity, mesh: MeshId, epoch: u64, member: &PublicIdentity, key: &GroupKey, at: u64) -> Signed {
    let sealed = crypto::box_seal(by, &member.enc_key, key.as_bytes());
    let public = by.public();
    let claims = KeyGrant {
        v: 1,
        mesh_id: mesh,
        epoch,
        member: member.key,
        by: public.key,
        by_enc_key: public.enc_key,
        by_enc_sig: public.enc_sig,
        nonce: sealed.nonce.to_vec(),
        sealed_key: sealed.ciphertext,
        at,
    };
    Signed::sign(by, &claims)
}

/// Opens a grant made for `me` in `mesh`: its signature, its maker's key binding, its addressee and
/// mesh checked, then the key unsealed.
pub fn open_grant(signed: &Signed, me: &Identity, mesh: &MeshId) -> Result<(KeyGrant, GroupKey), ProtoError> {
    let grant: KeyGrant = signed.open()?;
    let maker = PublicIdentity { key: grant.by, enc_key: grant.by_enc_key, enc_sig: grant.by_enc_sig };
    maker.verify()?;
    if grant.member != me.key() || grant.mesh_id != *mesh || grant.v != 1 {
        return Err(ProtoError::encoding("key grant", "made for another member, another mesh or another version"));
    }
    let bytes = crypto::box_open(me, &grant.by_enc_key, &grant.nonce, &grant.sealed_key)?;
    let key: [u8; crypto::KEY_LEN] =
        bytes.try_into().map_err(|_| ProtoError::encoding("key grant", "the sealed key is not 32 bytes"))?;
    Ok((grant, GroupKey::from_bytes(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_opens_for_its_member_only_and_any_change_is_refused() {
        let (admin, bob, eve) = (Identity::generate(), Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        let key = GroupKey::generate();
        let signed = grant(&admin, mesh, 3, &bob.public(), &key, 7);
        let (claims, opened) = open_grant(&signed, &bob, &mesh).expect("opens for bob");
        assert_eq!((claims.epoch, claims.by, opened.as_bytes()), (3, admin.key(), key.as_bytes()));
        assert!(open_grant(&signed, &eve, &mesh).is_err(), "not eve's");
        assert!(open_grant(&signed, &bob, &MeshId::generate()).is_err(), "another mesh");
        // The epoch (or any byte) changed in transit: the signature no longer holds.
        let mut claims: KeyGrant = signed.open().expect("claims");
        claims.epoch = 4;
        let forged =
            Signed { payload: crate::codec::b64(&serde_json::to_vec(&claims).expect("json")), sig: signed.sig };
        assert!(open_grant(&forged, &bob, &mesh).is_err());
    }
}
