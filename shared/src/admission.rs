//! Uplink admission: the hub's rules for an envelope on a device's `up` topic, with no IO.
//!
//! Bytes, what the hub knows of the device, the device's stream positions and the region's
//! state go in; what the envelope asks of the region, or a typed rejection, comes out. The
//! region writer and the protocol simulation both run these rules (as every caller of
//! Automerge's sync runs its one library function): neither keeps a copy.
//!
//! The checks, in order (docs/PROTOCOL.md, "What the hub rejects"):
//! 1. [`check_header`]: the envelope opens (size, decoding), names this region, was sent by the
//!    device whose topic it came on, and is addressed to the hub;
//! 2. [`check_device`]: the sender is enrolled and not revoked;
//! 3. the signature, by the key in force or a retired key inside its overlap, and the sealed
//!    body opened ([`verify_and_open`], or the hub's batch check ahead of it);
//! 4. [`admit_body`]: not a replay, and the body's own rules: changes only of the device's
//!    ledgers, of the current epoch, authored by the device, in stream order; an ack no further
//!    than the region committed; a key rotation proved by the key in force.
//!
//! A rejected envelope changes nothing: the caller stores nothing of it.

use crate::envelope::{
    self, Ack, Body, BoxKey, Entry, EntryKind, Envelope, EnvelopeError, Header, Party, Unverified,
};
use crate::ledger::{self, Ledger, LedgerError};
use crate::reliable::{Receipt, StreamReceiver};
use crate::{DeviceId, FridgeId, PublicKey, RegionId};

#[cfg(test)]
mod tests;

/// A device's stream positions as the hub keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// The last envelope sequence number taken from the device: anything at or below is a
    /// replay.
    pub last_env_seq: u64,
    /// The device's uplink stream position the hub holds everything up to.
    pub up_hwm: u64,
    /// The downlink stream position the device acknowledged.
    pub down_acked: u64,
    /// The audit-chain hash of the device's last change the hub stored.
    pub chain_head: [u8; 32],
}

/// What the hub knows of an enrolled device.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    pub id: &'a DeviceId,
    /// The ledgers it holds, the only ones it may change.
    pub fridges: &'a [FridgeId],
    pub revoked: bool,
    /// The key in force.
    pub key: PublicKey,
}

/// Why an envelope was refused; [`Rejection::reason`] is its metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("the envelope names another region")]
    WrongRegion,
    #[error("the envelope's sender is not the device whose topic it came on")]
    WrongTopic,
    #[error("the envelope is not addressed to the hub")]
    WrongRecipient,
    #[error("the sender is not enrolled")]
    UnknownDevice,
    #[error("the sender was revoked")]
    RevokedDevice,
    #[error("the envelope's sequence number was taken before")]
    Replayed,
    #[error("a change of a ledger the device does not hold")]
    ForeignLedger,
    #[error("a malformed entry")]
    Malformed,
    #[error("a change of an epoch the ledger has left")]
    StaleEpoch,
    #[error("a change of an epoch the ledger has not reached")]
    FutureEpoch,
    #[error("a change authored by another actor")]
    ForeignActor,
    #[error("a change given back as the hub's that the hub's key did not sign")]
    BadHubSignature,
    #[error("a key rotation signed by a retired key")]
    RetiredKey,
    #[error("a key rotation whose proof does not hold")]
    BadRotationProof,
    #[error("a kind of body a device does not send")]
    UnexpectedKind,
}

impl Rejection {
    /// The reason as a metrics label and log field.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Envelope(e) => e.reason(),
            Self::WrongRegion => "wrong_region",
            Self::WrongTopic => "wrong_topic",
            Self::WrongRecipient => "wrong_recipient",
            Self::UnknownDevice => "unknown_device",
            Self::RevokedDevice => "revoked_device",
            Self::Replayed => "replayed",
            Self::ForeignLedger => "foreign_ledger",
            Self::Malformed => "malformed",
            Self::StaleEpoch => "stale_epoch",
            Self::FutureEpoch => "future_epoch",
            Self::ForeignActor => "foreign_actor",
            Self::BadHubSignature => "bad_hub_signature",
            Self::RetiredKey => "retired_key",
            Self::BadRotationProof => "bad_rotation_proof",
            Self::UnexpectedKind => "unexpected_kind",
        }
    }
}

/// Step 1: opens `bytes` and checks the header against the region and the topic's device.
/// Answers the unverified envelope (its signature is not checked yet).
pub fn check_header(
    bytes: &[u8],
    max_message_bytes: usize,
    region: &RegionId,
    topic_device: &DeviceId,
) -> Result<Unverified, Rejection> {
    let opened = envelope::open(bytes, max_message_bytes)?;
    let h = opened.header();
    if &h.region != region {
        return Err(Rejection::WrongRegion);
    }
    match &h.sender {
        Party::Device(sender) if sender == topic_device => {}
        _ => return Err(Rejection::WrongTopic),
    }
    if h.recipient != Party::Hub {
        return Err(Rejection::WrongRecipient);
    }
    Ok(opened)
}

/// Step 2: the sender is enrolled and not revoked; answers it.
pub fn check_device<'a, 'd>(device: Option<&'a Device<'d>>) -> Result<&'a Device<'d>, Rejection> {
    match device {
        None => Err(Rejection::UnknownDevice),
        Some(d) if d.revoked => Err(Rejection::RevokedDevice),
        Some(d) => Ok(d),
    }
}

/// Step 3, for a caller without a batch check of its own: the signature by one of `keys` (the
/// key in force first, then retired keys inside their overlap) and the body unsealed with the
/// box of the key that signed. Answers the envelope and its signer.
pub fn verify_and_open<'k>(
    opened: Unverified,
    bytes: &[u8],
    keys: &[PublicKey],
    box_of: impl FnOnce(&PublicKey) -> &'k BoxKey,
) -> Result<(Envelope, PublicKey), Rejection> {
    let (verified, i) = opened.verify_any(bytes, keys)?;
    let signer = keys[i];
    let envelope = verified.open_sealed(&[box_of(&signer)])?;
    Ok((envelope, signer))
}

/// The region's state an envelope is judged against.
pub trait Region {
    /// The epoch a ledger of the region is in, `None` if the region holds no such ledger.
    fn epoch(&self, ledger: &FridgeId) -> Option<u32>;
    /// How far the region's downlink stream is committed: no device can have received more.
    fn down_head(&self) -> u64;
    /// The hub's key, which signed the changes the hub made (a device gives them back to a hub
    /// whose store lost them).
    fn hub_key(&self) -> PublicKey;
}

/// What an admitted envelope asks of the region.
#[derive(Debug)]
pub enum Admitted {
    /// Ledger changes in stream order: what the stream receiver made of the batch (entries to
    /// apply, a duplicate, a gap). The caller merges, stores and acknowledges them, and then
    /// moves `progress.up_hwm` on to what it committed.
    Changes {
        receipt: Receipt,
        receiver: StreamReceiver,
        /// The device's signature over the chain head the batch reaches, if it sent one.
        head_sig: Option<Vec<u8>>,
    },
    /// The device acknowledged the downlink up to here (already in `progress`).
    DownAcked(u64),
    /// The device hands over to a new key; `again` if that key is already in force (a retried
    /// announcement).
    KeyRotation { new_key: PublicKey, again: bool },
}

/// Step 4: the body of a verified envelope with sequence number `seq`, signed by `signer`,
/// against the device's `progress`, which it moves on for what it admits (the envelope's
/// sequence number; an ack). Nothing else changes: on a rejection `progress` is as it was.
pub fn admit_body(
    body: Body,
    seq: u64,
    device: &Device<'_>,
    signer: &PublicKey,
    region_id: &RegionId,
    region: &impl Region,
    progress: &mut Progress,
) -> Result<Admitted, Rejection> {
    if seq <= progress.last_env_seq {
        return Err(Rejection::Replayed);
    }
    let admitted = match body {
        Body::Changes(batch) => {
            check_entries(&batch.entries, device, region_id, region, progress.up_hwm)?;
            let head_sig = batch.head_sig.clone();
            let receiver = StreamReceiver::new(progress.up_hwm);
            let receipt = receiver.on_batch(batch);
            if matches!(receipt, Receipt::Malformed) {
                return Err(Rejection::Malformed);
            }
            Admitted::Changes {
                receipt,
                receiver,
                head_sig,
            }
        }
        Body::Ack(Ack { up_to, .. }) => {
            // A device can only have received what the region committed: an ack past its head
            // would count escrow grants as delivered that never were.
            progress.down_acked = progress.down_acked.max(up_to.min(region.down_head()));
            Admitted::DownAcked(progress.down_acked)
        }
        Body::KeyRotation(r) => {
            if r.new_key == device.key {
                Admitted::KeyRotation {
                    new_key: r.new_key,
                    again: true,
                }
            } else if *signer != device.key {
                // Only the key in force may hand over: a retired key cannot rotate again.
                return Err(Rejection::RetiredKey);
            } else if !crate::rotation::check(region_id, device.id, signer, &r) {
                return Err(Rejection::BadRotationProof);
            } else {
                Admitted::KeyRotation {
                    new_key: r.new_key,
                    again: false,
                }
            }
        }
        Body::Catalog(_) | Body::Time(_) | Body::KeyRotated(_) => {
            return Err(Rejection::UnexpectedKind);
        }
    };
    progress.last_env_seq = seq;
    Ok(admitted)
}

/// A batch's entries: each of a ledger the device holds, a change (a rebase comes only from
/// the hub) with a digest, those not yet held of the ledger's current epoch, and every change
/// authored by the device's own actor, or signed by the hub's key (a change of the hub's the
/// device gives back).
fn check_entries(
    entries: &[Entry],
    device: &Device<'_>,
    region_id: &RegionId,
    region: &impl Region,
    up_hwm: u64,
) -> Result<(), Rejection> {
    if entries.iter().any(|e| !device.fridges.contains(&e.ledger)) {
        return Err(Rejection::ForeignLedger);
    }
    for e in entries {
        if e.kind == EntryKind::Rebase || e.change_digest().is_none() {
            return Err(Rejection::Malformed);
        }
        if e.seq <= up_hwm {
            continue;
        }
        // A change of an older epoch waits on the device until it has rebased onto the new
        // one (its downlink stream brings it) and carried it over.
        match region.epoch(&e.ledger) {
            Some(current) if e.epoch < current => return Err(Rejection::StaleEpoch),
            Some(current) if e.epoch > current => return Err(Rejection::FutureEpoch),
            _ => {}
        }
    }
    let (given_back, own): (Vec<&Entry>, Vec<&Entry>) = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Change)
        .partition(|e| e.hub_sig.is_some());
    // The hub signs only the changes it makes, under whichever actor its store's generation
    // gives it: its signature is the proof.
    if !given_back.is_empty() {
        let hub_key = region.hub_key();
        let vouched = given_back.iter().all(|e| {
            e.hub_sig.as_deref().is_some_and(|sig| {
                crate::audit::verify_hub_change(
                    &hub_key, region_id, &e.ledger, e.epoch, &e.change, sig,
                )
            })
        });
        if !vouched {
            return Err(Rejection::BadHubSignature);
        }
    }
    let changes: Vec<Vec<u8>> = own.into_iter().map(|e| e.change.clone()).collect();
    match Ledger::check_authors(&changes, &ledger::actor_for(device.id)) {
        Ok(()) => Ok(()),
        Err(LedgerError::ForeignActor) => Err(Rejection::ForeignActor),
        Err(_) => Err(Rejection::Malformed),
    }
}

/// The whole of admission for a caller that checks one envelope at a time (the protocol
/// simulation): steps 1 to 4 in order. `header` is the envelope's header when it opened.
#[allow(clippy::too_many_arguments)] // the rules' inputs, each named in the module's steps
pub fn admit<'k>(
    bytes: &[u8],
    max_message_bytes: usize,
    region_id: &RegionId,
    topic_device: &DeviceId,
    device: Option<&Device<'_>>,
    keys: &[PublicKey],
    box_of: impl FnOnce(&PublicKey) -> &'k BoxKey,
    region: &impl Region,
    progress: &mut Progress,
) -> Result<(Header, Admitted), Rejection> {
    let opened = check_header(bytes, max_message_bytes, region_id, topic_device)?;
    let device = check_device(device)?;
    let header = opened.header().clone();
    let (envelope, signer) = verify_and_open(opened, bytes, keys, box_of)?;
    let admitted = admit_body(
        envelope.body,
        header.seq,
        device,
        &signer,
        region_id,
        region,
        progress,
    )?;
    Ok((header, admitted))
}
