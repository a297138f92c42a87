//! Changes from elsewhere: checked (authors, the ledger's own objects, what Automerge accepts)
//! before they are merged, so a bad change costs its own envelope and never the ledger.

use super::*;

impl Ledger {
    /// Merges changes from another replica (already checked for authorship by the caller).
    /// Changes already present are ignored. Checked first as a whole: on an error nothing is
    /// applied.
    ///
    /// What a change touched is read from its own ops (every op of a ledger is a put into one
    /// of the flat root maps), which costs far less than asking Automerge for patches.
    pub fn apply_changes(&mut self, changes: &[Vec<u8>]) -> Result<Touched, LedgerError> {
        let checked = self.check_changes(changes, &Checked::default())?;
        self.apply_checked(checked)
    }

    /// Checks changes from another replica as [`Self::apply_changes`] would, without applying
    /// them: on top of this document and the changes `before` (checked earlier and not yet
    /// applied, such as the other envelopes of a group), so that one peer's bad change can be
    /// refused on its own rather than failing everything merged with it.
    pub fn check_changes(
        &self,
        changes: &[Vec<u8>],
        before: &Checked,
    ) -> Result<Checked, LedgerError> {
        let mut checked = Checked::default();
        for bytes in changes {
            let mut touched = Touched::default();
            change_check::check_chunk(bytes)?;
            let change = Change::from_bytes(bytes.clone())
                .map_err(|e| LedgerError::BadChange(e.to_string()))?;
            // A change this replica already holds (the genesis among them) is a no-op.
            if self.doc.get_change_meta_by_hash(&change.hash()).is_some()
                || before.hashes.contains(&change.hash())
                || checked.hashes.contains(&change.hash())
            {
                continue;
            }
            change_check::check_op_actors(&change)?;
            for op in change.decode().operations {
                // Every op of a ledger is a put into one of its root maps. Automerge 0.12
                // panics on an op whose object the document does not have (found by the
                // `body` fuzz target), so anything else is refused before it is applied.
                if !self.is_ledger_object(&op.obj) {
                    return Err(LedgerError::BadChange(format!(
                        "change {} has an op outside the ledger's maps",
                        change.hash()
                    )));
                }
                let automerge::legacy::Key::Map(key) = op.key else {
                    return Err(LedgerError::BadChange(format!(
                        "change {} has a list op; a ledger holds maps only",
                        change.hash()
                    )));
                };
                touch(&mut touched, key.as_str());
            }
            checked.hashes.insert(change.hash());
            checked.changes.push(change);
            checked.touched.extend(touched.clone());
            checked.each.push(touched);
        }
        self.check_actors(&checked.changes, before)?;
        Ok(checked)
    }

    /// Applies changes [`Self::check_changes`] passed, with what they touched.
    ///
    /// A change whose dependencies this replica lacks waits, unapplied, in Automerge's queue;
    /// what it touches is answered again once a later merge brings what it waits for.
    pub fn apply_checked(&mut self, checked: Checked) -> Result<Touched, LedgerError> {
        let Checked {
            changes,
            mut touched,
            each,
            ..
        } = checked;
        let hashes: Vec<automerge::ChangeHash> = changes.iter().map(Change::hash).collect();
        self.doc.apply_changes(changes)?;
        for (hash, t) in hashes.into_iter().zip(each) {
            if self.doc.get_change_meta_by_hash(&hash).is_none() {
                self.queued.insert(hash, t);
            }
        }
        if !self.queued.is_empty() {
            let applied: Vec<automerge::ChangeHash> = self
                .queued
                .keys()
                .filter(|h| self.doc.get_change_meta_by_hash(h).is_some())
                .copied()
                .collect();
            for hash in applied {
                if let Some(t) = self.queued.remove(&hash) {
                    touched.extend(t);
                }
            }
        }
        for unit in &touched.units {
            self.reindex(unit);
        }
        self.widen(&mut touched);
        Ok(touched)
    }

    /// Whether an op's object is the document's root or one of the ledger's maps.
    pub(super) fn is_ledger_object(&self, obj: &automerge::legacy::ObjectId) -> bool {
        // The root holds the maps themselves, written by the genesis change every replica
        // builds for itself: a peer's op there could replace a map.
        let automerge::legacy::ObjectId::Id(op) = obj else {
            return false;
        };
        MAP_NAMES.iter().map(|name| self.maps.get(name)).any(|id| {
            matches!(id, ObjId::Id(counter, actor, _)
                if *counter == op.counter() && actor == op.actor())
        })
    }

    /// Refuses changes that name an actor the document does not know, unless the same batch
    /// brings that actor's first change with its dependencies. Automerge 0.12 panics on such a
    /// change instead of returning an error (found by the `body` fuzz target), and a peer's
    /// bytes must never reach a panic.
    pub(super) fn check_actors(
        &self,
        changes: &[Change],
        before: &Checked,
    ) -> Result<(), LedgerError> {
        // The actors whose first change comes in this batch or in the changes checked before
        // it, ready to apply: only worked out when an actor is not already known, so a batch
        // of known authors costs set lookups.
        let firsts = std::cell::OnceCell::new();
        let firsts = || {
            firsts.get_or_init(|| {
                let hashes: std::collections::HashSet<_> =
                    changes.iter().map(Change::hash).collect();
                let has = |h: &automerge::ChangeHash| {
                    hashes.contains(h)
                        || before.hashes.contains(h)
                        || self.doc.get_change_meta_by_hash(h).is_some()
                };
                changes
                    .iter()
                    .chain(&before.changes)
                    .filter(|c| c.seq() == 1 && c.deps().iter().all(has))
                    .map(Change::actor_id)
                    .collect::<std::collections::HashSet<&ActorId>>()
            })
        };
        let mut known = self.actors.borrow_mut();
        for change in changes {
            for actor in change.actors() {
                if known.as_ref().is_some_and(|k| k.contains(actor)) || firsts().contains(actor) {
                    continue;
                }
                // Not cached: read the document's actors again (it may have grown).
                let now = self.document_actors();
                let found = now.contains(actor);
                *known = Some(now);
                if !found {
                    return Err(LedgerError::BadChange(format!(
                        "change {} names actor {actor}, unknown to this ledger",
                        change.hash()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every actor with a change in the document.
    pub(super) fn document_actors(&self) -> std::collections::HashSet<ActorId> {
        self.doc
            .get_changes_meta(&[])
            .into_iter()
            .map(|m| m.actor.into_owned())
            .collect()
    }

    /// Checks that every change parses and is authored by `actor`, without applying anything.
    pub fn check_authors(changes: &[Vec<u8>], actor: &ActorId) -> Result<(), LedgerError> {
        for bytes in changes {
            change_check::check_chunk(bytes)?;
            let change = Change::try_from(bytes.as_slice())
                .map_err(|e| LedgerError::BadChange(e.to_string()))?;
            if change.actor_id() != actor {
                return Err(LedgerError::ForeignActor);
            }
        }
        Ok(())
    }
}

/// Adds what a put under `key` touches: keys of `events` are `{order}/...`; other keys are unit
/// or order ids, and projecting an id that is not one is a cheap no-op.
fn touch(touched: &mut Touched, key: &str) {
    match key.split_once('/') {
        Some((order, _)) => {
            if let Ok(id) = OrderId::new(order) {
                touched.orders.insert(id);
            }
        }
        None => {
            if let Ok(id) = UnitId::new(key) {
                touched.units.insert(id);
            }
            if let Ok(id) = OrderId::new(key) {
                touched.orders.insert(id);
            }
        }
    }
}

/// What a change touches, read from its ops' keys (a change already checked or stored).
pub(super) fn touched_by(change: &Change) -> Touched {
    let mut touched = Touched::default();
    for op in change.decode().operations {
        if let automerge::legacy::Key::Map(key) = op.key {
            touch(&mut touched, key.as_str());
        }
    }
    touched
}
