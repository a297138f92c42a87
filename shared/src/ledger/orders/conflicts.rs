//! Conflicts between merged changes (a unit sold twice, a reservation on a sold unit, a price
//! changed under a sale), their automatic repairs, and the kitchen's resolutions.

use super::*;

impl Ledger {
    /// Reservations to move because their unit left (sold or taken by someone else, removed,
    /// expired, or in `also_gone`), each to a free unit of the same sku; orders left short
    /// become `reservation_lost` conflicts. Returns the moves, the units to release and the
    /// conflicts.
    #[allow(clippy::type_complexity)]
    pub(in crate::ledger) fn plan_repairs(
        &self,
        also_gone: &BTreeSet<UnitId>,
        now_ms: i64,
    ) -> (Vec<(UnitId, OrderId)>, Vec<UnitId>, Vec<ConflictRecord>) {
        let mut moves = Vec::new();
        let mut release = Vec::new();
        let mut lost = Vec::new();
        let mut claimed: BTreeSet<UnitId> = BTreeSet::new();
        for (o, record, _, _) in self.holding_orders() {
            let held: Vec<UnitId> = self
                .reserved_by_order
                .get(&o)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for line in &record.lines {
                let mut have = 0u32;
                let mut missing = Vec::new();
                for u in &held {
                    let Some(f) = self.unit_facts(u) else {
                        continue;
                    };
                    if f.sku != line.sku || self.gone(u) {
                        if f.sku == line.sku {
                            missing.push(u.clone());
                        }
                        continue;
                    }
                    if also_gone.contains(u) || f.expires_at_ms <= now_ms {
                        missing.push(u.clone());
                        if f.expires_at_ms <= now_ms {
                            release.push(u.clone());
                        }
                        continue;
                    }
                    have += 1;
                }
                if have >= line.quantity {
                    continue;
                }
                let need = (line.quantity - have) as usize;
                let candidates: Vec<UnitId> = self
                    .free_units(&line.sku, now_ms)
                    .into_iter()
                    .filter(|u| !also_gone.contains(u) && !claimed.contains(u))
                    .take(need)
                    .collect();
                for u in &candidates {
                    claimed.insert(u.clone());
                    moves.push((u.clone(), o.clone()));
                }
                if candidates.len() < need {
                    lost.push(ConflictRecord {
                        conflict_id: format!("reservation_lost:{}:{o}", self.fridge),
                        kind: ConflictKind::ReservationLost,
                        fridge_id: self.fridge.clone(),
                        sku: Some(line.sku.clone()),
                        orders: vec![o.clone()],
                        units: missing,
                        flagged_order: Some(o.clone()),
                        detail: format!(
                            "a unit of {} held for order {o} was taken or removed and no other unit of it is left here",
                            line.sku
                        ),
                    });
                }
            }
        }
        (moves, release, lost)
    }

    /// Moves reservations whose units left and records `reservation_lost` where none is left
    /// (the hub runs this after merging). `None` when nothing changes.
    pub fn repair_reservations(&mut self, now_ms: i64) -> Result<Option<LocalChange>, LedgerError> {
        let (moves, release, lost) = self.plan_repairs(&BTreeSet::new(), now_ms);
        let lost: Vec<ConflictRecord> = lost
            .into_iter()
            .filter(|c| !self.has(&self.maps.conflicts, &c.conflict_id))
            .collect();
        if moves.is_empty() && release.is_empty() && lost.is_empty() {
            return Ok(None);
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for (u, o) in &moves {
            tx.put(&self.maps.reserved, u.as_str(), o.as_str());
            touched.units.insert(u.clone());
            touched.orders.insert(o.clone());
        }
        for u in &release {
            tx.put(&self.maps.reserved, u.as_str(), "");
            touched.units.insert(u.clone());
        }
        for c in &lost {
            tx.put(&self.maps.conflicts, c.conflict_id.as_str(), to_json(c));
            touched.orders.extend(c.orders.iter().cloned());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for u in &touched.units {
            self.reindex(u);
        }
        Ok(Some(self.last_local_change(touched, changes)?))
    }

    /// The conflicts the document shows among `units` and `orders` (every one when both are
    /// `None`): double sales, oversells by count and cancels that met a pickup.
    pub fn detect_conflicts(&self, scope: Option<&Touched>) -> Vec<ConflictRecord> {
        let mut out = Vec::new();
        let units: Vec<String> = match scope {
            Some(t) => t.units.iter().map(|u| u.to_string()).collect(),
            None => self.doc.keys(&self.maps.sold).collect(),
        };
        for unit in units {
            let orders: BTreeSet<String> = self
                .doc
                .get_all(&self.maps.sold, unit.as_str())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(v, _)| v.as_str().map(str::to_owned))
                .collect();
            if orders.len() < 2 {
                continue;
            }
            let mut records: Vec<Arc<OrderRecord>> = orders
                .iter()
                .filter_map(|o| OrderId::new(o.as_str()).ok())
                .filter_map(|o| self.record(&o))
                .collect();
            if records.len() < 2 {
                continue;
            }
            records.sort_by(|a, b| {
                (a.created_at_ms, &a.order_id).cmp(&(b.created_at_ms, &b.order_id))
            });
            let unit_id = UnitId::new(unit.as_str()).ok();
            let sku = unit_id
                .as_ref()
                .and_then(|u| self.unit_facts(u))
                .map(|f| f.sku);
            let all: Vec<OrderId> = records.iter().map(|r| r.order_id.clone()).collect();
            // The first sale stands; every later one is flagged, each in a record of its own
            // (keyed by the order, not the kind, so a record is never made twice for one
            // order). An order once flagged stays flagged: a late-arriving earlier sale only
            // adds records.
            for later in records.iter().skip(1) {
                let picked = later
                    .lines
                    .iter()
                    .any(|l| l.picked && unit_id.as_ref().is_some_and(|u| l.unit_ids.contains(u)));
                let kind = if picked {
                    ConflictKind::Oversold
                } else {
                    ConflictKind::DoubleSale
                };
                out.push(ConflictRecord {
                    conflict_id: format!("sold_twice:{}:{unit}:{}", self.fridge, later.order_id),
                    kind,
                    fridge_id: self.fridge.clone(),
                    sku: sku.clone(),
                    orders: all.clone(),
                    units: unit_id.iter().cloned().collect(),
                    flagged_order: Some(later.order_id.clone()),
                    detail: match kind {
                        ConflictKind::Oversold => format!(
                            "sales by count at devices that were offline took unit {unit} more than once: the fridge had fewer units than sold"
                        ),
                        _ => format!(
                            "unit {unit} was sold in {} orders while devices were offline; {} is a later one, to be refunded",
                            all.len(),
                            later.order_id
                        ),
                    },
                });
            }
        }
        let orders: Vec<OrderId> = match scope {
            Some(t) => t.orders.iter().cloned().collect(),
            None => self.order_ids(),
        };
        for o in orders {
            let history = self.history(&o);
            let picked = history.iter().any(|e| e.status == OrderStatus::PickedUp);
            let cancel = history.iter().any(|e| {
                matches!(
                    e.status,
                    OrderStatus::Cancelled | OrderStatus::RefundPending
                )
            });
            if picked && cancel {
                out.push(ConflictRecord {
                    conflict_id: format!("cancel_pickup_race:{}:{o}", self.fridge),
                    kind: ConflictKind::CancelPickupRace,
                    fridge_id: self.fridge.clone(),
                    sku: None,
                    orders: vec![o.clone()],
                    units: Vec::new(),
                    flagged_order: Some(o.clone()),
                    detail: format!("order {o} was cancelled while it was being picked up: the pickup stands and the cancel is rejected"),
                });
            }
        }
        out
    }

    /// What the hub does after merging devices' changes into this ledger: moves reservations
    /// whose units left, records the conflicts the merge revealed (one record each), and,
    /// when the fridge itself sent (so it is online), hands back escrow above its target.
    /// Returns the hub's changes and the conflicts it newly recorded.
    pub fn hub_after_merge(
        &mut self,
        touched: &Touched,
        fridge_sent: bool,
        catalogs: Option<&CatalogHistory>,
        now_ms: i64,
    ) -> Result<(Vec<LocalChange>, Vec<ConflictRecord>), LedgerError> {
        let mut changes = Vec::new();
        changes.extend(self.repair_reservations(now_ms)?);
        let mut found = self.detect_conflicts(Some(touched));
        if let Some(history) = catalogs {
            found.extend(self.detect_price_changes(touched, history));
        }
        // Only what is not recorded yet: a conflict noticed again is the same record.
        found.retain(|c| !self.has(&self.maps.conflicts, &c.conflict_id));
        if !found.is_empty() {
            changes.extend(self.record_conflicts(found.clone(), now_ms)?);
        }
        if fridge_sent {
            changes.extend(self.return_escrow(now_ms)?);
        }
        Ok((changes, found))
    }

    /// Walk-up sales among `touched` priced from an older catalog version than the one the hub
    /// had published when they were made, at a different total (`price_changed`): the device's
    /// price stands, and the record names both versions and totals. Only the hub knows the
    /// history of versions, so only the hub detects these.
    pub fn detect_price_changes(
        &self,
        touched: &Touched,
        history: &CatalogHistory,
    ) -> Vec<ConflictRecord> {
        let mut out = Vec::new();
        for order in &touched.orders {
            let Some(r) = self.record(order) else {
                continue;
            };
            if !matches!(r.channel, Channel::Pos | Channel::Fridge) {
                continue;
            }
            let Some(in_effect) = history.effective_at(r.created_at_ms) else {
                continue;
            };
            if in_effect <= r.catalog_version {
                continue;
            }
            let lines: Vec<(Sku, u32)> = r
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.quantity))
                .collect();
            let Some(then) = history.price(in_effect, &lines) else {
                continue;
            };
            if then.total_minor == r.total_minor {
                continue;
            }
            let sku = r
                .lines
                .iter()
                .find(|l| {
                    history
                        .price(in_effect, &[(l.sku.clone(), 1)])
                        .map(|p| p.total_minor)
                        != Some(l.unit_price_minor)
                })
                .map(|l| l.sku.clone());
            out.push(ConflictRecord {
                conflict_id: format!("price_changed:{}:{}", r.fridge_id, r.order_id),
                kind: ConflictKind::PriceChanged,
                fridge_id: r.fridge_id.clone(),
                sku,
                orders: vec![r.order_id.clone()],
                units: r.lines.iter().flat_map(|l| l.unit_ids.iter().cloned()).collect(),
                flagged_order: None,
                detail: format!(
                    "sold at catalog version {} for {} {cur}; version {}, published before the sale, prices it {} {cur}; the sale's price stands",
                    r.catalog_version,
                    r.total_minor,
                    then.version,
                    then.total_minor,
                    cur = history.currency(),
                ),
            });
        }
        out
    }

    /// Writes the conflicts not yet recorded; `None` when there are none.
    pub fn record_conflicts(
        &mut self,
        found: Vec<ConflictRecord>,
        now_ms: i64,
    ) -> Result<Option<LocalChange>, LedgerError> {
        let new: Vec<ConflictRecord> = found
            .into_iter()
            .filter(|c| !self.has(&self.maps.conflicts, &c.conflict_id))
            .collect();
        if new.is_empty() {
            return Ok(None);
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for c in &new {
            tx.put(&self.maps.conflicts, c.conflict_id.as_str(), to_json(c));
            touched.orders.extend(c.orders.iter().cloned());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        Ok(Some(self.last_local_change(touched, changes)?))
    }

    /// Every recorded conflict with its resolution, if any.
    pub fn conflicts(&self) -> Vec<ConflictView> {
        self.doc
            .keys(&self.maps.conflicts)
            .filter_map(|id| self.conflict(&id))
            .collect()
    }

    pub fn conflict(&self, id: &str) -> Option<ConflictView> {
        let record: ConflictRecord = self
            .get_str(&self.maps.conflicts, id)
            .and_then(|json| serde_json::from_str(&json).ok())?;
        let resolution: Option<Resolution> = self
            .get_str(&self.maps.resolutions, id)
            .and_then(|json| serde_json::from_str(&json).ok());
        Some(ConflictView {
            record,
            status: if resolution.is_some() {
                "resolved"
            } else {
                "open"
            }
            .into(),
            resolution,
        })
    }

    /// Ids of the conflicts that name `order`.
    pub(in crate::ledger) fn conflicts_naming(&self, order: &OrderId) -> Vec<String> {
        self.doc
            .keys(&self.maps.conflicts)
            .filter(|id| {
                id.ends_with(&format!(":{order}")) || {
                    self.get_str(&self.maps.conflicts, id)
                        .and_then(|json| serde_json::from_str::<ConflictRecord>(&json).ok())
                        .is_some_and(|c| c.orders.contains(order))
                }
            })
            .collect()
    }

    /// Resolves a conflict. `refund` flags the flagged order `refunded`; `substitute`
    /// gives the flagged order another free unit (`resolution.unit_id`); `dismiss` only
    /// records the decision. Nothing is deleted.
    pub fn resolve(
        &mut self,
        id: &str,
        resolution: &Resolution,
        now_ms: i64,
    ) -> Result<(LocalChange, ConflictView), LedgerError> {
        let view = self
            .conflict(id)
            .ok_or_else(|| LedgerError::UnknownConflict(id.to_owned()))?;
        if view.resolution.is_some() {
            return Err(LedgerError::WrongStatus(format!(
                "conflict {id} is already resolved"
            )));
        }
        let flagged = view.record.flagged_order.clone();
        let mut touched = Touched::default();
        if resolution.action == ResolutionAction::Substitute {
            let unit = resolution.unit_id.clone().ok_or_else(|| {
                LedgerError::Invalid("substitute needs the unit_id given instead".into())
            })?;
            let facts = self
                .unit_facts(&unit)
                .ok_or_else(|| LedgerError::UnitNotAvailable {
                    unit: unit.clone(),
                    state: "unknown",
                })?;
            if !self.free_units(&facts.sku, now_ms).contains(&unit) {
                let state = self.unit_state(&unit, Some(&facts), now_ms).as_str();
                return Err(LedgerError::UnitNotAvailable { unit, state });
            }
            touched.units.insert(unit);
        }
        let mut tx = Writes::new();
        tx.put(&self.maps.resolutions, id, to_json(resolution));
        if let Some(order) = &flagged {
            touched.orders.insert(order.clone());
            match resolution.action {
                ResolutionAction::Refund => {
                    let event = StatusEvent {
                        status: OrderStatus::Refunded,
                        at_ms: now_ms,
                        by: hub_device(),
                        note: Some(format!("conflict {id} resolved with a refund")),
                    };
                    tx.put(
                        &self.maps.events,
                        crate::ledger::event_key(order, &event),
                        to_json(&event),
                    );
                }
                ResolutionAction::Substitute => {
                    for u in &touched.units {
                        tx.put(&self.maps.reserved, u.as_str(), order.as_str());
                    }
                }
                ResolutionAction::Dismiss => {}
            }
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        let units: Vec<UnitId> = touched.units.iter().cloned().collect();
        for u in &units {
            self.reindex(u);
        }
        let change = self.last_local_change(touched, changes)?;
        let view = self
            .conflict(id)
            .ok_or_else(|| LedgerError::Document("resolved conflict not found".into()))?;
        Ok((change, view))
    }
}
