//! Orders as the region writer handles them: app orders placed, cancelled, dispatched and paid,
//! conflicts resolved, the escrow grants a fridge may sell against, and the periodic tick (expired
//! payments, no-shows, reservations on expired units).

use super::*;

/// A fridge's escrow grants per sku as they stood once the change table reached a head.
#[derive(Debug)]
pub(super) struct GrantSnapshot {
    /// The change table's head when the grants stood so.
    pub(super) head: u64,
    pub(super) granted: BTreeMap<larder_shared::Sku, i64>,
}

impl RegionWriter {
    /// Stages a change the hub made to a ledger: a row of the change table (so it reaches
    /// every replica through its downlink stream), signed so a replica can give it back to a
    /// store that lost it, and the projection rows it touched.
    pub(super) fn hub_change(
        &mut self,
        fridge: &FridgeId,
        change: larder_shared::ledger::LocalChange,
        batch: &mut RegionBatch,
    ) {
        self.dirty.insert(fridge.clone());
        self.stock_dirty.insert(fridge.clone());
        let epoch = self.ledgers.get(fridge).map_or(0, Ledger::epoch);
        for bytes in change.changes {
            let sig = larder_shared::audit::sign_hub_change(
                &self.hub_key,
                &self.region,
                fridge,
                epoch,
                &bytes,
            );
            batch.changes.push(StoredChange {
                ledger: fridge.clone(),
                author: ledger::hub_device(),
                epoch,
                hash: sha2::Sha256::digest(&bytes).into(),
                bytes,
                hub_sig: Some(sig),
            });
        }
        batch
            .units
            .extend(change.units.into_iter().map(|u| (fridge.clone(), u)));
        batch.orders.extend(change.orders);
    }

    /// An order id is one order in the whole region: none of its ledgers, nor the projection
    /// (archived orders too), holds it.
    pub(super) fn check_order_id_free(
        &self,
        id: &larder_shared::OrderId,
    ) -> Result<(), RegionError> {
        let in_store = self.store.order_exists(id.as_str()).map_err(|e| {
            error!(region = %self.region, error = %e, "reading orders failed");
            RegionError::StoreRead(e.to_string())
        })?;
        if in_store || self.ledgers.values().any(|l| l.has_order(id)) {
            return Err(RegionError::OrderExists {
                order: id.clone(),
                region: self.region.clone(),
            });
        }
        Ok(())
    }

    /// Carries out an order action; an `Err` changed nothing.
    pub(super) fn order_action(
        &mut self,
        fridge: Option<FridgeId>,
        order: Option<larder_shared::OrderId>,
        action: OrderAction,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<Outcome, RegionError> {
        let policy = self.orders.policy();
        let fridge = match (&action, fridge) {
            (OrderAction::Resolve { conflict_id, .. }, _) => self
                .ledgers
                .iter()
                .find(|(_, l)| l.conflict(conflict_id).is_some())
                .map(|(f, _)| f.clone())
                .ok_or_else(|| RegionError::UnknownConflict(conflict_id.clone()))?,
            (_, Some(f)) => f,
            (_, None) => return Err(RegionError::Invalid("no fridge given".into())),
        };
        let usable = match &action {
            OrderAction::Place {
                fridge_online: false,
                ..
            } => Some(self.usable_grants(&fridge)),
            _ => None,
        };
        if let OrderAction::Place { order, .. } = &action {
            self.check_order_id_free(&order.order_id)?;
        }
        let ledger = self
            .ledgers
            .get_mut(&fridge)
            .ok_or_else(|| RegionError::NoSuchFridge(fridge.clone()))?;
        let order_now = |ledger: &Ledger, order: &larder_shared::OrderId| {
            Outcome::Order(ledger.order(order).map(Box::new))
        };
        let (change, outcome) = match action {
            OrderAction::Place { order, .. } => {
                let (change, view) =
                    ledger.place_order(&order, &self.catalog, usable.as_ref(), &policy, now)?;
                (Some(change), Outcome::OrderPlaced(Box::new(view)))
            }
            OrderAction::Cancel => {
                let order = order.ok_or(RegionError::UnknownOrder)?;
                let (change, done) = ledger.cancel(&order, &ledger::hub_device(), &policy, now)?;
                let outcome = match done {
                    ledger::CancelOutcome::Done(_) => order_now(ledger, &order),
                    ledger::CancelOutcome::Rejected(code, why) => {
                        Outcome::CancelRefused { code, why }
                    }
                };
                (change, outcome)
            }
            OrderAction::Dispatch => {
                let order = order.ok_or(RegionError::UnknownOrder)?;
                let change = ledger.dispatch(&order, now)?;
                (Some(change), order_now(ledger, &order))
            }
            OrderAction::Payment(paid) => {
                let order = order.ok_or(RegionError::UnknownOrder)?;
                let change = ledger.record_payment(&order, paid, &policy, now)?;
                self.unanswered.remove(&order);
                (Some(change), order_now(ledger, &order))
            }
            OrderAction::Resolve {
                conflict_id,
                mut resolution,
            } => {
                resolution.at_ms = now;
                let (change, view) = ledger.resolve(&conflict_id, &resolution, now)?;
                (Some(change), Outcome::Resolved(Box::new(view)))
            }
        };
        if let Some(change) = change {
            self.hub_change(&fridge, change, batch);
        }
        Ok(outcome)
    }

    /// Every ledger's stock counts, recounting only ledgers that changed since they were last
    /// counted for this minute and this next delivery.
    pub(super) fn stock_counts(
        &mut self,
        now_ms: i64,
        before_ms: i64,
    ) -> crate::subscriptions::PerFridge<crate::subscriptions::StockCount> {
        let key = (now_ms / 60_000, before_ms);
        let dirty = std::mem::take(&mut self.stock_dirty);
        let mut out = crate::subscriptions::PerFridge::new();
        for (f, l) in &self.ledgers {
            let fresh = !dirty.contains(f) && self.stock_cache.get(f).is_some_and(|c| c.key == key);
            if !fresh {
                let counts = l
                    .stock_counts(key.0 * 60_000, before_ms)
                    .into_iter()
                    .map(|(sku, (on_hand, reserved, expiring))| {
                        let c = crate::subscriptions::StockCount {
                            on_hand,
                            reserved,
                            expiring,
                        };
                        (sku.to_string(), c)
                    })
                    .collect();
                let counts = Arc::new(counts);
                self.stock_cache
                    .insert(f.clone(), StockCache { key, counts });
            }
            if let Some(StockCache { counts, .. }) = self.stock_cache.get(f) {
                out.insert(f.clone(), counts.clone());
            }
        }
        out
    }

    /// Records the fridge's grants as of `head`, if they changed.
    pub(super) fn snapshot_grants(&mut self, fridge: &FridgeId, head: u64) {
        let Some(ledger) = self.ledgers.get(fridge) else {
            return;
        };
        let now = ledger.granted_all();
        let list = self.grants.entry(fridge.clone()).or_default();
        if list.last().is_none_or(|s| s.granted != now) {
            list.push(GrantSnapshot { head, granted: now });
        }
    }

    /// The grants of a fridge every other walk-up seller (its POS) has received: the newest
    /// snapshot at or below the lowest downlink acknowledgement among them.
    pub(super) fn usable_grants(&mut self, fridge: &FridgeId) -> BTreeMap<larder_shared::Sku, i64> {
        let min_acked = match self.store.devices() {
            Ok(devices) => devices
                .iter()
                .filter(|(d, _)| {
                    d.revoked_at_ms.is_none()
                        && d.role != larder_shared::domain::Role::Fridge
                        && d.fridges.contains(fridge)
                })
                .map(|(_, p)| p.down_acked)
                .min()
                .unwrap_or(u64::MAX),
            Err(_) => 0,
        };
        let Some(list) = self.grants.get_mut(fridge) else {
            return BTreeMap::new();
        };
        let Some(i) = list.iter().rposition(|s| s.head <= min_acked) else {
            return BTreeMap::new();
        };
        list.drain(..i);
        list.first().map(|s| s.granted.clone()).unwrap_or_default()
    }

    /// Captures go to the provider's API through `requests` (`[payments] url`), or, with
    /// `None`, are left to the provider; outcomes come back by webhook either way.
    pub fn capture_through(
        &mut self,
        requests: Option<tokio::sync::mpsc::Sender<crate::payments::CaptureRequest>>,
    ) {
        self.provider = match requests {
            Some(tx) => crate::payments::Capturer::Provider(tx),
            None => crate::payments::Capturer::None,
        };
    }

    /// Applies what time has made due in every ledger.
    ///
    /// One piece: the tick's passes over every ledger (captures, timeouts, no-shows,
    /// subscriptions, expired reservations) share the group's batch and time.
    pub(super) fn tick(&mut self, batch: &mut RegionBatch, now: i64) {
        self.generate_subscription_orders(batch, now);
        use larder_shared::payments::CaptureResult;
        let policy = self.orders.policy();
        let captures = self.provider.captures();
        let fail_after = (self.orders.fail_later_after_seconds * 1000) as i64;
        let mut changes = Vec::new();
        let mut transitions: Vec<&'static str> = Vec::new();
        let due_failures: Vec<(FridgeId, larder_shared::OrderId)> = {
            let (due, later): (Vec<_>, Vec<_>) =
                self.fail_later.drain(..).partition(|(at, _, _)| *at <= now);
            self.fail_later = later;
            due.into_iter().map(|(_, f, o)| (f, o)).collect()
        };
        for f in std::mem::take(&mut self.dirty) {
            if let Some(l) = self.ledgers.get(&f) {
                let unanswered = &self.unanswered;
                self.due.insert(
                    f,
                    l.next_due_with(&policy, captures, &|o| unanswered.contains(o)),
                );
            }
        }
        let visit: std::collections::BTreeSet<FridgeId> = self
            .due
            .iter()
            .filter(|(_, d)| d.is_some_and(|d| d <= now))
            .map(|(f, _)| f.clone())
            .chain(due_failures.iter().map(|(f, _)| f.clone()))
            .collect();
        for (fridge, ledger) in self.ledgers.iter_mut().filter(|(f, _)| visit.contains(*f)) {
            let mut result: Result<(), larder_shared::ledger::LedgerError> = Ok(());
            if captures {
                for (o, record, status, _) in ledger.holding_orders() {
                    if status != larder_shared::domain::OrderStatus::Reserved
                        || record.channel != larder_shared::domain::Channel::App
                        || now < ledger::grace_end(&record, &policy)
                        || self.unanswered.contains(&o)
                    {
                        continue;
                    }
                    let provider = match &self.provider {
                        crate::payments::Capturer::Provider(requests) => {
                            // The outcome comes back by webhook; until then the order waits
                            // for it as an unanswered one (its payment timeout). Past that
                            // timeout (the hub was down) it is released below, not captured.
                            let deadline_ms =
                                ledger::grace_end(&record, &policy) + policy.payment_timeout_ms;
                            if now >= deadline_ms {
                                continue;
                            }
                            let asked = requests.try_send(crate::payments::CaptureRequest {
                                region: self.region.clone(),
                                order_id: o.clone(),
                                amount_minor: record.total_minor,
                                currency: record.payment.currency.clone(),
                                deadline_ms,
                            });
                            if asked.is_ok() {
                                self.unanswered.insert(o);
                            }
                            continue;
                        }
                        other => match other.simulated_provider() {
                            Some(p) => p,
                            None => continue,
                        },
                    };
                    let outcome =
                        match provider.capture(&o, record.total_minor, &record.payment.currency) {
                            CaptureResult::Captured => ledger::PaymentOutcome::Captured,
                            CaptureResult::Refused => ledger::PaymentOutcome::Refused,
                            CaptureResult::NoAnswer => {
                                self.unanswered.insert(o);
                                continue;
                            }
                            CaptureResult::CapturedThenFails => {
                                self.fail_later
                                    .push((now + fail_after, fridge.clone(), o.clone()));
                                ledger::PaymentOutcome::Captured
                            }
                        };
                    match ledger.record_payment(&o, outcome, &policy, now) {
                        Ok(c) => {
                            let status = match outcome {
                                ledger::PaymentOutcome::Captured => "available_for_picking",
                                ledger::PaymentOutcome::Refused => "payment_refused",
                            };
                            transitions.push(status);
                            changes.push((fridge.clone(), c));
                        }
                        Err(e) => result = Err(e),
                    }
                }
            }
            for (o, status, note) in ledger.due_transitions(&policy, now) {
                self.unanswered.remove(&o);
                match ledger.add_event(&o, status, Some(note), &ledger::hub_device(), now) {
                    Ok(c) => {
                        transitions.push(status.as_str());
                        changes.push((fridge.clone(), c));
                    }
                    Err(e) => result = Err(e),
                }
            }
            for (f, o) in due_failures.iter().filter(|(f, _)| f == fridge) {
                match ledger.add_event(
                    o,
                    larder_shared::domain::OrderStatus::PaymentFailedAfterSale,
                    Some("the payment provider reported the capture failed".into()),
                    &ledger::hub_device(),
                    now,
                ) {
                    Ok(c) => changes.push((f.clone(), c)),
                    Err(e) => result = Err(e),
                }
            }
            match ledger.repair_reservations(now) {
                Ok(Some(c)) => changes.push((fridge.clone(), c)),
                Ok(None) => {}
                Err(e) => result = Err(e),
            }
            if let Err(e) = result {
                warn!(region = %self.region, fridge = %fridge, error = %e, "applying due transitions failed");
            }
        }
        self.dirty.extend(visit);
        for status in transitions {
            if status != "available_for_picking" {
                info!(region = %self.region, status, "an app order was released");
            }
            self.metrics
                .order_transitions
                .get_or_create(&vec![
                    ("region", self.region.to_string()),
                    ("status", status.to_owned()),
                ])
                .inc();
        }
        for (fridge, c) in changes {
            self.hub_change(&fridge, c, batch);
        }
    }
}
