//! The signed envelope every MQTT message of Larder travels in.
//!
//! Wire form (version 2):
//!
//! ```text
//! [version: u8 = 2] [payload: postcard(Header, WireBody)] [signature: 64 bytes]
//! signature = Ed25519(sender key, "larder/envelope/v1\0" || version || payload)
//! WireBody  = Plain(Body) | Sealed { nonce: 24 bytes, ciphertext }
//! ```
//!
//! On a device's own topics (`up`, `down`) the body is sealed to its recipient: a `crypto_box`
//! `ChaChaBox` (X25519 key agreement, XChaCha20-Poly1305, a random 24-byte nonce) between the
//! sender's and the recipient's keys, the X25519 forms of their Ed25519 keys. The recipient is
//! named in the header, and the signature covers header and ciphertext together. Another
//! device that reads the topic learns nothing of the body, and cannot pass it off as its own:
//! it would have to sign it, and the box only opens between the two keys that made it. Only
//! the region's catalog, which every device of the region may read, travels in clear.
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
pub const PROTOCOL_VERSION: u8 = 2;
/// Default limit on an encoded envelope, in bytes.
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 256 * 1024;
/// Domain separation for envelope signatures.
const SIGNING_DOMAIN: &[u8] = b"larder/envelope/v1\0";
/// Bytes an envelope spends besides its entries' change bytes (header, framing, signature),
/// as an upper bound for batching.
pub const ENVELOPE_OVERHEAD_BYTES_MAX: usize =
    1 + 3 * (crate::ids::ID_LEN_MAX + 2) + 40 + 64 + SEAL_OVERHEAD_BYTES;
/// What sealing adds to a body: the variant tag, nonce, length prefix and AEAD tag.
const SEAL_OVERHEAD_BYTES: usize = 1 + NONCE_LEN + 5 + 16;
const NONCE_LEN: usize = 24;

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
    /// A change its sender could not send, being larger than a message may carry: `change`
    /// holds the change's SHA-256 instead of its bytes, so the audit chain goes on. The
    /// receiver records it (a metric and an alert) and applies nothing; the entries behind it
    /// flow as usual. No write path makes such a change (see `limits::CHANGE_BYTES_MAX`): this
    /// is the sync core's guard, for one made by a bug or stored before that limit.
    Withheld,
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

    /// This entry with its change's SHA-256 in place of the change ([`EntryKind::Withheld`]).
    pub fn withheld(self) -> Self {
        Self {
            kind: EntryKind::Withheld,
            change: crate::audit::change_digest(&self.change).to_vec(),
            ..self
        }
    }

    /// The SHA-256 of the change this entry carries or, withheld, stands for; `None` for a
    /// withheld entry whose digest is not 32 bytes.
    pub fn change_digest(&self) -> Option<[u8; 32]> {
        match self.kind {
            EntryKind::Withheld => <[u8; 32]>::try_from(self.change.as_slice()).ok(),
            _ => Some(crate::audit::change_digest(&self.change)),
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
    /// Decodes an opened body strictly: trailing bytes are refused.
    pub fn decode(plaintext: &[u8]) -> Result<Self, EnvelopeError> {
        let (body, rest): (Body, &[u8]) = postcard::take_from_bytes(plaintext)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(EnvelopeError::Malformed(format!(
                "{} trailing bytes in the sealed body",
                rest.len()
            )));
        }
        Ok(body)
    }

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

/// The body as it travels: in clear (the catalog) or sealed to the recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum WireBody {
    Plain(Body),
    Sealed {
        nonce: [u8; NONCE_LEN],
        #[serde(with = "serde_bytes")]
        ciphertext: Vec<u8>,
    },
}

#[derive(Serialize)]
struct WireRef<'a> {
    header: &'a Header,
    body: &'a WireBody,
}

#[derive(Deserialize)]
struct Wire {
    header: Header,
    body: WireBody,
}

/// The key two parties seal envelope bodies with: X25519 agreement between one's own key and
/// the peer's public key (each the X25519 form of an Ed25519 key), precomputed once.
pub struct BoxKey(crypto_box::ChaChaBox);

impl BoxKey {
    pub fn new(own: &SecretKey, peer: &PublicKey) -> Self {
        let own = crypto_box::SecretKey::from(own.x25519_secret());
        let peer = crypto_box::PublicKey::from(peer.x25519_public());
        Self(crypto_box::ChaChaBox::new(&peer, &own))
    }
}

impl std::fmt::Debug for BoxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxKey(..)")
    }
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
    #[error("a body that must be sealed to its recipient came in clear")]
    NotSealed,
    #[error("a sealed body where a clear one was expected")]
    UnexpectedSeal,
    #[error("the sealed body does not open with the recipient's key")]
    Undecryptable,
}

impl EnvelopeError {
    /// A short, stable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Oversized { .. } => "oversized",
            EnvelopeError::Truncated | EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::Version(_) => "version",
            EnvelopeError::BadSignature => "bad_signature",
            EnvelopeError::NotSealed => "not_sealed",
            EnvelopeError::UnexpectedSeal => "unexpected_seal",
            EnvelopeError::Undecryptable => "undecryptable",
        }
    }
}

impl Envelope {
    /// Encodes and signs the envelope with its body in clear (for the region's catalog).
    pub fn seal(&self, key: &SecretKey) -> Vec<u8> {
        let body = WireBody::Plain(self.body.clone());
        sign_wire(&self.header, &body, key)
    }

    /// Encodes the envelope with its body sealed with `to` (the sender's key and the
    /// recipient's), then signs it with `key`.
    /// `None` only if the OS gives no randomness for the nonce.
    pub fn seal_to(&self, key: &SecretKey, to: &BoxKey) -> Option<Vec<u8>> {
        use crypto_box::aead::Aead;
        // Serialising plain data structs into a Vec cannot fail.
        let plaintext = postcard::to_stdvec(&self.body).unwrap_or_default();
        let mut nonce = [0u8; NONCE_LEN];
        // A failed RNG would repeat nonces: never send then. The OS RNG does not fail once
        // the system has booted; an all-zero nonce is refused below rather than used.
        if getrandom::fill(&mut nonce).is_err() || nonce == [0; NONCE_LEN] {
            return None;
        }
        let ciphertext = to.0.encrypt(&nonce.into(), plaintext.as_slice()).ok()?;
        Some(sign_wire(
            &self.header,
            &WireBody::Sealed { nonce, ciphertext },
            key,
        ))
    }
}

fn sign_wire(header: &Header, body: &WireBody, key: &SecretKey) -> Vec<u8> {
    // Serialising plain data structs into a Vec cannot fail.
    let payload = postcard::to_stdvec(&WireRef { header, body }).unwrap_or_default();
    let signature = key.sign(SIGNING_DOMAIN, &signed_bytes(&payload));
    let mut out = Vec::with_capacity(1 + payload.len() + SIGNATURE_LEN);
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&signature.0);
    out
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
    header: Header,
    body: WireBody,
    payload_end: usize,
    signature: Signature,
    bytes_len: usize,
}

impl Unverified {
    /// The claimed header, to find the sender's key. Not to be trusted before `verify`.
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn encoded_len(&self) -> usize {
        self.bytes_len
    }

    /// Checks the signature against `key` over the exact bytes received.
    pub fn verify(self, bytes: &[u8], key: &PublicKey) -> Result<Verified, EnvelopeError> {
        self.verify_any(bytes, std::slice::from_ref(key))
            .map(|(env, _)| env)
    }

    /// Checks the signature against each of `keys` in turn (a device's current key, then keys
    /// a rotation retired that are still inside their overlap window); answers the verified
    /// envelope and the index of the key that verified it.
    pub fn verify_any(
        self,
        bytes: &[u8],
        keys: &[PublicKey],
    ) -> Result<(Verified, usize), EnvelopeError> {
        let payload = bytes
            .get(1..self.payload_end)
            .ok_or(EnvelopeError::Truncated)?;
        let signed = signed_bytes(payload);
        let i = keys
            .iter()
            .position(|k| k.verify(SIGNING_DOMAIN, &signed, &self.signature).is_ok())
            .ok_or(EnvelopeError::BadSignature)?;
        Ok((
            Verified {
                header: self.header,
                body: self.body,
            },
            i,
        ))
    }
}

/// Checks many envelopes' signatures at once, each against one key (one Ed25519 batch, see
/// [`crate::keys::verify_batch`]). Answers each envelope verified, or `None` when its
/// signature does not verify under that key (for the caller to try its sender's other keys,
/// one by one, or to refuse it).
pub fn verify_batch(items: Vec<(Unverified, &[u8], PublicKey)>) -> Vec<Option<Verified>> {
    let checks: Vec<Option<crate::keys::Signed<'_>>> = items
        .iter()
        .map(|(u, bytes, key)| {
            let message = bytes
                .get(..u.payload_end)
                .filter(|s| s.first() == Some(&PROTOCOL_VERSION))?;
            Some(crate::keys::Signed {
                key,
                domain: SIGNING_DOMAIN,
                message,
                sig: &u.signature,
            })
        })
        .collect();
    let ok = crate::keys::verify_batch_some(&checks);
    drop(checks);
    items
        .into_iter()
        .zip(ok)
        .map(|((u, _, _), ok)| {
            ok.then_some(Verified {
                header: u.header,
                body: u.body,
            })
        })
        .collect()
}

/// An envelope whose signature verified; its body may still be sealed.
#[derive(Debug)]
pub struct Verified {
    header: Header,
    body: WireBody,
}

impl Verified {
    /// The envelope of a body sent in clear (the catalog); a sealed one is refused.
    pub fn plain(self) -> Result<Envelope, EnvelopeError> {
        match self.body {
            WireBody::Plain(body) => Ok(Envelope {
                header: self.header,
                body,
            }),
            WireBody::Sealed { .. } => Err(EnvelopeError::UnexpectedSeal),
        }
    }

    /// Opens a body sealed to us with the first of `keys` that opens it (the recipient's own
    /// key with the sender's; a device mid-rotation tries both of its keys). A body in clear
    /// is refused: on a device's topics everything is sealed.
    pub fn open_sealed(self, keys: &[&BoxKey]) -> Result<Envelope, EnvelopeError> {
        use crypto_box::aead::Aead;
        let WireBody::Sealed { nonce, ciphertext } = &self.body else {
            return Err(EnvelopeError::NotSealed);
        };
        let plaintext = keys
            .iter()
            .find_map(|k| k.0.decrypt(&(*nonce).into(), ciphertext.as_slice()).ok())
            .ok_or(EnvelopeError::Undecryptable)?;
        Ok(Envelope {
            header: self.header,
            body: Body::decode(&plaintext)?,
        })
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
    let (wire, rest): (Wire, &[u8]) = postcard::take_from_bytes(&bytes[1..payload_end])
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
        header: wire.header,
        body: wire.body,
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
    fn a_batch_verifies_the_good_envelopes_and_hands_back_the_others() {
        let keys: Vec<SecretKey> = (0..12).map(|i| SecretKey::from_seed([i + 1; 32])).collect();
        let mut wires: Vec<Vec<u8>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut e = sample();
                e.header.seq = i as u64;
                e.seal(k)
            })
            .collect();
        // A flipped signature bit, and an envelope checked against another device's key.
        let last = wires[4].len() - 1;
        wires[4][last] ^= 1;
        let items: Vec<(Unverified, &[u8], PublicKey)> = wires
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let key = if i == 9 {
                    keys[0].public()
                } else {
                    keys[i].public()
                };
                (
                    open(w, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes"),
                    w.as_slice(),
                    key,
                )
            })
            .collect();
        let results = verify_batch(items);
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(v) => {
                    assert!(i != 4 && i != 9, "envelope {i} must not verify");
                    assert_eq!(v.plain().expect("plain").header.seq, i as u64);
                }
                None => assert!(i == 4 || i == 9, "envelope {i} must verify"),
            }
        }
    }

    #[test]
    fn round_trip_verifies() {
        let key = SecretKey::from_seed([1; 32]);
        let bytes = sample().seal(&key);
        let opened = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes");
        assert_eq!(opened.header(), &sample().header);
        assert_eq!(
            opened
                .verify(&bytes, &key.public())
                .and_then(Verified::plain),
            Ok(sample())
        );
    }

    #[test]
    fn a_sealed_body_opens_for_its_recipient_only() {
        let device = SecretKey::from_seed([1; 32]);
        let hub = SecretKey::from_seed([2; 32]);
        let other = SecretKey::from_seed([3; 32]);
        let bytes = sample()
            .seal_to(&device, &BoxKey::new(&device, &hub.public()))
            .expect("sealed");
        let change = [1u8, 2, 3, 4];
        assert!(
            !bytes.windows(change.len()).any(|w| w == change),
            "the change bytes travel in clear"
        );
        let open_with = |key: &BoxKey| {
            open(&bytes, MAX_MESSAGE_BYTES_DEFAULT)
                .and_then(|u| u.verify(&bytes, &device.public()))
                .and_then(|v| v.open_sealed(&[key]))
        };
        // The hub opens it with its key and the device's public key.
        assert_eq!(
            open_with(&BoxKey::new(&hub, &device.public())),
            Ok(sample())
        );
        // Another device of the region, reading the topic, cannot.
        assert_eq!(
            open_with(&BoxKey::new(&other, &device.public())),
            Err(EnvelopeError::Undecryptable)
        );
        assert_eq!(
            open_with(&BoxKey::new(&other, &hub.public())),
            Err(EnvelopeError::Undecryptable)
        );
        // A sealed body is not taken as a clear one, nor a clear one where sealing is required.
        let sealed = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT)
            .and_then(|u| u.verify(&bytes, &device.public()))
            .and_then(Verified::plain);
        assert_eq!(sealed, Err(EnvelopeError::UnexpectedSeal));
        let clear = sample().seal(&device);
        let verdict = open(&clear, MAX_MESSAGE_BYTES_DEFAULT)
            .and_then(|u| u.verify(&clear, &device.public()))
            .and_then(|v| v.open_sealed(&[&BoxKey::new(&hub, &device.public())]));
        assert_eq!(verdict, Err(EnvelopeError::NotSealed));
        // Two seals of the same envelope differ (fresh nonces).
        let again = sample()
            .seal_to(&device, &BoxKey::new(&device, &hub.public()))
            .expect("sealed");
        assert_ne!(bytes, again);
    }

    #[test]
    fn every_bit_flip_of_a_sealed_envelope_is_refused() {
        let device = SecretKey::from_seed([1; 32]);
        let hub = SecretKey::from_seed([2; 32]);
        let bytes = sample()
            .seal_to(&device, &BoxKey::new(&device, &hub.public()))
            .expect("sealed");
        let hub_box = BoxKey::new(&hub, &device.public());
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let verdict = open(&flipped, MAX_MESSAGE_BYTES_DEFAULT)
                .and_then(|u| u.verify(&flipped, &device.public()))
                .and_then(|v| v.open_sealed(&[&hub_box]));
            assert!(verdict.is_err(), "bit {bit} flipped was accepted");
        }
    }

    #[test]
    fn wrong_key_and_every_bit_flip_are_refused() {
        let key = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let bytes = sample().seal(&key);
        let opened = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes");
        assert_eq!(
            opened.verify(&bytes, &other.public()).map(|_| ()),
            Err(EnvelopeError::BadSignature)
        );
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let verdict = open(&flipped, MAX_MESSAGE_BYTES_DEFAULT)
                .and_then(|u| u.verify(&flipped, &key.public()))
                .and_then(Verified::plain);
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
                .and_then(|u| u.verify(&bytes[..cut], &key.public()))
                .and_then(Verified::plain);
            assert!(r.is_err(), "truncated at {cut} accepted");
        }
        let mut v2 = bytes.clone();
        v2[0] = 3;
        assert_eq!(
            open(&v2, MAX_MESSAGE_BYTES_DEFAULT).err(),
            Some(EnvelopeError::Version(3))
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
            let back = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).and_then(|u| u.verify(&bytes, &key.public())).and_then(Verified::plain);
            prop_assert_eq!(back, Ok(env));
        }
    }
}
