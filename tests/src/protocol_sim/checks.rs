//! What every run is held to: no link stalls with work pending, and at the end every replica
//! converged, every acknowledged change reached the hub exactly once, and no attack changed a
//! thing.

use super::*;

impl World {
    /// Tracks how long each live link has had work pending without progress.
    pub(super) fn watch_stalls(&mut self) -> Result<(), String> {
        for d in 0..self.devs.len() {
            let live = self.link_live(d);
            let up_pending = live
                && self.devs[d]
                    .mem
                    .as_ref()
                    .is_some_and(|m| m.connected && self.devs[d].disk.head > m.sender.acked());
            let down_pending = live
                && self
                    .hub
                    .as_ref()
                    .is_some_and(|h| self.down_head(d) > h.senders[d].acked());
            let now = self.now;
            let dev = &mut self.devs[d];
            for (pending, since) in [
                (up_pending, &mut dev.up_waiting_since),
                (down_pending, &mut dev.down_waiting_since),
            ] {
                if !pending {
                    *since = None;
                } else if since.is_none() {
                    *since = Some(now);
                }
            }
            for since in [
                self.devs[d].up_waiting_since,
                self.devs[d].down_waiting_since,
            ]
            .into_iter()
            .flatten()
            {
                let waited = now - since;
                self.report.longest_stall_ms = self.report.longest_stall_ms.max(waited);
                if waited > STALL_MAX_MS {
                    return fail(
                        self.cfg.seed,
                        format!(
                            "{}'s link stalled for {} s with work pending",
                            self.devs[d].id,
                            waited / SECOND
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn quiescent(&self) -> bool {
        let Some(h) = self.hub.as_ref() else {
            return false;
        };
        if !h.staged.changes.is_empty() || !h.staged.progress.is_empty() {
            return false;
        }
        (0..self.devs.len()).all(|d| {
            self.hub_disk.revoked[d]
                || (self.devs[d]
                    .mem
                    .as_ref()
                    .is_some_and(|m| m.sender.acked() == self.devs[d].disk.head)
                    && h.senders[d].acked() >= self.down_head(d))
        })
    }

    /// One piece: the end-of-run checks, one after another, each failing the seed with its
    /// reason.
    pub(super) fn final_checks(&mut self) -> Result<(), String> {
        let seed = self.cfg.seed;
        let Some(hub) = self.hub.as_ref() else {
            return fail(seed, "no hub at the end");
        };
        let in_log: HashSet<[u8; 32]> =
            self.hub_disk.log.iter().map(|r| digest(&r.bytes)).collect();
        if in_log.len() != self.hub_disk.log.len() {
            return fail(seed, "the hub's log holds a change twice");
        }
        // Durability: the hub's ledgers rebuilt from its disk equal the ones it runs.
        for f in 0..self.cfg.fridges {
            let changes: Vec<Vec<u8>> = self
                .hub_disk
                .log
                .iter()
                .filter(|r| r.ledger == f)
                .map(|r| r.bytes.clone())
                .collect();
            let reloaded = Ledger::load(
                fridge_id(f),
                ledger::actor_for(&ledger::hub_device()),
                None,
                &changes,
            )
            .map_err(|e| format!("seed {seed}: hub ledger {f} does not load: {e}"))?;
            if reloaded.heads_digest() != hub.ledgers[f].heads_digest() {
                return fail(seed, format!("hub ledger {f} differs from its disk"));
            }
            if hub.ledgers[f].waits_for_dependencies() {
                return fail(seed, format!("hub ledger {f} waits for missing changes"));
            }
        }
        let mut expected_orders: Vec<BTreeSet<OrderId>> = vec![BTreeSet::new(); self.cfg.fridges];
        for (d, dev) in self.devs.iter().enumerate() {
            let Some(m) = dev.mem.as_ref() else {
                return fail(seed, format!("{} is down at the end", dev.id));
            };
            // The union of acknowledged local changes.
            for e in &dev.disk.outbox {
                let held = in_log.contains(&digest(&e.change));
                match dev.revoked_at {
                    None if !held => {
                        return fail(
                            seed,
                            format!("{}'s change {} is not at the hub", dev.id, e.seq),
                        );
                    }
                    Some(_) if e.seq <= dev.acked_at_revocation && !held => {
                        return fail(
                            seed,
                            format!(
                                "{}'s change {} acknowledged before revocation is lost",
                                dev.id, e.seq
                            ),
                        );
                    }
                    _ => {}
                }
            }
            if let Some(at) = dev.revoked_at
                && let Some(r) = self
                    .hub_disk
                    .log
                    .iter()
                    .find(|r| r.author == d && r.committed_at >= at)
            {
                return fail(
                    seed,
                    format!(
                        "{}'s change {} was taken after its revocation",
                        dev.id, r.seq
                    ),
                );
            }
            for (order, change) in &dev.sales {
                if in_log.contains(change) {
                    let f = dev
                        .fridges
                        .iter()
                        .copied()
                        .find(|f| hub.ledgers[*f].order(order).is_some())
                        .ok_or_else(|| format!("seed {seed}: order {order} missing at the hub"))?;
                    expected_orders[f].insert(order.clone());
                }
            }
            // Convergence: every replica of a live device equals the hub's.
            if dev.revoked_at.is_none() {
                for f in &dev.fridges {
                    let Some(l) = m.ledgers.get(f) else {
                        return fail(seed, format!("{} has no ledger {f}", dev.id));
                    };
                    if l.heads_digest() != hub.ledgers[*f].heads_digest()
                        || l.state_digest() != hub.ledgers[*f].state_digest()
                    {
                        return fail(
                            seed,
                            format!("{}'s replica of fridge-{f} differs from the hub's", dev.id),
                        );
                    }
                }
            }
            for changes in dev.disk.changes.values() {
                if changes.iter().any(|c| self.forged.contains(&digest(c))) {
                    return fail(seed, format!("{} holds a forged change", dev.id));
                }
            }
        }
        if self
            .hub_disk
            .log
            .iter()
            .any(|r| self.forged.contains(&digest(&r.bytes)))
        {
            return fail(seed, "the hub took a forged change");
        }
        // Nothing doubled in effect: the hub holds each sale once, and no other.
        for (f, expected) in expected_orders.iter().enumerate() {
            let at_hub: BTreeSet<OrderId> = hub.ledgers[f].order_ids().into_iter().collect();
            if &at_hub != expected {
                return fail(
                    seed,
                    format!(
                        "fridge-{f}: the hub holds {} orders, the devices made {} that reached it",
                        at_hub.len(),
                        expected.len()
                    ),
                );
            }
        }
        Ok(())
    }
}
