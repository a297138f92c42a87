//! Which devices are online, from their signed presence (see `larder_shared::presence`): the
//! embedded broker's admission records the session of each connection it lets in, and the
//! MQTT task takes a presence message only if its device signed it for that session.

use std::sync::{Arc, Mutex, PoisonError};

use larder_shared::presence::{Presence, Session, Sessions};
use larder_shared::{DeviceId, RegionId};

use crate::store::RegionReads;

/// The hub's record of sessions, shared by the broker's admission and the MQTT task.
#[derive(Debug, Clone, Default)]
pub struct PresenceBook(Arc<Mutex<Sessions>>);

impl PresenceBook {
    /// For the embedded broker: only sessions it admitted count.
    pub fn admitting() -> Self {
        Self(Arc::new(Mutex::new(Sessions::admitting())))
    }

    /// The broker let `device` in for `session`.
    pub fn admitted(&self, device: &DeviceId, session: Session) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admitted(device, session);
    }

    /// Reads a presence message on `device`'s topic: `Some(online)` if the device signed it
    /// (with its key in force or one a rotation retired: a will left before the rotation is
    /// still the device's) for the session that counts now; `None` for a forgery, a replay or
    /// a word that is not a presence message.
    pub fn read(
        &self,
        reads: &RegionReads,
        region: &RegionId,
        device: &DeviceId,
        payload: &[u8],
    ) -> Option<bool> {
        let record = reads.device(device).ok().flatten()?;
        let mut keys = vec![record.public_key];
        keys.extend(reads.retired_keys(device, None).unwrap_or_default());
        let p = Presence::open(payload, region, device, &keys)?;
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(device, p)
            .then_some(p.online)
    }
}
