//! Escrow: the share of a fridge's stock the hub grants each device to sell offline, counted
//! per sku as grants, returns and sales consume it.

use super::*;

pub(in crate::ledger) const ESCROW_GRANTED: &str = "granted";

pub(in crate::ledger) const ESCROW_RETURNED: &str = "returned";

pub(in crate::ledger) const ESCROW_CONSUMED: &str = "consumed";

/// The escrow key holding the share the fridge grants by.
pub(in crate::ledger) const ESCROW_SHARE: &str = "share";

impl Ledger {
    /// A counter's total. Each is written by one writer, as a total that only grows; the hub's
    /// two are written by two of its actors after its store was restored (the lost store's
    /// writes, given back by devices, beside the restored store's), and Automerge keeps both:
    /// the larger is the nearer, and the next write, which sees both, settles it.
    pub(in crate::ledger) fn escrow_counter(&self, sku: &Sku, which: &str) -> i64 {
        self.doc
            .get_all(&self.maps.escrow, format!("{sku}/{which}").as_str())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(v, _)| v.as_str()?.parse::<i64>().ok())
            .max()
            .unwrap_or(0)
    }

    /// The units of `sku` the fridge has granted in total (a counter only the fridge writes).
    pub fn granted(&self, sku: &Sku) -> i64 {
        self.escrow_counter(sku, ESCROW_GRANTED)
    }

    /// Every sku's granted total.
    pub fn granted_all(&self) -> BTreeMap<Sku, i64> {
        self.escrow_skus()
            .into_iter()
            .map(|s| {
                let g = self.granted(&s);
                (s, g)
            })
            .collect()
    }

    /// The allowance counting grants only up to `granted` (those every seller has seen).
    pub fn allowance_with(&self, sku: &Sku, granted: i64) -> i64 {
        (granted.min(self.escrow_counter(sku, ESCROW_GRANTED))
            - self.escrow_counter(sku, ESCROW_RETURNED)
            - self.escrow_counter(sku, ESCROW_CONSUMED))
        .max(0)
    }

    /// The units of `sku` the fridge has set aside for the hub, as this replica knows.
    pub fn allowance(&self, sku: &Sku) -> i64 {
        (self.escrow_counter(sku, ESCROW_GRANTED)
            - self.escrow_counter(sku, ESCROW_RETURNED)
            - self.escrow_counter(sku, ESCROW_CONSUMED))
        .max(0)
    }

    /// The allowance a fridge aims to grant for `sku`: `share` of its free units, at least one
    /// where two or more are free (so a walk-up customer can always buy one of the last two).
    /// A share of 0 grants nothing.
    pub fn escrow_target(&self, sku: &Sku, share: f64, now_ms: i64) -> i64 {
        let free = self.free_units(sku, now_ms).len() as i64;
        if free < 2 || share <= 0.0 {
            return 0;
        }
        (((free as f64) * share).floor() as i64).clamp(1, free - 1)
    }

    /// The fridge tops its grants up to the target (only the fridge's agent calls this, while
    /// online). `None` when nothing changes.
    pub fn grant_escrow(
        &mut self,
        share: f64,
        now_ms: i64,
    ) -> Result<Option<LocalChange>, LedgerError> {
        let mut puts = Vec::new();
        let share_text = format!("{share:.3}");
        if self.get_str(&self.maps.escrow, ESCROW_SHARE).as_deref() != Some(share_text.as_str()) {
            puts.push((ESCROW_SHARE.to_owned(), share_text));
        }
        for sku in self.stocked_skus() {
            let target = self.escrow_target(&sku, share, now_ms);
            let have = self.allowance(&sku);
            if have < target {
                let granted = self.escrow_counter(&sku, ESCROW_GRANTED) + (target - have);
                puts.push((format!("{sku}/{ESCROW_GRANTED}"), granted.to_string()));
            }
        }
        self.put_escrow(puts, now_ms)
    }

    /// Every sku with escrow counters.
    pub fn escrow_skus(&self) -> BTreeSet<Sku> {
        self.doc
            .keys(&self.maps.escrow)
            .filter_map(|k| k.split_once('/').and_then(|(s, _)| Sku::new(s).ok()))
            .collect()
    }

    /// The share the fridge grants by (it records it with its grants), so both sides aim at
    /// one target.
    pub fn escrow_share(&self) -> f64 {
        self.get_str(&self.maps.escrow, ESCROW_SHARE)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The hub hands back allowance above the fridge's target (only the hub calls this, after
    /// merging what an online fridge sent). `None` when nothing changes.
    pub fn return_escrow(&mut self, now_ms: i64) -> Result<Option<LocalChange>, LedgerError> {
        let share = self.escrow_share();
        let mut puts = Vec::new();
        for sku in self.escrow_skus() {
            let target = self.escrow_target(&sku, share, now_ms);
            let have = self.allowance(&sku);
            if have > target {
                let returned = self.escrow_counter(&sku, ESCROW_RETURNED) + (have - target);
                puts.push((format!("{sku}/{ESCROW_RETURNED}"), returned.to_string()));
            }
        }
        self.put_escrow(puts, now_ms)
    }

    pub(in crate::ledger) fn put_escrow(
        &mut self,
        puts: Vec<(String, String)>,
        now_ms: i64,
    ) -> Result<Option<LocalChange>, LedgerError> {
        if puts.is_empty() {
            return Ok(None);
        }
        let mut tx = Writes::new();
        for (k, v) in &puts {
            tx.put(&self.maps.escrow, k.as_str(), v.as_str());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        Ok(Some(self.last_local_change(Touched::default(), changes)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FridgeId;
    use automerge::ActorId;

    /// After a restore, a hub counter is written by two of the hub's actors from one base (the
    /// lost store's write, given back, and the restored store's): it reads as the larger total
    /// on every replica, and the next write, which sees both, settles it.
    #[test]
    fn a_counter_two_hub_actors_wrote_reads_as_the_larger() {
        let fridge = FridgeId::new("fridge-1").expect("id");
        let sku = Sku::new("lasagna").expect("sku");
        let key = format!("{sku}/{ESCROW_CONSUMED}");
        let put = |l: &mut Ledger, v: &str, at: i64| {
            l.put_escrow(vec![(key.clone(), v.to_owned())], at)
                .expect("put")
                .expect("a change")
                .changes
        };
        let mut lost =
            Ledger::new(fridge.clone(), ActorId::from(&b"\0hub-lost"[..])).expect("ledger");
        let base = put(&mut lost, "5", 1);
        let mut restored =
            Ledger::new(fridge, ActorId::from(&b"\0hub-restored"[..])).expect("ledger");
        restored.apply_changes(&base).expect("apply");
        let lost_write = put(&mut lost, "7", 2);
        let restored_write = put(&mut restored, "6", 3);
        restored.apply_changes(&lost_write).expect("merge");
        lost.apply_changes(&restored_write).expect("merge");
        for l in [&lost, &restored] {
            assert_eq!(l.escrow_counter(&sku, ESCROW_CONSUMED), 7);
        }
        let next = restored.escrow_counter(&sku, ESCROW_CONSUMED) + 1;
        let settled = put(&mut restored, &next.to_string(), 4);
        lost.apply_changes(&settled).expect("merge");
        assert_eq!(lost.escrow_counter(&sku, ESCROW_CONSUMED), 8);
        let values = lost
            .doc
            .get_all(&lost.maps.escrow, key.as_str())
            .expect("read");
        assert_eq!(values.len(), 1, "one value left: {values:?}");
    }
}
