//! Subscriptions end to end, with the hub's clock moved: an occurrence cancelled before the
//! cut-off is free; at the cut-off the next day's occurrences become orders; after it a cancel
//! is refused; the order moves through dispatched, placed in the fridge (a refill tagged with
//! it), available for picking and picked up. The prepare report and the refill plan count it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use larder_demo::REGION;
use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occurrences_become_orders_at_the_cut_off_and_reach_the_fridge() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The hub's clock starts at 19:00 UTC today (the region's cut-off is 20:00 UTC).
    let now = jiff::Timestamp::now();
    let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let seven_pm = today
        .at(19, 0, 0, 0)
        .to_zoned(jiff::tz::TimeZone::UTC)?
        .timestamp();
    let offset = Arc::new(AtomicI64::new(
        seven_pm.as_millisecond() - now.as_millisecond(),
    ));
    let hub = start_hub_with_clock(
        &dir.path().join("hub"),
        1,
        |c| c.orders.tick_interval_ms = 20,
        Clock::offset(offset.clone()),
    )
    .await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let url = format!("http://{}", fridge.http_addr);
    synced(&url, WAIT).await?;
    let tomorrow = today.tomorrow()?.to_string();

    let subs = format!("{hub_http}/v1/regions/{REGION}/subscriptions");
    let mut ids = Vec::new();
    for (key, sku) in [("s-a", "salad-quinoa"), ("s-b", "curry-veg")] {
        let (status, body) = post(
            &subs,
            key,
            &json!({"customer_id": key, "fridge_id": "fridge-1", "lines": [{"sku": sku, "quantity": 2}],
                "weekdays": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start_date": today.to_string()}),
        )
        .await?;
        assert_eq!(status, 201, "{body}");
        ids.push(body["subscription_id"].as_str().expect("id").to_owned());
    }
    let list = get(&subs).await?;
    assert_eq!(list["subscriptions"].as_array().map(Vec::len), Some(2));
    let delete = |id: &str, date: &str| {
        http()
            .delete(format!("{subs}/{id}?date={date}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    // Before the cut-off: cancelling tomorrow's curry is free.
    let resp = delete(&ids[1], &tomorrow).await?;
    assert_eq!(resp.status().as_u16(), 200);

    let report = get(&format!(
        "{hub_http}/v1/regions/{REGION}/prepare-report?date={tomorrow}"
    ))
    .await?;
    let salad = report["skus"]
        .as_array()
        .expect("skus")
        .iter()
        .find(|s| s["sku"] == "salad-quinoa")
        .cloned()
        .expect("salad");
    assert_eq!(salad["subscriptions"], 2, "{report}");
    let curry = report["skus"]
        .as_array()
        .expect("skus")
        .iter()
        .find(|s| s["sku"] == "curry-veg")
        .cloned()
        .expect("curry");
    assert_eq!(
        curry["subscriptions"], 0,
        "the cancelled occurrence is not cooked"
    );

    // The cut-off passes: tomorrow's salads become an order, the curries do not.
    offset.fetch_add(3_600_000 + 60_000, Ordering::SeqCst);
    let order_id = format!("{}-{tomorrow}", ids[0]);
    let order_url = format!("{hub_http}/v1/regions/{REGION}/orders/{order_id}");
    eventually(WAIT, "the occurrence to become an order", || async {
        (get(&order_url).await.ok()?["status"] == "scheduled").then_some(())
    })
    .await?;
    let curry = get(&format!(
        "{hub_http}/v1/regions/{REGION}/orders/{}-{tomorrow}",
        ids[1]
    ))
    .await?;
    assert_eq!(curry["error"]["code"], "unknown_order");
    // After the cut-off: no free cancel, either way.
    let resp = delete(&ids[0], &tomorrow).await?;
    assert_eq!(resp.status().as_u16(), 409);
    let (status, body) = post(&format!("{order_url}/cancel"), "c-1", &json!({})).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("past_cutoff"))
    );

    // The kitchen dispatches; the courier's refill places the meals for the order.
    let (status, body) = post(&format!("{order_url}/dispatch"), "d-1", &json!({})).await?;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("dispatched")),
        "{body}"
    );
    let (status, _) = post(&format!("{order_url}/dispatch"), "d-2", &json!({})).await?;
    assert_eq!(status, 409);
    eventually(WAIT, "the fridge to see the order", || async {
        let o = agent_order(&url, &order_id).await?;
        (o["status"] == "dispatched").then_some(())
    })
    .await?;
    // The fridge refuses a cancel by the same rule, with the hub's code.
    let (status, body) = post(
        &format!("{url}/v1/orders/{order_id}/cancel"),
        "c-2",
        &json!({}),
    )
    .await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("past_cutoff"))
    );
    let expires = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(72)).to_string();
    let resp = http()
        .post(format!("{url}/v1/refills"))
        .header("Idempotency-Key", "tagged")
        .json(
            &json!({"fridge_id": "fridge-1", "order_id": order_id, "units": [
            {"unit_id": "m-1", "sku": "salad-quinoa", "expires_at": expires},
            {"unit_id": "m-2", "sku": "salad-quinoa", "expires_at": expires}]}),
        )
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 201);
    eventually(WAIT, "the order to be ready at the hub", || async {
        let o = get(&order_url).await.ok()?;
        (o["status"] == "available_for_picking" && o["reserved_units"].as_array()?.len() == 2)
            .then_some(())
    })
    .await?;
    // Tagged units are the subscriber's, not walk-up stock.
    let stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(available(&stock, "salad-quinoa"), 0);
    let plan = get(&format!(
        "{hub_http}/v1/regions/{REGION}/refill-plan?date={tomorrow}"
    ))
    .await?;
    let row = plan["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["fridge_id"] == "fridge-1" && r["sku"] == "salad-quinoa")
        .cloned()
        .expect("row");
    assert_eq!(
        (
            row["reserved"].clone(),
            row["scheduled"].clone(),
            row["par"].clone()
        ),
        (json!(2), json!(2), json!(4))
    );
    assert_eq!(row["to_deliver"], 4 + 2, "{row}");

    let door_resp = http()
        .post(format!("{url}/v1/door-sessions"))
        .header("Idempotency-Key", "door")
        .json(&json!({"fridge_id": "fridge-1", "session_id": "door", "units_taken": ["m-1", "m-2"], "order_id": order_id}))
        .send()
        .await?;
    assert_eq!(door_resp.status().as_u16(), 201);
    let door: Value = door_resp.json().await?;
    assert_eq!(door["units_taken"][1]["matched"], "reservation");
    eventually(WAIT, "the pickup at the hub", || async {
        let o = get(&order_url).await.ok()?;
        // Ordered by each writer's clock, and the hub's was moved: compare as a set.
        let mut history: Vec<&str> = o["history"]
            .as_array()?
            .iter()
            .filter_map(|e| e["status"].as_str())
            .collect();
        history.sort_unstable();
        let expected = [
            "available_for_picking",
            // Refused at the hub and then at the fridge: recorded once per reason.
            "cancel_rejected",
            "dispatched",
            "picked_up",
            "placed_in_fridge",
            "scheduled",
        ];
        (o["status"] == "picked_up" && history == expected).then_some(())
    })
    .await?;
    // Ending a subscription is an answer, not an error.
    let resp = http()
        .delete(format!("{subs}/{}", ids[0]))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    Ok(())
}
