//! Door sessions: what the fridge saw taken and added while its door was open, matched to
//! the orders waiting there, with a card paid at the fridge's reader made into an order.

use super::*;

impl Ledger {
    /// Records a door session. Each unit taken is matched, in this order: to the sale that paid
    /// for it; to the reservation of the order the door was opened for (any unit of a sku it
    /// still lacks counts, so a moved reservation is honoured at the fridge); to the session's
    /// fridge card, in a new order priced from `catalog`; else it is recorded as taken unpaid.
    /// Reservations of other orders whose units were taken move to free units of their sku, or
    /// become `reservation_lost` conflicts. Units added are loaded like a refill.
    ///
    /// One piece: a door session is one change whose steps share the units taken and added
    /// (matching to orders, loads, repairs of others' reservations), in the order the fridge saw
    /// them.
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
    pub(super) fn card_order(
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
}
