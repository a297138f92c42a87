//! The simulation's attacker on the wire: replays of captured envelopes, forgeries with its own
//! key, enrolled devices signing as others or publishing on others' topics. A replay may be
//! taken once if its original never arrived; everything else must be refused.

use super::*;

impl World {
    /// One attack: a replay of a captured envelope, a forgery with the attacker's key, an
    /// enrolled device signing as another, or one publishing on another's topic.
    pub(super) fn attack(&mut self) -> Result<(), String> {
        self.report.attacks += 1;
        let n = self.devs.len();
        match self.rng.below(5) {
            0 if !self.captured.is_empty() => {
                let i = self.rng.below(self.captured.len() as u64) as usize;
                let c = &self.captured[i];
                let (dev, bytes) = (c.dev, c.bytes.clone());
                // A replay is the genuine envelope: the hub may take it if the original never
                // arrived, and must refuse it if it did. Its effect is checked by the ledgers.
                let delay = self.rng.range(MINUTE, DAY);
                self.schedule(
                    delay,
                    Ev::Deliver {
                        up: true,
                        dev,
                        bytes,
                        honest: false,
                    },
                );
            }
            k => {
                let victim = self.rng.below(n as u64) as usize;
                let f = self.devs[victim].fridges[0];
                // A sale in the victim's name: a change authored by its actor.
                let mut l = Ledger::new(fridge_id(f), ledger::actor_for(&self.devs[victim].id))
                    .map_err(|e| e.to_string())?;
                let refill = Refill {
                    units: vec![RefillUnit {
                        unit_id: UnitId::new(format!("forged-{}", self.report.attacks))
                            .unwrap_or_else(|_| unreachable!()),
                        sku: sku("lasagna"),
                        expires_at_ms: T0 + 30 * DAY,
                        batch: None,
                    }],
                    order_id: None,
                };
                let change = l
                    .refill(&refill, &self.devs[victim].id, self.now)
                    .map_err(|e| e.to_string())?;
                let bytes = change.changes.into_iter().next().ok_or("no change")?;
                self.forged.insert(digest(&bytes));
                let up_hwm = self.hub_disk.progress[victim].up_hwm;
                let batch = Batch::new(
                    up_hwm,
                    up_hwm + 1,
                    vec![Entry::change(up_hwm + 1, fridge_id(f), 0, bytes)],
                );
                let other = (victim + 1) % n;
                // (signing key, name in the header, topic)
                let (key, sender, topic) = match k {
                    // The attacker's own key, in the victim's name.
                    1 => (&self.forger, victim, victim),
                    // Another enrolled device's key, in the victim's name, on its topic.
                    2 => (&self.devs[other].key, victim, victim),
                    // Another enrolled device's own envelope on the victim's topic.
                    3 => (&self.devs[other].key, other, victim),
                    // Another enrolled device's own envelope on its own topic, carrying a
                    // change authored by the victim.
                    _ => (&self.devs[other].key, other, other),
                };
                let to = BoxKey::new(key, &self.hub_public);
                let env = Envelope {
                    header: Header {
                        region: self.region.clone(),
                        sender: Party::Device(self.devs[sender].id.clone()),
                        recipient: Party::Hub,
                        seq: u64::MAX - self.rng.below(1000),
                        sent_at_ms: self.now,
                    },
                    body: Body::Changes(batch),
                };
                if let Some(bytes) = env.seal_to(key, &to) {
                    self.send(true, topic, bytes, false);
                }
            }
        }
        Ok(())
    }
}
