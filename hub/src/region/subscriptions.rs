//! Subscriptions as the region writer handles them: created, ended and skipped, and each one's
//! occurrences made into orders ahead of their dates.

use super::*;

/// Makes a subscription's occurrence into an order: `None` if it was made before. An order
/// of something else holding its id (placed before app order ids in `sub-…` were refused) does
/// not skip it: the occurrence takes the next of `{id}.1`, `{id}.2`, … that is free, ids no
/// client can choose, and says so. An id is held if any of the region's ledgers holds it.
pub(super) fn schedule_occurrence(
    ledgers: &mut BTreeMap<FridgeId, Ledger>,
    fridge: &FridgeId,
    mut order: larder_shared::domain::AppOrder,
    date: &jiff::civil::Date,
    catalog: &Catalog,
    now: i64,
) -> Result<Option<larder_shared::ledger::LocalChange>, larder_shared::ledger::LedgerError> {
    use larder_shared::ledger::LedgerError;
    let base = order.order_id.clone();
    for k in 1..=8u32 {
        let held = ledgers
            .iter()
            .find_map(|(f, l)| l.order(&order.order_id).map(|v| (f, v)));
        match held {
            Some((f, v)) if f == fridge && v.record.subscription_id == order.subscription_id => {
                return Ok(None);
            }
            Some((_, v)) => {
                let next = larder_shared::OrderId::new(format!("{base}.{k}"))
                    .map_err(|e| LedgerError::Invalid(e.to_string()))?;
                warn!(order = %order.order_id, held_by = ?v.record.customer_id, next = %next,
                    "a subscription occurrence's id is held by another order; it takes the next");
                order.order_id = next;
            }
            None => {
                let ledger = ledgers
                    .get_mut(fridge)
                    .ok_or_else(|| LedgerError::Invalid(format!("no fridge {fridge}")))?;
                return ledger
                    .schedule_order(&order, &date.to_string(), catalog, now)
                    .map(|(c, _)| Some(c));
            }
        }
    }
    Err(LedgerError::OrderExists(base))
}

pub(super) const META_GENERATED_THROUGH: &str = "subscriptions_generated_through";

impl RegionWriter {
    /// Creates, ends or skips; an `Err` changed nothing.
    pub(super) fn subscription_op(
        &mut self,
        op: SubscriptionOp,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<Outcome, RegionError> {
        let storage = |e: StoreError| RegionError::StoreRead(e.to_string());
        // As this group left it: created or ended earlier in the group, or as stored.
        let find = |store: &RegionStore,
                    staged: &[crate::subscriptions::Subscription],
                    id: &str,
                    customer: Option<&str>|
         -> Result<crate::subscriptions::Subscription, RegionError> {
            let found = match staged.iter().rev().find(|s| s.subscription_id == id) {
                Some(s) => Some(s.clone()),
                None => store
                    .subscriptions()
                    .map_err(storage)?
                    .into_iter()
                    .find(|s| s.subscription_id == id),
            };
            // Another customer's subscription answers as one that does not exist.
            found
                .filter(|s| customer.is_none_or(|c| s.customer_id == c))
                .ok_or_else(|| RegionError::UnknownSubscription(id.to_owned()))
        };
        match op {
            SubscriptionOp::Create(sub) => {
                if !self.ledgers.contains_key(&sub.fridge_id) {
                    return Err(RegionError::NoSuchFridge(sub.fridge_id.clone()));
                }
                for l in &sub.lines {
                    if self.catalog.item(&l.sku).is_none() {
                        return Err(RegionError::UnknownSku(l.sku.clone()));
                    }
                }
                batch.subscriptions.push((*sub).clone());
                Ok(Outcome::SubscriptionCreated(sub))
            }
            SubscriptionOp::End { id, customer } => {
                let mut sub = find(&self.store, &batch.subscriptions, &id, customer.as_deref())?;
                if sub.ended_at_ms.is_none() {
                    sub.ended_at_ms = Some(now);
                    batch.subscriptions.push(sub.clone());
                }
                Ok(Outcome::SubscriptionEnded(Box::new(sub)))
            }
            SubscriptionOp::Skip { id, date, customer } => {
                let sub = find(&self.store, &batch.subscriptions, &id, customer.as_deref())?;
                if !sub.occurs_on(date) {
                    return Err(RegionError::NoOccurrence { id, date });
                }
                if self.generated_through.is_some_and(|g| date <= g) {
                    return Err(RegionError::PastCutoff(date));
                }
                batch.skips.push((id.clone(), date.to_string()));
                Ok(Outcome::Skipped {
                    subscription_id: id,
                    date,
                })
            }
        }
    }

    /// At the cut-off, the next day's subscription occurrences become orders (once each: the
    /// order id is the subscription's and the date's).
    pub(super) fn generate_subscription_orders(&mut self, batch: &mut RegionBatch, now: i64) {
        let target = self.calendar.generated_through(now);
        if self.generated_through.is_some_and(|g| g >= target) {
            return;
        }
        let today = self.calendar.date(now);
        let mut date = match self.generated_through {
            Some(g) => g.tomorrow().unwrap_or(target).max(today),
            None => target,
        };
        let mut subs = match self.store.subscriptions() {
            Ok(s) => s,
            Err(e) => {
                warn!(region = %self.region, error = %e, "reading subscriptions failed; will retry");
                return;
            }
        };
        // Subscriptions created or ended, and meals skipped, earlier in this group are not in
        // the store yet: they count as if they were.
        for staged in &batch.subscriptions {
            match subs
                .iter_mut()
                .find(|s| s.subscription_id == staged.subscription_id)
            {
                Some(s) => *s = staged.clone(),
                None => subs.push(staged.clone()),
            }
        }
        let mut changes = Vec::new();
        while date <= target {
            let day = date.to_string();
            let mut skipped = self.store.skipped_on(&day).unwrap_or_default();
            skipped.extend(
                batch
                    .skips
                    .iter()
                    .filter(|(_, d)| *d == day)
                    .map(|(id, _)| id.clone()),
            );
            for sub in subs
                .iter()
                .filter(|s| s.ended_at_ms.is_none() && s.occurs_on(date))
            {
                if skipped.contains(&sub.subscription_id) {
                    continue;
                }
                let Ok(order_id) = larder_shared::OrderId::new(sub.order_id(date)) else {
                    continue;
                };
                let order = larder_shared::domain::AppOrder {
                    order_id,
                    customer_id: sub.customer_id.clone(),
                    channel: larder_shared::domain::Channel::Subscription,
                    lines: sub.lines.clone(),
                    subscription_id: Some(sub.subscription_id.clone()),
                };
                if !self.ledgers.contains_key(&sub.fridge_id) {
                    continue;
                }
                match schedule_occurrence(
                    &mut self.ledgers,
                    &sub.fridge_id,
                    order,
                    &date,
                    &self.catalog,
                    now,
                ) {
                    Ok(Some(c)) => changes.push((sub.fridge_id.clone(), c)),
                    Ok(None) => {}
                    Err(e) => {
                        warn!(subscription = %sub.subscription_id, error = %e, "scheduling an occurrence failed")
                    }
                }
            }
            let Ok(next) = date.tomorrow() else { break };
            date = next;
        }
        for (fridge, c) in changes {
            self.hub_change(&fridge, c, batch);
        }
        batch
            .meta
            .push((META_GENERATED_THROUGH, target.to_string()));
        self.generated_through = Some(target);
        info!(region = %self.region, through = %target, "subscription occurrences made into orders");
    }
}
