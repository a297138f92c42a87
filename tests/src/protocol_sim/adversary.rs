//! The simulation's hostile and careless device: now and then a device's local action is one
//! that once broke sync or skipped a rule, made through the same ledger and rules the agent
//! uses (`Ledger`, `limits`):
//! - an oversized refill (hundreds of units with 64-byte ids and batch labels), whose writes
//!   must come out as changes that each fit a message, and then flow like any other;
//! - a sale at a POS, in one fridge, of a unit another of its fridges holds: refused;
//! - a refill tagged with an order that expects no placement (a walk-up sale): refused.
//!
//! A refused action changes nothing; an allowed one that should have been refused, or a change
//! past `CHANGE_BYTES_MAX`, fails the seed.

use larder_shared::domain::{Refill, RefillUnit, SaleLine};
use larder_shared::ledger::{LedgerError, LocalChange};
use larder_shared::limits::{self, CHANGE_BYTES_MAX};
use larder_shared::{OrderId, UnitId};

use super::{DAY, T0, World, fail, fridge_id, sku};

/// What the adversary tried, and how often its action was refused as it must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdversaryReport {
    pub oversized_refills: u64,
    /// Changes the oversized refills were split into.
    pub oversized_changes: u64,
    pub foreign_sales_refused: u64,
    pub tagged_refills_refused: u64,
}

/// An id of exactly 64 bytes ending in `tail`.
fn long_id(tail: &str) -> String {
    format!("{}{tail}", "x".repeat(64usize.saturating_sub(tail.len())))
}

impl World {
    /// One hostile action at device `d` in fridge `f`: `Ok(Some(change))` for a change to store
    /// and send like any other, `Ok(None)` for an action refused.
    ///
    /// One piece: one arm per hostile action, each with its expected refusal.
    pub(super) fn hostile_act(
        &mut self,
        d: usize,
        f: usize,
        dev_now: i64,
    ) -> Result<Option<LocalChange>, String> {
        let seed = self.cfg.seed;
        let kind = self.rng.below(3);
        let n_units = 100 + self.rng.below(200);
        let dev = &mut self.devs[d];
        let Some(m) = dev.mem.as_mut() else {
            return Ok(None);
        };
        match kind {
            0 => {
                let units = (0..n_units)
                    .map(|_| {
                        dev.units += 1;
                        RefillUnit {
                            unit_id: UnitId::new(long_id(&format!("-{}-{}", dev.id, dev.units)))
                                .unwrap_or_else(|_| unreachable!()),
                            sku: sku("lasagna"),
                            expires_at_ms: T0 + 30 * DAY,
                            batch: Some("b".repeat(limits::BATCH_LEN_MAX)),
                        }
                    })
                    .collect();
                let refill = Refill {
                    units,
                    order_id: None,
                };
                let Some(l) = m.ledgers.get_mut(&f) else {
                    return Ok(None);
                };
                let change = match l.refill(&refill, &dev.id, dev_now) {
                    Ok(c) => c,
                    Err(e) => {
                        return fail(seed, format!("{} oversized refill refused: {e}", dev.id));
                    }
                };
                if let Some(big) = change.changes.iter().find(|c| c.len() > CHANGE_BYTES_MAX) {
                    return fail(
                        seed,
                        format!("a change of {} bytes, past {CHANGE_BYTES_MAX}", big.len()),
                    );
                }
                self.report.adversary.oversized_refills += 1;
                self.report.adversary.oversized_changes += change.changes.len() as u64;
                Ok(Some(change))
            }
            1 => {
                // A unit of another fridge this device holds, sold as this fridge's.
                let ids: Vec<_> = m.ledgers.keys().map(|&i| fridge_id(i)).collect();
                let Some(unit) = m
                    .ledgers
                    .iter()
                    .filter(|(i, _)| **i != f)
                    .find_map(|(_, l)| l.units(dev_now).into_iter().next())
                    .map(|u| u.unit_id)
                    .filter(|u| m.ledgers.get(&f).is_some_and(|l| !l.knows_unit(u)))
                else {
                    return Ok(None);
                };
                let lines = [SaleLine {
                    sku: sku("lasagna"),
                    unit_id: Some(unit.clone()),
                    quantity: 1,
                }];
                match limits::sale_units_belong(
                    ids.iter().zip(m.ledgers.values()),
                    &fridge_id(f),
                    &lines,
                ) {
                    Err(LedgerError::UnitNotAvailable { .. }) => {
                        self.report.adversary.foreign_sales_refused += 1;
                        Ok(None)
                    }
                    other => fail(
                        seed,
                        format!(
                            "{} sold {unit} of another fridge as fridge-{f}'s: {other:?}",
                            dev.id
                        ),
                    ),
                }
            }
            _ => {
                // A refill tagged with a walk-up sale's id: no such order expects placement.
                let Some((order, _)) = dev.sales.last().cloned() else {
                    return Ok(None);
                };
                let Some(l) = m.ledgers.get_mut(&f) else {
                    return Ok(None);
                };
                dev.units += 1;
                let refill = Refill {
                    units: vec![RefillUnit {
                        unit_id: UnitId::new(format!("tag-{}-{}", dev.id, dev.units))
                            .unwrap_or_else(|_| unreachable!()),
                        sku: sku("lasagna"),
                        expires_at_ms: T0 + 30 * DAY,
                        batch: None,
                    }],
                    order_id: Some(OrderId::clone(&order)),
                };
                match l.refill(&refill, &dev.id, dev_now) {
                    Err(LedgerError::WrongStatus(_) | LedgerError::UnknownOrder(_)) => {
                        self.report.adversary.tagged_refills_refused += 1;
                        Ok(None)
                    }
                    other => fail(
                        seed,
                        format!(
                            "{} placed units for walk-up order {order}: {other:?}",
                            dev.id
                        ),
                    ),
                }
            }
        }
    }
}
