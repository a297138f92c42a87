//! Local actions, one handler each (refill, sale, door session, removal, cancel, temperature):
//! checked against the device's limits and idempotency keys, applied to their ledger, and recorded
//! for the outbox and the projections.

use super::*;

/// How far behind a card payment taken offline the clock may be (NTP steps, skew) before the
/// payment's age is unknown and card payments offline are refused.
const CLOCK_BACK_TOLERANCE_MS: i64 = 5 * 60_000;

/// The ledger of `fridge` among the device's, or 404 `unknown_fridge`. A function of the map
/// alone, so that the writer's other fields (its catalog, its device id) stay borrowable beside
/// it.
fn ledger_in<'a>(
    ledgers: &'a mut BTreeMap<FridgeId, Ledger>,
    fridge: &FridgeId,
) -> Result<&'a mut Ledger, CommandError> {
    ledgers
        .get_mut(fridge)
        .ok_or_else(|| CommandError::UnknownFridge(fridge.clone()))
}

/// What a local action did: the ledger change to record, if any, and the answer.
type Done = (Option<LocalChange>, Outcome);

/// The group a local action is part of: its answers so far by idempotency key, its writes,
/// its time, and whether the disk refuses new writes.
pub(super) struct LocalGroup<'a> {
    pub(super) in_group: &'a mut HashMap<String, (String, Outcome)>,
    pub(super) batch: &'a mut WriteBatch,
    pub(super) now: i64,
    pub(super) refusal: Refusal,
}

/// The id of an order this device makes (a sale, a fridge-card door session): `{device}-{n}`,
/// numbered by the outbox position its change is about to take, so unique per device and
/// persisted with the change itself. The hub refuses app orders in a device's namespace, but
/// one placed before the device was enrolled may hold that id already: then `{device}-{n}.{k}`
/// with the first free `k`, so the device goes on selling.
pub(super) fn own_order_id(
    ledger: &Ledger,
    device: &DeviceId,
    n: u64,
) -> Result<OrderId, CommandError> {
    let invalid =
        |e: larder_shared::ids::IdError| CommandError::Ledger(LedgerError::Invalid(e.to_string()));
    let mut k = 0_u64;
    loop {
        let id = match k {
            0 => format!("{device}-{n}"),
            k => format!("{device}-{n}.{k}"),
        };
        let id = OrderId::new(id).map_err(invalid)?;
        if !ledger.has_order(&id) {
            return Ok(id);
        }
        k += 1;
    }
}

impl Writer {
    /// A fridge online tops up the escrow allowance it grants the hub after its stock changed
    /// (docs/DESIGN.md, "Orders, reservations, escrow and conflicts"). Offline it never grants:
    /// the hub could not use it.
    pub(super) fn grant_escrow(
        &mut self,
        touched: &HashMap<FridgeId, usize>,
        batch: &mut WriteBatch,
        now: i64,
    ) {
        if self.role != Role::Fridge || !self.shared.online.load(Ordering::Relaxed) {
            return;
        }
        let share = self.orders.escrow_share;
        for fridge in touched.keys() {
            let Some(ledger) = self.ledgers.get_mut(fridge) else {
                continue;
            };
            match ledger.grant_escrow(share, now) {
                Ok(Some(change)) => self.record_local(&fridge.clone(), change, batch),
                Ok(None) => {}
                Err(e) => warn!(fridge = %fridge, error = %e, "granting escrow failed"),
            }
        }
    }

    pub(super) fn conflicts(&self) -> Vec<ConflictEntry> {
        let mut out = Vec::new();
        for ledger in self.ledgers.values() {
            let recorded = ledger.conflicts();
            let known: std::collections::BTreeSet<String> = recorded
                .iter()
                .map(|c| c.record.conflict_id.clone())
                .collect();
            out.extend(recorded.into_iter().map(|view| ConflictEntry {
                view,
                recorded: true,
            }));
            for record in ledger.detect_conflicts(None) {
                if !known.contains(&record.conflict_id) {
                    out.push(ConflictEntry {
                        view: larder_shared::domain::ConflictView {
                            record,
                            status: "open".into(),
                            resolution: None,
                        },
                        recorded: false,
                    });
                }
            }
        }
        out
    }

    /// Checks idempotency, applies the action to its ledger and adds its writes to the group's
    /// batch. Returns the outcome and whether the ledger changed. A retry of a request already
    /// done gets its answer even when new writes are held back.
    pub(super) fn local(
        &mut self,
        fridge: &FridgeId,
        action: Action,
        idem: Option<&Idem>,
        group: &mut LocalGroup<'_>,
    ) -> Result<(Outcome, bool), CommandError> {
        if let Some(idem) = idem
            && let Some(outcome) = self.answered_before(idem, group.in_group)?
        {
            return Ok((outcome, false));
        }
        self.room_for_local(group.refusal)?;
        if let Action::Sale { lines, .. } = &action {
            limits::sale_units_belong(&self.ledgers, fridge, lines)?;
        }
        ledger_in(&mut self.ledgers, fridge)?;
        let now = group.now;
        let (change, outcome) = match action {
            Action::Refill(refill) => self.refill(fridge, &refill, now)?,
            Action::Sale { lines, payment } => self.sell(fridge, lines, payment, now)?,
            Action::DoorSession {
                session,
                fridge_card,
            } => self.door_session(fridge, session, fridge_card, now)?,
            Action::Removal { units, reason } => {
                let change = ledger_in(&mut self.ledgers, fridge)?.remove(&units, reason, now)?;
                let units = units.len();
                let fridge_id = fridge.clone();
                (Some(change), Outcome::Removed { fridge_id, units })
            }
            Action::Cancel { order } => self.cancel(fridge, order, now)?,
            Action::Temperature { celsius, at_ms } => {
                self.temperature(fridge, celsius, at_ms, now)?
            }
        };
        let changed = change.is_some();
        if let Some(change) = change {
            self.record_local(fridge, change, group.batch);
        }
        if let Some(idem) = idem {
            let json = serde_json::to_string(&outcome).unwrap_or_default();
            group
                .batch
                .idempotency
                .push((idem.key.clone(), idem.request_sha256.clone(), json));
            group.in_group.insert(
                idem.key.clone(),
                (idem.request_sha256.clone(), outcome.clone()),
            );
        }
        if matches!(outcome, Outcome::Sold(_)) {
            self.shared.metrics.sales.inc();
        }
        Ok((outcome, changed))
    }

    /// The answer already given to this idempotency key (in this group or committed before),
    /// or 409 if the key came with another request.
    fn answered_before(
        &self,
        idem: &Idem,
        in_group: &HashMap<String, (String, Outcome)>,
    ) -> Result<Option<Outcome>, CommandError> {
        let known = match in_group.get(&idem.key) {
            Some((hash, outcome)) => Some((hash.clone(), Some(outcome.clone()))),
            None => self
                .store
                .idempotency(&idem.key)
                .map_err(|e| CommandError::Storage(e.to_string()))?
                .map(|(hash, json)| (hash, serde_json::from_str::<Outcome>(&json).ok())),
        };
        let Some((hash, outcome)) = known else {
            return Ok(None);
        };
        if hash != idem.request_sha256 {
            return Err(CommandError::IdempotencyConflict);
        }
        outcome
            .map(Some)
            .ok_or_else(|| CommandError::Storage("stored outcome unreadable".into()))
    }

    /// Refuses a new local write when the disk is down to its reserve or the outbox is full.
    fn room_for_local(&self, refusal: Refusal) -> Result<(), CommandError> {
        if let Refusal::Disk { free_bytes } = refusal {
            self.refuse("insufficient_storage");
            return Err(CommandError::InsufficientStorage {
                free_bytes,
                reserve_bytes: self.disk.reserve_bytes(),
            });
        }
        let pending = self
            .counters
            .outbox_head
            .saturating_sub(self.counters.up_acked);
        if pending >= self.limits.outbox_max_changes {
            self.refuse("outbox_full");
            return Err(CommandError::OutboxFull { pending });
        }
        Ok(())
    }

    fn refill(
        &mut self,
        fridge: &FridgeId,
        refill: &Refill,
        now: i64,
    ) -> Result<Done, CommandError> {
        limits::loads(&refill.units, &self.catalog, now).map_err(LedgerError::from)?;
        if refill.order_id.is_some() && self.role != Role::Fridge {
            return Err(LedgerError::Invalid(
                "a refill tagged with an order is made at the fridge's own agent, \
                 where the order's units are placed"
                    .into(),
            )
            .into());
        }
        let change = ledger_in(&mut self.ledgers, fridge)?.refill(refill, &self.device, now)?;
        let units = refill.units.len();
        let fridge_id = fridge.clone();
        Ok((Some(change), Outcome::Refilled { fridge_id, units }))
    }

    /// A sale; a card paid while offline is captured later, within the offline limits.
    fn sell(
        &mut self,
        fridge: &FridgeId,
        lines: Vec<SaleLine>,
        payment: Payment,
        now: i64,
    ) -> Result<Done, CommandError> {
        let offline_card = payment.method == larder_shared::domain::PaymentMethod::Card
            && !self.shared.online.load(Ordering::Relaxed);
        if offline_card {
            let count = self.uncaptured.len() as u64;
            let total: i64 = self.uncaptured.values().map(|c| c.amount_minor).sum();
            if count >= self.orders.offline_card_payments_max
                || total.saturating_add(payment.amount_minor)
                    > self.orders.offline_card_total_minor_max as i64
            {
                self.refuse("offline_limit_reached");
                return Err(CommandError::OfflineLimitReached {
                    count,
                    total_minor: total,
                });
            }
            let hours_max = self.payments.offline_hours_max;
            let oldest = self.uncaptured.values().map(|c| c.taken_at_ms).min();
            // A clock now well behind a payment it stamped (set back, or reset by a reboot
            // offline) cannot say how long the payment has waited: refused too.
            let age = oldest.map(|o| now.saturating_sub(o));
            if let Some(age) = age
                && (age > (hours_max * 3_600_000) as i64 || age < -CLOCK_BACK_TOLERANCE_MS)
            {
                self.refuse("offline_payment_too_old");
                return Err(CommandError::OfflinePaymentTooOld {
                    age_hours: age / 3_600_000,
                    hours_max,
                });
            }
        }
        let ledger = ledger_in(&mut self.ledgers, fridge)?;
        let sale = Sale {
            order_id: own_order_id(ledger, &self.device, self.counters.outbox_head + 1)?,
            channel: ledger::channel_for(self.role),
            lines,
            payment,
            payment_pending: offline_card,
        };
        let (change, view) = ledger.sell(&sale, &self.catalog, &self.device, now)?;
        if offline_card {
            self.uncaptured.insert(
                view.record.order_id.clone(),
                PendingCapture {
                    fridge: fridge.clone(),
                    order: view.record.order_id.clone(),
                    amount_minor: view.record.total_minor,
                    currency: view.record.payment.currency.clone(),
                    taken_at_ms: view.record.created_at_ms,
                },
            );
        }
        Ok((Some(change), Outcome::Sold(Box::new(view))))
    }

    /// A door session of the fridge: units taken matched to orders, units added loaded, and
    /// a card paid at the fridge's reader made into an order of its own.
    fn door_session(
        &mut self,
        fridge: &FridgeId,
        mut session: DoorSession,
        fridge_card: bool,
        now: i64,
    ) -> Result<Done, CommandError> {
        limits::loads(&session.units_added, &self.catalog, now).map_err(LedgerError::from)?;
        let ledger = ledger_in(&mut self.ledgers, fridge)?;
        if fridge_card {
            let next = self.counters.outbox_head + 1;
            session.card_order_id = Some(own_order_id(ledger, &self.device, next)?);
        }
        let (change, matches) = ledger.door_session(&session, &self.catalog, &self.device, now)?;
        let matches = matches
            .into_iter()
            .map(|(unit_id, matched)| UnitMatch { unit_id, matched })
            .collect();
        Ok((
            Some(change),
            Outcome::DoorSession {
                fridge_id: fridge.clone(),
                session_id: session.session_id,
                matches,
            },
        ))
    }

    /// A cancel asked at the device: done, or refused with the order's reason.
    fn cancel(
        &mut self,
        fridge: &FridgeId,
        order: OrderId,
        now: i64,
    ) -> Result<Done, CommandError> {
        // The grace window is on the order (the hub set it); the policy's values only stand in
        // for orders that carry none.
        let policy = ledger::OrderPolicy {
            grace_ms: 0,
            payment_timeout_ms: 0,
            pickup_hold_ms: 0,
        };
        let ledger = ledger_in(&mut self.ledgers, fridge)?;
        let (change, outcome) = ledger.cancel(&order, &self.device, &policy, now)?;
        let view = ledger
            .order(&order)
            .ok_or(CommandError::Ledger(LedgerError::UnknownOrder(order)))?;
        let refused = match outcome {
            ledger::CancelOutcome::Done(_) => None,
            ledger::CancelOutcome::Rejected(code, why) => Some((code.to_owned(), why)),
        };
        Ok((
            change,
            Outcome::Cancel {
                order: Box::new(view),
                refused,
            },
        ))
    }

    /// Takes a temperature reading. Above `max_celsius` an excursion starts (or goes on); once
    /// it has lasted `excursion_minutes`, every unit in the fridge is quarantined. A reading at
    /// or below the limit ends the excursion.
    pub(super) fn temperature(
        &mut self,
        fridge: &FridgeId,
        celsius: f64,
        at_ms: i64,
        now: i64,
    ) -> Result<(Option<LocalChange>, Outcome), CommandError> {
        let outcome = |since, quarantined| Outcome::Temperature {
            fridge_id: fridge.clone(),
            excursion_since_ms: since,
            quarantined,
        };
        // Only the fridge's own agent hears its sensor; the firmware's clock (the board's, as
        // ours is) only has to agree with ours within the configured skew, and the excursion
        // is timed on the agent's trusted clock.
        if self.role != Role::Fridge {
            return Err(LedgerError::Invalid(
                "temperature readings are taken at the fridge's own agent".into(),
            )
            .into());
        }
        let skew_ms = (self.temperature.reading_skew_seconds_max as i64).saturating_mul(1000);
        let wall = self.clock.wall_ms();
        if at_ms.abs_diff(wall) > skew_ms.unsigned_abs() {
            return Err(LedgerError::Invalid(format!(
                "at is {} s from this agent's clock; a reading may be at most {} s off \
                 (temperature.reading_skew_seconds_max)",
                at_ms.saturating_sub(wall) / 1000,
                self.temperature.reading_skew_seconds_max
            ))
            .into());
        }
        let at_ms = now;
        if celsius <= self.temperature.max_celsius {
            self.excursions.remove(fridge);
            return Ok((None, outcome(None, Vec::new())));
        }
        // An excursion is readings above the limit one after another: a silence longer than
        // two excursion windows (no readings, or the trusted clock jumping ahead when a board
        // without a real-time clock hears its first time beacon) or a clock going back starts
        // it over, rather than counting the gap as time spent warm.
        let window_ms = (self.temperature.excursion_minutes as i64) * 60_000;
        if self
            .excursions
            .get(fridge)
            .is_some_and(|e| at_ms < e.3 || at_ms - e.3 > 2 * window_ms)
        {
            self.excursions.remove(fridge);
        }
        let e = self
            .excursions
            .entry(fridge.clone())
            .or_insert((at_ms, celsius, false, at_ms));
        e.1 = e.1.max(celsius);
        e.3 = at_ms;
        let (since, peak, done, _) = *e;
        let due = at_ms - since >= window_ms;
        if done || !due {
            return Ok((None, outcome(Some(since), Vec::new())));
        }
        let incident = larder_shared::domain::Incident {
            kind: "temperature_excursion".into(),
            fridge_id: fridge.clone(),
            since_ms: since,
            at_ms,
            max_celsius: self.temperature.max_celsius,
            peak_celsius: peak,
            units: Vec::new(),
            units_total: None,
            by: self.device.clone(),
        };
        let ledger = self
            .ledgers
            .get_mut(fridge)
            .ok_or_else(|| CommandError::UnknownFridge(fridge.clone()))?;
        let (change, units) = ledger.quarantine(&incident, now)?;
        if let Some(e) = self.excursions.get_mut(fridge) {
            e.2 = true;
        }
        warn!(fridge = %fridge, since_ms = since, peak_celsius = peak, units = units.len(),
            "temperature excursion: the fridge's units are quarantined");
        Ok((Some(change), outcome(Some(since), units)))
    }

    pub(super) fn record_local(
        &mut self,
        fridge: &FridgeId,
        change: LocalChange,
        batch: &mut WriteBatch,
    ) {
        let epoch = self.ledgers.get(fridge).map_or(0, Ledger::epoch);
        for bytes in change.changes {
            self.push_outbox(fridge, epoch, bytes, None, batch);
        }
        batch
            .units
            .extend(change.units.into_iter().map(|u| (fridge.clone(), u)));
        batch.orders.extend(change.orders);
    }

    /// Stages a change at the outbox's head, linked into the audit chain: one of the device's,
    /// or one of the hub's it gives back (with the hub's signature).
    pub(super) fn push_outbox(
        &mut self,
        fridge: &FridgeId,
        epoch: u32,
        bytes: Vec<u8>,
        hub_sig: Option<Vec<u8>>,
        batch: &mut WriteBatch,
    ) {
        self.counters.outbox_head += 1;
        let seq = self.counters.outbox_head;
        let prev = self.counters.chain_head;
        let hash = larder_shared::audit::entry_hash(
            &prev,
            &self.device,
            seq,
            fridge,
            epoch,
            &larder_shared::audit::change_digest(&bytes),
        );
        self.counters.chain_head = hash;
        batch.changes.push(ChangeRow {
            fridge: fridge.clone(),
            epoch,
            outbox_seq: Some(seq),
            chain: Some((prev, hash)),
            bytes,
            hub_sig,
        });
    }

    pub(super) fn project(&self, fridge: &FridgeId, touched: &Touched, batch: &mut WriteBatch) {
        let Some(ledger) = self.ledgers.get(fridge) else {
            return;
        };
        for unit in &touched.units {
            // Expiry is applied when reading, so project with the earliest time.
            if let Some(view) = ledger.unit(unit, i64::MIN) {
                batch.units.push((fridge.clone(), view));
            }
        }
        for order in &touched.orders {
            if let Some(view) = ledger.order(order) {
                batch.orders.push(view);
            }
        }
    }
}
