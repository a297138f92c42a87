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

    /// Places an app or subscription order at the hub: reserves, per line, the free units
    /// that expire first. While the fridge is offline (`granted_usable` is given) the order is
    /// confirmed only within the escrow allowance, which it consumes; the allowance counts only
    /// grants every walk-up seller of the fridge has received (`granted_usable` per sku, see
    /// [`Ledger::allowance_with`]).
    ///
    /// One piece: an order's checks, reservation and record are one change.
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
}

mod conflicts;
mod due;
mod escrow;

use escrow::ESCROW_CONSUMED;
#[cfg(test)]
mod tests;
