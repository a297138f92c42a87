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
}

impl Checked {
    /// Adds a piece checked on top of this one.
    pub fn extend(&mut self, piece: Checked) {
        self.changes.extend(piece.changes);
        self.hashes.extend(piece.hashes);
        self.touched.extend(piece.touched);
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

/// A unit a sale takes, with its facts if its refill is known here.
type SoldUnit = (UnitId, Option<UnitFacts>);

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
        doc.apply_changes(parsed)?;
        Self::from_doc(fridge, doc.with_actor(actor))
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

    /// Merges changes from another replica (already checked for authorship by the caller).
    /// Changes already present are ignored. Checked first as a whole: on an error nothing is
    /// applied.
    ///
    /// What a change touched is read from its own ops (every op of a ledger is a put into one
    /// of the flat root maps), which costs far less than asking Automerge for patches.
    pub fn apply_changes(&mut self, changes: &[Vec<u8>]) -> Result<Touched, LedgerError> {
        let checked = self.check_changes(changes, &Checked::default())?;
        self.apply_checked(checked)
    }

    /// Checks changes from another replica as [`Self::apply_changes`] would, without applying
    /// them: on top of this document and the changes `before` (checked earlier and not yet
    /// applied, such as the other envelopes of a group), so that one peer's bad change can be
    /// refused on its own rather than failing everything merged with it.
    pub fn check_changes(
        &self,
        changes: &[Vec<u8>],
        before: &Checked,
    ) -> Result<Checked, LedgerError> {
        let mut checked = Checked::default();
        for bytes in changes {
            change_check::check_chunk(bytes)?;
            let change = Change::from_bytes(bytes.clone())
                .map_err(|e| LedgerError::BadChange(e.to_string()))?;
            // A change this replica already holds (the genesis among them) is a no-op.
            if self.doc.get_change_meta_by_hash(&change.hash()).is_some()
                || before.hashes.contains(&change.hash())
                || checked.hashes.contains(&change.hash())
            {
                continue;
            }
            change_check::check_op_actors(&change)?;
            for op in change.decode().operations {
                // Every op of a ledger is a put into one of its root maps. Automerge 0.12
                // panics on an op whose object the document does not have (found by the
                // `body` fuzz target), so anything else is refused before it is applied.
                if !self.is_ledger_object(&op.obj) {
                    return Err(LedgerError::BadChange(format!(
                        "change {} has an op outside the ledger's maps",
                        change.hash()
                    )));
                }
                let automerge::legacy::Key::Map(key) = op.key else {
                    return Err(LedgerError::BadChange(format!(
                        "change {} has a list op; a ledger holds maps only",
                        change.hash()
                    )));
                };
                // Keys of `events` are `{order}/...`; other keys are unit or order ids, and
                // projecting an id that is not one is a cheap no-op.
                match key.split_once('/') {
                    Some((order, _)) => {
                        if let Ok(id) = OrderId::new(order) {
                            checked.touched.orders.insert(id);
                        }
                    }
                    None => {
                        if let Ok(id) = UnitId::new(key.as_str()) {
                            checked.touched.units.insert(id);
                        }
                        if let Ok(id) = OrderId::new(key.as_str()) {
                            checked.touched.orders.insert(id);
                        }
                    }
                }
            }
            checked.hashes.insert(change.hash());
            checked.changes.push(change);
        }
        self.check_actors(&checked.changes, before)?;
        Ok(checked)
    }

    /// Applies changes [`Self::check_changes`] passed, with what they touched.
    pub fn apply_checked(&mut self, checked: Checked) -> Result<Touched, LedgerError> {
        let Checked {
            changes,
            mut touched,
            ..
        } = checked;
        self.doc.apply_changes(changes)?;
        for unit in &touched.units {
            self.reindex(unit);
        }
        self.widen(&mut touched);
        Ok(touched)
    }

    /// Whether an op's object is the document's root or one of the ledger's maps.
    fn is_ledger_object(&self, obj: &automerge::legacy::ObjectId) -> bool {
        // The root holds the maps themselves, written by the genesis change every replica
        // builds for itself: a peer's op there could replace a map.
        let automerge::legacy::ObjectId::Id(op) = obj else {
            return false;
        };
        MAP_NAMES.iter().map(|name| self.maps.get(name)).any(|id| {
            matches!(id, ObjId::Id(counter, actor, _)
                if *counter == op.counter() && actor == op.actor())
        })
    }

    /// Refuses changes that name an actor the document does not know, unless the same batch
    /// brings that actor's first change with its dependencies. Automerge 0.12 panics on such a
    /// change instead of returning an error (found by the `body` fuzz target), and a peer's
    /// bytes must never reach a panic.
    fn check_actors(&self, changes: &[Change], before: &Checked) -> Result<(), LedgerError> {
        // The actors whose first change comes in this batch or in the changes checked before
        // it, ready to apply: only worked out when an actor is not already known, so a batch
        // of known authors costs set lookups.
        let firsts = std::cell::OnceCell::new();
        let firsts = || {
            firsts.get_or_init(|| {
                let hashes: std::collections::HashSet<_> =
                    changes.iter().map(Change::hash).collect();
                let has = |h: &automerge::ChangeHash| {
                    hashes.contains(h)
                        || before.hashes.contains(h)
                        || self.doc.get_change_meta_by_hash(h).is_some()
                };
                changes
                    .iter()
                    .chain(&before.changes)
                    .filter(|c| c.seq() == 1 && c.deps().iter().all(has))
                    .map(Change::actor_id)
                    .collect::<std::collections::HashSet<&ActorId>>()
            })
        };
        let mut known = self.actors.borrow_mut();
        for change in changes {
            for actor in change.actors() {
                if known.as_ref().is_some_and(|k| k.contains(actor)) || firsts().contains(actor) {
                    continue;
                }
                // Not cached: read the document's actors again (it may have grown).
                let now = self.document_actors();
                let found = now.contains(actor);
                *known = Some(now);
                if !found {
                    return Err(LedgerError::BadChange(format!(
                        "change {} names actor {actor}, unknown to this ledger",
                        change.hash()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every actor with a change in the document.
    fn document_actors(&self) -> std::collections::HashSet<ActorId> {
        self.doc
            .get_changes_meta(&[])
            .into_iter()
            .map(|m| m.actor.into_owned())
            .collect()
    }

    /// Checks that every change parses and is authored by `actor`, without applying anything.
    pub fn check_authors(changes: &[Vec<u8>], actor: &ActorId) -> Result<(), LedgerError> {
        for bytes in changes {
            change_check::check_chunk(bytes)?;
            let change = Change::try_from(bytes.as_slice())
                .map_err(|e| LedgerError::BadChange(e.to_string()))?;
            if change.actor_id() != actor {
                return Err(LedgerError::ForeignActor);
            }
        }
        Ok(())
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

    fn reindex(&mut self, unit: &UnitId) {
        let facts = self.unit_facts(unit);
        self.reindex_with(unit, facts.as_ref());
    }

    /// [`Ledger::reindex`] with the unit's facts as the document holds them; answers whether
    /// the unit is gone (sold, taken or removed).
    fn reindex_with(&mut self, unit: &UnitId, facts: Option<&UnitFacts>) -> bool {
        self.reindex_reservation(unit);
        let gone = self.gone(unit);
        match facts {
            Some(f) => self.index_facts(unit, f, gone),
            None => {
                self.loose.get_mut().insert(unit.clone());
            }
        }
        gone
    }

    /// Indexes a unit's facts, and whether it is gone, in `unit_keys` and `unsold`.
    fn index_facts(&mut self, unit: &UnitId, facts: &UnitFacts, gone: bool) {
        self.unit_keys
            .insert(unit.clone(), (facts.sku.clone(), facts.expires_at_ms));
        self.loose.get_mut().remove(unit);
        let set = self.unsold.entry(facts.sku.clone()).or_default();
        let key = (facts.expires_at_ms, unit.clone());
        if gone {
            set.remove(&key);
        } else {
            set.insert(key);
        }
    }

    /// Whether a refill of `unit` is known here (its facts are in the document).
    pub fn knows_unit(&self, unit: &UnitId) -> bool {
        self.unit_keys.contains_key(unit)
    }

    fn unit_facts(&self, unit: &UnitId) -> Option<UnitFacts> {
        self.get_str(&self.maps.units, unit.as_str())
            .and_then(|json| serde_json::from_str(&json).ok())
    }

    fn unit_ids(&self) -> Vec<UnitId> {
        self.doc
            .keys(&self.maps.units)
            .filter_map(|k| UnitId::new(k).ok())
            .collect()
    }

    /// The state of a unit at `now_ms`.
    fn unit_state(&self, unit: &UnitId, facts: Option<&UnitFacts>, now_ms: i64) -> UnitState {
        if self.has(&self.maps.removed, unit.as_str()) {
            UnitState::Removed
        } else if self.has(&self.maps.sold, unit.as_str()) {
            UnitState::Sold
        } else if self.has(&self.maps.taken, unit.as_str()) {
            UnitState::Taken
        } else if facts.is_some_and(|f| f.expires_at_ms <= now_ms) {
            UnitState::Expired
        } else if self.holder(unit).is_some() {
            UnitState::Reserved
        } else {
            UnitState::Available
        }
    }

    /// Whether a unit left the fridge's stock for good (sold, taken or removed).
    fn gone(&self, unit: &UnitId) -> bool {
        self.has(&self.maps.sold, unit.as_str())
            || self.has(&self.maps.taken, unit.as_str())
            || self.has(&self.maps.removed, unit.as_str())
    }

    /// A unit as the stock view shows it, if its refill is known here.
    pub fn unit(&self, unit: &UnitId, now_ms: i64) -> Option<UnitView> {
        let facts = self.unit_facts(unit)?;
        let gone = self.gone(unit);
        Some(self.view_of(unit, facts, gone, now_ms))
    }

    /// The view of a unit with these facts, `gone` as [`Ledger::gone`] answers.
    fn view_of(&self, unit: &UnitId, facts: UnitFacts, gone: bool, now_ms: i64) -> UnitView {
        let state = if gone {
            self.unit_state(unit, Some(&facts), now_ms)
        } else if facts.expires_at_ms <= now_ms {
            UnitState::Expired
        } else if self.holder(unit).is_some() {
            UnitState::Reserved
        } else {
            UnitState::Available
        };
        let sold_in = gone
            .then(|| self.get_str(&self.maps.sold, unit.as_str()))
            .flatten()
            .and_then(|o| OrderId::new(o).ok());
        let reserved_for = (state == UnitState::Reserved)
            .then(|| self.holder(unit))
            .flatten();
        UnitView {
            unit_id: unit.clone(),
            facts,
            state,
            sold_in,
            reserved_for,
        }
    }

    /// Every unit whose refill is known here.
    pub fn units(&self, now_ms: i64) -> Vec<UnitView> {
        self.unit_ids()
            .iter()
            .filter_map(|id| self.unit(id, now_ms))
            .collect()
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

    /// Loads units into the fridge.
    pub fn refill(
        &mut self,
        refill: &Refill,
        by: &DeviceId,
        now_ms: i64,
    ) -> Result<LocalChange, LedgerError> {
        if refill.units.is_empty() {
            return Err(LedgerError::Invalid(
                "a refill loads at least one unit".into(),
            ));
        }
        self.check_new_units(&refill.units)?;
        if let Some(order) = &refill.order_id {
            let status = self
                .status(order)
                .ok_or_else(|| LedgerError::UnknownOrder(order.clone()))?;
            if !matches!(
                status,
                OrderStatus::Scheduled
                    | OrderStatus::Dispatched
                    | OrderStatus::PlacedInFridge
                    | OrderStatus::AvailableForPicking
            ) {
                return Err(LedgerError::WrongStatus(format!(
                    "order {order} is {}: a tagged refill places a subscription's meals or a \
                     paid app order's",
                    status.as_str()
                )));
            }
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        // Units tagged with an order (a subscriber's meals) are placed for it: held by it,
        // and the order is ready to pick.
        if let Some(order) = &refill.order_id {
            for status in [
                OrderStatus::PlacedInFridge,
                OrderStatus::AvailableForPicking,
            ] {
                let event = StatusEvent {
                    status,
                    at_ms: now_ms,
                    by: by.clone(),
                    note: None,
                };
                tx.put(&self.maps.events, event_key(order, &event), to_json(&event));
            }
            for unit in &refill.units {
                tx.put(&self.maps.reserved, unit.unit_id.as_str(), order.as_str());
            }
            touched.orders.insert(order.clone());
        }
        let mut written = Vec::with_capacity(refill.units.len());
        for unit in &refill.units {
            let facts = UnitFacts {
                sku: unit.sku.clone(),
                expires_at_ms: unit.expires_at_ms,
                batch: unit.batch.clone(),
                loaded_at_ms: now_ms,
                loaded_by: by.clone(),
                order_id: refill.order_id.clone(),
            };
            tx.put(&self.maps.units, unit.unit_id.as_str(), to_json(&facts));
            touched.units.insert(unit.unit_id.clone());
            written.push((unit.unit_id.clone(), facts));
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        // The units are new here (checked above), so their facts are the ones just written:
        // the indexes and views are made from them, not read back from the document.
        let mut views = Vec::with_capacity(written.len());
        for (unit, facts) in written {
            let gone = if refill.order_id.is_none() && !self.loose.get_mut().contains(&unit) {
                // Mentioned nowhere in the document before: not gone, not reserved.
                self.index_facts(&unit, &facts, false);
                false
            } else {
                self.reindex_with(&unit, Some(&facts))
            };
            views.push((unit, facts, gone));
        }
        let held = |l: &Self, u: &UnitId| l.reserved_by_unit.contains_key(u);
        if refill.order_id.is_some() || views.iter().any(|(u, _, _)| held(self, u)) {
            // Orders' views change with it: read everything back.
            return self.last_local_change(touched, changes);
        }
        let units = views
            .into_iter()
            .map(|(unit, facts, gone)| self.view_of(&unit, facts, gone, i64::MIN))
            .collect();
        self.local_change_with(touched, units, Vec::new(), changes)
    }

    fn check_new_units(&self, units: &[RefillUnit]) -> Result<(), LedgerError> {
        if units.len() > UNITS_PER_REQUEST_MAX {
            return Err(LedgerError::Invalid(format!(
                "at most {UNITS_PER_REQUEST_MAX} units per request"
            )));
        }
        let mut seen = BTreeSet::new();
        for unit in units {
            crate::limits::unit_fields(unit)?;
            if !seen.insert(&unit.unit_id) {
                return Err(LedgerError::Invalid(format!(
                    "unit {} appears twice",
                    unit.unit_id
                )));
            }
            // The document has a unit's key only if the unit is indexed or loose.
            let id = &unit.unit_id;
            if self.unit_keys.contains_key(id)
                || (self.loose.borrow().contains(id) && self.has(&self.maps.units, id.as_str()))
            {
                return Err(LedgerError::UnitExists(unit.unit_id.clone()));
            }
        }
        Ok(())
    }

    /// Records a walk-up sale priced from `catalog`. Lines with a unit id sell that unit; lines
    /// without sell the available units of the sku that expire first.
    pub fn sell(
        &mut self,
        sale: &Sale,
        catalog: &Catalog,
        by: &DeviceId,
        now_ms: i64,
    ) -> Result<(LocalChange, OrderView), LedgerError> {
        let (lines, sold) = self.plan_sale(sale, catalog, now_ms)?;
        let total_minor = lines
            .iter()
            .try_fold(0i64, |sum, l| {
                l.unit_price_minor
                    .checked_mul(i64::from(l.quantity))
                    .and_then(|line| sum.checked_add(line))
            })
            .ok_or_else(|| LedgerError::Invalid("the sale's total overflows".into()))?;
        check_payment(&sale.payment, catalog, total_minor)?;
        let record = OrderRecord {
            order_id: sale.order_id.clone(),
            fridge_id: self.fridge.clone(),
            channel: sale.channel,
            lines,
            payment: sale.payment.clone(),
            total_minor,
            catalog_version: catalog.version,
            created_at_ms: now_ms,
            created_by: by.clone(),
            customer_id: None,
            escrow: false,
            subscription_id: None,
            grace_until_ms: None,
            payment_pending: sale.payment_pending,
            for_date: None,
        };
        let event = StatusEvent {
            status: OrderStatus::Completed,
            at_ms: now_ms,
            by: by.clone(),
            note: None,
        };
        let mut touched = Touched::default();
        touched.orders.insert(sale.order_id.clone());
        let mut tx = Writes::new();
        tx.put(&self.maps.orders, sale.order_id.as_str(), to_json(&record));
        tx.put(
            &self.maps.events,
            event_key(&sale.order_id, &event),
            to_json(&event),
        );
        for unit in record.lines.iter().flat_map(|l| &l.unit_ids) {
            tx.put(&self.maps.sold, unit.as_str(), sale.order_id.as_str());
            touched.units.insert(unit.clone());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        // The plan checked every unit available, so their new state is known without reading
        // the document again: sold in this order, and out of the unsold index.
        let mut units = Vec::with_capacity(sold.len());
        for (unit_id, facts) in sold {
            let Some(facts) = facts else { continue };
            if let Some(set) = self.unsold.get_mut(&facts.sku) {
                set.remove(&(facts.expires_at_ms, unit_id.clone()));
            }
            units.push(UnitView {
                unit_id,
                facts,
                state: UnitState::Sold,
                sold_in: Some(sale.order_id.clone()),
                reserved_for: None,
            });
        }
        let view = OrderView {
            record,
            status: OrderStatus::Completed,
            history: vec![event],
            reserved_units: Vec::new(),
            conflicts: Vec::new(),
        };
        // Selling a unit an order held changes that order's view: read everything back.
        let held = view
            .record
            .lines
            .iter()
            .flat_map(|l| &l.unit_ids)
            .any(|u| self.reserved_by_unit.contains_key(u));
        let change = if held {
            self.last_local_change(touched, changes)?
        } else {
            self.local_change_with(touched, units, vec![view.clone()], changes)?
        };
        Ok((change, view))
    }

    fn plan_sale(
        &self,
        sale: &Sale,
        catalog: &Catalog,
        now_ms: i64,
    ) -> Result<(Vec<OrderLine>, Vec<SoldUnit>), LedgerError> {
        if sale.lines.is_empty() || sale.lines.len() > ORDER_LINES_MAX {
            return Err(LedgerError::Invalid(format!(
                "a sale has 1 to {ORDER_LINES_MAX} lines"
            )));
        }
        if self.has(&self.maps.orders, sale.order_id.as_str()) {
            return Err(LedgerError::OrderExists(sale.order_id.clone()));
        }
        let mut picked: BTreeSet<UnitId> = BTreeSet::new();
        let mut sold = Vec::new();
        let mut lines = Vec::with_capacity(sale.lines.len());
        for line in &sale.lines {
            if line.quantity == 0 || line.quantity > LINE_QUANTITY_MAX {
                return Err(LedgerError::Invalid(format!(
                    "quantity must be 1 to {LINE_QUANTITY_MAX}"
                )));
            }
            let item = catalog
                .item(&line.sku)
                .ok_or_else(|| LedgerError::UnknownSku(line.sku.clone()))?;
            let unit_ids = match &line.unit_id {
                Some(unit) => {
                    let facts =
                        self.check_sellable(unit, &line.sku, line.quantity, &picked, now_ms)?;
                    sold.push((unit.clone(), facts));
                    vec![unit.clone()]
                }
                None => {
                    let ids = self.pick_units(&line.sku, line.quantity, &picked, now_ms)?;
                    sold.extend(ids.iter().map(|id| (id.clone(), self.unit_facts(id))));
                    ids
                }
            };
            picked.extend(unit_ids.iter().cloned());
            lines.push(OrderLine {
                sku: line.sku.clone(),
                quantity: line.quantity,
                unit_price_minor: item.price_minor,
                unit_ids,
                picked: line.unit_id.is_none(),
            });
        }
        Ok((lines, sold))
    }

    fn check_sellable(
        &self,
        unit: &UnitId,
        sku: &Sku,
        quantity: u32,
        picked: &BTreeSet<UnitId>,
        now_ms: i64,
    ) -> Result<Option<UnitFacts>, LedgerError> {
        if quantity != 1 {
            return Err(LedgerError::Invalid(
                "a line naming a unit_id has quantity 1".into(),
            ));
        }
        if picked.contains(unit) {
            return Err(LedgerError::Invalid(format!(
                "unit {unit} appears twice in the sale"
            )));
        }
        let facts = self.unit_facts(unit);
        if let Some(f) = &facts
            && &f.sku != sku
        {
            return Err(LedgerError::Invalid(format!(
                "unit {unit} is a {}, not a {sku}",
                f.sku
            )));
        }
        // A reserved unit in a walk-up customer's hands is sold: physical reality wins, and the
        // reservation moves to another unit (or is flagged lost). A free unit is sold only if
        // as many free units as the fridge granted the hub in escrow are left.
        match self.unit_state(unit, facts.as_ref(), now_ms) {
            UnitState::Available if facts.is_some() && self.allowance(sku) > 0 => {
                let free = self
                    .free_units(sku, now_ms)
                    .iter()
                    .filter(|u| !picked.contains(*u))
                    .count();
                let allowance = usize::try_from(self.allowance(sku)).unwrap_or(0);
                if free <= allowance {
                    return Err(LedgerError::InsufficientStock {
                        sku: sku.clone(),
                        wanted: 1,
                        available: free.saturating_sub(allowance) as u32,
                    });
                }
                Ok(facts)
            }
            UnitState::Available | UnitState::Reserved => Ok(facts),
            state => Err(LedgerError::UnitNotAvailable {
                unit: unit.clone(),
                state: state.as_str(),
            }),
        }
    }

    fn pick_units(
        &self,
        sku: &Sku,
        quantity: u32,
        picked: &BTreeSet<UnitId>,
        now_ms: i64,
    ) -> Result<Vec<UnitId>, LedgerError> {
        // Units held for orders are not for walk-up customers, nor are as many free units as the
        // fridge granted the hub in escrow.
        let free: Vec<UnitId> = self
            .free_units(sku, now_ms)
            .into_iter()
            .filter(|id| !picked.contains(id))
            .collect();
        let sellable = free
            .len()
            .saturating_sub(usize::try_from(self.allowance(sku)).unwrap_or(0));
        if sellable < quantity as usize {
            return Err(LedgerError::InsufficientStock {
                sku: sku.clone(),
                wanted: quantity,
                available: sellable as u32,
            });
        }
        Ok(free.into_iter().take(quantity as usize).collect())
    }

    /// Records a door session. Each unit taken is matched, in this order: to the sale that paid
    /// for it; to the reservation of the order the door was opened for (any unit of a sku it
    /// still lacks counts, so a moved reservation is honoured at the fridge); to the session's
    /// fridge card, in a new order priced from `catalog`; else it is recorded as taken unpaid.
    /// Reservations of other orders whose units were taken move to free units of their sku, or
    /// become `reservation_lost` conflicts. Units added are loaded like a refill.
    pub fn door_session(
        &mut self,
        session: &DoorSession,
        catalog: &Catalog,
        by: &DeviceId,
        now_ms: i64,
    ) -> Result<(LocalChange, Vec<(UnitId, TakenMatch)>), LedgerError> {
        if session.units_taken.len() > UNITS_PER_REQUEST_MAX {
            return Err(LedgerError::Invalid(format!(
                "at most {UNITS_PER_REQUEST_MAX} units per request"
            )));
        }
        if session.units_taken.is_empty() && session.units_added.is_empty() {
            return Err(LedgerError::Invalid(
                "a door session takes or adds at least one unit".into(),
            ));
        }
        self.check_new_units(&session.units_added)?;
        if let Some(card) = &session.card_order_id
            && self.has(&self.maps.orders, card.as_str())
        {
            return Err(LedgerError::OrderExists(card.clone()));
        }
        // What the order the door was opened for still lacks, per sku.
        let mut lacking: BTreeMap<Sku, u32> = BTreeMap::new();
        let mut held_for_session: BTreeSet<UnitId> = BTreeSet::new();
        // An order this replica has not heard of yet (the hub confirmed it while the fridge
        // was offline): the customer's units are all matched to it, and the hub settles the
        // rest once the pickup arrives.
        let mut unknown_order = false;
        if let Some(o) = &session.order_id {
            match self
                .get_str(&self.maps.orders, o.as_str())
                .and_then(|json| serde_json::from_str::<OrderRecord>(&json).ok())
            {
                Some(record) => {
                    for line in &record.lines {
                        *lacking.entry(line.sku.clone()).or_default() += line.quantity;
                    }
                    held_for_session.extend(self.effective_reserved(o, &record));
                }
                None => unknown_order = true,
            }
        }
        let mut matches = Vec::with_capacity(session.units_taken.len());
        let mut picked_up: BTreeSet<OrderId> = BTreeSet::new();
        let mut moved_here: Vec<(UnitId, OrderId)> = Vec::new();
        let mut card_units: Vec<(UnitId, Sku)> = Vec::new();
        let mut touched = Touched::default();
        let mut seen = BTreeSet::new();
        for unit in &session.units_taken {
            if !seen.insert(unit) {
                return Err(LedgerError::Invalid(format!("unit {unit} appears twice")));
            }
            if self.has(&self.maps.taken, unit.as_str()) {
                return Err(LedgerError::UnitNotAvailable {
                    unit: unit.clone(),
                    state: UnitState::Taken.as_str(),
                });
            }
            let sku = self.unit_facts(unit).map(|f| f.sku);
            let sold = self
                .get_str(&self.maps.sold, unit.as_str())
                .and_then(|o| OrderId::new(o).ok());
            let for_session = session.order_id.as_ref().filter(|_| {
                unknown_order
                    || held_for_session.contains(unit)
                    || sku
                        .as_ref()
                        .and_then(|s| lacking.get(s))
                        .is_some_and(|n| *n > 0)
            });
            let m = if let Some(order_id) = sold {
                picked_up.insert(order_id.clone());
                TakenMatch::Sale { order_id }
            } else if let (Some(order_id), Some(sku)) = (for_session, &sku) {
                if let Some(n) = lacking.get_mut(sku) {
                    *n = n.saturating_sub(1);
                }
                if !held_for_session.contains(unit) {
                    moved_here.push((unit.clone(), order_id.clone()));
                }
                picked_up.insert(order_id.clone());
                TakenMatch::Reservation {
                    order_id: order_id.clone(),
                }
            } else if let (Some(order_id), Some(sku)) = (&session.card_order_id, &sku) {
                card_units.push((unit.clone(), sku.clone()));
                TakenMatch::FridgeCard {
                    order_id: order_id.clone(),
                }
            } else {
                TakenMatch::Unpaid
            };
            matches.push((unit.clone(), m));
        }
        // Units taken by anyone but their order's customer leave that order short: move it.
        let taken_from_others: BTreeSet<UnitId> = matches
            .iter()
            .filter(|(_, m)| !matches!(m, TakenMatch::Reservation { .. }))
            .map(|(u, _)| u.clone())
            .collect();
        let (moves, _, lost) = if taken_from_others
            .iter()
            .any(|u| self.reserved_by_unit.contains_key(u))
        {
            self.plan_repairs(&taken_from_others, now_ms)
        } else {
            Default::default()
        };
        let lost: Vec<_> = lost
            .into_iter()
            .filter(|c| !self.has(&self.maps.conflicts, &c.conflict_id))
            .collect();
        let card_order = match (&session.card_order_id, card_units.is_empty()) {
            (Some(id), false) => Some(self.card_order(id, &card_units, catalog, by, now_ms)?),
            _ => None,
        };
        let mut tx = Writes::new();
        for (unit, _) in &matches {
            tx.put(&self.maps.taken, unit.as_str(), session.session_id.as_str());
            touched.units.insert(unit.clone());
        }
        for (unit, order) in moved_here.iter().chain(&moves) {
            tx.put(&self.maps.reserved, unit.as_str(), order.as_str());
            touched.units.insert(unit.clone());
            touched.orders.insert(order.clone());
        }
        for c in &lost {
            tx.put(&self.maps.conflicts, c.conflict_id.as_str(), to_json(c));
            touched.orders.extend(c.orders.iter().cloned());
        }
        if let Some(record) = &card_order {
            tx.put(&self.maps.orders, record.order_id.as_str(), to_json(record));
            for (unit, _) in &card_units {
                tx.put(&self.maps.sold, unit.as_str(), record.order_id.as_str());
            }
            let event = StatusEvent {
                status: OrderStatus::Completed,
                at_ms: now_ms,
                by: by.clone(),
                note: Some(format!("fridge card, door session {}", session.session_id)),
            };
            tx.put(
                &self.maps.events,
                event_key(&record.order_id, &event),
                to_json(&event),
            );
            picked_up.insert(record.order_id.clone());
        }
        for order in &picked_up {
            let event = StatusEvent {
                status: OrderStatus::PickedUp,
                at_ms: now_ms,
                by: by.clone(),
                note: Some(format!("door session {}", session.session_id)),
            };
            tx.put(&self.maps.events, event_key(order, &event), to_json(&event));
            touched.orders.insert(order.clone());
        }
        for unit in &session.units_added {
            let facts = UnitFacts {
                sku: unit.sku.clone(),
                expires_at_ms: unit.expires_at_ms,
                batch: unit.batch.clone(),
                loaded_at_ms: now_ms,
                loaded_by: by.clone(),
                order_id: None,
            };
            tx.put(&self.maps.units, unit.unit_id.as_str(), to_json(&facts));
            touched.units.insert(unit.unit_id.clone());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for unit in &touched.units {
            self.reindex(unit);
        }
        Ok((self.last_local_change(touched, changes)?, matches))
    }

    /// The order a fridge card pays for the units taken in a session, priced from `catalog`.
    fn card_order(
        &self,
        id: &OrderId,
        units: &[(UnitId, Sku)],
        catalog: &Catalog,
        by: &DeviceId,
        now_ms: i64,
    ) -> Result<OrderRecord, LedgerError> {
        let mut lines: BTreeMap<Sku, Vec<UnitId>> = BTreeMap::new();
        for (u, sku) in units {
            lines.entry(sku.clone()).or_default().push(u.clone());
        }
        let mut order_lines = Vec::new();
        let mut total = 0i64;
        for (sku, unit_ids) in lines {
            let price = catalog
                .item(&sku)
                .ok_or_else(|| LedgerError::UnknownSku(sku.clone()))?
                .price_minor;
            total = total.saturating_add(price.saturating_mul(unit_ids.len() as i64));
            order_lines.push(OrderLine {
                sku,
                quantity: unit_ids.len() as u32,
                unit_price_minor: price,
                unit_ids,
                picked: false,
            });
        }
        Ok(OrderRecord {
            order_id: id.clone(),
            fridge_id: self.fridge.clone(),
            channel: Channel::Fridge,
            lines: order_lines,
            payment: Payment {
                method: crate::domain::PaymentMethod::FridgeCard,
                amount_minor: total,
                currency: catalog.currency.clone(),
            },
            total_minor: total,
            catalog_version: catalog.version,
            created_at_ms: now_ms,
            created_by: by.clone(),
            customer_id: None,
            escrow: false,
            subscription_id: None,
            grace_until_ms: None,
            payment_pending: false,
            for_date: None,
        })
    }

    /// Quarantines every unit still in the fridge after a temperature excursion: each is
    /// removed with reason `temperature` (its own key, so concurrent records merge), and the
    /// incident is recorded under the excursion's start (also when no unit was left).
    pub fn quarantine(
        &mut self,
        incident: &crate::domain::Incident,
        now_ms: i64,
    ) -> Result<(LocalChange, Vec<UnitId>), LedgerError> {
        let units: Vec<UnitId> = self
            .unsold
            .values()
            .flatten()
            .map(|(_, u)| u.clone())
            .collect();
        let mut incident = incident.clone();
        incident.units = units
            .iter()
            .take(crate::domain::Incident::UNITS_LISTED_MAX)
            .cloned()
            .collect();
        incident.units_total = Some(units.len() as u64);
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for unit in &units {
            tx.put(
                &self.maps.removed,
                unit.as_str(),
                to_json(&RemovalReason::Temperature),
            );
            touched.units.insert(unit.clone());
        }
        tx.put(
            &self.maps.incidents,
            format!("temperature/{:016}", incident.since_ms.max(0)),
            to_json(&incident),
        );
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for unit in &touched.units {
            self.reindex(unit);
        }
        Ok((self.last_local_change(touched, changes)?, units))
    }

    /// Every recorded incident (temperature excursions), oldest first.
    pub fn incidents(&self) -> Vec<crate::domain::Incident> {
        self.doc
            .keys(&self.maps.incidents)
            .filter_map(|k| self.get_str(&self.maps.incidents, &k))
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect()
    }

    /// Records units leaving the fridge unsold.
    pub fn remove(
        &mut self,
        units: &[UnitId],
        reason: RemovalReason,
        now_ms: i64,
    ) -> Result<LocalChange, LedgerError> {
        if units.is_empty() || units.len() > UNITS_PER_REQUEST_MAX {
            return Err(LedgerError::Invalid(format!(
                "1 to {UNITS_PER_REQUEST_MAX} units per request"
            )));
        }
        // Only a unit loaded here and still in the fridge can leave it: removing a sold unit
        // would rewrite its history, and removing one not loaded yet would leave its refill
        // removed on arrival.
        for unit in units {
            let state = match self.unit(unit, now_ms) {
                None => Some("not loaded in this fridge"),
                Some(v) => match v.state {
                    UnitState::Sold => Some("sold"),
                    UnitState::Taken => Some("taken"),
                    UnitState::Removed => Some("removed"),
                    _ => None,
                },
            };
            if let Some(state) = state {
                return Err(LedgerError::UnitNotAvailable {
                    unit: unit.clone(),
                    state,
                });
            }
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for unit in units {
            tx.put(&self.maps.removed, unit.as_str(), to_json(&reason));
            touched.units.insert(unit.clone());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for unit in &touched.units {
            self.reindex(unit);
        }
        self.last_local_change(touched, changes)
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

fn check_payment(payment: &Payment, catalog: &Catalog, total: i64) -> Result<(), LedgerError> {
    if payment.currency != catalog.currency || payment.amount_minor != total {
        return Err(LedgerError::AmountMismatch {
            expected: total,
            got: payment.amount_minor,
            currency: payment.currency.clone(),
        });
    }
    Ok(())
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
mod orders;
mod writes;

pub use orders::{CancelOutcome, HoldingOrder, OrderPolicy, PaymentOutcome, grace_end, hub_device};
