//! Escrow: the share of a fridge's stock the hub grants each device to sell offline, counted
//! per sku as grants, returns and sales consume it.

use super::*;

pub(in crate::ledger) const ESCROW_GRANTED: &str = "granted";

pub(in crate::ledger) const ESCROW_RETURNED: &str = "returned";

pub(in crate::ledger) const ESCROW_CONSUMED: &str = "consumed";

/// The escrow key holding the share the fridge grants by.
pub(in crate::ledger) const ESCROW_SHARE: &str = "share";

impl Ledger {
    pub(in crate::ledger) fn escrow_counter(&self, sku: &Sku, which: &str) -> i64 {
        self.get_str(&self.maps.escrow, &format!("{sku}/{which}"))
            .and_then(|v| v.parse().ok())
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
