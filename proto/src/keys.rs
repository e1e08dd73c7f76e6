//! Identities: an ed25519 signing key plus a separate X25519 encryption key bound to it by a signature.
//!
//! The signing key is never used for Diffie-Hellman; the encryption key is published together with
//! `enc_sig`, the identity's signature over it, so that anyone can check it belongs to the identity.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::rngs::OsRng;

use crate::ProtoError;
use crate::codec::{self, string_serde};

/// Domain of the signature that binds an encryption key to an identity key.
const ENC_KEY_DOMAIN: &str = "mesh/enc-key/v1";

/// An ed25519 public key: the identity of a member or a session. Shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    fn encode(&self) -> String {
        hex::encode(self.0)
    }

    fn decode(s: &str) -> Result<Self, ProtoError> {
        if s.len() != 64 {
            return Err(ProtoError::encoding("public key", "expected 64 hex digits"));
        }
        Ok(PublicKey(codec::unhex_array("public key", s)?))
    }

    /// The first 8 hex digits, for human output only (never for matching).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Checks `sig` over the domain-separated transcript of `fields`.
    pub fn verify(&self, domain: &str, fields: &[&[u8]], sig: &Sig) -> Result<(), ProtoError> {
        let vk = VerifyingKey::from_bytes(&self.0).map_err(|_| ProtoError::BadKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        vk.verify_strict(&transcript(domain, fields), &sig).map_err(|_| ProtoError::BadSignature)
    }
}
string_serde!(PublicKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

/// An X25519 public key used for crypto_box. Shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncPublicKey(pub [u8; 32]);

impl EncPublicKey {
    fn encode(&self) -> String {
        hex::encode(self.0)
    }

    fn decode(s: &str) -> Result<Self, ProtoError> {
        if s.len() != 64 {
            return Err(ProtoError::encoding("encryption key", "expected 64 hex digits"));
        }
        Ok(EncPublicKey(codec::unhex_array("encryption key", s)?))
    }
}
string_serde!(EncPublicKey);

impl std::fmt::Debug for EncPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncPublicKey({})", hex::encode(&self.0[..4]))
    }
}

/// An ed25519 signature, carried as base64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl Sig {
    fn encode(&self) -> String {
        codec::b64(&self.0)
    }

    fn decode(s: &str) -> Result<Self, ProtoError> {
        Ok(Sig(codec::unb64_array("signature", s)?))
    }
}
string_serde!(Sig);

impl std::fmt::Debug for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sig(..)")
    }
}

/// The bytes that are signed for `fields` under `domain`: the domain, a zero byte, then each field
/// prefixed by its length as a big-endian u32, so that no two field lists share a transcript.
pub fn transcript(domain: &str, fields: &[&[u8]]) -> Vec<u8> {
    let len = domain.len() + 1 + fields.iter().map(|f| f.len() + 4).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(domain.as_bytes());
    out.push(0);
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// The public half of an identity, as published in a roster: the signing key, the encryption key and
/// the signature binding the two.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublicIdentity {
    pub key: PublicKey,
    pub enc_key: EncPublicKey,
    pub enc_sig: Sig,
}

impl PublicIdentity {
    /// Checks that `enc_key` was signed by `key`.
    pub fn verify(&self) -> Result<(), ProtoError> {
        self.key.verify(ENC_KEY_DOMAIN, &[&self.enc_key.0], &self.enc_sig)
    }
}

/// A secret identity: ed25519 signing key and X25519 encryption key. Its `Debug` shows only the public key.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    enc: crypto_box::SecretKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.key().short())
    }
}

impl Identity {
    pub fn generate() -> Self {
        Identity { signing: SigningKey::generate(&mut OsRng), enc: crypto_box::SecretKey::generate(&mut OsRng) }
    }

    /// Rebuilds an identity from its two 32-byte secrets (the ed25519 seed and the X25519 scalar).
    pub fn from_secrets(sign_seed: [u8; 32], enc_secret: [u8; 32]) -> Self {
        Identity { signing: SigningKey::from_bytes(&sign_seed), enc: crypto_box::SecretKey::from(enc_secret) }
    }

    pub fn sign_seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn enc_secret(&self) -> [u8; 32] {
        self.enc.to_bytes()
    }

    pub fn key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    pub fn enc_key(&self) -> EncPublicKey {
        EncPublicKey(*self.enc.public_key().as_bytes())
    }

    pub(crate) fn enc_secret_key(&self) -> &crypto_box::SecretKey {
        &self.enc
    }

    /// The published half, with the signature that binds the encryption key to the signing key.
    pub fn public(&self) -> PublicIdentity {
        let enc_key = self.enc_key();
        PublicIdentity { key: self.key(), enc_key, enc_sig: self.sign(ENC_KEY_DOMAIN, &[&enc_key.0]) }
    }

    /// Signs the domain-separated transcript of `fields` (see [`transcript`]).
    pub fn sign(&self, domain: &str, fields: &[&[u8]]) -> Sig {
        Sig(self.signing.sign(&transcript(domain, fields)).to_bytes())
    }

    /// Signs raw bytes with no domain separation; only for interoperability test vectors.
    pub fn sign_raw(&self, message: &[u8]) -> Sig {
        Sig(self.signing.sign(message).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_identity_binds_enc_key() {
        let id = Identity::generate();
        let public = id.public();
        public.verify().expect("own binding verifies");
        let other = Identity::generate();
        let forged = PublicIdentity { enc_key: other.enc_key(), ..public };
        assert!(matches!(forged.verify(), Err(ProtoError::BadSignature)));
    }

    #[test]
    fn identity_round_trips_through_secrets() {
        let id = Identity::generate();
        let back = Identity::from_secrets(id.sign_seed(), id.enc_secret());
        assert_eq!(back.public(), id.public());
    }

    #[test]
    fn key_text_round_trip_and_rejects_garbage() {
        let key = Identity::generate().key();
        let text = key.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PublicKey>().expect("parses"), key);
        assert!("abc".parse::<PublicKey>().is_err());
        assert!("zz".repeat(32).parse::<PublicKey>().is_err());
    }

    #[test]
    fn transcripts_of_different_splits_differ() {
        assert_ne!(transcript("d", &[b"ab", b"c"]), transcript("d", &[b"a", b"bc"]));
        assert_ne!(transcript("d1", &[b"x"]), transcript("d", &[b"1x"]));
    }
}
