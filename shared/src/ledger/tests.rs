//! Table-driven tests of the ledger document: commands, merges, conflicts and reloads.

use super::*;
use crate::catalog::CatalogItem;
use crate::domain::{PaymentMethod, SaleLine};

const NOW: i64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

fn fridge() -> FridgeId {
    FridgeId::new("fridge-1").expect("id")
}

fn dev(name: &str) -> DeviceId {
    DeviceId::new(name).expect("id")
}

fn catalog() -> Catalog {
    Catalog {
        version: 3,
        currency: "EUR".into(),
        items: vec![
            CatalogItem {
                sku: Sku::new("lasagna").expect("sku"),
                name: "Lasagna".into(),
                price_minor: 850,
                allergens: vec![],
                shelf_life_hours: 72,
            },
            CatalogItem {
                sku: Sku::new("salad").expect("sku"),
                name: "Salad".into(),
                price_minor: 600,
                allergens: vec![],
                shelf_life_hours: 48,
            },
        ],
    }
}

fn unit(id: &str, sku: &str, expires_at_ms: i64) -> RefillUnit {
    RefillUnit {
        unit_id: UnitId::new(id).expect("id"),
        sku: Sku::new(sku).expect("sku"),
        expires_at_ms,
        batch: None,
    }
}

fn sale(order: &str, lines: &[(&str, Option<&str>, u32)], amount: i64) -> Sale {
    Sale {
        order_id: OrderId::new(order).expect("id"),
        channel: Channel::Pos,
        lines: lines
            .iter()
            .map(|(sku, unit, q)| SaleLine {
                sku: Sku::new(*sku).expect("sku"),
                unit_id: unit.map(|u| UnitId::new(u).expect("id")),
                quantity: *q,
            })
            .collect(),
        payment: Payment {
            method: PaymentMethod::Card,
            amount_minor: amount,
            currency: "EUR".into(),
        },
        payment_pending: false,
    }
}

fn stocked() -> Ledger {
    let mut l = Ledger::new(fridge(), actor_for(&dev("fr-1"))).expect("ledger");
    l.refill(
        &Refill {
            units: vec![
                unit("u1", "lasagna", NOW + 2 * DAY),
                unit("u2", "lasagna", NOW + DAY),
                unit("u3", "salad", NOW + DAY),
                unit("u4", "salad", NOW - 1),
            ],
            order_id: None,
        },
        &dev("fr-1"),
        NOW,
    )
    .expect("refill");
    l
}

#[test]
fn genesis_is_the_same_on_every_replica() {
    let a = Ledger::new(fridge(), actor_for(&dev("a"))).expect("ledger");
    let b = Ledger::new(fridge(), actor_for(&dev("b"))).expect("ledger");
    assert_eq!(a.heads_digest(), b.heads_digest());
    let other =
        Ledger::new(FridgeId::new("fridge-2").expect("id"), actor_for(&dev("a"))).expect("ledger");
    assert_ne!(a.heads_digest(), other.heads_digest());
}

#[test]
fn sale_outcomes_by_table() {
    type Case = (&'static str, Sale, Result<Vec<&'static str>, &'static str>);
    let cases: Vec<Case> = vec![
        (
            "by unit",
            sale("o1", &[("lasagna", Some("u1"), 1)], 850),
            Ok(vec!["u1"]),
        ),
        (
            "count picks earliest expiry",
            sale("o2", &[("lasagna", None, 1)], 850),
            Ok(vec!["u2"]),
        ),
        (
            "count skips expired",
            sale("o3", &[("salad", None, 1)], 600),
            Ok(vec!["u3"]),
        ),
        (
            "expired unit",
            sale("o4", &[("salad", Some("u4"), 1)], 600),
            Err("unit_not_available"),
        ),
        (
            "too many",
            sale("o5", &[("salad", None, 2)], 1200),
            Err("insufficient_stock"),
        ),
        (
            "wrong amount",
            sale("o6", &[("lasagna", Some("u1"), 1)], 1),
            Err("amount_mismatch"),
        ),
        (
            "unknown sku",
            sale("o7", &[("soup", None, 1)], 1),
            Err("unknown_sku"),
        ),
        (
            "wrong sku",
            sale("o8", &[("salad", Some("u1"), 1)], 600),
            Err("invalid"),
        ),
        (
            "zero quantity",
            sale("o9", &[("salad", None, 0)], 0),
            Err("invalid"),
        ),
        (
            "unit twice",
            sale(
                "o10",
                &[("lasagna", Some("u1"), 1), ("lasagna", Some("u1"), 1)],
                1700,
            ),
            Err("invalid"),
        ),
        (
            "unknown unit is sold",
            sale("o11", &[("lasagna", Some("u99"), 1)], 850),
            Ok(vec!["u99"]),
        ),
    ];
    for (name, s, want) in cases {
        let mut l = stocked();
        let got = l
            .sell(&s, &catalog(), &dev("pos-1"), NOW)
            .map(|(_, view)| {
                view.record
                    .lines
                    .iter()
                    .flat_map(|line| line.unit_ids.iter().map(|u| u.as_str().to_owned()))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| match e {
                LedgerError::UnitNotAvailable { .. } => "unit_not_available",
                LedgerError::InsufficientStock { .. } => "insufficient_stock",
                LedgerError::AmountMismatch { .. } => "amount_mismatch",
                LedgerError::UnknownSku(_) => "unknown_sku",
                LedgerError::Invalid(_) => "invalid",
                other => panic!("{name}: unexpected {other:?}"),
            });
        let want = want.map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>());
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn sold_unit_cannot_be_sold_again_and_state_shows_it() {
    let mut l = stocked();
    l.sell(
        &sale("o1", &[("lasagna", Some("u1"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    )
    .expect("first sale");
    let again = l.sell(
        &sale("o2", &[("lasagna", Some("u1"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    );
    assert!(matches!(
        again,
        Err(LedgerError::UnitNotAvailable { state: "sold", .. })
    ));
    let dup = l.sell(
        &sale("o1", &[("lasagna", Some("u2"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    );
    assert!(matches!(dup, Err(LedgerError::OrderExists(_))));
    let u1 = l.unit(&UnitId::new("u1").expect("id"), NOW).expect("known");
    assert_eq!(u1.state, UnitState::Sold);
    assert_eq!(u1.sold_in, Some(OrderId::new("o1").expect("id")));
}

#[test]
fn replicas_converge_and_double_sale_is_kept() {
    let mut fridge_l = stocked();
    let mut pos = Ledger::new(fridge(), actor_for(&dev("pos-1"))).expect("ledger");
    let mut pos2 = Ledger::new(fridge(), actor_for(&dev("pos-2"))).expect("ledger");
    let refill = fridge_l.save();
    // Ship the refill as change bytes, as sync does.
    let loaded = Ledger::load(fridge(), actor_for(&dev("x")), Some(&refill), &[]).expect("load");
    assert_eq!(loaded.state_digest(), fridge_l.state_digest());
    let refill_changes = changes_of(&fridge_l, "fr-1");
    let touched = pos.apply_changes(&refill_changes).expect("merge");
    assert_eq!(touched.units.len(), 4);
    pos2.apply_changes(&refill_changes).expect("merge");
    let (a, _) = pos
        .sell(
            &sale("pa", &[("lasagna", Some("u1"), 1)], 850),
            &catalog(),
            &dev("pos-1"),
            NOW,
        )
        .expect("sale a");
    let (b, _) = pos2
        .sell(
            &sale("pb", &[("lasagna", Some("u1"), 1)], 850),
            &catalog(),
            &dev("pos-2"),
            NOW,
        )
        .expect("sale b offline");
    for l in [&mut fridge_l, &mut pos, &mut pos2] {
        // Duplicates and either order are fine.
        l.apply_changes(&[
            b.changes[0].clone(),
            a.changes[0].clone(),
            b.changes[0].clone(),
        ])
        .expect("merge");
    }
    assert_eq!(fridge_l.state_digest(), pos.state_digest());
    assert_eq!(pos.state_digest(), pos2.state_digest());
    assert_eq!(fridge_l.heads_digest(), pos2.heads_digest());
    let sold = fridge_l
        .doc
        .get_all(&fridge_l.maps.sold, "u1")
        .expect("get_all");
    assert_eq!(sold.len(), 2, "both sales of u1 are kept");
    assert_eq!(fridge_l.order_ids().len(), 2);
}

#[test]
fn authorship_is_checked() {
    let mut l = Ledger::new(fridge(), actor_for(&dev("pos-1"))).expect("ledger");
    let c = l
        .refill(
            &Refill {
                units: vec![unit("u1", "salad", NOW + DAY)],
                order_id: None,
            },
            &dev("pos-1"),
            NOW,
        )
        .expect("refill");
    assert_eq!(
        Ledger::check_authors(
            std::slice::from_ref(&c.changes[0]),
            &actor_for(&dev("pos-1"))
        ),
        Ok(())
    );
    assert_eq!(
        Ledger::check_authors(
            std::slice::from_ref(&c.changes[0]),
            &actor_for(&dev("pos-2"))
        ),
        Err(LedgerError::ForeignActor)
    );
    assert!(matches!(
        Ledger::check_authors(&[vec![1, 2, 3]], &actor_for(&dev("pos-1"))),
        Err(LedgerError::BadChange(_))
    ));
}

#[test]
fn door_session_matches_sales_and_records_unpaid() {
    let mut l = stocked();
    l.sell(
        &sale("o1", &[("lasagna", Some("u1"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    )
    .expect("sale");
    let (_, matches) = l
        .door_session(
            &DoorSession {
                session_id: "s1".into(),
                units_taken: vec![
                    UnitId::new("u1").expect("id"),
                    UnitId::new("u3").expect("id"),
                ],
                units_added: vec![],
                order_id: None,
                card_order_id: None,
            },
            &catalog(),
            &dev("fr-1"),
            NOW + 1,
        )
        .expect("door");
    assert_eq!(
        matches,
        vec![
            (
                UnitId::new("u1").expect("id"),
                TakenMatch::Sale {
                    order_id: OrderId::new("o1").expect("id")
                }
            ),
            (UnitId::new("u3").expect("id"), TakenMatch::Unpaid),
        ]
    );
    let order = l.order(&OrderId::new("o1").expect("id")).expect("order");
    assert_eq!(order.status, OrderStatus::PickedUp);
    assert_eq!(order.history.len(), 2);
    assert_eq!(
        l.unit(&UnitId::new("u3").expect("id"), NOW)
            .expect("u3")
            .state,
        UnitState::Taken
    );
}

#[test]
fn reload_from_snapshot_and_changes_is_identical() {
    let mut l = stocked();
    let snapshot = l.save();
    let (c, _) = l
        .sell(
            &sale("o1", &[("salad", None, 1)], 600),
            &catalog(),
            &dev("fr-1"),
            NOW,
        )
        .expect("sale");
    let back = Ledger::load(
        fridge(),
        actor_for(&dev("fr-1")),
        Some(&snapshot),
        &c.changes,
    )
    .expect("reload");
    assert_eq!(back.state_digest(), l.state_digest());
    assert_eq!(back.units(NOW), l.units(NOW));
}

#[test]
fn snapshots_are_due_when_idle_or_overdue() {
    let counts: HashMap<FridgeId, usize> = [
        (FridgeId::new("a").expect("id"), 4),
        (FridgeId::new("b").expect("id"), 10),
        (FridgeId::new("c").expect("id"), 40),
    ]
    .into_iter()
    .collect();
    let sorted = |mut v: Vec<FridgeId>| {
        v.sort();
        v.into_iter()
            .map(|f| f.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(sorted(snapshots_due(&counts, 10, true)), ["b", "c"]);
    assert_eq!(
        sorted(snapshots_due(&counts, 10, false)),
        ["c"],
        "busy: only the overdue"
    );
    assert_eq!(
        sorted(snapshots_due(&counts, 100, true)),
        Vec::<String>::new()
    );
}

/// The unit views a change came with (sorted by id), and the same units read back from the
/// document.
fn given_and_read_back(l: &Ledger, change: &LocalChange) -> (Vec<UnitView>, Vec<UnitView>) {
    let read = change
        .touched
        .units
        .iter()
        .filter_map(|u| l.unit(u, i64::MIN))
        .collect();
    let mut given = change.units.clone();
    given.sort_by(|a, b| a.unit_id.cmp(&b.unit_id));
    (given, read)
}

#[test]
fn a_sale_returns_the_views_the_document_gives() {
    let mut l = stocked();
    for (order, lines, amount) in [
        ("o1", vec![("lasagna", Some("u1"), 1)], 850),
        ("o2", vec![("lasagna", None, 1), ("salad", None, 1)], 1450),
        ("o3", vec![("lasagna", Some("u-unknown"), 1)], 850),
    ] {
        let (change, view) = l
            .sell(&sale(order, &lines, amount), &catalog(), &dev("pos-1"), NOW)
            .expect("sale");
        let (given, read_units) = given_and_read_back(&l, &change);
        assert_eq!(given, read_units, "{order}");
        assert_eq!(
            change.orders,
            vec![l.order(&view.record.order_id).expect("order")]
        );
    }
    // The index no longer offers sold units.
    let again = l.sell(
        &sale("o4", &[("salad", None, 1)], 600),
        &catalog(),
        &dev("pos-1"),
        NOW,
    );
    assert!(matches!(again, Err(LedgerError::InsufficientStock { .. })));
}

#[test]
fn a_refill_returns_the_views_the_document_gives() {
    let mut l = stocked();
    // Sold before its refill is known here (a sale by id that merged first): the refill's
    // view of it must say sold, and the index must not offer it.
    l.sell(
        &sale("o1", &[("lasagna", Some("u9"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    )
    .expect("sale");
    assert!(!l.knows_unit(&UnitId::new("u9").expect("id")));
    let change = l
        .refill(
            &Refill {
                units: vec![
                    unit("u9", "lasagna", NOW + DAY),
                    unit("u10", "lasagna", NOW + 3 * DAY),
                    unit("u11", "salad", NOW - 1),
                ],
                order_id: None,
            },
            &dev("fr-1"),
            NOW,
        )
        .expect("refill");
    let (given, read_units) = given_and_read_back(&l, &change);
    assert_eq!(read_units.len(), 3);
    assert_eq!(given, read_units);
    assert_eq!(given[2].state, UnitState::Sold, "{:?}", given[2]);
    assert!(
        ["u9", "u10", "u11"]
            .iter()
            .all(|u| l.knows_unit(&UnitId::new(*u).expect("id")))
    );
    let free = l.free_units(&Sku::new("lasagna").expect("sku"), NOW);
    assert!(free.contains(&UnitId::new("u10").expect("id")));
    assert!(!free.contains(&UnitId::new("u9").expect("id")));
}

/// A refill of a unit the document mentions nowhere skips the document's lookups, so the
/// ledger must know every unit a change mentioned before its refill, however the change came:
/// made here, merged from another replica, or in the document a ledger was loaded from. In
/// each case the refill's views are the document's, a sold or removed unit is not offered,
/// and a unit refilled elsewhere cannot be refilled again.
///
/// One piece: the three ways a unit can be mentioned first, each followed by its refill.
#[test]
fn a_refill_knows_units_mentioned_before_it_however_they_came() {
    let mut pos = stocked();
    pos.sell(
        &sale("o1", &[("lasagna", Some("m1"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    )
    .expect("sale");
    // Removed before its refill: this ledger refuses that now, an older replica wrote it.
    let mut older = Ledger::new(fridge(), actor_for(&dev("pos-9"))).expect("ledger");
    {
        let mut tx = older.doc.transaction();
        tx.put(
            &older.maps.removed,
            "m2",
            to_json(&crate::domain::RemovalReason::Damaged),
        )
        .expect("put");
        tx.commit();
    }
    let removal = older
        .doc
        .get_last_local_change()
        .expect("change")
        .raw_bytes()
        .to_vec();
    pos.apply_changes(&[removal]).expect("merge");
    pos.refill(
        &Refill {
            units: vec![unit("m3", "lasagna", NOW + DAY)],
            order_id: None,
        },
        &dev("pos-1"),
        NOW,
    )
    .expect("refill elsewhere");
    let merged = |pos: &Ledger| {
        let mut hub = Ledger::new(fridge(), actor_for(&dev("hub"))).expect("ledger");
        hub.apply_changes(
            &pos.doc
                .get_changes(&[])
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect::<Vec<_>>(),
        )
        .expect("merge");
        hub
    };
    let loaded = |pos: &Ledger| {
        Ledger::load(fridge(), actor_for(&dev("hub")), Some(&pos.save()), &[]).expect("load")
    };
    for (how, mut l) in [
        ("merged", merged(&pos)),
        ("loaded", loaded(&pos)),
        ("made here", pos),
    ] {
        let again = l.refill(
            &Refill {
                units: vec![unit("m3", "lasagna", NOW + DAY)],
                order_id: None,
            },
            &dev("hub"),
            NOW,
        );
        assert!(
            matches!(again, Err(LedgerError::UnitExists(_))),
            "{how}: {again:?}"
        );
        let change = l
            .refill(
                &Refill {
                    units: vec![
                        unit("m1", "lasagna", NOW + DAY),
                        unit("m2", "lasagna", NOW + DAY),
                        unit("m4", "lasagna", NOW + DAY),
                    ],
                    order_id: None,
                },
                &dev("hub"),
                NOW,
            )
            .expect("refill");
        let (given, read_units) = given_and_read_back(&l, &change);
        assert_eq!(given, read_units, "{how}");
        let states: Vec<UnitState> = given.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            vec![UnitState::Sold, UnitState::Removed, UnitState::Available],
            "{how}"
        );
        let free = l.free_units(&Sku::new("lasagna").expect("sku"), NOW);
        let id = |u: &str| UnitId::new(u).expect("id");
        assert!(
            free.contains(&id("m4")) && free.contains(&id("m3")),
            "{how}: {free:?}"
        );
        assert!(
            !free.contains(&id("m1")) && !free.contains(&id("m2")),
            "{how}: {free:?}"
        );
    }
}

/// A peer's op on the document root (where the genesis change put the maps) could replace a
/// map and break every later load: refused, and the ledger unchanged.
#[test]
fn a_peer_change_writing_the_root_is_refused() {
    let mut hub = Ledger::new(fridge(), actor_for(&dev("hub"))).expect("ledger");
    let mut peer = Ledger::new(fridge(), actor_for(&dev("pos-1"))).expect("ledger");
    let mut tx = peer.doc.transaction();
    tx.put(ROOT, "units", "gone").expect("put");
    tx.commit();
    let bytes = peer
        .doc
        .get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec();
    let before = hub.heads_digest();
    assert!(matches!(
        hub.apply_changes(&[bytes]),
        Err(LedgerError::BadChange(_))
    ));
    assert_eq!(hub.heads_digest(), before);
    // The genesis change every replica holds passes as the no-op it is.
    let genesis = hub.doc.get_changes(&[])[0].raw_bytes().to_vec();
    hub.apply_changes(&[genesis])
        .expect("a change already held");
}

/// Only a unit loaded here and still in the fridge can be removed: a sold one, one already
/// removed and one never loaded are refused, and nothing is written.
#[test]
fn removals_take_only_units_in_the_fridge() {
    let mut l = stocked();
    l.sell(
        &sale("o1", &[("lasagna", Some("u1"), 1)], 850),
        &catalog(),
        &dev("pos-1"),
        NOW,
    )
    .expect("sale");
    let heads = l.doc.get_heads();
    let id = |u: &str| UnitId::new(u).expect("id");
    for (unit, state) in [("u1", "sold"), ("ghost", "not loaded in this fridge")] {
        let got = l.remove(&[id("u2"), id(unit)], RemovalReason::Damaged, NOW);
        assert_eq!(
            got,
            Err(LedgerError::UnitNotAvailable {
                unit: id(unit),
                state
            })
        );
    }
    assert_eq!(l.doc.get_heads(), heads, "nothing written");
    l.remove(&[id("u2")], RemovalReason::Damaged, NOW)
        .expect("remove");
    assert_eq!(
        l.remove(&[id("u2")], RemovalReason::Expired, NOW),
        Err(LedgerError::UnitNotAvailable {
            unit: id("u2"),
            state: "removed"
        })
    );
}

/// A change merged before the change it depends on waits in Automerge's queue; what it
/// touches is answered again when the merge that brings its dependency applies it (a hub
/// restored behind its devices gets their changes in any order).
#[test]
fn a_change_that_waited_for_its_dependency_is_touched_when_it_applies() {
    let mut fridge_l = stocked();
    let first = changes_of(&fridge_l, "fr-1");
    let more = Refill {
        units: vec![unit("u9", "lasagna", NOW + DAY)],
        order_id: None,
    };
    let refill = fridge_l
        .refill(&more, &dev("fr-1"), NOW)
        .expect("refill")
        .changes;
    let (sold, _) = fridge_l
        .sell(
            &sale("o1", &[("lasagna", Some("u9"), 1)], 850),
            &catalog(),
            &dev("fr-1"),
            NOW,
        )
        .expect("sale");
    let order = OrderId::new("o1").expect("id");
    for restarted in [false, true] {
        let mut hub = Ledger::new(fridge(), actor_for(&dev("hub"))).expect("ledger");
        hub.apply_changes(&first).expect("merge");
        if restarted {
            // As a hub restarted with the sale stored and the refill it needs still missing.
            let stored = [first.clone(), sold.changes.clone()].concat();
            hub = Ledger::load(fridge(), actor_for(&dev("hub")), None, &stored).expect("load");
        } else {
            hub.apply_changes(&sold.changes).expect("merge waits");
        }
        assert_eq!(hub.order(&order), None, "the sale waits for its refill");
        let touched = hub.apply_changes(&refill).expect("merge");
        assert!(
            touched.orders.contains(&order),
            "the sale that waited is touched when it applies (restarted: {restarted}): {touched:?}"
        );
        assert!(hub.order(&order).is_some());
        // Nothing waits any more: merged again, the sale touches nothing new.
        let again = hub.apply_changes(&sold.changes).expect("a duplicate");
        assert!(again.orders.is_empty(), "{again:?}");
    }
}

/// The changes `device` made in `ledger`'s document, as sync ships them.
fn changes_of(ledger: &Ledger, device: &str) -> Vec<Vec<u8>> {
    ledger
        .doc
        .get_changes(&[])
        .iter()
        .filter(|c| c.actor_id() == &actor_for(&dev(device)))
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}
