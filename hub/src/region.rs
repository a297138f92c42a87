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
    /// Compact every ledger: finished records from before `archive_before_ms` leave the live
    /// documents for the archive; then retire old epochs and prune past the retention.
    Compact {
        archive_before_ms: i64,
        reply: Reply<CompactionReport>,
    },
    /// Finish the commands taken so far and stop, even if handles to the writer remain.
    Stop,
}

/// What one compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactionReport {
    pub ledgers: Vec<LedgerCompaction>,
    /// Rows of retired epochs deleted.
    pub retired_rows: usize,
    pub pruned_archive: usize,
    pub pruned_audit: usize,
}

/// One ledger moved onto a new epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerCompaction {
    pub fridge_id: FridgeId,
    pub epoch: u32,
    pub archived: usize,
    pub live_units: usize,
    pub live_orders: usize,
    pub base_bytes: usize,
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
    compaction: crate::config::CompactionConfig,
    /// Compactions asked for in the current group, run once it is committed.
    compactions: Vec<(i64, Reply<CompactionReport>)>,
}

fn now_ms() -> i64 {
    larder_agent::writer::now_ms()
}

/// Checks that new entries continue the device's audit chain from `head` and that the batch's
/// signature covers their last link; returns their audit rows.
fn audit_rows(
    device: &DeviceId,
    key: &larder_shared::PublicKey,
    mut head: [u8; 32],
    entries: &[larder_shared::envelope::Entry],
    head_sig: Option<Vec<u8>>,
    now: i64,
) -> Result<Vec<crate::store::AuditRow>, &'static str> {
    use larder_shared::audit;
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        if e.prev != Some(head) {
            return Err("chain_broken");
        }
        let digest = audit::change_digest(&e.change);
        let hash = audit::entry_hash(&head, device, e.seq, &e.ledger, e.epoch, &digest);
        rows.push(crate::store::AuditRow {
            device: device.clone(),
            seq: e.seq,
            ledger: e.ledger.clone(),
            epoch: e.epoch,
            prev: head,
            hash,
            change_sha256: digest,
            head_sig: None,
            received_at_ms: now,
        });
        head = hash;
    }
    if let Some(last) = rows.last_mut() {
        let sig = head_sig.ok_or("bad_audit_signature")?;
        if !audit::verify_head(key, device, last.seq, &last.hash, &sig) {
            return Err("bad_audit_signature");
        }
        last.head_sig = Some(sig);
    }
    Ok(rows)
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
        compaction: crate::config::CompactionConfig,
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
            compaction,
            compactions: Vec::new(),
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
            for (archive_before_ms, reply) in std::mem::take(&mut self.compactions) {
                let _ = reply.send(self.compact(archive_before_ms));
            }
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
                RegionCommand::Compact {
                    archive_before_ms,
                    reply,
                } => self.compactions.push((archive_before_ms, reply)),
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

    /// Moves every ledger with finished records from before `archive_before_ms` onto a new
    /// epoch, announced in each replica's downlink stream; retires old epochs every active
    /// replica has acknowledged; prunes the archive and the audit log past the retention.
    fn compact(&mut self, archive_before_ms: i64) -> Result<CompactionReport, RegionError> {
        let now = now_ms();
        let storage = |e: StoreError| RegionError::Storage(e.to_string());
        let mut report = CompactionReport::default();
        let devices = self.store.devices().map_err(storage)?;
        for fridge in self.fridges.clone() {
            let Some(ledger) = self.ledgers.get(&fridge) else {
                continue;
            };
            if ledger.waits_for_dependencies() {
                continue;
            }
            let c = ledger
                .compact(archive_before_ms)
                .map_err(|e| RegionError::Storage(format!("compacting {fridge}: {e}")))?;
            if c.archived.is_empty() {
                continue;
            }
            let rebase = larder_shared::envelope::Rebase {
                included: devices
                    .iter()
                    .filter(|(d, _)| d.fridges.contains(&fridge))
                    .map(|(d, p)| (d.device_id.clone(), p.up_hwm))
                    .collect(),
                base: c.base.clone(),
            }
            .encode();
            if rebase.len() + envelope::ENVELOPE_OVERHEAD_BYTES_MAX + 64 > self.max_message_bytes {
                warn!(fridge = %fridge, bytes = rebase.len(), limit = self.max_message_bytes,
                    "the live ledger is too large for one message; not compacted (raise mqtt.max_message_bytes)");
                continue;
            }
            self.store
                .start_epoch(&fridge, c.epoch, &rebase, &c.base, &c.archived, now)
                .map_err(storage)?;
            let next = Ledger::load(fridge.clone(), hub_actor(), Some(&c.base), &[])
                .map_err(|e| RegionError::Storage(format!("loading {fridge}'s new epoch: {e}")))?;
            self.ledgers.insert(fridge.clone(), next);
            self.changes_since_snapshot.insert(fridge.clone(), 0);
            info!(region = %self.region, fridge = %fridge, epoch = c.epoch, archived = c.archived.len(),
                live_units = c.live_units, base_bytes = c.base.len(), "ledger compacted into a new epoch");
            report.ledgers.push(LedgerCompaction {
                fridge_id: fridge,
                epoch: c.epoch,
                archived: c.archived.len(),
                live_units: c.live_units,
                live_orders: c.live_orders,
                base_bytes: c.base.len(),
            });
        }
        if !report.ledgers.is_empty() {
            let head = self.store.head().map_err(storage)?;
            self.head_tx.send_replace(head);
        }
        let active_since = now - (self.compaction.dormant_after_seconds as i64) * 1000;
        for fridge in &self.fridges {
            report.retired_rows += self
                .store
                .retire_epochs(fridge, active_since)
                .map_err(storage)?;
        }
        let keep_since = now - (self.compaction.retention_days as i64) * 86_400_000;
        (report.pruned_archive, report.pruned_audit) =
            self.store.prune(keep_since).map_err(storage)?;
        let labels = vec![("region", self.region.to_string())];
        self.metrics
            .ledgers_compacted
            .get_or_create(&labels)
            .inc_by(report.ledgers.len() as u64);
        self.metrics
            .records_archived
            .get_or_create(&labels)
            .inc_by(report.ledgers.iter().map(|l| l.archived as u64).sum());
        self.metrics
            .epoch_rows_retired
            .get_or_create(&labels)
            .inc_by(report.retired_rows as u64);
        Ok(report)
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
        now: i64,
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
                for e in &b.entries {
                    if e.kind != larder_shared::envelope::EntryKind::Change {
                        return UplinkOutcome::Rejected("malformed");
                    }
                    if e.seq <= p.up_hwm {
                        continue;
                    }
                    // A change of an older epoch waits on the device until it has rebased onto
                    // the new one (its downlink stream brings it) and carried it over.
                    match self.ledgers.get(&e.ledger).map(Ledger::epoch) {
                        Some(current) if e.epoch < current => {
                            return UplinkOutcome::Rejected("stale_epoch");
                        }
                        Some(current) if e.epoch > current => {
                            return UplinkOutcome::Rejected("future_epoch");
                        }
                        _ => {}
                    }
                }
                let head_sig = b.head_sig.clone();
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
                        let audit = match audit_rows(
                            sender,
                            &record.public_key,
                            p.chain_head,
                            &entries,
                            head_sig,
                            now,
                        ) {
                            Ok(rows) => rows,
                            Err(reason) => return UplinkOutcome::Rejected(reason),
                        };
                        if let Err(reason) = self.merge(sender, entries, batch) {
                            return UplinkOutcome::Rejected(reason);
                        }
                        if let Some(last) = audit.last() {
                            p.chain_head = last.hash;
                        }
                        batch.audit.extend(audit);
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
                epoch: e.epoch,
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
