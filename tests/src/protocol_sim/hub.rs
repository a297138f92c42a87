//! The simulated hub: admission by the region writer's own rules, group commits, the downlink
//! pump, revocations, restarts and crashes.

use super::*;

/// The simulated region as admission judges an envelope by it: every ledger in its first
/// epoch, and a device's downlink committed up to `down_head`.
pub(super) struct SimRegion {
    down_head: u64,
    hub_key: larder_shared::PublicKey,
}

impl admission::Region for SimRegion {
    fn epoch(&self, _ledger: &FridgeId) -> Option<u32> {
        Some(0)
    }

    fn down_head(&self) -> u64 {
        self.down_head
    }

    fn hub_key(&self) -> larder_shared::PublicKey {
        self.hub_key
    }
}

impl World {
    pub(super) fn hub_restart_now(&mut self) {
        let mut ledgers = Vec::new();
        for f in 0..self.cfg.fridges {
            let changes: Vec<Vec<u8>> = self
                .hub_disk
                .log
                .iter()
                .filter(|r| r.ledger == f)
                .map(|r| r.bytes.clone())
                .collect();
            match Ledger::load(
                fridge_id(f),
                ledger::actor_for(&ledger::hub_device()),
                None,
                &changes,
            ) {
                Ok(l) => ledgers.push(l),
                // Reported by the final check as a ledger that does not converge.
                Err(_) => ledgers.push(
                    Ledger::new(fridge_id(f), ledger::actor_for(&ledger::hub_device()))
                        .unwrap_or_else(|_| unreachable!()),
                ),
            }
        }
        let limits = SenderLimits {
            batch_entries_max: 16,
            batch_bytes_max: 128 * 1024,
            inflight_entries_max: 64,
            // Small enough to bind, as the embedded broker's memory bound needs (hub/mqtt.rs).
            inflight_bytes_max: 16 * 1024,
            retransmit_after_ms: 5 * SECOND,
        };
        let senders = self
            .hub_disk
            .progress
            .iter()
            .map(|p| StreamSender::new(p.down_acked, limits))
            .collect();
        // The hub's disk must hold whatever it acknowledged to any device.
        self.hub = Some(HubMem {
            ledgers,
            senders,
            seqs: SeqAllocator::resume(self.hub_disk.seq_reserved, 16),
            staged: Staged::default(),
            commit_scheduled: false,
        });
        for d in 0..self.devs.len() {
            self.try_connect(d);
        }
    }

    /// The last seq of device `d`'s downlink stream.
    pub(super) fn down_head(&self, d: usize) -> u64 {
        self.hub_disk
            .log
            .iter()
            .rev()
            .find(|r| r.author != d && self.devs[d].fridges.contains(&r.ledger))
            .map_or(0, |r| r.seq)
    }

    pub(super) fn hub_seal(&mut self, d: usize, body: Body) -> Option<Vec<u8>> {
        let h = self.hub.as_mut()?;
        let (seq, reserve) = h.seqs.allocate();
        if let Some(r) = reserve {
            self.hub_disk.seq_reserved = r;
        }
        if !self.signed.insert((usize::MAX, seq)) {
            self.violation = Some(format!("the hub signed envelope seq {seq} twice"));
        }
        let env = Envelope {
            header: Header {
                region: self.region.clone(),
                sender: Party::Hub,
                recipient: Party::Device(self.devs[d].id.clone()),
                seq,
                sent_at_ms: self.now,
            },
            body,
        };
        env.seal_to(&self.hub_key, &self.hub_boxes[d])
    }

    pub(super) fn hub_pump_all(&mut self) {
        for d in 0..self.devs.len() {
            self.hub_pump(d);
        }
    }

    /// Sends device `d` what its downlink sender allows, as the hub's MQTT loop does.
    pub(super) fn hub_pump(&mut self, d: usize) {
        if !self.link_live(d) {
            return;
        }
        let head = self.down_head(d);
        loop {
            let Some(h) = self.hub.as_ref() else { return };
            let Some(window) = h.senders[d].poll_send(head) else {
                break;
            };
            let entries: Vec<Entry> = self
                .hub_disk
                .log
                .iter()
                .filter(|r| {
                    r.seq > window.after
                        && r.author != d
                        && self.devs[d].fridges.contains(&r.ledger)
                })
                .take(window.entries_max as usize)
                .map(|r| Entry::change(r.seq, fridge_id(r.ledger), 0, r.bytes.clone()))
                .collect();
            let Some(batch) = build_batch(window, entries, head) else {
                break;
            };
            if batch.entries.iter().any(|e| e.kind == EntryKind::Withheld) {
                self.violation = Some(format!(
                    "seed {}: the hub withheld a change too large for a message",
                    self.cfg.seed
                ));
            }
            let up_to = batch.up_to;
            let Some(bytes) = self.hub_seal(d, Body::Changes(batch)) else {
                break;
            };
            if let Some(h) = self.hub.as_mut() {
                h.senders[d].on_sent(up_to, bytes.len());
            }
            self.send(false, d, bytes, true);
        }
        let in_flight = self.hub.as_ref().is_some_and(|h| {
            h.senders
                .iter()
                .any(|s| s.is_connected() && s.sent_up_to() > s.acked())
        });
        if in_flight && !self.hub_tick_scheduled {
            self.hub_tick_scheduled = true;
            self.schedule(TICK_MS, Ev::HubTick);
        }
    }

    pub(super) fn hub_refuse(
        &mut self,
        reason: &'static str,
        honest: bool,
        d: usize,
    ) -> Result<(), String> {
        *self.report.refused.entry(reason).or_default() += 1;
        // Duplicates and reordered copies of honest envelopes are refused as replays; an honest
        // device that was revoked is refused for that. Nothing else may refuse honest traffic.
        if honest && reason != "replayed" && reason != "revoked_device" {
            return fail(
                self.cfg.seed,
                format!(
                    "the hub refused an honest envelope of {}: {reason}",
                    self.devs[d].id
                ),
            );
        }
        Ok(())
    }

    /// The hub's checks of an envelope on device `d`'s `up` topic: the region writer's own
    /// admission rules (`larder_shared::admission`), run on what the simulated hub holds.
    pub(super) fn hub_receive(
        &mut self,
        d: usize,
        bytes: &[u8],
        honest: bool,
    ) -> Result<(), String> {
        let Some(hub) = self.hub.as_ref() else {
            self.report.dropped += 1;
            return Ok(());
        };
        let mut p = *hub
            .staged
            .progress
            .get(&d)
            .unwrap_or(&self.hub_disk.progress[d]);
        let fridges: Vec<FridgeId> = self.devs[d].fridges.iter().map(|f| fridge_id(*f)).collect();
        let device = admission::Device {
            id: &self.devs[d].id,
            fridges: &fridges,
            revoked: self.hub_disk.revoked[d],
            key: self.device_keys[d],
        };
        let region = SimRegion {
            down_head: self.down_head(d),
            hub_key: self.hub_key.public(),
        };
        let admitted = admission::admit(
            bytes,
            MAX_MESSAGE_BYTES,
            &self.region,
            &self.devs[d].id,
            Some(&device),
            &[self.device_keys[d]],
            |_| &self.hub_boxes[d],
            &region,
            &mut p,
        );
        match admitted {
            Ok((_, admitted)) => {
                self.hub_stage(d, admitted, p);
                Ok(())
            }
            Err(r) => self.hub_refuse(r.reason(), honest, d),
        }
    }

    /// Stages what an admitted envelope asks, with the device's positions `p` moved on.
    pub(super) fn hub_stage(&mut self, d: usize, admitted: Admitted, mut p: Progress) {
        let Some(hub) = self.hub.as_mut() else {
            return;
        };
        match admitted {
            Admitted::Changes { receipt, .. } => {
                match receipt {
                    Receipt::Apply { entries, up_to } => {
                        hub.staged
                            .changes
                            .extend(entries.into_iter().map(|e| (d, e)));
                        p.up_hwm = up_to;
                    }
                    Receipt::Gap => {
                        hub.staged.gaps.insert(d);
                    }
                    // Admission refuses a malformed batch; a duplicate changes nothing.
                    Receipt::Duplicate | Receipt::Malformed => {}
                }
                hub.staged.acks.insert(d);
            }
            Admitted::DownAcked(up_to) => {
                // As the hub's MQTT task hands the region's answer to its sender.
                let ack = larder_shared::envelope::Ack::new(up_to, false);
                if hub.senders[d].on_ack(ack, self.now).is_some()
                    && self.devs[d].down_waiting_since.is_some()
                {
                    self.devs[d].down_waiting_since = Some(self.now);
                }
            }
            // The simulated devices keep their keys: an honest one never sends a rotation, and
            // no other can sign one.
            Admitted::KeyRotation { .. } => {}
        }
        hub.staged.progress.insert(d, p);
        if !hub.commit_scheduled {
            hub.commit_scheduled = true;
            // Group commit: the writer gathers what arrives within a few milliseconds.
            self.schedule(5, Ev::HubCommit);
            // Now and then the hub dies with the group uncommitted (its envelopes were never
            // acknowledged, so their devices send them again).
            if self.faults && self.rng.chance(0.003) {
                self.schedule(1, Ev::HubCrash { periodic: false });
            }
        }
    }

    /// Commits the staged group, then acknowledges and relays it.
    pub(super) fn hub_commit(&mut self) -> Result<(), String> {
        let seed = self.cfg.seed;
        let Some(hub) = self.hub.as_mut() else {
            return Ok(());
        };
        hub.commit_scheduled = false;
        let staged = std::mem::take(&mut hub.staged);
        let mut by_ledger: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        for (d, e) in staged.changes {
            if !self.hub_applied.insert((d, e.seq)) {
                return fail(
                    seed,
                    format!(
                        "the hub applied entry {} of {} twice",
                        e.seq, self.devs[d].id
                    ),
                );
            }
            let Some(f) = (0..self.cfg.fridges).find(|f| fridge_id(*f) == e.ledger) else {
                return fail(seed, "a staged change of an unknown ledger");
            };
            let seq = self.hub_disk.log.len() as u64 + 1;
            by_ledger.entry(f).or_default().push(e.change.clone());
            self.hub_disk.log.push(LogRow {
                seq,
                ledger: f,
                author: d,
                bytes: e.change,
                committed_at: self.now,
            });
        }
        for (d, p) in staged.progress {
            self.hub_disk.progress[d] = p;
        }
        for (f, changes) in by_ledger {
            if let Err(e) = hub.ledgers[f].apply_changes(&changes) {
                return fail(seed, format!("hub merge refused: {e}"));
            }
        }
        // Acknowledged only now that the group is committed.
        for d in staged.acks {
            if !self.link_live(d) {
                continue;
            }
            let ack = Ack::new(self.hub_disk.progress[d].up_hwm, staged.gaps.contains(&d));
            if let Some(bytes) = self.hub_seal(d, Body::Ack(ack)) {
                self.send(false, d, bytes, true);
            }
        }
        self.hub_pump_all();
        Ok(())
    }

    pub(super) fn revoke(&mut self, d: usize) -> Result<(), String> {
        self.report.revoked += 1;
        // The admin's revocation is committed at once; the broker drops the device.
        self.hub_disk.revoked[d] = true;
        if let Some(h) = self.hub.as_mut() {
            h.senders[d].on_disconnected();
            // Anything of it staged but not committed is dropped with it.
            h.staged.changes.retain(|(a, _)| *a != d);
            h.staged.acks.remove(&d);
            h.staged.progress.remove(&d);
        }
        self.devs[d].revoked_at = Some(self.now);
        self.devs[d].acked_at_revocation = self.hub_disk.progress[d].up_hwm;
        Ok(())
    }
}
