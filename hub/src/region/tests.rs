//! Tests of the region writer: what a failed commit leaves behind, what the metrics count, that
//! one device's bad change costs only its own envelope, how far a downlink ack counts, and
//! what a subscription tick sees of its own group.

use larder_shared::envelope::Ack;
use larder_shared::{RegionId, SecretKey, UnitId};
use tokio::sync::oneshot;

use super::testing::{Loader, Scene, fridge, record, scene, writer};
use super::{Outcome, RegionCommand, RegionError, RegionWriter, UplinkOutcome};
use crate::store::{RegionBatch, RegionStore};

/// Hands the writer `payload` from `from` as a group of its own, and answers the writer's
/// verdict.
fn send(writer: &mut RegionWriter, from: &Loader, payload: &[u8]) -> UplinkOutcome {
    let mut outcomes = send_group(writer, vec![(from, payload.to_vec())]);
    outcomes.pop().expect("one verdict")
}

/// Hands the writer these uplinks as one group, and answers its verdicts in order.
fn send_group(writer: &mut RegionWriter, uplinks: Vec<(&Loader, Vec<u8>)>) -> Vec<UplinkOutcome> {
    let (group, answers): (Vec<_>, Vec<_>) = uplinks
        .into_iter()
        .map(|(from, payload)| {
            let (reply, answer) = oneshot::channel();
            let cmd = RegionCommand::Uplink {
                topic_device: from.id.clone(),
                payload: payload.into(),
                reply,
                pre: None,
            };
            (cmd, answer)
        })
        .unzip();
    writer.process(group);
    answers
        .into_iter()
        .map(|a| a.blocking_recv().expect("answered"))
        .collect()
}

/// The store holds `changes` change rows, and a writer loaded fresh from it holds what
/// `writer` holds.
fn assert_stored(writer: &RegionWriter, scene: &Scene, changes: i64, which: &str) {
    let stored: i64 = rusqlite::Connection::open(&scene.path)
        .expect("connection")
        .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
        .expect("count");
    assert_eq!(stored, changes, "{which}");
    let reopened = writer_on(&scene.region, &scene.path, &scene.hub);
    assert_eq!(
        writer.ledgers[&fridge()].state_digest(),
        reopened.ledgers[&fridge()].state_digest(),
        "the writer holds what its store holds"
    );
}

/// A writer on the scene's store with `devices` enrolled (POS of fridge-1).
fn enrolled_writer(scene: &Scene, devices: &[&Loader]) -> RegionWriter {
    let mut store = RegionStore::open(&scene.path).expect("store");
    let enroll = RegionBatch {
        enroll: devices.iter().map(|d| record(&d.id, &d.key)).collect(),
        ..RegionBatch::default()
    };
    store.commit(&enroll).expect("commit");
    writer(&scene.region, store, &scene.hub)
}

fn acked(up_to: u64) -> UplinkOutcome {
    UplinkOutcome::Ack(Ack::new(up_to, false))
}

fn has_unit(writer: &RegionWriter, unit: &str) -> bool {
    writer.ledgers[&fridge()]
        .unit(&UnitId::new(unit).expect("id"), 0)
        .is_some()
}

/// An uplink whose group fails to commit is refused for `storage` and forgotten: the writer's
/// ledgers are reloaded from the store and the device's progress is as stored, so the same
/// envelope sent again is taken (not refused as a replay). The metrics count an envelope
/// accepted only once it is committed, and the refused one as rejected for `storage`. The
/// writer ends with exactly what its store holds.
#[test]
fn an_uplink_whose_commit_fails_is_refused_forgotten_and_counted() {
    let scene = scene();
    let Scene {
        path, region, hub, ..
    } = &scene;
    let mut a = Loader::new("pos-a");
    let mut b = Loader::new("pos-b");
    let mut writer = enrolled_writer(&scene, &[&a, &b]);
    // The store refuses pos-b's audit rows, as a full disk would refuse the write.
    let admin = rusqlite::Connection::open(path).expect("connection");
    admin
        .execute_batch(
            "CREATE TRIGGER doomed BEFORE INSERT ON audit WHEN NEW.device = 'pos-b'
             BEGIN SELECT RAISE(ABORT, 'no room'); END;",
        )
        .expect("trigger");
    let (a1, _) = a.load(region, hub, "u-a1");
    let (a2, _) = a.load(region, hub, "u-a2");
    let (b1, _) = b.load(region, hub, "u-b1");

    assert_eq!(send(&mut writer, &a, &a1), acked(1));
    assert_eq!(
        send(&mut writer, &b, &b1),
        UplinkOutcome::Rejected("storage")
    );
    assert!(has_unit(&writer, "u-a1"));
    assert!(
        !has_unit(&writer, "u-b1"),
        "the refused change is forgotten"
    );
    assert_eq!(send(&mut writer, &a, &a2), acked(2));
    admin
        .execute_batch("DROP TRIGGER doomed")
        .expect("room again");
    assert_eq!(
        send(&mut writer, &b, &b1),
        acked(1),
        "sent again, it is taken"
    );

    let accepted = writer
        .metrics
        .envelopes_accepted
        .get_or_create(&vec![("region", region.to_string())])
        .get();
    let refused = writer
        .metrics
        .envelopes_rejected
        .get_or_create(&vec![
            ("region", region.to_string()),
            ("reason", "storage".to_owned()),
        ])
        .get();
    assert_eq!((accepted, refused), (3, 1));
    for unit in ["u-a1", "u-a2", "u-b1"] {
        assert!(has_unit(&writer, unit), "{unit} is kept");
    }
    assert_stored(&writer, &scene, 3, "each change is stored once");
}

/// A change the ledger refuses (here one that would replace a ledger's root map) is refused
/// with its envelope alone: the other devices' envelopes in the same group are merged and
/// committed, and so are the bad device's later, good envelopes. A compressed change chunk,
/// which Automerge would inflate without a bound, is refused unparsed, even around a good
/// change.
#[test]
fn a_bad_change_costs_its_own_envelope_not_the_group() {
    let scene = scene();
    let Scene { region, hub, .. } = &scene;
    let mut a = Loader::new("pos-a");
    let mut b = Loader::new("pos-b");
    let mut writer = enrolled_writer(&scene, &[&a, &b]);

    // pos-b's first change puts a string where the `units` map is, as a broken or hostile
    // agent could: it is signed by pos-b and authored by pos-b's actor.
    let mut doc = automerge::AutoCommit::new().with_actor(larder_shared::ledger::actor_for(&b.id));
    automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "units", "gone")
        .expect("put");
    let bad_change = doc
        .get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec();
    let (a1, _) = a.load(region, hub, "u-a1");
    let (b1, _) = b.send(region, hub, bad_change);
    let (a2, _) = a.load(region, hub, "u-a2");
    let outcomes = send_group(&mut writer, vec![(&a, a1), (&b, b1), (&a, a2)]);
    assert_eq!(
        outcomes,
        [acked(1), UplinkOutcome::Rejected("malformed"), acked(2)],
        "one group, one bad envelope"
    );
    assert!(has_unit(&writer, "u-a1") && has_unit(&writer, "u-a2"));

    // pos-b's agent, fixed, sends a good change under the same numbers: it is taken.
    b.rewind();
    let (b1, _) = b.load(region, hub, "u-b1");
    assert_eq!(send(&mut writer, &b, &b1), acked(1));
    assert!(has_unit(&writer, "u-b1"));

    // A good change sent as a compressed chunk (type 2) is refused as it is, unparsed.
    let units: Vec<String> = (0..20).map(|i| format!("u-big-{i}")).collect();
    let units: Vec<&str> = units.iter().map(String::as_str).collect();
    let mut change = automerge::Change::from_bytes(b.change(&units)).expect("a change");
    let compressed = change.bytes().to_vec();
    assert_eq!(compressed.get(8), Some(&2), "automerge compressed it");
    let (b2, _) = b.send(region, hub, compressed);
    assert_eq!(
        send(&mut writer, &b, &b2),
        UplinkOutcome::Rejected("malformed")
    );
    assert!(!has_unit(&writer, "u-big-0"));

    assert_stored(&writer, &scene, 3, "u-a1, u-a2 and u-b1");
}

/// A device's acknowledgement of its downlink counts only up to what the region committed: an
/// ack of everything (`u64::MAX`) moves it to the region's head, and is stored as such.
#[test]
fn a_downlink_ack_past_the_head_counts_up_to_the_head() {
    let scene = scene();
    let Scene {
        path, region, hub, ..
    } = &scene;
    let mut a = Loader::new("pos-a");
    let mut writer = enrolled_writer(&scene, &[&a]);
    let (a1, _) = a.load(region, hub, "u-a1");
    assert_eq!(send(&mut writer, &a, &a1), acked(1));
    let head = writer.store.head().expect("head");
    assert!(head >= 1, "the change is in the region's log");
    let everything = super::testing::sealed(
        region,
        &a.id,
        &a.key,
        hub,
        2,
        larder_shared::envelope::Body::Ack(Ack::new(u64::MAX, false)),
    );
    assert_eq!(
        send(&mut writer, &a, &everything),
        UplinkOutcome::DownAcked(head)
    );
    let stored = RegionStore::open(path)
        .expect("store")
        .device(&a.id)
        .expect("read")
        .expect("enrolled")
        .1;
    assert_eq!(stored.down_acked, head);
}

/// Hands the writer `ops` (subscription commands) and a tick as one group; answers the ops.
fn group_with_tick(
    writer: &mut RegionWriter,
    ops: Vec<super::SubscriptionOp>,
) -> Vec<super::Outcome> {
    let (mut group, mut answers) = (Vec::new(), Vec::new());
    for op in ops {
        let (reply, answer) = oneshot::channel();
        group.push(RegionCommand::Subscription {
            op,
            idem: None,
            reply,
        });
        answers.push(answer);
    }
    group.push(RegionCommand::Tick);
    writer.process(group);
    answers
        .into_iter()
        .map(|a| a.blocking_recv().expect("answered").expect("answer"))
        .collect()
}

/// Publishes a catalog with lasagna.
fn publish_lasagna(writer: &mut RegionWriter) {
    let (reply, answer) = oneshot::channel();
    writer.process(vec![RegionCommand::PutCatalog {
        currency: "EUR".into(),
        items: vec![larder_shared::catalog::CatalogItem {
            sku: larder_shared::Sku::new("lasagna").expect("sku"),
            name: "Lasagna".into(),
            price_minor: 890,
            allergens: Vec::new(),
            shelf_life_hours: 48,
        }],
        base: None,
        idem: None,
        reply,
    }]);
    answer
        .blocking_recv()
        .expect("answered")
        .expect("published");
}

/// A daily lasagna at fridge-1 from `start`.
fn daily(id: &str, start: jiff::civil::Date) -> crate::subscriptions::Subscription {
    crate::subscriptions::Subscription {
        subscription_id: id.into(),
        customer_id: "c-1".into(),
        fridge_id: fridge(),
        lines: vec![larder_shared::domain::AppOrderLine {
            sku: larder_shared::Sku::new("lasagna").expect("sku"),
            quantity: 1,
        }],
        weekdays: ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .map(String::from)
            .to_vec(),
        start_date: start,
        end_date: None,
        created_at_ms: 0,
        ended_at_ms: None,
    }
}

/// Today and tomorrow by the writer's clock. The test writer's cut-off is midnight UTC, so the
/// next tick makes tomorrow's meals into orders.
fn days(writer: &RegionWriter) -> (jiff::civil::Date, jiff::civil::Date) {
    let today = writer.calendar.date(writer.clock.now_ms());
    (today, today.tomorrow().expect("a tomorrow"))
}

fn has_order(
    writer: &RegionWriter,
    sub: &crate::subscriptions::Subscription,
    date: jiff::civil::Date,
) -> bool {
    let id = larder_shared::OrderId::new(sub.order_id(date)).expect("id");
    writer.ledgers[&fridge()].order(&id).is_some()
}

/// A subscription created, and a meal skipped, in the same group as the tick that passes their
/// cut-off count for it: the created subscription's meal becomes an order, the skipped one does
/// not (the tick used to read only what the store held before the group).
#[test]
fn a_tick_sees_the_subscriptions_and_skips_of_its_own_group() {
    let Scene {
        dir: _dir,
        path,
        region,
        hub,
    } = scene();
    let mut writer = writer(&region, RegionStore::open(&path).expect("store"), &hub);
    publish_lasagna(&mut writer);
    let (today, tomorrow) = days(&writer);
    let answers = group_with_tick(
        &mut writer,
        vec![
            super::SubscriptionOp::Create(Box::new(daily("kept", today))),
            super::SubscriptionOp::Create(Box::new(daily("skipped", today))),
            super::SubscriptionOp::Skip {
                id: "skipped".into(),
                date: tomorrow,
                customer: None,
            },
        ],
    );
    let statuses: Vec<u16> = answers.iter().map(super::Outcome::status).collect();
    assert_eq!(statuses, [201, 201, 200], "{answers:?}");
    assert!(
        has_order(&writer, &daily("kept", today), tomorrow),
        "the kept meal is an order"
    );
    assert!(
        !has_order(&writer, &daily("skipped", today), tomorrow),
        "the skipped meal is not"
    );
}

/// A tick whose commit fails made no orders, so the next tick makes them: the writer's mark of
/// the days already made is reloaded from the store with the ledgers.
#[test]
fn the_meals_of_a_tick_whose_commit_fails_are_made_by_the_next() {
    let Scene {
        dir: _dir,
        path,
        region,
        hub,
    } = scene();
    let mut writer = writer(&region, RegionStore::open(&path).expect("store"), &hub);
    publish_lasagna(&mut writer);
    let (today, tomorrow) = days(&writer);
    let (reply, answer) = oneshot::channel();
    writer.process(vec![RegionCommand::Subscription {
        op: super::SubscriptionOp::Create(Box::new(daily("s-1", today))),
        idem: None,
        reply,
    }]);
    answer.blocking_recv().expect("answered").expect("created");
    let admin = rusqlite::Connection::open(&path).expect("connection");
    admin
        .execute_batch(
            "CREATE TRIGGER no_room BEFORE INSERT ON meta
             WHEN NEW.key = 'subscriptions_generated_through'
             BEGIN SELECT RAISE(ABORT, 'no room'); END;",
        )
        .expect("trigger");
    writer.process(vec![RegionCommand::Tick]);
    assert!(
        !has_order(&writer, &daily("s-1", today), tomorrow),
        "not stored, forgotten"
    );
    admin
        .execute_batch("DROP TRIGGER no_room")
        .expect("room again");
    writer.process(vec![RegionCommand::Tick]);
    assert!(
        has_order(&writer, &daily("s-1", today), tomorrow),
        "made by the next tick"
    );
}

fn writer_on(region: &RegionId, path: &std::path::Path, hub: &SecretKey) -> RegionWriter {
    writer(region, RegionStore::open(path).expect("store"), hub)
}

/// An import batch sent with an Idempotency-Key is committed before the writer takes its next
/// group, so a retry right behind it (not waiting for its answer) gets the first answer, and
/// the key sent with other rows is refused.
#[test]
fn a_keyed_import_retried_at_once_gets_its_first_answer() {
    use super::import::{ImportReport, UnitRow};
    let Scene {
        dir: _dir,
        path,
        region,
        hub,
    } = scene();
    let store = RegionStore::open(&path).expect("store");
    let mut writer = writer(&region, store, &hub);
    let (reply, published) = oneshot::channel();
    writer.process(vec![RegionCommand::PutCatalog {
        currency: "EUR".into(),
        items: vec![larder_shared::catalog::CatalogItem {
            sku: larder_shared::Sku::new("lasagna").expect("sku"),
            name: "Lasagna".into(),
            price_minor: 890,
            allergens: Vec::new(),
            shelf_life_hours: 72,
        }],
        base: None,
        idem: None,
        reply,
    }]);
    assert_eq!(
        published
            .blocking_recv()
            .expect("answered")
            .map(|a| a.status()),
        Ok(201)
    );

    let mut import = |unit: &str, hash: &str| {
        let rows = vec![UnitRow {
            line: 2,
            unit_id: unit.into(),
            fridge_id: "fridge-1".into(),
            sku: "lasagna".into(),
            expires_at: "2099-01-01T00:00:00Z".into(),
            batch: None,
        }];
        let (reply, answer) = oneshot::channel();
        writer.process(vec![RegionCommand::ImportUnits {
            rows,
            idem: Some(larder_runtime::http::Idem {
                key: "import-1".into(),
                request_sha256: hash.into(),
            }),
            reply,
        }]);
        answer
    };
    let first = import("u-1", "rows-u-1");
    let retry = import("u-1", "rows-u-1");
    let other = import("u-2", "rows-u-2");
    let loaded = |report: &ImportReport| (report.accepted, report.unchanged);
    let first = first.blocking_recv().expect("answered").expect("loaded");
    assert_eq!(loaded(&first), (1, 0));
    let retry = retry.blocking_recv().expect("answered").expect("answered");
    assert_eq!(
        loaded(&retry),
        (1, 0),
        "the first answer, not a second load"
    );
    assert_eq!(
        other.blocking_recv().expect("answered").map(|r| loaded(&r)),
        Err(RegionError::IdempotencyKeyReused)
    );
    assert!(has_unit(&writer, "u-1"));
    assert!(!has_unit(&writer, "u-2"), "the other rows are not loaded");
}

/// An occurrence whose id another order holds, in any fridge of the region, is made under the
/// next free `{id}.{k}`, not skipped; one made before is not made again.
#[test]
fn an_occurrence_whose_id_is_held_elsewhere_takes_the_next_id() {
    use larder_shared::catalog::{Catalog, CatalogItem};
    use larder_shared::domain::{AppOrder, AppOrderLine, Channel};
    use larder_shared::ledger::{self, Ledger};
    use larder_shared::{FridgeId, OrderId, Sku};
    let catalog = Catalog {
        version: 1,
        currency: "EUR".into(),
        items: vec![CatalogItem {
            sku: Sku::new("lasagna").expect("sku"),
            name: "Lasagna".into(),
            price_minor: 890,
            allergens: vec![],
            shelf_life_hours: 48,
        }],
    };
    let hub = ledger::actor_for(&ledger::hub_device());
    let (f1, f2) = (
        FridgeId::new("fridge-1").expect("id"),
        FridgeId::new("fridge-2").expect("id"),
    );
    let mut ledgers: std::collections::BTreeMap<FridgeId, Ledger> = [&f1, &f2]
        .into_iter()
        .map(|f| {
            (
                f.clone(),
                Ledger::new(f.clone(), hub.clone()).expect("ledger"),
            )
        })
        .collect();
    let date: jiff::civil::Date = "2030-01-02".parse().expect("date");
    let occurrence = |sub: &str| AppOrder {
        order_id: OrderId::new("sub-a-2030-01-02").expect("id"),
        customer_id: "c".into(),
        channel: Channel::Subscription,
        lines: vec![AppOrderLine {
            sku: Sku::new("lasagna").expect("sku"),
            quantity: 1,
        }],
        subscription_id: Some(sub.into()),
    };
    // Another subscription's order holds the id in fridge-2 (as a collision from before).
    ledgers
        .get_mut(&f2)
        .expect("fridge-2")
        .schedule_order(&occurrence("sub-other"), "2030-01-02", &catalog, 1)
        .expect("held");
    let made = super::subscriptions::schedule_occurrence(
        &mut ledgers,
        &f1,
        occurrence("sub-a"),
        &date,
        &catalog,
        2,
    )
    .expect("scheduled")
    .expect("a change");
    assert!(!made.changes.is_empty());
    let next = OrderId::new("sub-a-2030-01-02.1").expect("id");
    assert!(ledgers[&f1].has_order(&next), "made under the next id");
    assert!(!ledgers[&f1].has_order(&OrderId::new("sub-a-2030-01-02").expect("id")));
    // Asked again: the id is held elsewhere, the next is this subscription's own: nothing new.
    let again = super::subscriptions::schedule_occurrence(
        &mut ledgers,
        &f1,
        occurrence("sub-a"),
        &date,
        &catalog,
        3,
    )
    .expect("scheduled");
    assert!(again.is_none(), "made once");
}

/// A request whose Idempotency-Key the store cannot look up is refused (503, nothing done),
/// not taken as new: it may be the retry of one already done. Once the store reads again, the
/// request is done once and its retry gets the first answer.
#[test]
fn a_key_the_store_cannot_look_up_refuses_the_request() {
    let Scene {
        dir: _dir,
        path,
        region,
        hub,
    } = scene();
    let mut writer = writer(&region, RegionStore::open(&path).expect("store"), &hub);
    publish_lasagna(&mut writer);
    let (today, _) = days(&writer);
    let create = |writer: &mut RegionWriter| {
        let (reply, answer) = oneshot::channel();
        writer.process(vec![RegionCommand::Subscription {
            op: super::SubscriptionOp::Create(Box::new(daily("s-1", today))),
            idem: Some(larder_runtime::http::Idem {
                key: "create-s-1".into(),
                request_sha256: "request-s-1".into(),
            }),
            reply,
        }]);
        answer.blocking_recv().expect("answered")
    };
    let admin = rusqlite::Connection::open(&path).expect("connection");
    admin
        .execute_batch("ALTER TABLE idempotency RENAME COLUMN response TO unreadable")
        .expect("break the lookup");
    let refused = create(&mut writer);
    assert!(
        matches!(refused, Err(RegionError::Storage(_))),
        "{refused:?}"
    );
    let stored = |writer: &RegionWriter| writer.store.subscriptions().expect("read").len();
    assert_eq!(stored(&writer), 0, "nothing done");
    admin
        .execute_batch("ALTER TABLE idempotency RENAME COLUMN unreadable TO response")
        .expect("mend the lookup");
    let first = create(&mut writer).expect("created");
    let retry = create(&mut writer).expect("replayed");
    assert_eq!(first.status(), 201);
    assert!(
        matches!(&retry, Outcome::Replayed { status: 201, body } if *body == first.body()),
        "{retry:?}"
    );
    assert_eq!(stored(&writer), 1, "done once");
}
