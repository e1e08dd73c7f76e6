//! Certificate pins: the SHA-256 of a broker's TLS certificate (its DER bytes), which a mesh records
//! on first contact and every invite carries, so that a self-signed broker is verified with no CA.
//!
//! Written `sha256:` and 64 lowercase hex digits. Read forgivingly: upper case, colons between bytes
//! (`openssl x509 -fingerprint -sha256` prints `sha256 Fingerprint=AB:CD:…`) and a missing prefix are
//! all accepted.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

const PREFIX: &str = "sha256:";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertPin([u8; 32]);

impl CertPin {
    /// The pin of a certificate, from its DER bytes.
    pub fn of_der(der: &[u8]) -> CertPin {
        CertPin(Sha256::digest(der).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a certificate pin: expected sha256: and 64 hex digits (colons allowed)")]
pub struct BadPin(pub String);

impl std::str::FromStr for CertPin {
    type Err = BadPin;

    fn from_str(s: &str) -> Result<CertPin, BadPin> {
        let bad = || BadPin(s.chars().take(120).collect());
        let mut rest = s.trim();
        // `openssl x509 -fingerprint -sha256` output, whole.
        if let Some((label, value)) = rest.split_once('=')
            && label.trim().eq_ignore_ascii_case("sha256 fingerprint")
        {
            rest = value.trim();
        }
        if rest.len() >= PREFIX.len() && rest[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
            rest = &rest[PREFIX.len()..];
        }
        let digits: String = rest.chars().filter(|c| *c != ':').collect();
        if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let bytes = hex::decode(digits.to_ascii_lowercase()).map_err(|_| bad())?;
        Ok(CertPin(bytes.try_into().map_err(|_| bad())?))
    }
}

impl std::fmt::Display for CertPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for CertPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Serialize for CertPin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CertPin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CertPin, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_read_in_every_common_spelling_and_print_one_way() {
        let pin = CertPin::of_der(b"certificate");
        let hex = hex::encode(pin.as_bytes());
        let colons = hex.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).expect("ascii")).collect::<Vec<_>>();
        let upper_colons = colons.join(":").to_ascii_uppercase();
        for spelling in [
            pin.to_string(),
            hex.clone(),
            format!("SHA256:{upper_colons}"),
            format!("sha256 Fingerprint={upper_colons}"),
            format!("  {upper_colons}\n"),
        ] {
            assert_eq!(spelling.parse::<CertPin>(), Ok(pin), "{spelling}");
        }
        assert_eq!(pin.to_string(), format!("sha256:{hex}"));
        let json = serde_json::to_string(&pin).expect("json");
        assert_eq!(serde_json::from_str::<CertPin>(&json).expect("back"), pin);
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in ["", "sha256:", "sha1:abcd", "sha256:zz", &"a".repeat(63), &"a".repeat(65), "md5 Fingerprint=AB"] {
            assert!(bad.parse::<CertPin>().is_err(), "{bad}");
        }
    }
}
