//! Every kind of conflict (`ConflictKind`), end to end: each conflict becomes exactly one
//! record, visible on the hub and on every agent, resolvable at the hub, and nothing is
//! resolved by dropping a record.

use std::time::Duration;

use larder_demo::REGION;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

struct Scene {
    offset: std::sync::Arc<std::sync::atomic::AtomicI64>,
    hub: larder_hub::HubHandle,
    hub_http: String,
    fridge: larder_agent::AgentHandle,
    pos: larder_agent::AgentHandle,
    fridge_url: String,
    pos_url: String,
    _dir: tempfile::TempDir,
}

async fn scene() -> anyhow::Result<Scene> {
    let dir = tempfile::tempdir()?;
    let offset = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let hub = start_hub_with_clock(
        &dir.path().join("hub"),
        1,
        |c| {
            c.orders.tick_interval_ms = 20;
        },
        larder_runtime::Clock::offset(offset.clone()),
    )
    .await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    let pos_url = format!("http://{}", pos.http_addr);
    synced(&fridge_url, WAIT).await?;
    synced(&pos_url, WAIT).await?;
    Ok(Scene {
        offset,
        hub,
        hub_http,
        fridge,
        pos,
        fridge_url,
        pos_url,
        _dir: dir,
    })
}

impl Scene {
    async fn hub_conflicts(&self, status: &str) -> Vec<Value> {
        get(&format!(
            "{}/v1/regions/{REGION}/conflicts?status={status}",
            self.hub_http
        ))
        .await
        .ok()
        .and_then(|v| v["conflicts"].as_array().cloned())
        .unwrap_or_default()
    }

    async fn agent_conflicts(url: &str) -> Vec<Value> {
        let v: Option<Value> = async {
            http()
                .get(format!("{url}/v1/conflicts"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()
        }
        .await;
        v.and_then(|v| v["conflicts"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until the hub has recorded exactly the conflict kinds `kinds` (once each) and both
    /// agents list the same records as recorded.
    async fn recorded(&self, kinds: &[&str]) -> anyhow::Result<Vec<Value>> {
        let mut want: Vec<&str> = kinds.to_vec();
        want.sort();
        eventually(
            WAIT,
            &format!("conflicts {kinds:?} recorded everywhere"),
            || async {
                let hub = self.hub_conflicts("all").await;
                let mut got: Vec<&str> = hub.iter().filter_map(|c| c["kind"].as_str()).collect();
                got.sort();
                if got != want {
                    return None;
                }
                let mut ids: Vec<&str> = hub
                    .iter()
                    .filter_map(|c| c["conflict_id"].as_str())
                    .collect();
                ids.sort();
                for url in [&self.fridge_url, &self.pos_url] {
                    let list = Self::agent_conflicts(url).await;
                    let open_hub: Vec<&Value> =
                        hub.iter().filter(|c| c["status"] == "open").collect();
                    if list.len() != open_hub.len() || list.iter().any(|c| c["recorded"] != true) {
                        return None;
                    }
                }
                Some(hub.clone())
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_sold_twice_offline_is_one_double_sale_resolved_by_refund() -> anyhow::Result<()> {
    let s = scene().await?;
    refill(&s.fridge_url, "fridge-1", "u", "salad-quinoa", 3).await?;
    eventually(WAIT, "the POS to see the refill", || async {
        (available(
            &agent_stock(&s.pos_url, "fridge-1").await.ok()?,
            "salad-quinoa",
        ) == 3)
            .then_some(())
    })
    .await?;
    cut_off(&s.fridge).await?;
    cut_off(&s.pos).await?;
    let client = http();
    let (a, _) = sell_unit(
        &client,
        &s.fridge_url,
        "fridge-1",
        "u-0",
        "salad-quinoa",
        "f-sale",
    )
    .await?;
    // Later, so the POS's order is the causally later one of the two.
    let (b, _) = sell_unit(
        &client,
        &s.pos_url,
        "fridge-1",
        "u-0",
        "salad-quinoa",
        "p-sale",
    )
    .await?;
    assert_eq!((a, b), (201, 201));
    // Offline, each agent sees only its own sale: no conflict yet.
    assert!(Scene::agent_conflicts(&s.pos_url).await.is_empty());
    s.fridge.set_network(true);
    s.pos.set_network(true);
    let conflicts = s.recorded(&["double_sale"]).await?;
    let c = &conflicts[0];
    assert_eq!(c["orders"].as_array().map(Vec::len), Some(2));
    assert_eq!(c["flagged_order"], c["orders"][1]);
    assert!(
        c["flagged_order"]
            .as_str()
            .is_some_and(|o| o.starts_with("pos-1"))
    );
    // Both orders are kept.
    let ids = hub_order_ids(&s.hub_http).await?;
    assert_eq!(ids.len(), 2);

    let id = c["conflict_id"].as_str().expect("id").to_owned();
    let url = format!("{}/v1/regions/{REGION}/conflicts/{id}/resolve", s.hub_http);
    let (status, body) = post(
        &url,
        "resolve-1",
        &json!({"action": "refund", "note": "refunded at the till"}),
    )
    .await?;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("resolved")),
        "{body}"
    );
    let (status, body) = post(&url, "resolve-2", &json!({"action": "dismiss"})).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("wrong_status"))
    );
    let (status, _) = post(
        &format!("{}/v1/regions/{REGION}/conflicts/nope/resolve", s.hub_http),
        "resolve-3",
        &json!({"action": "dismiss"}),
    )
    .await?;
    assert_eq!(status, 404);
    // The resolution replicates; the refund is in the flagged order's history.
    let flagged = c["flagged_order"].as_str().expect("flagged").to_owned();
    eventually(WAIT, "the resolution on both agents", || async {
        let open = Scene::agent_conflicts(&s.fridge_url).await.len()
            + Scene::agent_conflicts(&s.pos_url).await.len();
        let order: Value = http()
            .get(format!("{}/v1/orders/{flagged}", s.pos_url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let refunded = order["history"]
            .as_array()?
            .iter()
            .any(|e| e["status"] == "refunded");
        (open == 0 && refunded).then_some(())
    })
    .await?;
    assert_eq!(s.hub_conflicts("open").await.len(), 0);
    assert_eq!(s.hub_conflicts("resolved").await.len(), 1);
    drop(s.hub);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_by_count_beyond_the_stock_are_flagged_oversold() -> anyhow::Result<()> {
    let s = scene().await?;
    refill(&s.fridge_url, "fridge-1", "c", "curry-veg", 1).await?;
    eventually(WAIT, "the POS to see the refill", || async {
        (available(
            &agent_stock(&s.pos_url, "fridge-1").await.ok()?,
            "curry-veg",
        ) == 1)
            .then_some(())
    })
    .await?;
    cut_off(&s.fridge).await?;
    cut_off(&s.pos).await?;
    for (url, key) in [(&s.fridge_url, "f"), (&s.pos_url, "p")] {
        let resp = http()
            .post(format!("{url}/v1/sales"))
            .header("Idempotency-Key", key)
            .json(&json!({"fridge_id": "fridge-1", "lines": [{"sku": "curry-veg", "quantity": 1}],
                "payment": {"method": "cash", "amount_minor": price("curry-veg"), "currency": "EUR"}}))
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 201);
    }
    s.fridge.set_network(true);
    s.pos.set_network(true);
    let conflicts = s.recorded(&["oversold"]).await?;
    assert_eq!(conflicts[0]["sku"], "curry-veg");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_unit_sold_at_the_pos_moves_the_reservation_or_flags_it_lost()
-> anyhow::Result<()> {
    let s = scene().await?;
    refill(&s.fridge_url, "fridge-1", "r", "curry-veg", 2).await?;
    synced(&s.fridge_url, WAIT).await?;
    let (status, body) = post(
        &format!("{}/v1/regions/{REGION}/orders", s.hub_http),
        "place-1",
        &json!({"customer_id": "c-1", "fridge_id": "fridge-1", "order_id": "app-1",
            "lines": [{"sku": "curry-veg", "quantity": 1}]}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let first = body["reserved_units"][0].as_str().expect("unit").to_owned();
    let other = if first == "r-0" { "r-1" } else { "r-0" };
    eventually(WAIT, "the reservation on the POS", || async {
        let stock = agent_stock(&s.pos_url, "fridge-1").await.ok()?;
        stock["units"]
            .as_array()?
            .iter()
            .any(|u| u["unit_id"] == first && u["state"] == "reserved")
            .then_some(())
    })
    .await?;
    // A walk-up customer brings the reserved unit to the till: the sale stands.
    let client = http();
    let (status, _) =
        sell_unit(&client, &s.pos_url, "fridge-1", &first, "curry-veg", "w-1").await?;
    assert_eq!(status, 201);
    eventually(
        WAIT,
        "the reservation to move to the other unit",
        || async {
            let o = get(&format!("{}/v1/regions/{REGION}/orders/app-1", s.hub_http))
                .await
                .ok()?;
            (o["reserved_units"] == json!([other])).then_some(())
        },
    )
    .await?;
    // And once more, once the POS sees the move (a free unit would be the hub's escrow, not
    // for sale): nothing is left, so the reservation is lost.
    eventually(WAIT, "the moved reservation on the POS", || async {
        let stock = agent_stock(&s.pos_url, "fridge-1").await.ok()?;
        stock["units"]
            .as_array()?
            .iter()
            .any(|u| u["unit_id"] == other && u["state"] == "reserved")
            .then_some(())
    })
    .await?;
    let (status, _) = sell_unit(&client, &s.pos_url, "fridge-1", other, "curry-veg", "w-2").await?;
    assert_eq!(status, 201);
    let conflicts = s.recorded(&["reservation_lost"]).await?;
    assert_eq!(conflicts[0]["flagged_order"], "app-1");
    let order = get(&format!("{}/v1/regions/{REGION}/orders/app-1", s.hub_http)).await?;
    assert_eq!(order["conflicts"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_pickup_loses_and_is_recorded() -> anyhow::Result<()> {
    let s = scene().await?;
    refill(&s.fridge_url, "fridge-1", "k", "curry-veg", 2).await?;
    synced(&s.fridge_url, WAIT).await?;
    let (status, body) = post(
        &format!("{}/v1/regions/{REGION}/orders", s.hub_http),
        "place-1",
        &json!({"customer_id": "c-1", "fridge_id": "fridge-1", "order_id": "race-1",
            "lines": [{"sku": "curry-veg", "quantity": 1}]}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let unit = body["reserved_units"][0].as_str().expect("unit").to_owned();
    // Past the grace window the simulated provider captures the payment.
    s.offset
        .fetch_add(21_000, std::sync::atomic::Ordering::SeqCst);
    eventually(WAIT, "the fridge to see the payment", || async {
        let o: Value = http()
            .get(format!("{}/v1/orders/race-1", s.fridge_url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (o["status"] == "available_for_picking").then_some(())
    })
    .await?;
    cut_off(&s.fridge).await?;
    let resp = http()
        .post(format!("{}/v1/door-sessions", s.fridge_url))
        .header("Idempotency-Key", "door-1")
        .json(&json!({"fridge_id": "fridge-1", "session_id": "door-1", "units_taken": [unit], "order_id": "race-1"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 201);
    let (status, body) = post(
        &format!("{}/v1/regions/{REGION}/orders/race-1/cancel", s.hub_http),
        "cancel-1",
        &json!({}),
    )
    .await?;
    assert_eq!((status, &body["status"]), (200, &json!("refund_pending")));
    s.fridge.set_network(true);
    let conflicts = s.recorded(&["cancel_pickup_race"]).await?;
    assert_eq!(conflicts[0]["flagged_order"], "race-1");
    eventually(WAIT, "the pickup to win everywhere", || async {
        let hub = get(&format!("{}/v1/regions/{REGION}/orders/race-1", s.hub_http))
            .await
            .ok()?;
        let f: Value = http()
            .get(format!("{}/v1/orders/race-1", s.fridge_url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (hub["status"] == "picked_up" && f["status"] == "picked_up").then_some(())
    })
    .await?;
    Ok(())
}
