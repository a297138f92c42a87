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
            let change = doc.get_last_local_change().ok_or_else(|| {
                LedgerError::Document("committed change not found".into())
            })?;
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
