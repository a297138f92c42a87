//! Bounded history: compaction of a ledger into a new epoch, and the rebase of a replica onto it.
//!
//! An Automerge document keeps every change ever made, so a fridge that sells for years would
//! carry years of history in its live document. Compaction cuts it: the hub builds the next
//! epoch's document from the live state of the current one, leaving out finished records
//! (units sold, taken or removed, and the orders that sold them) older than a cut-off, which go
//! to an append-only archive instead. The new document starts from a deterministic genesis of
//! its own (the same bytes on every replica), followed by the hub's base change(s).
//!
//! A replica rebases when the new epoch reaches it (as a snapshot in its downlink stream): it
//! loads the base and carries over its own changes the hub did not have when it compacted. Those
//! are rewritten as one new change whose only dependency is the epoch's genesis, so it is
//! concurrent with everything in the new epoch: a value that conflicts with one in the base or
//! with another replica's later write stays visible as an Automerge conflict, exactly as it
//! would have in the old epoch. Records the hub archived are never written back (no removed unit
//! or closed order comes back); transitions that concern them still are, so a late sale of an
//! archived unit is not lost.

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ObjId, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use super::writes::Writes;
use super::{Ledger, LedgerError, MAP_NAMES, genesis};
use crate::domain::{OrderRecord, UnitFacts};
use crate::ids::{FridgeId, OrderId, UnitId};

/// The maps keyed by unit id: a unit's record.
const UNIT_MAPS: [&str; 5] = ["units", "sold", "taken", "removed", "reserved"];

/// What kind of record left the live document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchivedKind {
    Unit,
    Order,
}

impl ArchivedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchivedKind::Unit => "unit",
            ArchivedKind::Order => "order",
        }
    }
}

/// A finished record that left the live document, with every value it had (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    pub kind: ArchivedKind,
    pub id: String,
    /// `{"units": [...], "sold": [...], ...}` for a unit, `{"orders": [...], "events": {...}}`
    /// for an order: every map's values for the record, as the live document held them.
    pub record: serde_json::Value,
}

/// The next epoch's document, built by [`Ledger::compact`].
#[derive(Debug, Clone)]
pub struct Compacted {
    pub epoch: u32,
    /// The saved document: genesis of `epoch` plus the base change(s).
    pub base: Vec<u8>,
    pub archived: Vec<Archived>,
    /// Records kept in the live document.
    pub live_units: usize,
    pub live_orders: usize,
}

/// A replica's ledger after [`Ledger::rebase`].
#[derive(Debug)]
pub struct Rebased {
    pub ledger: Ledger,
    /// The carried-over changes (none, one, or as many as fit the change limit), to store and
    /// send like any local change.
    pub changes: Vec<Vec<u8>>,
    /// Records of the old document that are not in the new one, for the local archive.
    pub archived: Vec<Archived>,
    /// Values of carried-over changes not written back because their record was archived.
    pub skipped: usize,
}

/// An archived order's view, from the record [`Ledger::compact`] archived.
pub fn order_view_from_archive(record: &serde_json::Value) -> Option<crate::domain::OrderView> {
    let json = record["orders"].get(0)?.as_str()?;
    let order: OrderRecord = serde_json::from_str(json).ok()?;
    let mut history: Vec<crate::domain::StatusEvent> = record["events"]
        .as_object()
        .map(|events| {
            events
                .values()
                .filter_map(|v| v.get(0)?.as_str())
                .filter_map(|json| serde_json::from_str(json).ok())
                .collect()
        })
        .unwrap_or_default();
    history.sort_by_key(|e| (e.at_ms, e.status.rank()));
    let status = super::status_of(&history).unwrap_or(crate::domain::OrderStatus::Completed);
    Some(crate::domain::OrderView {
        record: order,
        status,
        history,
        reserved_units: Vec::new(),
        conflicts: Vec::new(),
    })
}

/// The actor of the `n`th base change of an epoch. Starts with a zero byte, which no device id
/// has, like the genesis actor.
fn compaction_actor(fridge: &FridgeId, epoch: u32, n: usize) -> ActorId {
    ActorId::from(format!("\0compaction:{fridge}:{epoch}:{n}").into_bytes())
}

/// Every value of `key` in `obj`, as strings (every value of a ledger map is a string).
fn values(doc: &Automerge, obj: &ObjId, key: &str) -> Vec<String> {
    doc.get_all(obj, key)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(v, _)| match v {
            automerge::Value::Scalar(s) => match s.as_ref() {
                automerge::ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl Ledger {
    /// The epoch of this ledger's document (0 until its first compaction).
    pub fn epoch(&self) -> u32 {
        match self.doc.get(ROOT, "epoch") {
            Ok(Some((automerge::Value::Scalar(s), _))) => match s.as_ref() {
                automerge::ScalarValue::Uint(e) => u32::try_from(*e).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        }
    }

    fn obj(&self, name: &str) -> &ObjId {
        self.maps.get(name)
    }

    fn record_values(&self, names: &[&str], key: &str) -> BTreeMap<String, Vec<String>> {
        names
            .iter()
            .map(|n| (n.to_string(), values(&self.doc, self.obj(n), key)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    fn events_of(&self, order: &str) -> BTreeMap<String, Vec<String>> {
        let start = format!("{order}/");
        let end = format!("{order}0");
        self.doc
            .map_range(&self.maps.events, start..end)
            .map(|item| {
                let key = item.key.to_string();
                let vals = values(&self.doc, &self.maps.events, &key);
                (key, vals)
            })
            .collect()
    }

    fn archived_unit(&self, unit: &str) -> Archived {
        Archived {
            kind: ArchivedKind::Unit,
            id: unit.to_owned(),
            record: serde_json::json!(self.record_values(&UNIT_MAPS[..], unit)),
        }
    }

    fn archived_order(&self, order: &str) -> Archived {
        Archived {
            kind: ArchivedKind::Order,
            id: order.to_owned(),
            record: serde_json::json!({
                "orders": values(&self.doc, &self.maps.orders, order),
                "events": self.events_of(order),
            }),
        }
    }

    /// Which units and orders are finished and older than `cutoff_ms`, so may leave the live
    /// document. A record with a conflict (two values for one key) always stays live, where
    /// the conflict is visible and can be resolved.
    fn finished_before(&self, cutoff_ms: i64) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut units = BTreeSet::new();
        // Orders that a live unit was sold in stay live with it.
        let mut orders_needed: BTreeSet<String> = BTreeSet::new();
        let mut unit_keys: BTreeSet<String> = BTreeSet::new();
        for name in UNIT_MAPS {
            unit_keys.extend(self.doc.keys(self.obj(name)));
        }
        for unit in unit_keys {
            let record = self.record_values(&UNIT_MAPS[..], &unit);
            let conflict = record.values().any(|v| v.len() > 1);
            let facts: Option<UnitFacts> = record
                .get("units")
                .and_then(|v| v.first())
                .and_then(|json| serde_json::from_str(json).ok());
            let finished = ["sold", "taken", "removed"]
                .iter()
                .any(|m| record.contains_key(*m));
            // Old: loaded before the cut-off, and sold (if it was) in orders made before it.
            let sold_recently = record.get("sold").is_some_and(|orders| {
                orders.iter().any(|o| {
                    self.get_str(&self.maps.orders, o)
                        .and_then(|json| serde_json::from_str::<OrderRecord>(&json).ok())
                        .is_none_or(|r| r.created_at_ms >= cutoff_ms)
                })
            });
            let old = facts.as_ref().is_some_and(|f| f.loaded_at_ms < cutoff_ms) && !sold_recently;
            if finished && old && !conflict {
                units.insert(unit);
            } else if let Some(sold) = record.get("sold") {
                orders_needed.extend(sold.iter().cloned());
            }
        }
        let mut orders = BTreeSet::new();
        for order in self.doc.keys(&self.maps.orders) {
            let vals = values(&self.doc, &self.maps.orders, &order);
            let [json] = vals.as_slice() else {
                continue;
            };
            let Ok(record) = serde_json::from_str::<OrderRecord>(json) else {
                continue;
            };
            let conflict = self.events_of(&order).values().any(|v| v.len() > 1);
            if record.created_at_ms < cutoff_ms && !orders_needed.contains(&order) && !conflict {
                orders.insert(order);
            }
        }
        (units, orders)
    }

    /// Builds the next epoch's document from this one: every record except the finished ones
    /// older than `cutoff_ms`, which are returned for the archive. Every value of a conflicting
    /// key is kept (each extra value in a base change of its own, concurrent with the first).
    pub fn compact(&self, cutoff_ms: i64) -> Result<Compacted, LedgerError> {
        let epoch = self.epoch() + 1;
        let (units, orders) = self.finished_before(cutoff_ms);
        let archived_key = |map: &str, key: &str| -> bool {
            match map {
                "units" | "sold" | "taken" | "removed" | "reserved" => units.contains(key),
                "orders" => orders.contains(key),
                _ => key
                    .split_once('/')
                    .is_some_and(|(order, _)| orders.contains(order)),
            }
        };
        // (map, key, values) of every live key.
        let mut live: Vec<(&str, String, Vec<String>)> = Vec::new();
        for name in MAP_NAMES {
            for key in self.doc.keys(self.obj(name)) {
                if !archived_key(name, &key) {
                    let vals = values(&self.doc, self.obj(name), &key);
                    live.push((name, key, vals));
                }
            }
        }
        let mut doc = genesis(&self.fridge, epoch)?;
        let depth = live.iter().map(|(_, _, v)| v.len()).max().unwrap_or(0);
        for n in 0..depth.max(1) {
            // The nth value of every key that has one, each round concurrent with the others.
            let mut fork =
                genesis(&self.fridge, epoch)?.with_actor(compaction_actor(&self.fridge, epoch, n));
            let maps = super::find_maps(&fork)?;
            let mut tx = fork.transaction();
            for (name, key, vals) in &live {
                if let Some(v) = vals.get(n) {
                    let obj = maps.get(name);
                    tx.put(obj, key.as_str(), v.as_str())?;
                }
            }
            tx.commit_with(CommitOptions::default().with_time(0));
            doc.merge(&mut fork)?;
        }
        let mut archived: Vec<Archived> = units.iter().map(|u| self.archived_unit(u)).collect();
        archived.extend(orders.iter().map(|o| self.archived_order(o)));
        let live_units = self.doc.keys(&self.maps.units).count()
            - units
                .iter()
                .filter(|u| self.has(&self.maps.units, u))
                .count();
        Ok(Compacted {
            epoch,
            base: doc.save(),
            archived,
            live_units,
            live_orders: self.doc.keys(&self.maps.orders).count() - orders.len(),
        })
    }

    /// Moves this replica onto a newer epoch's `base`, carrying over `carry`: this device's
    /// changes of the old epoch that the base does not include. Writes as `actor` from now on.
    ///
    /// One piece: the new epoch's document, the replica's own changes carried over and the
    /// archived records, built together so the rebase is one write.
    pub fn rebase(
        &self,
        base: &[u8],
        carry: &[Vec<u8>],
        actor: ActorId,
    ) -> Result<Rebased, LedgerError> {
        let doc = Automerge::load(base)?;
        let mut next = Ledger::from_doc(self.fridge.clone(), doc.with_actor(actor.clone()))?;
        let epoch = next.epoch();
        if epoch <= self.epoch() {
            return Err(LedgerError::Document(format!(
                "rebase onto epoch {epoch} from epoch {}",
                self.epoch()
            )));
        }
        // The op ids the carried changes made: (actor, first counter, last counter).
        let mut keys: BTreeSet<String> = BTreeSet::new();
        let mut carried_ops: Vec<(ActorId, u64, u64)> = Vec::new();
        for bytes in carry {
            let change = Change::from_bytes(bytes.clone())
                .map_err(|e| LedgerError::BadChange(e.to_string()))?;
            carried_ops.push((
                change.actor_id().clone(),
                change.start_op().get(),
                change.max_op(),
            ));
            for op in change.decode().operations {
                if let automerge::legacy::Key::Map(key) = op.key {
                    keys.insert(key.to_string());
                }
            }
        }
        let carried = |id: &automerge::ObjId| match id {
            automerge::ObjId::Id(ctr, actor, _) => carried_ops
                .iter()
                .any(|(a, first, last)| a == actor && (*first..=*last).contains(ctr)),
            automerge::ObjId::Root => false,
        };
        // Records here that the new epoch does not have, other than those the carried changes
        // made: the hub archived them.
        let gone = |obj: &ObjId, next_obj: &ObjId| -> BTreeSet<String> {
            self.doc
                .keys(obj)
                .filter(|k| !next.has(next_obj, k))
                .filter(|k| {
                    self.doc
                        .get_all(obj, k.as_str())
                        .unwrap_or_default()
                        .iter()
                        .any(|(_, id)| !carried(id))
                })
                .collect()
        };
        let gone_units = gone(&self.maps.units, &next.maps.units);
        let gone_orders = gone(&self.maps.orders, &next.maps.orders);
        let mut archived: Vec<Archived> =
            gone_units.iter().map(|u| self.archived_unit(u)).collect();
        archived.extend(gone_orders.iter().map(|o| self.archived_order(o)));

        let mut puts: Vec<(&str, String, String)> = Vec::new();
        let mut skipped = 0;
        for name in MAP_NAMES {
            for key in &keys {
                let have = values(&next.doc, next.obj(name), key);
                let missing: Vec<String> = self
                    .doc
                    .get_all(self.obj(name), key.as_str())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, id)| carried(id))
                    .filter_map(|(v, _)| match v {
                        automerge::Value::Scalar(s) => match s.as_ref() {
                            automerge::ScalarValue::Str(s) => Some(s.to_string()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .filter(|v| !have.contains(v))
                    .collect();
                let Some(value) = missing.first() else {
                    continue;
                };
                let resurrects = match name {
                    "units" | "reserved" => gone_units.contains(key),
                    "orders" => gone_orders.contains(key),
                    "events" => key
                        .split_once('/')
                        .is_some_and(|(o, _)| gone_orders.contains(o)),
                    _ => false,
                };
                if resurrects {
                    skipped += missing.len();
                    continue;
                }
                // One value per key and change; a key with two values here was a conflict the
                // hub already holds both sides of, unless it archived it.
                skipped += missing.len() - 1;
                puts.push((name, key.clone(), value.clone()));
            }
        }
        let changes = if puts.is_empty() {
            Vec::new()
        } else {
            let mut fork = genesis(&self.fridge, epoch)?.with_actor(actor);
            let maps = super::find_maps(&fork)?;
            let mut writes = Writes::new();
            for (name, key, value) in puts {
                writes.put(maps.get(name), key, value);
            }
            let changes = writes.commit(&mut fork, 0)?;
            next.apply_changes(&changes)?;
            changes
        };
        Ok(Rebased {
            ledger: next,
            changes,
            archived,
            skipped,
        })
    }

    /// Whether a unit or order id is in the live document.
    pub fn holds(&self, kind: ArchivedKind, id: &str) -> bool {
        match kind {
            ArchivedKind::Unit => self.has(&self.maps.units, id),
            ArchivedKind::Order => self.has(&self.maps.orders, id),
        }
    }

    /// The ids of this ledger's units and orders, for projections rebuilt after a rebase.
    pub fn unit_and_order_ids(&self) -> (Vec<UnitId>, Vec<OrderId>) {
        (self.unit_ids(), self.order_ids())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, CatalogItem};
    use crate::domain::{Channel, Payment, PaymentMethod, Refill, RefillUnit, Sale, SaleLine};
    use crate::ids::{DeviceId, Sku};
    use crate::ledger::actor_for;

    const DAY: i64 = 86_400_000;
    const T0: i64 = 1_700_000_000_000;

    fn dev(name: &str) -> DeviceId {
        DeviceId::new(name).expect("id")
    }

    fn fridge() -> FridgeId {
        FridgeId::new("fridge-1").expect("id")
    }

    fn catalog() -> Catalog {
        Catalog {
            version: 1,
            currency: "EUR".into(),
            items: vec![CatalogItem {
                sku: Sku::new("soup").expect("sku"),
                name: "Soup".into(),
                price_minor: 500,
                allergens: vec![],
                shelf_life_hours: 72,
            }],
        }
    }

    fn refill(l: &mut Ledger, ids: &[&str], at: i64) -> Vec<u8> {
        let units = ids
            .iter()
            .map(|id| RefillUnit {
                unit_id: UnitId::new(*id).expect("id"),
                sku: Sku::new("soup").expect("sku"),
                expires_at_ms: at + 30 * DAY,
                batch: None,
            })
            .collect();
        l.refill(
            &Refill {
                units,
                order_id: None,
            },
            &dev("fr-1"),
            at,
        )
        .expect("refill")
        .changes
        .remove(0)
    }

    fn sell(l: &mut Ledger, order: &str, unit: &str, by: &str, at: i64) -> Vec<u8> {
        let sale = Sale {
            order_id: OrderId::new(order).expect("id"),
            channel: Channel::Pos,
            lines: vec![SaleLine {
                sku: Sku::new("soup").expect("sku"),
                unit_id: Some(UnitId::new(unit).expect("id")),
                quantity: 1,
            }],
            payment: Payment {
                method: PaymentMethod::Cash,
                amount_minor: 500,
                currency: "EUR".into(),
            },
            payment_pending: false,
        };
        l.sell(&sale, &catalog(), &dev(by), at)
            .expect("sale")
            .0
            .changes
            .remove(0)
    }

    /// A fridge, a POS and the hub with the same history: units a..f refilled on day 0, a..c
    /// sold on day 0, d refilled and e sold on day 5.
    fn replicas() -> (Ledger, Ledger, Ledger) {
        let (fr, pos, hub, _) = replicas_with_changes();
        (fr, pos, hub)
    }

    fn replicas_with_changes() -> (Ledger, Ledger, Ledger, Vec<Vec<u8>>) {
        let mut fr = Ledger::new(fridge(), actor_for(&dev("fr-1"))).expect("ledger");
        let mut changes = vec![refill(&mut fr, &["a", "b", "c", "d", "e", "f"], T0)];
        for (i, u) in ["a", "b", "c"].iter().enumerate() {
            changes.push(sell(&mut fr, &format!("o{i}"), u, "fr-1", T0 + 1));
        }
        changes.push(sell(&mut fr, "o-late", "e", "fr-1", T0 + 5 * DAY));
        let mut pos = Ledger::new(fridge(), actor_for(&dev("pos-1"))).expect("ledger");
        let mut hub = Ledger::new(fridge(), ActorId::from(b"\0hub".to_vec())).expect("ledger");
        pos.apply_changes(&changes).expect("merge");
        hub.apply_changes(&changes).expect("merge");
        (fr, pos, hub, changes)
    }

    fn unit_ids(l: &Ledger) -> Vec<String> {
        l.unit_ids().iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn compaction_archives_finished_old_records_and_keeps_the_rest() {
        let (_, _, hub) = replicas();
        let c = hub.compact(T0 + DAY).expect("compact");
        assert_eq!(c.epoch, 1);
        let archived: BTreeSet<(ArchivedKind, String)> =
            c.archived.iter().map(|a| (a.kind, a.id.clone())).collect();
        let want: BTreeSet<(ArchivedKind, String)> = [
            (ArchivedKind::Unit, "a"),
            (ArchivedKind::Unit, "b"),
            (ArchivedKind::Unit, "c"),
            (ArchivedKind::Order, "o0"),
            (ArchivedKind::Order, "o1"),
            (ArchivedKind::Order, "o2"),
        ]
        .into_iter()
        .map(|(k, id)| (k, id.to_owned()))
        .collect();
        // e was loaded on day 0 but sold on day 5, after the cut-off: it stays with its order.
        assert_eq!(archived, want);
        let next = Ledger::load(fridge(), actor_for(&dev("x")), Some(&c.base), &[]).expect("load");
        assert_eq!(next.epoch(), 1);
        assert_eq!(unit_ids(&next), vec!["d", "e", "f"]);
        assert_eq!(next.order_ids().len(), 1, "o-late stays live");
        assert_eq!(c.live_units, 3);
        let sold = c
            .archived
            .iter()
            .find(|a| a.id == "a")
            .map(|a| a.record["sold"][0].clone());
        assert_eq!(
            sold,
            Some(serde_json::json!("o0")),
            "the archive keeps every value"
        );
        // The new epoch is smaller and every replica that loads it agrees.
        assert!(c.base.len() < hub.save().len());
        let again = Ledger::load(fridge(), actor_for(&dev("y")), Some(&c.base), &[]).expect("load");
        assert_eq!(again.state_digest(), next.state_digest());
    }

    #[test]
    fn a_rebase_carries_offline_changes_over_and_keeps_conflicts() {
        let (mut fr, mut pos, hub) = replicas();
        // Offline, the POS sells d and the fridge sells d too (a double sale) and f; the hub
        // gets the fridge's sales before it compacts, the POS's only after.
        let pos_sale = sell(&mut pos, "p1", "d", "pos-1", T0 + 6 * DAY);
        let fr_d = sell(&mut fr, "f1", "d", "fr-1", T0 + 6 * DAY);
        let fr_f = sell(&mut fr, "f2", "f", "fr-1", T0 + 6 * DAY);
        let mut hub = hub;
        hub.apply_changes(&[fr_d.clone(), fr_f.clone()])
            .expect("merge");
        let c = hub.compact(T0 + DAY).expect("compact");

        let mut hub_next = Ledger::load(
            fridge(),
            ActorId::from(b"\0hub".to_vec()),
            Some(&c.base),
            &[],
        )
        .expect("load");
        // The fridge's own changes are all in the base: nothing to carry.
        let fr_next = fr
            .rebase(&c.base, &[], actor_for(&dev("fr-1")))
            .expect("rebase fridge");
        assert!(fr_next.changes.is_empty());
        assert_eq!(fr_next.skipped, 0);
        let pos_next = pos
            .rebase(&c.base, &[pos_sale], actor_for(&dev("pos-1")))
            .expect("rebase pos");
        let carried = pos_next.changes.clone();
        assert_eq!(carried.len(), 1, "the POS's sale is carried over");
        assert!(
            !pos_next.archived.is_empty(),
            "the POS archives what left the live document"
        );
        hub_next
            .apply_changes(&carried)
            .expect("the hub merges the carried change");
        let mut fr_next = fr_next.ledger;
        fr_next
            .apply_changes(&carried)
            .expect("the fridge merges it");
        assert_eq!(hub_next.state_digest(), pos_next.ledger.state_digest());
        assert_eq!(hub_next.state_digest(), fr_next.state_digest());
        // The double sale of d is still a conflict in the new epoch.
        let sold_d = values(&hub_next.doc, &hub_next.maps.sold, "d");
        assert_eq!(sold_d.len(), 2, "{sold_d:?}");
        assert!(hub_next.order_ids().iter().any(|o| o.as_str() == "p1"));
    }

    #[test]
    fn a_late_change_to_an_archived_record_does_not_bring_it_back() {
        let (mut fr, _, hub, changes) = replicas_with_changes();
        // A POS that saw only the refill records, offline, a sale of b: the hub has b sold in
        // o1 and, by now, archived.
        let mut pos = Ledger::new(fridge(), actor_for(&dev("pos-1"))).expect("ledger");
        pos.apply_changes(&changes[..1]).expect("merge");
        let late = sell(&mut pos, "p-late", "b", "pos-1", T0 + 9 * DAY);
        let c = hub.compact(T0 + DAY).expect("compact");
        let rebased = pos
            .rebase(&c.base, &[late], actor_for(&dev("pos-1")))
            .expect("rebase");
        let next = rebased.ledger;
        assert!(!next.holds(ArchivedKind::Unit, "b"), "b stays archived");
        assert!(!next.holds(ArchivedKind::Order, "o1"));
        assert!(
            next.holds(ArchivedKind::Order, "p-late"),
            "the late order is kept"
        );
        // The late sale itself is not lost: its transition is in the live document.
        assert_eq!(values(&next.doc, &next.maps.sold, "b"), vec!["p-late"]);
        assert!(
            rebased.archived.iter().any(|a| a.id == "b"),
            "the POS archives its copy of b"
        );
        // A replica that was not offline rebases to the same state once it merges it.
        let mut fr_next = fr
            .rebase(&c.base, &[], actor_for(&dev("fr-1")))
            .expect("rebase");
        fr_next
            .ledger
            .apply_changes(&rebased.changes)
            .expect("merge");
        assert_eq!(fr_next.ledger.state_digest(), next.state_digest());
        let _ = &mut fr;
    }

    #[test]
    fn rebasing_onto_an_older_or_same_epoch_is_refused() {
        let (_, pos, hub) = replicas();
        let c = hub.compact(T0 + DAY).expect("compact");
        let next = pos
            .rebase(&c.base, &[], actor_for(&dev("pos-1")))
            .expect("rebase")
            .ledger;
        assert!(next.rebase(&c.base, &[], actor_for(&dev("pos-1"))).is_err());
        let c2 = Ledger::load(
            fridge(),
            ActorId::from(b"\0hub".to_vec()),
            Some(&c.base),
            &[],
        )
        .expect("load")
        .compact(T0 + 10 * DAY)
        .expect("compact again");
        assert_eq!(c2.epoch, 2);
        let next2 = next
            .rebase(&c2.base, &[], actor_for(&dev("pos-1")))
            .expect("rebase");
        assert_eq!(next2.ledger.epoch(), 2);
        assert_eq!(
            unit_ids(&next2.ledger),
            vec!["d", "f"],
            "only the unsold units stay in epoch 2"
        );
    }
}
