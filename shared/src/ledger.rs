//! The ledger: one Automerge document per fridge holding its units and orders, replicated to
//! the fridge's agent, every POS serving it and the hub.
//!
//! Layout: six flat root maps, created by a deterministic genesis change that every replica
//! builds locally (same actor, time and ops, so the same hash), so no replica ever creates a
//! root object concurrently with another:
//!
//! | map       | key                                   | value (JSON string)        |
//! |-----------|---------------------------------------|----------------------------|
//! | `units`   | unit id                               | [`UnitFacts`]              |
//! | `sold`    | unit id                               | order id                   |
//! | `taken`   | unit id                               | door session id            |
//! | `removed` | unit id                               | [`RemovalReason`]          |
//! | `orders`  | order id                              | [`OrderRecord`]            |
//! | `events`  | `{order}/{at_ms:016}/{device}/{status}` | [`StatusEvent`]          |
//! | `reserved`| unit id                               | order id holding it        |
//! | `escrow`  | `{sku}/granted`, `/returned`, `/consumed` | cumulative count       |
//! | `conflicts` | conflict id                         | [`ConflictRecord`](crate::domain::ConflictRecord) |
//! | `resolutions` | conflict id                       | [`Resolution`](crate::domain::Resolution) |
//! | `incidents` | `temperature/{since_ms}`            | [`Incident`](crate::domain::Incident) |
//!
//! A transition writes its own key instead of overwriting a shared state field, so two devices
//! that sell one unit offline both write `sold[unit]` and Automerge keeps both values: the
//! double sale is visible on every replica. Keys are flat so that a POS can record the sale of a
//! unit whose refill it has not seen yet without creating a conflicting object.
//!
//! Every device writes with the actor id [`actor_for`] its device id, which lets the hub check
//! that a change was authored by the device that sent it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ROOT, ReadDoc};
use sha2::{Digest, Sha256};

use crate::catalog::Catalog;
use crate::domain::{
    Channel, DoorSession, OrderLine, OrderRecord, OrderStatus, OrderView, Payment, Refill,
    RefillUnit, RemovalReason, Sale, StatusEvent, TakenMatch, UnitFacts, UnitState, UnitView,
};
use crate::ids::{DeviceId, FridgeId, OrderId, Sku, UnitId};
use writes::Writes;

/// Units one order line may ask for.
pub const LINE_QUANTITY_MAX: u32 = 100;
/// Lines one order may have.
pub const ORDER_LINES_MAX: usize = 50;
/// Units one refill or door session may carry.
pub const UNITS_PER_REQUEST_MAX: usize = 1000;

const MAP_NAMES: [&str; 11] = [
    "units",
    "sold",
    "taken",
    "removed",
    "orders",
    "events",
    "reserved",
    "escrow",
    "conflicts",
    "resolutions",
    "incidents",
];

/// The Automerge actor a device writes with.
pub fn actor_for(device: &DeviceId) -> ActorId {
    ActorId::from(device.as_str().as_bytes())
}

/// The actor of a ledger's genesis change. Starts with a zero byte, which no device id has.
fn genesis_actor(fridge: &FridgeId) -> ActorId {
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(b"genesis:");
    bytes.extend_from_slice(fridge.as_str().as_bytes());
    ActorId::from(bytes)
}

/// Why a command or change could not be applied to a ledger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("unit {unit} is not available here: it is {state}")]
    UnitNotAvailable { unit: UnitId, state: &'static str },
    #[error("unit {0} is already in this fridge's ledger")]
    UnitExists(UnitId),
    #[error("only {available} unit(s) of {sku} available here, {wanted} asked for")]
    InsufficientStock {
        sku: Sku,
        wanted: u32,
        available: u32,
    },
    #[error("sku {0} is not in the catalog version this device holds")]
    UnknownSku(Sku),
    #[error("payment of {got} {currency} does not match the total of {expected}")]
    AmountMismatch {
        expected: i64,
        got: i64,
        currency: String,
    },
    #[error("order {0} already exists")]
    OrderExists(OrderId),
    #[error("no order {0} in this fridge's ledger")]
    UnknownOrder(OrderId),
    #[error("no conflict {0} here")]
    UnknownConflict(String),
    #[error("{0}")]
    WrongStatus(String),
    #[error("{0}")]
    Invalid(String),
    #[error("change bytes are not a valid Automerge change: {0}")]
    BadChange(String),
    #[error("change is authored by another actor than the sender's")]
    ForeignActor,
    #[error("the change would be {bytes} bytes; a change may be at most {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("document error: {0}")]
    Document(String),
}

impl From<crate::limits::Invalid> for LedgerError {
    fn from(e: crate::limits::Invalid) -> Self {
        match e {
            crate::limits::Invalid::TooLarge { bytes, limit, .. } => {
                Self::TooLarge { bytes, limit }
            }
            other => Self::Invalid(other.to_string()),
        }
    }
}

impl From<automerge::AutomergeError> for LedgerError {
    fn from(e: automerge::AutomergeError) -> Self {
        LedgerError::Document(e.to_string())
    }
}

/// Changes from other replicas that [`Ledger::check_changes`] passed, parsed, with what they
/// touch; applied with [`Ledger::apply_checked`]. Pieces checked one after another on top of
/// each other are joined with [`Checked::extend`].
#[derive(Debug, Default)]
pub struct Checked {
    changes: Vec<Change>,
    hashes: std::collections::HashSet<automerge::ChangeHash>,
    touched: Touched,
    /// What each of `changes` touches, in their order.
    each: Vec<Touched>,
}

impl Checked {
    /// Adds a piece checked on top of this one.
    pub fn extend(&mut self, piece: Checked) {
        self.changes.extend(piece.changes);
        self.hashes.extend(piece.hashes);
        self.touched.extend(piece.touched);
        self.each.extend(piece.each);
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Units and orders a command or merged change touched, for updating projections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub units: BTreeSet<UnitId>,
    pub orders: BTreeSet<OrderId>,
}

impl Touched {
    pub fn extend(&mut self, other: Touched) {
        self.units.extend(other.units);
        self.orders.extend(other.orders);
    }
}

/// What a command made locally: its changes (one, or several when its writes do not fit one
/// change of [`CHANGE_BYTES_MAX`](crate::limits::CHANGE_BYTES_MAX)), in order, go to the store
/// and the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChange {
    pub changes: Vec<Vec<u8>>,
    pub touched: Touched,
    /// The projection rows of what the change touched, as they are after it.
    pub units: Vec<UnitView>,
    pub orders: Vec<OrderView>,
}

#[derive(Debug, Clone)]
struct Maps {
    units: ObjId,
    sold: ObjId,
    taken: ObjId,
    removed: ObjId,
    orders: ObjId,
    events: ObjId,
    reserved: ObjId,
    escrow: ObjId,
    conflicts: ObjId,
    resolutions: ObjId,
    incidents: ObjId,
}

impl Maps {
    /// The map of this name (one of [`MAP_NAMES`]).
    fn get(&self, name: &str) -> &ObjId {
        match name {
            "units" => &self.units,
            "sold" => &self.sold,
            "taken" => &self.taken,
            "removed" => &self.removed,
            "orders" => &self.orders,
            "reserved" => &self.reserved,
            "escrow" => &self.escrow,
            "conflicts" => &self.conflicts,
            "resolutions" => &self.resolutions,
            "incidents" => &self.incidents,
            _ => &self.events,
        }
    }
}

/// One fridge's ledger document with an index of available units per sku.
#[derive(Debug)]
pub struct Ledger {
    fridge: FridgeId,
    doc: Automerge,
    maps: Maps,
    /// Units neither sold, taken nor removed, by sku, ordered by expiry. Expiry is checked on use.
    unsold: HashMap<Sku, BTreeSet<(i64, UnitId)>>,
    /// Every value of the `reserved` map: unit → orders, and order → units.
    reserved_by_unit: HashMap<UnitId, Vec<OrderId>>,
    reserved_by_order: HashMap<OrderId, BTreeSet<UnitId>>,
    /// Orders known to be settled (cancelled, picked up, released...): a status of rank 4 or
    /// more never drops, so they never hold units again. A cache for the reservation checks.
    settled: std::cell::RefCell<std::collections::HashSet<OrderId>>,
    /// Parsed order records and histories, dropped for every order a change touches.
    records: std::cell::RefCell<HashMap<OrderId, std::sync::Arc<OrderRecord>>>,
    histories: std::cell::RefCell<HashMap<OrderId, std::sync::Arc<Vec<StatusEvent>>>>,
    /// The sku and expiry of every unit whose refill is known here.
    unit_keys: HashMap<UnitId, (Sku, i64)>,
    /// Ids the document mentions as a key of any map without indexed facts: units sold, taken,
    /// removed or reserved before their refill arrived, facts that do not parse, and order ids
    /// that happen to be valid unit ids. A unit in neither this set nor `unit_keys` appears
    /// nowhere in the document, so a refill of it needs no lookups. Kept by `reindex_with`,
    /// by `local_change_with` (every local put names its unit in `touched`) and on loading.
    loose: std::cell::RefCell<std::collections::HashSet<UnitId>>,
    /// Actors with a change in the document, read from it on first need (see
    /// [`Ledger::check_actors`]).
    actors: std::cell::RefCell<Option<std::collections::HashSet<ActorId>>>,
    /// Changes merged before a change they depend on (a store restored behind its devices
    /// gets them in any order) wait in Automerge's queue, unapplied: what each touches, to be
    /// projected when it applies (see [`Ledger::apply_checked`]).
    queued: HashMap<automerge::ChangeHash, Touched>,
}

/// The genesis change of a ledger's epoch: the same bytes on every replica. Epoch 0 is the
/// ledger's first document; each compaction starts the next epoch (see [`compaction`]).
fn genesis(fridge: &FridgeId, epoch: u32) -> Result<Automerge, LedgerError> {
    let mut actor = genesis_actor(fridge).to_bytes().to_vec();
    if epoch > 0 {
        actor.extend_from_slice(format!(":{epoch}").as_bytes());
    }
    let mut doc = Automerge::new().with_actor(ActorId::from(actor));
    let mut tx = doc.transaction();
    for name in MAP_NAMES {
        tx.put_object(ROOT, name, ObjType::Map)?;
    }
    if epoch > 0 {
        tx.put(ROOT, "epoch", u64::from(epoch))?;
    }
    tx.commit_with(CommitOptions::default().with_time(0));
    Ok(doc)
}

fn find_maps(doc: &Automerge) -> Result<Maps, LedgerError> {
    let get = |name: &str| -> Result<ObjId, LedgerError> {
        match doc.get(ROOT, name)? {
            Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
            _ => Err(LedgerError::Document(format!("root map {name} missing"))),
        }
    };
    Ok(Maps {
        units: get("units")?,
        sold: get("sold")?,
        taken: get("taken")?,
        removed: get("removed")?,
        orders: get("orders")?,
        events: get("events")?,
        reserved: get("reserved")?,
        escrow: get("escrow")?,
        conflicts: get("conflicts")?,
        resolutions: get("resolutions")?,
        incidents: get("incidents")?,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain data structs to a string cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn event_key(order: &OrderId, event: &StatusEvent) -> String {
    format!(
        "{order}/{:016}/{}/{}",
        event.at_ms.max(0),
        event.by,
        event.status.as_str()
    )
}

impl Ledger {
    /// A fresh ledger: the genesis change only, writing as `actor` from now on.
    pub fn new(fridge: FridgeId, actor: ActorId) -> Result<Self, LedgerError> {
        let doc = genesis(&fridge, 0)?.with_actor(actor);
        Self::from_doc(fridge, doc)
    }

    /// Rebuilds a ledger from an optional saved snapshot plus changes saved after it.
    pub fn load(
        fridge: FridgeId,
        actor: ActorId,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
    ) -> Result<Self, LedgerError> {
        let mut doc = match snapshot {
            Some(bytes) => Automerge::load(bytes)?,
            None => genesis(&fridge, 0)?,
        };
        let mut parsed = Vec::with_capacity(changes.len());
        for bytes in changes {
            parsed.push(
                Change::from_bytes(bytes.clone())
                    .map_err(|e| LedgerError::BadChange(e.to_string()))?,
            );
        }
        let hashes: Vec<automerge::ChangeHash> = parsed.iter().map(Change::hash).collect();
        doc.apply_changes(parsed)?;
        let mut ledger = Self::from_doc(fridge, doc.with_actor(actor))?;
        // Changes still waiting for a dependency: found only when some wait at all.
        if !ledger.doc.get_missing_deps(&[]).is_empty() {
            for (hash, bytes) in hashes.iter().zip(changes) {
                if ledger.doc.get_change_meta_by_hash(hash).is_none()
                    && let Ok(change) = Change::from_bytes(bytes.clone())
                {
                    ledger.queued.insert(*hash, merge::touched_by(&change));
                }
            }
        }
        Ok(ledger)
    }

    fn from_doc(fridge: FridgeId, doc: Automerge) -> Result<Self, LedgerError> {
        let maps = find_maps(&doc)?;
        let mut ledger = Self {
            fridge,
            doc,
            maps,
            unsold: HashMap::new(),
            reserved_by_unit: HashMap::new(),
            reserved_by_order: HashMap::new(),
            settled: Default::default(),
            records: Default::default(),
            histories: Default::default(),
            unit_keys: HashMap::new(),
            loose: Default::default(),
            actors: Default::default(),
            queued: HashMap::new(),
        };
        let ids: Vec<UnitId> = ledger.unit_ids();
        for id in ids {
            ledger.reindex(&id);
        }
        let maps = &ledger.maps;
        let mentioned: Vec<UnitId> = [&maps.sold, &maps.taken, &maps.removed, &maps.reserved]
            .into_iter()
            .flat_map(|map| ledger.doc.keys(map))
            .filter_map(|k| UnitId::new(k).ok())
            .filter(|u| !ledger.unit_keys.contains_key(u))
            .collect();
        ledger.loose.get_mut().extend(mentioned);
        Ok(ledger)
    }

    pub fn fridge(&self) -> &FridgeId {
        &self.fridge
    }

    /// The whole document, compressed.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// Whether some merged changes wait for dependencies this replica has not seen. A snapshot
    /// taken now would leave them out, so callers keep the change log instead.
    pub fn waits_for_dependencies(&self) -> bool {
        !self.doc.get_missing_deps(&[]).is_empty()
    }

    /// A digest of the document's heads: equal on two replicas iff they hold the same changes.
    pub fn heads_digest(&self) -> String {
        let mut heads = self.doc.get_heads();
        heads.sort();
        let mut h = Sha256::new();
        for head in heads {
            h.update(head.0);
        }
        hex::encode(h.finalize())
    }

    /// A digest of the visible state (every key and every conflicting value of every map).
    pub fn state_digest(&self) -> String {
        let mut h = Sha256::new();
        for (name, obj) in self.named_maps() {
            h.update(name.as_bytes());
            for key in self.doc.keys(obj) {
                h.update(key.as_bytes());
                let mut values: Vec<String> = self
                    .doc
                    .get_all(obj, key.as_str())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(v, _)| v.as_str().unwrap_or_default().to_owned())
                    .collect();
                values.sort();
                for v in values {
                    h.update([0]);
                    h.update(v.as_bytes());
                }
                h.update([1]);
            }
        }
        hex::encode(h.finalize())
    }

    fn named_maps(&self) -> impl Iterator<Item = (&'static str, &ObjId)> {
        MAP_NAMES.into_iter().map(|n| (n, self.maps.get(n)))
    }

    fn get_str(&self, obj: &ObjId, key: &str) -> Option<String> {
        match self.doc.get(obj, key) {
            Ok(Some((value, _))) => value.as_str().map(str::to_owned),
            _ => None,
        }
    }

    fn has(&self, obj: &ObjId, key: &str) -> bool {
        matches!(self.doc.get(obj, key), Ok(Some(_)))
    }

    /// The change just committed, with the views of what it touched read back.
    fn last_local_change(
        &self,
        mut touched: Touched,
        changes: Vec<Vec<u8>>,
    ) -> Result<LocalChange, LedgerError> {
        self.widen(&mut touched);
        let units = touched
            .units
            .iter()
            .filter_map(|u| self.unit(u, i64::MIN))
            .collect();
        let orders = touched
            .orders
            .iter()
            .filter_map(|o| self.order(o))
            .collect();
        self.local_change_with(touched, units, orders, changes)
    }

    /// The change just committed, with views the caller already knows.
    fn local_change_with(
        &self,
        touched: Touched,
        units: Vec<UnitView>,
        orders: Vec<OrderView>,
        changes: Vec<Vec<u8>>,
    ) -> Result<LocalChange, LedgerError> {
        self.forget_orders(&touched);
        {
            let mut loose = self.loose.borrow_mut();
            for u in &touched.units {
                if !self.unit_keys.contains_key(u) {
                    loose.insert(u.clone());
                }
            }
        }
        if changes.is_empty() {
            return Err(LedgerError::Document(format!(
                "no change made ({} units, {} orders touched)",
                touched.units.len(),
                touched.orders.len()
            )));
        }
        Ok(LocalChange {
            changes,
            touched,
            units,
            orders,
        })
    }

    /// Whether the ledger holds an order with this id.
    pub fn has_order(&self, order: &OrderId) -> bool {
        self.has(&self.maps.orders, order.as_str())
    }

    /// An order with its status history.
    pub fn order(&self, order: &OrderId) -> Option<OrderView> {
        let record: OrderRecord = self
            .get_str(&self.maps.orders, order.as_str())
            .and_then(|json| serde_json::from_str(&json).ok())?;
        let start = format!("{order}/");
        let end = format!("{order}0");
        let mut history: Vec<StatusEvent> = self
            .doc
            .map_range(&self.maps.events, start..end)
            .filter_map(|item| match item.value {
                automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(s)) => {
                    serde_json::from_str(&s).ok()
                }
                _ => None,
            })
            .collect();
        history.sort_by_key(|e| (e.at_ms, e.status.rank()));
        let status = status_of(&history).unwrap_or(OrderStatus::Completed);
        let reserved_units = if status.holds_units() {
            self.effective_reserved(order, &record)
        } else {
            Vec::new()
        };
        let conflicts = self.conflicts_naming(order);
        Some(OrderView {
            record,
            status,
            history,
            reserved_units,
            conflicts,
        })
    }

    /// Every order id in the ledger.
    pub fn order_ids(&self) -> Vec<OrderId> {
        self.doc
            .keys(&self.maps.orders)
            .filter_map(|k| OrderId::new(k).ok())
            .collect()
    }
}

/// An order's status from its history: the highest-ranked event, the latest among equals.
///
/// A device places units for an order (`placed_in_fridge`, `available_for_picking`, written by
/// a tagged refill) only for a subscription's occurrence (`scheduled` or `dispatched` by the
/// hub) or an app order the hub saw paid (its own `available_for_picking`): such events on any
/// other order count for nothing, on every replica, so a refill tagged with an unpaid order's
/// id cannot make it ready to pick without payment.
fn status_of(history: &[StatusEvent]) -> Option<OrderStatus> {
    let by_hub = |e: &StatusEvent| e.by.as_str() == orders::HUB_DEVICE;
    let placeable = history.iter().any(|e| {
        matches!(e.status, OrderStatus::Scheduled | OrderStatus::Dispatched)
            || (e.status == OrderStatus::AvailableForPicking && by_hub(e))
    });
    history
        .iter()
        .filter(|e| {
            placeable
                || by_hub(e)
                || !matches!(
                    e.status,
                    OrderStatus::PlacedInFridge | OrderStatus::AvailableForPicking
                )
        })
        .filter_map(|e| e.status.rank().map(|r| (r, e.at_ms, e.status)))
        .max_by_key(|(r, at, s)| (*r, *at, s.as_str()))
        .map(|(_, _, s)| s)
}

/// The ledgers whose change logs are due for a snapshot: past `every` changes while the
/// writer is idle, or four times past it regardless.
pub fn snapshots_due(
    changes_since_snapshot: &HashMap<FridgeId, usize>,
    every: usize,
    idle: bool,
) -> Vec<FridgeId> {
    let every = every.max(1);
    changes_since_snapshot
        .iter()
        .filter(|(_, n)| (idle && **n >= every) || **n >= every.saturating_mul(4))
        .map(|(f, _)| f.clone())
        .collect()
}

/// The channel a device's own sales have.
pub fn channel_for(role: crate::domain::Role) -> Channel {
    match role {
        crate::domain::Role::Fridge => Channel::Fridge,
        crate::domain::Role::Pos => Channel::Pos,
    }
}

#[cfg(test)]
mod tests;

mod change_check;
pub mod compaction;
mod door;
mod merge;
mod orders;
mod sales;
mod stock;
mod writes;

pub use orders::{CancelOutcome, HoldingOrder, OrderPolicy, PaymentOutcome, grace_end, hub_device};
