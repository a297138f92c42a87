//! Time-driven transitions of orders: payments that time out, pickups held too long, and
//! when the next one is due; and the stock counts with reservations and expiry applied.

use super::*;

impl Ledger {
    /// Card payments `by` took offline that no capture outcome has settled yet.
    pub fn pending_payments(&self, by: &DeviceId) -> Vec<OrderRecord> {
        self.order_ids()
            .iter()
            .filter_map(|o| self.record(o))
            .map(|r| (*r).clone())
            .filter(|r| r.payment_pending && &r.created_by == by)
            .filter(|r| {
                !self.history(&r.order_id).iter().any(|e| {
                    matches!(
                        e.status,
                        OrderStatus::PaymentCaptured | OrderStatus::PaymentFailedAfterSale
                    )
                })
            })
            .collect()
    }

    /// Orders holding units, with their records and statuses, in id order.
    pub fn holding_orders(&self) -> Vec<HoldingOrder> {
        let mut ids: Vec<&OrderId> = self.reserved_by_order.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter(|o| !self.is_settled(o))
            .filter_map(|o| {
                let record = self.record(o)?;
                let history = self.history(o);
                let status = crate::ledger::status_of(&history).unwrap_or(OrderStatus::Completed);
                self.note_settled(o, status);
                status
                    .holds_units()
                    .then(|| (o.clone(), record, status, history))
            })
            .collect()
    }

    /// The transitions time makes due at `now_ms`: payments that timed out, paid orders
    /// nobody picked up within the hold.
    pub fn due_transitions(
        &self,
        policy: &OrderPolicy,
        now_ms: i64,
    ) -> Vec<(OrderId, OrderStatus, String)> {
        let mut due = Vec::new();
        for (o, record, status, history) in self.holding_orders() {
            match status {
                OrderStatus::Reserved
                    if matches!(record.channel, Channel::App)
                        && now_ms >= grace_end(&record, policy) + policy.payment_timeout_ms =>
                {
                    due.push((
                        o,
                        OrderStatus::PaymentTimeout,
                        "no answer from the payment provider".into(),
                    ));
                }
                OrderStatus::AvailableForPicking => {
                    let since = history
                        .iter()
                        .filter(|e| e.status == OrderStatus::AvailableForPicking)
                        .map(|e| e.at_ms)
                        .min()
                        .unwrap_or(record.created_at_ms);
                    if now_ms >= since + policy.pickup_hold_ms {
                        due.push((
                            o,
                            OrderStatus::ExpiredNoShow,
                            "not picked up within the hold".into(),
                        ));
                    }
                }
                _ => {}
            }
        }
        due
    }

    /// When time next makes something due in this ledger (see [`Ledger::due_transitions`]): a
    /// capture after a grace window (or, for an order whose capture went unanswered, its
    /// timeout), a no-show, or the expiry of a held unit. `None` when nothing waits on time.
    pub fn next_due(
        &self,
        policy: &OrderPolicy,
        unanswered: &dyn Fn(&OrderId) -> bool,
    ) -> Option<i64> {
        self.next_due_with(policy, true, unanswered)
    }

    /// [`Ledger::next_due`], where `captures` says whether the caller captures payments at
    /// the end of the grace window (a simulated provider) or waits for them to be posted.
    pub fn next_due_with(
        &self,
        policy: &OrderPolicy,
        captures: bool,
        unanswered: &dyn Fn(&OrderId) -> bool,
    ) -> Option<i64> {
        let mut due: Option<i64> = None;
        let mut at = |t: i64| due = Some(due.map_or(t, |d| d.min(t)));
        for (o, record, status, history) in self.holding_orders() {
            match status {
                OrderStatus::Reserved if record.channel == Channel::App => {
                    let g = grace_end(&record, policy);
                    at(if captures && !unanswered(&o) {
                        g
                    } else {
                        g + policy.payment_timeout_ms
                    });
                }
                OrderStatus::AvailableForPicking => {
                    let since = history
                        .iter()
                        .filter(|e| e.status == OrderStatus::AvailableForPicking)
                        .map(|e| e.at_ms)
                        .min()
                        .unwrap_or(record.created_at_ms);
                    at(since + policy.pickup_hold_ms);
                }
                _ => {}
            }
            for u in self.effective_reserved(&o, &record) {
                if let Some(f) = self.unit_facts(&u) {
                    at(f.expires_at_ms);
                }
            }
        }
        due
    }

    /// Units in stock per sku at `now_ms`: on hand (not expired, available or held), held by
    /// orders, and on hand but expiring before `before_ms`.
    pub fn stock_counts(&self, now_ms: i64, before_ms: i64) -> BTreeMap<Sku, (u64, u64, u64)> {
        let mut held: std::collections::HashSet<&UnitId> = std::collections::HashSet::new();
        let holding = self.holding_orders();
        let mut effective = Vec::new();
        for (o, record, _, _) in &holding {
            effective.extend(self.effective_reserved(o, record));
        }
        held.extend(effective.iter());
        let mut out = BTreeMap::new();
        for (sku, set) in &self.unsold {
            let mut c = (0u64, 0u64, 0u64);
            for (expires, unit) in set {
                if *expires <= now_ms {
                    continue;
                }
                c.0 += 1;
                if held.contains(unit) {
                    c.1 += 1;
                }
                if *expires < before_ms {
                    c.2 += 1;
                }
            }
            if c.0 > 0 {
                out.insert(sku.clone(), c);
            }
        }
        out
    }
}
