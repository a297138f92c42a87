//! Presence: a device says it is online (when it connects) and the broker says it is offline
//! for it (its last will), each signed by the device for one connection, its *session*.
//!
//! ```text
//! device ── CONNECT(token: at_ms, nonce; will: offline(session)) ──▶ broker ─ admits ─▶ hub
//! device ── online(session), retained, on its presence topic ──────▶ hub: Presence::open
//! broker ── offline(session) when the connection drops ────────────▶ hub: Presence::open
//! ```
//!
//! The session is the connect token's time and nonce, so the hub can tell the connection the
//! broker admitted last from every other. Another device can neither make a presence message
//! for a device (it has not its key) nor bring an old one back to life: the hub takes only the
//! current session's messages ([`Sessions::take`]), and after its `offline` not its `online`.
//! The `offline` will is sent to the broker alone, in the CONNECT, so no one can replay it
//! before the broker publishes it on the device's real disconnect.
//!
//! Wire form: `b"P1"`, online (1 byte), session time (i64, big endian), nonce (16 bytes),
//! signature (64 bytes) over `DOMAIN || region || 0 || device || 0 || online || time || nonce`.

use crate::ids::{DeviceId, RegionId};
use crate::keys::{PublicKey, SIGNATURE_LEN, SecretKey, Signature};

const DOMAIN: &[u8] = b"larder/presence/v1\0";
const MAGIC: &[u8; 2] = b"P1";
/// The encoded length of a presence message.
pub const PRESENCE_LEN: usize = 2 + 1 + 8 + 16 + SIGNATURE_LEN;

/// One connection of a device, as its connect token names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Session {
    pub at_ms: i64,
    pub nonce: [u8; 16],
}

/// What a presence message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub online: bool,
    pub session: Session,
}

fn message(region: &RegionId, device: &DeviceId, p: &Presence) -> Vec<u8> {
    let mut m = Vec::with_capacity(region.as_str().len() + device.as_str().len() + 27);
    m.extend_from_slice(region.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(device.as_str().as_bytes());
    m.push(0);
    m.push(u8::from(p.online));
    m.extend_from_slice(&p.session.at_ms.to_be_bytes());
    m.extend_from_slice(&p.session.nonce);
    m
}

impl Presence {
    /// The message a device publishes (or leaves as its will), signed with its key.
    pub fn seal(&self, key: &SecretKey, region: &RegionId, device: &DeviceId) -> Vec<u8> {
        let sig = key.sign(DOMAIN, &message(region, device, self));
        let mut out = Vec::with_capacity(PRESENCE_LEN);
        out.extend_from_slice(MAGIC);
        out.push(u8::from(self.online));
        out.extend_from_slice(&self.session.at_ms.to_be_bytes());
        out.extend_from_slice(&self.session.nonce);
        out.extend_from_slice(&sig.0);
        out
    }

    /// Reads a presence message for `device` and checks its signature under one of `keys`;
    /// `None` for anything else.
    pub fn open(
        payload: &[u8],
        region: &RegionId,
        device: &DeviceId,
        keys: &[PublicKey],
    ) -> Option<Self> {
        if payload.len() != PRESENCE_LEN || &payload[..2] != MAGIC {
            return None;
        }
        let online = match payload[2] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let at_ms = i64::from_be_bytes(payload[3..11].try_into().ok()?);
        let nonce: [u8; 16] = payload[11..27].try_into().ok()?;
        let sig = Signature(payload[27..].try_into().ok()?);
        let p = Presence {
            online,
            session: Session { at_ms, nonce },
        };
        let m = message(region, device, &p);
        keys.iter()
            .any(|k| k.verify(DOMAIN, &m, &sig).is_ok())
            .then_some(p)
    }
}

/// What the hub knows of each device's connections: the session the broker admitted last (if
/// it admits connections itself), and the last presence it took.
#[derive(Debug, Default)]
pub struct Sessions {
    /// The broker is the hub's own: every connection it holds was admitted in this run, so a
    /// presence message of a session it did not admit is never taken.
    admits: bool,
    admitted: std::collections::HashMap<DeviceId, Session>,
    taken: std::collections::HashMap<DeviceId, Presence>,
}

impl Sessions {
    /// For the hub's embedded broker, which admits every connection itself.
    pub fn admitting() -> Self {
        Self {
            admits: true,
            ..Self::default()
        }
    }

    /// The broker admitted `device` for `session`: only that session's presence counts now.
    pub fn admitted(&mut self, device: &DeviceId, session: Session) {
        self.admitted.insert(device.clone(), session);
    }

    /// Whether to take `p` (signature already checked), and never an `online` after the same
    /// session's `offline`. With the hub's own broker: only a message of the session it
    /// admitted last for the device (none before the device connected in this run). With an
    /// external broker, which keeps devices to their own topics: one of a session no older
    /// than the last taken.
    pub fn take(&mut self, device: &DeviceId, p: Presence) -> bool {
        let admitted = self.admitted.get(device);
        if self.admits && admitted != Some(&p.session) {
            return false;
        }
        if let Some(last) = self.taken.get(device) {
            let same = last.session == p.session;
            // The admitted session is the current one whatever its clock said.
            let older = !same && admitted.is_none() && p.session.at_ms < last.session.at_ms;
            if (same && !last.online && p.online) || older {
                return false;
            }
        }
        self.taken.insert(device.clone(), p);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed([seed; 32])
    }

    fn session(at_ms: i64, n: u8) -> Session {
        Session {
            at_ms,
            nonce: [n; 16],
        }
    }

    #[test]
    fn only_the_devices_key_makes_its_presence() {
        let region = RegionId::new("north").expect("id");
        let x = DeviceId::new("pos-1").expect("id");
        let p = Presence {
            online: false,
            session: session(5, 1),
        };
        let sealed = p.seal(&key(1), &region, &x);
        assert_eq!(
            Presence::open(&sealed, &region, &x, &[key(1).public()]),
            Some(p)
        );
        // Another device's key, another device's or region's name, a flipped bit, a bare word.
        assert_eq!(
            Presence::open(&sealed, &region, &x, &[key(2).public()]),
            None
        );
        let y = DeviceId::new("pos-2").expect("id");
        assert_eq!(
            Presence::open(&sealed, &region, &y, &[key(1).public()]),
            None
        );
        let south = RegionId::new("south").expect("id");
        assert_eq!(
            Presence::open(&sealed, &south, &x, &[key(1).public()]),
            None
        );
        let mut flipped = sealed.clone();
        flipped[2] ^= 1;
        assert_eq!(
            Presence::open(&flipped, &region, &x, &[key(1).public()]),
            None
        );
        assert_eq!(
            Presence::open(b"online", &region, &x, &[key(1).public()]),
            None
        );
    }

    #[test]
    fn old_sessions_and_a_revived_online_are_not_taken() {
        let x = DeviceId::new("pos-1").expect("id");
        let on = |s| Presence {
            online: true,
            session: s,
        };
        let off = |s| Presence {
            online: false,
            session: s,
        };
        let (s1, s2) = (session(10, 1), session(20, 2));
        let mut hub = Sessions::admitting();
        assert!(
            !hub.take(&x, on(s1)),
            "before the device connected in this run"
        );
        hub.admitted(&x, s1);
        assert!(hub.take(&x, on(s1)));
        assert!(hub.take(&x, off(s1)), "its will, at the disconnect");
        assert!(!hub.take(&x, on(s1)), "an online replayed after the will");
        hub.admitted(&x, s2);
        assert!(!hub.take(&x, off(s1)), "the old will replayed");
        assert!(hub.take(&x, on(s2)));
        assert!(!hub.take(&x, on(s1)), "an older session");
        // A reconnect whose clock reads earlier (a step back) is still its current session.
        let s3 = session(5, 3);
        hub.admitted(&x, s3);
        assert!(hub.take(&x, on(s3)));
        // With no admissions seen (an external broker): no older than the last taken.
        let mut ext = Sessions::default();
        assert!(ext.take(&x, on(s2)));
        assert!(!ext.take(&x, off(s1)));
        assert!(ext.take(&x, off(s2)));
        assert!(!ext.take(&x, on(s2)));
    }
}
