//! The simulated customers and kitchen: walk-up sales, app orders, pickups at the door,
//! scheduled orders dispatched, and conflicts resolved.

use super::*;

impl Sim {
    pub(super) fn dispatch(&mut self, t: i64) -> Result<(), String> {
        for f in 0..self.cfg.fridges {
            let scheduled: Vec<OrderId> = self.hub.ledgers[f]
                .order_ids()
                .into_iter()
                .filter(|o| self.hub.ledgers[f].status(o) == Some(OrderStatus::Scheduled))
                .collect();
            for o in scheduled {
                let c = self.hub.ledgers[f]
                    .dispatch(&o, t)
                    .map_err(|e| e.to_string())?;
                self.hub_record(f, c);
            }
        }
        Ok(())
    }

    pub(super) fn walk_ups(&mut self, t: i64) -> Result<(), String> {
        for d in 0..self.devices.len() {
            let p = if self.devices[d].is_fridge {
                0.06
            } else {
                0.08
            };
            if !self.rng.chance(p) {
                continue;
            }
            let fridges = self.devices[d].fridges.clone();
            let f = fridges[self.rng.below(fridges.len() as u64) as usize];
            let (s, _, price) = SKUS[self.rng.below(SKUS.len() as u64) as usize];
            let now = self.devices[d].now(t);
            // A POS cashier mostly scans a unit the POS believes is in the fridge.
            let scan = if self.devices[d].is_fridge || self.rng.chance(0.3) {
                None
            } else {
                let free = self.devices[d].ledgers[&f].free_units(&sku(s), now);
                if free.is_empty() {
                    None
                } else {
                    Some(free[self.rng.below(free.len() as u64) as usize].clone())
                }
            };
            let card = self.rng.chance(0.6);
            let offline_card = card && !self.devices[d].is_fridge && !self.devices[d].online;
            if offline_card && self.devices[d].uncaptured.len() >= OFFLINE_CARD_MAX {
                self.report.walk_up_refused += 1;
                continue;
            }
            let dev = &mut self.devices[d];
            let order_id = dev.order_id();
            let id = dev.id.clone();
            let sale = Sale {
                order_id: order_id.clone(),
                channel: if dev.is_fridge {
                    Channel::Fridge
                } else {
                    Channel::Pos
                },
                lines: vec![SaleLine {
                    sku: sku(s),
                    unit_id: scan,
                    quantity: 1,
                }],
                payment: Payment {
                    method: if dev.is_fridge {
                        PaymentMethod::FridgeCard
                    } else if card {
                        PaymentMethod::Card
                    } else {
                        PaymentMethod::Cash
                    },
                    amount_minor: price,
                    currency: "EUR".into(),
                },
                payment_pending: offline_card,
            };
            let Some(l) = dev.ledgers.get_mut(&f) else {
                continue;
            };
            match l.sell(&sale, &self.catalog, &id, now) {
                Ok((c, view)) => {
                    dev.record(f, c);
                    if offline_card {
                        dev.uncaptured.push((f, order_id.clone()));
                    }
                    self.report.walk_up_sales += 1;
                    let units: Vec<UnitId> = view
                        .record
                        .lines
                        .iter()
                        .flat_map(|l| l.unit_ids.clone())
                        .collect();
                    self.sold(&order_id, units);
                }
                Err(_) => self.report.walk_up_refused += 1,
            }
        }
        Ok(())
    }

    pub(super) fn app_orders(&mut self, t: i64) -> Result<(), String> {
        for f in 0..self.cfg.fridges {
            if !self.rng.chance(0.02) {
                continue;
            }
            // Beyond the escrow only while every device selling from the fridge is online.
            let online = self
                .devices
                .iter()
                .filter(|d| d.fridges.contains(&f))
                .all(|d| d.online);
            let usable = (!online).then(|| self.usable_grants(f));
            let quantity = 1 + self.rng.below(2) as u32;
            let order = AppOrder {
                order_id: OrderId::new(self.fresh("app")).map_err(|e| e.to_string())?,
                customer_id: format!("customer-{}", self.rng.below(500)),
                channel: Channel::App,
                lines: vec![AppOrderLine {
                    sku: sku(APP_SKU),
                    quantity,
                }],
                subscription_id: None,
            };
            let before = usable.as_ref().map(|g| {
                self.hub.ledgers[f]
                    .allowance_with(&sku(APP_SKU), g.get(&sku(APP_SKU)).copied().unwrap_or(0))
            });
            match self.hub.ledgers[f].place_order(
                &order,
                &self.catalog,
                usable.as_ref(),
                &self.policy,
                t,
            ) {
                Ok((c, _)) => {
                    self.hub_record(f, c);
                    self.report.app_orders += 1;
                    if let Some(before) = before {
                        self.report.escrow_orders += 1;
                        if before < i64::from(quantity) {
                            return fail(
                                self.cfg.seed,
                                format!(
                                    "{} confirmed beyond the escrow ({before} < {quantity})",
                                    order.order_id
                                ),
                            );
                        }
                    }
                    self.apps.push(AppRecord {
                        fridge: f,
                        order: order.order_id.clone(),
                        escrow: !online,
                    });
                    // 3 % are cancelled within seconds.
                    if self.rng.chance(0.03) {
                        let (c, _) = self.hub.ledgers[f]
                            .cancel(
                                &order.order_id,
                                &ledger::hub_device(),
                                &self.policy,
                                t + 5_000,
                            )
                            .map_err(|e| e.to_string())?;
                        if let Some(c) = c {
                            self.hub_record(f, c);
                        }
                    }
                }
                Err(ledger::LedgerError::InsufficientStock { .. }) => self.report.app_refused += 1,
                Err(e) => return fail(self.cfg.seed, format!("placing an order: {e}")),
            }
        }
        Ok(())
    }

    /// Customers come for ready orders; now and then a walk-up customer takes a subscriber's
    /// tagged meal at the fridge with their card.
    pub(super) fn pickups(&mut self, t: i64) -> Result<(), String> {
        for f in 0..self.cfg.fridges {
            let ready: Vec<(OrderId, Vec<(Sku, u32)>)> = self.hub.ledgers[f]
                .holding_orders()
                .into_iter()
                .filter(|(_, _, s, _)| *s == OrderStatus::AvailableForPicking)
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
            for (order, lines) in ready {
                // Now and then the customer cancels a paid order: a refund, or, if the
                // fridge saw a pickup the hub has not, a race the pickup wins.
                if self.rng.chance(0.03) {
                    let (c, _) = self.hub.ledgers[f]
                        .cancel(&order, &ledger::hub_device(), &self.policy, t)
                        .map_err(|e| e.to_string())?;
                    if let Some(c) = c {
                        self.hub_record(f, c);
                    }
                    continue;
                }
                if !self.rng.chance(0.4) {
                    continue;
                }
                let dev = &mut self.devices[f];
                let now = dev.now(t);
                let l = &dev.ledgers[&f];
                let mut taken: Vec<UnitId> = l
                    .order(&order)
                    .map(|v| v.reserved_units)
                    .unwrap_or_default();
                if taken.is_empty() {
                    for (s, q) in &lines {
                        taken.extend(l.free_units(s, now).into_iter().take(*q as usize));
                    }
                }
                if taken.is_empty() {
                    continue;
                }
                self.next_id += 1;
                let session = DoorSession {
                    session_id: format!("door-{}", self.next_id),
                    units_taken: taken,
                    units_added: vec![],
                    order_id: Some(order.clone()),
                    card_order_id: None,
                };
                self.door(f, &session, t)?;
                self.report.pickups += 1;
            }
            if self.rng.chance(0.015) {
                let l = &self.devices[f].ledgers[&f];
                let held: Vec<UnitId> = l
                    .units(self.devices[f].now(t))
                    .into_iter()
                    .filter(|u| {
                        u.state == larder_shared::domain::UnitState::Reserved
                            && u.facts.sku.as_str() != APP_SKU
                    })
                    .map(|u| u.unit_id)
                    .collect();
                if let Some(u) = held.first() {
                    let card = self.devices[f].order_id();
                    self.next_id += 1;
                    let session = DoorSession {
                        session_id: format!("door-{}", self.next_id),
                        units_taken: vec![u.clone()],
                        units_added: vec![],
                        order_id: None,
                        card_order_id: Some(card),
                    };
                    self.door(f, &session, t)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn door(&mut self, f: usize, session: &DoorSession, t: i64) -> Result<(), String> {
        let dev = &mut self.devices[f];
        let now = dev.now(t);
        let id = dev.id.clone();
        let Some(l) = dev.ledgers.get_mut(&f) else {
            return Ok(());
        };
        match l.door_session(session, &self.catalog, &id, now) {
            Ok((c, matches)) => {
                dev.record(f, c);
                for (u, m) in matches {
                    if let TakenMatch::FridgeCard { order_id } = m {
                        self.sold(&order_id, [u]);
                    }
                }
                Ok(())
            }
            Err(ledger::LedgerError::UnitNotAvailable { .. }) => Ok(()),
            Err(e) => fail(self.cfg.seed, format!("door session: {e}")),
        }
    }

    /// The kitchen resolves an open conflict now and then.
    pub(super) fn resolve(&mut self, t: i64) -> Result<(), String> {
        if !self.rng.chance(0.05) {
            return Ok(());
        }
        let f = self.rng.below(self.cfg.fridges as u64) as usize;
        let open: Vec<String> = self.hub.ledgers[f]
            .conflicts()
            .into_iter()
            .filter(|c| c.status == "open")
            .map(|c| c.record.conflict_id)
            .collect();
        let Some(id) = open.first() else {
            return Ok(());
        };
        let action = if self.rng.chance(0.7) {
            ResolutionAction::Refund
        } else {
            ResolutionAction::Dismiss
        };
        let res = Resolution {
            action,
            by: "kitchen".into(),
            at_ms: t,
            note: None,
            unit_id: None,
        };
        let (c, _) = self.hub.ledgers[f]
            .resolve(id, &res, t)
            .map_err(|e| e.to_string())?;
        self.hub_record(f, c);
        Ok(())
    }
}
