//! The units on a fridge's shelves: refills, quarantine and removal, and each unit's state and
//! view as the ledger's index and history give it.

use super::*;

impl Ledger {
    pub(super) fn reindex(&mut self, unit: &UnitId) {
        let facts = self.unit_facts(unit);
        self.reindex_with(unit, facts.as_ref());
    }

    /// [`Ledger::reindex`] with the unit's facts as the document holds them; answers whether
    /// the unit is gone (sold, taken or removed).
    pub(super) fn reindex_with(&mut self, unit: &UnitId, facts: Option<&UnitFacts>) -> bool {
        self.reindex_reservation(unit);
        let gone = self.gone(unit);
        match facts {
            Some(f) => self.index_facts(unit, f, gone),
            None => {
                self.loose.get_mut().insert(unit.clone());
            }
        }
        gone
    }

    /// Indexes a unit's facts, and whether it is gone, in `unit_keys` and `unsold`.
    pub(super) fn index_facts(&mut self, unit: &UnitId, facts: &UnitFacts, gone: bool) {
        self.unit_keys
            .insert(unit.clone(), (facts.sku.clone(), facts.expires_at_ms));
        self.loose.get_mut().remove(unit);
        let set = self.unsold.entry(facts.sku.clone()).or_default();
        let key = (facts.expires_at_ms, unit.clone());
        if gone {
            set.remove(&key);
        } else {
            set.insert(key);
        }
    }

    /// Whether a refill of `unit` is known here (its facts are in the document).
    pub fn knows_unit(&self, unit: &UnitId) -> bool {
        self.unit_keys.contains_key(unit)
    }

    pub(super) fn unit_facts(&self, unit: &UnitId) -> Option<UnitFacts> {
        self.get_str(&self.maps.units, unit.as_str())
            .and_then(|json| serde_json::from_str(&json).ok())
    }

    pub(super) fn unit_ids(&self) -> Vec<UnitId> {
        self.doc
            .keys(&self.maps.units)
            .filter_map(|k| UnitId::new(k).ok())
            .collect()
    }

    /// The state of a unit at `now_ms`.
    pub(super) fn unit_state(
        &self,
        unit: &UnitId,
        facts: Option<&UnitFacts>,
        now_ms: i64,
    ) -> UnitState {
        if self.has(&self.maps.removed, unit.as_str()) {
            UnitState::Removed
        } else if self.has(&self.maps.sold, unit.as_str()) {
            UnitState::Sold
        } else if self.has(&self.maps.taken, unit.as_str()) {
            UnitState::Taken
        } else if facts.is_some_and(|f| f.expires_at_ms <= now_ms) {
            UnitState::Expired
        } else if self.holder(unit).is_some() {
            UnitState::Reserved
        } else {
            UnitState::Available
        }
    }

    /// Whether a unit left the fridge's stock for good (sold, taken or removed).
    pub(super) fn gone(&self, unit: &UnitId) -> bool {
        self.has(&self.maps.sold, unit.as_str())
            || self.has(&self.maps.taken, unit.as_str())
            || self.has(&self.maps.removed, unit.as_str())
    }

    /// A unit as the stock view shows it, if its refill is known here.
    pub fn unit(&self, unit: &UnitId, now_ms: i64) -> Option<UnitView> {
        let facts = self.unit_facts(unit)?;
        let gone = self.gone(unit);
        Some(self.view_of(unit, facts, gone, now_ms))
    }

    /// The view of a unit with these facts, `gone` as [`Ledger::gone`] answers.
    pub(super) fn view_of(
        &self,
        unit: &UnitId,
        facts: UnitFacts,
        gone: bool,
        now_ms: i64,
    ) -> UnitView {
        let state = if gone {
            self.unit_state(unit, Some(&facts), now_ms)
        } else if facts.expires_at_ms <= now_ms {
            UnitState::Expired
        } else if self.holder(unit).is_some() {
            UnitState::Reserved
        } else {
            UnitState::Available
        };
        let sold_in = gone
            .then(|| self.get_str(&self.maps.sold, unit.as_str()))
            .flatten()
            .and_then(|o| OrderId::new(o).ok());
        let reserved_for = (state == UnitState::Reserved)
            .then(|| self.holder(unit))
            .flatten();
        UnitView {
            unit_id: unit.clone(),
            facts,
            state,
            sold_in,
            reserved_for,
        }
    }

    /// Every unit whose refill is known here.
    pub fn units(&self, now_ms: i64) -> Vec<UnitView> {
        self.unit_ids()
            .iter()
            .filter_map(|id| self.unit(id, now_ms))
            .collect()
    }

    /// Loads units into the fridge.
    pub fn refill(
        &mut self,
        refill: &Refill,
        by: &DeviceId,
        now_ms: i64,
    ) -> Result<LocalChange, LedgerError> {
        if refill.units.is_empty() {
            return Err(LedgerError::Invalid(
                "a refill loads at least one unit".into(),
            ));
        }
        self.check_new_units(&refill.units)?;
        if let Some(order) = &refill.order_id {
            let status = self
                .status(order)
                .ok_or_else(|| LedgerError::UnknownOrder(order.clone()))?;
            if !matches!(
                status,
                OrderStatus::Scheduled
                    | OrderStatus::Dispatched
                    | OrderStatus::PlacedInFridge
                    | OrderStatus::AvailableForPicking
            ) {
                return Err(LedgerError::WrongStatus(format!(
                    "order {order} is {}: a tagged refill places a subscription's meals or a \
                     paid app order's",
                    status.as_str()
                )));
            }
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        // Units tagged with an order (a subscriber's meals) are placed for it: held by it,
        // and the order is ready to pick.
        if let Some(order) = &refill.order_id {
            for status in [
                OrderStatus::PlacedInFridge,
                OrderStatus::AvailableForPicking,
            ] {
                let event = StatusEvent {
                    status,
                    at_ms: now_ms,
                    by: by.clone(),
                    note: None,
                };
                tx.put(&self.maps.events, event_key(order, &event), to_json(&event));
            }
            for unit in &refill.units {
                tx.put(&self.maps.reserved, unit.unit_id.as_str(), order.as_str());
            }
            touched.orders.insert(order.clone());
        }
        let mut written = Vec::with_capacity(refill.units.len());
        for unit in &refill.units {
            let facts = UnitFacts {
                sku: unit.sku.clone(),
                expires_at_ms: unit.expires_at_ms,
                batch: unit.batch.clone(),
                loaded_at_ms: now_ms,
                loaded_by: by.clone(),
                order_id: refill.order_id.clone(),
            };
            tx.put(&self.maps.units, unit.unit_id.as_str(), to_json(&facts));
            touched.units.insert(unit.unit_id.clone());
            written.push((unit.unit_id.clone(), facts));
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        // The units are new here (checked above), so their facts are the ones just written:
        // the indexes and views are made from them, not read back from the document.
        let mut views = Vec::with_capacity(written.len());
        for (unit, facts) in written {
            let gone = if refill.order_id.is_none() && !self.loose.get_mut().contains(&unit) {
                // Mentioned nowhere in the document before: not gone, not reserved.
                self.index_facts(&unit, &facts, false);
                false
            } else {
                self.reindex_with(&unit, Some(&facts))
            };
            views.push((unit, facts, gone));
        }
        let held = |l: &Self, u: &UnitId| l.reserved_by_unit.contains_key(u);
        if refill.order_id.is_some() || views.iter().any(|(u, _, _)| held(self, u)) {
            // Orders' views change with it: read everything back.
            return self.last_local_change(touched, changes);
        }
        let units = views
            .into_iter()
            .map(|(unit, facts, gone)| self.view_of(&unit, facts, gone, i64::MIN))
            .collect();
        self.local_change_with(touched, units, Vec::new(), changes)
    }

    pub(super) fn check_new_units(&self, units: &[RefillUnit]) -> Result<(), LedgerError> {
        if units.len() > UNITS_PER_REQUEST_MAX {
            return Err(LedgerError::Invalid(format!(
                "at most {UNITS_PER_REQUEST_MAX} units per request"
            )));
        }
        let mut seen = BTreeSet::new();
        for unit in units {
            crate::limits::unit_fields(unit)?;
            if !seen.insert(&unit.unit_id) {
                return Err(LedgerError::Invalid(format!(
                    "unit {} appears twice",
                    unit.unit_id
                )));
            }
            // The document has a unit's key only if the unit is indexed or loose.
            let id = &unit.unit_id;
            if self.unit_keys.contains_key(id)
                || (self.loose.borrow().contains(id) && self.has(&self.maps.units, id.as_str()))
            {
                return Err(LedgerError::UnitExists(unit.unit_id.clone()));
            }
        }
        Ok(())
    }

    /// Quarantines every unit still in the fridge after a temperature excursion: each is
    /// removed with reason `temperature` (its own key, so concurrent records merge), and the
    /// incident is recorded under the excursion's start (also when no unit was left).
    pub fn quarantine(
        &mut self,
        incident: &crate::domain::Incident,
        now_ms: i64,
    ) -> Result<(LocalChange, Vec<UnitId>), LedgerError> {
        let units: Vec<UnitId> = self
            .unsold
            .values()
            .flatten()
            .map(|(_, u)| u.clone())
            .collect();
        let mut incident = incident.clone();
        incident.units = units
            .iter()
            .take(crate::domain::Incident::UNITS_LISTED_MAX)
            .cloned()
            .collect();
        incident.units_total = Some(units.len() as u64);
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for unit in &units {
            tx.put(
                &self.maps.removed,
                unit.as_str(),
                to_json(&RemovalReason::Temperature),
            );
            touched.units.insert(unit.clone());
        }
        tx.put(
            &self.maps.incidents,
            format!("temperature/{:016}", incident.since_ms.max(0)),
            to_json(&incident),
        );
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for unit in &touched.units {
            self.reindex(unit);
        }
        Ok((self.last_local_change(touched, changes)?, units))
    }

    /// Every recorded incident (temperature excursions), oldest first.
    pub fn incidents(&self) -> Vec<crate::domain::Incident> {
        self.doc
            .keys(&self.maps.incidents)
            .filter_map(|k| self.get_str(&self.maps.incidents, &k))
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect()
    }

    /// Records units leaving the fridge unsold.
    pub fn remove(
        &mut self,
        units: &[UnitId],
        reason: RemovalReason,
        now_ms: i64,
    ) -> Result<LocalChange, LedgerError> {
        if units.is_empty() || units.len() > UNITS_PER_REQUEST_MAX {
            return Err(LedgerError::Invalid(format!(
                "1 to {UNITS_PER_REQUEST_MAX} units per request"
            )));
        }
        // Only a unit loaded here and still in the fridge can leave it: removing a sold unit
        // would rewrite its history, and removing one not loaded yet would leave its refill
        // removed on arrival.
        for unit in units {
            let state = match self.unit(unit, now_ms) {
                None => Some("not loaded in this fridge"),
                Some(v) => match v.state {
                    UnitState::Sold => Some("sold"),
                    UnitState::Taken => Some("taken"),
                    UnitState::Removed => Some("removed"),
                    _ => None,
                },
            };
            if let Some(state) = state {
                return Err(LedgerError::UnitNotAvailable {
                    unit: unit.clone(),
                    state,
                });
            }
        }
        let mut touched = Touched::default();
        let mut tx = Writes::new();
        for unit in units {
            tx.put(&self.maps.removed, unit.as_str(), to_json(&reason));
            touched.units.insert(unit.clone());
        }
        let changes = tx.commit(&mut self.doc, now_ms)?;
        for unit in &touched.units {
            self.reindex(unit);
        }
        self.last_local_change(touched, changes)
    }
}
