//! Encodings shared by the wire types: lowercase hex for keys and ids, standard base64 (padded) for
//! other bytes, URL-safe base64 without padding for tokens a user copies.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::ProtoError;

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn unb64(what: &'static str, s: &str) -> Result<Vec<u8>, ProtoError> {
    STANDARD.decode(s).map_err(|e| ProtoError::encoding(what, e))
}

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unb64url(what: &'static str, s: &str) -> Result<Vec<u8>, ProtoError> {
    URL_SAFE_NO_PAD.decode(s).map_err(|e| ProtoError::encoding(what, e))
}

/// Decodes `N` bytes of lowercase hex. Keys are compared and signed in this one form, so another
/// spelling of the same bytes (upper case) is refused rather than read: it would route to a key that
/// then fails to verify what the sender signed.
pub fn unhex_array<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], ProtoError> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ProtoError::encoding(what, "hex must be lower case"));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|e| ProtoError::encoding(what, e))?;
    Ok(out)
}

/// Decodes exactly `N` bytes of base64.
pub fn unb64_array<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], ProtoError> {
    let v = unb64(what, s)?;
    v.try_into().map_err(|v: Vec<u8>| ProtoError::encoding(what, format!("expected {N} bytes, got {}", v.len())))
}

/// `#[serde(with = "mesh_proto::codec::b64_bytes")]` for a `Vec<u8>` carried as base64.
pub mod b64_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::b64(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::unb64("bytes", &s).map_err(serde::de::Error::custom)
    }
}

/// Implements `Display`, `FromStr`, `Serialize` and `Deserialize` through a pair of string functions.
macro_rules! string_serde {
    ($ty:ty) => {
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.encode())
            }
        }
        impl std::str::FromStr for $ty {
            type Err = $crate::ProtoError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::decode(s)
            }
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.encode())
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::decode(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use string_serde;
