//! The simulated devices: local sales, the uplink stream they pump, and what they make of the
//! hub's envelopes.

use super::*;

impl World {
    pub(super) fn dev_restart_now(&mut self, d: usize) {
        let dev = &self.devs[d];
        let mut ledgers = BTreeMap::new();
        for f in &dev.fridges {
            // A replica that fails to load from its own disk is a bug the final check reports
            // as a missing ledger.
            if let Ok(l) = Ledger::load(
                fridge_id(*f),
                ledger::actor_for(&dev.id),
                None,
                dev.disk.changes.get(f).map_or(&[][..], |c| c.as_slice()),
            ) {
                ledgers.insert(*f, l);
            }
        }
        let limits = SenderLimits {
            batch_entries_max: 8,
            batch_bytes_max: 64 * 1024,
            inflight_entries_max: 32,
            inflight_bytes_max: usize::MAX,
            retransmit_after_ms: 5 * SECOND,
        };
        self.devs[d].mem = Some(DevMem {
            ledgers,
            sender: StreamSender::new(dev.disk.acked, limits),
            receiver: StreamReceiver::new(dev.disk.down_hwm),
            seqs: SeqAllocator::resume(dev.disk.seq_reserved, 16),
            connected: false,
        });
        self.try_connect(d);
    }

    /// A local action: a fridge restocks when it runs low, otherwise someone buys a meal.
    ///
    /// One piece: one arm per local action a device draws.
    pub(super) fn act(&mut self, d: usize) -> Result<(), String> {
        let seed = self.cfg.seed;
        let dev_now = self.dev_clock(d);
        let f = {
            let fr = &self.devs[d].fridges;
            fr[self.rng.below(fr.len() as u64) as usize]
        };
        let (s, price) = SKUS[self.rng.below(SKUS.len() as u64) as usize];
        let hostile = if self.rng.chance(HOSTILE_SHARE) {
            match self.hostile_act(d, f, dev_now)? {
                Some(change) => Some(change),
                None => return Ok(()),
            }
        } else {
            None
        };
        let restock = self.devs[d].is_fridge && {
            let Some(m) = self.devs[d].mem.as_ref() else {
                return Ok(());
            };
            m.ledgers
                .get(&f)
                .is_none_or(|l| l.free_units(&sku(s), dev_now).len() < 2)
        };
        let dev = &mut self.devs[d];
        let Some(m) = dev.mem.as_mut() else {
            return Ok(());
        };
        let Some(l) = m.ledgers.get_mut(&f) else {
            return fail(seed, format!("{} lost its ledger {f}", dev.id));
        };
        let change = if let Some(change) = hostile {
            change
        } else if restock {
            let units = (0..4)
                .map(|_| {
                    dev.units += 1;
                    RefillUnit {
                        unit_id: UnitId::new(format!("u-{}-{}", dev.id, dev.units))
                            .unwrap_or_else(|_| unreachable!()),
                        sku: sku(s),
                        expires_at_ms: T0 + 30 * DAY,
                        batch: None,
                    }
                })
                .collect();
            let refill = Refill {
                units,
                order_id: None,
            };
            match l.refill(&refill, &dev.id, dev_now) {
                Ok(c) => c,
                Err(e) => return fail(seed, format!("{} refill refused: {e}", dev.id)),
            }
        } else {
            dev.orders += 1;
            let order_id = OrderId::new(format!("{}-{}", dev.id, dev.orders))
                .unwrap_or_else(|_| unreachable!());
            let sale = Sale {
                order_id: order_id.clone(),
                channel: if dev.is_fridge {
                    Channel::Fridge
                } else {
                    Channel::Pos
                },
                lines: vec![SaleLine {
                    sku: sku(s),
                    unit_id: None,
                    quantity: 1,
                }],
                payment: Payment {
                    method: if dev.is_fridge {
                        PaymentMethod::FridgeCard
                    } else {
                        PaymentMethod::Cash
                    },
                    amount_minor: price,
                    currency: "EUR".into(),
                },
                payment_pending: false,
            };
            match l.sell(&sale, &self.catalog, &dev.id, dev_now) {
                Ok((c, _)) => {
                    dev.sales
                        .push((order_id, digest(c.changes.last().expect("a change"))));
                    c
                }
                // Nothing of that sku here, as this replica sees it: the customer is told no.
                Err(_) => return Ok(()),
            }
        };
        // Durable before acknowledged: the change and its outbox entry are on disk at once.
        // Streams may skip numbers.
        for bytes in change.changes {
            let seq = dev.disk.head + 1 + u64::from(self.rng.chance(0.1));
            let entry = Entry {
                seq,
                ledger: fridge_id(f),
                epoch: 0,
                kind: Default::default(),
                prev: None,
                change: bytes.clone(),
                hub_sig: None,
            };
            dev.disk.changes.entry(f).or_default().push(bytes);
            dev.disk.outbox.push(entry);
            dev.disk.head = seq;
            self.report.local_changes += 1;
        }
        self.dev_pump(d);
        Ok(())
    }

    pub(super) fn dev_seal(&mut self, d: usize, body: Body) -> Option<Vec<u8>> {
        let sent_at_ms = self.dev_clock(d);
        let dev = &mut self.devs[d];
        let m = dev.mem.as_mut()?;
        let (seq, reserve) = m.seqs.allocate();
        if let Some(r) = reserve {
            dev.disk.seq_reserved = r;
        }
        if !self.signed.insert((d, seq)) {
            self.violation = Some(format!("{} signed envelope seq {seq} twice", dev.id));
        }
        let env = Envelope {
            header: Header {
                region: self.region.clone(),
                sender: Party::Device(dev.id.clone()),
                recipient: Party::Hub,
                seq,
                sent_at_ms,
            },
            body,
        };
        env.seal_to(&dev.key, &dev.hub_box)
    }

    /// Sends what the device's sender allows, as the agent's sync loop does.
    pub(super) fn dev_pump(&mut self, d: usize) {
        // A revoked device's envelopes keep arriving for a while (see `try_connect`); then it
        // is cut off for good.
        if self.devs[d]
            .revoked_at
            .is_some_and(|at| self.now - at > ROGUE_MS)
        {
            if let Some(m) = self.devs[d].mem.as_mut()
                && m.connected
            {
                m.connected = false;
                m.sender.on_disconnected();
            }
            return;
        }
        loop {
            let dev = &self.devs[d];
            let Some(m) = dev.mem.as_ref() else { return };
            if !m.connected {
                return;
            }
            let Some(window) = m.sender.poll_send(dev.disk.head) else {
                break;
            };
            let entries: Vec<Entry> = dev
                .disk
                .outbox
                .iter()
                .filter(|e| e.seq > window.after)
                .take(window.entries_max as usize)
                .cloned()
                .collect();
            let Some(batch) = build_batch(window, entries, dev.disk.head) else {
                break;
            };
            if batch.entries.iter().any(|e| e.kind == EntryKind::Withheld) {
                self.violation = Some(format!(
                    "seed {}: {} withheld a change too large for a message",
                    self.cfg.seed, dev.id
                ));
            }
            let up_to = batch.up_to;
            let Some(bytes) = self.dev_seal(d, Body::Changes(batch)) else {
                break;
            };
            if let Some(m) = self.devs[d].mem.as_mut() {
                m.sender.on_sent(up_to, bytes.len());
            }
            self.send(true, d, bytes, true);
        }
        let in_flight = self.devs[d]
            .mem
            .as_ref()
            .is_some_and(|m| m.connected && m.sender.sent_up_to() > m.sender.acked());
        if in_flight && !self.devs[d].tick_scheduled {
            self.devs[d].tick_scheduled = true;
            self.schedule(TICK_MS, Ev::DevTick(d));
        }
    }

    pub(super) fn dev_refuse(
        &mut self,
        reason: &'static str,
        honest: bool,
        d: usize,
    ) -> Result<(), String> {
        *self.report.device_refused.entry(reason).or_default() += 1;
        if honest {
            return fail(
                self.cfg.seed,
                format!("{} refused an honest envelope: {reason}", self.devs[d].id),
            );
        }
        Ok(())
    }

    /// One piece: the device's checks of a hub envelope, in order, then one arm per body kind.
    pub(super) fn dev_receive(
        &mut self,
        d: usize,
        bytes: &[u8],
        honest: bool,
    ) -> Result<(), String> {
        let seed = self.cfg.seed;
        if !self.devs[d].link_up || self.devs[d].mem.is_none() {
            self.report.dropped += 1;
            return Ok(());
        }
        let opened = match envelope::open(bytes, MAX_MESSAGE_BYTES) {
            Ok(o) => o,
            Err(e) => return self.dev_refuse(e.reason(), honest, d),
        };
        let h = opened.header().clone();
        if h.region != self.region
            || h.sender != Party::Hub
            || h.recipient != Party::Device(self.devs[d].id.clone())
        {
            return self.dev_refuse("wrong_party", honest, d);
        }
        let env = match opened
            .verify(bytes, &self.hub_public)
            .and_then(|v| v.open_sealed(&[&self.devs[d].hub_box]))
        {
            Ok(env) => env,
            Err(e) => return self.dev_refuse(e.reason(), honest, d),
        };
        match env.body {
            Body::Ack(ack) => {
                let now = self.dev_clock(d);
                let dev = &mut self.devs[d];
                let Some(m) = dev.mem.as_mut() else {
                    return Ok(());
                };
                if let Some(up_to) = m.sender.on_ack(ack, now) {
                    if up_to > self.hub_disk.progress[d].up_hwm {
                        return fail(
                            seed,
                            format!(
                                "{} told the hub has up to {up_to}, the hub's disk has {}",
                                dev.id, self.hub_disk.progress[d].up_hwm
                            ),
                        );
                    }
                    dev.disk.acked = up_to;
                    if dev.up_waiting_since.is_some() {
                        dev.up_waiting_since = Some(self.now);
                    }
                }
                self.dev_pump(d);
            }
            Body::Changes(batch) => {
                let dev = &mut self.devs[d];
                let Some(m) = dev.mem.as_mut() else {
                    return Ok(());
                };
                let gap = match m.receiver.on_batch(batch) {
                    Receipt::Apply { entries, up_to } => {
                        let mut by_ledger: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
                        for e in entries {
                            if !dev.applied_down.insert(e.seq) {
                                return fail(
                                    seed,
                                    format!("{} applied downlink entry {} twice", dev.id, e.seq),
                                );
                            }
                            let Some(f) = dev
                                .fridges
                                .iter()
                                .copied()
                                .find(|f| fridge_id(*f) == e.ledger)
                            else {
                                return fail(
                                    seed,
                                    format!("{} got a change of a ledger it does not hold", dev.id),
                                );
                            };
                            by_ledger.entry(f).or_default().push(e.change);
                        }
                        for (f, changes) in by_ledger {
                            let Some(l) = m.ledgers.get_mut(&f) else {
                                return fail(seed, format!("{} lost its ledger", dev.id));
                            };
                            if let Err(e) = l.apply_changes(&changes) {
                                return fail(seed, format!("{} merge refused: {e}", dev.id));
                            }
                            // Committed before acknowledged.
                            dev.disk.changes.entry(f).or_default().extend(changes);
                        }
                        dev.disk.down_hwm = up_to;
                        m.receiver.on_committed(up_to);
                        false
                    }
                    Receipt::Duplicate => false,
                    Receipt::Gap => true,
                    Receipt::Malformed => return self.dev_refuse("malformed", honest, d),
                };
                let ack = self.devs[d].mem.as_ref().map(|m| m.receiver.ack(gap));
                if let Some(ack) = ack
                    && let Some(bytes) = self.dev_seal(d, Body::Ack(ack))
                {
                    self.send(true, d, bytes, true);
                }
            }
            _ => return self.dev_refuse("unexpected_kind", honest, d),
        }
        Ok(())
    }
}
