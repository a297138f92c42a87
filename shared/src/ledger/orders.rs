//! App orders, reservations, escrow and conflict records on a fridge's ledger.
//!
//! - **Reservations**: the hub writes `reserved[unit] = order`. An order holds a unit while its
//!   status holds units (reserved, dispatched, placed in fridge, available for picking) and the
//!   unit is still in the fridge. Extra reservation values (two replicas moved one reservation
//!   at once) are harmless: an order holds at most its line's quantity, earliest expiry first.
//! - **Escrow**: per sku, three cumulative counters, each with a single writer: `granted` (the
//!   fridge), `returned` and `consumed` (the hub). The hub's allowance is
//!   `granted - returned - consumed`; it confirms orders for an offline fridge only within it,
//!   and walk-up sales by count keep that many free units. Because each counter only grows and
//!   has one writer, a transfer takes effect on a side only once that side has recorded it, and
//!   the hub never confirms more units than the fridge set aside (see ARCHITECTURE.md).
//! - **Conflicts**: a conflict's id is a function of the conflict (kind, fridge and the unit or
//!   order), so every replica that notices it writes the same key: one record per conflict.
//!   Records are never deleted; a person resolves them (`resolutions[id]`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use automerge::ReadDoc;

use super::writes::Writes;
use super::{Ledger, LedgerError, LocalChange, Touched, to_json};
use crate::catalog::{Catalog, CatalogHistory};
use crate::domain::{
    AppOrder, Channel, ConflictKind, ConflictRecord, ConflictView, OrderLine, OrderRecord,
    OrderStatus, OrderView, Payment, PaymentMethod, Resolution, ResolutionAction, StatusEvent,
};
use crate::ids::{DeviceId, OrderId, Sku, UnitId};

/// The device id the hub writes as.
pub(super) const HUB_DEVICE: &str = "hub";

/// The `by` of what the hub writes.
pub fn hub_device() -> DeviceId {
    DeviceId::new(HUB_DEVICE).unwrap_or_else(|_| unreachable!("a valid id"))
}

/// An order holding units: its id, record, status and history.
pub type HoldingOrder = (
    OrderId,
    Arc<OrderRecord>,
    OrderStatus,
    Arc<Vec<StatusEvent>>,
);

/// The time rules of app orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderPolicy {
    /// Free cancellation before payment is captured.
    pub grace_ms: i64,
    /// How long after the grace window a payment may take before the order times out.
    pub payment_timeout_ms: i64,
    /// How long a paid order waits for its customer.
    pub pickup_hold_ms: i64,
}

/// What a cancel came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled (`cancelled` free, or `refund_pending` after capture).
    Done(OrderStatus),
    /// Refused, and recorded in the history as `cancel_rejected`: the contract's code and why.
    Rejected(&'static str, String),
}

/// A payment provider's answer for an app order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentOutcome {
    Captured,
    Refused,
}

/// The rank from which a status is final (see [`OrderStatus::rank`]).
const SETTLED_RANK: u8 = 4;

const ESCROW_GRANTED: &str = "granted";
const ESCROW_RETURNED: &str = "returned";
const ESCROW_CONSUMED: &str = "consumed";
/// The escrow key holding the share the fridge grants by.
const ESCROW_SHARE: &str = "share";

/// When an order's free cancellation ends.
pub fn grace_end(record: &OrderRecord, policy: &OrderPolicy) -> i64 {
    record
        .grace_until_ms
        .unwrap_or(record.created_at_ms + policy.grace_ms)
}

impl Ledger {
    /// Re-reads every reservation value of `unit` into the indexes.
    pub(super) fn reindex_reservation(&mut self, unit: &UnitId) {
        if let Some(old) = self.reserved_by_unit.remove(unit) {
            for o in old {
                if let Some(set) = self.reserved_by_order.get_mut(&o) {
                    set.remove(unit);
                    if set.is_empty() {
                        self.reserved_by_order.remove(&o);
                    }
                }
            }
        }
        let orders: Vec<OrderId> = self
            .doc
            .get_all(&self.maps.reserved, unit.as_str())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(v, _)| v.as_str().and_then(|s| OrderId::new(s).ok()))
            .collect();
        for o in &orders {
            self.reserved_by_order
                .entry(o.clone())
                .or_default()
                .insert(unit.clone());
        }
        if !orders.is_empty() {
            self.reserved_by_unit.insert(unit.clone(), orders);
        }
    }

    /// Adds to `touched` the units of touched orders' reservations and the orders holding
    /// touched units, whose views change with them.
    pub(super) fn widen(&self, touched: &mut Touched) {
        self.forget_orders(touched);
        let mut units = Vec::new();
        for o in &touched.orders {
            if let Some(set) = self.reserved_by_order.get(o) {
                units.extend(set.iter().cloned());
            }
        }
        let mut orders = Vec::new();
        for u in &touched.units {
            if let Some(list) = self.reserved_by_unit.get(u) {
                orders.extend(list.iter().cloned());
            }
            // A sale of a unit another order held touches that order's view too.
        }
        touched.units.extend(units);
        touched.orders.extend(orders);
    }

    /// Drops the cached records and histories of the orders a change touched.
    pub(super) fn forget_orders(&self, touched: &Touched) {
        let (mut records, mut histories) = (self.records.borrow_mut(), self.histories.borrow_mut());
        for o in &touched.orders {
            records.remove(o);
            histories.remove(o);
        }
    }

    fn record(&self, order: &OrderId) -> Option<Arc<OrderRecord>> {
        if let Some(r) = self.records.borrow().get(order) {
            return Some(r.clone());
        }
        let r: Arc<OrderRecord> = self
            .get_str(&self.maps.orders, order.as_str())
            .and_then(|json| serde_json::from_str(&json).ok())
            .map(Arc::new)?;
        self.records.borrow_mut().insert(order.clone(), r.clone());
        Some(r)
    }

    fn history(&self, order: &OrderId) -> Arc<Vec<StatusEvent>> {
        if let Some(h) = self.histories.borrow().get(order) {
            return h.clone();
        }
        let start = format!("{order}/");
        let end = format!("{order}0");
        let h: Arc<Vec<StatusEvent>> = Arc::new(
            self.doc
                .map_range(&self.maps.events, start..end)
                .filter_map(|item| match item.value {
                    automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(s)) => {
                        serde_json::from_str(&s).ok()
                    }
                    _ => None,
                })
                .collect(),
        );
        self.histories.borrow_mut().insert(order.clone(), h.clone());
        h
    }

    /// An order's status, if the order is known here.
    pub fn status(&self, order: &OrderId) -> Option<OrderStatus> {
        if !self.has(&self.maps.orders, order.as_str()) {
            return None;
        }
        let status = super::status_of(&self.history(order)).unwrap_or(OrderStatus::Completed);
        self.note_settled(order, status);
        Some(status)
    }

    fn note_settled(&self, order: &OrderId, status: OrderStatus) {
        if status.rank().is_some_and(|r| r >= SETTLED_RANK) {
            self.settled.borrow_mut().insert(order.clone());
        }
    }

    fn is_settled(&self, order: &OrderId) -> bool {
        self.settled.borrow().contains(order)
    }

    /// The units an order holds: its reservations still in the fridge, earliest expiry
    /// first, at most each line's quantity.
    pub(super) fn effective_reserved(&self, order: &OrderId, record: &OrderRecord) -> Vec<UnitId> {
        let Some(set) = self.reserved_by_order.get(order) else {
            return Vec::new();
        };
        let mut by_sku: BTreeMap<&Sku, Vec<(i64, UnitId)>> = BTreeMap::new();
        for u in set {
            // Still in the fridge: in the index of units neither sold, taken nor removed
            // (cheaper than three document lookups).
            let Some((sku, expires)) = self.unit_keys.get(u) else {
                continue;
            };
            let key = (*expires, u.clone());
            if self.unsold.get(sku).is_some_and(|s| s.contains(&key)) {
                by_sku.entry(sku).or_default().push(key);
            }
        }
        let mut out = Vec::new();
        for line in &record.lines {
            if let Some(list) = by_sku.get_mut(&line.sku) {
                list.sort();
                out.extend(
                    list.drain(..(line.quantity as usize).min(list.len()))
                        .map(|(_, u)| u),
                );
            }
        }
        out
    }

    /// The order holding `unit` now, if any.
    pub fn holder(&self, unit: &UnitId) -> Option<OrderId> {
        let orders = self.reserved_by_unit.get(unit)?;
        let mut sorted: Vec<&OrderId> = orders.iter().collect();
        sorted.sort();
        sorted.into_iter().find_map(|o| {
            if self.is_settled(o) {
                return None;
            }
            let record = self.record(o)?;
            let holds = self.status(o).is_some_and(OrderStatus::holds_units)
                && self.effective_reserved(o, &record).contains(unit);
            holds.then(|| o.clone())
        })
    }

    /// Units of `sku` free for anyone: in the fridge, not expired at `now_ms`, held by no order.
    pub fn free_units(&self, sku: &Sku, now_ms: i64) -> Vec<UnitId> {
        self.unsold
            .get(sku)
            .into_iter()
            .flatten()
            .filter(|(expires, id)| *expires > now_ms && self.holder(id).is_none())
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Every sku with units in the fridge.
    pub fn stocked_skus(&self) -> Vec<Sku> {
        let mut skus: Vec<Sku> = self
            .unsold
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        skus.sort();
        skus
    }

    fn escrow_counter(&self, sku: &Sku, which: &str) -> i64 {
        self.get_str(&self.maps.escrow, &format!("{sku}/{which}"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The units of `sku` the fridge has granted in total (a counter only the fridge writes).
    pub fn granted(&self, sku: &Sku) -> i64 {
        self.escrow_counter(sku, ESCROW_GRANTED)
    }

    /// Every sku's granted total.
    pub fn granted_all(&self) -> BTreeMap<Sku, i64> {
        self.escrow_skus()
            .into_iter()
            .map(|s| {
                let g = self.granted(&s);
                (s, g)
            })
            .collect()
    }

    /// The allowance counting grants only up to `granted` (those every seller has seen).
    pub fn allowance_with(&self, sku: &Sku, granted: i64) -> i64 {
        (granted.min(self.escrow_counter(sku, ESCROW_GRANTED))
            - self.escrow_counter(sku, ESCROW_RETURNED)
            - self.escrow_counter(sku, ESCROW_CONSUMED))
        .max(0)
    }

    /// The units of `sku` the fridge has set aside for the hub, as this replica knows.
    pub fn allowance(&self, sku: &Sku) -> i64 {
        (self.escrow_counter(sku, ESCROW_GRANTED)
            - self.escrow_counter(sku, ESCROW_RETURNED)
            - self.escrow_counter(sku, ESCROW_CONSUMED))
        .max(0)
    }

    /// The allowance a fridge aims to grant for `sku`: `share` of its free units, at least one
    /// where two or more are free (so a walk-up customer can always buy one of the last two).
    /// A share of 0 grants nothing.
    pub fn escrow_target(&self, sku: &Sku, share: f64, now_ms: i64) -> i64 {
        let free = self.free_units(sku, now_ms).len() as i64;
        if free < 2 || share <= 0.0 {
            return 0;
        }
        (((free as f64) * share).floor() as i64).clamp(1, free - 1)
    }

    /// The fridge tops its grants up to the target (only the fridge's agent calls this, while
    /// online). `None` when nothing changes.
    pub fn grant_escrow(
        &mut self,
        share: f64,
        now_ms: i64,
    ) -> Result<Option<LocalChange>, LedgerError> {
        let mut puts = Vec::new();
        let share_text = format!("{share:.3}");
        if self.get_str(&self.maps.escrow, ESCROW_SHARE).as_deref() != Some(share_text.as_str()) {
            puts.push((ESCROW_SHARE.to_owned(), share_text));
        }
        for sku in self.stocked_skus() {
            let target = self.escrow_target(&sku, share, now_ms);
            let have = self.allowance(&sku);
            if have < target {
                let granted = self.escrow_counter(&sku, ESCROW_GRANTED) + (target - have);
                puts.push((format!("{sku}/{ESCROW_GRANTED}"), granted.to_string()));
            }
        }
        self.put_escrow(puts, now_ms)
    }

    /// Every sku with escrow counters.
    pub fn escrow_skus(&self) -> BTreeSet<Sku> {
        self.doc
            .keys(&self.maps.escrow)
            .filter_map(|k| k.split_once('/').and_then(|(s, _)| Sku::new(s).ok()))
            .collect()
    }

    /// The share the fridge grants by (it records it with its grants), so both sides aim at
    /// one target.
    pub fn escrow_share(&self) -> f64 {
        self.get_str(&self.maps.escrow, ESCROW_SHARE)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The hub hands back allowance above the fridge's target (only the hub calls this, after
    /// merging what an online fridge sent). `None` when nothing changes.
    pub fn return_escrow(&mut self, now_ms: i64) -> Result<Option<LocalChange>, LedgerError> {
        let share = self.escrow_share();
        let mut puts = Vec::new();
        for sku in self.escrow_skus() {
            let target = self.escrow_target(&sku, share, now_ms);
            let have = self.allowance(&sku);
            if have > target {
                let returned = self.escrow_counter(&sku, ESCROW_RETURNED) + (have - target);
                puts.push((format!("{sku}/{ESCROW_RETURNED}"), returned.to_string()));
            }
        }
        self.put_escrow(puts, now_ms)
    }

    fn put_escrow(
        &mut self,
        puts: Vec<(String, String)>,
        now_ms: i64,
    ) -> Result<Option<LocalChange>, LedgerError> {
        if puts.is_empty() {
            return Ok(None);
        }
        let mut tx = Writes::new();
        for (k, v) in &puts {
            tx.put(&self.maps.escrow, k.as_str(), v.as_str());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        Ok(Some(self.last_local_change(Touched::default(), changes)?))
    }

    /// Places an app or subscription order at the hub: reserves, per line, the free units
    /// that expire first. While the fridge is offline (`granted_usable` is given) the order is
    /// confirmed only within the escrow allowance, which it consumes; the allowance counts only
    /// grants every walk-up seller of the fridge has received (`granted_usable` per sku, see
    /// [`Ledger::allowance_with`]).
    pub fn place_order(
        &mut self,
        order: &AppOrder,
        catalog: &Catalog,
        granted_usable: Option<&BTreeMap<Sku, i64>>,
        policy: &OrderPolicy,
        now_ms: i64,
    ) -> Result<(LocalChange, OrderView), LedgerError> {
        let fridge_online = granted_usable.is_none();
        self.check_new_order(order)?;
        let mut wanted: BTreeMap<Sku, u32> = BTreeMap::new();
        for line in &order.lines {
            if line.quantity == 0 || line.quantity > super::LINE_QUANTITY_MAX {
                return Err(LedgerError::Invalid(format!(
                    "quantity must be 1 to {}",
                    super::LINE_QUANTITY_MAX
                )));
            }
            if catalog.item(&line.sku).is_none() {
                return Err(LedgerError::UnknownSku(line.sku.clone()));
            }
            *wanted.entry(line.sku.clone()).or_default() += line.quantity;
        }
        let mut lines = Vec::new();
        let mut total: i64 = 0;
        for (sku, quantity) in &wanted {
            let free = self.free_units(sku, now_ms);
            let mut available = free.len() as u32;
            if let Some(granted) = granted_usable {
                let usable = self.allowance_with(sku, granted.get(sku).copied().unwrap_or(0));
                available = available.min(usable.max(0) as u32);
            }
            if available < *quantity {
                return Err(LedgerError::InsufficientStock {
                    sku: sku.clone(),
                    wanted: *quantity,
                    available,
                });
            }
            let price = catalog.item(sku).map_or(0, |i| i.price_minor);
            total = total.saturating_add(price.saturating_mul(i64::from(*quantity)));
            lines.push(OrderLine {
                sku: sku.clone(),
                quantity: *quantity,
                unit_price_minor: price,
                unit_ids: free.into_iter().take(*quantity as usize).collect(),
                picked: true,
            });
        }
        let hub = hub_device();
        let mut record = self.hub_record(order, order.channel, lines, total, catalog, now_ms);
        record.escrow = !fridge_online;
        record.grace_until_ms = (order.channel == Channel::App).then_some(now_ms + policy.grace_ms);
        let event = StatusEvent {
            status: OrderStatus::Reserved,
            at_ms: now_ms,
            by: hub,
            note: (!fridge_online).then(|| "fridge offline: confirmed within escrow".into()),
        };
        let mut touched = Touched::default();
        touched.orders.insert(order.order_id.clone());
        let consumed: Vec<(Sku, i64)> = record
            .lines
            .iter()
            .map(|l| {
                (
                    l.sku.clone(),
                    self.escrow_counter(&l.sku, ESCROW_CONSUMED) + i64::from(l.quantity),
                )
            })
            .collect();
        let mut tx = Writes::new();
        tx.put(&self.maps.orders, order.order_id.as_str(), to_json(&record));
        tx.put(
            &self.maps.events,
            super::event_key(&order.order_id, &event),
            to_json(&event),
        );
        for line in &record.lines {
            for u in &line.unit_ids {
                tx.put(&self.maps.reserved, u.as_str(), order.order_id.as_str());
                touched.units.insert(u.clone());
            }
        }
        if record.escrow {
            for (sku, n) in &consumed {
                tx.put(
                    &self.maps.escrow,
                    format!("{sku}/{ESCROW_CONSUMED}"),
                    n.to_string(),
                );
            }
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for u in &touched.units {
            self.reindex(u);
        }
        let change = self.last_local_change(touched, changes)?;
        let view = self
            .order(&order.order_id)
            .ok_or_else(|| LedgerError::Document("placed order not found".into()))?;
        Ok((change, view))
    }

    /// An order the hub is about to write: 1 to `ORDER_LINES_MAX` lines, and a new id.
    fn check_new_order(&self, order: &AppOrder) -> Result<(), LedgerError> {
        if order.lines.is_empty() || order.lines.len() > super::ORDER_LINES_MAX {
            return Err(LedgerError::Invalid(format!(
                "an order has 1 to {} lines",
                super::ORDER_LINES_MAX
            )));
        }
        if self.has(&self.maps.orders, order.order_id.as_str()) {
            return Err(LedgerError::OrderExists(order.order_id.clone()));
        }
        Ok(())
    }

    /// The record of an order the hub writes for a customer: paid by card at `total`, priced
    /// from `catalog`, created by the hub now.
    fn hub_record(
        &self,
        order: &AppOrder,
        channel: Channel,
        lines: Vec<OrderLine>,
        total: i64,
        catalog: &Catalog,
        now_ms: i64,
    ) -> OrderRecord {
        OrderRecord {
            order_id: order.order_id.clone(),
            fridge_id: self.fridge.clone(),
            channel,
            lines,
            payment: Payment {
                method: PaymentMethod::Card,
                amount_minor: total,
                currency: catalog.currency.clone(),
            },
            total_minor: total,
            catalog_version: catalog.version,
            created_at_ms: now_ms,
            created_by: hub_device(),
            customer_id: Some(order.customer_id.clone()),
            escrow: false,
            subscription_id: order.subscription_id.clone(),
            grace_until_ms: None,
            payment_pending: false,
            for_date: None,
        }
    }

    /// Makes a subscription's occurrence into an order at the cut-off. It holds no units yet:
    /// the kitchen cooks them, and a refill tagged with the order places them in the fridge.
    pub fn schedule_order(
        &mut self,
        order: &AppOrder,
        for_date: &str,
        catalog: &Catalog,
        now_ms: i64,
    ) -> Result<(LocalChange, OrderView), LedgerError> {
        self.check_new_order(order)?;
        let mut lines = Vec::new();
        let mut total = 0i64;
        for line in &order.lines {
            let price = catalog
                .item(&line.sku)
                .ok_or_else(|| LedgerError::UnknownSku(line.sku.clone()))?
                .price_minor;
            total = total.saturating_add(price.saturating_mul(i64::from(line.quantity)));
            lines.push(OrderLine {
                sku: line.sku.clone(),
                quantity: line.quantity,
                unit_price_minor: price,
                unit_ids: Vec::new(),
                picked: false,
            });
        }
        let hub = hub_device();
        let mut record =
            self.hub_record(order, Channel::Subscription, lines, total, catalog, now_ms);
        record.for_date = Some(for_date.to_owned());
        let event = StatusEvent {
            status: OrderStatus::Scheduled,
            at_ms: now_ms,
            by: hub,
            note: Some(format!("subscription occurrence for {for_date}")),
        };
        let mut touched = Touched::default();
        touched.orders.insert(order.order_id.clone());
        let mut tx = Writes::new();
        tx.put(&self.maps.orders, order.order_id.as_str(), to_json(&record));
        tx.put(
            &self.maps.events,
            super::event_key(&order.order_id, &event),
            to_json(&event),
        );
        let changes = tx.commit(&mut self.doc, now_ms)?;
        let change = self.last_local_change(touched, changes)?;
        let view = self
            .order(&order.order_id)
            .ok_or_else(|| LedgerError::Document("scheduled order not found".into()))?;
        Ok((change, view))
    }

    /// The kitchen sent a scheduled order's meals on their way.
    pub fn dispatch(&mut self, order: &OrderId, now_ms: i64) -> Result<LocalChange, LedgerError> {
        match self.status(order) {
            None => Err(LedgerError::UnknownOrder(order.clone())),
            Some(OrderStatus::Scheduled) => {
                self.add_event(order, OrderStatus::Dispatched, None, &hub_device(), now_ms)
            }
            Some(other) => Err(LedgerError::WrongStatus(format!(
                "order {order} is {}, not scheduled",
                other.as_str()
            ))),
        }
    }

    /// Appends one event to an order's history.
    pub fn add_event(
        &mut self,
        order: &OrderId,
        status: OrderStatus,
        note: Option<String>,
        by: &DeviceId,
        now_ms: i64,
    ) -> Result<LocalChange, LedgerError> {
        if !self.has(&self.maps.orders, order.as_str()) {
            return Err(LedgerError::UnknownOrder(order.clone()));
        }
        let event = StatusEvent {
            status,
            at_ms: now_ms,
            by: by.clone(),
            note,
        };
        let mut touched = Touched::default();
        touched.orders.insert(order.clone());
        let mut tx = Writes::new();
        tx.put(
            &self.maps.events,
            super::event_key(order, &event),
            to_json(&event),
        );
        let changes = tx.commit(&mut self.doc, now_ms)?;
        self.last_local_change(touched, changes)
    }

    /// Cancels an order by the rules: free within the grace window, `refund_pending` once paid
    /// and not picked up; otherwise refused, and the refusal recorded.
    pub fn cancel(
        &mut self,
        order: &OrderId,
        by: &DeviceId,
        policy: &OrderPolicy,
        now_ms: i64,
    ) -> Result<(Option<LocalChange>, CancelOutcome), LedgerError> {
        let record = self
            .record(order)
            .ok_or_else(|| LedgerError::UnknownOrder(order.clone()))?;
        let status = self.status(order).unwrap_or(OrderStatus::Completed);
        let outcome = match status {
            s if record.channel == Channel::Subscription && s.holds_units() || s == OrderStatus::Scheduled => {
                CancelOutcome::Rejected(
                    "past_cutoff",
                    "a subscription occurrence can be cancelled free until the day's cut-off; this one is already an order".into(),
                )
            }
            OrderStatus::Reserved if now_ms < grace_end(&record, policy) => {
                CancelOutcome::Done(OrderStatus::Cancelled)
            }
            OrderStatus::Reserved => CancelOutcome::Rejected(
                "past_grace_window",
                "the grace window is over and the payment is being captured; cancel once it is captured for a refund".into(),
            ),
            OrderStatus::AvailableForPicking
            | OrderStatus::Dispatched
            | OrderStatus::PlacedInFridge => CancelOutcome::Done(OrderStatus::RefundPending),
            OrderStatus::PickedUp => {
                CancelOutcome::Rejected("already_picked_up", "the order was picked up".into())
            }
            other => CancelOutcome::Rejected(
                "not_cancellable",
                format!("an order that is {} cannot be cancelled", other.as_str()),
            ),
        };
        let (status, note) = match &outcome {
            CancelOutcome::Done(s) => (*s, None),
            CancelOutcome::Rejected(code, _) => {
                // A refusal is recorded once per order and reason: asking again is answered
                // the same, and writes nothing to relay to every replica.
                let again = self.history(order).iter().any(|e| {
                    e.status == OrderStatus::CancelRejected && e.note.as_deref() == Some(*code)
                });
                if again {
                    return Ok((None, outcome));
                }
                (OrderStatus::CancelRejected, Some((*code).into()))
            }
        };
        let change = self.add_event(order, status, note, by, now_ms)?;
        Ok((Some(change), outcome))
    }

    /// Records a payment outcome for an order waiting for one after its grace window.
    pub fn record_payment(
        &mut self,
        order: &OrderId,
        outcome: PaymentOutcome,
        policy: &OrderPolicy,
        now_ms: i64,
    ) -> Result<LocalChange, LedgerError> {
        let record = self
            .record(order)
            .ok_or_else(|| LedgerError::UnknownOrder(order.clone()))?;
        let status = self.status(order).unwrap_or(OrderStatus::Completed);
        if status != OrderStatus::Reserved {
            return Err(LedgerError::WrongStatus(format!(
                "order {order} is {}, not waiting for a payment",
                status.as_str()
            )));
        }
        if now_ms < grace_end(&record, policy) {
            return Err(LedgerError::WrongStatus(format!(
                "order {order} is in its grace window; payment is captured after it"
            )));
        }
        let next = match outcome {
            PaymentOutcome::Captured => OrderStatus::AvailableForPicking,
            PaymentOutcome::Refused => OrderStatus::PaymentRefused,
        };
        self.add_event(order, next, None, &hub_device(), now_ms)
    }

    /// Card payments `by` took offline that no capture outcome has settled yet.
    pub fn pending_payments(&self, by: &DeviceId) -> Vec<OrderRecord> {
        self.order_ids()
            .iter()
            .filter_map(|o| self.record(o))
            .map(|r| (*r).clone())
            .filter(|r| r.payment_pending && &r.created_by == by)
            .filter(|r| {
                !self.history(&r.order_id).iter().any(|e| {
                    matches!(
                        e.status,
                        OrderStatus::PaymentCaptured | OrderStatus::PaymentFailedAfterSale
                    )
                })
            })
            .collect()
    }

    /// Orders holding units, with their records and statuses, in id order.
    pub fn holding_orders(&self) -> Vec<HoldingOrder> {
        let mut ids: Vec<&OrderId> = self.reserved_by_order.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter(|o| !self.is_settled(o))
            .filter_map(|o| {
                let record = self.record(o)?;
                let history = self.history(o);
                let status = super::status_of(&history).unwrap_or(OrderStatus::Completed);
                self.note_settled(o, status);
                status
                    .holds_units()
                    .then(|| (o.clone(), record, status, history))
            })
            .collect()
    }

    /// The transitions time makes due at `now_ms`: payments that timed out, paid orders
    /// nobody picked up within the hold.
    pub fn due_transitions(
        &self,
        policy: &OrderPolicy,
        now_ms: i64,
    ) -> Vec<(OrderId, OrderStatus, String)> {
        let mut due = Vec::new();
        for (o, record, status, history) in self.holding_orders() {
            match status {
                OrderStatus::Reserved
                    if matches!(record.channel, Channel::App)
                        && now_ms >= grace_end(&record, policy) + policy.payment_timeout_ms =>
                {
                    due.push((
                        o,
                        OrderStatus::PaymentTimeout,
                        "no answer from the payment provider".into(),
                    ));
                }
                OrderStatus::AvailableForPicking => {
                    let since = history
                        .iter()
                        .filter(|e| e.status == OrderStatus::AvailableForPicking)
                        .map(|e| e.at_ms)
                        .min()
                        .unwrap_or(record.created_at_ms);
                    if now_ms >= since + policy.pickup_hold_ms {
                        due.push((
                            o,
                            OrderStatus::ExpiredNoShow,
                            "not picked up within the hold".into(),
                        ));
                    }
                }
                _ => {}
            }
        }
        due
    }

    /// When time next makes something due in this ledger (see [`Ledger::due_transitions`]): a
    /// capture after a grace window (or, for an order whose capture went unanswered, its
    /// timeout), a no-show, or the expiry of a held unit. `None` when nothing waits on time.
    pub fn next_due(
        &self,
        policy: &OrderPolicy,
        unanswered: &dyn Fn(&OrderId) -> bool,
    ) -> Option<i64> {
        self.next_due_with(policy, true, unanswered)
    }

    /// [`Ledger::next_due`], where `captures` says whether the caller captures payments at
    /// the end of the grace window (a simulated provider) or waits for them to be posted.
    pub fn next_due_with(
        &self,
        policy: &OrderPolicy,
        captures: bool,
        unanswered: &dyn Fn(&OrderId) -> bool,
    ) -> Option<i64> {
        let mut due: Option<i64> = None;
        let mut at = |t: i64| due = Some(due.map_or(t, |d| d.min(t)));
        for (o, record, status, history) in self.holding_orders() {
            match status {
                OrderStatus::Reserved if record.channel == Channel::App => {
                    let g = grace_end(&record, policy);
                    at(if captures && !unanswered(&o) {
                        g
                    } else {
                        g + policy.payment_timeout_ms
                    });
                }
                OrderStatus::AvailableForPicking => {
                    let since = history
                        .iter()
                        .filter(|e| e.status == OrderStatus::AvailableForPicking)
                        .map(|e| e.at_ms)
                        .min()
                        .unwrap_or(record.created_at_ms);
                    at(since + policy.pickup_hold_ms);
                }
                _ => {}
            }
            for u in self.effective_reserved(&o, &record) {
                if let Some(f) = self.unit_facts(&u) {
                    at(f.expires_at_ms);
                }
            }
        }
        due
    }

    /// Units in stock per sku at `now_ms`: on hand (not expired, available or held), held by
    /// orders, and on hand but expiring before `before_ms`.
    pub fn stock_counts(&self, now_ms: i64, before_ms: i64) -> BTreeMap<Sku, (u64, u64, u64)> {
        let mut held: std::collections::HashSet<&UnitId> = std::collections::HashSet::new();
        let holding = self.holding_orders();
        let mut effective = Vec::new();
        for (o, record, _, _) in &holding {
            effective.extend(self.effective_reserved(o, record));
        }
        held.extend(effective.iter());
        let mut out = BTreeMap::new();
        for (sku, set) in &self.unsold {
            let mut c = (0u64, 0u64, 0u64);
            for (expires, unit) in set {
                if *expires <= now_ms {
                    continue;
                }
                c.0 += 1;
                if held.contains(unit) {
                    c.1 += 1;
                }
                if *expires < before_ms {
                    c.2 += 1;
                }
            }
            if c.0 > 0 {
                out.insert(sku.clone(), c);
            }
        }
        out
    }

    /// Reservations to move because their unit left (sold or taken by someone else, removed,
    /// expired, or in `also_gone`), each to a free unit of the same sku; orders left short
    /// become `reservation_lost` conflicts. Returns the moves, the units to release and the
    /// conflicts.
    #[allow(clippy::type_complexity)]
    pub(super) fn plan_repairs(
        &self,
        also_gone: &BTreeSet<UnitId>,
        now_ms: i64,
    ) -> (Vec<(UnitId, OrderId)>, Vec<UnitId>, Vec<ConflictRecord>) {
        let mut moves = Vec::new();
        let mut release = Vec::new();
        let mut lost = Vec::new();
        let mut claimed: BTreeSet<UnitId> = BTreeSet::new();
        for (o, record, _, _) in self.holding_orders() {
            let held: Vec<UnitId> = self
                .reserved_by_order
                .get(&o)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for line in &record.lines {
                let mut have = 0u32;
                let mut missing = Vec::new();
                for u in &held {
                    let Some(f) = self.unit_facts(u) else {
                        continue;
                    };
                    if f.sku != line.sku || self.gone(u) {
                        if f.sku == line.sku {
                            missing.push(u.clone());
                        }
                        continue;
                    }
                    if also_gone.contains(u) || f.expires_at_ms <= now_ms {
                        missing.push(u.clone());
                        if f.expires_at_ms <= now_ms {
                            release.push(u.clone());
                        }
                        continue;
                    }
                    have += 1;
                }
                if have >= line.quantity {
                    continue;
                }
                let need = (line.quantity - have) as usize;
                let candidates: Vec<UnitId> = self
                    .free_units(&line.sku, now_ms)
                    .into_iter()
                    .filter(|u| !also_gone.contains(u) && !claimed.contains(u))
                    .take(need)
                    .collect();
                for u in &candidates {
                    claimed.insert(u.clone());
                    moves.push((u.clone(), o.clone()));
                }
                if candidates.len() < need {
                    lost.push(ConflictRecord {
                        conflict_id: format!("reservation_lost:{}:{o}", self.fridge),
                        kind: ConflictKind::ReservationLost,
                        fridge_id: self.fridge.clone(),
                        sku: Some(line.sku.clone()),
                        orders: vec![o.clone()],
                        units: missing,
                        flagged_order: Some(o.clone()),
                        detail: format!(
                            "a unit of {} held for order {o} was taken or removed and no other unit of it is left here",
                            line.sku
                        ),
                    });
                }
            }
        }
        (moves, release, lost)
    }

    /// Moves reservations whose units left and records `reservation_lost` where none is left
    /// (the hub runs this after merging). `None` when nothing changes.
    pub fn repair_reservations(&mut self, now_ms: i64) -> Result<Option<LocalChange>, LedgerError> {
        let (moves, release, lost) = self.plan_repairs(&BTreeSet::new(), now_ms);
        let lost: Vec<ConflictRecord> = lost
            .into_iter()
            .filter(|c| !self.has(&self.maps.conflicts, &c.conflict_id))
            .collect();
        if moves.is_empty() && release.is_empty() && lost.is_empty() {
            return Ok(None);
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for (u, o) in &moves {
            tx.put(&self.maps.reserved, u.as_str(), o.as_str());
            touched.units.insert(u.clone());
            touched.orders.insert(o.clone());
        }
        for u in &release {
            tx.put(&self.maps.reserved, u.as_str(), "");
            touched.units.insert(u.clone());
        }
        for c in &lost {
            tx.put(&self.maps.conflicts, c.conflict_id.as_str(), to_json(c));
            touched.orders.extend(c.orders.iter().cloned());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for u in &touched.units {
            self.reindex(u);
        }
        Ok(Some(self.last_local_change(touched, changes)?))
    }

    /// The conflicts the document shows among `units` and `orders` (every one when both are
    /// `None`): double sales, oversells by count and cancels that met a pickup.
    pub fn detect_conflicts(&self, scope: Option<&Touched>) -> Vec<ConflictRecord> {
        let mut out = Vec::new();
        let units: Vec<String> = match scope {
            Some(t) => t.units.iter().map(|u| u.to_string()).collect(),
            None => self.doc.keys(&self.maps.sold).collect(),
        };
        for unit in units {
            let orders: BTreeSet<String> = self
                .doc
                .get_all(&self.maps.sold, unit.as_str())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(v, _)| v.as_str().map(str::to_owned))
                .collect();
            if orders.len() < 2 {
                continue;
            }
            let mut records: Vec<Arc<OrderRecord>> = orders
                .iter()
                .filter_map(|o| OrderId::new(o.as_str()).ok())
                .filter_map(|o| self.record(&o))
                .collect();
            if records.len() < 2 {
                continue;
            }
            records.sort_by(|a, b| {
                (a.created_at_ms, &a.order_id).cmp(&(b.created_at_ms, &b.order_id))
            });
            let unit_id = UnitId::new(unit.as_str()).ok();
            let sku = unit_id
                .as_ref()
                .and_then(|u| self.unit_facts(u))
                .map(|f| f.sku);
            let all: Vec<OrderId> = records.iter().map(|r| r.order_id.clone()).collect();
            // The first sale stands; every later one is flagged, each in a record of its own
            // (keyed by the order, not the kind, so a record is never made twice for one
            // order). An order once flagged stays flagged: a late-arriving earlier sale only
            // adds records.
            for later in records.iter().skip(1) {
                let picked = later
                    .lines
                    .iter()
                    .any(|l| l.picked && unit_id.as_ref().is_some_and(|u| l.unit_ids.contains(u)));
                let kind = if picked {
                    ConflictKind::Oversold
                } else {
                    ConflictKind::DoubleSale
                };
                out.push(ConflictRecord {
                    conflict_id: format!("sold_twice:{}:{unit}:{}", self.fridge, later.order_id),
                    kind,
                    fridge_id: self.fridge.clone(),
                    sku: sku.clone(),
                    orders: all.clone(),
                    units: unit_id.iter().cloned().collect(),
                    flagged_order: Some(later.order_id.clone()),
                    detail: match kind {
                        ConflictKind::Oversold => format!(
                            "sales by count at devices that were offline took unit {unit} more than once: the fridge had fewer units than sold"
                        ),
                        _ => format!(
                            "unit {unit} was sold in {} orders while devices were offline; {} is a later one, to be refunded",
                            all.len(),
                            later.order_id
                        ),
                    },
                });
            }
        }
        let orders: Vec<OrderId> = match scope {
            Some(t) => t.orders.iter().cloned().collect(),
            None => self.order_ids(),
        };
        for o in orders {
            let history = self.history(&o);
            let picked = history.iter().any(|e| e.status == OrderStatus::PickedUp);
            let cancel = history.iter().any(|e| {
                matches!(
                    e.status,
                    OrderStatus::Cancelled | OrderStatus::RefundPending
                )
            });
            if picked && cancel {
                out.push(ConflictRecord {
                    conflict_id: format!("cancel_pickup_race:{}:{o}", self.fridge),
                    kind: ConflictKind::CancelPickupRace,
                    fridge_id: self.fridge.clone(),
                    sku: None,
                    orders: vec![o.clone()],
                    units: Vec::new(),
                    flagged_order: Some(o.clone()),
                    detail: format!("order {o} was cancelled while it was being picked up: the pickup stands and the cancel is rejected"),
                });
            }
        }
        out
    }

    /// What the hub does after merging devices' changes into this ledger: moves reservations
    /// whose units left, records the conflicts the merge revealed (one record each), and,
    /// when the fridge itself sent (so it is online), hands back escrow above its target.
    /// Returns the hub's changes and the conflicts it newly recorded.
    pub fn hub_after_merge(
        &mut self,
        touched: &Touched,
        fridge_sent: bool,
        catalogs: Option<&CatalogHistory>,
        now_ms: i64,
    ) -> Result<(Vec<LocalChange>, Vec<ConflictRecord>), LedgerError> {
        let mut changes = Vec::new();
        changes.extend(self.repair_reservations(now_ms)?);
        let mut found = self.detect_conflicts(Some(touched));
        if let Some(history) = catalogs {
            found.extend(self.detect_price_changes(touched, history));
        }
        // Only what is not recorded yet: a conflict noticed again is the same record.
        found.retain(|c| !self.has(&self.maps.conflicts, &c.conflict_id));
        if !found.is_empty() {
            changes.extend(self.record_conflicts(found.clone(), now_ms)?);
        }
        if fridge_sent {
            changes.extend(self.return_escrow(now_ms)?);
        }
        Ok((changes, found))
    }

    /// Walk-up sales among `touched` priced from an older catalog version than the one the hub
    /// had published when they were made, at a different total (`price_changed`): the device's
    /// price stands, and the record names both versions and totals. Only the hub knows the
    /// history of versions, so only the hub detects these.
    pub fn detect_price_changes(
        &self,
        touched: &Touched,
        history: &CatalogHistory,
    ) -> Vec<ConflictRecord> {
        let mut out = Vec::new();
        for order in &touched.orders {
            let Some(r) = self.record(order) else {
                continue;
            };
            if !matches!(r.channel, Channel::Pos | Channel::Fridge) {
                continue;
            }
            let Some(in_effect) = history.effective_at(r.created_at_ms) else {
                continue;
            };
            if in_effect <= r.catalog_version {
                continue;
            }
            let lines: Vec<(Sku, u32)> = r
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.quantity))
                .collect();
            let Some(then) = history.price(in_effect, &lines) else {
                continue;
            };
            if then.total_minor == r.total_minor {
                continue;
            }
            let sku = r
                .lines
                .iter()
                .find(|l| {
                    history
                        .price(in_effect, &[(l.sku.clone(), 1)])
                        .map(|p| p.total_minor)
                        != Some(l.unit_price_minor)
                })
                .map(|l| l.sku.clone());
            out.push(ConflictRecord {
                conflict_id: format!("price_changed:{}:{}", r.fridge_id, r.order_id),
                kind: ConflictKind::PriceChanged,
                fridge_id: r.fridge_id.clone(),
                sku,
                orders: vec![r.order_id.clone()],
                units: r.lines.iter().flat_map(|l| l.unit_ids.iter().cloned()).collect(),
                flagged_order: None,
                detail: format!(
                    "sold at catalog version {} for {} {cur}; version {}, published before the sale, prices it {} {cur}; the sale's price stands",
                    r.catalog_version,
                    r.total_minor,
                    then.version,
                    then.total_minor,
                    cur = history.currency(),
                ),
            });
        }
        out
    }

    /// Writes the conflicts not yet recorded; `None` when there are none.
    pub fn record_conflicts(
        &mut self,
        found: Vec<ConflictRecord>,
        now_ms: i64,
    ) -> Result<Option<LocalChange>, LedgerError> {
        let new: Vec<ConflictRecord> = found
            .into_iter()
            .filter(|c| !self.has(&self.maps.conflicts, &c.conflict_id))
            .collect();
        if new.is_empty() {
            return Ok(None);
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for c in &new {
            tx.put(&self.maps.conflicts, c.conflict_id.as_str(), to_json(c));
            touched.orders.extend(c.orders.iter().cloned());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        Ok(Some(self.last_local_change(touched, changes)?))
    }

    /// Every recorded conflict with its resolution, if any.
    pub fn conflicts(&self) -> Vec<ConflictView> {
        self.doc
            .keys(&self.maps.conflicts)
            .filter_map(|id| self.conflict(&id))
            .collect()
    }

    pub fn conflict(&self, id: &str) -> Option<ConflictView> {
        let record: ConflictRecord = self
            .get_str(&self.maps.conflicts, id)
            .and_then(|json| serde_json::from_str(&json).ok())?;
        let resolution: Option<Resolution> = self
            .get_str(&self.maps.resolutions, id)
            .and_then(|json| serde_json::from_str(&json).ok());
        Some(ConflictView {
            record,
            status: if resolution.is_some() {
                "resolved"
            } else {
                "open"
            }
            .into(),
            resolution,
        })
    }

    /// Ids of the conflicts that name `order`.
    pub(super) fn conflicts_naming(&self, order: &OrderId) -> Vec<String> {
        self.doc
            .keys(&self.maps.conflicts)
            .filter(|id| {
                id.ends_with(&format!(":{order}")) || {
                    self.get_str(&self.maps.conflicts, id)
                        .and_then(|json| serde_json::from_str::<ConflictRecord>(&json).ok())
                        .is_some_and(|c| c.orders.contains(order))
                }
            })
            .collect()
    }

    /// Resolves a conflict. `refund` flags the flagged order `refunded`; `substitute`
    /// gives the flagged order another free unit (`resolution.unit_id`); `dismiss` only
    /// records the decision. Nothing is deleted.
    pub fn resolve(
        &mut self,
        id: &str,
        resolution: &Resolution,
        now_ms: i64,
    ) -> Result<(LocalChange, ConflictView), LedgerError> {
        let view = self
            .conflict(id)
            .ok_or_else(|| LedgerError::UnknownConflict(id.to_owned()))?;
        if view.resolution.is_some() {
            return Err(LedgerError::WrongStatus(format!(
                "conflict {id} is already resolved"
            )));
        }
        let flagged = view.record.flagged_order.clone();
        let mut touched = Touched::default();
        if resolution.action == ResolutionAction::Substitute {
            let unit = resolution.unit_id.clone().ok_or_else(|| {
                LedgerError::Invalid("substitute needs the unit_id given instead".into())
            })?;
            let facts = self
                .unit_facts(&unit)
                .ok_or_else(|| LedgerError::UnitNotAvailable {
                    unit: unit.clone(),
                    state: "unknown",
                })?;
            if !self.free_units(&facts.sku, now_ms).contains(&unit) {
                let state = self.unit_state(&unit, Some(&facts), now_ms).as_str();
                return Err(LedgerError::UnitNotAvailable { unit, state });
            }
            touched.units.insert(unit);
        }
        let mut tx = Writes::new();
        tx.put(&self.maps.resolutions, id, to_json(resolution));
        if let Some(order) = &flagged {
            touched.orders.insert(order.clone());
            match resolution.action {
                ResolutionAction::Refund => {
                    let event = StatusEvent {
                        status: OrderStatus::Refunded,
                        at_ms: now_ms,
                        by: hub_device(),
                        note: Some(format!("conflict {id} resolved with a refund")),
                    };
                    tx.put(
                        &self.maps.events,
                        super::event_key(order, &event),
                        to_json(&event),
                    );
                }
                ResolutionAction::Substitute => {
                    for u in &touched.units {
                        tx.put(&self.maps.reserved, u.as_str(), order.as_str());
                    }
                }
                ResolutionAction::Dismiss => {}
            }
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        let units: Vec<UnitId> = touched.units.iter().cloned().collect();
        for u in &units {
            self.reindex(u);
        }
        let change = self.last_local_change(touched, changes)?;
        let view = self
            .conflict(id)
            .ok_or_else(|| LedgerError::Document("resolved conflict not found".into()))?;
        Ok((change, view))
    }
}

#[cfg(test)]
mod tests;
