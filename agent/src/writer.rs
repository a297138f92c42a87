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
use larder_shared::envelope::{Ack, Batch, EntryKind, Rebase};
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

pub(crate) use larder_runtime::http::Idem;

/// What a successful POST did; stored with its idempotency key and replayed on retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Outcome {
    Refilled {
        fridge_id: FridgeId,
        units: usize,
    },
    Sold(Box<larder_shared::domain::OrderView>),
    DoorSession {
        fridge_id: FridgeId,
        session_id: String,
        matches: Vec<UnitMatch>,
    },
    Removed {
        fridge_id: FridgeId,
        units: usize,
    },
    /// A temperature reading: the excursion it is part of, if any, and the units it
    /// quarantined.
    Temperature {
        fridge_id: FridgeId,
        excursion_since_ms: Option<i64>,
        quarantined: Vec<UnitId>,
    },
    /// A cancel: done, or refused with the contract's code and why (the refusal is recorded in
    /// the order's history).
    Cancel {
        order: Box<larder_shared::domain::OrderView>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<(String, String)>,
    },
}

/// How one unit taken in a door session was matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UnitMatch {
    pub unit_id: UnitId,
    #[serde(flatten)]
    pub matched: TakenMatch,
}

/// Why a command was not carried out. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    #[error("fridge {0} is not served by this device")]
    UnknownFridge(FridgeId),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyConflict,
    #[error("storage unavailable: {0}")]
    Storage(String),
    #[error("the writer queue is full; retry shortly")]
    Overloaded,
    #[error(
        "only {free_bytes} bytes free on the database's disk, below the reserve of \
         {reserve_bytes}: writes are refused until space is freed (reads still work)"
    )]
    InsufficientStorage { free_bytes: u64, reserve_bytes: u64 },
    #[error(
        "{pending} local changes wait for the hub's acknowledgement, the outbox cap: writes \
         are refused until the hub is reachable again"
    )]
    OutboxFull { pending: u64 },
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(
        "{count} card payments for {total_minor} (minor units) wait to be captured, at this \
         device's offline limit: take cash, or wait until the device is online"
    )]
    OfflineLimitReached { count: u64, total_minor: i64 },
}

type Reply = oneshot::Sender<Result<Outcome, CommandError>>;

/// What a local command asks for.
#[derive(Debug)]
pub(crate) enum Action {
    Refill(Refill),
    Sale {
        lines: Vec<SaleLine>,
        payment: Payment,
    },
    /// A door session; `fridge_card` charges the units matched to nothing else to the card
    /// presented at the fridge.
    DoorSession {
        session: DoorSession,
        fridge_card: bool,
    },
    Removal {
        units: Vec<UnitId>,
        reason: larder_shared::domain::RemovalReason,
    },
    Cancel {
        order: OrderId,
    },
    /// A temperature reading from the fridge's controller.
    Temperature {
        celsius: f64,
        at_ms: i64,
    },
}

/// A request to the writer.
#[derive(Debug)]
pub(crate) enum Command {
    /// A local action from the HTTP API.
    Local {
        fridge: FridgeId,
        action: Action,
        idem: Option<Idem>,
        reply: Reply,
    },
    /// A batch of other replicas' changes from the hub; answered with the ack to send.
    Downlink {
        batch: Batch,
        reply: oneshot::Sender<Result<Ack, CommandError>>,
    },
    /// The hub acknowledged the outbox up to here.
    UpAcked { up_to: u64 },
    /// A newer catalog from the hub.
    Catalog(Catalog),
    /// Persist an envelope sequence reservation before it is used.
    ReserveEnvSeq {
        up_to: u64,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Answered as soon as the writer gets to it: proves the writer thread is alive and
    /// taking commands (the systemd watchdog asks).
    Ping { reply: oneshot::Sender<()> },
    /// Size and epoch of every ledger document, for benchmarks and diagnostics.
    Stats {
        reply: oneshot::Sender<Vec<crate::LedgerStats>>,
    },
    /// The state digest of every ledger, for convergence checks.
    Digests {
        reply: oneshot::Sender<Vec<crate::LedgerDigest>>,
    },
    /// Card payments taken offline by this device and not yet captured.
    PendingCaptures {
        reply: oneshot::Sender<Vec<PendingCapture>>,
    },
    /// What the payment provider answered for an offline card payment.
    Captured { capture: PendingCapture, ok: bool },
    /// Every conflict record of the ledgers held here, and those noticed here and not yet
    /// recorded by the hub.
    Conflicts {
        reply: oneshot::Sender<Vec<ConflictEntry>>,
    },
}

/// An offline card payment waiting to be captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingCapture {
    pub fridge: FridgeId,
    pub order: OrderId,
    pub amount_minor: i64,
    pub currency: String,
}

/// A conflict as the agent lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ConflictEntry {
    #[serde(flatten)]
    pub view: larder_shared::domain::ConflictView,
    /// False for a conflict this replica sees that the hub has not recorded yet.
    pub recorded: bool,
}

enum Pending {
    Local(Reply, Outcome),
    Downlink(oneshot::Sender<Result<Ack, CommandError>>, Ack),
    Reserve(oneshot::Sender<Result<(), CommandError>>),
}

/// Where the writer's counters stand; copied before a group and restored if its commit fails.
#[derive(Debug, Clone)]
struct Counters {
    outbox_head: u64,
    up_acked: u64,
    down: StreamReceiver,
    /// The audit-chain hash of the newest local change.
    chain_head: [u8; 32],
}

/// A downlink entry staged for the group's merge, in stream order.
#[derive(Debug)]
enum Remote {
    Change { epoch: u32, bytes: Vec<u8> },
    Rebase { epoch: u32, rebase: Rebase },
}

/// Whether a command is a downlink batch that starts a ledger's new epoch (processed in a
/// group of its own, so no local change of the group is left on the old epoch).
fn starts_epoch(cmd: &Command) -> bool {
    matches!(cmd, Command::Downlink { batch, .. }
        if batch.entries.iter().any(|e| e.kind == EntryKind::Rebase))
}

/// The id of an order this device makes (a sale, a fridge-card door session): `{device}-{n}`,
/// numbered by the outbox position its change is about to take, so unique per device and
/// persisted with the change itself. The hub refuses app orders in a device's namespace, but
/// one placed before the device was enrolled may hold that id already: then `{device}-{n}.{k}`
/// with the first free `k`, so the device goes on selling.
fn own_order_id(ledger: &Ledger, device: &DeviceId, n: u64) -> Result<OrderId, CommandError> {
    let invalid =
        |e: larder_shared::ids::IdError| CommandError::Ledger(LedgerError::Invalid(e.to_string()));
    let mut k = 0_u64;
    loop {
        let id = match k {
            0 => format!("{device}-{n}"),
            k => format!("{device}-{n}.{k}"),
        };
        let id = OrderId::new(id).map_err(invalid)?;
        if !ledger.has_order(&id) {
            return Ok(id);
        }
        k += 1;
    }
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
        let catalog = store.catalog()?;
        let counters = Counters {
            outbox_head: store.outbox_head()?,
            up_acked: store.meta_u64(store::META_UP_ACKED)?,
            down: StreamReceiver::new(store.meta_u64(store::META_DOWN_HWM)?),
            chain_head: store.chain_head()?.unwrap_or(larder_shared::audit::GENESIS),
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
                    match self.local(
                        &fridge,
                        action,
                        idem.as_ref(),
                        &mut in_group,
                        &mut batch,
                        now,
                        refusal,
                    ) {
                        Ok((outcome, changed)) => {
                            if changed {
                                *touched_fridges.entry(fridge).or_default() += 1;
                            }
                            pending.push(Pending::Local(reply, outcome));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
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
                    let ack = self.downlink(down, &mut remote);
                    pending.push(Pending::Downlink(reply, ack));
                }
                Command::UpAcked { up_to } => {
                    if up_to <= self.counters.outbox_head {
                        self.hub_acked = self.hub_acked.max(up_to);
                    }
                    self.forget_acked(&mut batch);
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
                match p {
                    Pending::Local(reply, _) => {
                        let _ = reply.send(Err(err.clone()));
                    }
                    Pending::Downlink(reply, _) => {
                        let _ = reply.send(Err(err.clone()));
                    }
                    Pending::Reserve(reply) => {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
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
                    match p {
                        Pending::Local(reply, outcome) => {
                            let _ = reply.send(Ok(outcome));
                        }
                        Pending::Downlink(reply, ack) => {
                            let _ = reply.send(Ok(ack));
                        }
                        Pending::Reserve(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                    }
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
                    match p {
                        Pending::Local(reply, _) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Pending::Downlink(reply, _) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Pending::Reserve(reply) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            }
        }
        self.publish_counters();
    }

    /// A fridge online tops up the escrow allowance it grants the hub after its stock changed
    /// (PRODUCT.md, offline-safe promises). Offline it never grants: the hub could not use it.
    fn grant_escrow(
        &mut self,
        touched: &HashMap<FridgeId, usize>,
        batch: &mut WriteBatch,
        now: i64,
    ) {
        if self.role != Role::Fridge || !self.shared.online.load(Ordering::Relaxed) {
            return;
        }
        let share = self.orders.escrow_share;
        for fridge in touched.keys() {
            let Some(ledger) = self.ledgers.get_mut(fridge) else {
                continue;
            };
            match ledger.grant_escrow(share, now) {
                Ok(Some(change)) => self.record_local(&fridge.clone(), change, batch),
                Ok(None) => {}
                Err(e) => warn!(fridge = %fridge, error = %e, "granting escrow failed"),
            }
        }
    }

    fn conflicts(&self) -> Vec<ConflictEntry> {
        let mut out = Vec::new();
        for ledger in self.ledgers.values() {
            let recorded = ledger.conflicts();
            let known: std::collections::BTreeSet<String> = recorded
                .iter()
                .map(|c| c.record.conflict_id.clone())
                .collect();
            out.extend(recorded.into_iter().map(|view| ConflictEntry {
                view,
                recorded: true,
            }));
            for record in ledger.detect_conflicts(None) {
                if !known.contains(&record.conflict_id) {
                    out.push(ConflictEntry {
                        view: larder_shared::domain::ConflictView {
                            record,
                            status: "open".into(),
                            resolution: None,
                        },
                        recorded: false,
                    });
                }
            }
        }
        out
    }

    fn counters_to_meta(&self, saved: &Counters, batch: &mut WriteBatch) {
        let c = &self.counters;
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

    /// Checks idempotency, applies the action to its ledger and adds its writes to `batch`.
    /// Returns the outcome and whether the ledger changed. A retry of a request already done
    /// gets its answer even when new writes are held back.
    #[allow(clippy::too_many_arguments)]
    fn local(
        &mut self,
        fridge: &FridgeId,
        action: Action,
        idem: Option<&Idem>,
        in_group: &mut HashMap<String, (String, Outcome)>,
        batch: &mut WriteBatch,
        now: i64,
        refusal: Refusal,
    ) -> Result<(Outcome, bool), CommandError> {
        if let Some(idem) = idem {
            let known = match in_group.get(&idem.key) {
                Some((hash, outcome)) => Some((hash.clone(), Some(outcome.clone()))),
                None => self
                    .store
                    .idempotency(&idem.key)
                    .map_err(|e| CommandError::Storage(e.to_string()))?
                    .map(|(hash, json)| (hash, serde_json::from_str::<Outcome>(&json).ok())),
            };
            if let Some((hash, outcome)) = known {
                if hash != idem.request_sha256 {
                    return Err(CommandError::IdempotencyConflict);
                }
                let outcome = outcome
                    .ok_or_else(|| CommandError::Storage("stored outcome unreadable".into()))?;
                return Ok((outcome, false));
            }
        }
        if let Refusal::Disk { free_bytes } = refusal {
            self.refuse("insufficient_storage");
            return Err(CommandError::InsufficientStorage {
                free_bytes,
                reserve_bytes: self.disk.reserve_bytes(),
            });
        }
        let pending = self
            .counters
            .outbox_head
            .saturating_sub(self.counters.up_acked);
        if pending >= self.limits.outbox_max_changes {
            self.refuse("outbox_full");
            return Err(CommandError::OutboxFull { pending });
        }
        if let Action::Sale { lines, .. } = &action {
            limits::sale_units_belong(&self.ledgers, fridge, lines)?;
        }
        let device = self.device.clone();
        let ledger = self
            .ledgers
            .get_mut(fridge)
            .ok_or_else(|| CommandError::UnknownFridge(fridge.clone()))?;
        let (change, outcome) = match action {
            Action::Refill(refill) => {
                limits::loads(&refill.units, &self.catalog, now).map_err(LedgerError::from)?;
                if refill.order_id.is_some() && self.role != Role::Fridge {
                    return Err(LedgerError::Invalid(
                        "a refill tagged with an order is made at the fridge's own agent, \
                         where the order's units are placed"
                            .into(),
                    )
                    .into());
                }
                let change = ledger.refill(&refill, &device, now)?;
                let units = refill.units.len();
                (
                    Some(change),
                    Outcome::Refilled {
                        fridge_id: fridge.clone(),
                        units,
                    },
                )
            }
            Action::Sale { lines, payment } => {
                let order_id = own_order_id(ledger, &device, self.counters.outbox_head + 1)?;
                let offline_card = payment.method == larder_shared::domain::PaymentMethod::Card
                    && !self.shared.online.load(Ordering::Relaxed);
                if offline_card {
                    let count = self.uncaptured.len() as u64;
                    let total: i64 = self.uncaptured.values().map(|c| c.amount_minor).sum();
                    if count >= self.orders.offline_card_payments_max
                        || total.saturating_add(payment.amount_minor)
                            > self.orders.offline_card_total_minor_max as i64
                    {
                        self.shared
                            .metrics
                            .writes_refused
                            .get_or_create(&vec![("reason", "offline_limit_reached".to_owned())])
                            .inc();
                        return Err(CommandError::OfflineLimitReached {
                            count,
                            total_minor: total,
                        });
                    }
                }
                let sale = Sale {
                    order_id,
                    channel: ledger::channel_for(self.role),
                    lines,
                    payment,
                    payment_pending: offline_card,
                };
                let (change, view) = ledger.sell(&sale, &self.catalog, &device, now)?;
                if offline_card {
                    self.uncaptured.insert(
                        view.record.order_id.clone(),
                        PendingCapture {
                            fridge: fridge.clone(),
                            order: view.record.order_id.clone(),
                            amount_minor: view.record.total_minor,
                            currency: view.record.payment.currency.clone(),
                        },
                    );
                }
                (Some(change), Outcome::Sold(Box::new(view)))
            }
            Action::DoorSession {
                mut session,
                fridge_card,
            } => {
                limits::loads(&session.units_added, &self.catalog, now)
                    .map_err(LedgerError::from)?;
                if fridge_card {
                    session.card_order_id = Some(own_order_id(
                        ledger,
                        &device,
                        self.counters.outbox_head + 1,
                    )?);
                }
                let (change, matches) =
                    ledger.door_session(&session, &self.catalog, &device, now)?;
                let matches = matches
                    .into_iter()
                    .map(|(unit_id, matched)| UnitMatch { unit_id, matched })
                    .collect();
                (
                    Some(change),
                    Outcome::DoorSession {
                        fridge_id: fridge.clone(),
                        session_id: session.session_id,
                        matches,
                    },
                )
            }
            Action::Removal { units, reason } => {
                let change = ledger.remove(&units, reason, now)?;
                (
                    Some(change),
                    Outcome::Removed {
                        fridge_id: fridge.clone(),
                        units: units.len(),
                    },
                )
            }
            Action::Cancel { order } => {
                // The grace window is on the order (the hub set it); the policy's values only
                // stand in for orders that carry none.
                let policy = ledger::OrderPolicy {
                    grace_ms: 0,
                    payment_timeout_ms: 0,
                    pickup_hold_ms: 0,
                };
                let (change, outcome) = ledger.cancel(&order, &device, &policy, now)?;
                let view = ledger
                    .order(&order)
                    .ok_or(CommandError::Ledger(LedgerError::UnknownOrder(order)))?;
                let refused = match outcome {
                    ledger::CancelOutcome::Done(_) => None,
                    ledger::CancelOutcome::Rejected(code, why) => Some((code.to_owned(), why)),
                };
                (
                    change,
                    Outcome::Cancel {
                        order: Box::new(view),
                        refused,
                    },
                )
            }
            Action::Temperature { celsius, at_ms } => {
                let (change, outcome) = self.temperature(fridge, celsius, at_ms, now)?;
                (change, outcome)
            }
        };
        let changed = change.is_some();
        if let Some(change) = change {
            self.record_local(fridge, change, batch);
        }
        if let Some(idem) = idem {
            let json = serde_json::to_string(&outcome).unwrap_or_default();
            batch
                .idempotency
                .push((idem.key.clone(), idem.request_sha256.clone(), json));
            in_group.insert(
                idem.key.clone(),
                (idem.request_sha256.clone(), outcome.clone()),
            );
        }
        if matches!(outcome, Outcome::Sold(_)) {
            self.shared.metrics.sales.inc();
        }
        Ok((outcome, changed))
    }

    /// Takes a temperature reading. Above `max_celsius` an excursion starts (or goes on); once
    /// it has lasted `excursion_minutes`, every unit in the fridge is quarantined. A reading at
    /// or below the limit ends the excursion.
    fn temperature(
        &mut self,
        fridge: &FridgeId,
        celsius: f64,
        at_ms: i64,
        now: i64,
    ) -> Result<(Option<LocalChange>, Outcome), CommandError> {
        let outcome = |since, quarantined| Outcome::Temperature {
            fridge_id: fridge.clone(),
            excursion_since_ms: since,
            quarantined,
        };
        // Only the fridge's own agent hears its sensor; the firmware's clock (the board's, as
        // ours is) only has to agree with ours within the configured skew, and the excursion
        // is timed on the agent's trusted clock.
        if self.role != Role::Fridge {
            return Err(LedgerError::Invalid(
                "temperature readings are taken at the fridge's own agent".into(),
            )
            .into());
        }
        let skew_ms = (self.temperature.reading_skew_seconds_max as i64).saturating_mul(1000);
        let wall = self.clock.wall_ms();
        if at_ms.abs_diff(wall) > skew_ms.unsigned_abs() {
            return Err(LedgerError::Invalid(format!(
                "at is {} s from this agent's clock; a reading may be at most {} s off \
                 (temperature.reading_skew_seconds_max)",
                at_ms.saturating_sub(wall) / 1000,
                self.temperature.reading_skew_seconds_max
            ))
            .into());
        }
        let at_ms = now;
        if celsius <= self.temperature.max_celsius {
            self.excursions.remove(fridge);
            return Ok((None, outcome(None, Vec::new())));
        }
        // An excursion is readings above the limit one after another: a silence longer than
        // two excursion windows (no readings, or the trusted clock jumping ahead when a board
        // without a real-time clock hears its first time beacon) or a clock going back starts
        // it over, rather than counting the gap as time spent warm.
        let window_ms = (self.temperature.excursion_minutes as i64) * 60_000;
        if self
            .excursions
            .get(fridge)
            .is_some_and(|e| at_ms < e.3 || at_ms - e.3 > 2 * window_ms)
        {
            self.excursions.remove(fridge);
        }
        let e = self
            .excursions
            .entry(fridge.clone())
            .or_insert((at_ms, celsius, false, at_ms));
        e.1 = e.1.max(celsius);
        e.3 = at_ms;
        let (since, peak, done, _) = *e;
        let due = at_ms - since >= window_ms;
        if done || !due {
            return Ok((None, outcome(Some(since), Vec::new())));
        }
        let incident = larder_shared::domain::Incident {
            kind: "temperature_excursion".into(),
            fridge_id: fridge.clone(),
            since_ms: since,
            at_ms,
            max_celsius: self.temperature.max_celsius,
            peak_celsius: peak,
            units: Vec::new(),
            units_total: None,
            by: self.device.clone(),
        };
        let ledger = self
            .ledgers
            .get_mut(fridge)
            .ok_or_else(|| CommandError::UnknownFridge(fridge.clone()))?;
        let (change, units) = ledger.quarantine(&incident, now)?;
        if let Some(e) = self.excursions.get_mut(fridge) {
            e.2 = true;
        }
        warn!(fridge = %fridge, since_ms = since, peak_celsius = peak, units = units.len(),
            "temperature excursion: the fridge's units are quarantined");
        Ok((Some(change), outcome(Some(since), units)))
    }

    /// Stages forgetting the outbox up to what the hub acknowledged, if not done yet.
    fn forget_acked(&mut self, batch: &mut WriteBatch) {
        if self.hub_acked > self.counters.up_acked && self.hub_acked <= self.counters.outbox_head {
            self.counters.up_acked = self.hub_acked;
            batch.outbox_forget_up_to = Some(self.hub_acked);
        }
    }

    fn record_local(&mut self, fridge: &FridgeId, change: LocalChange, batch: &mut WriteBatch) {
        let epoch = self.ledgers.get(fridge).map_or(0, Ledger::epoch);
        for bytes in change.changes {
            self.counters.outbox_head += 1;
            let seq = self.counters.outbox_head;
            let prev = self.counters.chain_head;
            let hash = larder_shared::audit::entry_hash(
                &prev,
                &self.device,
                seq,
                fridge,
                epoch,
                &larder_shared::audit::change_digest(&bytes),
            );
            self.counters.chain_head = hash;
            batch.changes.push(ChangeRow {
                fridge: fridge.clone(),
                epoch,
                outbox_seq: Some(seq),
                chain: Some((prev, hash)),
                bytes,
            });
        }
        batch
            .units
            .extend(change.units.into_iter().map(|u| (fridge.clone(), u)));
        batch.orders.extend(change.orders);
    }

    fn project(&self, fridge: &FridgeId, touched: &Touched, batch: &mut WriteBatch) {
        let Some(ledger) = self.ledgers.get(fridge) else {
            return;
        };
        for unit in &touched.units {
            // Expiry is applied when reading, so project with the earliest time.
            if let Some(view) = ledger.unit(unit, i64::MIN) {
                batch.units.push((fridge.clone(), view));
            }
        }
        for order in &touched.orders {
            if let Some(view) = ledger.order(order) {
                batch.orders.push(view);
            }
        }
    }

    /// Takes a downlink batch: its new entries are staged in `remote` and merged once per
    /// group by [`Writer::apply_remote`]. Returns the ack to send once the group committed.
    fn downlink(&mut self, down: Batch, remote: &mut BTreeMap<FridgeId, Vec<Remote>>) -> Ack {
        match self.counters.down.on_batch(down) {
            Receipt::Apply { entries, up_to } => {
                for e in entries {
                    if !self.ledgers.contains_key(&e.ledger) {
                        warn!(fridge = %e.ledger, "downlink change for a ledger not held here; skipped");
                        continue;
                    }
                    let item = match e.kind {
                        EntryKind::Change => Remote::Change {
                            epoch: e.epoch,
                            bytes: e.change,
                        },
                        EntryKind::Withheld => {
                            error!(fridge = %e.ledger, seq = e.seq, "the hub withheld a change too large for a message; skipped");
                            self.shared
                                .metrics
                                .changes_withheld
                                .get_or_create(&vec![("direction", "down".to_owned())])
                                .inc();
                            continue;
                        }
                        EntryKind::Rebase => match Rebase::decode(&e.change) {
                            Ok(rebase) => Remote::Rebase {
                                epoch: e.epoch,
                                rebase,
                            },
                            Err(err) => {
                                self.shared.metrics.downlink_rejected.inc();
                                error!(fridge = %e.ledger, error = %err, "unreadable epoch start from the hub; skipped");
                                continue;
                            }
                        },
                    };
                    remote.entry(e.ledger).or_default().push(item);
                }
                self.counters.down.on_committed(up_to);
                self.shared.metrics.downlink_batches.inc();
                self.counters.down.ack(false)
            }
            Receipt::Duplicate => self.counters.down.ack(false),
            Receipt::Gap => self.counters.down.ack(true),
            Receipt::Malformed => {
                self.shared.metrics.downlink_rejected.inc();
                warn!("malformed downlink batch refused");
                self.counters.down.ack(false)
            }
        }
    }

    /// Merges the group's downlink entries per ledger, in stream order: runs of changes of the
    /// ledger's current epoch with one Automerge apply each (an apply walks the maps it
    /// touches), a new epoch by [`Writer::rebase`]; changes of an older epoch are already in the
    /// newer epoch's base and are skipped. Stages the rows and projections.
    fn apply_remote(
        &mut self,
        remote: BTreeMap<FridgeId, Vec<Remote>>,
        batch: &mut WriteBatch,
        touched_fridges: &mut HashMap<FridgeId, usize>,
    ) -> Result<(), StoreError> {
        for (fridge, items) in remote {
            let mut run: Vec<Vec<u8>> = Vec::new();
            let mut rebased = false;
            for item in items {
                let current = self.ledgers.get(&fridge).map_or(0, Ledger::epoch);
                match item {
                    Remote::Change { epoch, bytes } if epoch == current => run.push(bytes),
                    Remote::Change { epoch, .. } => {
                        if epoch > current {
                            warn!(fridge = %fridge, epoch, current, "change of a later epoch before its start; skipped");
                        }
                    }
                    Remote::Rebase { epoch, rebase } => {
                        if epoch <= current {
                            continue;
                        }
                        self.merge_run(&fridge, std::mem::take(&mut run), batch, touched_fridges);
                        self.rebase(&fridge, epoch, rebase, batch)?;
                        rebased = true;
                    }
                }
            }
            self.merge_run(&fridge, run, batch, touched_fridges);
            if rebased {
                // The projection of a rebased ledger is rebuilt whole.
                batch.units.retain(|(f, _)| f != &fridge);
                batch.orders.retain(|o| o.record.fridge_id != fridge);
                if let Some(ledger) = self.ledgers.get(&fridge) {
                    batch.units.extend(
                        ledger
                            .units(i64::MIN)
                            .into_iter()
                            .map(|u| (fridge.clone(), u)),
                    );
                    batch
                        .orders
                        .extend(ledger.order_ids().iter().filter_map(|o| ledger.order(o)));
                }
                self.changes_since_snapshot.insert(fridge.clone(), 0);
            }
        }
        Ok(())
    }

    fn merge_run(
        &mut self,
        fridge: &FridgeId,
        changes: Vec<Vec<u8>>,
        batch: &mut WriteBatch,
        touched_fridges: &mut HashMap<FridgeId, usize>,
    ) {
        if changes.is_empty() {
            return;
        }
        let Some(ledger) = self.ledgers.get_mut(fridge) else {
            return;
        };
        let epoch = ledger.epoch();
        match ledger.apply_changes(&changes) {
            Ok(touched) => {
                *touched_fridges.entry(fridge.clone()).or_default() += changes.len();
                for bytes in changes {
                    batch.changes.push(ChangeRow {
                        fridge: fridge.clone(),
                        epoch,
                        outbox_seq: None,
                        chain: None,
                        bytes,
                    });
                }
                self.project(fridge, &touched, batch);
            }
            Err(e) => {
                self.shared.metrics.downlink_rejected.inc();
                error!(fridge = %fridge, error = %e, "hub sent changes that do not apply; skipped");
            }
        }
    }

    /// Moves a ledger onto the hub's new epoch: loads its base, carries over this device's
    /// changes the hub did not have when it compacted (as one new local change), archives what
    /// left the live document, and re-links the outbox's audit chain, whose old-epoch entries
    /// for this ledger are replaced by the carried change.
    fn rebase(
        &mut self,
        fridge: &FridgeId,
        epoch: u32,
        rebase: Rebase,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        // The archive grows at rebases only: prune it here past its retention.
        let keep_since =
            self.clock.now_ms() - (self.limits.archive_retention_days as i64) * 86_400_000;
        match self.store.prune_archive(keep_since) {
            Ok(0) => {}
            Ok(n) => info!(records = n, "pruned the archive past its retention"),
            Err(e) => {
                warn!(error = %e, "pruning the archive failed; will retry at the next rebase")
            }
        }
        let included = rebase
            .included
            .iter()
            .find(|(d, _)| d == &self.device)
            .map_or(0, |(_, seq)| *seq);
        let carry = self.store.local_changes_after(fridge, included)?;
        let Some(ledger) = self.ledgers.get(fridge) else {
            return Ok(());
        };
        let rebased = ledger
            .rebase(&rebase.base, &carry, ledger::actor_for(&self.device))
            .map_err(|e| StoreError::Corrupt(format!("rebase of {fridge}: {e}")))?;
        if rebased.ledger.epoch() != epoch {
            return Err(StoreError::Corrupt(format!(
                "rebase of {fridge}: the base is epoch {}, announced as {epoch}",
                rebased.ledger.epoch()
            )));
        }
        // Re-link the audit chain of the outbox after the last acknowledged change.
        let acked = self.store.chain_at_or_before(self.counters.up_acked)?;
        let mut head = acked.map_or(larder_shared::audit::GENESIS, |(_, h)| h);
        if let Some(link) = acked {
            batch
                .meta
                .push((store::META_CHAIN_ACKED, store::chain_link_text(link)));
        }
        for row in self.store.outbox_rows_after(self.counters.up_acked)? {
            // This ledger's changes the hub did not have are replaced by the carried change;
            // those it had stay links of the chain, though their rows go with the old epoch.
            if &row.fridge == fridge && row.seq > included {
                continue;
            }
            let hash = larder_shared::audit::entry_hash(
                &head,
                &self.device,
                row.seq,
                &row.fridge,
                row.epoch,
                &larder_shared::audit::change_digest(&row.bytes),
            );
            batch.rechain.push((row.seq, head, hash));
            head = hash;
        }
        self.counters.chain_head = head;
        batch.meta.push((
            store::META_OUTBOX_FLOOR,
            self.counters.outbox_head.to_string(),
        ));
        info!(
            fridge = %fridge,
            epoch,
            carried = carry.len(),
            archived = rebased.archived.len(),
            skipped = rebased.skipped,
            "ledger moved onto its new epoch"
        );
        batch.rebases.push(RebaseWrite {
            fridge: fridge.clone(),
            epoch,
            base: rebase.base,
            archived: rebased.archived,
        });
        self.ledgers.insert(fridge.clone(), rebased.ledger);
        if !rebased.changes.is_empty() {
            self.record_local(
                fridge,
                LocalChange {
                    changes: rebased.changes,
                    touched: Touched::default(),
                    units: Vec::new(),
                    orders: Vec::new(),
                },
                batch,
            );
        }
        Ok(())
    }
}

/// Sends a command and waits for its answer; maps a full queue to `Overloaded`.
pub(crate) async fn submit(
    tx: &mpsc::Sender<Command>,
    fridge: FridgeId,
    action: Action,
    idem: Option<Idem>,
) -> Result<Outcome, CommandError> {
    let (reply, rx) = oneshot::channel();
    tx.try_send(Command::Local {
        fridge,
        action,
        idem,
        reply,
    })
    .map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => CommandError::Overloaded,
        mpsc::error::TrySendError::Closed(_) => CommandError::ShuttingDown,
    })?;
    rx.await.map_err(|_| CommandError::ShuttingDown)?
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

        let id = |n| own_order_id(&ledger, &pos, n).expect("an id").to_string();
        assert_eq!(id(1), "pos-9-1.1");
        assert_eq!(id(2), "pos-9-2");
    }
}
