//! Test helpers for the region's threads: enrolled devices that send signed, sealed uplinks, and
//! a region writer on a real SQLite file.

use std::sync::Arc;

use larder_shared::domain::{Refill, RefillUnit, Role};
use larder_shared::envelope::{self, Ack, Batch, Body, Entry, Envelope, Header, Party};
use larder_shared::ledger::{Ledger, actor_for};
use larder_shared::{DeviceId, FridgeId, RegionId, SecretKey, Sku, UnitId};

use super::RegionWriter;
use crate::store::{DeviceRecord, RegionStore};
use crate::subscriptions::Calendar;

/// Where a test's region lives: a temporary directory (removed when dropped), the path of the
/// region's store in it, the region `north` and the hub's key.
pub(super) struct Scene {
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub region: RegionId,
    pub hub: SecretKey,
}

pub(super) fn scene() -> Scene {
    let dir = tempfile::tempdir().expect("temp dir");
    Scene {
        path: dir.path().join("region.db"),
        dir,
        region: RegionId::new("north").expect("id"),
        hub: SecretKey::generate().expect("key"),
    }
}

pub(super) fn fridge() -> FridgeId {
    FridgeId::new("fridge-1").expect("id")
}

/// A POS of fridge-1 with `key`.
pub(super) fn record(id: &DeviceId, key: &SecretKey) -> DeviceRecord {
    DeviceRecord {
        device_id: id.clone(),
        role: Role::Pos,
        site: None,
        fridges: vec![fridge()],
        public_key: key.public(),
        enrolled_at_ms: 1,
        revoked_at_ms: None,
        last_seen_ms: None,
    }
}

/// Envelope number `seq` from `sender` to the hub, carrying `body`, signed and sealed with
/// `key`.
pub(super) fn sealed(
    region: &RegionId,
    sender: &DeviceId,
    key: &SecretKey,
    hub: &SecretKey,
    seq: u64,
    body: Body,
) -> Vec<u8> {
    Envelope {
        header: Header {
            region: region.clone(),
            sender: Party::Device(sender.clone()),
            recipient: Party::Hub,
            seq,
            sent_at_ms: 0,
        },
        body,
    }
    .seal_to(key, &envelope::BoxKey::new(key, &hub.public()))
    .expect("sealed")
}

/// A first envelope from `sender`: an `Ack` of nothing, signed and sealed with `key`.
pub(super) fn ack(
    region: &RegionId,
    sender: &DeviceId,
    key: &SecretKey,
    hub: &SecretKey,
) -> Vec<u8> {
    let ack = Ack::new(0, false);
    sealed(region, sender, key, hub, 1, Body::Ack(ack))
}

/// A device of fridge-1 that loads units, as its agent would send them: one change per
/// envelope, each with its audit link and the signed head of its chain.
pub(super) struct Loader {
    pub id: DeviceId,
    pub key: SecretKey,
    ledger: Ledger,
    /// The last envelope and change numbers sent, and the chain's head.
    sent: (u64, u64, [u8; 32]),
}

impl Loader {
    pub(super) fn new(id: &str) -> Self {
        let id = DeviceId::new(id).expect("id");
        Self {
            ledger: Ledger::new(fridge(), actor_for(&id)).expect("ledger"),
            key: SecretKey::generate().expect("key"),
            id,
            sent: (0, 0, larder_shared::audit::GENESIS),
        }
    }

    /// The next envelope: a change loading `unit` (lasagna), and the head of the chain after it.
    pub(super) fn load(
        &mut self,
        region: &RegionId,
        hub: &SecretKey,
        unit: &str,
    ) -> (Vec<u8>, [u8; 32]) {
        let change = self.change(&[unit]);
        self.send(region, hub, change)
    }

    /// A change of its ledger loading `units` (lasagna), not sent.
    pub(super) fn change(&mut self, units: &[&str]) -> Vec<u8> {
        let refill = Refill {
            units: units
                .iter()
                .map(|unit| RefillUnit {
                    unit_id: UnitId::new(*unit).expect("id"),
                    sku: Sku::new("lasagna").expect("sku"),
                    expires_at_ms: i64::MAX / 2,
                    batch: None,
                })
                .collect(),
            order_id: None,
        };
        let mut changes = self
            .ledger
            .refill(&refill, &self.id, 1)
            .expect("change")
            .changes;
        assert_eq!(changes.len(), 1, "one change");
        changes.remove(0)
    }

    /// Forgets what it sent, as an agent whose envelopes were all refused starts again.
    pub(super) fn rewind(&mut self) {
        self.sent = (0, 0, larder_shared::audit::GENESIS);
    }

    /// The next envelope: `change` (whatever its bytes), with its audit link and the signed
    /// head of the chain after it.
    pub(super) fn send(
        &mut self,
        region: &RegionId,
        hub: &SecretKey,
        change: Vec<u8>,
    ) -> (Vec<u8>, [u8; 32]) {
        let (env_seq, seq, prev) = self.sent;
        let (env_seq, seq) = (env_seq + 1, seq + 1);
        let digest = larder_shared::audit::change_digest(&change);
        let head = larder_shared::audit::entry_hash(&prev, &self.id, seq, &fridge(), 0, &digest);
        let entry = Entry {
            prev: Some(prev),
            ..Entry::change(seq, fridge(), 0, change)
        };
        let batch = Batch {
            after: seq - 1,
            up_to: seq,
            entries: vec![entry],
            head_sig: Some(larder_shared::audit::sign_head(
                &self.key, &self.id, seq, &head,
            )),
        };
        self.sent = (env_seq, seq, head);
        let bytes = sealed(
            region,
            &self.id,
            &self.key,
            hub,
            env_seq,
            Body::Changes(batch),
        );
        (bytes, head)
    }
}

/// A writer of `region` (which serves fridge-1) on `store`, with the hub's key `hub`.
pub(super) fn writer(region: &RegionId, store: RegionStore, hub: &SecretKey) -> RegionWriter {
    let (writer, _head) = RegionWriter::open(
        region.clone(),
        store,
        vec![fridge()],
        64 * 1024,
        &crate::config::SyncConfig::default(),
        crate::config::CompactionConfig::default(),
        crate::config::OrdersConfig::default(),
        Calendar {
            tz: jiff::tz::TimeZone::UTC,
            cutoff: jiff::civil::Time::midnight(),
        },
        larder_runtime::Clock::system(),
        Arc::new(crate::metrics::HubMetrics::default()),
        crate::events::Events::new(larder_runtime::Clock::system()),
        hub.clone(),
    )
    .expect("writer");
    writer
}
