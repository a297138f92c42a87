//! App orders end to end, with the hub's clock moved instead of waiting: the grace window,
//! payments (captured, refused, unanswered), pickup at the fridge, no-shows, cancels, and the
//! reservation reaching the fridge and the POS. Real hub, real agents, MQTT over TCP, HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use larder_demo::REGION;
use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const SKU: &str = "salad-quinoa";
const WAIT: Duration = Duration::from_secs(20);

struct Scene {
    hub_http: String,
    fridge_url: String,
    pos_url: String,
    offset: Arc<AtomicI64>,
    _hub: larder_hub::HubHandle,
    _agents: Vec<larder_agent::AgentHandle>,
    _dir: tempfile::TempDir,
}

impl Scene {
    /// A hub whose clock the test moves, a fridge with 10 units and a POS, all synced.
    async fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let offset = Arc::new(AtomicI64::new(0));
        let hub = start_hub_with_clock(
            &dir.path().join("hub"),
            1,
            |c| {
                c.orders.tick_interval_ms = 20;
                c.orders.grace_window_seconds = 10;
                c.orders.payment_timeout_seconds = 30;
                c.orders.pickup_hold_hours = 1;
            },
            Clock::offset(offset.clone()),
        )
        .await?;
        let hub_http = format!("http://{}", hub.http_addr);
        let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
        let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
        let fridge_url = format!("http://{}", fridge.http_addr);
        let pos_url = format!("http://{}", pos.http_addr);
        synced(&fridge_url, WAIT).await?;
        synced(&pos_url, WAIT).await?;
        refill(&fridge_url, "fridge-1", "u", SKU, 10).await?;
        synced(&fridge_url, WAIT).await?;
        Ok(Self {
            hub_http,
            fridge_url,
            pos_url,
            offset,
            _hub: hub,
            _agents: vec![fridge, pos],
            _dir: dir,
        })
    }

    fn advance(&self, ms: i64) {
        self.offset.fetch_add(ms, Ordering::SeqCst);
    }

    async fn place(&self, id: &str, quantity: u32) -> anyhow::Result<(u16, Value)> {
        post(
            &format!("{}/v1/regions/{REGION}/orders", self.hub_http),
            &format!("place-{id}"),
            &json!({"customer_id": "cust-1", "fridge_id": "fridge-1", "order_id": id,
                "lines": [{"sku": SKU, "quantity": quantity}]}),
        )
        .await
    }

    async fn hub_status(&self, id: &str) -> Option<String> {
        let v = get(&format!(
            "{}/v1/regions/{REGION}/orders/{id}",
            self.hub_http
        ))
        .await
        .ok()?;
        v["status"].as_str().map(str::to_owned)
    }

    /// Waits until the hub and both agents show `status` for the order.
    async fn everywhere(&self, id: &str, status: &str) -> anyhow::Result<()> {
        eventually(WAIT, &format!("{id} to be {status} everywhere"), || async {
            let hub = self.hub_status(id).await?;
            let f = agent_order(&self.fridge_url, id).await?;
            let p = agent_order(&self.pos_url, id).await?;
            (hub == status && f["status"] == status && p["status"] == status).then_some(())
        })
        .await
    }

    async fn cancel(&self, id: &str) -> anyhow::Result<(u16, Value)> {
        post(
            &format!("{}/v1/regions/{REGION}/orders/{id}/cancel", self.hub_http),
            &format!("cancel-{id}"),
            &json!({}),
        )
        .await
    }
}

fn reserved(stock: &Value) -> u64 {
    stock["skus"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["sku"] == SKU))
        .and_then(|s| s["reserved"].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_orders_through_grace_payment_pickup_and_no_show() -> anyhow::Result<()> {
    let s = Scene::new().await?;
    let mut feed = EventFeed::open(&s.hub_http, REGION).await?;

    // Placed: the earliest-expiring unit is reserved, on every replica.
    let (status, body) = s.place("a-1", 2).await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "reserved");
    assert_eq!(body["reserved_units"].as_array().map(Vec::len), Some(2));
    eventually(WAIT, "the reservation on the POS", || async {
        (reserved(&agent_stock(&s.pos_url, "fridge-1").await.ok()?) == 2).then_some(())
    })
    .await?;
    // A retry returns the first answer; the same key with another body is refused.
    let again = s.place("a-1", 2).await?;
    assert_eq!(again, (status, body.clone()));
    let (status, body) = post(
        &format!("{}/v1/regions/{REGION}/orders", s.hub_http),
        "place-a-1",
        &json!({"customer_id": "cust-2", "fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}]}),
    )
    .await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("idempotency_key_reused"))
    );
    // More than the fridge holds.
    let (status, body) = s.place("too-many", 50).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("insufficient_stock"))
    );

    // Cancelled within the grace window: free, and the units come back.
    let (status, body) = s.cancel("a-1").await?;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("cancelled")),
        "{body}"
    );
    s.everywhere("a-1", "cancelled").await?;
    eventually(WAIT, "the units released on the fridge", || async {
        (reserved(&agent_stock(&s.fridge_url, "fridge-1").await.ok()?) == 0).then_some(())
    })
    .await?;

    // Refused, unanswered and captured payments, once the grace window is over.
    for id in ["b-refuse", "c-noanswer", "d-1", "e-1", "f-1"] {
        assert_eq!(s.place(id, 1).await?.0, 201);
    }
    let (status, body) = s.cancel("c-noanswer").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.place("g-noanswer", 1).await?.0, 201);
    s.advance(11_000);
    s.everywhere("b-refuse", "payment_refused").await?;
    // The region's live feed shows the refusal (and, below, the timeout).
    feed.until(WAIT, "order", |e| {
        e["order_id"] == "b-refuse" && e["status"] == "payment_refused"
    })
    .await?;
    for id in ["d-1", "e-1", "f-1"] {
        s.everywhere(id, "available_for_picking").await?;
    }
    // Past the grace window, before capture: refused and recorded.
    let (status, body) = s.cancel("g-noanswer").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("past_grace_window"))
    );
    s.advance(31_000);
    s.everywhere("g-noanswer", "payment_timeout").await?;
    feed.until(WAIT, "order", |e| {
        e["order_id"] == "g-noanswer" && e["status"] == "payment_timeout"
    })
    .await?;
    // The first order's placing was on the feed too.
    feed.until(WAIT, "order", |e| {
        e["order_id"] == "a-1" && e["status"] == "reserved"
    })
    .await?;
    let g = agent_order(&s.fridge_url, "g-noanswer")
        .await
        .expect("order");
    let history: Vec<&str> = g["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|e| e["status"].as_str())
        .collect();
    assert_eq!(history, ["reserved", "cancel_rejected", "payment_timeout"]);

    // Picked up at the fridge: the unit taken is matched to the reservation.
    let d: Value = get(&format!("{}/v1/regions/{REGION}/orders/d-1", s.hub_http)).await?;
    let unit = d["reserved_units"][0]
        .as_str()
        .expect("a reserved unit")
        .to_owned();
    let resp = http()
        .post(format!("{}/v1/door-sessions", s.fridge_url))
        .header("Idempotency-Key", "door-d")
        .json(&json!({"fridge_id": "fridge-1", "session_id": "door-d", "units_taken": [unit], "order_id": "d-1"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 201);
    let door: Value = resp.json().await?;
    assert_eq!(door["units_taken"][0]["matched"], "reservation");
    s.everywhere("d-1", "picked_up").await?;
    // A cancel after the pickup is refused.
    let (status, body) = s.cancel("d-1").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("already_picked_up"))
    );

    // Cancelled after capture, before pickup: a refund is due.
    let (status, body) = s.cancel("f-1").await?;
    assert_eq!((status, &body["status"]), (200, &json!("refund_pending")));

    // Not picked up within the hold: released.
    s.advance(3_600_000);
    s.everywhere("e-1", "expired_no_show").await?;
    eventually(WAIT, "nothing reserved any more", || async {
        (reserved(&agent_stock(&s.pos_url, "fridge-1").await.ok()?) == 0).then_some(())
    })
    .await?;
    let listed: Value = get(&format!(
        "{}/v1/regions/{REGION}/orders?status=expired_no_show",
        s.hub_http
    ))
    .await?;
    assert_eq!(listed["orders"].as_array().map(Vec::len), Some(1));
    Ok(())
}

/// Devices number their own orders `{device}-{n}`. The hub refuses an app order whose chosen
/// id is in an enrolled device's namespace, since that device would one day be refused its own
/// sale (`order_exists`) for good; and it refuses to enroll a device whose namespace an order
/// already uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_orders_keep_out_of_the_ids_devices_give_their_sales() -> anyhow::Result<()> {
    let scene = Scene::new().await?;
    for id in ["pos-1-1", "pos-1-99", "fridge-1-7", "fridge-1-x.y"] {
        let (status, body) = scene.place(id, 1).await?;
        assert_eq!(status, 422, "{id}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{id}: {body}");
        assert!(scene.hub_status(id).await.is_none(), "{id} was placed");
    }
    let (status, body) = scene.place("pos-12-1", 1).await?;
    assert_eq!(status, 201, "no device pos-12: {body}");

    // Placed before pos-2 is enrolled: ids pos-2 would give its first sales. pos-2 cannot then
    // be enrolled under that id (it would number around them: the agent's `own_order_id`).
    let (status, body) = scene.place("pos-2-1", 1).await?;
    assert_eq!(status, 201, "{body}");
    let key = larder_demo::seeded_key(7, "pos-2");
    let refused = enroll(
        &scene.hub_http,
        "pos-2",
        Role::Pos,
        &["fridge-1"],
        &key.public(),
    )
    .await
    .expect_err("pos-2's namespace holds an order");
    let refused = refused.to_string();
    assert!(
        refused.contains("422") && refused.contains("pos-2-1"),
        "{refused}"
    );
    enroll(
        &scene.hub_http,
        "pos-3",
        Role::Pos,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    // Nor under an id too long for `{device}-{n}` to be an order id.
    let long = "p".repeat(larder_shared::ids::DEVICE_ID_LEN_MAX + 1);
    let refused = enroll(
        &scene.hub_http,
        &long,
        Role::Pos,
        &["fridge-1"],
        &key.public(),
    )
    .await
    .expect_err("too long")
    .to_string();
    assert!(
        refused.contains("422") && refused.contains("43 bytes"),
        "{refused}"
    );

    // A device sells under its own ids, and they reach the hub.
    let (status, body) = post(
        &format!("{}/v1/sales", scene.pos_url),
        "pos-1-sale",
        &json!({"fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}],
            "payment": {"method": "cash", "amount_minor": price(SKU), "currency": "EUR"}}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let id = body["order_id"].as_str().unwrap_or_default().to_owned();
    assert!(id.starts_with("pos-1-"), "{id}");
    scene.everywhere(&id, "completed").await?;
    Ok(())
}
