//! The one way the ledger writes: puts gathered first, then committed as Automerge changes
//! that each fit [`CHANGE_BYTES_MAX`], so no command can make a change that cannot be sent.
//!
//! ```text
//! command → Writes::put (key, value) … → Writes::commit(doc)
//!            every put costs key + value + PUT_BYTES_MAX (estimated, an upper bound)
//!            a change takes puts until the next would pass the budget → new change
//!            a single put past the budget → LedgerError::TooLarge, nothing written
//! ```
//!
//! Invariant: every change committed here is at most [`CHANGE_BYTES_MAX`] bytes (estimated
//! before, asserted after). The changes of one command are consecutive and causally ordered,
//! so a replica never applies a later one without the earlier.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ObjId};

use super::LedgerError;
use crate::limits::CHANGE_BYTES_MAX;

/// What one put may add to a change besides its key and value bytes: its op id, object,
/// action, value header, a predecessor, and column headers as LEB128 and RLE encode them.
pub(crate) const PUT_BYTES_MAX: usize = 64;
/// What a change may spend besides its puts: header, checksum, actor, sequence, start op, time,
/// the column table, what DEFLATE may add to columns it cannot shrink, and other actors named
/// by predecessors.
const CHANGE_BASE_BYTES_MAX: usize = 1024;
/// Each dependency (a head of the document when the change is made).
const DEP_BYTES: usize = 33;

/// Puts to make in one command, committed together in as few changes as fit.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    puts: Vec<(ObjId, String, String)>,
}

impl Writes {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn put(&mut self, obj: &ObjId, key: impl Into<String>, value: impl Into<String>) {
        self.puts.push((obj.clone(), key.into(), value.into()));
    }

    /// The estimated encoded size of one put.
    fn cost((_, key, value): &(ObjId, String, String)) -> usize {
        key.len() + value.len() + PUT_BYTES_MAX
    }

    /// Commits the puts in order as one change or several, each within [`CHANGE_BYTES_MAX`],
    /// and returns their bytes. A put that alone would pass the limit writes nothing.
    pub(crate) fn commit(
        self,
        doc: &mut Automerge,
        now_ms: i64,
    ) -> Result<Vec<Vec<u8>>, LedgerError> {
        let base = CHANGE_BASE_BYTES_MAX + DEP_BYTES * doc.get_heads().len().max(1);
        if let Some(largest) = self.puts.iter().map(Self::cost).max()
            && base + largest > CHANGE_BYTES_MAX
        {
            return Err(LedgerError::TooLarge {
                bytes: base + largest,
                limit: CHANGE_BYTES_MAX,
            });
        }
        let mut changes = Vec::new();
        let mut puts = self.puts.into_iter().peekable();
        while puts.peek().is_some() {
            // After our own first change the document has one head: that change.
            let base = if changes.is_empty() {
                base
            } else {
                CHANGE_BASE_BYTES_MAX + DEP_BYTES
            };
            let mut bytes = base;
            let mut tx = doc.transaction();
            while let Some(put) = puts.next_if(|p| bytes + Self::cost(p) <= CHANGE_BYTES_MAX) {
                bytes += Self::cost(&put);
                let (obj, key, value) = put;
                tx.put(&obj, key, value)?;
            }
            tx.commit_with(CommitOptions::default().with_time(now_ms / 1000));
            let change = doc
                .get_last_local_change()
                .ok_or_else(|| LedgerError::Document("committed change not found".into()))?;
            let raw = change.raw_bytes();
            // The sync core withholds (never sends, never loops on) an entry past the message
            // limit, so a wrong estimate costs that change, not the stream behind it.
            debug_assert!(
                raw.len() <= bytes,
                "a change of {} bytes passed its estimate of {bytes}",
                raw.len()
            );
            changes.push(raw.to_vec());
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::catalog::{Catalog, CatalogItem};
    use crate::domain::{
        Channel, DoorSession, Incident, Payment, PaymentMethod, Refill, RefillUnit, RemovalReason,
        Sale, SaleLine,
    };
    use crate::ids::{DeviceId, FridgeId, OrderId, Sku, UnitId};
    use crate::ledger::{Ledger, LedgerError, LocalChange, actor_for};
    use crate::limits::CHANGE_BYTES_MAX;

    const NOW: i64 = 1_700_000_000_000;

    /// An id of exactly `len` bytes (1..=64) ending in `n`.
    fn id(prefix: char, n: usize, len: usize) -> String {
        let tail = format!("{prefix}{n}");
        format!("{}{tail}", "x".repeat(len.saturating_sub(tail.len())))
    }

    fn catalog(sku: &Sku) -> Catalog {
        Catalog {
            version: 1,
            currency: "EUR".into(),
            items: vec![CatalogItem {
                sku: sku.clone(),
                name: "Soup".into(),
                price_minor: 500,
                allergens: vec![],
                shelf_life_hours: 48,
            }],
        }
    }

    fn check(change: &LocalChange) {
        assert!(!change.changes.is_empty());
        for c in &change.changes {
            assert!(
                c.len() <= CHANGE_BYTES_MAX,
                "a change of {} bytes, past {CHANGE_BYTES_MAX}",
                c.len()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Every write path, given the largest inputs its rules allow (up to 1,000 units of
        /// 64-byte ids, 64-byte batch labels and skus, 64-byte device ids), makes only changes
        /// that fit a message, and a replica that merges them holds the same ledger.
        #[test]
        fn every_write_path_makes_changes_that_fit_a_message(
            units in 1usize..=1000,
            id_len in 8usize..=64,
            batch_len in 0usize..=64,
            sold in 1usize..=50,
        ) {
            let device = DeviceId::new(id('d', 1, 43)).expect("id");
            let fridge = FridgeId::new(id('f', 1, 64)).expect("id");
            let sku = Sku::new(id('s', 1, 64)).expect("sku");
            let catalog = catalog(&sku);
            let mut l = Ledger::new(fridge.clone(), actor_for(&device)).expect("ledger");
            let mut all = Vec::new();
            let refill = Refill {
                units: (0..units)
                    .map(|n| RefillUnit {
                        unit_id: UnitId::new(id('u', n, id_len)).expect("id"),
                        sku: sku.clone(),
                        expires_at_ms: NOW + 86_400_000,
                        batch: (batch_len > 0).then(|| "b".repeat(batch_len)),
                    })
                    .collect(),
                order_id: None,
            };
            let c = l.refill(&refill, &device, NOW).expect("refill");
            check(&c);
            all.extend(c.changes);
            let sold = sold.min(units);
            let sale = Sale {
                order_id: OrderId::new(id('o', 1, 64)).expect("id"),
                channel: Channel::Pos,
                lines: vec![SaleLine { sku: sku.clone(), unit_id: None, quantity: sold as u32 }],
                payment: Payment {
                    method: PaymentMethod::Cash,
                    amount_minor: 500 * sold as i64,
                    currency: "EUR".into(),
                },
                payment_pending: false,
            };
            match l.sell(&sale, &catalog, &device, NOW + 1) {
                Ok((c, _)) => { check(&c); all.extend(c.changes); }
                Err(LedgerError::TooLarge { .. }) => {}
                Err(e) => panic!("sale: {e}"),
            }
            let left: Vec<UnitId> = l.units(NOW + 2).into_iter()
                .filter(|u| u.state == crate::domain::UnitState::Available)
                .map(|u| u.unit_id).collect();
            let taken = left.len() / 3;
            let session = DoorSession {
                session_id: id('s', 2, 64),
                units_taken: left[..taken].to_vec(),
                units_added: vec![],
                order_id: None,
                card_order_id: Some(OrderId::new(id('c', 1, 64)).expect("id")),
            };
            if taken > 0 {
                match l.door_session(&session, &catalog, &device, NOW + 3) {
                    Ok((c, _)) => { check(&c); all.extend(c.changes); }
                    Err(LedgerError::TooLarge { .. }) => {}
                    Err(e) => panic!("door session: {e}"),
                }
            }
            let removed = &left[taken..(taken + taken).min(left.len())];
            if !removed.is_empty() {
                let c = l.remove(removed, RemovalReason::Damaged, NOW + 4).expect("remove");
                check(&c);
                all.extend(c.changes);
            }
            let incident = Incident {
                kind: "temperature_excursion".into(),
                fridge_id: fridge.clone(),
                since_ms: NOW,
                at_ms: NOW + 5,
                max_celsius: 5.0,
                peak_celsius: 9.0,
                units: vec![],
                units_total: None,
                by: device.clone(),
            };
            let (c, _) = l.quarantine(&incident, NOW + 5).expect("quarantine");
            check(&c);
            all.extend(c.changes);
            let mut replica = Ledger::new(fridge, actor_for(&DeviceId::new("pos-1").expect("id")))
                .expect("ledger");
            replica.apply_changes(&all).expect("merge");
            prop_assert_eq!(replica.state_digest(), l.state_digest());
        }
    }
}
