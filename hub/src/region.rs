//! A region's single writer: verifies device envelopes, merges ledger changes, commits, and only
//! then answers with the acknowledgement to publish.
//!
//! Data flow: the MQTT task hands each `up` publish to [`RegionCommand::Uplink`] → the writer
//! thread takes every waiting command (group commit) → checks each envelope by CONTRACT.md's
//! rules (size, decoding, region, topic, sender enrolled and not revoked, signature, replay,
//! ledgers served, change authors) → merges accepted changes into its ledgers → writes changes,
//! stream positions and projections in one transaction → answers (the ack to send, or the
//! rejection reason) → bumps the downlink head so the pump relays the new changes.
//! A rejected envelope changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use larder_shared::catalog::Catalog;
use larder_shared::envelope::{self, Ack, Body, Party};
use larder_shared::ledger::{self, Ledger, Touched};
use larder_shared::reliable::{Receipt, StreamReceiver};
use larder_shared::{DeviceId, FridgeId, RegionId};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::metrics::HubMetrics;
use crate::store::{DeviceRecord, Progress, RegionBatch, RegionStore, StoreError, StoredChange};

/// What became of an uplink envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkOutcome {
    /// Refused for this reason (a metrics label); nothing changed.
    Rejected(&'static str),
    /// Changes handled and committed: publish this ack to the device.
    Ack(Ack),
    /// The device acknowledged its downlink stream up to here (committed).
    DownAcked(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    #[error("device {0} is already enrolled")]
    DeviceExists(DeviceId),
    #[error("device {0} is not enrolled")]
    UnknownDevice(DeviceId),
    #[error("fridge {0} is not a fridge of this region")]
    UnknownFridge(FridgeId),
    #[error("{0}")]
    Invalid(String),
    #[error("storage unavailable: {0}")]
    Storage(String),
    #[error("the region writer is busy; retry shortly")]
    Overloaded,
}

type Reply<T> = oneshot::Sender<Result<T, RegionError>>;

#[derive(Debug)]
pub enum RegionCommand {
    Uplink {
        topic_device: DeviceId,
        payload: bytes::Bytes,
        reply: oneshot::Sender<UplinkOutcome>,
    },
    Enroll {
        record: Box<DeviceRecord>,
        reply: Reply<DeviceRecord>,
    },
    Revoke {
        device: DeviceId,
        reply: Reply<()>,
    },
    ReserveEnvSeq {
        up_to: u64,
        reply: Reply<()>,
    },
    Digest {
        fridge: FridgeId,
        reply: oneshot::Sender<Option<String>>,
    },
    /// Finish the commands taken so far and stop, even if handles to the writer remain.
    Stop,
}

enum Pending {
    Uplink(oneshot::Sender<UplinkOutcome>, UplinkOutcome),
    Enroll(Reply<DeviceRecord>, Box<DeviceRecord>),
    Unit(Reply<()>),
}

/// The writer of one region.
#[derive(Debug)]
pub struct RegionWriter {
    region: RegionId,
    store: RegionStore,
    fridges: Vec<FridgeId>,
    ledgers: BTreeMap<FridgeId, Ledger>,
    max_message_bytes: usize,
    group_commit_max: usize,
    metrics: Arc<HubMetrics>,
    head_tx: watch::Sender<u64>,
    changes_since_snapshot: HashMap<FridgeId, usize>,
    /// Changes a ledger's log grows by before a snapshot (`sync.snapshot_every_changes`).
    snapshot_every_changes: usize,
}

fn now_ms() -> i64 {
    larder_agent::writer::now_ms()
}

/// The hub's own Automerge actor (for what the hub writes into ledgers in later versions).
pub fn hub_actor() -> automerge::ActorId {
    automerge::ActorId::from(&b"\x00hub"[..])
}

impl RegionWriter {
    pub fn open(
        region: RegionId,
        store: RegionStore,
        fridges: Vec<FridgeId>,
        max_message_bytes: usize,
        sync: &crate::config::SyncConfig,
        metrics: Arc<HubMetrics>,
    ) -> Result<(Self, watch::Receiver<u64>), StoreError> {
        let (group_commit_max, snapshot_every_changes) =
            (sync.group_commit_max, sync.snapshot_every_changes);
        let (head_tx, head_rx) = watch::channel(store.head()?);
        let mut w = Self {
            region,
            store,
            fridges,
            ledgers: BTreeMap::new(),
            max_message_bytes,
            group_commit_max,
            metrics,
            head_tx,
            changes_since_snapshot: HashMap::new(),
            snapshot_every_changes,
        };
        w.reload()?;
        Ok((w, head_rx))
    }

    /// Snapshots ledgers whose change log grew past `snapshot_every_changes`, so a restart
    /// loads a snapshot plus a short tail: when idle, or regardless once four times past it.
    /// The change rows stay: they are the downlink streams.
    fn snapshot_due(&mut self, idle: bool) {
        let due = ledger::snapshots_due(
            &self.changes_since_snapshot,
            self.snapshot_every_changes,
            idle,
        );
        for fridge in due {
            let Some(ledger) = self.ledgers.get(&fridge) else {
                continue;
            };
            if ledger.waits_for_dependencies() {
                continue;
            }
            match self.store.snapshot_ledger(&fridge, &ledger.save()) {
                Ok(()) => {
                    self.changes_since_snapshot.insert(fridge, 0);
                }
                Err(e) => warn!(fridge = %fridge, error = %e, "ledger snapshot failed; will retry"),
            }
        }
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        self.ledgers.clear();
        for fridge in self.fridges.clone() {
            let (snap, changes) = self.store.load_ledger(&fridge)?;
            self.changes_since_snapshot
                .insert(fridge.clone(), changes.len());
            let ledger = Ledger::load(fridge.clone(), hub_actor(), snap.as_deref(), &changes)
                .map_err(|e| StoreError::Corrupt(format!("ledger {fridge}: {e}")))?;
            self.ledgers.insert(fridge, ledger);
        }
        Ok(())
    }

    /// Stores the catalog as a new version if it differs from the current one; returns the
    /// current catalog.
    pub fn ensure_catalog(
        &mut self,
        currency: &str,
        items: &[larder_shared::catalog::CatalogItem],
    ) -> Result<Catalog, StoreError> {
        let current: Catalog = match self.store.meta(crate::store::META_CATALOG)? {
            Some(json) => {
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
            None => Catalog::default(),
        };
        if current.currency == currency && current.items == items {
            return Ok(current);
        }
        let next = Catalog {
            version: current.version + 1,
            currency: currency.to_owned(),
            items: items.to_vec(),
        };
        let batch = RegionBatch {
            meta: vec![(
                crate::store::META_CATALOG,
                serde_json::to_string(&next).unwrap_or_default(),
            )],
            ..RegionBatch::default()
        };
        self.store.commit(&batch)?;
        info!(region = %self.region, version = next.version, "catalog published");
        Ok(next)
    }

    pub fn env_seq_reserved(&self) -> Result<u64, StoreError> {
        Ok(self
            .store
            .meta(crate::store::META_ENV_SEQ_RESERVED)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Runs until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<RegionCommand>) {
        let mut stopping = false;
        while !stopping && let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < self.group_commit_max {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            stopping = group.iter().any(|c| matches!(c, RegionCommand::Stop));
            self.process(group);
            // Snapshots are maintenance: done when no command waits, or when overdue.
            let idle = rx.is_empty();
            self.snapshot_due(idle);
        }
        info!(region = %self.region, "region writer stopped");
    }

    fn process(&mut self, group: Vec<RegionCommand>) {
        let now = now_ms();
        let mut batch = RegionBatch::default();
        let mut pending = Vec::new();
        let mut progress: HashMap<DeviceId, Progress> = HashMap::new();
        for cmd in group {
            match cmd {
                RegionCommand::Uplink {
                    topic_device,
                    payload,
                    reply,
                } => {
                    let outcome =
                        self.uplink(&topic_device, &payload, &mut progress, &mut batch, now);
                    match outcome {
                        UplinkOutcome::Rejected(reason) => {
                            self.metrics.rejected(self.region.as_str(), reason);
                            warn!(region = %self.region, device = %topic_device, reason, "envelope rejected");
                            let _ = reply.send(outcome);
                        }
                        ok => pending.push(Pending::Uplink(reply, ok)),
                    }
                }
                RegionCommand::Enroll { record, reply } => match self.enroll_check(&record, &batch)
                {
                    Ok(()) => {
                        batch.enroll.push((*record).clone());
                        pending.push(Pending::Enroll(reply, record));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                RegionCommand::Revoke { device, reply } => match self.store.device(&device) {
                    Ok(Some(_)) => {
                        batch.revoke.push((device, now));
                        pending.push(Pending::Unit(reply));
                    }
                    Ok(None) => {
                        let _ = reply.send(Err(RegionError::UnknownDevice(device)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RegionError::Storage(e.to_string())));
                    }
                },
                RegionCommand::ReserveEnvSeq { up_to, reply } => {
                    batch
                        .meta
                        .push((crate::store::META_ENV_SEQ_RESERVED, up_to.to_string()));
                    pending.push(Pending::Unit(reply));
                }
                RegionCommand::Digest { fridge, reply } => {
                    let _ = reply.send(self.ledgers.get(&fridge).map(Ledger::state_digest));
                }
                RegionCommand::Stop => {}
            }
        }
        for (device, p) in progress {
            batch.progress.push((device, p, now));
        }
        if let Err(e) = self.apply_staged(&mut batch) {
            error!(region = %self.region, error = %e, "merging the group failed; group refused, ledgers reloaded");
            if let Err(e) = self.reload() {
                error!(error = %e, "reloading ledgers failed");
            }
            self.answer(pending, Err(RegionError::Storage(e)));
            return;
        }
        if batch.is_empty() {
            self.answer(pending, Ok(()));
            return;
        }
        let started = std::time::Instant::now();
        let result = self.store.commit(&batch);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                for c in &batch.changes {
                    *self
                        .changes_since_snapshot
                        .entry(c.ledger.clone())
                        .or_default() += 1;
                }
                if !batch.changes.is_empty() {
                    self.metrics
                        .changes_merged
                        .get_or_create(&vec![("region", self.region.to_string())])
                        .inc_by(batch.changes.len() as u64);
                    match self.store.head() {
                        Ok(head) => {
                            self.head_tx.send_replace(head);
                        }
                        Err(e) => error!(error = %e, "reading the change head failed"),
                    }
                }
                self.answer(pending, Ok(()));
            }
            Err(e) => {
                error!(region = %self.region, error = %e, "region commit failed; group refused, ledgers reloaded");
                self.metrics.commit_failures.inc();
                if let Err(e) = self.reload() {
                    error!(error = %e, "reloading ledgers failed");
                }
                self.answer(pending, Err(RegionError::Storage(e.to_string())));
            }
        }
    }

    fn answer(&self, pending: Vec<Pending>, result: Result<(), RegionError>) {
        for p in pending {
            match (p, &result) {
                (Pending::Uplink(reply, outcome), Ok(())) => {
                    let _ = reply.send(outcome);
                }
                (Pending::Uplink(reply, _), Err(_)) => {
                    let _ = reply.send(UplinkOutcome::Rejected("storage"));
                }
                (Pending::Enroll(reply, record), Ok(())) => {
                    let _ = reply.send(Ok(*record));
                }
                (Pending::Enroll(reply, _), Err(e)) => {
                    let _ = reply.send(Err(e.clone()));
                }
                (Pending::Unit(reply), r) => {
                    let _ = reply.send(r.clone());
                }
            }
        }
    }

    fn enroll_check(&self, record: &DeviceRecord, batch: &RegionBatch) -> Result<(), RegionError> {
        for f in &record.fridges {
            if !self.fridges.contains(f) {
                return Err(RegionError::UnknownFridge(f.clone()));
            }
        }
        match (record.role, record.fridges.len()) {
            (larder_shared::domain::Role::Fridge, 1) | (larder_shared::domain::Role::Pos, 1..) => {}
            _ => {
                return Err(RegionError::Invalid(
                    "a fridge device serves exactly one fridge, a POS at least one".into(),
                ));
            }
        }
        let exists = self
            .store
            .device(&record.device_id)
            .map_err(|e| RegionError::Storage(e.to_string()))?
            .is_some()
            || batch.enroll.iter().any(|d| d.device_id == record.device_id);
        if exists {
            return Err(RegionError::DeviceExists(record.device_id.clone()));
        }
        Ok(())
    }

    /// Checks and stages one envelope from a device's `up` topic.
    fn uplink(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        progress: &mut HashMap<DeviceId, Progress>,
        batch: &mut RegionBatch,
        _now: i64,
    ) -> UplinkOutcome {
        let opened = match envelope::open(payload, self.max_message_bytes) {
            Ok(o) => o,
            Err(e) => return UplinkOutcome::Rejected(e.reason()),
        };
        let h = opened.header().clone();
        if h.region != self.region {
            return UplinkOutcome::Rejected("wrong_region");
        }
        let Party::Device(sender) = &h.sender else {
            return UplinkOutcome::Rejected("wrong_topic");
        };
        if sender != topic_device {
            return UplinkOutcome::Rejected("wrong_topic");
        }
        if h.recipient != Party::Hub {
            return UplinkOutcome::Rejected("wrong_recipient");
        }
        let (record, stored) = match self.store.device(sender) {
            Ok(Some(d)) => d,
            Ok(None) => return UplinkOutcome::Rejected("unknown_device"),
            Err(_) => return UplinkOutcome::Rejected("storage"),
        };
        if record.revoked_at_ms.is_some() {
            return UplinkOutcome::Rejected("revoked_device");
        }
        let env = match opened.verify(payload, &record.public_key) {
            Ok(env) => env,
            Err(e) => return UplinkOutcome::Rejected(e.reason()),
        };
        let mut p = *progress.get(sender).unwrap_or(&stored);
        if h.seq <= p.last_env_seq {
            return UplinkOutcome::Rejected("replayed");
        }
        let outcome = match env.body {
            Body::Changes(b) => {
                let actor = ledger::actor_for(sender);
                for e in &b.entries {
                    if !record.fridges.contains(&e.ledger) {
                        return UplinkOutcome::Rejected("foreign_ledger");
                    }
                }
                let changes: Vec<Vec<u8>> = b.entries.iter().map(|e| e.change.clone()).collect();
                if let Err(e) = Ledger::check_authors(&changes, &actor) {
                    return UplinkOutcome::Rejected(match e {
                        larder_shared::ledger::LedgerError::ForeignActor => "foreign_actor",
                        _ => "malformed",
                    });
                }
                let mut receiver = StreamReceiver::new(p.up_hwm);
                let gap = match receiver.on_batch(b) {
                    Receipt::Apply { entries, up_to } => {
                        if let Err(reason) = self.merge(sender, entries, batch) {
                            return UplinkOutcome::Rejected(reason);
                        }
                        receiver.on_committed(up_to);
                        false
                    }
                    Receipt::Duplicate => false,
                    Receipt::Gap => true,
                    Receipt::Malformed => return UplinkOutcome::Rejected("malformed"),
                };
                p.up_hwm = receiver.hwm();
                UplinkOutcome::Ack(receiver.ack(gap))
            }
            Body::Ack(ack) => {
                p.down_acked = p.down_acked.max(ack.up_to);
                UplinkOutcome::DownAcked(p.down_acked)
            }
            Body::Catalog(_) => return UplinkOutcome::Rejected("unexpected_kind"),
        };
        p.last_env_seq = h.seq;
        progress.insert(sender.clone(), p);
        self.metrics
            .envelopes_accepted
            .get_or_create(&vec![("region", self.region.to_string())])
            .inc();
        outcome
    }

    /// Stages accepted entries as change rows; they are merged into the ledgers once per
    /// group by [`RegionWriter::apply_staged`].
    fn merge(
        &mut self,
        author: &DeviceId,
        entries: Vec<larder_shared::envelope::Entry>,
        batch: &mut RegionBatch,
    ) -> Result<(), &'static str> {
        if entries
            .iter()
            .any(|e| !self.ledgers.contains_key(&e.ledger))
        {
            return Err("foreign_ledger");
        }
        for e in entries {
            let hash: [u8; 32] = sha2::Sha256::digest(&e.change).into();
            batch.changes.push(StoredChange {
                ledger: e.ledger,
                author: author.clone(),
                hash,
                bytes: e.change,
            });
        }
        Ok(())
    }

    /// Merges every change staged in the group into its ledger with one Automerge apply per
    /// ledger (an apply walks the maps it touches, so one per group rather than one per
    /// envelope), and stages the projection rows.
    fn apply_staged(&mut self, batch: &mut RegionBatch) -> Result<(), String> {
        let mut by_ledger: BTreeMap<FridgeId, Vec<Vec<u8>>> = BTreeMap::new();
        for c in &batch.changes {
            by_ledger
                .entry(c.ledger.clone())
                .or_default()
                .push(c.bytes.clone());
        }
        for (fridge, changes) in by_ledger {
            let ledger = self
                .ledgers
                .get_mut(&fridge)
                .ok_or_else(|| format!("no ledger {fridge}"))?;
            let touched: Touched = ledger.apply_changes(&changes).map_err(|e| e.to_string())?;
            for unit in &touched.units {
                if let Some(v) = ledger.unit(unit, i64::MIN) {
                    batch.units.push((fridge.clone(), v));
                }
            }
            for order in &touched.orders {
                if let Some(v) = ledger.order(order) {
                    batch.orders.push(v);
                }
            }
        }
        Ok(())
    }
}
