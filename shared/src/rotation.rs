//! Device key rotation: a device announces a new Ed25519 key in an envelope signed by its
//! current key, with the new key's own signature over the hand-over (so no one can rotate a
//! device onto a key they do not hold). The hub keeps accepting the old key for an overlap
//! window, so envelopes already signed with it still sync, then only the new one.

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, RegionId};
use crate::keys::{PublicKey, SIGNATURE_LEN, SecretKey, Signature};

const ROTATION_DOMAIN: &[u8] = b"larder/key-rotation/v1";

/// The announcement (device to hub, inside an envelope signed by `old`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub new_key: PublicKey,
    /// `new_key`'s signature over region, device, old key and new key.
    #[serde(with = "serde_bytes")]
    pub proof: Vec<u8>,
}

/// The hub's confirmation (hub to device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotated {
    pub key: PublicKey,
}

fn message(region: &RegionId, device: &DeviceId, old: &PublicKey, new: &PublicKey) -> Vec<u8> {
    let mut m = Vec::with_capacity(96);
    for part in [region.as_str().as_bytes(), device.as_str().as_bytes()] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&old.to_bytes());
    m.extend_from_slice(&new.to_bytes());
    m
}

/// The announcement of `new` replacing `old` for `device` in `region`.
pub fn announce(
    region: &RegionId,
    device: &DeviceId,
    old: &PublicKey,
    new: &SecretKey,
) -> KeyRotation {
    let new_key = new.public();
    KeyRotation {
        proof: new
            .sign(ROTATION_DOMAIN, &message(region, device, old, &new_key))
            .0
            .to_vec(),
        new_key,
    }
}

/// Whether `r` proves its new key's holder agreed to replace `old` for `device` in `region`.
pub fn check(region: &RegionId, device: &DeviceId, old: &PublicKey, r: &KeyRotation) -> bool {
    let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(r.proof.as_slice()) else {
        return false;
    };
    r.new_key
        .verify(
            ROTATION_DOMAIN,
            &message(region, device, old, &r.new_key),
            &Signature(sig),
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proof_binds_region_device_and_both_keys() {
        let region = RegionId::new("north").expect("id");
        let device = DeviceId::new("pos-1").expect("id");
        let old = SecretKey::from_seed([1; 32]).public();
        let new = SecretKey::from_seed([2; 32]);
        let r = announce(&region, &device, &old, &new);
        assert!(check(&region, &device, &old, &r));
        let other_region = RegionId::new("south").expect("id");
        let other_device = DeviceId::new("pos-2").expect("id");
        let other_old = SecretKey::from_seed([3; 32]).public();
        assert!(!check(&other_region, &device, &old, &r));
        assert!(!check(&region, &other_device, &old, &r));
        assert!(!check(&region, &device, &other_old, &r));
        // A key someone does not hold cannot be announced with a proof made by another.
        let stranger = SecretKey::from_seed([4; 32]).public();
        let forged = KeyRotation {
            new_key: stranger,
            proof: r.proof.clone(),
        };
        assert!(!check(&region, &device, &old, &forged));
        let mut flipped = r.clone();
        flipped.proof[0] ^= 1;
        assert!(!check(&region, &device, &old, &flipped));
    }
}
