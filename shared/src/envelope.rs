//! The signed envelope every MQTT message of Larder travels in.
//!
//! Wire form (version 3):
//!
//! ```text
//! [version: u8 = 3] [payload: postcard(Header, WireBody)] [signature: 64 bytes]
//! signature = Ed25519(sender key, "larder/envelope/v1\0" || version || payload)
//! WireBody  = Plain(Body) | Sealed { nonce: 24 bytes, ciphertext }
//! ```
//!
//! Versions: a build writes [`PROTOCOL_VERSION`] and reads it and the one before
//! ([`PROTOCOL_VERSION_MIN`], see [`v2`]), and writes that one to a peer that speaks it, so a
//! device one release behind keeps syncing with an upgraded hub. Version 3 adds the store
//! generation to [`Ack`]. A message whose first byte is [`NOTICE_VERSION`] is no envelope but a
//! [`notice`]: the hub's word to a device whose version it does not read, in a form every
//! version from 3 on reads.
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

mod v2;

/// The envelope format version this build writes.
pub const PROTOCOL_VERSION: u8 = 3;
/// The oldest version this build reads, and writes to a peer that speaks no newer one.
pub const PROTOCOL_VERSION_MIN: u8 = 2;
/// The first byte of a protocol [`notice`].
pub const NOTICE_VERSION: u8 = 0;
/// Default limit on an encoded envelope, in bytes.
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 256 * 1024;
/// The shortest an envelope can be: its version, a payload byte and the signature.
pub const ENVELOPE_MIN_BYTES: usize = 1 + 1 + SIGNATURE_LEN;
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
    /// A change the hub made: its signature of it ([`crate::audit::sign_hub_change`]). The hub
    /// sends it with each of its changes (version 3 on); a device keeps both and gives them
    /// back, in its own stream, to a hub whose store lost them.
    #[serde(with = "serde_bytes")]
    pub hub_sig: Option<Vec<u8>>,
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
            hub_sig: None,
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
        10 + 1 + self.ledger.as_str().len() + 5 + 1 + 33 + 5 + self.change.len() + 2 + 64
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
    /// The hub's acknowledgements: the generation of the region store that holds what they
    /// acknowledge (`None` from a device, and in version 2). A device that sees it change knows
    /// the store was restored or rebuilt, and may lack what an earlier generation acknowledged.
    pub generation: Option<Generation>,
    /// With a generation: where it began, if the store was copied from another generation's
    /// (a restore, a promote); `None` for a store made new or empty. Of the hub's own changes a
    /// device kept, it gives back every one not sent by that generation at or below that
    /// position.
    pub origin: Option<Origin>,
}

/// Where a store's generation began: the generation of the store it was copied from, and the
/// change position that copy stood at (the highest number its change table had given). The copy
/// holds every change that generation numbered up to there, and none it numbered after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub generation: Generation,
    pub changes_up_to: u64,
}

impl Ack {
    /// An acknowledgement of everything up to `up_to`, naming no generation.
    pub fn new(up_to: u64, gap: bool) -> Self {
        Self {
            up_to,
            gap,
            generation: None,
            origin: None,
        }
    }
}

/// A store's generation: a random id made when the store is created, restored or rebuilt.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generation(pub [u8; 16]);

impl Generation {
    /// A fresh generation; `None` only if the OS gives no randomness.
    pub fn random() -> Option<Self> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).ok()?;
        Some(Self(id))
    }

    /// The generation written as [`Display`](std::fmt::Display) writes it (32 hex digits).
    pub fn parse(text: &str) -> Option<Self> {
        hex::decode(text).ok()?.try_into().ok().map(Self)
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({self})")
    }
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
    /// Decodes an opened body of this build's version strictly: trailing bytes are refused.
    pub fn decode(plaintext: &[u8]) -> Result<Self, EnvelopeError> {
        Self::decode_version(plaintext, PROTOCOL_VERSION)
    }

    /// Decodes an opened body of envelope version `version` strictly.
    pub fn decode_version(plaintext: &[u8], version: u8) -> Result<Self, EnvelopeError> {
        let (body, rest): (Body, &[u8]) = match version {
            PROTOCOL_VERSION => postcard::take_from_bytes(plaintext),
            2 => postcard::take_from_bytes::<v2::Body>(plaintext).map(|(b, r)| (b.into(), r)),
            v => return Err(EnvelopeError::Version(v)),
        }
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
enum WireBody<B = Body> {
    Plain(B),
    Sealed {
        nonce: [u8; NONCE_LEN],
        #[serde(with = "serde_bytes")]
        ciphertext: Vec<u8>,
    },
}

impl<B> WireBody<B> {
    fn map<C>(self, f: impl FnOnce(B) -> C) -> WireBody<C> {
        match self {
            WireBody::Plain(b) => WireBody::Plain(f(b)),
            WireBody::Sealed { nonce, ciphertext } => WireBody::Sealed { nonce, ciphertext },
        }
    }
}

#[derive(Serialize)]
struct WireRef<'a, B> {
    header: &'a Header,
    body: &'a WireBody<B>,
}

#[derive(Deserialize)]
struct Wire<B> {
    header: Header,
    body: WireBody<B>,
}

/// `body` encoded as envelope version `version` writes it.
fn body_bytes(body: &Body, version: u8) -> Vec<u8> {
    // Serialising plain data structs into a Vec cannot fail.
    match version {
        2 => postcard::to_stdvec(&v2::BodyRef::from(body)),
        _ => postcard::to_stdvec(body),
    }
    .unwrap_or_default()
}

/// A protocol notice: the hub does not read the envelopes of the device it sends this to, and
/// reads versions `min..=max`. Three bytes, `[NOTICE_VERSION, min, max]`, unsigned: a device
/// only logs it and counts it (the device's own topic takes publishes from the hub alone).
pub fn notice(min: u8, max: u8) -> Vec<u8> {
    vec![NOTICE_VERSION, min, max]
}

/// The versions a [`notice`] names, if `bytes` is one.
pub fn read_notice(bytes: &[u8]) -> Option<(u8, u8)> {
    match bytes {
        [NOTICE_VERSION, min, max] => Some((*min, *max)),
        _ => None,
    }
}

/// The version an encoded envelope claims (its first byte), read before anything else.
pub fn wire_version(bytes: &[u8]) -> Option<u8> {
    bytes.first().copied()
}

/// Whether this build reads envelopes of `version`.
pub fn reads_version(version: u8) -> bool {
    (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version)
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
        self.seal_version(key, PROTOCOL_VERSION)
    }

    /// [`Envelope::seal`] in envelope version `version` (this build's or the one before).
    pub fn seal_version(&self, key: &SecretKey, version: u8) -> Vec<u8> {
        let version = version.clamp(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION);
        match version {
            2 => sign_wire(
                &self.header,
                &WireBody::Plain(v2::BodyRef::from(&self.body)),
                key,
                version,
            ),
            _ => sign_wire(&self.header, &WireBody::Plain(&self.body), key, version),
        }
    }

    /// Encodes the envelope with its body sealed with `to` (the sender's key and the
    /// recipient's), then signs it with `key`.
    /// `None` only if the OS gives no randomness for the nonce.
    pub fn seal_to(&self, key: &SecretKey, to: &BoxKey) -> Option<Vec<u8>> {
        self.seal_to_version(key, to, PROTOCOL_VERSION)
    }

    /// [`Envelope::seal_to`] in envelope version `version` (this build's or the one before).
    pub fn seal_to_version(&self, key: &SecretKey, to: &BoxKey, version: u8) -> Option<Vec<u8>> {
        use crypto_box::aead::Aead;
        let version = version.clamp(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION);
        let plaintext = body_bytes(&self.body, version);
        let mut nonce = [0u8; NONCE_LEN];
        // A failed RNG would repeat nonces: never send then. The OS RNG does not fail once
        // the system has booted; an all-zero nonce is refused below rather than used.
        if getrandom::fill(&mut nonce).is_err() || nonce == [0; NONCE_LEN] {
            return None;
        }
        let ciphertext = to.0.encrypt(&nonce.into(), plaintext.as_slice()).ok()?;
        Some(sign_wire(
            &self.header,
            &WireBody::<Body>::Sealed { nonce, ciphertext },
            key,
            version,
        ))
    }
}

fn sign_wire<B: Serialize>(
    header: &Header,
    body: &WireBody<B>,
    key: &SecretKey,
    version: u8,
) -> Vec<u8> {
    // Serialising plain data structs into a Vec cannot fail.
    let payload = postcard::to_stdvec(&WireRef { header, body }).unwrap_or_default();
    let signature = key.sign(SIGNING_DOMAIN, &signed_bytes(version, &payload));
    let mut out = Vec::with_capacity(1 + payload.len() + SIGNATURE_LEN);
    out.push(version);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&signature.0);
    out
}

fn signed_bytes(version: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + payload.len());
    bytes.push(version);
    bytes.extend_from_slice(payload);
    bytes
}

/// A decoded envelope whose signature is not checked yet.
#[derive(Debug)]
pub struct Unverified {
    version: u8,
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

    /// The envelope's version.
    pub fn version(&self) -> u8 {
        self.version
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
        let signed = signed_bytes(self.version, payload);
        let i = keys
            .iter()
            .position(|k| k.verify(SIGNING_DOMAIN, &signed, &self.signature).is_ok())
            .ok_or(EnvelopeError::BadSignature)?;
        Ok((
            Verified {
                version: self.version,
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
                .filter(|s| s.first() == Some(&u.version))?;
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
                version: u.version,
                header: u.header,
                body: u.body,
            })
        })
        .collect()
}

/// An envelope whose signature verified; its body may still be sealed.
#[derive(Debug)]
pub struct Verified {
    version: u8,
    header: Header,
    body: WireBody,
}

impl Verified {
    /// The envelope's version: the one to answer its sender in.
    pub fn version(&self) -> u8 {
        self.version
    }

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
            body: Body::decode_version(&plaintext, self.version)?,
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
    if bytes.len() < ENVELOPE_MIN_BYTES {
        return Err(EnvelopeError::Truncated);
    }
    let version = bytes[0];
    let payload_end = bytes.len() - SIGNATURE_LEN;
    let payload = &bytes[1..payload_end];
    let (wire, rest): (Wire<Body>, &[u8]) = match version {
        PROTOCOL_VERSION => postcard::take_from_bytes(payload),
        2 => postcard::take_from_bytes::<Wire<v2::Body>>(payload).map(|(w, rest)| {
            let body = w.body.map(Body::from);
            (
                Wire {
                    header: w.header,
                    body,
                },
                rest,
            )
        }),
        v => return Err(EnvelopeError::Version(v)),
    }
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
        version,
        header: wire.header,
        body: wire.body,
        payload_end,
        signature: Signature(signature),
        bytes_len: bytes.len(),
    })
}

#[cfg(test)]
mod tests;
