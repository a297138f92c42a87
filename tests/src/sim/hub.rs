//! The simulated hub side of the week: syncs between devices and the hub, escrow grants,
//! refills, subscriptions' schedules, the hub's tick, and the settling at the end.

use super::*;

impl Sim {
    /// Exchanges changes between an online device and the hub, as the uplink and downlink
    /// streams do: the device's new changes up (merged, then the hub's own follow-ups), the
    /// hub's log down, a time beacon, and the fridge's escrow grant once it is online.
    pub(super) fn sync(&mut self, d: usize, t: i64) -> Result<(), String> {
        if !self.devices[d].online {
            return Ok(());
        }
        let seed = self.cfg.seed;
        self.devices[d].beacon = Some((t, t));
        let new: Vec<(usize, Vec<u8>)> = self.devices[d].own[self.devices[d].sent..].to_vec();
        self.devices[d].sent = self.devices[d].own.len();
        let mut touched: BTreeMap<usize, Touched> = BTreeMap::new();
        for (f, bytes) in new {
            let tch = self.hub.ledgers[f]
                .apply_changes(std::slice::from_ref(&bytes))
                .or_else(|e| fail(seed, format!("hub merge: {e}")))?;
            self.hub.log[f].push(bytes);
            touched.entry(f).or_default().extend(tch);
        }
        let is_fridge = self.devices[d].is_fridge;
        for (f, tch) in touched {
            let (changes, _) = self.hub.ledgers[f]
                .hub_after_merge(&tch, is_fridge, None, t)
                .or_else(|e| fail(seed, format!("after merge: {e}")))?;
            for c in changes {
                self.hub_record(f, c);
            }
            let granted = self.hub.ledgers[f].granted_all();
            if self.hub.grants[f].last().is_none_or(|(_, g)| g != &granted) {
                let at = self.hub.log[f].len();
                self.hub.grants[f].push((at, granted));
            }
        }
        let fridges = self.devices[d].fridges.clone();
        for f in fridges {
            let from = self.devices[d].cursor[&f];
            let down: Vec<Vec<u8>> = self.hub.log[f][from..].to_vec();
            // As the agent does: the fridge tops its grant up after its stock changed.
            let changed =
                !down.is_empty() || self.devices[d].own.len() > self.devices[d].granted_at;
            if !down.is_empty() {
                self.devices[d]
                    .ledgers
                    .get_mut(&f)
                    .ok_or_else(|| format!("seed {seed}: no ledger"))?
                    .apply_changes(&down)
                    .or_else(|e| fail(seed, format!("device merge: {e}")))?;
            }
            self.devices[d].cursor.insert(f, self.hub.log[f].len());
            if is_fridge && changed {
                let now = self.devices[d].now(t);
                let dev = &mut self.devices[d];
                if let Some(l) = dev.ledgers.get_mut(&f)
                    && let Some(c) = l
                        .grant_escrow(ESCROW_SHARE, now)
                        .map_err(|e| e.to_string())?
                {
                    dev.record(f, c);
                }
                dev.granted_at = dev.own.len();
            }
        }
        // Card payments taken offline are captured now.
        let pending = std::mem::take(&mut self.devices[d].uncaptured);
        for (f, order) in pending {
            let status = match self.provider.capture(&order, 0, "EUR") {
                CaptureResult::Captured => OrderStatus::PaymentCaptured,
                CaptureResult::NoAnswer => {
                    self.devices[d].uncaptured.push((f, order));
                    continue;
                }
                _ => OrderStatus::PaymentFailedAfterSale,
            };
            let now = self.devices[d].now(t);
            let dev = &mut self.devices[d];
            let id = dev.id.clone();
            if let Some(l) = dev.ledgers.get_mut(&f) {
                let c = l
                    .add_event(&order, status, None, &id, now)
                    .map_err(|e| e.to_string())?;
                dev.record(f, c);
            }
        }
        Ok(())
    }

    /// The grants of fridge `f` every POS serving it has received.
    pub(super) fn usable_grants(&self, f: usize) -> BTreeMap<Sku, i64> {
        let min = self
            .devices
            .iter()
            .filter(|d| !d.is_fridge && d.fridges.contains(&f))
            .map(|d| d.cursor[&f])
            .min()
            .unwrap_or(usize::MAX);
        self.hub.grants[f]
            .iter()
            .rev()
            .find(|(at, _)| *at <= min)
            .map(|(_, g)| g.clone())
            .unwrap_or_default()
    }

    pub(super) fn refills(&mut self, t: i64, day: i64) -> Result<(), String> {
        for f in 0..self.cfg.fridges {
            let mut units = Vec::new();
            for (s, life, _) in SKUS {
                let n = self.rng.below(5);
                for k in 0..n {
                    units.push(RefillUnit {
                        unit_id: UnitId::new(format!("u{f}-d{day}-{s}-{k}"))
                            .map_err(|e| e.to_string())?,
                        sku: sku(s),
                        expires_at_ms: t + life,
                        batch: None,
                    });
                }
            }
            let dev = &mut self.devices[f];
            let now = dev.now(t);
            let id = dev.id.clone();
            if !units.is_empty()
                && let Some(l) = dev.ledgers.get_mut(&f)
            {
                let c = l
                    .refill(
                        &Refill {
                            units,
                            order_id: None,
                        },
                        &id,
                        now,
                    )
                    .map_err(|e| e.to_string())?;
                dev.record(f, c);
            }
            // The subscribers' meals for today, tagged with their orders.
            let dispatched: Vec<(OrderId, Vec<(Sku, u32)>)> = self.hub.ledgers[f]
                .holding_orders()
                .into_iter()
                .filter(|(_, _, s, _)| *s == OrderStatus::Dispatched)
                .map(|(o, r, _, _)| {
                    (
                        o,
                        r.lines
                            .iter()
                            .map(|l| (l.sku.clone(), l.quantity))
                            .collect(),
                    )
                })
                .collect();
            for (order, lines) in dispatched {
                let mut units = Vec::new();
                for (s, q) in lines {
                    let life = SKUS.iter().find(|x| x.0 == s.as_str()).map_or(DAY, |x| x.1);
                    for k in 0..q {
                        units.push(RefillUnit {
                            unit_id: UnitId::new(format!("m-{order}-{k}-{s}"))
                                .map_err(|e| e.to_string())?,
                            sku: s.clone(),
                            expires_at_ms: t + life,
                            batch: None,
                        });
                    }
                }
                let dev = &mut self.devices[f];
                let now = dev.now(t);
                let id = dev.id.clone();
                if let Some(l) = dev.ledgers.get_mut(&f) {
                    match l.refill(
                        &Refill {
                            units,
                            order_id: Some(order),
                        },
                        &id,
                        now,
                    ) {
                        Ok(c) => dev.record(f, c),
                        Err(ledger::LedgerError::UnitExists(_)) => {}
                        Err(e) => return fail(self.cfg.seed, format!("tagged refill: {e}")),
                    }
                }
            }
        }
        Ok(())
    }

    /// At the cut-off the next day's occurrences become orders.
    pub(super) fn schedule(&mut self, t: i64, day: i64) -> Result<(), String> {
        let weekday = day.rem_euclid(7) as u8;
        for (n, (f, s, days)) in self.subscribers.clone().into_iter().enumerate() {
            if days & (1 << weekday) == 0 {
                continue;
            }
            let order = AppOrder {
                order_id: OrderId::new(format!("sub-{n}-d{day}")).map_err(|e| e.to_string())?,
                customer_id: format!("subscriber-{n}"),
                channel: Channel::Subscription,
                lines: vec![AppOrderLine {
                    sku: sku(s),
                    quantity: 1,
                }],
                subscription_id: Some(format!("sub-{n}")),
            };
            let (c, _) = self.hub.ledgers[f]
                .schedule_order(&order, &format!("day-{day}"), &self.catalog, t)
                .map_err(|e| e.to_string())?;
            self.hub_record(f, c);
            self.report.subscription_orders += 1;
        }
        Ok(())
    }

    /// What time makes due at the hub: captures after the grace window, timeouts, no-shows,
    /// late payment failures, reservations on expired units.
    pub(super) fn hub_tick(&mut self, t: i64) -> Result<(), String> {
        for f in 0..self.cfg.fridges {
            let mut changes = Vec::new();
            let l = &mut self.hub.ledgers[f];
            for (o, record, status, _) in l.holding_orders() {
                if status != OrderStatus::Reserved
                    || record.channel != Channel::App
                    || t < ledger::grace_end(&record, &self.policy)
                    || self.unanswered.contains(&o)
                {
                    continue;
                }
                let outcome = match self.provider.capture(&o, record.total_minor, "EUR") {
                    CaptureResult::Captured => PaymentOutcome::Captured,
                    CaptureResult::Refused => PaymentOutcome::Refused,
                    CaptureResult::NoAnswer => {
                        self.unanswered.insert(o);
                        continue;
                    }
                    CaptureResult::CapturedThenFails => {
                        self.fail_later.push((t + HOUR, f, o.clone()));
                        PaymentOutcome::Captured
                    }
                };
                changes.push(
                    l.record_payment(&o, outcome, &self.policy, t)
                        .map_err(|e| e.to_string())?,
                );
            }
            for (o, status, note) in l.due_transitions(&self.policy, t) {
                changes.push(
                    l.add_event(&o, status, Some(note), &ledger::hub_device(), t)
                        .map_err(|e| e.to_string())?,
                );
            }
            changes.extend(l.repair_reservations(t).map_err(|e| e.to_string())?);
            for c in changes {
                self.hub_record(f, c);
            }
        }
        let due: Vec<(i64, usize, OrderId)> = self
            .fail_later
            .iter()
            .filter(|(at, _, _)| *at <= t)
            .cloned()
            .collect();
        self.fail_later.retain(|(at, _, _)| *at > t);
        for (_, f, o) in due {
            let c = self.hub.ledgers[f]
                .add_event(
                    &o,
                    OrderStatus::PaymentFailedAfterSale,
                    None,
                    &ledger::hub_device(),
                    t,
                )
                .map_err(|e| e.to_string())?;
            self.hub_record(f, c);
        }
        Ok(())
    }

    /// Brings every device back online and syncs until nothing moves.
    pub(super) fn settle(&mut self, t: i64) -> Result<(), String> {
        for d in &mut self.devices {
            d.online = true;
        }
        for _ in 0..20 {
            let before: usize = self.hub.log.iter().map(Vec::len).sum::<usize>()
                + self.devices.iter().map(|d| d.own.len()).sum::<usize>();
            for d in 0..self.devices.len() {
                self.sync(d, t)?;
            }
            self.hub_tick(t)?;
            for d in 0..self.devices.len() {
                self.sync(d, t)?;
            }
            let after: usize = self.hub.log.iter().map(Vec::len).sum::<usize>()
                + self.devices.iter().map(|d| d.own.len()).sum::<usize>();
            if before == after {
                return Ok(());
            }
        }
        fail(
            self.cfg.seed,
            "the region did not settle in 20 rounds".into(),
        )
    }
}
