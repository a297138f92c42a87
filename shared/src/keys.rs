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

/// One signature to check in a batch: who signed, the domain and message, and the signature.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub key: &'a PublicKey,
    pub domain: &'a [u8],
    pub message: &'a [u8],
    pub sig: &'a Signature,
}

/// Below this many signatures a batch is checked one by one: the batch equation's fixed cost
/// is not worth it.
const BATCH_MIN: usize = 4;

/// [`verify_batch`] where some items could not even be put as a signature check (a malformed
/// signature or message): those are `false`, the rest are checked in one batch.
pub fn verify_batch_some(items: &[Option<Signed<'_>>]) -> Vec<bool> {
    let (at, checks): (Vec<usize>, Vec<Signed<'_>>) = items
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, (*c)?)))
        .unzip();
    let mut ok = vec![false; items.len()];
    for (i, v) in at.into_iter().zip(verify_batch(&checks)) {
        ok[i] = v;
    }
    ok
}

/// Checks many signatures at once and answers, for each, whether it verifies.
///
/// The signatures are checked together with Ed25519 batch verification (one multi-scalar
/// multiplication, about a third of the cost of checking each alone). When the batch fails,
/// it is split in halves until the bad signatures are found, so one forgery costs a few extra
/// batches, not the whole group's worth of single checks; parts smaller than `BATCH_MIN` are
/// checked one by one with [`PublicKey::verify`].
///
/// The verdicts are those of [`PublicKey::verify`] (small-order keys and small-order `R`
/// refused, `s` canonical), with one difference the batch equation allows: a signature whose
/// `R` has a small-order component added, which only the key's holder can make, is refused
/// by `verify` but passes a batch with probability 1/8.
pub fn verify_batch(items: &[Signed<'_>]) -> Vec<bool> {
    let mut verdicts = vec![false; items.len()];
    let messages: Vec<Vec<u8>> = items
        .iter()
        .map(|i| [i.domain, i.message].concat())
        .collect();
    // What `verify_strict` refuses before its equation, refused here the same way.
    let candidates: Vec<usize> = (0..items.len())
        .filter(|&i| {
            let r: [u8; 32] = items[i].sig.0[..32].try_into().unwrap_or([0; 32]);
            let r_ok = curve25519_dalek::edwards::CompressedEdwardsY(r)
                .decompress()
                .is_some_and(|p| !p.is_small_order());
            r_ok && !items[i].key.0.is_weak()
        })
        .collect();
    check_part(items, &messages, &candidates, &mut verdicts);
    verdicts
}

fn check_part(items: &[Signed<'_>], messages: &[Vec<u8>], part: &[usize], verdicts: &mut [bool]) {
    if part.len() < BATCH_MIN {
        for &i in part {
            verdicts[i] = items[i]
                .key
                .verify(items[i].domain, items[i].message, items[i].sig)
                .is_ok();
        }
        return;
    }
    let msgs: Vec<&[u8]> = part.iter().map(|&i| messages[i].as_slice()).collect();
    let sigs: Vec<ed25519_dalek::Signature> = part
        .iter()
        .map(|&i| ed25519_dalek::Signature::from_bytes(&items[i].sig.0))
        .collect();
    let keys: Vec<VerifyingKey> = part.iter().map(|&i| items[i].key.0).collect();
    if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
        for &i in part {
            verdicts[i] = true;
        }
    } else {
        let (a, b) = part.split_at(part.len() / 2);
        check_part(items, messages, a, verdicts);
        check_part(items, messages, b, verdicts);
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

    /// Signs `n` messages with `n` keys; answers keys, messages and signatures.
    fn signed_set(n: usize) -> (Vec<PublicKey>, Vec<Vec<u8>>, Vec<Signature>) {
        let secrets: Vec<SecretKey> = (0..n)
            .map(|i| SecretKey::from_seed([i as u8; 32]))
            .collect();
        let messages: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("message {i}").into_bytes())
            .collect();
        let sigs = secrets
            .iter()
            .zip(&messages)
            .map(|(k, m)| k.sign(b"d", m))
            .collect();
        (
            secrets.iter().map(SecretKey::public).collect(),
            messages,
            sigs,
        )
    }

    fn batch_verdicts(keys: &[PublicKey], messages: &[Vec<u8>], sigs: &[Signature]) -> Vec<bool> {
        let items: Vec<Signed<'_>> = (0..keys.len())
            .map(|i| Signed {
                key: &keys[i],
                domain: b"d",
                message: &messages[i],
                sig: &sigs[i],
            })
            .collect();
        verify_batch(&items)
    }

    proptest::proptest! {
        /// Whatever signatures of a batch are spoiled (a flipped bit in the signature or the
        /// message, or another key's signature), exactly those are refused.
        #[test]
        fn a_batch_refuses_exactly_the_bad_signatures(
            n in 0usize..40,
            spoil in proptest::collection::vec((0usize..40, 0u8..3, 0usize..64), 0..6),
        ) {
            let (keys, mut messages, mut sigs) = signed_set(n);
            let mut bad = vec![false; n];
            for (i, how, byte) in spoil {
                if i >= n {
                    continue;
                }
                match how {
                    0 => sigs[i].0[byte] ^= 1,
                    1 => messages[i].push(b'!'),
                    _ => sigs[i] = sigs[(i + 1) % n],
                }
                bad[i] = keys[i].verify(b"d", &messages[i], &sigs[i]).is_err();
            }
            let verdicts = batch_verdicts(&keys, &messages, &sigs);
            let expected: Vec<bool> = bad.iter().map(|b| !b).collect();
            proptest::prop_assert_eq!(verdicts, expected);
        }
    }

    #[test]
    fn a_batch_refuses_a_small_order_r_as_the_single_check_does() {
        let (keys, messages, mut sigs) = signed_set(8);
        // R = the identity point's encoding (small order), whatever s says.
        sigs[3].0[..32].copy_from_slice(&{
            let mut r = [0u8; 32];
            r[0] = 1;
            r
        });
        let verdicts = batch_verdicts(&keys, &messages, &sigs);
        assert_eq!(verdicts, [true, true, true, false, true, true, true, true]);
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
