//! Compaction as the region writer runs it: each ledger's finished records archived into a new
//! epoch, dormant epochs retired, and old archive rows, audit rows and stored answers pruned.

use super::*;

/// What one compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompactionReport {
    pub ledgers: Vec<LedgerCompaction>,
    /// Rows of retired epochs deleted.
    pub retired_rows: usize,
    pub pruned_archive: usize,
    pub pruned_audit: usize,
    /// Stored answers to idempotent requests past `compaction.idempotency_retention_hours`.
    pub pruned_answers: usize,
}

/// One ledger moved onto a new epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerCompaction {
    pub fridge_id: FridgeId,
    pub epoch: u32,
    pub archived: usize,
    pub live_units: usize,
    pub live_orders: usize,
    pub base_bytes: usize,
}

impl RegionWriter {
    /// [`Self::compact`], once per Idempotency-Key: a retry gets the first report, the key with
    /// another request is refused. The report is stored after the compaction's own commits, so
    /// a retry after a crash between them compacts again (which finds little left to do).
    pub(super) fn compact_once(
        &mut self,
        archive_before_ms: i64,
        idem: Option<Idem>,
    ) -> Result<CompactionReport, RegionError> {
        match self.replay(idem.as_ref(), &KeptInGroup::new())? {
            Some(Replay::KeyReused) => return Err(RegionError::IdempotencyKeyReused),
            Some(Replay::First(_, first)) => {
                return serde_json::from_value(first).map_err(|e| {
                    RegionError::Storage(format!("a stored answer is unreadable: {e}"))
                });
            }
            None => {}
        }
        let report = self.compact(archive_before_ms)?;
        if let Some(idem) = idem {
            let answer = RegionBatch {
                idempotency: vec![IdempotencyRow {
                    key: idem.key,
                    request_sha256: idem.request_sha256,
                    status: 200,
                    response: serde_json::json!(report).to_string(),
                }],
                ..RegionBatch::default()
            };
            if let Err(e) = self.store.commit(&answer) {
                warn!(region = %self.region, error = %e, "storing a compaction's answer failed; a retry compacts again");
            }
        }
        Ok(report)
    }

    /// Moves every ledger with finished records from before `archive_before_ms` onto a new
    /// epoch, announced in each replica's downlink stream; retires old epochs every active
    /// replica has acknowledged; prunes the archive and the audit log past the retention.
    pub(super) fn compact(
        &mut self,
        archive_before_ms: i64,
    ) -> Result<CompactionReport, RegionError> {
        let now = self.clock.now_ms();
        let storage = |e: StoreError| RegionError::Storage(e.to_string());
        let mut report = CompactionReport::default();
        let devices = self.store.devices().map_err(storage)?;
        for fridge in self.fridges.clone() {
            let Some(ledger) = self.ledgers.get(&fridge) else {
                continue;
            };
            if ledger.waits_for_dependencies() {
                continue;
            }
            let c = ledger
                .compact(archive_before_ms)
                .map_err(|e| RegionError::Storage(format!("compacting {fridge}: {e}")))?;
            if c.archived.is_empty() {
                continue;
            }
            let rebase = larder_shared::envelope::Rebase {
                included: devices
                    .iter()
                    .filter(|(d, _)| d.fridges.contains(&fridge))
                    .map(|(d, p)| (d.device_id.clone(), p.up_hwm))
                    .collect(),
                base: c.base.clone(),
            }
            .encode();
            // The epoch's start must go whole, in one batch of its own (a rebase is never
            // withheld): bounded as `build_batch` bounds an entry.
            if rebase.len() + larder_shared::limits::ENTRY_OVERHEAD_BYTES_MAX
                > self
                    .max_message_bytes
                    .saturating_sub(envelope::ENVELOPE_OVERHEAD_BYTES_MAX + 64)
            {
                warn!(fridge = %fridge, bytes = rebase.len(), limit = self.max_message_bytes,
                    "the live ledger is too large for one message; not compacted (raise mqtt.max_message_bytes)");
                continue;
            }
            self.store
                .start_epoch(&fridge, c.epoch, &rebase, &c.base, &c.archived, now)
                .map_err(storage)?;
            let actor = hub_actor(&self.store.generation().map_err(storage)?.0);
            let next = Ledger::load(fridge.clone(), actor, Some(&c.base), &[])
                .map_err(|e| RegionError::Storage(format!("loading {fridge}'s new epoch: {e}")))?;
            self.ledgers.insert(fridge.clone(), next);
            self.dirty.insert(fridge.clone());
            self.stock_dirty.insert(fridge.clone());
            self.changes_since_snapshot.insert(fridge.clone(), 0);
            info!(region = %self.region, fridge = %fridge, epoch = c.epoch, archived = c.archived.len(),
                live_units = c.live_units, base_bytes = c.base.len(), "ledger compacted into a new epoch");
            report.ledgers.push(LedgerCompaction {
                fridge_id: fridge,
                epoch: c.epoch,
                archived: c.archived.len(),
                live_units: c.live_units,
                live_orders: c.live_orders,
                base_bytes: c.base.len(),
            });
        }
        if !report.ledgers.is_empty() {
            let head = self.store.head().map_err(storage)?;
            raise_head(&self.head_tx, head);
        }
        let active_since = now - (self.compaction.dormant_after_seconds as i64) * 1000;
        for fridge in &self.fridges {
            report.retired_rows += self
                .store
                .retire_epochs(fridge, active_since)
                .map_err(storage)?;
        }
        let keep_since = now - (self.compaction.retention_days as i64) * 86_400_000;
        // Stored answers are stamped with the store's clock, this writer's (`RegionStore::commit`).
        let answers_since = now - (self.compaction.idempotency_retention_hours as i64) * 3_600_000;
        let pruned = self
            .store
            .prune(keep_since, answers_since)
            .map_err(storage)?;
        (
            report.pruned_archive,
            report.pruned_audit,
            report.pruned_answers,
        ) = (pruned.archived, pruned.audit, pruned.answers);
        let labels = vec![("region", self.region.to_string())];
        self.metrics
            .ledgers_compacted
            .get_or_create(&labels)
            .inc_by(report.ledgers.len() as u64);
        self.metrics
            .records_archived
            .get_or_create(&labels)
            .inc_by(report.ledgers.iter().map(|l| l.archived as u64).sum());
        self.metrics
            .epoch_rows_retired
            .get_or_create(&labels)
            .inc_by(report.retired_rows as u64);
        Ok(report)
    }
}
