//! A seeded simulation of a region for a simulated week: fridges, POS terminals and the hub
//! running the same ledger cores the agent and the hub run (`larder_shared::ledger`, the
//! escrow, the trusted clock, the payment simulator), with the network, the clocks and the
//! customers simulated. The transport is the hub's change log and per-device cursors, the shape
//! of the real downlink streams; sockets, SQLite and MQTT are covered by the end-to-end tests.
//!
//! Every run is a function of its seed. [`run`] returns a report, or the first invariant that
//! did not hold:
//! - every replica of every ledger converges (equal state digests);
//! - no order holds fewer units than it was confirmed for unless a `reservation_lost`
//!   conflict flags it;
//! - no app order for an offline fridge was confirmed beyond its usable escrow (escrow
//!   orders that later lost their units, when the fridge and a POS cut off from each other
//!   both sold into the escrow, are counted in the report and flagged like any other);
//! - every conflict is recorded exactly once: every unit sold in two orders is one
//!   `double_sale` or `oversold` record, every cancel that met a pickup one
//!   `cancel_pickup_race` record, and everything the hub detects is recorded.

mod customers;
mod hub;

use std::collections::{BTreeMap, BTreeSet};

use larder_shared::catalog::{Catalog, CatalogItem};
use larder_shared::domain::{
    AppOrder, AppOrderLine, Channel, ConflictKind, DoorSession, OrderStatus, Payment,
    PaymentMethod, Refill, RefillUnit, Resolution, ResolutionAction, Sale, SaleLine, TakenMatch,
};
use larder_shared::ledger::{self, Ledger, LocalChange, OrderPolicy, PaymentOutcome, Touched};
use larder_shared::payments::{CaptureResult, PaymentProvider, SimulatedProvider, SimulatedRates};
use larder_shared::{DeviceId, FridgeId, OrderId, Sku, UnitId};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
const STEP: i64 = 10 * MINUTE;
/// Monday 2026-01-05 00:00 UTC.
const T0: i64 = 1_767_571_200_000;
/// The sku app orders are for (long-lived, so escrow is about promises, not expiry).
const APP_SKU: &str = "lasagna";
/// Skus, shelf life, price.
const SKUS: [(&str, i64, i64); 5] = [
    ("lasagna", 10 * DAY, 890),
    ("salad", 6 * DAY, 750),
    ("curry", 2 * DAY, 820),
    ("soup", DAY, 550),
    ("wrap", 12 * HOUR, 490),
];
const ESCROW_SHARE: f64 = 0.25;
const OFFLINE_CARD_MAX: usize = 20;

/// The size of the simulated region.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    pub fridges: usize,
    pub pos: usize,
    pub days: u32,
}

impl SimConfig {
    pub fn week(seed: u64) -> Self {
        Self {
            seed,
            fridges: 20,
            pos: 10,
            days: 7,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub walk_up_sales: u64,
    pub walk_up_refused: u64,
    pub app_orders: u64,
    pub app_refused: u64,
    pub escrow_orders: u64,
    /// Escrow orders later flagged `reservation_lost` (see [`run`]).
    pub escrow_orders_lost: u64,
    pub subscription_orders: u64,
    pub pickups: u64,
    pub offline_periods: u64,
    pub conflicts: BTreeMap<String, u64>,
    /// Every ledger's final state digest, in fridge order (equal on every replica).
    pub digests: Vec<String>,
}

/// splitmix64: small, fast and fully determined by its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1).max(1) as u64) as i64
    }
    /// An exponentially distributed wait with the given mean.
    pub(crate) fn exp(&mut self, mean: i64) -> i64 {
        let u = ((self.next() >> 11) as f64 + 1.0) / ((1u64 << 53) as f64 + 1.0);
        ((-u.ln()) * mean as f64).max(1.0) as i64
    }
    pub(crate) fn seed32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }
}

struct Device {
    id: DeviceId,
    is_fridge: bool,
    fridges: Vec<usize>,
    ledgers: BTreeMap<usize, Ledger>,
    /// Every change this device made, in order (its outbox stream).
    own: Vec<(usize, Vec<u8>)>,
    /// Own changes the hub has.
    sent: usize,
    /// Per ledger, how much of the hub's log this device has.
    cursor: BTreeMap<usize, usize>,
    online: bool,
    offline_until: i64,
    /// Its clock's error (up to a day either way).
    skew: i64,
    /// The last time beacon: the hub's time and the true time it arrived.
    beacon: Option<(i64, i64)>,
    uncaptured: Vec<(usize, OrderId)>,
    next_order: u64,
    /// Own changes when the fridge last considered its escrow grant.
    granted_at: usize,
}

impl Device {
    /// The time this device trusts at true time `t`.
    fn now(&self, t: i64) -> i64 {
        larder_shared::time::trusted_now(t + self.skew, self.beacon.map(|(h, at)| (h, t - at)))
            .now_ms
    }

    fn record(&mut self, fridge: usize, change: LocalChange) {
        self.own
            .extend(change.changes.into_iter().map(|c| (fridge, c)));
    }

    fn order_id(&mut self) -> OrderId {
        self.next_order += 1;
        OrderId::new(format!("{}-{}", self.id, self.next_order)).unwrap_or_else(|_| unreachable!())
    }
}

struct Hub {
    ledgers: Vec<Ledger>,
    /// Per ledger, every change the hub has, in arrival order (the downlink streams).
    log: Vec<Vec<Vec<u8>>>,
    /// Per ledger, the fridge's grants as of a log length.
    grants: Vec<Vec<(usize, BTreeMap<Sku, i64>)>>,
}

struct AppRecord {
    fridge: usize,
    order: OrderId,
    escrow: bool,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    catalog: Catalog,
    policy: OrderPolicy,
    provider: SimulatedProvider,
    hub: Hub,
    devices: Vec<Device>,
    unanswered: BTreeSet<OrderId>,
    fail_later: Vec<(i64, usize, OrderId)>,
    apps: Vec<AppRecord>,
    /// Ground truth: every order each unit was sold in.
    sales: BTreeMap<UnitId, BTreeSet<OrderId>>,
    /// Subscribers: fridge, sku, weekdays (bit 0 = Monday).
    subscribers: Vec<(usize, &'static str, u8)>,
    report: SimReport,
    next_id: u64,
}

fn fridge_id(i: usize) -> FridgeId {
    FridgeId::new(format!("fridge-{i}")).unwrap_or_else(|_| unreachable!())
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap_or_else(|_| unreachable!())
}

fn fail<T>(seed: u64, what: String) -> Result<T, String> {
    Err(format!("seed {seed}: {what}"))
}

/// Runs one simulated region for `cfg.days` days.
pub fn run(cfg: SimConfig) -> Result<SimReport, String> {
    run_inner(cfg).map_err(|e| {
        if e.starts_with("seed ") {
            e
        } else {
            format!("seed {}: {e}", cfg.seed)
        }
    })
}

fn run_inner(cfg: SimConfig) -> Result<SimReport, String> {
    let mut sim = Sim::new(cfg)?;
    let end = T0 + i64::from(cfg.days) * DAY;
    let mut t = T0;
    while t < end {
        sim.step(t)?;
        t += STEP;
    }
    sim.settle(end)?;
    sim.check()?;
    Ok(sim.report)
}

impl Sim {
    /// One piece: the simulated region's setup, fridges, devices and catalog together.
    fn new(cfg: SimConfig) -> Result<Self, String> {
        let mut rng = Rng(cfg.seed ^ 0x005e_ed1a_2de2_u64);
        let catalog = Catalog {
            version: 1,
            currency: "EUR".into(),
            items: SKUS
                .iter()
                .map(|(s, life, price)| CatalogItem {
                    sku: sku(s),
                    name: s.to_string(),
                    price_minor: *price,
                    allergens: vec![],
                    shelf_life_hours: (*life / HOUR) as u32,
                })
                .collect(),
        };
        let hub_actor =
            larder_hub::region::hub_actor(&larder_shared::envelope::Generation([0; 16]));
        let mut hub = Hub {
            ledgers: Vec::new(),
            log: Vec::new(),
            grants: Vec::new(),
        };
        for f in 0..cfg.fridges {
            hub.ledgers
                .push(Ledger::new(fridge_id(f), hub_actor.clone()).map_err(|e| e.to_string())?);
            hub.log.push(Vec::new());
            hub.grants.push(vec![(0, BTreeMap::new())]);
        }
        let mut devices = Vec::new();
        let make = |id: String,
                    is_fridge: bool,
                    fridges: Vec<usize>,
                    rng: &mut Rng|
         -> Result<Device, String> {
            let id = DeviceId::new(id).map_err(|e| e.to_string())?;
            let mut ledgers = BTreeMap::new();
            for f in &fridges {
                ledgers.insert(
                    *f,
                    Ledger::new(fridge_id(*f), ledger::actor_for(&id))
                        .map_err(|e| e.to_string())?,
                );
            }
            Ok(Device {
                id,
                is_fridge,
                cursor: fridges.iter().map(|f| (*f, 0)).collect(),
                fridges,
                ledgers,
                own: Vec::new(),
                sent: 0,
                online: true,
                offline_until: 0,
                skew: rng.range(-DAY, DAY),
                beacon: None,
                uncaptured: Vec::new(),
                next_order: 0,
                granted_at: 0,
            })
        };
        for f in 0..cfg.fridges {
            devices.push(make(format!("fridge-{f}"), true, vec![f], &mut rng)?);
        }
        for p in 0..cfg.pos {
            let a = (2 * p) % cfg.fridges.max(1);
            let b = (2 * p + 1) % cfg.fridges.max(1);
            let fridges: Vec<usize> = if a == b { vec![a] } else { vec![a, b] };
            devices.push(make(format!("pos-{p}"), false, fridges, &mut rng)?);
        }
        let subscribers = (0..cfg.fridges.div_ceil(4))
            .map(|_| {
                let f = rng.below(cfg.fridges as u64) as usize;
                let s = SKUS[1 + rng.below(2) as usize].0;
                (f, s, (rng.below(127) + 1) as u8)
            })
            .collect();
        Ok(Self {
            cfg,
            rng,
            catalog,
            policy: OrderPolicy {
                grace_ms: 20_000,
                payment_timeout_ms: 60_000,
                pickup_hold_ms: 24 * HOUR,
            },
            provider: SimulatedProvider::new(
                cfg.seed,
                SimulatedRates {
                    refuse_per_mille: 50,
                    no_answer_per_mille: 20,
                    fail_later_per_mille: 10,
                },
            ),
            hub,
            devices,
            unanswered: BTreeSet::new(),
            fail_later: Vec::new(),
            apps: Vec::new(),
            sales: BTreeMap::new(),
            subscribers,
            report: SimReport {
                seed: cfg.seed,
                ..SimReport::default()
            },
            next_id: 0,
        })
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }

    fn sold(&mut self, order: &OrderId, units: impl IntoIterator<Item = UnitId>) {
        for u in units {
            self.sales.entry(u).or_default().insert(order.clone());
        }
    }

    fn hub_record(&mut self, f: usize, change: LocalChange) {
        self.hub.log[f].extend(change.changes);
    }

    fn step(&mut self, t: i64) -> Result<(), String> {
        self.connectivity(t);
        let minute_of_day = (t - T0).rem_euclid(DAY) / MINUTE;
        let day = (t - T0).div_euclid(DAY);
        if minute_of_day == 5 * 60 {
            self.dispatch(t)?;
        }
        if minute_of_day == 6 * 60 {
            self.refills(t, day)?;
        }
        if minute_of_day == 20 * 60 {
            self.schedule(t, day + 1)?;
        }
        self.walk_ups(t)?;
        self.app_orders(t)?;
        if minute_of_day % 30 == 0 {
            self.pickups(t)?;
        }
        self.resolve(t)?;
        if minute_of_day % 60 == 0 {
            self.hub_tick(t)?;
        }
        let mut order: Vec<usize> = (0..self.devices.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        for d in order {
            self.sync(d, t)?;
        }
        Ok(())
    }

    /// Devices drop off for half an hour to a day now and then, and come back.
    fn connectivity(&mut self, t: i64) {
        for d in 0..self.devices.len() {
            let going = self.rng.chance(1.0 / 300.0);
            let length = self.rng.range(30 * MINUTE, DAY);
            let dev = &mut self.devices[d];
            if dev.online && going {
                dev.online = false;
                dev.offline_until = t + length;
                self.report.offline_periods += 1;
            } else if !dev.online && t >= dev.offline_until {
                dev.online = true;
            }
        }
    }

    /// One piece: the end-of-week checks, one after another.
    fn check(&mut self) -> Result<(), String> {
        let seed = self.cfg.seed;
        for f in 0..self.cfg.fridges {
            let hub = &self.hub.ledgers[f];
            let digest = hub.state_digest();
            for d in self.devices.iter().filter(|d| d.fridges.contains(&f)) {
                if d.ledgers[&f].state_digest() != digest {
                    return fail(seed, format!("{} differs from the hub on fridge-{f}", d.id));
                }
            }
            self.report.digests.push(digest);
            let conflicts = hub.conflicts();
            let recorded: BTreeSet<String> = conflicts
                .iter()
                .map(|c| c.record.conflict_id.clone())
                .collect();
            for c in &conflicts {
                *self
                    .report
                    .conflicts
                    .entry(c.record.kind.as_str().to_owned())
                    .or_default() += 1;
            }
            for c in hub.detect_conflicts(None) {
                if !recorded.contains(&c.conflict_id) {
                    return fail(
                        seed,
                        format!("{} detected but never recorded", c.conflict_id),
                    );
                }
            }
            let lost: BTreeSet<OrderId> = conflicts
                .iter()
                .filter(|c| c.record.kind == ConflictKind::ReservationLost)
                .filter_map(|c| c.record.flagged_order.clone())
                .collect();
            for (o, record, status, _) in hub.holding_orders() {
                if !matches!(
                    status,
                    OrderStatus::Reserved
                        | OrderStatus::PlacedInFridge
                        | OrderStatus::AvailableForPicking
                ) {
                    continue;
                }
                let wanted: u32 = record.lines.iter().map(|l| l.quantity).sum();
                let held = hub.order(&o).map_or(0, |v| v.reserved_units.len()) as u32;
                if held < wanted && !lost.contains(&o) {
                    return fail(
                        seed,
                        format!("{o} holds {held} of {wanted} units and no conflict says so"),
                    );
                }
            }
            // Escrow orders flagged lost: two sellers cut off from each other (the fridge
            // and a POS) can together sell into the escrow; counted, not hidden.
            self.report.escrow_orders_lost += self
                .apps
                .iter()
                .filter(|a| a.fridge == f && a.escrow && lost.contains(&a.order))
                .count() as u64;
            // Cancels that met a pickup: one record each.
            let races = hub
                .order_ids()
                .into_iter()
                .filter(|o| {
                    let h = hub.order(o).map(|v| v.history).unwrap_or_default();
                    h.iter().any(|e| e.status == OrderStatus::PickedUp)
                        && h.iter().any(|e| {
                            matches!(
                                e.status,
                                OrderStatus::Cancelled | OrderStatus::RefundPending
                            )
                        })
                })
                .count();
            let race_records = conflicts
                .iter()
                .filter(|c| c.record.kind == ConflictKind::CancelPickupRace)
                .count();
            if races != race_records {
                return fail(
                    seed,
                    format!("fridge-{f}: {races} cancel/pickup races, {race_records} records"),
                );
            }
        }
        // Every unit sold in more than one order is exactly one record.
        let twice = self.sales.values().filter(|o| o.len() > 1).count() as u64;
        let records = self
            .report
            .conflicts
            .get("double_sale")
            .copied()
            .unwrap_or(0)
            + self.report.conflicts.get("oversold").copied().unwrap_or(0);
        if twice != records {
            return fail(
                seed,
                format!("{twice} units sold twice, {records} double_sale/oversold records"),
            );
        }
        Ok(())
    }
}
