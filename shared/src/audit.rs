//! The audit chain: every change a device makes is linked to the one before it by hash, and
//! each batch's last link is signed by the device, so the hub's audit log shows any gap or
//! tampered entry, and survives compaction (it keeps hashes, not documents).
//!
//! ```text
//! hash(entry) = SHA-256("larder/audit/v1\0" || prev || len(device) || device || seq (u64 BE)
//!                       || len(ledger) || ledger || epoch (u32 BE) || SHA-256(change))
//! head signature = Ed25519(device key, "larder/audit-head/v1\0" || device || seq || hash)
//! ```
//! A device's first entry links to [`GENESIS`].
//!
//! The hub vouches for each change it makes itself (app orders, kitchen statuses, escrow
//! grants) the same way, so a device can give it back to a hub whose store lost it:
//! ```text
//! hub change signature = Ed25519(hub key, "larder/hub-change/v1\0" || len(region) || region
//!                                || len(ledger) || ledger || epoch (u32 BE) || SHA-256(change))
//! ```

use sha2::{Digest, Sha256};

use crate::ids::{DeviceId, FridgeId, RegionId};
use crate::keys::{PublicKey, SIGNATURE_LEN, SecretKey, Signature};

/// The link before a device's first entry.
pub const GENESIS: [u8; 32] = [0; 32];
const HASH_DOMAIN: &[u8] = b"larder/audit/v1\0";
const HEAD_DOMAIN: &[u8] = b"larder/audit-head/v1\0";
const HUB_CHANGE_DOMAIN: &[u8] = b"larder/hub-change/v1\0";

/// The SHA-256 of a change's bytes.
pub fn change_digest(change: &[u8]) -> [u8; 32] {
    Sha256::digest(change).into()
}

/// The hash of one entry of a device's chain, from its change's digest.
pub fn entry_hash(
    prev: &[u8; 32],
    device: &DeviceId,
    seq: u64,
    ledger: &FridgeId,
    epoch: u32,
    change_digest: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(prev);
    h.update([device.as_str().len() as u8]);
    h.update(device.as_str().as_bytes());
    h.update(seq.to_be_bytes());
    h.update([ledger.as_str().len() as u8]);
    h.update(ledger.as_str().as_bytes());
    h.update(epoch.to_be_bytes());
    h.update(change_digest);
    h.finalize().into()
}

fn head_message(device: &DeviceId, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + device.as_str().len() + 8 + 32);
    m.push(device.as_str().len() as u8);
    m.extend_from_slice(device.as_str().as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

/// The device's signature of its chain's head at `seq`.
pub fn sign_head(key: &SecretKey, device: &DeviceId, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    key.sign(HEAD_DOMAIN, &head_message(device, seq, hash))
        .0
        .to_vec()
}

/// One device's signed chain head to check: the key, the device, the head's sequence number and
/// hash, and the signature the device sent.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub key: &'a PublicKey,
    pub device: &'a DeviceId,
    pub seq: u64,
    pub hash: &'a [u8; 32],
    pub sig: &'a [u8],
}

/// Checks many head signatures at once (one Ed25519 batch, see [`crate::keys::verify_batch`]);
/// answers, for each, what [`verify_head`] would.
pub fn verify_heads(heads: &[Head<'_>]) -> Vec<bool> {
    let parsed: Vec<Option<(Vec<u8>, Signature)>> = heads
        .iter()
        .map(|h| {
            let sig = <[u8; SIGNATURE_LEN]>::try_from(h.sig).ok()?;
            Some((head_message(h.device, h.seq, h.hash), Signature(sig)))
        })
        .collect();
    let checks: Vec<Option<crate::keys::Signed<'_>>> = parsed
        .iter()
        .zip(heads)
        .map(|(p, h)| {
            let (message, sig) = p.as_ref()?;
            Some(crate::keys::Signed {
                key: h.key,
                domain: HEAD_DOMAIN,
                message,
                sig,
            })
        })
        .collect();
    crate::keys::verify_batch_some(&checks)
}

/// Checks a head signature made by [`sign_head`].
pub fn verify_head(
    key: &PublicKey,
    device: &DeviceId,
    seq: u64,
    hash: &[u8; 32],
    sig: &[u8],
) -> bool {
    let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(sig) else {
        return false;
    };
    key.verify(
        HEAD_DOMAIN,
        &head_message(device, seq, hash),
        &Signature(sig),
    )
    .is_ok()
}

fn hub_change_message(region: &RegionId, ledger: &FridgeId, epoch: u32, change: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(2 + region.as_str().len() + ledger.as_str().len() + 4 + 32);
    m.push(region.as_str().len() as u8);
    m.extend_from_slice(region.as_str().as_bytes());
    m.push(ledger.as_str().len() as u8);
    m.extend_from_slice(ledger.as_str().as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&change_digest(change));
    m
}

/// The hub's signature of a change it made to `ledger` (of epoch `epoch`) in `region`.
pub fn sign_hub_change(
    key: &SecretKey,
    region: &RegionId,
    ledger: &FridgeId,
    epoch: u32,
    change: &[u8],
) -> Vec<u8> {
    key.sign(
        HUB_CHANGE_DOMAIN,
        &hub_change_message(region, ledger, epoch, change),
    )
    .0
    .to_vec()
}

/// Checks a signature made by [`sign_hub_change`].
pub fn verify_hub_change(
    key: &PublicKey,
    region: &RegionId,
    ledger: &FridgeId,
    epoch: u32,
    change: &[u8],
    sig: &[u8],
) -> bool {
    let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(sig) else {
        return false;
    };
    key.verify(
        HUB_CHANGE_DOMAIN,
        &hub_change_message(region, ledger, epoch, change),
        &Signature(sig),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash_and_heads_verify() {
        let d = DeviceId::new("pos-1").expect("id");
        let f = FridgeId::new("fridge-1").expect("id");
        let c = change_digest(b"change");
        let base = entry_hash(&GENESIS, &d, 1, &f, 0, &c);
        let variants = [
            entry_hash(&[1; 32], &d, 1, &f, 0, &c),
            entry_hash(&GENESIS, &DeviceId::new("pos-2").expect("id"), 1, &f, 0, &c),
            entry_hash(&GENESIS, &d, 2, &f, 0, &c),
            entry_hash(
                &GENESIS,
                &d,
                1,
                &FridgeId::new("fridge-2").expect("id"),
                0,
                &c,
            ),
            entry_hash(&GENESIS, &d, 1, &f, 1, &c),
            entry_hash(&GENESIS, &d, 1, &f, 0, &change_digest(b"other")),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
        let key = SecretKey::from_seed([4; 32]);
        let sig = sign_head(&key, &d, 1, &base);
        assert!(verify_head(&key.public(), &d, 1, &base, &sig));
        assert!(!verify_head(&key.public(), &d, 2, &base, &sig));
        assert!(!verify_head(&key.public(), &d, 1, &variants[0], &sig));
        assert!(!verify_head(
            &SecretKey::from_seed([5; 32]).public(),
            &d,
            1,
            &base,
            &sig
        ));
        assert!(!verify_head(&key.public(), &d, 1, &base, &sig[..63]));
        // The batch gives each head the verdict `verify_head` gives it.
        let other = SecretKey::from_seed([5; 32]).public();
        let public = key.public();
        let cases = [
            (&public, 1, &base, &sig[..]),
            (&public, 2, &base, &sig[..]),
            (&public, 1, &variants[0], &sig[..]),
            (&other, 1, &base, &sig[..]),
            (&public, 1, &base, &sig[..63]),
            (&public, 1, &base, &sig[..]),
        ];
        let heads: Vec<Head<'_>> = cases
            .iter()
            .map(|&(key, seq, hash, sig)| Head {
                key,
                device: &d,
                seq,
                hash,
                sig,
            })
            .collect();
        let single: Vec<bool> = cases
            .iter()
            .map(|&(key, seq, hash, sig)| verify_head(key, &d, seq, hash, sig))
            .collect();
        assert_eq!(single, [true, false, false, false, false, true]);
        assert_eq!(verify_heads(&heads), single);
    }

    #[test]
    fn a_hub_change_signature_binds_region_ledger_epoch_and_change() {
        let key = SecretKey::from_seed([6; 32]);
        let r = RegionId::new("north").expect("id");
        let f = FridgeId::new("fridge-1").expect("id");
        let sig = sign_hub_change(&key, &r, &f, 2, b"change");
        assert!(verify_hub_change(&key.public(), &r, &f, 2, b"change", &sig));
        let other_region = RegionId::new("south").expect("id");
        let other_fridge = FridgeId::new("fridge-2").expect("id");
        let device = SecretKey::from_seed([7; 32]);
        assert!(!verify_hub_change(
            &key.public(),
            &other_region,
            &f,
            2,
            b"change",
            &sig
        ));
        assert!(!verify_hub_change(
            &key.public(),
            &r,
            &other_fridge,
            2,
            b"change",
            &sig
        ));
        assert!(!verify_hub_change(
            &key.public(),
            &r,
            &f,
            3,
            b"change",
            &sig
        ));
        assert!(!verify_hub_change(
            &key.public(),
            &r,
            &f,
            2,
            b"changE",
            &sig
        ));
        assert!(!verify_hub_change(
            &device.public(),
            &r,
            &f,
            2,
            b"change",
            &sig
        ));
        assert!(!verify_hub_change(
            &key.public(),
            &r,
            &f,
            2,
            b"change",
            &sig[..63]
        ));
        // A device's own key signing the same message is not the hub's word.
        let forged = sign_hub_change(&device, &r, &f, 2, b"change");
        assert!(!verify_hub_change(
            &key.public(),
            &r,
            &f,
            2,
            b"change",
            &forged
        ));
    }
}
