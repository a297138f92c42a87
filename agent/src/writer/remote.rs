//! The hub's downlink: remote changes merged into the device's ledgers in runs, and rebases onto
//! a ledger's new epoch after the hub compacted it.

use super::*;

/// A downlink entry staged for the group's merge, in stream order.
#[derive(Debug)]
pub(super) enum Remote {
    Change { epoch: u32, bytes: Vec<u8> },
    Rebase { epoch: u32, rebase: Rebase },
}

/// Whether a command is a downlink batch that starts a ledger's new epoch (processed in a
/// group of its own, so no local change of the group is left on the old epoch).
pub(super) fn starts_epoch(cmd: &Command) -> bool {
    matches!(cmd, Command::Downlink { batch, .. }
        if batch.entries.iter().any(|e| e.kind == EntryKind::Rebase))
}

impl Writer {
    /// Stages forgetting the outbox up to what the hub acknowledged, if not done yet.
    pub(super) fn forget_acked(&mut self, batch: &mut WriteBatch) {
        if self.hub_acked > self.counters.up_acked && self.hub_acked <= self.counters.outbox_head {
            self.counters.up_acked = self.hub_acked;
            batch.outbox_forget_up_to = Some(self.hub_acked);
        }
    }

    /// An acknowledgement named the hub store's `generation` and held this device's stream up
    /// to `up_to`. A generation other than the last one seen (not the first one: a device from
    /// before generations, or a new one, has nothing to doubt) means the store was restored or
    /// rebuilt and may lack what the one before acknowledged: the outbox is offered again from
    /// `up_to` (the changes acknowledged since are kept for this, see
    /// `store::SENT_CHANGES_KEPT`), the hub's own changes the store may lack, by where it began
    /// (`origin`), are given back at the outbox's head, and the downlink starts again where the
    /// hub stands. Answers the position to send from, or `None` if the generation could not be
    /// taken (the next acknowledgement asks again).
    pub(super) fn hub_generation(
        &mut self,
        generation: Generation,
        up_to: u64,
        origin: Option<Origin>,
        batch: &mut WriteBatch,
    ) -> Option<u64> {
        let seen = self.counters.hub_generation;
        if seen == Some(generation) {
            return Some(self.counters.up_acked);
        }
        let give_back = match seen {
            None => Vec::new(),
            Some(_) => match self.store.hub_changes_lacked(origin) {
                Ok(kept) => kept,
                Err(e) => {
                    error!(error = %e, "reading the hub's changes to give back failed");
                    return None;
                }
            },
        };
        self.counters.hub_generation = Some(generation);
        batch
            .meta
            .push((store::META_HUB_GENERATION, generation.to_string()));
        if seen.is_none() {
            return Some(self.counters.up_acked);
        }
        let from = up_to.min(self.counters.up_acked);
        warn!(
            %generation,
            was = ?seen,
            hub_holds = up_to,
            acknowledged = self.counters.up_acked,
            ?origin,
            hub_changes = give_back.len(),
            "the hub's store is of a new generation (restored or rebuilt): offering again what it lacks"
        );
        self.shared.metrics.hub_generations.inc();
        self.shared
            .metrics
            .changes_reoffered
            .inc_by(self.counters.up_acked - from);
        // The position goes back; the outbox's head never does (no number is handed out twice).
        self.counters.up_acked = from;
        self.hub_acked = from;
        self.counters.down_restart = true;
        // An acknowledgement of the lost store taken earlier in this group is void.
        batch.outbox_forget_up_to = None;
        batch.meta.extend([
            (store::META_UP_ACKED, from.to_string()),
            (
                store::META_OUTBOX_FLOOR,
                self.counters.outbox_head.to_string(),
            ),
            (store::META_DOWN_RESTART, "1".to_owned()),
        ]);
        let mut given = 0;
        for c in give_back {
            // A change of an epoch the ledger has left is in the new epoch's base already.
            if self.ledgers.get(&c.fridge).map(Ledger::epoch) == Some(c.epoch) {
                self.push_outbox(&c.fridge, c.epoch, c.bytes, Some(c.sig), batch);
                given += 1;
            }
        }
        self.shared.metrics.hub_changes_given_back.inc_by(given);
        Some(from)
    }

    /// Takes a downlink batch: its new entries are staged in `remote` and merged once per
    /// group by [`Writer::apply_remote`]. Returns the ack to send once the group committed.
    ///
    /// The first batch after the hub's store changed generation sets the stream's position:
    /// the restored hub numbers its downlink from where its store stands, and what the device
    /// already holds of it merges again as nothing new.
    pub(super) fn downlink(
        &mut self,
        down: Batch,
        remote: &mut BTreeMap<FridgeId, Vec<Remote>>,
        batch: &mut WriteBatch,
    ) -> Ack {
        if self.counters.down_restart {
            let from = down.after.min(self.counters.down.hwm());
            info!(
                from,
                was = self.counters.down.hwm(),
                "downlink restarted at the hub's position"
            );
            self.counters.down = StreamReceiver::new(from);
            self.counters.down_restart = false;
        }
        match self.counters.down.on_batch(down) {
            Receipt::Apply { entries, up_to } => {
                for e in entries {
                    if !self.ledgers.contains_key(&e.ledger) {
                        warn!(fridge = %e.ledger, "downlink change for a ledger not held here; skipped");
                        continue;
                    }
                    let item = match e.kind {
                        EntryKind::Change => {
                            if let Some(sig) = e.hub_sig {
                                // The hub's own change: kept to give back should its store
                                // lose it.
                                batch.hub_changes.push(store::HubChange {
                                    generation: self.counters.hub_generation,
                                    down_seq: e.seq,
                                    fridge: e.ledger.clone(),
                                    epoch: e.epoch,
                                    bytes: e.change.clone(),
                                    sig,
                                });
                            }
                            Remote::Change {
                                epoch: e.epoch,
                                bytes: e.change,
                            }
                        }
                        EntryKind::Withheld => {
                            error!(fridge = %e.ledger, seq = e.seq, "the hub withheld a change too large for a message; skipped");
                            self.shared
                                .metrics
                                .changes_withheld
                                .get_or_create(&vec![("direction", "down".to_owned())])
                                .inc();
                            continue;
                        }
                        EntryKind::Rebase => match Rebase::decode(&e.change) {
                            Ok(rebase) => Remote::Rebase {
                                epoch: e.epoch,
                                rebase,
                            },
                            Err(err) => {
                                self.shared.metrics.downlink_rejected.inc();
                                error!(fridge = %e.ledger, error = %err, "unreadable epoch start from the hub; skipped");
                                continue;
                            }
                        },
                    };
                    remote.entry(e.ledger).or_default().push(item);
                }
                self.counters.down.on_committed(up_to);
                self.shared.metrics.downlink_batches.inc();
                self.counters.down.ack(false)
            }
            Receipt::Duplicate => self.counters.down.ack(false),
            Receipt::Gap => self.counters.down.ack(true),
            Receipt::Malformed => {
                self.shared.metrics.downlink_rejected.inc();
                warn!("malformed downlink batch refused");
                self.counters.down.ack(false)
            }
        }
    }

    /// Merges the group's downlink entries per ledger, in stream order: runs of changes of the
    /// ledger's current epoch with one Automerge apply each (an apply walks the maps it
    /// touches), a new epoch by [`Writer::rebase`]; changes of an older epoch are already in the
    /// newer epoch's base and are skipped. Stages the rows and projections.
    pub(super) fn apply_remote(
        &mut self,
        remote: BTreeMap<FridgeId, Vec<Remote>>,
        batch: &mut WriteBatch,
        touched_fridges: &mut HashMap<FridgeId, usize>,
    ) -> Result<(), StoreError> {
        for (fridge, items) in remote {
            let mut run: Vec<Vec<u8>> = Vec::new();
            let mut rebased = false;
            for item in items {
                let current = self.ledgers.get(&fridge).map_or(0, Ledger::epoch);
                match item {
                    Remote::Change { epoch, bytes } if epoch == current => run.push(bytes),
                    Remote::Change { epoch, .. } => {
                        if epoch > current {
                            warn!(fridge = %fridge, epoch, current, "change of a later epoch before its start; skipped");
                        }
                    }
                    Remote::Rebase { epoch, rebase } => {
                        if epoch <= current {
                            continue;
                        }
                        self.merge_run(&fridge, std::mem::take(&mut run), batch, touched_fridges);
                        self.rebase(&fridge, epoch, rebase, batch)?;
                        rebased = true;
                    }
                }
            }
            self.merge_run(&fridge, run, batch, touched_fridges);
            if rebased {
                // The projection of a rebased ledger is rebuilt whole.
                batch.units.retain(|(f, _)| f != &fridge);
                batch.orders.retain(|o| o.record.fridge_id != fridge);
                if let Some(ledger) = self.ledgers.get(&fridge) {
                    batch.units.extend(
                        ledger
                            .units(i64::MIN)
                            .into_iter()
                            .map(|u| (fridge.clone(), u)),
                    );
                    batch
                        .orders
                        .extend(ledger.order_ids().iter().filter_map(|o| ledger.order(o)));
                }
                self.changes_since_snapshot.insert(fridge.clone(), 0);
            }
        }
        Ok(())
    }

    pub(super) fn merge_run(
        &mut self,
        fridge: &FridgeId,
        changes: Vec<Vec<u8>>,
        batch: &mut WriteBatch,
        touched_fridges: &mut HashMap<FridgeId, usize>,
    ) {
        if changes.is_empty() {
            return;
        }
        let Some(ledger) = self.ledgers.get_mut(fridge) else {
            return;
        };
        let epoch = ledger.epoch();
        match ledger.apply_changes(&changes) {
            Ok(touched) => {
                *touched_fridges.entry(fridge.clone()).or_default() += changes.len();
                for bytes in changes {
                    batch.changes.push(ChangeRow {
                        fridge: fridge.clone(),
                        epoch,
                        outbox_seq: None,
                        chain: None,
                        bytes,
                        hub_sig: None,
                    });
                }
                self.project(fridge, &touched, batch);
            }
            Err(e) => {
                self.shared.metrics.downlink_rejected.inc();
                error!(fridge = %fridge, error = %e, "hub sent changes that do not apply; skipped");
            }
        }
    }

    /// Moves a ledger onto the hub's new epoch: loads its base, carries over this device's
    /// changes the hub did not have when it compacted (as one new local change), archives what
    /// left the live document, and re-links the outbox's audit chain, whose old-epoch entries
    /// for this ledger are replaced by the carried change.
    pub(super) fn rebase(
        &mut self,
        fridge: &FridgeId,
        epoch: u32,
        rebase: Rebase,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        // The archive grows at rebases only: prune it here past its retention.
        let keep_since =
            self.clock.now_ms() - (self.limits.archive_retention_days as i64) * 86_400_000;
        match self.store.prune_archive(keep_since) {
            Ok(0) => {}
            Ok(n) => info!(records = n, "pruned the archive past its retention"),
            Err(e) => {
                warn!(error = %e, "pruning the archive failed; will retry at the next rebase")
            }
        }
        let included = rebase
            .included
            .iter()
            .find(|(d, _)| d == &self.device)
            .map_or(0, |(_, seq)| *seq);
        let carry = self.store.local_changes_after(fridge, included)?;
        let Some(ledger) = self.ledgers.get(fridge) else {
            return Ok(());
        };
        let rebased = ledger
            .rebase(&rebase.base, &carry, ledger::actor_for(&self.device))
            .map_err(|e| StoreError::Corrupt(format!("rebase of {fridge}: {e}")))?;
        if rebased.ledger.epoch() != epoch {
            return Err(StoreError::Corrupt(format!(
                "rebase of {fridge}: the base is epoch {}, announced as {epoch}",
                rebased.ledger.epoch()
            )));
        }
        // Re-link the audit chain of the outbox after the last acknowledged change.
        let acked = self.store.chain_at_or_before(self.counters.up_acked)?;
        let mut head = acked.map_or(larder_shared::audit::GENESIS, |(_, h)| h);
        if let Some(link) = acked {
            batch
                .meta
                .push((store::META_CHAIN_ACKED, store::chain_link_text(link)));
        }
        for row in self.store.outbox_rows_after(self.counters.up_acked)? {
            // This ledger's changes the hub did not have are replaced by the carried change;
            // those it had stay links of the chain, though their rows go with the old epoch.
            if &row.fridge == fridge && row.seq > included {
                continue;
            }
            let hash = larder_shared::audit::entry_hash(
                &head,
                &self.device,
                row.seq,
                &row.fridge,
                row.epoch,
                &larder_shared::audit::change_digest(&row.bytes),
            );
            batch.rechain.push((row.seq, head, hash));
            head = hash;
        }
        self.counters.chain_head = head;
        batch.meta.push((
            store::META_OUTBOX_FLOOR,
            self.counters.outbox_head.to_string(),
        ));
        info!(
            fridge = %fridge,
            epoch,
            carried = carry.len(),
            archived = rebased.archived.len(),
            skipped = rebased.skipped,
            "ledger moved onto its new epoch"
        );
        batch.rebases.push(RebaseWrite {
            fridge: fridge.clone(),
            epoch,
            base: rebase.base,
            archived: rebased.archived,
        });
        self.ledgers.insert(fridge.clone(), rebased.ledger);
        if !rebased.changes.is_empty() {
            self.record_local(
                fridge,
                LocalChange {
                    changes: rebased.changes,
                    touched: Touched::default(),
                    units: Vec::new(),
                    orders: Vec::new(),
                },
                batch,
            );
        }
        Ok(())
    }
}
