//! Sales: a walk-up or POS sale planned over the units on the shelf, checked against its
//! payment, and recorded with the units it sold.

use super::*;

/// A unit a sale takes, with its facts if its refill is known here.
pub(super) type SoldUnit = (UnitId, Option<UnitFacts>);

pub(super) fn check_payment(
    payment: &Payment,
    catalog: &Catalog,
    total: i64,
) -> Result<(), LedgerError> {
    if payment.currency != catalog.currency || payment.amount_minor != total {
        return Err(LedgerError::AmountMismatch {
            expected: total,
            got: payment.amount_minor,
            currency: payment.currency.clone(),
        });
    }
    Ok(())
}

impl Ledger {
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

    pub(super) fn plan_sale(
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

    pub(super) fn check_sellable(
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

    pub(super) fn pick_units(
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
}
