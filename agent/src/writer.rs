//! The single writer: owns the SQLite store and the in-memory ledgers, and commits groups of
//! commands in one transaction each (group commit).
//!
//! Data flow: HTTP handlers and the sync task send [`Command`]s over a bounded channel →
//! the writer thread takes every command waiting (up to `group_commit_max`) → applies each to
//! its ledger (one Automerge change each) → writes change bytes, projection rows, outbox entries
//! and idempotency records for all of them in one transaction → commits (one fsync) → answers
//! them all → wakes the sync task. Nothing is answered before its commit returns; if the commit
//! fails, every command of the group gets an error and the ledgers are reloaded from disk, so
//! memory never runs ahead of the disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use larder_shared::catalog::Catalog;
use larder_shared::domain::{DoorSession, Payment, Refill, Role, Sale, SaleLine, TakenMatch};
use larder_shared::envelope::{Ack, Batch, EntryKind, Generation, Origin, Rebase};
use larder_shared::ledger::{self, Ledger, LedgerError, LocalChange, Touched};
use larder_shared::reliable::{Receipt, StreamReceiver};
use larder_shared::{DeviceId, FridgeId, OrderId, UnitId, limits};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use larder_runtime::Clock;

use crate::config::{StoreConfig, WriterConfig};
use crate::metrics::Shared;
use crate::store::{self, ChangeRow, DiskGuard, RebaseWrite, Store, StoreError, WriteBatch};

mod command;
mod local;
mod remote;

pub(crate) use command::CommandError;
use command::Reply;
pub(crate) use command::{
    Action, Command, ConflictEntry, Outcome, PendingCapture, UnitMatch, submit,
};
pub(crate) use larder_runtime::http::Idem;
use local::LocalGroup;
use remote::{Remote, starts_epoch};

/// A command of the group waiting for the group's commit before it is answered.
enum Pending {
    Local(Reply, Outcome),
    /// Refused on its own merits: it changed nothing, but it is answered after the group like
    /// the rest, so whoever hears the refusal sees what the group committed. If the group's
    /// commit fails, it gets the group's error instead: the refusal may have rested on what the
    /// group had staged (a unit sold earlier in it, say).
    Refused(Reply, CommandError),
    Downlink(oneshot::Sender<Result<Ack, CommandError>>, Ack),
    Reserve(oneshot::Sender<Result<(), CommandError>>),
    /// The position to send from after the hub's store changed generation (`None`: not
    /// taken): dropped unanswered if the group fails, so the sync task asks again with the next
    /// acknowledgement.
    Generation(oneshot::Sender<Option<u64>>, Option<u64>),
}

impl Pending {
    /// Answers the command once its group's fate is known: what it staged (or its refusal) if
    /// the group committed, else `failed`.
    fn answer(self, failed: Option<&CommandError>) {
        match self {
            Pending::Local(reply, done) => {
                let _ = reply.send(failed.map_or(Ok(done), |e| Err(e.clone())));
            }
            Pending::Refused(reply, refusal) => {
                let _ = reply.send(Err(failed.cloned().unwrap_or(refusal)));
            }
            Pending::Downlink(reply, ack) => {
                let _ = reply.send(failed.map_or(Ok(ack), |e| Err(e.clone())));
            }
            Pending::Reserve(reply) => {
                let _ = reply.send(failed.map_or(Ok(()), |e| Err(e.clone())));
            }
            Pending::Generation(reply, from) => {
                if failed.is_none() {
                    let _ = reply.send(from);
                }
            }
        }
    }
}

/// Where the writer's counters stand; copied before a group and restored if its commit fails.
#[derive(Debug, Clone)]
struct Counters {
    outbox_head: u64,
    up_acked: u64,
    down: StreamReceiver,
    /// The audit-chain hash of the newest local change.
    chain_head: [u8; 32],
    /// The hub store's generation last seen in an acknowledgement.
    hub_generation: Option<Generation>,
    /// The hub's store changed generation and its downlink stream starts again where it
    /// stands: the next downlink batch sets `down`'s position.
    down_restart: bool,
}

/// The writer's state. Lives on its own thread.
#[derive(Debug)]
pub(crate) struct Writer {
    store: Store,
    device: DeviceId,
    role: Role,
    fridges: Vec<FridgeId>,
    ledgers: BTreeMap<FridgeId, Ledger>,
    catalog: Catalog,
    counters: Counters,
    changes_since_snapshot: HashMap<FridgeId, usize>,
    /// When idempotency records past their retention were last deleted.
    idempotency_pruned: std::time::Instant,
    config: WriterConfig,
    limits: StoreConfig,
    disk: DiskGuard,
    clock: Clock,
    shared: Arc<Shared>,
    outbox_head_tx: watch::Sender<u64>,
    orders: crate::config::OrdersConfig,
    payments: crate::config::PaymentsConfig,
    temperature: crate::config::TemperatureConfig,
    /// Ongoing temperature excursions per fridge: since when, the peak, whether its units
    /// were quarantined already, and the last reading's time. Kept in memory: after a restart
    /// an excursion starts over.
    excursions: HashMap<FridgeId, (i64, f64, bool, i64)>,
    /// Card payments this device took offline, not yet captured.
    uncaptured: BTreeMap<OrderId, PendingCapture>,
    /// The furthest the hub has acknowledged, committed or not: an acknowledgement whose
    /// commit failed is taken again with the next group.
    hub_acked: u64,
}

/// Why local writes are held back for this group, if they are.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    None,
    Disk { free_bytes: u64 },
}

impl Writer {
    /// Opens the store and loads every ledger this device holds.
    pub(crate) fn open(
        store: Store,
        agent: &crate::config::AgentConfig,
        clock: Clock,
        shared: Arc<Shared>,
    ) -> Result<(Self, watch::Receiver<u64>), StoreError> {
        let (device, role, fridges) = (agent.device_id.clone(), agent.role, agent.fridges.clone());
        let (config, limits) = (agent.writer.clone(), agent.store.clone());
        let disk = DiskGuard::new(&agent.data_dir, limits.disk_reserve_bytes);
        shared
            .outbox_limit
            .store(limits.outbox_max_changes, Ordering::Relaxed);
        shared
            .metrics
            .outbox_limit
            .set(limits.outbox_max_changes as i64);
        let hours_max = agent.payments.offline_hours_max;
        shared.offline_hours_max.store(hours_max, Ordering::Relaxed);
        shared
            .metrics
            .offline_payment_hours_max
            .set(i64::try_from(hours_max).unwrap_or(i64::MAX));
        let catalog = store.catalog()?;
        let counters = Counters {
            outbox_head: store.outbox_head()?,
            up_acked: store.meta_u64(store::META_UP_ACKED)?,
            down: StreamReceiver::new(store.meta_u64(store::META_DOWN_HWM)?),
            chain_head: store.chain_head()?.unwrap_or(larder_shared::audit::GENESIS),
            hub_generation: store
                .meta(store::META_HUB_GENERATION)?
                .as_deref()
                .and_then(Generation::parse),
            down_restart: store.meta_u64(store::META_DOWN_RESTART)? == 1,
        };
        let (outbox_head_tx, outbox_head_rx) = watch::channel(counters.outbox_head);
        let mut writer = Self {
            store,
            device,
            role,
            fridges,
            ledgers: BTreeMap::new(),
            catalog,
            counters,
            changes_since_snapshot: HashMap::new(),
            idempotency_pruned: std::time::Instant::now(),
            config,
            limits,
            disk,
            clock,
            shared,
            outbox_head_tx,
            orders: agent.orders.clone(),
            payments: agent.payments.clone(),
            temperature: agent.temperature.clone(),
            excursions: HashMap::new(),
            uncaptured: BTreeMap::new(),
            hub_acked: 0,
        };
        writer.reload_ledgers()?;
        writer.publish_counters();
        Ok((writer, outbox_head_rx))
    }

    fn reload_ledgers(&mut self) -> Result<(), StoreError> {
        self.ledgers.clear();
        self.uncaptured.clear();
        for fridge in self.fridges.clone() {
            let loaded = self.store.load_ledger(&fridge)?;
            let ledger = Ledger::load(
                fridge.clone(),
                ledger::actor_for(&self.device),
                loaded.snapshot.as_deref(),
                &loaded.changes,
            )
            .map_err(|e| StoreError::Corrupt(format!("ledger {fridge}: {e}")))?;
            self.changes_since_snapshot
                .insert(fridge.clone(), loaded.changes.len());
            for r in ledger.pending_payments(&self.device) {
                self.uncaptured.insert(
                    r.order_id.clone(),
                    PendingCapture {
                        fridge: fridge.clone(),
                        order: r.order_id,
                        amount_minor: r.total_minor,
                        currency: r.payment.currency,
                        taken_at_ms: r.created_at_ms,
                    },
                );
            }
            self.ledgers.insert(fridge, ledger);
        }
        Ok(())
    }

    fn publish_counters(&self) {
        let s = &self.shared;
        s.outbox_head
            .store(self.counters.outbox_head, Ordering::Relaxed);
        s.up_acked.store(self.counters.up_acked, Ordering::Relaxed);
        s.catalog_version
            .store(self.catalog.version, Ordering::Relaxed);
        let oldest = self.uncaptured.values().map(|c| c.taken_at_ms).min();
        s.oldest_offline_payment_ms
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
        s.metrics
            .offline_payment_oldest_seconds
            .set(oldest.map_or(0, |ms| ms / 1000));
        s.metrics.pending_changes.set(
            (self.counters.outbox_head - self.counters.up_acked.min(self.counters.outbox_head))
                as i64,
        );
        self.outbox_head_tx.send_replace(self.counters.outbox_head);
    }

    fn digests(&self) -> Vec<crate::LedgerDigest> {
        self.ledgers
            .iter()
            .map(|(f, l)| crate::LedgerDigest {
                fridge_id: f.clone(),
                state_digest: l.state_digest(),
            })
            .collect()
    }

    /// Runs until every sender of the channel is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut held: Option<Command> = None;
        while let Some(first) = held.take().or_else(|| rx.blocking_recv()) {
            let mut group = Vec::with_capacity(self.config.group_commit_max.min(64));
            let alone = starts_epoch(&first);
            group.push(first);
            while !alone && group.len() < self.config.group_commit_max {
                match rx.try_recv() {
                    Ok(cmd) if starts_epoch(&cmd) => {
                        held = Some(cmd);
                        break;
                    }
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            self.process(group);
            // Snapshots are maintenance: done when no command waits, or when overdue.
            let idle = rx.is_empty();
            self.snapshot_due(idle);
        }
        info!("writer stopped");
    }

    /// Checks the disk reserve once per group.
    fn disk_check(&self) -> Refusal {
        let Some(free_bytes) = self.disk.free_bytes() else {
            return Refusal::None;
        };
        let low = free_bytes < self.disk.reserve_bytes();
        self.shared
            .disk_free_bytes
            .store(free_bytes, Ordering::Relaxed);
        self.shared
            .metrics
            .disk_free_bytes
            .set(free_bytes.min(i64::MAX as u64) as i64);
        if low != self.shared.storage_low.swap(low, Ordering::Relaxed) {
            if low {
                warn!(
                    free_bytes,
                    reserve_bytes = self.disk.reserve_bytes(),
                    "free disk space is below the reserve; refusing writes until space returns"
                );
            } else {
                info!(
                    free_bytes,
                    "free disk space is back above the reserve; writes resume"
                );
            }
        }
        if low {
            Refusal::Disk { free_bytes }
        } else {
            Refusal::None
        }
    }

    fn refuse(&self, reason: &'static str) {
        self.shared
            .metrics
            .writes_refused
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// One piece: a group is staged into one batch in arrival order and committed once; each
    /// command's work is a call into `local` or `remote`, and what stays here is the dispatch,
    /// the one commit and the answers after it.
    fn process(&mut self, group: Vec<Command>) {
        let now = self.clock.now_ms();
        let refusal = if group
            .iter()
            .any(|c| matches!(c, Command::Local { .. } | Command::Downlink { .. }))
        {
            self.disk_check()
        } else {
            Refusal::None
        };
        let saved = self.counters.clone();
        let catalog_before = self.catalog.clone();
        let excursions_before = self.excursions.clone();
        let mut batch = WriteBatch::default();
        // The hub's acknowledgement holds whether or not the commit that recorded it went
        // through: one a failed commit lost is recorded with this group. Else a full outbox
        // would refuse every write while nothing new went out to earn another ack.
        self.forget_acked(&mut batch);
        let mut pending = Vec::with_capacity(group.len());
        let mut in_group: HashMap<String, (String, Outcome)> = HashMap::new();
        let mut touched_fridges: HashMap<FridgeId, usize> = HashMap::new();
        let mut remote: BTreeMap<FridgeId, Vec<Remote>> = BTreeMap::new();
        let size = group.len();
        for cmd in group {
            match cmd {
                Command::Local {
                    fridge,
                    action,
                    idem,
                    reply,
                } => {
                    let mut group = LocalGroup {
                        in_group: &mut in_group,
                        batch: &mut batch,
                        now,
                        refusal,
                    };
                    match self.local(&fridge, action, idem.as_ref(), &mut group) {
                        Ok((outcome, changed)) => {
                            if changed {
                                *touched_fridges.entry(fridge).or_default() += 1;
                            }
                            pending.push(Pending::Local(reply, outcome));
                        }
                        Err(e) => pending.push(Pending::Refused(reply, e)),
                    }
                }
                Command::Downlink { batch: down, reply } => {
                    if let Refusal::Disk { free_bytes } = refusal {
                        // Not taken: the hub resends it once there is room.
                        let _ = reply.send(Err(CommandError::InsufficientStorage {
                            free_bytes,
                            reserve_bytes: self.disk.reserve_bytes(),
                        }));
                        continue;
                    }
                    let ack = self.downlink(down, &mut remote, &mut batch);
                    pending.push(Pending::Downlink(reply, ack));
                }
                Command::UpAcked { up_to } => {
                    if up_to <= self.counters.outbox_head {
                        self.hub_acked = self.hub_acked.max(up_to);
                    }
                    self.forget_acked(&mut batch);
                }
                Command::HubGeneration {
                    generation,
                    up_to,
                    origin,
                    reply,
                } => {
                    let from = self.hub_generation(generation, up_to, origin, &mut batch);
                    pending.push(Pending::Generation(reply, from));
                }
                Command::Ping { reply } => {
                    let _ = reply.send(());
                }
                Command::Catalog(catalog) => {
                    if catalog.version > self.catalog.version {
                        batch.meta.push((
                            store::META_CATALOG,
                            serde_json::to_string(&catalog).unwrap_or_default(),
                        ));
                        info!(version = catalog.version, "catalog updated");
                        self.catalog = catalog;
                    }
                }
                Command::Digests { reply } => {
                    let _ = reply.send(self.digests());
                }
                Command::PendingCaptures { reply } => {
                    let _ = reply.send(self.uncaptured.values().cloned().collect());
                }
                Command::Conflicts { reply } => {
                    let _ = reply.send(self.conflicts());
                }
                Command::Captured { capture, ok } => {
                    if self.uncaptured.remove(&capture.order).is_some()
                        && let Some(ledger) = self.ledgers.get_mut(&capture.fridge)
                    {
                        let (status, note) = if ok {
                            (
                                larder_shared::domain::OrderStatus::PaymentCaptured,
                                "captured once online",
                            )
                        } else {
                            (
                                larder_shared::domain::OrderStatus::PaymentFailedAfterSale,
                                "the card payment taken offline could not be captured",
                            )
                        };
                        match ledger.add_event(
                            &capture.order,
                            status,
                            Some(note.into()),
                            &self.device,
                            now,
                        ) {
                            Ok(change) => {
                                let fridge = capture.fridge.clone();
                                self.record_local(&fridge, change, &mut batch);
                                *touched_fridges.entry(fridge).or_default() += 1;
                            }
                            Err(e) => {
                                warn!(order = %capture.order, error = %e, "recording a capture outcome failed")
                            }
                        }
                    }
                }
                Command::Stats { reply } => {
                    let stats = self
                        .ledgers
                        .iter()
                        .map(|(f, l)| {
                            let (units, orders) = l.unit_and_order_ids();
                            crate::LedgerStats {
                                fridge_id: f.clone(),
                                epoch: l.epoch(),
                                document_bytes: l.save().len(),
                                units: units.len(),
                                orders: orders.len(),
                            }
                        })
                        .collect();
                    let _ = reply.send(stats);
                }
                Command::ReserveEnvSeq { up_to, reply } => {
                    batch
                        .meta
                        .push((store::META_ENV_SEQ_RESERVED, up_to.to_string()));
                    pending.push(Pending::Reserve(reply));
                }
            }
        }
        if batch.is_empty() && pending.is_empty() {
            return;
        }
        if let Err(e) = self.apply_remote(remote, &mut batch, &mut touched_fridges) {
            // Only a rebase can fail here, before anything of it was staged in memory that the
            // disk does not have: the ledgers are reloaded and the downlink is not acknowledged.
            error!(error = %e, "moving a ledger onto its new epoch failed; the hub will resend");
            self.counters = saved;
            if let Err(e) = self.reload_ledgers() {
                error!(error = %e, "reloading ledgers failed");
            }
            let err = CommandError::Storage(e.to_string());
            for p in pending {
                p.answer(Some(&err));
            }
            self.publish_counters();
            return;
        }
        self.grant_escrow(&touched_fridges, &mut batch, now);
        self.counters_to_meta(&saved, &mut batch);
        let started = std::time::Instant::now();
        let result = if batch.is_empty() {
            Ok(())
        } else {
            self.store.commit_batch(&batch, now)
        };
        self.shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.shared.metrics.commit_group_size.observe(size as f64);
        match result {
            Ok(()) => {
                // What the group committed is visible (health, the sync task's outbox head)
                // before anyone hears it is done.
                self.publish_counters();
                for p in pending {
                    p.answer(None);
                }
                for (fridge, n) in touched_fridges {
                    *self.changes_since_snapshot.entry(fridge).or_default() += n;
                }
            }
            Err(e) => {
                error!(error = %e, commands = size, "commit failed; group refused, ledgers reloaded");
                self.shared.metrics.commit_failures.inc();
                self.counters = saved;
                self.catalog = catalog_before;
                // An excursion whose quarantine was not stored has not quarantined anything.
                self.excursions = excursions_before;
                if let Err(e) = self.reload_ledgers() {
                    error!(error = %e, "reloading ledgers after a failed commit failed");
                }
                let err = if store::is_disk_full(&e) {
                    self.refuse("insufficient_storage");
                    CommandError::InsufficientStorage {
                        free_bytes: self.disk.free_bytes().unwrap_or(0),
                        reserve_bytes: self.disk.reserve_bytes(),
                    }
                } else {
                    CommandError::Storage(e.to_string())
                };
                for p in pending {
                    p.answer(Some(&err));
                }
            }
        }
        self.publish_counters();
    }

    fn counters_to_meta(&self, saved: &Counters, batch: &mut WriteBatch) {
        let c = &self.counters;
        if c.down_restart != saved.down_restart {
            let flag = u8::from(c.down_restart).to_string();
            batch.meta.push((store::META_DOWN_RESTART, flag));
        }
        if c.down.hwm() != saved.down.hwm() {
            batch
                .meta
                .push((store::META_DOWN_HWM, c.down.hwm().to_string()));
        }
    }

    /// Deletes idempotency records older than `store.idempotency_retention_hours`, when idle
    /// and at most once a minute, so the table stays the size of that window.
    fn prune_idempotency(&mut self, idle: bool) {
        if !idle || self.idempotency_pruned.elapsed() < std::time::Duration::from_secs(60) {
            return;
        }
        self.idempotency_pruned = std::time::Instant::now();
        let before =
            self.clock.now_ms() - (self.limits.idempotency_retention_hours as i64) * 3_600_000;
        match self.store.prune_idempotency(before) {
            Ok(0) => {}
            Ok(n) => info!(
                records = n,
                "idempotency records past their retention deleted"
            ),
            Err(e) => warn!(error = %e, "pruning idempotency records failed; will retry"),
        }
    }

    /// Folds the change logs of ledgers past `snapshot_every_changes` into snapshots: when the
    /// writer is idle, or regardless once a log is four times past the threshold.
    fn snapshot_due(&mut self, idle: bool) {
        self.prune_idempotency(idle);
        let due = ledger::snapshots_due(
            &self.changes_since_snapshot,
            self.config.snapshot_every_changes,
            idle,
        );
        for fridge in due {
            let Some(ledger) = self.ledgers.get(&fridge) else {
                continue;
            };
            if ledger.waits_for_dependencies() {
                continue;
            }
            let snapshot = ledger.save();
            match self
                .store
                .compact_ledger(&fridge, &snapshot, self.counters.up_acked)
            {
                Ok(()) => {
                    self.changes_since_snapshot.insert(fridge, 0);
                }
                Err(e) => warn!(fridge = %fridge, error = %e, "ledger snapshot failed; will retry"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use larder_shared::catalog::{Catalog, CatalogItem};
    use larder_shared::domain::SaleLine;
    use larder_shared::domain::{Channel, Payment, PaymentMethod, Refill, RefillUnit, Sale};
    use larder_shared::{FridgeId, Sku, UnitId};

    use super::*;

    /// An order placed under a device's next own id before the device was enrolled (or in the
    /// moment between the hub's two checks) makes the device number around it.
    #[test]
    fn own_order_ids_step_around_an_order_already_holding_them() {
        let (fridge, pos) = (
            DeviceId::new("fridge-1").expect("id"),
            DeviceId::new("pos-9").expect("id"),
        );
        let sku = Sku::new("lasagna").expect("sku");
        let catalog = Catalog {
            version: 1,
            currency: "EUR".into(),
            items: vec![CatalogItem {
                sku: sku.clone(),
                name: "Lasagna".into(),
                price_minor: 850,
                allergens: vec![],
                shelf_life_hours: 72,
            }],
        };
        let mut ledger = Ledger::new(
            FridgeId::new("fridge-1").expect("id"),
            ledger::actor_for(&fridge),
        )
        .expect("ledger");
        let refill = Refill {
            units: vec![RefillUnit {
                unit_id: UnitId::new("u-1").expect("id"),
                sku: sku.clone(),
                expires_at_ms: i64::MAX / 2,
                batch: None,
            }],
            order_id: None,
        };
        ledger.refill(&refill, &fridge, 1).expect("refill");
        let taken = OrderId::new("pos-9-1").expect("id");
        let sale = Sale {
            order_id: taken.clone(),
            channel: Channel::App,
            lines: vec![SaleLine {
                sku,
                unit_id: None,
                quantity: 1,
            }],
            payment: Payment {
                method: PaymentMethod::Cash,
                amount_minor: 850,
                currency: "EUR".into(),
            },
            payment_pending: false,
        };
        ledger.sell(&sale, &catalog, &fridge, 2).expect("sale");
        assert!(ledger.has_order(&taken));

        let id = |n| {
            super::local::own_order_id(&ledger, &pos, n)
                .expect("an id")
                .to_string()
        };
        assert_eq!(id(1), "pos-9-1.1");
        assert_eq!(id(2), "pos-9-2");
    }
}
