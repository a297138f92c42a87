//! A check of a peer's Automerge change that Automerge 0.12 does not make: every actor number
//! in the change's op columns must name an actor of the change's own actor table. Automerge
//! parses such a change without complaint and then panics (an `unwrap` in `Change::decode`
//! and when applying it); found by the `body` fuzz target.
//!
//! The layout read here is Automerge's binary change chunk (automerge.org/docs/reference/
//! specification): header (magic, checksum, chunk type, length), dependencies, actor, seq,
//! start op, time, message, other actors, column metadata, column data. Actor columns (column
//! type 1) are run-length encoded unsigned LEB128 numbers.

use automerge::Change;

use super::LedgerError;

/// The column type of actor-number columns.
const ACTOR_COLUMN: u64 = 1;

/// The chunk type of an uncompressed change.
const CHANGE_CHUNK: u8 = 1;

/// Refuses anything but an uncompressed change chunk, before Automerge parses it: Automerge
/// inflates a compressed one (chunk type 2) without a bound, so a small envelope could make
/// hundreds of megabytes. Replicas send their changes uncompressed (`raw_bytes`).
pub(super) fn check_chunk(bytes: &[u8]) -> Result<(), LedgerError> {
    match bytes.get(8) {
        Some(&CHANGE_CHUNK) => Ok(()),
        Some(other) => Err(LedgerError::BadChange(format!(
            "a chunk of type {other}: only uncompressed changes (type 1) are taken"
        ))),
        None => Err(LedgerError::BadChange(
            "a change shorter than its header".into(),
        )),
    }
}

/// Refuses a change whose op columns name an actor its actor table does not hold.
pub(super) fn check_op_actors(change: &Change) -> Result<(), LedgerError> {
    let actors = 1 + change.other_actor_ids().len() as u64;
    op_actors_within(change.raw_bytes(), actors)
        .map_err(|what| LedgerError::BadChange(format!("change {}: {what}", change.hash())))
}

fn op_actors_within(chunk: &[u8], actors: u64) -> Result<(), &'static str> {
    let mut r = Reader(chunk);
    // Magic bytes, checksum, chunk type, then the contents' length.
    r.take(9)?;
    r.uleb()?;
    let deps = r.uleb()?;
    for _ in 0..deps {
        r.take(32)?;
    }
    let actor_len = r.uleb()?;
    r.take(actor_len)?;
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.sleb()?; // time
    let message_len = r.uleb()?;
    r.take(message_len)?;
    let others = r.uleb()?;
    for _ in 0..others {
        let len = r.uleb()?;
        r.take(len)?;
    }
    let columns = r.uleb()?;
    let mut specs = Vec::new();
    for _ in 0..columns {
        let spec = r.uleb()?;
        let len = r.uleb()?;
        specs.push((spec, len));
    }
    for (spec, len) in specs {
        let data = r.take(len)?;
        if spec & 0b111 == ACTOR_COLUMN {
            actor_column_within(data, actors)?;
        }
    }
    Ok(())
}

/// Walks a run-length encoded column of actor numbers: a signed count, then one value
/// repeated (count > 0), `-count` literal values (count < 0), or a run of nulls (count = 0).
fn actor_column_within(column: &[u8], actors: u64) -> Result<(), &'static str> {
    let mut r = Reader(column);
    let check = |actor: u64| {
        if actor < actors {
            Ok(())
        } else {
            Err("an op names an actor outside the change's actor table")
        }
    };
    while !r.0.is_empty() {
        let count = r.sleb()?;
        if count > 0 {
            check(r.uleb()?)?;
        } else if count < 0 {
            // Each literal takes at least a byte, so a huge count ends at the column's end.
            for _ in 0..count.unsigned_abs() {
                check(r.uleb()?)?;
            }
        } else {
            r.uleb()?;
        }
    }
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(n).map_err(|_| "a length past the change's end")?;
        if n > self.0.len() {
            return Err("a length past the change's end");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        let (&b, rest) = self.0.split_first().ok_or("the change ends early")?;
        self.0 = rest;
        Ok(b)
    }

    fn uleb(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number longer than 64 bits")
    }

    fn sleb(&mut self) -> Result<i64, &'static str> {
        let mut value = 0i64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= i64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if shift + 7 < 64 && b & 0x40 != 0 {
                    value |= -1i64 << (shift + 7);
                }
                return Ok(value);
            }
        }
        Err("a number longer than 64 bits")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_columns_are_checked_against_the_table() {
        // Runs: 3 x actor 0, then literals 1 and 0, then 2 nulls.
        let column = [0x03, 0x00, 0x7e, 0x01, 0x00, 0x00, 0x02];
        assert_eq!(actor_column_within(&column, 2), Ok(()));
        assert!(
            actor_column_within(&column, 1).is_err(),
            "actor 1 of a table of 1"
        );
        // A repeated run naming actor 5.
        assert!(actor_column_within(&[0x02, 0x05], 3).is_err());
        // A literal run claiming more values than the column holds.
        assert!(actor_column_within(&[0x40, 0x00], 3).is_err());
        assert!(actor_column_within(&[0x80], 3).is_err(), "a cut-off number");
    }

    #[test]
    fn real_changes_pass() {
        let mut doc = automerge::AutoCommit::new();
        use automerge::transaction::Transactable;
        let map = doc
            .put_object(automerge::ROOT, "m", automerge::ObjType::Map)
            .expect("map");
        doc.put(&map, "k", "v").expect("put");
        doc.put(&map, "k", "w").expect("put");
        let mut other = doc.fork();
        other.put(&map, "k", "x").expect("put");
        doc.merge(&mut other).expect("merge");
        doc.put(&map, "k", "y").expect("put");
        for change in doc.get_changes(&[]) {
            check_op_actors(&change).expect("a well-formed change");
        }
    }
}
