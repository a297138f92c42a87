//! Conflicts between replicas' orders and sales, and how they are flagged and repaired.

use super::*;

#[test]
fn a_cancel_racing_a_pickup_loses_and_is_one_conflict() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    r.hub
        .record_payment(&id("app-1"), PaymentOutcome::Captured, &POLICY, T0 + 20_000)
        .expect("captured");
    r.sync();
    // Offline from each other: the fridge records the pickup, the hub a cancel.
    r.fridge
        .door_session(
            &session("d1", &["l1"], Some("app-1")),
            &catalog(),
            &id("fr-1"),
            T0 + HOUR,
        )
        .expect("door");
    let (_, outcome) = r
        .hub
        .cancel(&id("app-1"), &hub_device(), &POLICY, T0 + HOUR + 1)
        .expect("cancel");
    assert_eq!(outcome, CancelOutcome::Done(OrderStatus::RefundPending));
    r.sync();
    for l in [&r.hub, &r.fridge] {
        assert_eq!(status(l, "app-1"), OrderStatus::PickedUp, "the pickup wins");
    }
    // Both replicas notice and record it: one record.
    let found = r.hub.detect_conflicts(None);
    let found_f = r.fridge.detect_conflicts(None);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind, ConflictKind::CancelPickupRace);
    r.hub
        .record_conflicts(found, T0 + HOUR + 2)
        .expect("record");
    r.fridge
        .record_conflicts(found_f, T0 + HOUR + 2)
        .expect("record");
    r.sync();
    for l in [&r.hub, &r.fridge, &r.pos] {
        assert_eq!(l.conflicts().len(), 1);
    }
    // A late cancel of a picked-up order is refused and recorded.
    let (_, outcome) = r
        .hub
        .cancel(&id("app-1"), &hub_device(), &POLICY, T0 + 2 * HOUR)
        .expect("cancel");
    assert!(matches!(
        outcome,
        CancelOutcome::Rejected("already_picked_up", _)
    ));
}

/// Three devices offline sell the same unit: the first sale stands and each later one is
/// flagged in a record of its own, the same on every replica; the third sale arriving after the
/// first two were recorded adds its own record and leaves theirs as they were.
#[test]
fn one_unit_sold_three_times_flags_both_later_orders() {
    let mut r = Replicas::new(2);
    let mut pos2 = ledger(actor_for(&id("pos-2")));
    push(&r.hub, &mut pos2);
    r.fridge
        .sell(
            &walk_up("f-1", "lasagna", Some("l1")),
            &catalog(),
            &id("fr-1"),
            T0 + 10,
        )
        .expect("fridge sale");
    r.pos
        .sell(
            &walk_up("p-1", "lasagna", Some("l1")),
            &catalog(),
            &id("pos-1"),
            T0 + 20,
        )
        .expect("pos sale");
    pos2.sell(
        &walk_up("q-1", "lasagna", Some("l1")),
        &catalog(),
        &id("pos-2"),
        T0 + 15,
    )
    .expect("second pos sale");
    r.sync();
    let two = r.hub.detect_conflicts(None);
    assert_eq!(two.len(), 1, "{two:?}");
    assert_eq!(two[0].flagged_order, Some(id("p-1")));
    r.hub.record_conflicts(two, T0 + 30).expect("record");
    // The second POS comes back: its sale is between the other two.
    push(&pos2, &mut r.hub);
    push(&r.hub, &mut pos2);
    r.sync();
    let found = r.hub.detect_conflicts(None);
    let flagged: Vec<Option<OrderId>> = found.iter().map(|c| c.flagged_order.clone()).collect();
    assert_eq!(flagged, [Some(id("q-1")), Some(id("p-1"))], "{found:?}");
    for c in &found {
        assert_eq!(c.orders, vec![id::<OrderId>("f-1"), id("q-1"), id("p-1")]);
    }
    assert_eq!(
        pos2.detect_conflicts(None),
        found,
        "the same on every replica"
    );
    r.hub.record_conflicts(found, T0 + 40).expect("record");
    r.sync();
    let recorded = r.fridge.conflicts();
    assert_eq!(recorded.len(), 2, "one record per flagged order");
    let mut flagged: Vec<OrderId> = recorded
        .iter()
        .filter_map(|c| c.record.flagged_order.clone())
        .collect();
    flagged.sort();
    assert_eq!(flagged, [id::<OrderId>("p-1"), id("q-1")]);
}

#[test]
fn one_unit_sold_twice_offline_flags_the_later_order_once() {
    let mut r = Replicas::new(2);
    r.fridge
        .sell(
            &walk_up("f-1", "lasagna", Some("l1")),
            &catalog(),
            &id("fr-1"),
            T0 + 10,
        )
        .expect("fridge sale");
    r.pos
        .sell(
            &walk_up("p-1", "lasagna", Some("l1")),
            &catalog(),
            &id("pos-1"),
            T0 + 20,
        )
        .expect("pos sale");
    r.sync();
    let found = r.hub.detect_conflicts(None);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind, ConflictKind::DoubleSale);
    assert_eq!(found[0].flagged_order, Some(id("p-1")));
    assert_eq!(found[0].orders, vec![id::<OrderId>("f-1"), id("p-1")]);
    assert_eq!(
        r.pos.detect_conflicts(None),
        found,
        "every replica sees the same conflict"
    );
    r.hub.record_conflicts(found, T0 + 30).expect("record");
    r.sync();
    let conflicts = r.fridge.conflicts();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].status, "open");
    // Both orders are kept.
    assert!(r.fridge.order(&id("f-1")).is_some() && r.fridge.order(&id("p-1")).is_some());
    // Resolved with a refund: the flagged order records it; a second resolution is refused.
    let res = Resolution {
        action: ResolutionAction::Refund,
        by: "kitchen".into(),
        at_ms: T0 + 40,
        note: None,
        unit_id: None,
    };
    let cid = conflicts[0].record.conflict_id.clone();
    let (_, view) = r.hub.resolve(&cid, &res, T0 + 40).expect("resolve");
    assert_eq!(view.status, "resolved");
    assert!(r.hub.resolve(&cid, &res, T0 + 41).is_err());
    r.sync();
    let p1 = r.pos.order(&id("p-1")).expect("order");
    assert!(p1.history.iter().any(|e| e.status == OrderStatus::Refunded));
    assert_eq!(p1.conflicts, vec![cid]);
}

#[test]
fn sales_by_count_beyond_the_stock_are_flagged_oversold() {
    let mut r = Replicas::new(1);
    r.fridge
        .sell(
            &walk_up("f-1", "lasagna", None),
            &catalog(),
            &id("fr-1"),
            T0 + 10,
        )
        .expect("fridge sale");
    r.pos
        .sell(
            &walk_up("p-1", "lasagna", None),
            &catalog(),
            &id("pos-1"),
            T0 + 20,
        )
        .expect("pos sale");
    r.sync();
    let found = r.hub.detect_conflicts(None);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind, ConflictKind::Oversold);
    assert_eq!(found[0].sku, Some(id("lasagna")));
}

#[test]
fn a_reserved_unit_taken_by_a_walk_up_customer_moves_the_reservation() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    r.sync();
    // A walk-up customer takes l1 (held for app-1) at the fridge and pays by card there.
    let mut s = session("d1", &["l1"], None);
    s.card_order_id = Some(id("card-1"));
    let (_, matches) = r
        .fridge
        .door_session(&s, &catalog(), &id("fr-1"), T0 + 100)
        .expect("door");
    assert_eq!(
        matches,
        vec![(
            id("l1"),
            TakenMatch::FridgeCard {
                order_id: id("card-1")
            }
        )]
    );
    r.sync();
    let view = r.hub.order(&id("app-1")).expect("order");
    assert_eq!(view.reserved_units, vec![id::<UnitId>("l2")]);
    assert!(
        r.hub
            .repair_reservations(T0 + 200)
            .expect("repair")
            .is_none()
    );
    // The POS sells l2 by scanning it: nothing is left, so the reservation is lost.
    r.pos
        .sell(
            &walk_up("w-1", "lasagna", Some("l2")),
            &catalog(),
            &id("pos-1"),
            T0 + 300,
        )
        .expect("walk-up of a held unit stands");
    r.sync();
    let change = r.hub.repair_reservations(T0 + 400).expect("repair");
    assert!(change.is_some());
    let conflicts = r.hub.conflicts();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].record.kind, ConflictKind::ReservationLost);
    assert_eq!(conflicts[0].record.flagged_order, Some(id("app-1")));
    assert!(
        r.hub
            .repair_reservations(T0 + 500)
            .expect("repair")
            .is_none()
    );
}

#[test]
fn a_pickup_takes_another_unit_of_the_sku_when_the_held_one_is_gone() {
    let mut r = Replicas::new(2);
    r.order("app-1", "lasagna", 1, true, T0);
    // The fridge went offline before it saw app-1. A walk-up takes l1, the customer takes l2.
    r.fridge
        .sell(
            &walk_up("w-1", "lasagna", Some("l1")),
            &catalog(),
            &id("fr-1"),
            T0 + 10,
        )
        .expect("sale");
    r.sync();
    let (_, matches) = r
        .fridge
        .door_session(
            &session("d1", &["l2"], Some("app-1")),
            &catalog(),
            &id("fr-1"),
            T0 + 20,
        )
        .expect("door");
    assert_eq!(
        matches,
        vec![(
            id("l2"),
            TakenMatch::Reservation {
                order_id: id("app-1")
            }
        )]
    );
}

#[test]
fn a_sale_priced_from_a_superseded_catalog_is_flagged_and_its_price_stands() {
    let mut r = Replicas::new(4);
    let v1 = catalog();
    let mut v2 = catalog();
    v2.version = 2;
    for item in &mut v2.items {
        item.price_minor = 800;
    }
    let mut history = CatalogHistory::default();
    history.push(&v1, T0 - HOUR);
    history.push(&v2, T0 + 50);
    // Offline, the POS still prices from version 1: once before version 2 came out, once after.
    for (order, unit, at) in [("p-early", "l1", T0 + 10), ("p-late", "l2", T0 + 100)] {
        r.pos
            .sell(
                &walk_up(order, "lasagna", Some(unit)),
                &v1,
                &id("pos-1"),
                at,
            )
            .expect("pos sale");
    }
    // A sale priced from version 2 after it came out is not a conflict either.
    let mut at_v2 = walk_up("f-new", "lasagna", Some("l3"));
    at_v2.payment.amount_minor = 800;
    r.fridge
        .sell(&at_v2, &v2, &id("fr-1"), T0 + 120)
        .expect("fridge sale");
    let changes: Vec<Vec<u8>> = [&r.pos, &r.fridge]
        .iter()
        .flat_map(|l| {
            l.doc
                .get_changes(&[])
                .into_iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect::<Vec<_>>()
        })
        .collect();
    let touched = r.hub.apply_changes(&changes).expect("merge");
    let (_, found) = r
        .hub
        .hub_after_merge(&touched, false, Some(&history), T0 + 200)
        .expect("after merge");
    let priced: Vec<&ConflictRecord> = found
        .iter()
        .filter(|c| c.kind == ConflictKind::PriceChanged)
        .collect();
    assert_eq!(priced.len(), 1, "{found:?}");
    assert_eq!(priced[0].orders, vec![id::<OrderId>("p-late")]);
    assert_eq!(
        priced[0].flagged_order, None,
        "the POS price stands: nothing to refund"
    );
    assert!(
        priced[0].detail.contains("version 1 for 700") && priced[0].detail.contains("version 2")
    );
    // The record reaches the order on every replica, and the sale keeps its own price.
    r.sync();
    let late = r.pos.order(&id("p-late")).expect("order");
    assert_eq!(late.record.total_minor, 700);
    assert_eq!(late.record.catalog_version, 1);
    assert_eq!(late.conflicts, vec![priced[0].conflict_id.clone()]);
    // The same merge seen again records nothing new.
    let (again, _) = r
        .hub
        .hub_after_merge(&touched, false, Some(&history), T0 + 300)
        .expect("after merge");
    assert!(again.is_empty(), "one record per conflict");
}
