//! Byte compatibility with libsodium, proven on vectors that libsodium itself produced
//! (`tests/vectors/gen_vectors.py`, run through PyNaCl).

use mesh_proto::crypto::{self, GroupKey};
use mesh_proto::{EncPublicKey, Identity};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    sign: Vec<SignVector>,
    #[serde(rename = "box")]
    boxes: Vec<BoxVector>,
    secretbox: Vec<SecretboxVector>,
}

#[derive(Deserialize)]
struct SignVector {
    seed: String,
    public: String,
    message: String,
    signature: String,
}

#[derive(Deserialize)]
struct BoxVector {
    sender_secret: String,
    sender_public: String,
    recipient_secret: String,
    recipient_public: String,
    nonce: String,
    message: String,
    ciphertext: String,
}

#[derive(Deserialize)]
struct SecretboxVector {
    key: String,
    nonce: String,
    message: String,
    ciphertext: String,
}

fn vectors() -> Vectors {
    serde_json::from_str(include_str!("vectors/libsodium.json")).expect("vector file parses")
}

fn bytes(s: &str) -> Vec<u8> {
    hex::decode(s).expect("vector hex")
}

fn array<const N: usize>(s: &str) -> [u8; N] {
    bytes(s).try_into().expect("vector length")
}

#[test]
fn ed25519_signatures_match_libsodium() {
    let v = vectors();
    assert!(!v.sign.is_empty());
    for case in &v.sign {
        let id = Identity::from_secrets(array(&case.seed), [1u8; 32]);
        assert_eq!(id.key().0, array::<32>(&case.public), "public key from seed");
        assert_eq!(id.sign_raw(&bytes(&case.message)).0, array::<64>(&case.signature), "signature");
    }
}

#[test]
fn crypto_box_matches_libsodium_both_ways() {
    let v = vectors();
    assert!(!v.boxes.is_empty());
    for case in &v.boxes {
        let sender = Identity::from_secrets([2u8; 32], array(&case.sender_secret));
        let recipient = Identity::from_secrets([3u8; 32], array(&case.recipient_secret));
        assert_eq!(sender.enc_key().0, array::<32>(&case.sender_public), "X25519 public key");
        assert_eq!(recipient.enc_key().0, array::<32>(&case.recipient_public), "X25519 public key");
        let nonce: [u8; 24] = array(&case.nonce);
        let message = bytes(&case.message);
        let ours = crypto::box_seal_with_nonce(&sender, &EncPublicKey(array(&case.recipient_public)), &nonce, &message);
        assert_eq!(ours.ciphertext, bytes(&case.ciphertext), "crypto_box_easy output");
        let opened = crypto::box_open(&recipient, &sender.enc_key(), &nonce, &bytes(&case.ciphertext))
            .expect("opens libsodium's box");
        assert_eq!(opened, message);
        let mut tampered = bytes(&case.ciphertext);
        tampered[0] ^= 0x80;
        assert!(crypto::box_open(&recipient, &sender.enc_key(), &nonce, &tampered).is_err());
    }
}

#[test]
fn crypto_secretbox_matches_libsodium_both_ways() {
    let v = vectors();
    assert!(!v.secretbox.is_empty());
    for case in &v.secretbox {
        let key = GroupKey::from_bytes(array(&case.key));
        let nonce: [u8; 24] = array(&case.nonce);
        let message = bytes(&case.message);
        assert_eq!(crypto::secretbox_seal_with_nonce(&key, &nonce, &message).ciphertext, bytes(&case.ciphertext));
        assert_eq!(crypto::secretbox_open(&key, &nonce, &bytes(&case.ciphertext)).expect("opens"), message);
    }
}
