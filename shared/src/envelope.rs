//! The signed envelope every MQTT message of Larder travels in.
//!
//! Wire form (version 1):
//!
//! ```text
//! [version: u8 = 1] [payload: postcard(Header, Body)] [signature: 64 bytes]
//! signature = Ed25519(sender key, "larder/envelope/v1\0" || version || payload)
//! ```
//!
//! Message flow: a device publishes `Changes` (its outbox) and `Ack` (of the hub's downlink) on
//! its `up` topic; the hub publishes `Ack` (after its commit), `Changes` (other replicas' changes
//! relayed) on the device's `down` topic, and `Catalog` on the region's retained catalog topic.
//!
//! Decoding is strict: wrong version, trailing bytes, unknown variants, a message larger than the
//! configured maximum or a bad signature are errors, never panics. Decoding ([`open`]) and
//! verifying ([`Unverified::verify`]) are two steps because the verifier must first read the
//! sender to look up its key.

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::ids::{DeviceId, FridgeId, RegionId};
use crate::keys::{PublicKey, SIGNATURE_LEN, SecretKey, Signature};

/// The envelope format version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Default limit on an encoded envelope, in bytes.
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 256 * 1024;
/// Domain separation for envelope signatures.
const SIGNING_DOMAIN: &[u8] = b"larder/envelope/v1\0";
/// Bytes an envelope spends besides its entries' change bytes (header, framing, signature),
/// as an upper bound for batching.
pub const ENVELOPE_OVERHEAD_BYTES_MAX: usize = 1 + 3 * (crate::ids::ID_LEN_MAX + 2) + 40 + 64;

/// Who sent or should receive an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Party {
    /// The hub that owns the region.
    Hub,
    /// An enrolled device.
    Device(DeviceId),
    /// Every device of the region (catalog announcements).
    Region,
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Party::Hub => f.write_str("hub"),
            Party::Device(d) => write!(f, "{d}"),
            Party::Region => f.write_str("region"),
        }
    }
}

/// The signed metadata of every envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub region: RegionId,
    pub sender: Party,
    pub recipient: Party,
    /// Per-sender sequence number: persisted before signing, strictly increasing.
    pub seq: u64,
    /// The sender's clock, for information only.
    pub sent_at_ms: i64,
}

/// What an entry of a reliable stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EntryKind {
    /// An Automerge change of the ledger's epoch `epoch`.
    #[default]
    Change,
    /// The start of epoch `epoch`: a [`Rebase`] (hub to device only).
    Rebase,
}

/// One entry of a reliable stream: a ledger change, or the start of a ledger's new epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the sender's stream to this recipient.
    pub seq: u64,
    pub ledger: FridgeId,
    /// The ledger epoch the change belongs to (see `ledger::compaction`).
    pub epoch: u32,
    pub kind: EntryKind,
    /// A device's entries: the audit-chain hash of its previous entry (see [`crate::audit`]).
    pub prev: Option<[u8; 32]>,
    /// An Automerge change as `Change::raw_bytes` gives it, or a postcard [`Rebase`].
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
}

impl Entry {
    /// A ledger change as the hub relays it (no audit link: that is the author's).
    pub fn change(seq: u64, ledger: FridgeId, epoch: u32, change: Vec<u8>) -> Self {
        Self {
            seq,
            ledger,
            epoch,
            kind: EntryKind::Change,
            prev: None,
            change,
        }
    }

    /// An upper bound of this entry's encoded size.
    pub fn encoded_len_max(&self) -> usize {
        10 + 1 + self.ledger.as_str().len() + 5 + 1 + 33 + 5 + self.change.len()
    }
}

/// A ledger's new epoch, as the hub announces it in every replica's downlink stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebase {
    /// For each replica, the last of its stream entries the hub had merged when it compacted:
    /// the replica carries its own changes after that over to the new epoch.
    pub included: Vec<(DeviceId, u64)>,
    /// The new epoch's document (`Automerge::save`).
    #[serde(with = "serde_bytes")]
    pub base: Vec<u8>,
}

impl Rebase {
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        postcard::from_bytes(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }
}

/// A run of a reliable stream: every entry of the stream to this recipient with
/// `after < seq <= up_to` (a stream may skip numbers, so `entries` can be shorter than the range).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub after: u64,
    pub up_to: u64,
    pub entries: Vec<Entry>,
    /// A device's batches: its signature of the audit-chain hash of the last entry
    /// ([`crate::audit::sign_head`]), kept by the hub as the audit log's checkpoint.
    #[serde(with = "serde_bytes")]
    pub head_sig: Option<Vec<u8>>,
}

impl Batch {
    pub fn new(after: u64, up_to: u64, entries: Vec<Entry>) -> Self {
        Self {
            after,
            up_to,
            entries,
            head_sig: None,
        }
    }
}

/// Acknowledges a reliable stream: everything up to `up_to` is durable at the receiver.
/// `gap` says the receiver saw a batch starting past `up_to`, so the sender should resend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub up_to: u64,
    pub gap: bool,
}

/// What an envelope carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Changes(Batch),
    Ack(Ack),
    Catalog(Catalog),
    /// The hub's time, for the device's trusted clock (hub to device only).
    Time(TimeBeacon),
    /// A device's new key, announced in an envelope signed by its current key (device to hub).
    KeyRotation(crate::rotation::KeyRotation),
    /// The hub took the device's new key: from now on only it (and, for the overlap window,
    /// the old one) verifies (hub to device).
    KeyRotated(crate::rotation::KeyRotated),
}

/// A signed statement of the hub's clock when it sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeBeacon {
    pub hub_ms: i64,
}

impl Body {
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Changes(_) => "changes",
            Body::Ack(_) => "ack",
            Body::Catalog(_) => "catalog",
            Body::Time(_) => "time",
            Body::KeyRotation(_) => "key_rotation",
            Body::KeyRotated(_) => "key_rotated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub header: Header,
    pub body: Body,
}

/// Why an envelope was refused. Every variant is a reason counted in metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("envelope of {len} bytes is over the {max} byte limit")]
    Oversized { len: usize, max: usize },
    #[error("envelope is too short")]
    Truncated,
    #[error("unsupported envelope version {0}")]
    Version(u8),
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("bad signature")]
    BadSignature,
}

impl EnvelopeError {
    /// A short, stable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Oversized { .. } => "oversized",
            EnvelopeError::Truncated | EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::Version(_) => "version",
            EnvelopeError::BadSignature => "bad_signature",
        }
    }
}

impl Envelope {
    /// Encodes and signs the envelope.
    pub fn seal(&self, key: &SecretKey) -> Vec<u8> {
        // Serialising plain data structs into a Vec cannot fail.
        let payload = postcard::to_stdvec(self).unwrap_or_default();
        let signature = key.sign(SIGNING_DOMAIN, &signed_bytes(&payload));
        let mut out = Vec::with_capacity(1 + payload.len() + SIGNATURE_LEN);
        out.push(PROTOCOL_VERSION);
        out.extend_from_slice(&payload);
        out.extend_from_slice(&signature.0);
        out
    }
}

fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + payload.len());
    bytes.push(PROTOCOL_VERSION);
    bytes.extend_from_slice(payload);
    bytes
}

/// A decoded envelope whose signature is not checked yet.
#[derive(Debug)]
pub struct Unverified {
    envelope: Envelope,
    payload_end: usize,
    signature: Signature,
    bytes_len: usize,
}

impl Unverified {
    /// The claimed header, to find the sender's key. Not to be trusted before `verify`.
    pub fn header(&self) -> &Header {
        &self.envelope.header
    }

    pub fn encoded_len(&self) -> usize {
        self.bytes_len
    }

    /// Checks the signature against `key` over the exact bytes received.
    pub fn verify(self, bytes: &[u8], key: &PublicKey) -> Result<Envelope, EnvelopeError> {
        self.verify_any(bytes, std::slice::from_ref(key))
            .map(|(env, _)| env)
    }

    /// Checks the signature against each of `keys` in turn (a device's current key, then keys
    /// a rotation retired that are still inside their overlap window); answers the envelope
    /// and the index of the key that verified it.
    pub fn verify_any(
        self,
        bytes: &[u8],
        keys: &[PublicKey],
    ) -> Result<(Envelope, usize), EnvelopeError> {
        let payload = bytes
            .get(1..self.payload_end)
            .ok_or(EnvelopeError::Truncated)?;
        let signed = signed_bytes(payload);
        keys.iter()
            .position(|k| k.verify(SIGNING_DOMAIN, &signed, &self.signature).is_ok())
            .map(|i| (self.envelope, i))
            .ok_or(EnvelopeError::BadSignature)
    }
}

/// Decodes an envelope strictly, without verifying it.
pub fn open(bytes: &[u8], max_message_bytes: usize) -> Result<Unverified, EnvelopeError> {
    if bytes.len() > max_message_bytes {
        return Err(EnvelopeError::Oversized {
            len: bytes.len(),
            max: max_message_bytes,
        });
    }
    if bytes.len() < 1 + SIGNATURE_LEN + 1 {
        return Err(EnvelopeError::Truncated);
    }
    if bytes[0] != PROTOCOL_VERSION {
        return Err(EnvelopeError::Version(bytes[0]));
    }
    let payload_end = bytes.len() - SIGNATURE_LEN;
    let (envelope, rest): (Envelope, &[u8]) = postcard::take_from_bytes(&bytes[1..payload_end])
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(EnvelopeError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    let mut signature = [0u8; SIGNATURE_LEN];
    signature.copy_from_slice(&bytes[payload_end..]);
    Ok(Unverified {
        envelope,
        payload_end,
        signature: Signature(signature),
        bytes_len: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        Envelope {
            header: Header {
                region: RegionId::new("north").expect("id"),
                sender: Party::Device(DeviceId::new("pos-1").expect("id")),
                recipient: Party::Hub,
                seq: 42,
                sent_at_ms: 1_700_000_000_000,
            },
            body: Body::Changes(Batch {
                after: 3,
                up_to: 4,
                entries: vec![Entry {
                    seq: 4,
                    ledger: FridgeId::new("fridge-1").expect("id"),
                    epoch: 2,
                    kind: EntryKind::Change,
                    prev: Some([7; 32]),
                    change: vec![1, 2, 3, 4],
                }],
                head_sig: Some(vec![9; 64]),
            }),
        }
    }

    #[test]
    fn round_trip_verifies() {
        let key = SecretKey::from_seed([1; 32]);
        let bytes = sample().seal(&key);
        let opened = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes");
        assert_eq!(opened.header(), &sample().header);
        assert_eq!(opened.verify(&bytes, &key.public()), Ok(sample()));
    }

    #[test]
    fn wrong_key_and_every_bit_flip_are_refused() {
        let key = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let bytes = sample().seal(&key);
        let opened = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes");
        assert_eq!(
            opened.verify(&bytes, &other.public()),
            Err(EnvelopeError::BadSignature)
        );
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let verdict = open(&flipped, MAX_MESSAGE_BYTES_DEFAULT)
                .and_then(|u| u.verify(&flipped, &key.public()));
            assert!(verdict.is_err(), "bit {bit} flipped was accepted");
        }
    }

    #[test]
    fn limits_truncation_version_and_trailing_bytes() {
        let key = SecretKey::from_seed([1; 32]);
        let bytes = sample().seal(&key);
        assert!(matches!(
            open(&bytes, bytes.len() - 1),
            Err(EnvelopeError::Oversized { .. })
        ));
        for cut in 0..bytes.len() {
            let r = open(&bytes[..cut], MAX_MESSAGE_BYTES_DEFAULT)
                .and_then(|u| u.verify(&bytes[..cut], &key.public()));
            assert!(r.is_err(), "truncated at {cut} accepted");
        }
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            open(&v2, MAX_MESSAGE_BYTES_DEFAULT).err(),
            Some(EnvelopeError::Version(2))
        );
        let mut trailing = bytes[..bytes.len() - SIGNATURE_LEN].to_vec();
        trailing.push(0);
        trailing.extend_from_slice(&bytes[bytes.len() - SIGNATURE_LEN..]);
        assert!(matches!(
            open(&trailing, MAX_MESSAGE_BYTES_DEFAULT),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = SecretKey::from_seed([1; 32]);
            if let Ok(u) = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT) {
                prop_assert!(u.verify(&bytes, &key.public()).is_err());
            }
        }

        #[test]
        fn round_trips_any_batch(after in 0u64..u64::MAX / 2, seqs in proptest::collection::vec((0u64..1000, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
            let key = SecretKey::from_seed([3; 32]);
            let mut env = sample();
            env.body = Body::Changes(Batch::new(
                after,
                after + 1000,
                seqs.into_iter().map(|(s, change)| Entry::change(
                    after + s + 1,
                    FridgeId::new("f").expect("id"),
                    0,
                    change,
                )).collect(),
            ));
            let bytes = env.seal(&key);
            let back = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).and_then(|u| u.verify(&bytes, &key.public()));
            prop_assert_eq!(back, Ok(env));
        }
    }
}
