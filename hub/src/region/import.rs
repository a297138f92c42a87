//! Bulk loading of units (`larder-hub import units`, `POST /v1/regions/{r}/imports/units`):
//! each batch of rows is checked row by row, and the valid new units are loaded into their
//! fridges' ledgers as refills the hub writes, in the batch's one transaction. A unit already
//! in its fridge's ledger is `unchanged`, so importing a file again changes nothing.

use std::collections::{BTreeMap, HashSet};

use larder_shared::domain::{Refill, RefillUnit};
use larder_shared::ledger::{self, Ledger, LedgerError, LocalChange, UNITS_PER_REQUEST_MAX};
use larder_shared::{DeviceId, FridgeId, Sku, UnitId, limits};
use serde::{Deserialize, Serialize};

use super::RegionWriter;
use crate::store::RegionBatch;

/// Most rows one import request may carry.
pub const IMPORT_ROWS_MAX: usize = 10_000;

/// Largest body of an import request, in bytes, whatever `http.request_body_bytes_max` says
/// (the larger of the two applies): 10,000 rows of ordinary length fit. Larger batches share
/// the cost of each fridge's refill and of each commit among more rows (docs/BENCHMARKS.md).
pub const IMPORT_BODY_BYTES_MAX: usize = 2 * 1024 * 1024;

/// One row of a units file, as the importer read it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnitRow {
    /// The row's line in the file, for the report.
    pub line: u64,
    pub unit_id: String,
    pub fridge_id: String,
    pub sku: String,
    /// RFC 3339.
    pub expires_at: String,
    #[serde(default)]
    pub batch: Option<String>,
}

/// A row refused, with why.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Rejected {
    pub line: u64,
    pub reason: String,
}

/// What a batch came to.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ImportReport {
    pub accepted: u64,
    pub unchanged: u64,
    pub rejected: Vec<Rejected>,
}

impl RegionWriter {
    /// Checks and stages a batch of unit rows.
    pub(super) fn import_units(
        &mut self,
        rows: Vec<UnitRow>,
        batch: &mut RegionBatch,
        now: i64,
    ) -> ImportReport {
        let mut report = ImportReport::default();
        let mut by_fridge: BTreeMap<FridgeId, Vec<(u64, RefillUnit)>> = BTreeMap::new();
        let mut seen: HashSet<(FridgeId, UnitId)> = HashSet::new();
        for row in rows {
            match self.check_unit_row(&row, now) {
                Err(reason) => report.rejected.push(Rejected {
                    line: row.line,
                    reason,
                }),
                Ok(None) => report.unchanged += 1,
                Ok(Some((fridge, unit))) => {
                    if !seen.insert((fridge.clone(), unit.unit_id.clone())) {
                        report.unchanged += 1; // listed twice: loaded once
                        continue;
                    }
                    by_fridge.entry(fridge).or_default().push((row.line, unit));
                }
            }
        }
        let hub = ledger::hub_device();
        let mut work: Vec<Refills<'_>> = self
            .ledgers
            .iter_mut()
            .filter_map(|(f, l)| by_fridge.remove(f).map(|units| (f.clone(), l, units)))
            .collect();
        work.sort_by(|a, b| a.0.cmp(&b.0));
        for (fridge, loads) in refill_all(work, &hub, now) {
            for (lines, loaded) in loads {
                match loaded {
                    Ok(change) => {
                        report.accepted += lines.len() as u64;
                        self.hub_change(&fridge, change, batch);
                    }
                    Err(e) => report
                        .rejected
                        .extend(lines.into_iter().map(|line| Rejected {
                            line,
                            reason: format!("loading into {fridge}: {e}"),
                        })),
                }
            }
        }
        report.rejected.sort_by_key(|r| r.line);
        report
    }

    /// `Ok(None)` for a unit already in its fridge.
    fn check_unit_row(
        &self,
        row: &UnitRow,
        now: i64,
    ) -> Result<Option<(FridgeId, RefillUnit)>, String> {
        let fridge = FridgeId::new(row.fridge_id.as_str())
            .map_err(|e| format!("fridge_id {:?}: {e}", row.fridge_id))?;
        let Some(l) = self.ledgers.get(&fridge) else {
            return Err(format!("fridge {fridge} is not in region {}", self.region));
        };
        let unit_id = UnitId::new(row.unit_id.as_str())
            .map_err(|e| format!("unit_id {:?}: {e}", row.unit_id))?;
        let sku = Sku::new(row.sku.as_str()).map_err(|e| format!("sku {:?}: {e}", row.sku))?;
        let expires: jiff::Timestamp = row
            .expires_at
            .parse()
            .map_err(|e| format!("expires_at {:?}: {e}", row.expires_at))?;
        if l.knows_unit(&unit_id) {
            return Ok(None);
        }
        let unit = RefillUnit {
            unit_id,
            sku,
            expires_at_ms: expires.as_millisecond(),
            batch: row.batch.clone().filter(|b| !b.is_empty()),
        };
        // The rules every load is held to, as the agents' refills are.
        limits::loads(std::slice::from_ref(&unit), &self.catalog, now)
            .map_err(|e| e.to_string())?;
        Ok(Some((fridge, unit)))
    }
}

/// A fridge's ledger with the units (and their lines) to load into it.
type Refills<'a> = (FridgeId, &'a mut Ledger, Vec<(u64, RefillUnit)>);

/// What loading a fridge's units came to: each refill's lines and its change or error.
type Loaded = (FridgeId, Vec<(Vec<u64>, Result<LocalChange, LedgerError>)>);

/// Fewest units for which a batch's refills are split over two threads.
const PARALLEL_UNITS_MIN: usize = 512;

/// Loads each fridge's units as refills by the hub, in chunks a refill may hold. Every fridge's
/// ledger is a document of its own, so a large batch is split in two halves (by units) loaded
/// on two threads; the answers come back in the order of `work`.
fn refill_all(work: Vec<Refills<'_>>, hub: &DeviceId, now: i64) -> Vec<Loaded> {
    let load = |work: Vec<Refills<'_>>| -> Vec<Loaded> {
        work.into_iter()
            .map(|(fridge, ledger, units)| {
                let loads = units
                    .chunks(UNITS_PER_REQUEST_MAX)
                    .map(|chunk| {
                        let refill = Refill {
                            units: chunk.iter().map(|(_, u)| u.clone()).collect(),
                            order_id: None,
                        };
                        let lines = chunk.iter().map(|(line, _)| *line).collect();
                        (lines, ledger.refill(&refill, hub, now))
                    })
                    .collect();
                (fridge, loads)
            })
            .collect()
    };
    let total: usize = work.iter().map(|(_, _, u)| u.len()).sum();
    if work.len() < 2 || total < PARALLEL_UNITS_MIN {
        return load(work);
    }
    let mut first = work;
    let mut counted = 0;
    let split = first
        .iter()
        .position(|(_, _, u)| {
            counted += u.len();
            counted * 2 >= total
        })
        .map_or(1, |i| (i + 1).min(first.len() - 1));
    let second = first.split_off(split);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| load(second));
        let mut out = load(first);
        match other.join() {
            Ok(rest) => out.extend(rest),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch large enough to be split loads every unit once, into its own fridge, with the
    /// answers in the order the fridges were given; a refill that fails says so for its lines.
    #[test]
    fn refills_split_over_two_threads_answer_in_order() {
        let hub = ledger::hub_device();
        let now = 1_700_000_000_000;
        let fridges: Vec<FridgeId> = (1..=5)
            .map(|i| FridgeId::new(format!("fridge-{i}")).expect("id"))
            .collect();
        let mut ledgers: Vec<Ledger> = fridges
            .iter()
            .map(|f| Ledger::new(f.clone(), ledger::actor_for(&hub)).expect("ledger"))
            .collect();
        let unit = |f: usize, i: usize| RefillUnit {
            unit_id: UnitId::new(format!("u-{f}-{i}")).expect("id"),
            sku: Sku::new("lasagna").expect("sku"),
            expires_at_ms: now + 86_400_000,
            batch: None,
        };
        let mut line = 0;
        let mut work = Vec::new();
        for (f, l) in ledgers.iter_mut().enumerate() {
            // Fridge 3's second chunk repeats a unit of its first: that refill fails alone.
            let count = if f == 2 {
                UNITS_PER_REQUEST_MAX + 1
            } else {
                150
            };
            let units: Vec<(u64, RefillUnit)> = (0..count)
                .map(|i| {
                    line += 1;
                    let i = if f == 2 && i == UNITS_PER_REQUEST_MAX {
                        0
                    } else {
                        i
                    };
                    (line, unit(f, i))
                })
                .collect();
            work.push((fridges[f].clone(), l, units));
        }
        let loaded = refill_all(work, &hub, now);
        let order: Vec<&FridgeId> = loaded.iter().map(|(f, _)| f).collect();
        assert_eq!(order, fridges.iter().collect::<Vec<_>>());
        for (f, (fridge, loads)) in loaded.iter().enumerate() {
            let ok: usize = loads
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(lines, _)| lines.len())
                .sum();
            let failed: Vec<&Vec<u64>> = loads
                .iter()
                .filter(|(_, r)| r.is_err())
                .map(|(lines, _)| lines)
                .collect();
            if f == 2 {
                assert_eq!(ok, UNITS_PER_REQUEST_MAX, "{fridge}");
                assert_eq!(failed.len(), 1, "{fridge}");
                assert_eq!(failed[0].len(), 1, "{fridge}");
            } else {
                assert_eq!(ok, 150, "{fridge}");
                assert!(failed.is_empty(), "{fridge}");
            }
        }
        for (f, l) in ledgers.iter().enumerate() {
            let expected = if f == 2 { UNITS_PER_REQUEST_MAX } else { 150 };
            assert_eq!(l.units(now).len(), expected, "fridge {}", f + 1);
        }
    }
}
