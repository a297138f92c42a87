//! Ed25519 key newtypes: `SecretKey` (never printed), `PublicKey` (hex on the wire and in
//! configs), `Signature`, and domain-separated signing with `verify_strict`.
//!
//! Reading and writing key files is the callers' job (this crate does no IO); this module gives
//! the text form a key file holds.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a signature in bytes.
pub const SIGNATURE_LEN: usize = 64;

/// Why a key or signature could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key is not 64 hex digits")]
    BadHex,
    #[error("not a valid Ed25519 public key")]
    BadPoint,
    #[error("the system random number generator failed: {0}")]
    Random(String),
    #[error("signature does not verify")]
    BadSignature,
}

/// A device's or hub's signing key. `Debug` prints `SecretKey(..)`.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// A key from a 32-byte seed (tests and simulations derive keys from a seed).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `domain || message`; `domain` names the protocol and its version.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> Signature {
        let mut bytes = Vec::with_capacity(domain.len() + message.len());
        bytes.extend_from_slice(domain);
        bytes.extend_from_slice(message);
        Signature(self.0.sign(&bytes).to_bytes())
    }

    /// The X25519 secret of this key (its clamped Ed25519 scalar), for sealing envelope bodies
    /// to and from it without a second key to distribute.
    pub(crate) fn x25519_secret(&self) -> [u8; 32] {
        self.0.to_scalar_bytes()
    }

    /// The text a key file holds: 64 hex digits and a newline.
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex::encode(self.0.to_bytes()))
    }

    /// Parses what [`SecretKey::to_file_text`] wrote (surrounding whitespace allowed).
    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(KeyError::BadHex)?;
        Ok(Self(SigningKey::from_bytes(&bytes)))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// An Ed25519 public key; text form is 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::BadPoint)
    }

    /// The X25519 public key of this key (its Montgomery form).
    pub(crate) fn x25519_public(&self) -> [u8; 32] {
        self.0.to_montgomery().to_bytes()
    }

    /// Verifies a signature made by [`SecretKey::sign`] with the same domain, strictly
    /// (rejecting small-order keys and non-canonical signatures).
    pub fn verify(&self, domain: &[u8], message: &[u8], sig: &Signature) -> Result<(), KeyError> {
        let mut bytes = Vec::with_capacity(domain.len() + message.len());
        bytes.extend_from_slice(domain);
        bytes.extend_from_slice(message);
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        self.0
            .verify_strict(&bytes, &sig)
            .map_err(|_| KeyError::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = hex::decode(s.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(KeyError::BadHex)?;
        Self::from_bytes(&bytes)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let key = SecretKey::from_seed([7; 32]);
        let sig = key.sign(b"larder/test/v1", b"hello");
        assert!(
            key.public()
                .verify(b"larder/test/v1", b"hello", &sig)
                .is_ok()
        );
        assert_eq!(
            key.public().verify(b"larder/other/v1", b"hello", &sig),
            Err(KeyError::BadSignature)
        );
        assert_eq!(
            key.public().verify(b"larder/test/v1", b"hellO", &sig),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn text_forms_round_trip_and_secret_is_not_printed() {
        let key = SecretKey::generate().expect("system rng");
        let again = SecretKey::from_file_text(&key.to_file_text()).expect("round trip");
        assert_eq!(key.public(), again.public());
        let public: PublicKey = key.public().to_string().parse().expect("parse");
        assert_eq!(public, key.public());
        assert_eq!(format!("{key:?}"), "SecretKey(..)");
        assert_eq!("abc".parse::<PublicKey>(), Err(KeyError::BadHex));
    }

    #[test]
    fn small_order_public_key_is_refused_by_verify_strict() {
        // The identity point: a small-order key that `verify_strict` must refuse.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        if let Ok(key) = PublicKey::from_bytes(&identity) {
            let sig = Signature([0; 64]);
            assert!(key.verify(b"d", b"m", &sig).is_err());
        }
    }
}
