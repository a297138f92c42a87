//! Uplinks from devices: the batch signature check ahead of the writer, admission by
//! `larder_shared::admission`'s rules, the audit chain's rows, and the merge of accepted changes
//! into the region's ledgers (checked per envelope, applied once per group).

use super::*;

/// Device boxes a region writer or verifier keeps before starting over (a few per device at
/// most).
pub(super) const BOXES_MAX: usize = 65_536;

/// The box of each device key seen, for opening its uplink bodies: the X25519 agreement is done
/// once per key.
#[derive(Debug, Default)]
pub(super) struct Boxes(HashMap<larder_shared::PublicKey, envelope::BoxKey>);

impl Boxes {
    /// Makes room for `more` keys, starting over rather than growing past [`BOXES_MAX`]; done
    /// before a group, so no box of the group is dropped while it is checked.
    pub(super) fn make_room(&mut self, more: usize) {
        if self.0.len().saturating_add(more) > BOXES_MAX {
            self.0.clear();
        }
    }

    pub(super) fn get_or_make(
        &mut self,
        hub_key: &larder_shared::SecretKey,
        key: larder_shared::PublicKey,
    ) -> &envelope::BoxKey {
        self.0
            .entry(key)
            .or_insert_with(|| envelope::BoxKey::new(hub_key, &key))
    }

    pub(super) fn get(&self, key: &larder_shared::PublicKey) -> Option<&envelope::BoxKey> {
        self.0.get(key)
    }
}

/// The sealing box between the hub and a device key, made once and kept.
pub(super) fn device_box<'a>(
    boxes: &'a mut Boxes,
    hub_key: &larder_shared::SecretKey,
    signer: larder_shared::PublicKey,
) -> &'a envelope::BoxKey {
    if boxes.get(&signer).is_none() {
        boxes.make_room(1);
    }
    boxes.get_or_make(hub_key, signer)
}

/// The region's state as uplink admission judges an envelope by it.
pub(super) struct RegionState<'a> {
    ledgers: &'a BTreeMap<FridgeId, Ledger>,
    head: u64,
    hub_key: larder_shared::PublicKey,
}

impl admission::Region for RegionState<'_> {
    fn epoch(&self, ledger: &FridgeId) -> Option<u32> {
        self.ledgers.get(ledger).map(Ledger::epoch)
    }

    fn down_head(&self) -> u64 {
        self.head
    }

    fn hub_key(&self) -> larder_shared::PublicKey {
        self.hub_key
    }
}

/// Batch-checks uplinks (see [`RegionWriter::precheck`]): answers, by the command's place in
/// its group, those that verified and opened. Many are split in two halves checked on two
/// threads.
pub(super) fn precheck_items(items: Vec<PrecheckItem<'_>>) -> HashMap<usize, Prechecked> {
    if items.len() < PRECHECK_SPLIT_MIN {
        return precheck_part(items).into_iter().collect();
    }
    let mut first = items;
    let second = first.split_off(first.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(move || precheck_part(second));
        let mut found: HashMap<usize, Prechecked> = precheck_part(first).into_iter().collect();
        match other.join() {
            Ok(more) => found.extend(more),
            Err(_) => error!("a precheck thread panicked; its envelopes are checked one by one"),
        }
        found
    })
}

/// Batch-checks some of a group's uplinks (see [`precheck_items`]).
pub(super) fn precheck_part(items: Vec<PrecheckItem<'_>>) -> Vec<(usize, Prechecked)> {
    let mut rest = Vec::with_capacity(items.len());
    let mut batch = Vec::with_capacity(items.len());
    for (i, opened, payload, key, device_box) in items {
        rest.push((i, key, device_box));
        batch.push((opened, payload, key));
    }
    let mut opened = Vec::new();
    for ((i, signer, device_box), verified) in rest.into_iter().zip(envelope::verify_batch(batch)) {
        if let Some(envelope) = verified.and_then(|v| v.open_sealed(&[device_box]).ok()) {
            opened.push((i, envelope, signer));
        }
    }
    // The audit head each batch of changes claims: its last entry's chain hash, computed from
    // the links the entries carry (`uplink` checks the first link against the chain it holds).
    let heads: Vec<Option<(u64, [u8; 32])>> = opened
        .iter()
        .map(|(_, envelope, _)| {
            let Body::Changes(b) = &envelope.body else {
                return None;
            };
            let Party::Device(device) = &envelope.header.sender else {
                return None;
            };
            let links = chain_links(device, b.entries.first()?.prev?, &b.entries)?;
            Some((b.entries.last()?.seq, links.last()?.hash))
        })
        .collect();
    let checks: Vec<(usize, larder_shared::audit::Head<'_>)> = opened
        .iter()
        .zip(&heads)
        .enumerate()
        .filter_map(|(k, ((_, envelope, signer), head))| {
            let (seq, hash) = head.as_ref()?;
            let Body::Changes(b) = &envelope.body else {
                return None;
            };
            let Party::Device(device) = &envelope.header.sender else {
                return None;
            };
            Some((
                k,
                larder_shared::audit::Head {
                    key: signer,
                    device,
                    seq: *seq,
                    hash,
                    sig: b.head_sig.as_deref()?,
                },
            ))
        })
        .collect();
    let verdicts =
        larder_shared::audit::verify_heads(&checks.iter().map(|(_, h)| *h).collect::<Vec<_>>());
    let mut head_ok = vec![false; opened.len()];
    for ((k, _), ok) in checks.iter().zip(verdicts) {
        head_ok[*k] = ok;
    }
    drop(checks);
    opened
        .into_iter()
        .zip(heads)
        .zip(head_ok)
        .map(|(((i, envelope, signer), head), ok)| {
            (
                i,
                Prechecked {
                    envelope,
                    signer,
                    head: head.filter(|_| ok),
                },
            )
        })
        .collect()
}

/// One entry's link in a device's audit chain.
pub(super) struct ChainLink {
    prev: [u8; 32],
    hash: [u8; 32],
    /// The SHA-256 of the entry's change.
    digest: [u8; 32],
}

/// The links of `entries` continuing the device's audit chain from `head`; `None` when an
/// entry's link does not follow the one before.
pub(super) fn chain_links(
    device: &DeviceId,
    mut head: [u8; 32],
    entries: &[larder_shared::envelope::Entry],
) -> Option<Vec<ChainLink>> {
    use larder_shared::audit;
    entries
        .iter()
        .map(|e| {
            if e.prev != Some(head) {
                return None;
            }
            let digest = e.change_digest()?;
            let hash = audit::entry_hash(&head, device, e.seq, &e.ledger, e.epoch, &digest);
            let link = ChainLink {
                prev: head,
                hash,
                digest,
            };
            head = hash;
            Some(link)
        })
        .collect()
}

/// Checks that new entries continue the device's audit chain from `head` and that the batch's
/// signature covers their last link (unless the group's batch check already verified that
/// signature, `verified_head`); returns their audit rows.
pub(super) fn audit_rows(
    device: &DeviceId,
    key: &larder_shared::PublicKey,
    head: [u8; 32],
    entries: &[larder_shared::envelope::Entry],
    head_sig: Option<Vec<u8>>,
    verified_head: Option<(u64, [u8; 32])>,
    now: i64,
) -> Result<Vec<crate::store::AuditRow>, &'static str> {
    use larder_shared::audit;
    let links = chain_links(device, head, entries).ok_or("chain_broken")?;
    let mut rows: Vec<crate::store::AuditRow> = entries
        .iter()
        .zip(links)
        .map(|(e, link)| crate::store::AuditRow {
            device: device.clone(),
            seq: e.seq,
            ledger: e.ledger.clone(),
            epoch: e.epoch,
            prev: link.prev,
            hash: link.hash,
            change_sha256: link.digest,
            head_sig: None,
            received_at_ms: now,
        })
        .collect();
    if let Some(last) = rows.last_mut() {
        let sig = head_sig.ok_or("bad_audit_signature")?;
        if verified_head != Some((last.seq, last.hash))
            && !audit::verify_head(key, device, last.seq, &last.hash, &sig)
        {
            return Err("bad_audit_signature");
        }
        last.head_sig = Some(sig);
    }
    Ok(rows)
}

impl RegionWriter {
    /// Checks the signatures of a group's uplinks all at once, under each sender's current
    /// key: the envelopes' signatures in one Ed25519 batch, then the audit heads they carry in
    /// another (a third of the cost of checking each alone, see `keys::verify_batch`). A large
    /// group is split in two halves checked on two threads.
    ///
    /// Uplinks the region's [`verifier`] already checked are not checked again.
    ///
    /// This only saves [`RegionWriter::uplink`] its signature work: `uplink` still decides
    /// every envelope by every rule, and checks one by one whatever is not here (a retired
    /// key's envelope, a forgery, a broken chain). Answers, by the command's place in the
    /// group, the envelopes that verified and opened; `known` gets each sender's device row,
    /// read once for the group (the group's own enrollments and revocations are committed with
    /// it, so they cannot change what these reads answer).
    pub(super) fn precheck(
        &mut self,
        group: &[RegionCommand],
        known: &mut HashMap<DeviceId, (DeviceRecord, Progress)>,
    ) -> HashMap<usize, Prechecked> {
        let mut candidates = Vec::new();
        for (i, cmd) in group.iter().enumerate() {
            let RegionCommand::Uplink {
                topic_device,
                payload,
                pre,
                ..
            } = cmd
            else {
                continue;
            };
            if !known.contains_key(topic_device) {
                let Ok(Some(row)) = self.store.device(topic_device) else {
                    continue;
                };
                known.insert(topic_device.clone(), row);
            }
            if pre.is_some() {
                continue;
            }
            let Ok(opened) = envelope::open(payload, self.max_message_bytes) else {
                continue;
            };
            if !matches!(&opened.header().sender, Party::Device(d) if d == topic_device) {
                continue;
            }
            let Some((record, _)) = known.get(topic_device) else {
                continue;
            };
            if record.revoked_at_ms.is_none() {
                candidates.push((i, opened, payload.as_ref(), record.public_key));
            }
        }
        self.boxes.make_room(candidates.len());
        for (_, _, _, key) in &candidates {
            self.boxes.get_or_make(&self.hub_key, *key);
        }
        let boxes = &self.boxes;
        let items: Vec<PrecheckItem<'_>> = candidates
            .into_iter()
            .filter_map(|(i, opened, payload, key)| {
                Some((i, opened, payload, key, boxes.get(&key)?))
            })
            .collect();
        precheck_items(items)
    }

    /// Checks and stages one envelope from a device's `up` topic; `pre` is what the group's
    /// batch check found of it.
    ///
    /// One piece: admission's steps in order (`larder_shared::admission`), with the writer's own
    /// state between them (its device rows, the batch check's findings, the group's batch).
    pub(super) fn uplink(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        pre: Option<Prechecked>,
        devices: &mut GroupDevices,
        batch: &mut RegionBatch,
        now: i64,
    ) -> UplinkOutcome {
        let reject = |r: Rejection| UplinkOutcome::Rejected(r.reason());
        let opened = match admission::check_header(
            payload,
            self.max_message_bytes,
            &self.region,
            topic_device,
        ) {
            Ok(o) => o,
            Err(r) => return reject(r),
        };
        let h = opened.header().clone();
        let sender = topic_device;
        let (record, stored) = match devices.known.get(sender) {
            Some(d) => d.clone(),
            None => match self.store.device(sender) {
                Ok(Some(d)) => d,
                Ok(None) => return reject(Rejection::UnknownDevice),
                Err(_) => return UplinkOutcome::Rejected("storage"),
            },
        };
        let device = admission::Device {
            id: sender,
            fridges: &record.fridges,
            revoked: record.revoked_at_ms.is_some(),
            key: record.public_key,
        };
        let device = match admission::check_device(Some(&device)) {
            Ok(d) => *d,
            Err(r) => return reject(r),
        };
        // The current key, then any key a rotation retired that is inside its overlap window:
        // those are read only when the batch check did not find the current key's signature.
        let mut keys = vec![record.public_key];
        if pre.as_ref().is_none_or(|p| p.signer != record.public_key)
            && let Ok(retired) = self.store.retired_keys(sender, now)
        {
            keys.extend(retired);
        }
        let (env, signer, verified_head) = match pre.filter(|p| keys.contains(&p.signer)) {
            Some(p) => (p.envelope, p.signer, p.head),
            None => match admission::verify_and_open(opened, payload, &keys, |k| {
                device_box(&mut self.boxes, &self.hub_key, *k)
            }) {
                Ok((env, signer)) => (env, signer, None),
                Err(r) => return reject(r),
            },
        };
        let mut p = *devices.progress.get(sender).unwrap_or(&stored);
        let state = RegionState {
            ledgers: &self.ledgers,
            head: *self.head_tx.borrow(),
            hub_key: self.hub_key.public(),
        };
        let admitted = match admission::admit_body(
            env.body,
            h.seq,
            &device,
            &signer,
            &self.region,
            &state,
            &mut p,
        ) {
            Ok(a) => a,
            Err(r) => return reject(r),
        };
        let outcome = match admitted {
            Admitted::Changes {
                receipt,
                mut receiver,
                head_sig,
            } => {
                let gap = match receipt {
                    Receipt::Apply { entries, up_to } => {
                        let audit = match audit_rows(
                            sender,
                            &signer,
                            p.chain_head,
                            &entries,
                            head_sig,
                            verified_head,
                            now,
                        ) {
                            Ok(rows) => rows,
                            Err(reason) => return UplinkOutcome::Rejected(reason),
                        };
                        let (withheld, entries): (Vec<_>, Vec<_>) = entries
                            .into_iter()
                            .partition(|e| e.kind == EntryKind::Withheld);
                        for e in &withheld {
                            error!(region = %self.region, device = %sender, seq = e.seq, ledger = %e.ledger,
                                "the device withheld a change too large to send; its audit link is kept, the change is not merged");
                            self.metrics.withheld(self.region.as_str(), "up");
                        }
                        if let Err(reason) =
                            self.merge(sender, entries, &mut devices.checked, batch)
                        {
                            return UplinkOutcome::Rejected(reason);
                        }
                        if let Some(last) = audit.last() {
                            p.chain_head = last.hash;
                        }
                        batch.audit.extend(audit);
                        receiver.on_committed(up_to);
                        false
                    }
                    Receipt::Gap => true,
                    // A duplicate changes nothing (a malformed batch was refused above).
                    Receipt::Duplicate | Receipt::Malformed => false,
                };
                p.up_hwm = receiver.hwm();
                UplinkOutcome::Ack(receiver.ack(gap))
            }
            Admitted::DownAcked(up_to) => UplinkOutcome::DownAcked(up_to),
            Admitted::KeyRotation {
                new_key,
                again: true,
            } => UplinkOutcome::KeyRotated(new_key),
            Admitted::KeyRotation { new_key, .. } => {
                if batch.key_rotations.iter().any(|k| &k.device == sender) {
                    // One rotation per device per group: the next waits for this one's commit.
                    return UplinkOutcome::Rejected("rotation_in_progress");
                }
                info!(device = %sender, key = %new_key, "device key rotated");
                batch.key_rotations.push(crate::store::KeyRotationRow {
                    device: sender.clone(),
                    old: signer,
                    new: new_key,
                    at_ms: now,
                    old_until_ms: now.saturating_add(self.key_overlap_ms),
                });
                UplinkOutcome::KeyRotated(new_key)
            }
        };
        devices.progress.insert(sender.clone(), p);
        outcome
    }

    /// Stages accepted entries as change rows; they are merged into the ledgers once per
    /// group by [`RegionWriter::apply_staged`].
    pub(super) fn merge(
        &mut self,
        author: &DeviceId,
        entries: Vec<larder_shared::envelope::Entry>,
        checked: &mut BTreeMap<FridgeId, Checked>,
        batch: &mut RegionBatch,
    ) -> Result<(), &'static str> {
        if entries
            .iter()
            .any(|e| !self.ledgers.contains_key(&e.ledger))
        {
            return Err("foreign_ledger");
        }
        // Each ledger's changes are checked on top of what the group took before them, so a
        // change Automerge or the ledger would refuse costs its own envelope, not the group.
        let mut by_ledger: BTreeMap<&FridgeId, Vec<Vec<u8>>> = BTreeMap::new();
        for e in &entries {
            by_ledger
                .entry(&e.ledger)
                .or_default()
                .push(e.change.clone());
        }
        let mut pieces = Vec::with_capacity(by_ledger.len());
        for (fridge, changes) in by_ledger {
            let before = checked.get(fridge);
            let piece = self
                .ledgers
                .get(fridge)
                .ok_or("foreign_ledger")?
                .check_changes(&changes, before.unwrap_or(&Checked::default()))
                .map_err(|e| {
                    warn!(region = %self.region, device = %author, ledger = %fridge, error = %e, "change refused");
                    "malformed"
                })?;
            pieces.push((fridge.clone(), piece));
        }
        for (fridge, piece) in pieces {
            checked.entry(fridge).or_default().extend(piece);
        }
        for e in entries {
            let hash: [u8; 32] = sha2::Sha256::digest(&e.change).into();
            // A change of the hub's the device gave back (admission checked the signature) is
            // stored as the hub's, so the next restore can have it back too.
            let author = match e.hub_sig {
                Some(_) => ledger::hub_device(),
                None => author.clone(),
            };
            batch.changes.push(StoredChange {
                ledger: e.ledger,
                author,
                epoch: e.epoch,
                hash,
                bytes: e.change,
                hub_sig: e.hub_sig,
            });
        }
        Ok(())
    }

    /// Merges every change staged in the group into its ledger with one Automerge apply per
    /// ledger (an apply walks the maps it touches, so one per group rather than one per
    /// envelope), and stages the projection rows.
    pub(super) fn apply_staged(
        &mut self,
        batch: &mut RegionBatch,
        by_ledger: BTreeMap<FridgeId, Checked>,
    ) -> Result<(), String> {
        let hub = ledger::hub_device();
        let mut authors: BTreeMap<FridgeId, std::collections::BTreeSet<DeviceId>> = BTreeMap::new();
        for c in &batch.changes {
            // The hub's own changes are in its ledgers already.
            if c.author == hub {
                continue;
            }
            authors
                .entry(c.ledger.clone())
                .or_default()
                .insert(c.author.clone());
        }
        let now = self.clock.now_ms();
        self.dirty.extend(by_ledger.keys().cloned());
        self.stock_dirty.extend(by_ledger.keys().cloned());
        for (fridge, changes) in by_ledger {
            let ledger = self
                .ledgers
                .get_mut(&fridge)
                .ok_or_else(|| format!("no ledger {fridge}"))?;
            let touched: Touched = ledger.apply_checked(changes).map_err(|e| e.to_string())?;
            for unit in &touched.units {
                if let Some(v) = ledger.unit(unit, i64::MIN) {
                    batch.units.push((fridge.clone(), v));
                }
            }
            for order in &touched.orders {
                if let Some(v) = ledger.order(order) {
                    batch.orders.push(v);
                }
            }
            let fridge_online = authors.get(&fridge).is_some_and(|a| {
                a.iter().any(|d| {
                    matches!(self.store.device(d), Ok(Some((r, _))) if r.role == larder_shared::domain::Role::Fridge)
                })
            });
            self.after_merge(&fridge, &touched, fridge_online, batch, now)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// What the hub does after merging a ledger's changes from devices: moves reservations
    /// whose units left, records the conflicts the merge revealed (one record each), and
    /// hands back escrow above the target of a fridge that is online (it just sent).
    pub(super) fn after_merge(
        &mut self,
        fridge: &FridgeId,
        touched: &Touched,
        fridge_online: bool,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<(), larder_shared::ledger::LedgerError> {
        let Some(ledger) = self.ledgers.get_mut(fridge) else {
            return Ok(());
        };
        let (changes, found) =
            ledger.hub_after_merge(touched, fridge_online, Some(&self.catalog_history), now)?;
        for c in &found {
            self.after_commit.push(crate::events::EventKind::Conflict {
                conflict: c.clone(),
            });
            self.metrics
                .conflicts
                .get_or_create(&vec![
                    ("region", self.region.to_string()),
                    ("kind", c.kind.as_str().to_owned()),
                ])
                .inc();
        }
        for c in changes {
            self.hub_change(fridge, c, batch);
        }
        Ok(())
    }
}
