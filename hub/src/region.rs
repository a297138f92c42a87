//! A region's single writer: verifies device envelopes, merges ledger changes, commits, and only
//! then answers with the acknowledgement to publish.
//!
//! Data flow: the MQTT task hands each `up` publish to the region's verifier thread
//! (`verifier`), which batch-checks signatures ahead of the writer and passes it on as
//! [`RegionCommand::Uplink`] → the writer thread takes every waiting command (group commit)
//! → checks each envelope by docs/PROTOCOL.md's
//! rules (size, decoding, region, topic, sender enrolled and not revoked, signature, replay,
//! ledgers served, change authors) → merges accepted changes into its ledgers → writes changes,
//! stream positions and projections in one transaction → answers (the ack to send, or the
//! rejection reason) → bumps the downlink head so the pump relays the new changes.
//! A rejected envelope changes nothing.
//!
//! Import batches take another path at the end: their transaction is committed by the
//! region's committer thread (`committer`) while the writer loads the next batch.

mod answers;
pub mod catalog;
mod command;
mod committer;
mod compaction;
pub mod import;
mod orders;
mod outcome;
mod subscriptions;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod uplink;
pub mod verifier;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use larder_shared::admission::{self, Admitted, Rejection};
use larder_shared::catalog::Catalog;
use larder_shared::envelope::{self, Ack, Body, EntryKind, Party};
use larder_shared::ledger::{self, Checked, Ledger, Touched};
use larder_shared::reliable::Receipt;
use larder_shared::{DeviceId, FridgeId, RegionId};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::metrics::HubMetrics;
use larder_runtime::http::Idem;

use crate::store::{
    DeviceRecord, IdempotencyRow, Progress, RegionBatch, RegionStore, StoreError, StoredChange,
};
use answers::{KeptInGroup, Replay, answer, remember};
use command::AskedCompaction;
pub use command::{
    OrderAction, Prechecked, RegionCommand, RegionError, Reply, SubscriptionOp, UplinkOutcome,
};
pub use compaction::{CompactionReport, LedgerCompaction};
use orders::GrantSnapshot;
pub use outcome::Outcome;
use subscriptions::META_GENERATED_THROUGH;
use uplink::{Boxes, precheck_part};

/// Why a device cannot be enrolled under an id whose namespace an order already uses.
pub fn namespace_taken(device: &DeviceId, order: &str) -> String {
    format!(
        "order {order} already uses the ids {device}-…, where device {device} would number its \
         own sales: choose another device id"
    )
}

/// What the stock view shows of a ledger beyond its projection.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LedgerSummary {
    pub state_digest: String,
    pub escrow: BTreeMap<String, i64>,
    pub incidents: Vec<larder_shared::domain::Incident>,
}

/// A command of the group waiting for the group's commit before it is answered.
enum Pending {
    Answer(Reply<Outcome>, Outcome),
    /// Refused on its own: answered after the group like the rest, so whoever hears it finds
    /// what the group committed; if the group's commit fails, the group's error instead (the
    /// refusal may have rested on what the group had staged).
    Refused(Reply<Outcome>, RegionError),
    Uplink(oneshot::Sender<UplinkOutcome>, UplinkOutcome),
    Enroll(Reply<DeviceRecord>, Box<DeviceRecord>),
    Unit(Reply<()>),
    Import(Reply<import::ImportReport>, import::ImportReport),
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
    /// `sync.key_overlap_seconds`, in milliseconds.
    key_overlap_ms: i64,
    /// The hub's key, which uplink bodies are sealed to.
    hub_key: larder_shared::SecretKey,
    /// The box of each device key seen (X25519 agreement done once per key).
    boxes: Boxes,
    metrics: Arc<HubMetrics>,
    head_tx: Arc<watch::Sender<u64>>,
    /// Commits import batches while the writer loads the next (started by the first one).
    committer: Option<committer::Committer>,
    changes_since_snapshot: HashMap<FridgeId, usize>,
    /// Changes a ledger's log grows by before a snapshot (`sync.snapshot_every_changes`).
    snapshot_every_changes: usize,
    compaction: crate::config::CompactionConfig,
    /// Compactions asked for in the current group, run once it is committed.
    compactions: Vec<AskedCompaction>,
    catalog: Catalog,
    orders: crate::config::OrdersConfig,
    clock: larder_runtime::Clock,
    provider: crate::payments::Capturer,
    /// App orders whose capture the provider did not answer (they time out).
    unanswered: std::collections::HashSet<larder_shared::OrderId>,
    /// Captures to be reported failed later: when, the ledger, the order.
    fail_later: Vec<(i64, FridgeId, larder_shared::OrderId)>,
    calendar: crate::subscriptions::Calendar,
    /// The last date whose subscription occurrences are orders.
    generated_through: Option<jiff::civil::Date>,
    /// Per ledger, the fridge's escrow grants as they stood after the change table reached
    /// each head: a grant is usable for offline orders once every other walk-up seller of the
    /// fridge (its POS) has acknowledged its downlink past that head.
    grants: HashMap<FridgeId, Vec<GrantSnapshot>>,
    /// When time next makes something due in each ledger, and the ledgers changed since it was
    /// computed: the tick visits only ledgers with something due.
    due: HashMap<FridgeId, Option<i64>>,
    dirty: std::collections::HashSet<FridgeId>,
    /// Each ledger's stock counts for the refill plan, with the (minute, next delivery) they
    /// were counted for; recounted when the ledger changed (`stock_dirty`) or the key moved.
    stock_cache: HashMap<FridgeId, StockCache>,
    stock_dirty: std::collections::HashSet<FridgeId>,
    /// Every catalog version published and when, for `price_changed`.
    catalog_history: larder_shared::catalog::CatalogHistory,
    /// The current catalog, for the MQTT task (which announces it) and the API.
    catalog_tx: watch::Sender<Arc<Catalog>>,
    /// A catalog version staged in the group, announced once committed.
    published: Option<Catalog>,
    /// Per sku, the sum of stars and the number of ratings.
    ratings: HashMap<larder_shared::Sku, (i64, u64)>,
    /// The region's live event feed, and the events the current group makes, published once
    /// it is committed.
    events: crate::events::Events,
    after_commit: Vec<crate::events::EventKind>,
}

/// A ledger's counted stock and what it was counted for.
#[derive(Debug)]
struct StockCache {
    /// The minute and the next delivery it was counted for.
    key: (i64, i64),
    counts: Arc<std::collections::HashMap<String, crate::subscriptions::StockCount>>,
}

/// What a group knows of its senders: their device rows as committed before the group, read
/// once each, and their stream progress as the group has moved it.
#[derive(Debug, Default)]
struct GroupDevices {
    known: HashMap<DeviceId, (DeviceRecord, Progress)>,
    progress: HashMap<DeviceId, Progress>,
    /// The devices' changes the group took, per ledger, checked one envelope after another.
    checked: BTreeMap<FridgeId, Checked>,
}

/// Groups smaller than this are prechecked on the writer thread alone.
const PRECHECK_SPLIT_MIN: usize = 64;

/// An uplink for the batch check: its place in the group, the envelope, its bytes, the
/// sender's current key and the box its body is sealed with.
type PrecheckItem<'a> = (
    usize,
    envelope::Unverified,
    &'a [u8],
    larder_shared::PublicKey,
    &'a envelope::BoxKey,
);

/// Moves the downlink head up to `head` (never down: the committer and the writer both raise it).
fn raise_head(head_tx: &watch::Sender<u64>, head: u64) {
    head_tx.send_if_modified(|h| {
        let higher = head > *h;
        if higher {
            *h = head;
        }
        higher
    });
}

/// The hub's own Automerge actor in a store of `generation`: a restored store numbers the hub's
/// changes under a new actor, never again those the lost one numbered (devices give them back).
pub fn hub_actor(generation: &larder_shared::envelope::Generation) -> automerge::ActorId {
    automerge::ActorId::from([&b"\x00hub"[..], &generation.0].concat())
}

impl RegionWriter {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        region: RegionId,
        store: RegionStore,
        fridges: Vec<FridgeId>,
        max_message_bytes: usize,
        sync: &crate::config::SyncConfig,
        compaction: crate::config::CompactionConfig,
        orders: crate::config::OrdersConfig,
        calendar: crate::subscriptions::Calendar,
        clock: larder_runtime::Clock,
        metrics: Arc<HubMetrics>,
        events: crate::events::Events,
        hub_key: larder_shared::SecretKey,
    ) -> Result<(Self, watch::Receiver<u64>), StoreError> {
        let generated_through = store
            .meta(META_GENERATED_THROUGH)?
            .and_then(|d| d.parse().ok());
        let provider = crate::payments::Capturer::simulated(&region, orders.simulated_payments);
        let (group_commit_max, snapshot_every_changes) =
            (sync.group_commit_max, sync.snapshot_every_changes);
        let (head_tx, head_rx) = watch::channel(store.head()?);
        let store = store.with_clock(clock.clone());
        let mut w = Self {
            region,
            store,
            fridges,
            ledgers: BTreeMap::new(),
            max_message_bytes,
            group_commit_max,
            key_overlap_ms: i64::try_from(sync.key_overlap_seconds.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            hub_key,
            boxes: Boxes::default(),
            metrics,
            head_tx: Arc::new(head_tx),
            committer: None,
            changes_since_snapshot: HashMap::new(),
            snapshot_every_changes,
            compaction,
            compactions: Vec::new(),
            catalog: Catalog::default(),
            orders,
            clock,
            provider,
            unanswered: std::collections::HashSet::new(),
            fail_later: Vec::new(),
            calendar,
            generated_through,
            grants: HashMap::new(),
            due: HashMap::new(),
            dirty: std::collections::HashSet::new(),
            stock_cache: HashMap::new(),
            stock_dirty: std::collections::HashSet::new(),
            catalog_history: Default::default(),
            catalog_tx: watch::channel(Arc::new(Catalog::default())).0,
            published: None,
            ratings: HashMap::new(),
            events,
            after_commit: Vec::new(),
        };
        w.reload()?;
        let head = w.store.head()?;
        for (fridge, ledger) in &w.ledgers {
            let granted = ledger.granted_all();
            w.grants
                .insert(fridge.clone(), vec![GrantSnapshot { head, granted }]);
        }
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
        if !due.is_empty() {
            self.settle();
        }
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

    /// [`Self::reload`] after a failed commit or merge, logging a failure to reload.
    fn reload_logged(&mut self) {
        if let Err(e) = self.reload() {
            error!(error = %e, "reloading ledgers failed");
        }
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        self.published = None;
        // A generation whose commit failed made no orders: the next tick makes them again.
        self.generated_through = self
            .store
            .meta(META_GENERATED_THROUGH)?
            .and_then(|d| d.parse().ok());
        self.after_commit.clear();
        self.catalog_history = Default::default();
        self.load_catalogs()?;
        if let Some(json) = self.store.meta(crate::store::META_CATALOG)? {
            self.catalog =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        self.ledgers.clear();
        self.dirty.extend(self.fridges.iter().cloned());
        self.stock_dirty.extend(self.fridges.iter().cloned());
        let actor = hub_actor(&self.store.generation()?.0);
        for fridge in self.fridges.clone() {
            let loaded = self.store.load_ledger(&fridge)?;
            self.changes_since_snapshot
                .insert(fridge.clone(), loaded.changes.len());
            let snapshot = loaded.snapshot.as_deref();
            let ledger = Ledger::load(fridge.clone(), actor.clone(), snapshot, &loaded.changes)
                .map_err(|e| StoreError::Corrupt(format!("ledger {fridge}: {e}")))?;
            self.ledgers.insert(fridge, ledger);
        }
        Ok(())
    }

    pub fn env_seq_reserved(&self) -> Result<u64, StoreError> {
        Ok(self
            .store
            .meta(crate::store::META_ENV_SEQ_RESERVED)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Runs until [`RegionCommand::Stop`] (which the region's verifier passes on at shutdown)
    /// or until every sender is gone.
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
            for (archive_before_ms, idem, reply) in std::mem::take(&mut self.compactions) {
                self.settle();
                let _ = reply.send(self.compact_once(archive_before_ms, idem));
            }
            // Snapshots are maintenance: done when no command waits, or when overdue.
            let idle = rx.is_empty();
            self.snapshot_due(idle);
        }
        self.settle();
        self.committer = None;
        info!(region = %self.region, "region writer stopped");
    }

    /// Waits for the import batch in flight (see [`committer`]): `false` if its commit failed;
    /// its requests were answered with the error and the ledgers reloaded from the store.
    fn settle(&mut self) -> bool {
        let Some(c) = self.committer.as_mut() else {
            return true;
        };
        match c.settle() {
            Ok(()) => true,
            Err(e) => {
                error!(region = %self.region, error = %e, "an import batch failed to commit; ledgers reloaded");
                self.reload_logged();
                false
            }
        }
    }

    /// Hands an import-only group's batch to the committer, which answers its requests once it
    /// is committed; the writer goes on to the next group meanwhile.
    fn commit_behind(&mut self, batch: RegionBatch, pending: Vec<Pending>) {
        for c in &batch.changes {
            *self
                .changes_since_snapshot
                .entry(c.ledger.clone())
                .or_default() += 1;
        }
        let events = self.events_of(&batch);
        if self.committer.is_none() {
            let started = self.store.open_again().and_then(|store| {
                committer::Committer::start(
                    store,
                    committer::Outlets {
                        region: self.region.clone(),
                        head_tx: self.head_tx.clone(),
                        events: self.events.clone(),
                        metrics: self.metrics.clone(),
                    },
                )
            });
            match started {
                Ok(c) => self.committer = Some(c),
                Err(e) => {
                    error!(region = %self.region, error = %e, "cannot start the region's committer; import batch refused");
                    self.reload_logged();
                    self.answer(pending, Err(RegionError::Storage(e.to_string())));
                    return;
                }
            }
        }
        let job = committer::Job {
            batch,
            pending,
            events,
        };
        if let Some(c) = self.committer.as_mut()
            && let Err(e) = c.commit(job)
        {
            error!(region = %self.region, error = %e, "import batch refused; ledgers reloaded");
            // The next import batch starts a new committer.
            self.committer = None;
            self.reload_logged();
        }
    }

    /// One piece: a group is staged into one batch in arrival order and committed once, and every
    /// command kind reads and extends the same group state (devices, answers, replies); each
    /// kind's work is a call into its family's file, so what stays here is the dispatch and the
    /// commit.
    fn process(&mut self, group: Vec<RegionCommand>) {
        // Import batches are committed behind the writer (see `committer`); anything else
        // may read the store, so it waits for the batch in flight first. So does an import with
        // an Idempotency-Key: its retry must find the first one's answer committed.
        let import_only = group
            .iter()
            .all(|c| matches!(c, RegionCommand::ImportUnits { idem: None, .. }));
        if !import_only {
            self.settle();
        }
        let now = self.clock.now_ms();
        let mut in_group = KeptInGroup::new();
        let mut batch = RegionBatch::default();
        let mut pending = Vec::new();
        let mut devices = GroupDevices::default();
        let mut prechecked = self.precheck(&group, &mut devices.known);
        for (i, cmd) in group.into_iter().enumerate() {
            match cmd {
                RegionCommand::Uplink {
                    topic_device,
                    payload,
                    reply,
                    pre,
                } => {
                    let pre = pre.map(|p| *p).or_else(|| prechecked.remove(&i));
                    let outcome =
                        self.uplink(&topic_device, &payload, pre, &mut devices, &mut batch, now);
                    match outcome {
                        UplinkOutcome::Rejected(reason) => {
                            self.metrics.rejected(self.region.as_str(), reason);
                            warn!(region = %self.region, device = %topic_device, reason, "envelope rejected");
                            let _ = reply.send(outcome);
                        }
                        ok => pending.push(Pending::Uplink(reply, ok)),
                    }
                }
                RegionCommand::Enroll {
                    record,
                    idem,
                    reply,
                } => match self.replay(idem.as_ref(), &in_group) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(Some(Replay::KeyReused)) => {
                        let _ = reply.send(Err(RegionError::IdempotencyKeyReused));
                    }
                    // A retry: the device is enrolled, and the route answers as it first did.
                    Ok(Some(Replay::First(..))) => {
                        let _ =
                            reply.send(Err(RegionError::DeviceExists(record.device_id.clone())));
                    }
                    Ok(None) => match self.enroll_check(&record, &batch) {
                        Ok(()) => {
                            let answer = serde_json::json!({ "device_id": record.device_id });
                            remember(idem, (201, answer), &mut batch, &mut in_group);
                            batch.enroll.push((*record).clone());
                            pending.push(Pending::Enroll(reply, record));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
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
                    let _ = reply.send(self.ledgers.get(&fridge).map(|l| {
                        let escrow = l
                            .escrow_skus()
                            .into_iter()
                            .map(|sku| {
                                let n = l.allowance(&sku);
                                (sku.to_string(), n)
                            })
                            .collect();
                        LedgerSummary {
                            state_digest: l.state_digest(),
                            escrow,
                            incidents: l.incidents(),
                        }
                    }));
                }
                RegionCommand::Compact {
                    archive_before_ms,
                    idem,
                    reply,
                } => self.compactions.push((archive_before_ms, idem, reply)),
                RegionCommand::Order {
                    fridge,
                    order,
                    action,
                    idem,
                    reply,
                } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.order_action(fridge, order, action, b, now),
                ),
                RegionCommand::Conflicts { reply } => {
                    let list = self.ledgers.values().flat_map(Ledger::conflicts).collect();
                    let _ = reply.send(list);
                }
                RegionCommand::PutCatalog {
                    currency,
                    items,
                    base,
                    idem,
                    reply,
                } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.put_catalog(currency, items, base, b, now),
                ),
                RegionCommand::Rate {
                    rating,
                    idem,
                    reply,
                } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.rate(rating, b, now),
                ),
                RegionCommand::ImportUnits { rows, idem, reply } => {
                    match self.replay(idem.as_ref(), &in_group) {
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                        Ok(Some(Replay::KeyReused)) => {
                            let _ = reply.send(Err(RegionError::IdempotencyKeyReused));
                        }
                        // A retry: the first answer again, once the group (which may hold
                        // the first) is committed.
                        Ok(Some(Replay::First(_, first))) => match serde_json::from_value(first) {
                            Ok(report) => pending.push(Pending::Import(reply, report)),
                            Err(e) => {
                                let _ = reply.send(Err(RegionError::Storage(format!(
                                    "a stored answer is unreadable: {e}"
                                ))));
                            }
                        },
                        Ok(None) => {
                            let report = self.import_units(rows, &mut batch, now);
                            if idem.is_some() {
                                let answer = serde_json::json!(report);
                                remember(idem, (200, answer), &mut batch, &mut in_group);
                            }
                            pending.push(Pending::Import(reply, report));
                        }
                    }
                }
                RegionCommand::Tick => self.tick(&mut batch, now),
                RegionCommand::StockCounts {
                    now_ms,
                    before_ms,
                    reply,
                } => {
                    let _ = reply.send(self.stock_counts(now_ms, before_ms));
                }
                RegionCommand::Subscription { op, idem, reply } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.subscription_op(op, b, now),
                ),
                RegionCommand::Stop => {}
            }
        }
        if import_only && !self.settle() {
            // Loaded on top of the batch that failed: the reload undid this group too.
            self.answer(
                pending,
                Err(RegionError::Storage(
                    "an earlier import batch failed to commit; nothing of this one was stored"
                        .into(),
                )),
            );
            return;
        }
        for (device, p) in devices.progress {
            batch.progress.push((device, p, now));
        }
        if let Err(e) = self.apply_staged(&mut batch, std::mem::take(&mut devices.checked)) {
            error!(region = %self.region, error = %e, "merging the group failed; group refused, ledgers reloaded");
            self.reload_logged();
            self.answer(pending, Err(RegionError::Storage(e)));
            return;
        }
        if batch.is_empty() {
            self.answer(pending, Ok(()));
            return;
        }
        if import_only {
            self.commit_behind(batch, pending);
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
                            raise_head(&self.head_tx, head);
                            let hub = ledger::hub_device();
                            let merged: std::collections::BTreeSet<FridgeId> = batch
                                .changes
                                .iter()
                                .filter(|c| c.author != hub)
                                .map(|c| c.ledger.clone())
                                .collect();
                            for fridge in merged {
                                self.snapshot_grants(&fridge, head);
                            }
                        }
                        Err(e) => error!(error = %e, "reading the change head failed"),
                    }
                }
                self.publish_events(&batch);
                self.answer(pending, Ok(()));
            }
            Err(e) => {
                error!(region = %self.region, error = %e, "region commit failed; group refused, ledgers reloaded");
                self.metrics.commit_failures.inc();
                self.reload_logged();
                self.answer(pending, Err(RegionError::Storage(e.to_string())));
            }
        }
    }

    /// Publishes what a committed group changed on the region's event feed, and announces a
    /// catalog version it published.
    fn publish_events(&mut self, batch: &RegionBatch) {
        use crate::events::EventKind;
        if let Some(catalog) = self.published.take() {
            let version = catalog.version;
            self.catalog_tx.send_replace(Arc::new(catalog));
            self.after_commit.push(EventKind::Catalog { version });
        }
        for kind in self.events_of(batch) {
            self.events.publish(kind);
        }
    }

    /// The events a batch makes once committed: stock moves per fridge, orders, and what the
    /// group noted for after its commit.
    fn events_of(&mut self, batch: &RegionBatch) -> Vec<crate::events::EventKind> {
        use crate::events::{EventKind, StockMove};
        let mut stock: BTreeMap<&FridgeId, Vec<StockMove>> = BTreeMap::new();
        for (fridge, unit) in &batch.units {
            stock.entry(fridge).or_default().push(unit.into());
        }
        let mut events: Vec<EventKind> = stock
            .into_iter()
            .map(|(fridge, units)| EventKind::Stock {
                fridge_id: fridge.clone(),
                units,
            })
            .collect();
        events.extend(batch.orders.iter().map(EventKind::for_order));
        events.append(&mut self.after_commit);
        events
    }

    /// The current catalog, as it changes.
    pub fn catalog_watch(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog_tx.subscribe()
    }

    fn answer(&self, pending: Vec<Pending>, result: Result<(), RegionError>) {
        answer(pending, result, &self.metrics, &self.region);
    }

    fn enroll_check(&self, record: &DeviceRecord, batch: &RegionBatch) -> Result<(), RegionError> {
        if record.device_id == ledger::hub_device() {
            return Err(RegionError::Invalid(
                "the device id hub names the hub's own writes; choose another".into(),
            ));
        }
        record
            .device_id
            .check_enrollable()
            .map_err(|e| RegionError::Invalid(e.to_string()))?;
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
        // Checked after `exists`: an enrolled device's own sales are in its namespace.
        if let Some(order) = self
            .store
            .order_in_namespace(&record.device_id)
            .map_err(|e| RegionError::Storage(e.to_string()))?
        {
            return Err(RegionError::Invalid(namespace_taken(
                &record.device_id,
                &order,
            )));
        }
        Ok(())
    }
}
