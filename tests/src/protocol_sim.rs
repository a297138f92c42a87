//! A seeded, deterministic simulation of the sync protocol: agents and a hub exchanging real
//! signed and sealed envelopes (`larder_shared::envelope`) through the IO-free cores the shells
//! run (`reliable::StreamSender`/`StreamReceiver`/`SeqAllocator`, `build_batch`, Automerge
//! ledgers), over a simulated network and simulated disks instead of MQTT and SQLite.
//!
//! The scheduler is an event queue ordered by simulated time, driven by one seeded generator,
//! so a run is a function of its seed: a failure prints its seed, and `larder-protocol-sim
//! --first SEED --seeds 1` replays it exactly. Faults, all drawn from the seed:
//! - messages dropped, duplicated (1 to 5 extra copies), delayed and reordered, bit-flipped;
//! - partitions of a device lasting ten seconds to a day and a half;
//! - crashes and restarts of agents and of the hub: what was not on the simulated disk is lost
//!   (a hub crash loses its uncommitted group, whose envelopes were never acknowledged);
//! - device clocks skewed by up to a day and stepped backwards by up to a day;
//! - a device revoked mid-run whose envelopes keep arriving (as through a broker that does not
//!   enforce admission); an attacker replaying captured envelopes minutes to a day later,
//!   forging envelopes with its own key in an enrolled device's name, and an enrolled device
//!   signing in another's name or publishing on another's topic.
//!
//! Checked during the run: the hub never acknowledges what it has not committed, so nothing a
//! device was told is safe is lost by a hub crash; no stream entry is applied twice by the hub
//! or a device; no sender signs two envelopes with one sequence number (across crashes); no
//! honest, intact envelope is refused for any reason but a replay (a copy the network made)
//! or its sender's revocation; no link
//! with work pending stalls longer than [`STALL_MAX_MS`]. Checked at the end, after the faults
//! stop and the system drains: every replica of every ledger converges with the hub's; the hub
//! holds every local change of every device (for the revoked one, every change it had
//! acknowledged before the revocation, and none made after it); no forged or post-revocation
//! change is anywhere; every sale is one order at the hub; the hub's ledgers rebuilt from its
//! disk equal the ones in memory.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use larder_shared::admission::{self, Admitted, Progress};
use larder_shared::catalog::{Catalog, CatalogItem};
use larder_shared::domain::{Channel, Payment, PaymentMethod, Refill, RefillUnit, Sale, SaleLine};
use larder_shared::envelope::{
    self, Ack, Batch, Body, BoxKey, Entry, EntryKind, Envelope, Header, Party,
};
use larder_shared::keys::{PublicKey, SecretKey};
use larder_shared::ledger::{self, Ledger};
use larder_shared::reliable::{
    Receipt, SenderLimits, SeqAllocator, StreamReceiver, StreamSender, build_batch,
};
use larder_shared::{DeviceId, FridgeId, OrderId, RegionId, Sku, UnitId};

use crate::sim::Rng;

/// The simulated region as admission judges an envelope by it: every ledger in its first
/// epoch, and a device's downlink committed up to `down_head`.
struct SimRegion {
    down_head: u64,
}

impl admission::Region for SimRegion {
    fn epoch(&self, _ledger: &FridgeId) -> Option<u32> {
        Some(0)
    }

    fn down_head(&self) -> u64 {
        self.down_head
    }
}

mod adversary;
pub use adversary::AdversaryReport;

/// The share of local actions the adversary makes instead (see `adversary`).
const HOSTILE_SHARE: f64 = 0.01;

const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// Monday 2026-01-05 00:00 UTC.
const T0: i64 = 1_767_571_200_000;
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// How often the shells tick their senders (the agent's and the hub's sync loops: 1 s).
const TICK_MS: i64 = SECOND;
/// The longest a connected link with entries to deliver may go without progress. The
/// senders retransmit after 5 s without an acknowledgement; at the worst drop rate drawn
/// here (20% each way) two minutes is 24 retransmissions.
pub const STALL_MAX_MS: i64 = 2 * MINUTE;
/// The longest the drain after the faults may take.
const DRAIN_MAX_MS: i64 = 6 * HOUR;
/// How long a revoked device's envelopes still reach the hub.
const ROGUE_MS: i64 = 10 * MINUTE;
const SKUS: [(&str, i64); 3] = [("lasagna", 890), ("salad", 750), ("soup", 550)];

/// What to simulate.
#[derive(Debug, Clone, Copy)]
pub struct ProtoConfig {
    pub seed: u64,
    pub fridges: usize,
    pub pos: usize,
    /// Simulated hours of faults before the drain.
    pub hours: u32,
}

impl ProtoConfig {
    /// The standard run: two fridges, two POS terminals serving both, two days.
    pub fn standard(seed: u64) -> Self {
        Self {
            seed,
            fridges: 2,
            pos: 2,
            hours: 48,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProtoReport {
    pub seed: u64,
    /// Local changes the devices made (each durable before it was acknowledged).
    pub local_changes: u64,
    pub envelopes_sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    pub partitions: u64,
    pub agent_crashes: u64,
    pub hub_crashes: u64,
    pub clock_steps: u64,
    /// Changes lost with a hub crash's uncommitted group (resent by their devices).
    pub uncommitted_lost: u64,
    pub revoked: u64,
    pub attacks: u64,
    /// Envelopes the hub refused, by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Envelopes devices refused, by reason.
    pub device_refused: BTreeMap<&'static str, u64>,
    pub longest_stall_ms: i64,
    pub drain_ms: i64,
    /// The hostile and careless device's actions (see `adversary`).
    pub adversary: AdversaryReport,
}

#[derive(Debug)]
enum Ev {
    /// A message arrives: on the device's `up` topic (to the hub) or its `down` topic.
    Deliver {
        up: bool,
        dev: usize,
        bytes: Vec<u8>,
        /// Sent by its honest author and not corrupted on the way (the sim's knowledge only).
        honest: bool,
    },
    Act(usize),
    DevTick(usize),
    HubTick,
    HubCommit,
    LinkDown(usize),
    LinkUp(usize),
    DevCrash(usize),
    DevRestart(usize),
    /// A hub crash; a periodic one schedules the next.
    HubCrash {
        periodic: bool,
    },
    HubRestart,
    ClockStep(usize),
    Revoke(usize),
    Attack,
    Drain,
}

/// What a device keeps on disk: everything a 2xx or an acknowledgement promised.
#[derive(Default)]
struct DevDisk {
    /// Every change of each replicated ledger, own and received, in commit order.
    changes: BTreeMap<usize, Vec<Vec<u8>>>,
    /// Its outbox stream (entries are kept after acknowledgement for the final check).
    outbox: Vec<Entry>,
    /// The stream's last seq (streams may skip numbers).
    head: u64,
    /// What the hub acknowledged.
    acked: u64,
    seq_reserved: u64,
    down_hwm: u64,
}

/// What a device holds in memory, lost in a crash.
struct DevMem {
    ledgers: BTreeMap<usize, Ledger>,
    sender: StreamSender,
    receiver: StreamReceiver,
    seqs: SeqAllocator,
    connected: bool,
}

struct Dev {
    id: DeviceId,
    key: SecretKey,
    hub_box: BoxKey,
    is_fridge: bool,
    fridges: Vec<usize>,
    disk: DevDisk,
    mem: Option<DevMem>,
    link_up: bool,
    /// Its wall clock's error: skewed at the start, stepped backwards now and then.
    skew: i64,
    revoked_at: Option<i64>,
    /// The own changes acknowledged by the hub when it was revoked.
    acked_at_revocation: u64,
    /// Sales it made: order id and the change that made it.
    sales: Vec<(OrderId, [u8; 32])>,
    units: u64,
    orders: u64,
    tick_scheduled: bool,
    /// Since when its uplink (and the hub's downlink to it) has had work pending on a live
    /// connection without progress.
    up_waiting_since: Option<i64>,
    down_waiting_since: Option<i64>,
    /// Entries of the hub's downlink this device applied (none twice).
    applied_down: HashSet<u64>,
}

struct LogRow {
    seq: u64,
    ledger: usize,
    author: usize,
    bytes: Vec<u8>,
    committed_at: i64,
}

#[derive(Default)]
struct HubDisk {
    progress: Vec<Progress>,
    revoked: Vec<bool>,
    /// The region's change log; each device's downlink is its rows of the device's ledgers
    /// by other authors, numbered by log seq.
    log: Vec<LogRow>,
    seq_reserved: u64,
}

/// A group of accepted envelopes not yet committed.
#[derive(Default)]
struct Staged {
    progress: BTreeMap<usize, Progress>,
    changes: Vec<(usize, Entry)>,
    acks: BTreeSet<usize>,
    gaps: BTreeSet<usize>,
}

struct HubMem {
    ledgers: Vec<Ledger>,
    senders: Vec<StreamSender>,
    seqs: SeqAllocator,
    staged: Staged,
    commit_scheduled: bool,
}

struct Captured {
    dev: usize,
    bytes: Vec<u8>,
}

struct World {
    cfg: ProtoConfig,
    rng: Rng,
    now: i64,
    queue: BTreeMap<(i64, u64), Ev>,
    next_ev: u64,
    region: RegionId,
    hub_key: SecretKey,
    hub_public: PublicKey,
    /// Each device's box with the hub, on the hub's side.
    hub_boxes: Vec<BoxKey>,
    device_keys: Vec<PublicKey>,
    catalog: Catalog,
    devs: Vec<Dev>,
    hub_disk: HubDisk,
    hub: Option<HubMem>,
    hub_tick_scheduled: bool,
    /// The hub's applied (device, entry seq) pairs: none twice.
    hub_applied: HashSet<(usize, u64)>,
    drop_rate: f64,
    dup_rate: f64,
    corrupt_rate: f64,
    faults: bool,
    captured: Vec<Captured>,
    forged: HashSet<[u8; 32]>,
    forger: SecretKey,
    /// Envelope sequence numbers each sender signed (the hub is `usize::MAX`): never twice.
    signed: HashSet<(usize, u64)>,
    /// A broken invariant found where no error can be returned; reported after the event.
    violation: Option<String>,
    report: ProtoReport,
}

fn fail<T>(seed: u64, what: impl std::fmt::Display) -> Result<T, String> {
    Err(format!("seed {seed}: {what}"))
}

fn fridge_id(i: usize) -> FridgeId {
    FridgeId::new(format!("fridge-{i}")).unwrap_or_else(|_| unreachable!())
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap_or_else(|_| unreachable!())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    larder_shared::audit::change_digest(bytes)
}

/// Runs one seed: faults for `cfg.hours`, then a drain, then the final checks.
pub fn run(cfg: ProtoConfig) -> Result<ProtoReport, String> {
    let mut w = World::new(cfg)?;
    w.start();
    let end = T0 + i64::from(cfg.hours) * HOUR;
    w.schedule_at(end, Ev::Drain);
    let mut drain_from = None;
    while let Some(((t, _), ev)) = w.queue.pop_first() {
        w.now = t;
        let draining = matches!(ev, Ev::Drain);
        w.handle(ev)?;
        if let Some(v) = w.violation.take() {
            return fail(cfg.seed, v);
        }
        w.watch_stalls()?;
        if draining {
            drain_from = Some(t);
        }
        if let Some(from) = drain_from {
            if w.quiescent() {
                w.report.drain_ms = w.now - from;
                break;
            }
            if w.now - from > DRAIN_MAX_MS {
                return fail(
                    cfg.seed,
                    "the system did not drain within 6 h after the faults",
                );
            }
        }
    }
    if drain_from.is_none() || !w.quiescent() {
        return fail(cfg.seed, "the run ended before the system drained");
    }
    w.final_checks()?;
    Ok(w.report)
}

impl World {
    fn new(cfg: ProtoConfig) -> Result<Self, String> {
        let mut rng = Rng(cfg.seed ^ 0x005e_ed0f_5ca1_ab1e);
        let region = RegionId::new("sim").map_err(|e| e.to_string())?;
        let hub_key = SecretKey::from_seed(rng.seed32());
        let hub_public = hub_key.public();
        let mut devs = Vec::new();
        let mut hub_boxes = Vec::new();
        let mut device_keys = Vec::new();
        let names: Vec<(String, bool, Vec<usize>)> = (0..cfg.fridges)
            .map(|f| (format!("fridge-{f}"), true, vec![f]))
            .chain((0..cfg.pos).map(|p| (format!("pos-{p}"), false, (0..cfg.fridges).collect())))
            .collect();
        for (name, is_fridge, fridges) in names {
            let key = SecretKey::from_seed(rng.seed32());
            hub_boxes.push(BoxKey::new(&hub_key, &key.public()));
            device_keys.push(key.public());
            let id = DeviceId::new(name).map_err(|e| e.to_string())?;
            devs.push(Dev {
                hub_box: BoxKey::new(&key, &hub_public),
                id,
                key,
                is_fridge,
                disk: DevDisk {
                    changes: fridges.iter().map(|f| (*f, Vec::new())).collect(),
                    ..DevDisk::default()
                },
                fridges,
                mem: None,
                link_up: true,
                skew: rng.range(-DAY, DAY),
                revoked_at: None,
                acked_at_revocation: 0,
                sales: Vec::new(),
                units: 0,
                orders: 0,
                tick_scheduled: false,
                up_waiting_since: None,
                down_waiting_since: None,
                applied_down: HashSet::new(),
            });
        }
        let n = devs.len();
        let drop_rate = rng.below(21) as f64 / 100.0;
        let dup_rate = rng.below(21) as f64 / 100.0;
        let corrupt_rate = rng.below(3) as f64 / 100.0;
        let forger = SecretKey::from_seed(rng.seed32());
        Ok(Self {
            cfg,
            rng,
            now: T0,
            queue: BTreeMap::new(),
            next_ev: 0,
            region,
            hub_key,
            hub_public,
            hub_boxes,
            device_keys,
            catalog: Catalog {
                version: 1,
                currency: "EUR".into(),
                items: SKUS
                    .iter()
                    .map(|(s, price)| CatalogItem {
                        sku: sku(s),
                        name: s.to_string(),
                        price_minor: *price,
                        allergens: vec![],
                        shelf_life_hours: 24 * 30,
                    })
                    .collect(),
            },
            devs,
            hub_disk: HubDisk {
                progress: vec![Progress::default(); n],
                revoked: vec![false; n],
                ..HubDisk::default()
            },
            hub: None,
            hub_tick_scheduled: false,
            hub_applied: HashSet::new(),
            drop_rate,
            dup_rate,
            corrupt_rate,
            faults: true,
            captured: Vec::new(),
            forged: HashSet::new(),
            forger,
            signed: HashSet::new(),
            violation: None,
            report: ProtoReport {
                seed: cfg.seed,
                ..ProtoReport::default()
            },
        })
    }

    fn schedule_at(&mut self, t: i64, ev: Ev) {
        self.next_ev += 1;
        self.queue.insert((t, self.next_ev), ev);
    }

    fn schedule(&mut self, after: i64, ev: Ev) {
        self.schedule_at(self.now + after.max(0), ev);
    }

    fn start(&mut self) {
        self.hub_restart_now();
        for d in 0..self.devs.len() {
            self.dev_restart_now(d);
            let first = self.rng.exp(10 * MINUTE);
            self.schedule(first, Ev::Act(d));
            let down = self.rng.exp(4 * HOUR);
            self.schedule(down, Ev::LinkDown(d));
            let crash = self.rng.exp(8 * HOUR);
            self.schedule(crash, Ev::DevCrash(d));
            let step = self.rng.exp(12 * HOUR);
            self.schedule(step, Ev::ClockStep(d));
        }
        let crash = self.rng.exp(10 * HOUR);
        self.schedule(crash, Ev::HubCrash { periodic: true });
        let attack = self.rng.exp(20 * MINUTE);
        self.schedule(attack, Ev::Attack);
        // Half the runs revoke the last POS terminal at some point.
        if self.cfg.pos > 0 && self.rng.chance(0.5) {
            let at = self
                .rng
                .range(HOUR, i64::from(self.cfg.hours) * HOUR - HOUR);
            let d = self.devs.len() - 1;
            self.schedule(at, Ev::Revoke(d));
        }
    }

    /// The device's wall clock.
    fn dev_clock(&self, d: usize) -> i64 {
        self.now + self.devs[d].skew
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Deliver {
                up,
                dev,
                bytes,
                honest,
            } => {
                if up {
                    self.hub_receive(dev, &bytes, honest)?;
                } else {
                    self.dev_receive(dev, &bytes, honest)?;
                }
            }
            Ev::Act(d) => {
                if self.faults {
                    self.act(d)?;
                    let next = self.rng.exp(10 * MINUTE);
                    self.schedule(next, Ev::Act(d));
                }
            }
            Ev::DevTick(d) => {
                self.devs[d].tick_scheduled = false;
                let now = self.dev_clock(d);
                if let Some(m) = self.devs[d].mem.as_mut() {
                    m.sender.tick(now);
                }
                self.dev_pump(d);
            }
            Ev::HubTick => {
                self.hub_tick_scheduled = false;
                let now = self.now;
                if let Some(h) = self.hub.as_mut() {
                    for s in &mut h.senders {
                        s.tick(now);
                    }
                }
                self.hub_pump_all();
            }
            Ev::HubCommit => self.hub_commit()?,
            Ev::LinkDown(d) => {
                if self.faults && self.devs[d].link_up {
                    self.report.partitions += 1;
                    self.devs[d].link_up = false;
                    self.disconnect(d);
                    let long = self.rng.below(10);
                    let length = match long {
                        0 => self.rng.range(DAY, DAY + DAY / 2),
                        1..=3 => self.rng.range(HOUR, 12 * HOUR),
                        _ => self.rng.range(10 * SECOND, 10 * MINUTE),
                    };
                    self.schedule(length, Ev::LinkUp(d));
                }
            }
            Ev::LinkUp(d) => {
                self.devs[d].link_up = true;
                self.try_connect(d);
                if self.faults {
                    let next = self.rng.exp(4 * HOUR);
                    self.schedule(next, Ev::LinkDown(d));
                }
            }
            Ev::DevCrash(d) => {
                if self.faults && self.devs[d].mem.is_some() {
                    self.report.agent_crashes += 1;
                    self.disconnect(d);
                    self.devs[d].mem = None;
                    let down = self.rng.range(SECOND, 30 * MINUTE);
                    self.schedule(down, Ev::DevRestart(d));
                }
            }
            Ev::DevRestart(d) => {
                if self.devs[d].mem.is_none() {
                    self.dev_restart_now(d);
                }
                if self.faults {
                    let next = self.rng.exp(8 * HOUR);
                    self.schedule(next, Ev::DevCrash(d));
                }
            }
            Ev::HubCrash { periodic } => {
                if periodic && self.faults {
                    let next = self.rng.exp(10 * HOUR);
                    self.schedule(next, Ev::HubCrash { periodic: true });
                }
                if self.faults && self.hub.is_some() {
                    self.report.hub_crashes += 1;
                    if let Some(h) = &self.hub {
                        self.report.uncommitted_lost += h.staged.changes.len() as u64;
                    }
                    self.hub = None;
                    for d in 0..self.devs.len() {
                        self.disconnect(d);
                    }
                    let down = self.rng.range(SECOND, 10 * MINUTE);
                    self.schedule(down, Ev::HubRestart);
                }
            }
            Ev::HubRestart => {
                if self.hub.is_none() {
                    self.hub_restart_now();
                }
            }
            Ev::ClockStep(d) => {
                if self.faults {
                    self.report.clock_steps += 1;
                    let back = if self.rng.chance(0.3) {
                        self.rng.range(HOUR, DAY)
                    } else {
                        self.rng.range(SECOND, 10 * MINUTE)
                    };
                    self.devs[d].skew -= back;
                    let next = self.rng.exp(12 * HOUR);
                    self.schedule(next, Ev::ClockStep(d));
                }
            }
            Ev::Revoke(d) => self.revoke(d)?,
            Ev::Attack => {
                if self.faults {
                    self.attack()?;
                    let next = self.rng.exp(20 * MINUTE);
                    self.schedule(next, Ev::Attack);
                }
            }
            Ev::Drain => {
                // The faults stop: every device comes back and every link heals.
                self.faults = false;
                self.drop_rate = 0.0;
                self.dup_rate = 0.0;
                self.corrupt_rate = 0.0;
                if self.hub.is_none() {
                    self.hub_restart_now();
                }
                for d in 0..self.devs.len() {
                    if self.devs[d].mem.is_none() {
                        self.dev_restart_now(d);
                    }
                    self.devs[d].link_up = true;
                    self.try_connect(d);
                }
            }
        }
        Ok(())
    }

    // ---- the network ----

    fn send(&mut self, up: bool, dev: usize, bytes: Vec<u8>, honest: bool) {
        self.report.envelopes_sent += 1;
        if up && honest && self.captured.len() < 256 {
            self.captured.push(Captured {
                dev,
                bytes: bytes.clone(),
            });
        } else if up && honest {
            let i = self.rng.below(256) as usize;
            self.captured[i] = Captured {
                dev,
                bytes: bytes.clone(),
            };
        }
        let copies = if self.rng.chance(self.dup_rate) {
            1 + self.rng.range(1, 5)
        } else {
            1
        };
        if copies > 1 {
            self.report.duplicated += 1;
        }
        for _ in 0..copies {
            if self.rng.chance(self.drop_rate) {
                self.report.dropped += 1;
                continue;
            }
            let mut bytes = bytes.clone();
            let mut intact = honest;
            if self.rng.chance(self.corrupt_rate) && !bytes.is_empty() {
                self.report.corrupted += 1;
                let bit = self.rng.below(bytes.len() as u64 * 8) as usize;
                bytes[bit / 8] ^= 1 << (bit % 8);
                intact = false;
            }
            // Mostly prompt; now and then held back long enough to be overtaken.
            let delay = if self.rng.chance(0.1) {
                self.rng.range(SECOND, 5 * SECOND)
            } else {
                self.rng.range(1, 50)
            };
            self.schedule(
                delay,
                Ev::Deliver {
                    up,
                    dev,
                    bytes,
                    honest: intact,
                },
            );
        }
    }

    /// Whether device `d` and the hub can talk (the broker admits it and the link is up).
    fn link_live(&self, d: usize) -> bool {
        self.devs[d].link_up
            && self.devs[d].mem.is_some()
            && self.hub.is_some()
            && !self.hub_disk.revoked[d]
    }

    fn disconnect(&mut self, d: usize) {
        if let Some(m) = self.devs[d].mem.as_mut()
            && m.connected
        {
            m.connected = false;
            m.sender.on_disconnected();
        }
        if let Some(h) = self.hub.as_mut() {
            h.senders[d].on_disconnected();
        }
    }

    fn try_connect(&mut self, d: usize) {
        // A revoked device is refused by the broker, but its envelopes are delivered here
        // anyway (as through a broker that does not check admission) to test the hub's checks.
        let reachable = self.devs[d].link_up && self.devs[d].mem.is_some() && self.hub.is_some();
        if !reachable {
            return;
        }
        let dev_now = self.dev_clock(d);
        if let Some(m) = self.devs[d].mem.as_mut()
            && !m.connected
        {
            m.connected = true;
            m.sender.on_connected(dev_now);
        }
        if !self.hub_disk.revoked[d] {
            let now = self.now;
            if let Some(h) = self.hub.as_mut()
                && !h.senders[d].is_connected()
            {
                h.senders[d].on_connected(now);
            }
        }
        self.dev_pump(d);
        self.hub_pump(d);
    }

    // ---- devices ----

    fn dev_restart_now(&mut self, d: usize) {
        let dev = &self.devs[d];
        let mut ledgers = BTreeMap::new();
        for f in &dev.fridges {
            // A replica that fails to load from its own disk is a bug the final check reports
            // as a missing ledger.
            if let Ok(l) = Ledger::load(
                fridge_id(*f),
                ledger::actor_for(&dev.id),
                None,
                dev.disk.changes.get(f).map_or(&[][..], |c| c.as_slice()),
            ) {
                ledgers.insert(*f, l);
            }
        }
        let limits = SenderLimits {
            batch_entries_max: 8,
            batch_bytes_max: 64 * 1024,
            inflight_entries_max: 32,
            inflight_bytes_max: usize::MAX,
            retransmit_after_ms: 5 * SECOND,
        };
        self.devs[d].mem = Some(DevMem {
            ledgers,
            sender: StreamSender::new(dev.disk.acked, limits),
            receiver: StreamReceiver::new(dev.disk.down_hwm),
            seqs: SeqAllocator::resume(dev.disk.seq_reserved, 16),
            connected: false,
        });
        self.try_connect(d);
    }

    /// A local action: a fridge restocks when it runs low, otherwise someone buys a meal.
    fn act(&mut self, d: usize) -> Result<(), String> {
        let seed = self.cfg.seed;
        let dev_now = self.dev_clock(d);
        let f = {
            let fr = &self.devs[d].fridges;
            fr[self.rng.below(fr.len() as u64) as usize]
        };
        let (s, price) = SKUS[self.rng.below(SKUS.len() as u64) as usize];
        let hostile = if self.rng.chance(HOSTILE_SHARE) {
            match self.hostile_act(d, f, dev_now)? {
                Some(change) => Some(change),
                None => return Ok(()),
            }
        } else {
            None
        };
        let restock = self.devs[d].is_fridge && {
            let Some(m) = self.devs[d].mem.as_ref() else {
                return Ok(());
            };
            m.ledgers
                .get(&f)
                .is_none_or(|l| l.free_units(&sku(s), dev_now).len() < 2)
        };
        let dev = &mut self.devs[d];
        let Some(m) = dev.mem.as_mut() else {
            return Ok(());
        };
        let Some(l) = m.ledgers.get_mut(&f) else {
            return fail(seed, format!("{} lost its ledger {f}", dev.id));
        };
        let change = if let Some(change) = hostile {
            change
        } else if restock {
            let units = (0..4)
                .map(|_| {
                    dev.units += 1;
                    RefillUnit {
                        unit_id: UnitId::new(format!("u-{}-{}", dev.id, dev.units))
                            .unwrap_or_else(|_| unreachable!()),
                        sku: sku(s),
                        expires_at_ms: T0 + 30 * DAY,
                        batch: None,
                    }
                })
                .collect();
            let refill = Refill {
                units,
                order_id: None,
            };
            match l.refill(&refill, &dev.id, dev_now) {
                Ok(c) => c,
                Err(e) => return fail(seed, format!("{} refill refused: {e}", dev.id)),
            }
        } else {
            dev.orders += 1;
            let order_id = OrderId::new(format!("{}-{}", dev.id, dev.orders))
                .unwrap_or_else(|_| unreachable!());
            let sale = Sale {
                order_id: order_id.clone(),
                channel: if dev.is_fridge {
                    Channel::Fridge
                } else {
                    Channel::Pos
                },
                lines: vec![SaleLine {
                    sku: sku(s),
                    unit_id: None,
                    quantity: 1,
                }],
                payment: Payment {
                    method: if dev.is_fridge {
                        PaymentMethod::FridgeCard
                    } else {
                        PaymentMethod::Cash
                    },
                    amount_minor: price,
                    currency: "EUR".into(),
                },
                payment_pending: false,
            };
            match l.sell(&sale, &self.catalog, &dev.id, dev_now) {
                Ok((c, _)) => {
                    dev.sales
                        .push((order_id, digest(c.changes.last().expect("a change"))));
                    c
                }
                // Nothing of that sku here, as this replica sees it: the customer is told no.
                Err(_) => return Ok(()),
            }
        };
        // Durable before acknowledged: the change and its outbox entry are on disk at once.
        // Streams may skip numbers.
        for bytes in change.changes {
            let seq = dev.disk.head + 1 + u64::from(self.rng.chance(0.1));
            let entry = Entry {
                seq,
                ledger: fridge_id(f),
                epoch: 0,
                kind: Default::default(),
                prev: None,
                change: bytes.clone(),
            };
            dev.disk.changes.entry(f).or_default().push(bytes);
            dev.disk.outbox.push(entry);
            dev.disk.head = seq;
            self.report.local_changes += 1;
        }
        self.dev_pump(d);
        Ok(())
    }

    fn dev_seal(&mut self, d: usize, body: Body) -> Option<Vec<u8>> {
        let sent_at_ms = self.dev_clock(d);
        let dev = &mut self.devs[d];
        let m = dev.mem.as_mut()?;
        let (seq, reserve) = m.seqs.allocate();
        if let Some(r) = reserve {
            dev.disk.seq_reserved = r;
        }
        if !self.signed.insert((d, seq)) {
            self.violation = Some(format!("{} signed envelope seq {seq} twice", dev.id));
        }
        let env = Envelope {
            header: Header {
                region: self.region.clone(),
                sender: Party::Device(dev.id.clone()),
                recipient: Party::Hub,
                seq,
                sent_at_ms,
            },
            body,
        };
        env.seal_to(&dev.key, &dev.hub_box)
    }

    /// Sends what the device's sender allows, as the agent's sync loop does.
    fn dev_pump(&mut self, d: usize) {
        // A revoked device's envelopes keep arriving for a while (see `try_connect`); then it
        // is cut off for good.
        if self.devs[d]
            .revoked_at
            .is_some_and(|at| self.now - at > ROGUE_MS)
        {
            if let Some(m) = self.devs[d].mem.as_mut()
                && m.connected
            {
                m.connected = false;
                m.sender.on_disconnected();
            }
            return;
        }
        loop {
            let dev = &self.devs[d];
            let Some(m) = dev.mem.as_ref() else { return };
            if !m.connected {
                return;
            }
            let Some(window) = m.sender.poll_send(dev.disk.head) else {
                break;
            };
            let entries: Vec<Entry> = dev
                .disk
                .outbox
                .iter()
                .filter(|e| e.seq > window.after)
                .take(window.entries_max as usize)
                .cloned()
                .collect();
            let Some(batch) = build_batch(window, entries, dev.disk.head) else {
                break;
            };
            if batch.entries.iter().any(|e| e.kind == EntryKind::Withheld) {
                self.violation = Some(format!(
                    "seed {}: {} withheld a change too large for a message",
                    self.cfg.seed, dev.id
                ));
            }
            let up_to = batch.up_to;
            let Some(bytes) = self.dev_seal(d, Body::Changes(batch)) else {
                break;
            };
            if let Some(m) = self.devs[d].mem.as_mut() {
                m.sender.on_sent(up_to, bytes.len());
            }
            self.send(true, d, bytes, true);
        }
        let in_flight = self.devs[d]
            .mem
            .as_ref()
            .is_some_and(|m| m.connected && m.sender.sent_up_to() > m.sender.acked());
        if in_flight && !self.devs[d].tick_scheduled {
            self.devs[d].tick_scheduled = true;
            self.schedule(TICK_MS, Ev::DevTick(d));
        }
    }

    fn dev_refuse(&mut self, reason: &'static str, honest: bool, d: usize) -> Result<(), String> {
        *self.report.device_refused.entry(reason).or_default() += 1;
        if honest {
            return fail(
                self.cfg.seed,
                format!("{} refused an honest envelope: {reason}", self.devs[d].id),
            );
        }
        Ok(())
    }

    fn dev_receive(&mut self, d: usize, bytes: &[u8], honest: bool) -> Result<(), String> {
        let seed = self.cfg.seed;
        if !self.devs[d].link_up || self.devs[d].mem.is_none() {
            self.report.dropped += 1;
            return Ok(());
        }
        let opened = match envelope::open(bytes, MAX_MESSAGE_BYTES) {
            Ok(o) => o,
            Err(e) => return self.dev_refuse(e.reason(), honest, d),
        };
        let h = opened.header().clone();
        if h.region != self.region
            || h.sender != Party::Hub
            || h.recipient != Party::Device(self.devs[d].id.clone())
        {
            return self.dev_refuse("wrong_party", honest, d);
        }
        let env = match opened
            .verify(bytes, &self.hub_public)
            .and_then(|v| v.open_sealed(&[&self.devs[d].hub_box]))
        {
            Ok(env) => env,
            Err(e) => return self.dev_refuse(e.reason(), honest, d),
        };
        match env.body {
            Body::Ack(ack) => {
                let now = self.dev_clock(d);
                let dev = &mut self.devs[d];
                let Some(m) = dev.mem.as_mut() else {
                    return Ok(());
                };
                if let Some(up_to) = m.sender.on_ack(ack, now) {
                    if up_to > self.hub_disk.progress[d].up_hwm {
                        return fail(
                            seed,
                            format!(
                                "{} told the hub has up to {up_to}, the hub's disk has {}",
                                dev.id, self.hub_disk.progress[d].up_hwm
                            ),
                        );
                    }
                    dev.disk.acked = up_to;
                    if dev.up_waiting_since.is_some() {
                        dev.up_waiting_since = Some(self.now);
                    }
                }
                self.dev_pump(d);
            }
            Body::Changes(batch) => {
                let dev = &mut self.devs[d];
                let Some(m) = dev.mem.as_mut() else {
                    return Ok(());
                };
                let gap = match m.receiver.on_batch(batch) {
                    Receipt::Apply { entries, up_to } => {
                        let mut by_ledger: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
                        for e in entries {
                            if !dev.applied_down.insert(e.seq) {
                                return fail(
                                    seed,
                                    format!("{} applied downlink entry {} twice", dev.id, e.seq),
                                );
                            }
                            let Some(f) = dev
                                .fridges
                                .iter()
                                .copied()
                                .find(|f| fridge_id(*f) == e.ledger)
                            else {
                                return fail(
                                    seed,
                                    format!("{} got a change of a ledger it does not hold", dev.id),
                                );
                            };
                            by_ledger.entry(f).or_default().push(e.change);
                        }
                        for (f, changes) in by_ledger {
                            let Some(l) = m.ledgers.get_mut(&f) else {
                                return fail(seed, format!("{} lost its ledger", dev.id));
                            };
                            if let Err(e) = l.apply_changes(&changes) {
                                return fail(seed, format!("{} merge refused: {e}", dev.id));
                            }
                            // Committed before acknowledged.
                            dev.disk.changes.entry(f).or_default().extend(changes);
                        }
                        dev.disk.down_hwm = up_to;
                        m.receiver.on_committed(up_to);
                        false
                    }
                    Receipt::Duplicate => false,
                    Receipt::Gap => true,
                    Receipt::Malformed => return self.dev_refuse("malformed", honest, d),
                };
                let ack = self.devs[d].mem.as_ref().map(|m| m.receiver.ack(gap));
                if let Some(ack) = ack
                    && let Some(bytes) = self.dev_seal(d, Body::Ack(ack))
                {
                    self.send(true, d, bytes, true);
                }
            }
            _ => return self.dev_refuse("unexpected_kind", honest, d),
        }
        Ok(())
    }

    // ---- the hub ----

    fn hub_restart_now(&mut self) {
        let mut ledgers = Vec::new();
        for f in 0..self.cfg.fridges {
            let changes: Vec<Vec<u8>> = self
                .hub_disk
                .log
                .iter()
                .filter(|r| r.ledger == f)
                .map(|r| r.bytes.clone())
                .collect();
            match Ledger::load(
                fridge_id(f),
                ledger::actor_for(&ledger::hub_device()),
                None,
                &changes,
            ) {
                Ok(l) => ledgers.push(l),
                // Reported by the final check as a ledger that does not converge.
                Err(_) => ledgers.push(
                    Ledger::new(fridge_id(f), ledger::actor_for(&ledger::hub_device()))
                        .unwrap_or_else(|_| unreachable!()),
                ),
            }
        }
        let limits = SenderLimits {
            batch_entries_max: 16,
            batch_bytes_max: 128 * 1024,
            inflight_entries_max: 64,
            // Small enough to bind, as the embedded broker's memory bound needs (hub/mqtt.rs).
            inflight_bytes_max: 16 * 1024,
            retransmit_after_ms: 5 * SECOND,
        };
        let senders = self
            .hub_disk
            .progress
            .iter()
            .map(|p| StreamSender::new(p.down_acked, limits))
            .collect();
        // The hub's disk must hold whatever it acknowledged to any device.
        self.hub = Some(HubMem {
            ledgers,
            senders,
            seqs: SeqAllocator::resume(self.hub_disk.seq_reserved, 16),
            staged: Staged::default(),
            commit_scheduled: false,
        });
        for d in 0..self.devs.len() {
            self.try_connect(d);
        }
    }

    /// The last seq of device `d`'s downlink stream.
    fn down_head(&self, d: usize) -> u64 {
        self.hub_disk
            .log
            .iter()
            .rev()
            .find(|r| r.author != d && self.devs[d].fridges.contains(&r.ledger))
            .map_or(0, |r| r.seq)
    }

    fn hub_seal(&mut self, d: usize, body: Body) -> Option<Vec<u8>> {
        let h = self.hub.as_mut()?;
        let (seq, reserve) = h.seqs.allocate();
        if let Some(r) = reserve {
            self.hub_disk.seq_reserved = r;
        }
        if !self.signed.insert((usize::MAX, seq)) {
            self.violation = Some(format!("the hub signed envelope seq {seq} twice"));
        }
        let env = Envelope {
            header: Header {
                region: self.region.clone(),
                sender: Party::Hub,
                recipient: Party::Device(self.devs[d].id.clone()),
                seq,
                sent_at_ms: self.now,
            },
            body,
        };
        env.seal_to(&self.hub_key, &self.hub_boxes[d])
    }

    fn hub_pump_all(&mut self) {
        for d in 0..self.devs.len() {
            self.hub_pump(d);
        }
    }

    /// Sends device `d` what its downlink sender allows, as the hub's MQTT loop does.
    fn hub_pump(&mut self, d: usize) {
        if !self.link_live(d) {
            return;
        }
        let head = self.down_head(d);
        loop {
            let Some(h) = self.hub.as_ref() else { return };
            let Some(window) = h.senders[d].poll_send(head) else {
                break;
            };
            let entries: Vec<Entry> = self
                .hub_disk
                .log
                .iter()
                .filter(|r| {
                    r.seq > window.after
                        && r.author != d
                        && self.devs[d].fridges.contains(&r.ledger)
                })
                .take(window.entries_max as usize)
                .map(|r| Entry::change(r.seq, fridge_id(r.ledger), 0, r.bytes.clone()))
                .collect();
            let Some(batch) = build_batch(window, entries, head) else {
                break;
            };
            if batch.entries.iter().any(|e| e.kind == EntryKind::Withheld) {
                self.violation = Some(format!(
                    "seed {}: the hub withheld a change too large for a message",
                    self.cfg.seed
                ));
            }
            let up_to = batch.up_to;
            let Some(bytes) = self.hub_seal(d, Body::Changes(batch)) else {
                break;
            };
            if let Some(h) = self.hub.as_mut() {
                h.senders[d].on_sent(up_to, bytes.len());
            }
            self.send(false, d, bytes, true);
        }
        let in_flight = self.hub.as_ref().is_some_and(|h| {
            h.senders
                .iter()
                .any(|s| s.is_connected() && s.sent_up_to() > s.acked())
        });
        if in_flight && !self.hub_tick_scheduled {
            self.hub_tick_scheduled = true;
            self.schedule(TICK_MS, Ev::HubTick);
        }
    }

    fn hub_refuse(&mut self, reason: &'static str, honest: bool, d: usize) -> Result<(), String> {
        *self.report.refused.entry(reason).or_default() += 1;
        // Duplicates and reordered copies of honest envelopes are refused as replays; an honest
        // device that was revoked is refused for that. Nothing else may refuse honest traffic.
        if honest && reason != "replayed" && reason != "revoked_device" {
            return fail(
                self.cfg.seed,
                format!(
                    "the hub refused an honest envelope of {}: {reason}",
                    self.devs[d].id
                ),
            );
        }
        Ok(())
    }

    /// The hub's checks of an envelope on device `d`'s `up` topic: the region writer's own
    /// admission rules (`larder_shared::admission`), run on what the simulated hub holds.
    fn hub_receive(&mut self, d: usize, bytes: &[u8], honest: bool) -> Result<(), String> {
        let Some(hub) = self.hub.as_ref() else {
            self.report.dropped += 1;
            return Ok(());
        };
        let mut p = *hub
            .staged
            .progress
            .get(&d)
            .unwrap_or(&self.hub_disk.progress[d]);
        let fridges: Vec<FridgeId> = self.devs[d].fridges.iter().map(|f| fridge_id(*f)).collect();
        let device = admission::Device {
            id: &self.devs[d].id,
            fridges: &fridges,
            revoked: self.hub_disk.revoked[d],
            key: self.device_keys[d],
        };
        let region = SimRegion {
            down_head: self.down_head(d),
        };
        let admitted = admission::admit(
            bytes,
            MAX_MESSAGE_BYTES,
            &self.region,
            &self.devs[d].id,
            Some(&device),
            &[self.device_keys[d]],
            |_| &self.hub_boxes[d],
            &region,
            &mut p,
        );
        match admitted {
            Ok((_, admitted)) => {
                self.hub_stage(d, admitted, p);
                Ok(())
            }
            Err(r) => self.hub_refuse(r.reason(), honest, d),
        }
    }

    /// Stages what an admitted envelope asks, with the device's positions `p` moved on.
    fn hub_stage(&mut self, d: usize, admitted: Admitted, mut p: Progress) {
        let Some(hub) = self.hub.as_mut() else {
            return;
        };
        match admitted {
            Admitted::Changes { receipt, .. } => {
                match receipt {
                    Receipt::Apply { entries, up_to } => {
                        hub.staged
                            .changes
                            .extend(entries.into_iter().map(|e| (d, e)));
                        p.up_hwm = up_to;
                    }
                    Receipt::Gap => {
                        hub.staged.gaps.insert(d);
                    }
                    // Admission refuses a malformed batch; a duplicate changes nothing.
                    Receipt::Duplicate | Receipt::Malformed => {}
                }
                hub.staged.acks.insert(d);
            }
            Admitted::DownAcked(up_to) => {
                // As the hub's MQTT task hands the region's answer to its sender.
                let ack = larder_shared::envelope::Ack { up_to, gap: false };
                if hub.senders[d].on_ack(ack, self.now).is_some()
                    && self.devs[d].down_waiting_since.is_some()
                {
                    self.devs[d].down_waiting_since = Some(self.now);
                }
            }
            // The simulated devices keep their keys: an honest one never sends a rotation, and
            // no other can sign one.
            Admitted::KeyRotation { .. } => {}
        }
        hub.staged.progress.insert(d, p);
        if !hub.commit_scheduled {
            hub.commit_scheduled = true;
            // Group commit: the writer gathers what arrives within a few milliseconds.
            self.schedule(5, Ev::HubCommit);
            // Now and then the hub dies with the group uncommitted (its envelopes were never
            // acknowledged, so their devices send them again).
            if self.faults && self.rng.chance(0.003) {
                self.schedule(1, Ev::HubCrash { periodic: false });
            }
        }
    }

    /// Commits the staged group, then acknowledges and relays it.
    fn hub_commit(&mut self) -> Result<(), String> {
        let seed = self.cfg.seed;
        let Some(hub) = self.hub.as_mut() else {
            return Ok(());
        };
        hub.commit_scheduled = false;
        let staged = std::mem::take(&mut hub.staged);
        let mut by_ledger: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        for (d, e) in staged.changes {
            if !self.hub_applied.insert((d, e.seq)) {
                return fail(
                    seed,
                    format!(
                        "the hub applied entry {} of {} twice",
                        e.seq, self.devs[d].id
                    ),
                );
            }
            let Some(f) = (0..self.cfg.fridges).find(|f| fridge_id(*f) == e.ledger) else {
                return fail(seed, "a staged change of an unknown ledger");
            };
            let seq = self.hub_disk.log.len() as u64 + 1;
            by_ledger.entry(f).or_default().push(e.change.clone());
            self.hub_disk.log.push(LogRow {
                seq,
                ledger: f,
                author: d,
                bytes: e.change,
                committed_at: self.now,
            });
        }
        for (d, p) in staged.progress {
            self.hub_disk.progress[d] = p;
        }
        for (f, changes) in by_ledger {
            if let Err(e) = hub.ledgers[f].apply_changes(&changes) {
                return fail(seed, format!("hub merge refused: {e}"));
            }
        }
        // Acknowledged only now that the group is committed.
        for d in staged.acks {
            if !self.link_live(d) {
                continue;
            }
            let ack = Ack {
                up_to: self.hub_disk.progress[d].up_hwm,
                gap: staged.gaps.contains(&d),
            };
            if let Some(bytes) = self.hub_seal(d, Body::Ack(ack)) {
                self.send(false, d, bytes, true);
            }
        }
        self.hub_pump_all();
        Ok(())
    }

    fn revoke(&mut self, d: usize) -> Result<(), String> {
        self.report.revoked += 1;
        // The admin's revocation is committed at once; the broker drops the device.
        self.hub_disk.revoked[d] = true;
        if let Some(h) = self.hub.as_mut() {
            h.senders[d].on_disconnected();
            // Anything of it staged but not committed is dropped with it.
            h.staged.changes.retain(|(a, _)| *a != d);
            h.staged.acks.remove(&d);
            h.staged.progress.remove(&d);
        }
        self.devs[d].revoked_at = Some(self.now);
        self.devs[d].acked_at_revocation = self.hub_disk.progress[d].up_hwm;
        Ok(())
    }

    /// One attack: a replay of a captured envelope, a forgery with the attacker's key, an
    /// enrolled device signing as another, or one publishing on another's topic.
    fn attack(&mut self) -> Result<(), String> {
        self.report.attacks += 1;
        let n = self.devs.len();
        match self.rng.below(5) {
            0 if !self.captured.is_empty() => {
                let i = self.rng.below(self.captured.len() as u64) as usize;
                let c = &self.captured[i];
                let (dev, bytes) = (c.dev, c.bytes.clone());
                // A replay is the genuine envelope: the hub may take it if the original never
                // arrived, and must refuse it if it did. Its effect is checked by the ledgers.
                let delay = self.rng.range(MINUTE, DAY);
                self.schedule(
                    delay,
                    Ev::Deliver {
                        up: true,
                        dev,
                        bytes,
                        honest: false,
                    },
                );
            }
            k => {
                let victim = self.rng.below(n as u64) as usize;
                let f = self.devs[victim].fridges[0];
                // A sale in the victim's name: a change authored by its actor.
                let mut l = Ledger::new(fridge_id(f), ledger::actor_for(&self.devs[victim].id))
                    .map_err(|e| e.to_string())?;
                let refill = Refill {
                    units: vec![RefillUnit {
                        unit_id: UnitId::new(format!("forged-{}", self.report.attacks))
                            .unwrap_or_else(|_| unreachable!()),
                        sku: sku("lasagna"),
                        expires_at_ms: T0 + 30 * DAY,
                        batch: None,
                    }],
                    order_id: None,
                };
                let change = l
                    .refill(&refill, &self.devs[victim].id, self.now)
                    .map_err(|e| e.to_string())?;
                let bytes = change.changes.into_iter().next().ok_or("no change")?;
                self.forged.insert(digest(&bytes));
                let up_hwm = self.hub_disk.progress[victim].up_hwm;
                let batch = Batch::new(
                    up_hwm,
                    up_hwm + 1,
                    vec![Entry::change(up_hwm + 1, fridge_id(f), 0, bytes)],
                );
                let other = (victim + 1) % n;
                // (signing key, name in the header, topic)
                let (key, sender, topic) = match k {
                    // The attacker's own key, in the victim's name.
                    1 => (&self.forger, victim, victim),
                    // Another enrolled device's key, in the victim's name, on its topic.
                    2 => (&self.devs[other].key, victim, victim),
                    // Another enrolled device's own envelope on the victim's topic.
                    3 => (&self.devs[other].key, other, victim),
                    // Another enrolled device's own envelope on its own topic, carrying a
                    // change authored by the victim.
                    _ => (&self.devs[other].key, other, other),
                };
                let to = BoxKey::new(key, &self.hub_public);
                let env = Envelope {
                    header: Header {
                        region: self.region.clone(),
                        sender: Party::Device(self.devs[sender].id.clone()),
                        recipient: Party::Hub,
                        seq: u64::MAX - self.rng.below(1000),
                        sent_at_ms: self.now,
                    },
                    body: Body::Changes(batch),
                };
                if let Some(bytes) = env.seal_to(key, &to) {
                    self.send(true, topic, bytes, false);
                }
            }
        }
        Ok(())
    }

    // ---- checks ----

    /// Tracks how long each live link has had work pending without progress.
    fn watch_stalls(&mut self) -> Result<(), String> {
        for d in 0..self.devs.len() {
            let live = self.link_live(d);
            let up_pending = live
                && self.devs[d]
                    .mem
                    .as_ref()
                    .is_some_and(|m| m.connected && self.devs[d].disk.head > m.sender.acked());
            let down_pending = live
                && self
                    .hub
                    .as_ref()
                    .is_some_and(|h| self.down_head(d) > h.senders[d].acked());
            let now = self.now;
            let dev = &mut self.devs[d];
            for (pending, since) in [
                (up_pending, &mut dev.up_waiting_since),
                (down_pending, &mut dev.down_waiting_since),
            ] {
                if !pending {
                    *since = None;
                } else if since.is_none() {
                    *since = Some(now);
                }
            }
            for since in [
                self.devs[d].up_waiting_since,
                self.devs[d].down_waiting_since,
            ]
            .into_iter()
            .flatten()
            {
                let waited = now - since;
                self.report.longest_stall_ms = self.report.longest_stall_ms.max(waited);
                if waited > STALL_MAX_MS {
                    return fail(
                        self.cfg.seed,
                        format!(
                            "{}'s link stalled for {} s with work pending",
                            self.devs[d].id,
                            waited / SECOND
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn quiescent(&self) -> bool {
        let Some(h) = self.hub.as_ref() else {
            return false;
        };
        if !h.staged.changes.is_empty() || !h.staged.progress.is_empty() {
            return false;
        }
        (0..self.devs.len()).all(|d| {
            self.hub_disk.revoked[d]
                || (self.devs[d]
                    .mem
                    .as_ref()
                    .is_some_and(|m| m.sender.acked() == self.devs[d].disk.head)
                    && h.senders[d].acked() >= self.down_head(d))
        })
    }

    fn final_checks(&mut self) -> Result<(), String> {
        let seed = self.cfg.seed;
        let Some(hub) = self.hub.as_ref() else {
            return fail(seed, "no hub at the end");
        };
        let in_log: HashSet<[u8; 32]> =
            self.hub_disk.log.iter().map(|r| digest(&r.bytes)).collect();
        if in_log.len() != self.hub_disk.log.len() {
            return fail(seed, "the hub's log holds a change twice");
        }
        // Durability: the hub's ledgers rebuilt from its disk equal the ones it runs.
        for f in 0..self.cfg.fridges {
            let changes: Vec<Vec<u8>> = self
                .hub_disk
                .log
                .iter()
                .filter(|r| r.ledger == f)
                .map(|r| r.bytes.clone())
                .collect();
            let reloaded = Ledger::load(
                fridge_id(f),
                ledger::actor_for(&ledger::hub_device()),
                None,
                &changes,
            )
            .map_err(|e| format!("seed {seed}: hub ledger {f} does not load: {e}"))?;
            if reloaded.heads_digest() != hub.ledgers[f].heads_digest() {
                return fail(seed, format!("hub ledger {f} differs from its disk"));
            }
            if hub.ledgers[f].waits_for_dependencies() {
                return fail(seed, format!("hub ledger {f} waits for missing changes"));
            }
        }
        let mut expected_orders: Vec<BTreeSet<OrderId>> = vec![BTreeSet::new(); self.cfg.fridges];
        for (d, dev) in self.devs.iter().enumerate() {
            let Some(m) = dev.mem.as_ref() else {
                return fail(seed, format!("{} is down at the end", dev.id));
            };
            // The union of acknowledged local changes.
            for e in &dev.disk.outbox {
                let held = in_log.contains(&digest(&e.change));
                match dev.revoked_at {
                    None if !held => {
                        return fail(
                            seed,
                            format!("{}'s change {} is not at the hub", dev.id, e.seq),
                        );
                    }
                    Some(_) if e.seq <= dev.acked_at_revocation && !held => {
                        return fail(
                            seed,
                            format!(
                                "{}'s change {} acknowledged before revocation is lost",
                                dev.id, e.seq
                            ),
                        );
                    }
                    _ => {}
                }
            }
            if let Some(at) = dev.revoked_at
                && let Some(r) = self
                    .hub_disk
                    .log
                    .iter()
                    .find(|r| r.author == d && r.committed_at >= at)
            {
                return fail(
                    seed,
                    format!(
                        "{}'s change {} was taken after its revocation",
                        dev.id, r.seq
                    ),
                );
            }
            for (order, change) in &dev.sales {
                if in_log.contains(change) {
                    let f = dev
                        .fridges
                        .iter()
                        .copied()
                        .find(|f| hub.ledgers[*f].order(order).is_some())
                        .ok_or_else(|| format!("seed {seed}: order {order} missing at the hub"))?;
                    expected_orders[f].insert(order.clone());
                }
            }
            // Convergence: every replica of a live device equals the hub's.
            if dev.revoked_at.is_none() {
                for f in &dev.fridges {
                    let Some(l) = m.ledgers.get(f) else {
                        return fail(seed, format!("{} has no ledger {f}", dev.id));
                    };
                    if l.heads_digest() != hub.ledgers[*f].heads_digest()
                        || l.state_digest() != hub.ledgers[*f].state_digest()
                    {
                        return fail(
                            seed,
                            format!("{}'s replica of fridge-{f} differs from the hub's", dev.id),
                        );
                    }
                }
            }
            for changes in dev.disk.changes.values() {
                if changes.iter().any(|c| self.forged.contains(&digest(c))) {
                    return fail(seed, format!("{} holds a forged change", dev.id));
                }
            }
        }
        if self
            .hub_disk
            .log
            .iter()
            .any(|r| self.forged.contains(&digest(&r.bytes)))
        {
            return fail(seed, "the hub took a forged change");
        }
        // Nothing doubled in effect: the hub holds each sale once, and no other.
        for (f, expected) in expected_orders.iter().enumerate() {
            let at_hub: BTreeSet<OrderId> = hub.ledgers[f].order_ids().into_iter().collect();
            if &at_hub != expected {
                return fail(
                    seed,
                    format!(
                        "fridge-{f}: the hub holds {} orders, the devices made {} that reached it",
                        at_hub.len(),
                        expected.len()
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_a_function_of_its_seed() {
        let cfg = ProtoConfig {
            hours: 6,
            ..ProtoConfig::standard(3)
        };
        let a = run(cfg).expect("seed 3");
        let b = run(cfg).expect("seed 3 again");
        assert_eq!(a, b);
        assert!(a.local_changes > 0 && a.envelopes_sent > a.local_changes);
    }
}
