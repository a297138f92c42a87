//! Scenario tests of app orders, escrow and conflicts on the ledger core, with time passed in.

use automerge::ActorId;

use super::*;
use crate::catalog::CatalogItem;
use crate::domain::{AppOrderLine, DoorSession, Refill, RefillUnit, Sale, SaleLine, TakenMatch};
use crate::ids::FridgeId;
use crate::ledger::actor_for;

const T0: i64 = 1_800_000_000_000;
const HOUR: i64 = 3_600_000;
const POLICY: OrderPolicy = OrderPolicy {
    grace_ms: 20_000,
    payment_timeout_ms: 60_000,
    pickup_hold_ms: 24 * HOUR,
};

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("id")
}

fn catalog() -> Catalog {
    Catalog {
        version: 1,
        currency: "EUR".into(),
        items: ["lasagna", "salad"]
            .iter()
            .map(|s| CatalogItem {
                sku: id(s),
                name: s.to_string(),
                price_minor: 700,
                allergens: vec![],
                shelf_life_hours: 72,
            })
            .collect(),
    }
}

struct Replicas {
    hub: Ledger,
    fridge: Ledger,
    pos: Ledger,
}

fn ledger(actor: ActorId) -> Ledger {
    Ledger::new(id::<FridgeId>("fridge-1"), actor).expect("ledger")
}

/// Sends every change `from` has to `to`.
fn push(from: &Ledger, to: &mut Ledger) {
    let changes: Vec<Vec<u8>> = from
        .doc
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    to.apply_changes(&changes).expect("merge");
}

impl Replicas {
    /// A fridge with `lasagna` units l1..ln (l1 expiring first) and `salad` s1..s2, all synced.
    fn new(lasagnas: usize) -> Self {
        let mut r = Replicas {
            hub: ledger(ActorId::from(&b"\x00hub"[..])),
            fridge: ledger(actor_for(&id("fr-1"))),
            pos: ledger(actor_for(&id("pos-1"))),
        };
        let mut units: Vec<RefillUnit> = (1..=lasagnas)
            .map(|n| RefillUnit {
                unit_id: id(&format!("l{n}")),
                sku: id("lasagna"),
                expires_at_ms: T0 + 48 * HOUR + n as i64,
                batch: None,
            })
            .collect();
        units.extend((1..=2).map(|n| RefillUnit {
            unit_id: id(&format!("s{n}")),
            sku: id("salad"),
            expires_at_ms: T0 + 48 * HOUR,
            batch: None,
        }));
        r.fridge
            .refill(
                &Refill {
                    units,
                    order_id: None,
                },
                &id("fr-1"),
                T0,
            )
            .expect("refill");
        r.sync();
        r
    }

    fn sync(&mut self) {
        for _ in 0..2 {
            push(&self.fridge, &mut self.hub);
            push(&self.pos, &mut self.hub);
            push(&self.hub, &mut self.fridge);
            push(&self.hub, &mut self.pos);
        }
    }

    fn order(&mut self, order: &str, sku: &str, quantity: u32, online: bool, at: i64) -> OrderView {
        // Offline, every grant counts (no POS is behind on them here).
        let granted = (!online).then(|| self.hub.granted_all());
        self.hub
            .place_order(
                &app(order, sku, quantity),
                &catalog(),
                granted.as_ref(),
                &POLICY,
                at,
            )
            .expect("order placed")
            .1
    }
}

fn app(order: &str, sku: &str, quantity: u32) -> AppOrder {
    AppOrder {
        order_id: id(order),
        customer_id: "cust-1".into(),
        channel: Channel::App,
        lines: vec![AppOrderLine {
            sku: id(sku),
            quantity,
        }],
        subscription_id: None,
    }
}

fn walk_up(order: &str, sku: &str, unit: Option<&str>) -> Sale {
    Sale {
        order_id: id(order),
        channel: Channel::Pos,
        lines: vec![SaleLine {
            sku: id(sku),
            unit_id: unit.map(id),
            quantity: 1,
        }],
        payment: Payment {
            method: PaymentMethod::Cash,
            amount_minor: 700,
            currency: "EUR".into(),
        },
        payment_pending: false,
    }
}

fn session(sid: &str, taken: &[&str], order: Option<&str>) -> DoorSession {
    DoorSession {
        session_id: sid.into(),
        units_taken: taken.iter().map(|u| id(u)).collect(),
        units_added: vec![],
        order_id: order.map(id),
        card_order_id: None,
    }
}

fn status(l: &Ledger, order: &str) -> OrderStatus {
    l.status(&id(order)).expect("order known")
}

fn reserved(l: &Ledger, sku: &str) -> usize {
    l.units(T0)
        .iter()
        .filter(|u| u.facts.sku.as_str() == sku && u.state == crate::domain::UnitState::Reserved)
        .count()
}

#[test]
fn an_app_order_reserves_the_earliest_expiring_units_on_every_replica() {
    let mut r = Replicas::new(3);
    let view = r.order("app-1", "lasagna", 2, true, T0);
    assert_eq!(view.status, OrderStatus::Reserved);
    assert_eq!(view.reserved_units, vec![id::<UnitId>("l1"), id("l2")]);
    r.sync();
    for l in [&r.hub, &r.fridge, &r.pos] {
        assert_eq!(reserved(l, "lasagna"), 2);
        assert_eq!(l.free_units(&id("lasagna"), T0), vec![id::<UnitId>("l3")]);
    }
    let err = r
        .hub
        .place_order(&app("app-2", "lasagna", 2), &catalog(), None, &POLICY, T0)
        .expect_err("only one left");
    assert!(matches!(
        err,
        LedgerError::InsufficientStock { available: 1, .. }
    ));
    // A walk-up sale by count cannot take the reserved units.
    let err = r
        .pos
        .sell(
            &walk_up("w-1", "lasagna", None),
            &catalog(),
            &id("pos-1"),
            T0,
        )
        .map(|_| ());
    assert!(err.is_ok(), "l3 is free");
    assert!(
        r.pos
            .sell(
                &walk_up("w-2", "lasagna", None),
                &catalog(),
                &id("pos-1"),
                T0
            )
            .is_err()
    );
}

#[test]
fn a_cancel_within_the_grace_window_is_free_and_releases_the_units() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    let (_, outcome) = r
        .hub
        .cancel(&id("app-1"), &hub_device(), &POLICY, T0 + 19_999)
        .expect("cancel");
    assert_eq!(outcome, CancelOutcome::Done(OrderStatus::Cancelled));
    r.sync();
    assert_eq!(status(&r.fridge, "app-1"), OrderStatus::Cancelled);
    assert_eq!(reserved(&r.fridge, "lasagna"), 0);
    // Payment after a cancel is refused.
    assert!(
        r.hub
            .record_payment(&id("app-1"), PaymentOutcome::Captured, &POLICY, T0 + 30_000)
            .is_err()
    );
}

#[test]
fn a_cancel_after_the_grace_window_and_before_capture_is_refused_and_recorded() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    let (_, outcome) = r
        .hub
        .cancel(&id("app-1"), &hub_device(), &POLICY, T0 + 20_000)
        .expect("cancel");
    assert!(matches!(
        outcome,
        CancelOutcome::Rejected("past_grace_window", _)
    ));
    let view = r.hub.order(&id("app-1")).expect("order");
    assert_eq!(view.status, OrderStatus::Reserved);
    assert!(
        view.history
            .iter()
            .any(|e| e.status == OrderStatus::CancelRejected)
    );
}

#[test]
fn payment_is_taken_only_after_the_grace_window() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    assert!(matches!(
        r.hub
            .record_payment(&id("app-1"), PaymentOutcome::Captured, &POLICY, T0 + 1_000),
        Err(LedgerError::WrongStatus(_))
    ));
    r.hub
        .record_payment(&id("app-1"), PaymentOutcome::Captured, &POLICY, T0 + 21_000)
        .expect("captured");
    assert_eq!(status(&r.hub, "app-1"), OrderStatus::AvailableForPicking);
    // Cancel after capture and before pickup: refund pending, units released.
    let (_, outcome) = r
        .hub
        .cancel(&id("app-1"), &hub_device(), &POLICY, T0 + 30_000)
        .expect("cancel");
    assert_eq!(outcome, CancelOutcome::Done(OrderStatus::RefundPending));
    assert_eq!(reserved(&r.hub, "lasagna"), 0);
}

#[test]
fn a_refused_payment_releases_the_reservation() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 2, true, T0);
    r.hub
        .record_payment(&id("app-1"), PaymentOutcome::Refused, &POLICY, T0 + 25_000)
        .expect("refused");
    r.sync();
    assert_eq!(status(&r.fridge, "app-1"), OrderStatus::PaymentRefused);
    assert_eq!(r.fridge.free_units(&id("lasagna"), T0).len(), 2);
}

#[test]
fn time_makes_payment_timeouts_and_no_shows_due() {
    let mut r = Replicas::new(3);
    r.order("app-1", "lasagna", 1, true, T0);
    r.order("app-2", "lasagna", 1, true, T0);
    r.hub
        .record_payment(&id("app-2"), PaymentOutcome::Captured, &POLICY, T0 + 20_000)
        .expect("captured");
    assert!(r.hub.due_transitions(&POLICY, T0 + 79_999).is_empty());
    let due = r.hub.due_transitions(&POLICY, T0 + 80_000);
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].0.as_str(), due[0].1),
        ("app-1", OrderStatus::PaymentTimeout)
    );
    for (o, s, note) in due {
        r.hub
            .add_event(&o, s, Some(note), &hub_device(), T0 + 80_000)
            .expect("event");
    }
    let later = T0 + 20_000 + POLICY.pickup_hold_ms;
    let due = r.hub.due_transitions(&POLICY, later);
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].0.as_str(), due[0].1),
        ("app-2", OrderStatus::ExpiredNoShow)
    );
    for (o, s, note) in due {
        r.hub
            .add_event(&o, s, Some(note), &hub_device(), later)
            .expect("event");
    }
    assert_eq!(r.hub.free_units(&id("lasagna"), T0).len(), 3);
}

#[test]
fn a_pickup_at_the_fridge_matches_the_reservation() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    r.hub
        .record_payment(&id("app-1"), PaymentOutcome::Captured, &POLICY, T0 + 20_000)
        .expect("captured");
    r.sync();
    let (_, matches) = r
        .fridge
        .door_session(
            &session("d1", &["l1"], Some("app-1")),
            &catalog(),
            &id("fr-1"),
            T0 + HOUR,
        )
        .expect("door");
    assert_eq!(
        matches,
        vec![(
            id("l1"),
            TakenMatch::Reservation {
                order_id: id("app-1")
            }
        )]
    );
    r.sync();
    assert_eq!(status(&r.hub, "app-1"), OrderStatus::PickedUp);
}

#[test]
fn escrow_bounds_what_the_hub_promises_for_an_offline_fridge() {
    let mut r = Replicas::new(10);
    // Online, the fridge grants a quarter of its free lasagnas (and one salad of two).
    let granted = r.fridge.grant_escrow(0.25, T0).expect("grant");
    assert!(granted.is_some());
    r.sync();
    assert_eq!(r.hub.allowance(&id("lasagna")), 2);
    assert_eq!(r.hub.allowance(&id("salad")), 1);
    // Offline, the hub confirms two lasagnas and no third.
    r.order("app-1", "lasagna", 1, false, T0 + 1);
    r.order("app-2", "lasagna", 1, false, T0 + 2);
    let granted = r.hub.granted_all();
    let err = r
        .hub
        .place_order(
            &app("app-3", "lasagna", 1),
            &catalog(),
            Some(&granted),
            &POLICY,
            T0 + 3,
        )
        .expect_err("allowance spent");
    assert!(matches!(
        err,
        LedgerError::InsufficientStock { available: 0, .. }
    ));
    // Meanwhile, the offline fridge sells by count: it keeps two for the hub.
    for n in 0..8 {
        r.fridge
            .sell(
                &walk_up(&format!("w-{n}"), "lasagna", None),
                &catalog(),
                &id("fr-1"),
                T0 + 10 + n,
            )
            .expect("walk-up within its share");
    }
    assert!(
        r.fridge
            .sell(
                &walk_up("w-9", "lasagna", None),
                &catalog(),
                &id("fr-1"),
                T0 + 20
            )
            .is_err(),
        "the last two are the hub's"
    );
    r.sync();
    // The fridge sold the units the hub had picked (it had not seen the orders), but it kept
    // two: the reservations move to them, with no conflict.
    assert!(
        r.hub
            .repair_reservations(T0 + 30)
            .expect("repair")
            .is_some()
    );
    assert!(r.hub.conflicts().is_empty());
    assert!(r.hub.detect_conflicts(None).is_empty());
    let mut held = Vec::new();
    for o in ["app-1", "app-2"] {
        held.extend(r.hub.order(&id(o)).expect("order").reserved_units);
    }
    held.sort();
    assert_eq!(held, vec![id::<UnitId>("l10"), id("l9")]);
    // With the fridge online again, the hub hands back what is above the target.
    assert_eq!(r.hub.allowance(&id("lasagna")), 0);
    assert!(r.hub.return_escrow(T0 + 40).expect("return").is_none());
}

#[test]
fn the_hub_returns_allowance_above_the_target() {
    let mut r = Replicas::new(8);
    r.fridge.grant_escrow(0.5, T0).expect("grant");
    r.sync();
    assert_eq!(r.hub.allowance(&id("lasagna")), 4);
    // Walk-up sales (online) bring the free units down to 5: target 2.
    for n in 0..3 {
        r.pos
            .sell(
                &walk_up(&format!("w-{n}"), "lasagna", None),
                &catalog(),
                &id("pos-1"),
                T0 + n,
            )
            .expect("sale");
    }
    r.sync();
    r.hub
        .return_escrow(T0 + 10)
        .expect("return")
        .expect("a return");
    r.sync();
    assert_eq!(r.fridge.allowance(&id("lasagna")), 2);
    assert_eq!(r.hub.allowance(&id("lasagna")), 2);
}

#[test]
fn a_grant_counts_only_once_every_seller_has_it() {
    let mut r = Replicas::new(8);
    r.fridge.grant_escrow(0.5, T0).expect("grant");
    r.sync();
    assert_eq!(r.hub.allowance(&id("lasagna")), 4);
    // The POS has not acknowledged the grant yet: the hub may use none of it.
    let nothing_usable: BTreeMap<Sku, i64> = BTreeMap::new();
    let err = r
        .hub
        .place_order(
            &app("app-1", "lasagna", 1),
            &catalog(),
            Some(&nothing_usable),
            &POLICY,
            T0,
        )
        .expect_err("no usable grant");
    assert!(matches!(
        err,
        LedgerError::InsufficientStock { available: 0, .. }
    ));
    let mut usable = BTreeMap::new();
    usable.insert(id::<Sku>("lasagna"), 1);
    r.hub
        .place_order(
            &app("app-1", "lasagna", 1),
            &catalog(),
            Some(&usable),
            &POLICY,
            T0,
        )
        .expect("within the usable grant");
    assert!(
        r.hub
            .place_order(
                &app("app-2", "lasagna", 1),
                &catalog(),
                Some(&usable),
                &POLICY,
                T0
            )
            .is_err()
    );
}

/// Placement events a device wrote on an unpaid app order (an agent from before the tagged
/// refill's rule, or a hostile one) count for nothing on any replica: the order stays
/// reserved; the same events on a paid order or a subscription occurrence count as before.
#[test]
fn placement_by_a_device_on_an_unpaid_order_counts_for_nothing() {
    use automerge::transaction::Transactable;
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    r.sync();
    {
        let fridge = &mut r.fridge;
        let mut tx = fridge.doc.transaction();
        for status in [
            OrderStatus::PlacedInFridge,
            OrderStatus::AvailableForPicking,
        ] {
            let event = StatusEvent {
                status,
                at_ms: T0 + 1_000,
                by: DeviceId::new("fridge-1").expect("id"),
                note: None,
            };
            tx.put(
                &fridge.maps.events,
                super::super::event_key(&id("app-1"), &event),
                super::super::to_json(&event),
            )
            .expect("put");
        }
        tx.commit();
    }
    let forged = r
        .fridge
        .doc
        .get_last_local_change()
        .expect("change")
        .raw_bytes()
        .to_vec();
    r.hub
        .apply_changes(std::slice::from_ref(&forged))
        .expect("merge");
    r.pos.apply_changes(&[forged]).expect("merge");
    for l in [&r.hub, &r.pos] {
        assert_eq!(status(l, "app-1"), OrderStatus::Reserved);
    }
    // Once the hub records the capture, the order is ready to pick, as it should be.
    r.hub
        .record_payment(&id("app-1"), PaymentOutcome::Captured, &POLICY, T0 + 30_000)
        .expect("captured");
    assert_eq!(status(&r.hub, "app-1"), OrderStatus::AvailableForPicking);
}

mod conflicts;
