//! Sealed messages: what a sender puts into `send` and what a recipient opens from an [`Envelope`].
//!
//! Content is JSON ([`Content`]) sealed with crypto_box to the recipient's encryption key (direct) or
//! with crypto_secretbox under the mesh group key (broadcast, group). The sender signs the routing
//! fields with its identity key, so a recipient can tell who sent a group message and a broker cannot
//! move a ciphertext to another target or replay it under another `client_message_id`.

use serde::{Deserialize, Serialize};

use crate::ProtoError;
use crate::crypto::{self, GroupKey};
use crate::ids::{MeshId, Target};
use crate::keys::{EncPublicKey, Identity, Sig};
use crate::wire::Envelope;

const MESSAGE_DOMAIN: &str = "mesh/message/v1";

/// The plaintext of a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// The key a message is sealed with.
#[derive(Clone, Copy, Debug)]
pub enum SealKey<'a> {
    Direct(&'a EncPublicKey),
    Group(&'a GroupKey),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedMessage {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub sig: Sig,
}

fn signed_fields<'a>(mesh_id: &'a MeshId, cmid: &'a str, to: &'a str, nonce: &'a [u8], ct: &'a [u8]) -> [&'a [u8]; 5] {
    [&mesh_id.0, cmid.as_bytes(), to.as_bytes(), nonce, ct]
}

/// Seals and signs `content` from `sender`.
pub fn seal(
    sender: &Identity,
    mesh_id: &MeshId,
    client_message_id: &str,
    to: &Target,
    key: SealKey<'_>,
    content: &Content,
) -> SealedMessage {
    let plaintext = serde_json::to_vec(content).expect("content serialises");
    let sealed = match key {
        SealKey::Direct(recipient) => crypto::box_seal(sender, recipient, &plaintext),
        SealKey::Group(group) => crypto::secretbox_seal(group, &plaintext),
    };
    let to = to.to_string();
    let sig =
        sender.sign(MESSAGE_DOMAIN, &signed_fields(mesh_id, client_message_id, &to, &sealed.nonce, &sealed.ciphertext));
    SealedMessage { nonce: sealed.nonce.to_vec(), ciphertext: sealed.ciphertext, sig }
}

/// Why an envelope could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The envelope is not what it claims: bad signature, wrong recipient, unreadable content.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The signature checks out but the ciphertext does not open with our key.
    #[error("decryption failed: {0}")]
    DecryptFailed(String),
}

impl OpenError {
    /// The short reason recorded on a failed inbox row.
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::Invalid(_) => "invalid",
            OpenError::DecryptFailed(_) => "decrypt_failed",
        }
    }
}

/// Verifies and opens an envelope delivered to `recipient` (whose key the broker delivered it to).
pub fn open(envelope: &Envelope, recipient: &Identity, group_key: Option<&GroupKey>) -> Result<Content, OpenError> {
    let keys: Vec<(u64, GroupKey)> = group_key.map(|k| (0, k.clone())).into_iter().collect();
    open_with(envelope, recipient, &keys).map(|(content, _)| content)
}

/// [`open`] with the mesh keys a member holds, `(epoch, key)`: a broadcast or group message opens
/// with one of them (newest first), whose epoch is returned with the content; a direct message
/// returns no epoch. The key that opens a message is the proof of its epoch.
pub fn open_with(
    envelope: &Envelope,
    recipient: &Identity,
    keys: &[(u64, GroupKey)],
) -> Result<(Content, Option<u64>), OpenError> {
    let invalid = |e: ProtoError| OpenError::Invalid(e.to_string());
    envelope.sender_identity().verify().map_err(invalid)?;
    let to = envelope.to.to_string();
    let fields =
        signed_fields(&envelope.mesh_id, &envelope.client_message_id, &to, &envelope.nonce, &envelope.ciphertext);
    envelope.from.verify(MESSAGE_DOMAIN, &fields, &envelope.sig).map_err(invalid)?;
    let (plaintext, epoch) = match &envelope.to {
        Target::Key(key) => {
            if *key != recipient.key() {
                return Err(OpenError::Invalid(format!(
                    "addressed to {}, delivered to {}",
                    key.short(),
                    recipient.key().short()
                )));
            }
            let plaintext = crypto::box_open(recipient, &envelope.from_enc_key, &envelope.nonce, &envelope.ciphertext)
                .map_err(|e| OpenError::DecryptFailed(e.to_string()))?;
            (plaintext, None)
        }
        Target::Group(_) | Target::All => {
            if keys.is_empty() {
                return Err(OpenError::DecryptFailed("no group key for this mesh".into()));
            }
            let mut newest_first: Vec<&(u64, GroupKey)> = keys.iter().collect();
            newest_first.sort_by_key(|k| std::cmp::Reverse(k.0));
            let opened = newest_first.iter().find_map(|(epoch, key)| {
                crypto::secretbox_open(key, &envelope.nonce, &envelope.ciphertext).ok().map(|p| (p, *epoch))
            });
            let Some((plaintext, epoch)) = opened else {
                let epochs: Vec<String> = newest_first.iter().map(|(e, _)| e.to_string()).collect();
                return Err(OpenError::DecryptFailed(format!(
                    "no mesh key held here opens it (epochs {}); a newer key may not have arrived yet",
                    epochs.join(", ")
                )));
            };
            (plaintext, Some(epoch))
        }
    };
    let content = serde_json::from_slice(&plaintext)
        .map_err(|e| OpenError::Invalid(format!("content is not valid JSON: {e}")))?;
    Ok((content, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(sender: &Identity, mesh_id: MeshId, to: Target, sealed: SealedMessage) -> Envelope {
        let public = sender.public();
        Envelope {
            message_id: "m1".into(),
            mesh_id,
            from: public.key,
            from_member: public.key,
            from_enc_key: public.enc_key,
            from_enc_sig: public.enc_sig,
            from_name: "a".into(),
            to,
            client_message_id: "c1".into(),
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
            sig: sealed.sig,
            sent_at: 1,
            expires_at: 2,
        }
    }

    #[test]
    fn direct_and_group_round_trip() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        let content = Content { body: "hi".into(), reply_to: None };
        let to = Target::Key(b.key());
        let sealed = seal(&a, &mesh, "c1", &to, SealKey::Direct(&b.enc_key()), &content);
        assert_eq!(open(&envelope(&a, mesh, to, sealed), &b, None).expect("opens"), content);

        let gk = GroupKey::generate();
        let sealed = seal(&a, &mesh, "c1", &Target::All, SealKey::Group(&gk), &content);
        let env = envelope(&a, mesh, Target::All, sealed);
        assert_eq!(open(&env, &b, Some(&gk)).expect("opens"), content);
        assert_eq!(open(&env, &b, Some(&GroupKey::generate())).unwrap_err().reason(), "decrypt_failed");
    }

    #[test]
    fn the_key_that_opens_a_group_message_tells_its_epoch_and_an_old_key_opens_nothing_newer() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        let (k0, k1, k2) = (GroupKey::generate(), GroupKey::generate(), GroupKey::generate());
        let content = Content { body: "after the rotation".into(), reply_to: None };
        let sealed = seal(&a, &mesh, "c1", &Target::All, SealKey::Group(&k1), &content);
        let env = envelope(&a, mesh, Target::All, sealed);
        let held = [(0, k0.clone()), (2, k2), (1, k1)];
        assert_eq!(open_with(&env, &b, &held).expect("opens"), (content, Some(1)));
        // Someone who kept only the key before it: the real ciphertext stays shut.
        assert_eq!(open_with(&env, &b, &[(0, k0)]).unwrap_err().reason(), "decrypt_failed");
    }

    #[test]
    fn retargeting_or_renaming_breaks_the_signature() {
        let (a, b, c) = (Identity::generate(), Identity::generate(), Identity::generate());
        let mesh = MeshId::generate();
        let gk = GroupKey::generate();
        let content = Content { body: "hi".into(), reply_to: None };
        let sealed = seal(&a, &mesh, "c1", &Target::All, SealKey::Group(&gk), &content);
        let mut env = envelope(&a, mesh, Target::Group("ops".into()), sealed.clone());
        assert_eq!(open(&env, &b, Some(&gk)).unwrap_err().reason(), "invalid");
        env = envelope(&a, mesh, Target::All, sealed);
        env.client_message_id = "c2".into();
        assert_eq!(open(&env, &b, Some(&gk)).unwrap_err().reason(), "invalid");
        let sealed = seal(&a, &mesh, "c1", &Target::Key(b.key()), SealKey::Direct(&b.enc_key()), &content);
        let env = envelope(&a, mesh, Target::Key(b.key()), sealed);
        assert_eq!(open(&env, &c, None).unwrap_err().reason(), "invalid");
    }
}
