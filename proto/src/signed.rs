//! Signed claims: a JSON payload carried as the exact bytes that were signed (base64), plus an ed25519
//! signature over a domain-separated transcript of those bytes. Verifiers never re-serialise, so no
//! canonical JSON is needed.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ProtoError;
use crate::codec;
use crate::keys::{Identity, PublicKey, Sig};

/// A kind of claims: its signature domain and which key must have signed it.
pub trait Claims: Serialize + DeserializeOwned {
    const DOMAIN: &'static str;
    fn signer(&self) -> &PublicKey;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// Base64 of the JSON bytes of the claims.
    pub payload: String,
    pub sig: Sig,
}

impl Signed {
    /// Signs `claims` with `identity`, which must be the claims' signer.
    pub fn sign<C: Claims>(identity: &Identity, claims: &C) -> Signed {
        debug_assert_eq!(claims.signer(), &identity.key(), "claims signed by a key that is not their signer");
        let bytes = serde_json::to_vec(claims).expect("claims serialise to JSON");
        let sig = identity.sign(C::DOMAIN, &[&bytes]);
        Signed { payload: codec::b64(&bytes), sig }
    }

    /// Decodes the claims and checks they were signed by their own signer.
    pub fn open<C: Claims>(&self) -> Result<C, ProtoError> {
        let bytes = codec::unb64("signed payload", &self.payload)?;
        let claims: C = serde_json::from_slice(&bytes).map_err(ProtoError::Claims)?;
        claims.signer().verify(C::DOMAIN, &[&bytes], &self.sig)?;
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Demo {
        by: PublicKey,
        n: u32,
    }
    impl Claims for Demo {
        const DOMAIN: &'static str = "mesh/demo/v1";
        fn signer(&self) -> &PublicKey {
            &self.by
        }
    }

    #[test]
    fn sign_open_and_reject_tampering() {
        let id = Identity::generate();
        let signed = Signed::sign(&id, &Demo { by: id.key(), n: 7 });
        assert_eq!(signed.open::<Demo>().expect("verifies").n, 7);

        let other = Identity::generate();
        let forged = Demo { by: other.key(), n: 7 };
        let tampered = Signed { payload: codec::b64(&serde_json::to_vec(&forged).expect("json")), sig: signed.sig };
        assert!(matches!(tampered.open::<Demo>(), Err(ProtoError::BadSignature)));

        let garbage = Signed { payload: "!!".into(), sig: signed.sig };
        assert!(garbage.open::<Demo>().is_err());
    }
}
