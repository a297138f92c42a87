//! Offline-safe promises: while online a fridge grants the hub an escrow allowance; with the
//! fridge offline, the hub confirms app orders only within it, and the fridge's walk-up sales
//! leave it alone. After the fridge returns, every confirmed order holds a unit and nothing
//! is in conflict. Also: the offline card budget at a POS, its captures once online, and
//! expiry applied offline.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use larder_demo::REGION;
use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const SKU: &str = "salad-quinoa";

async fn fridge_online(hub_http: &str) -> Option<bool> {
    let v = get(&format!("{hub_http}/v1/regions/{REGION}/fridges"))
        .await
        .ok()?;
    v["fridges"][0]["online"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_promises_an_offline_fridge_only_its_escrow() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;
    refill(&fridge_url, "fridge-1", "u", SKU, 8).await?;
    // Online, the fridge grants a quarter of its 8 units.
    eventually(WAIT, "the grant at the hub", || async {
        let stock = hub_stock(&hub_http, "fridge-1").await.ok()?;
        (stock["escrow"][SKU] == 2).then_some(())
    })
    .await?;

    cut_off(&fridge).await?;
    eventually(WAIT, "the hub to see the fridge offline", || async {
        (!fridge_online(&hub_http).await?).then_some(())
    })
    .await?;
    let place = |id: &'static str| {
        let url = format!("{hub_http}/v1/regions/{REGION}/orders");
        async move {
            post(
                &url,
                id,
                &json!({"customer_id": "c", "fridge_id": "fridge-1", "order_id": id,
                    "lines": [{"sku": SKU, "quantity": 1}]}),
            )
            .await
        }
    };
    let (a, body) = place("esc-1").await?;
    assert_eq!(a, 201, "{body}");
    assert_eq!(body["escrow"], true);
    assert_eq!(place("esc-2").await?.0, 201);
    let (c, body) = place("esc-3").await?;
    assert_eq!(
        (c, &body["error"]["code"]),
        (409, &json!("insufficient_stock")),
        "beyond the escrow"
    );

    // The offline fridge sells by count: six go, the last two are the hub's.
    let client = http();
    for i in 0..7 {
        let resp = client
            .post(format!("{fridge_url}/v1/sales"))
            .header("Idempotency-Key", format!("walk-{i}"))
            .json(&json!({"fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}],
                "payment": {"method": "fridge_card", "amount_minor": price(SKU), "currency": "EUR"}}))
            .send()
            .await?;
        let expected = if i < 6 { 201 } else { 409 };
        assert_eq!(resp.status().as_u16(), expected, "walk-up sale {i}");
    }

    fridge.set_network(true);
    synced(&fridge_url, WAIT).await?;
    eventually(WAIT, "both promises kept on the fridge", || async {
        let stock = agent_stock(&fridge_url, "fridge-1").await.ok()?;
        let held: Vec<&Value> = stock["units"]
            .as_array()?
            .iter()
            .filter(|u| u["state"] == "reserved")
            .collect();
        (held.len() == 2 && available(&stock, SKU) == 0).then_some(())
    })
    .await?;
    for id in ["esc-1", "esc-2"] {
        let o = get(&format!("{hub_http}/v1/regions/{REGION}/orders/{id}")).await?;
        assert_eq!(o["reserved_units"].as_array().map(Vec::len), Some(1), "{o}");
    }
    let conflicts = get(&format!(
        "{hub_http}/v1/regions/{REGION}/conflicts?status=all"
    ))
    .await?;
    assert_eq!(conflicts["conflicts"], json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_usable_only_once_every_pos_of_the_fridge_has_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    let pos_url = format!("http://{}", pos.http_addr);
    synced(&fridge_url, WAIT).await?;
    synced(&pos_url, WAIT).await?;
    // The POS is cut off before the fridge's stock (and its grant) exists.
    cut_off(&pos).await?;
    refill(&fridge_url, "fridge-1", "u", SKU, 8).await?;
    eventually(WAIT, "the grant at the hub", || async {
        (hub_stock(&hub_http, "fridge-1").await.ok()?["escrow"][SKU] == 2).then_some(())
    })
    .await?;
    cut_off(&fridge).await?;
    eventually(WAIT, "the hub to see the fridge offline", || async {
        (!fridge_online(&hub_http).await?).then_some(())
    })
    .await?;
    let url = format!("{hub_http}/v1/regions/{REGION}/orders");
    let order = |id: &str| json!({"customer_id": "c", "fridge_id": "fridge-1", "order_id": id, "lines": [{"sku": SKU, "quantity": 1}]});
    // The offline POS could sell every unit it knows of: the grant is not usable yet.
    let (status, body) = post(&url, "o-1", &order("o-1")).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("insufficient_stock")),
        "{body}"
    );
    pos.set_network(true);
    eventually(
        WAIT,
        "the POS to have the grant and the hub to use it",
        || async {
            let (status, _) = post(&url, "o-2", &order("o-2")).await.ok()?;
            (status == 201).then_some(())
        },
    )
    .await?;
    Ok(())
}

/// Sells one unit of [`SKU`] at fridge-1 through the agent at `url`, paid by `method`; the
/// answer's status and body.
async fn sell_one(
    client: &reqwest::Client,
    url: &str,
    method: &str,
    key: String,
) -> anyhow::Result<(u16, Value)> {
    let resp = client
        .post(format!("{url}/v1/sales"))
        .header("Idempotency-Key", key)
        .json(
            &json!({"fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}],
            "payment": {"method": method, "amount_minor": price(SKU), "currency": "EUR"}}),
        )
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json::<Value>().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_card_payments_are_capped_and_captured_once_online() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    // Two POS: one whose card payments the provider later refuses, one whose it captures.
    let mut tills = Vec::new();
    for (name, refuse) in [("pos-refused", 1000), ("pos-ok", 0)] {
        let pos = start_agent_with(
            dir.path(),
            &hub,
            name,
            Role::Pos,
            &["fridge-1"],
            |c| {
                c.orders.offline_card_payments_max = 2;
                c.orders.capture_interval_ms = 20;
                c.orders.simulated_payments.refuse_per_mille = refuse;
            },
            Clock::system(),
        )
        .await?;
        tills.push(pos);
    }
    synced(&fridge_url, WAIT).await?;
    refill(&fridge_url, "fridge-1", "u", SKU, 10).await?;
    let urls: Vec<String> = tills
        .iter()
        .map(|p| format!("http://{}", p.http_addr))
        .collect();
    for url in &urls {
        eventually(WAIT, "the POS to see the refill", || async {
            (agent_stock(url, "fridge-1").await.ok()?["units"]
                .as_array()?
                .len()
                == 10)
                .then_some(())
        })
        .await?;
    }
    for pos in &tills {
        cut_off(pos).await?;
    }
    let client = http();
    let mut card_orders = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        for i in 0..2 {
            let (status, body) = sell_one(&client, url, "card", format!("card-{n}-{i}")).await?;
            assert_eq!(status, 201, "{body}");
            card_orders.push((
                url.clone(),
                body["order_id"].as_str().expect("id").to_owned(),
            ));
        }
        let (status, body) = sell_one(&client, url, "card", format!("card-{n}-over")).await?;
        assert_eq!(
            (status, &body["error"]["code"]),
            (409, &json!("offline_limit_reached"))
        );
        let (status, _) = sell_one(&client, url, "cash", format!("cash-{n}")).await?;
        assert_eq!(status, 201, "cash still works");
    }
    for pos in &tills {
        pos.set_network(true);
    }
    for (url, order) in &card_orders {
        let expected = if url == &urls[0] {
            "payment_failed_after_sale"
        } else {
            "payment_captured"
        };
        eventually(WAIT, &format!("{order} to be {expected}"), || async {
            let o = agent_order(url, order).await?;
            o["history"]
                .as_array()?
                .iter()
                .any(|e| e["status"] == expected)
                .then_some(())
        })
        .await?;
    }
    // Settled: the budget is free again.
    cut_off(&tills[1]).await?;
    let (status, _) = sell_one(&client, &urls[1], "card", "card-again".into()).await?;
    assert_eq!(status, 201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_past_expiry_leave_sellable_stock_offline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let offset = Arc::new(AtomicI64::new(0));
    let pos = start_agent_with(
        dir.path(),
        &hub,
        "pos-1",
        Role::Pos,
        &["fridge-1"],
        |_| {},
        Clock::offset(offset.clone()),
    )
    .await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(2);
    let resp = http()
        .post(format!("{url}/v1/refills"))
        .header("Idempotency-Key", "refill")
        .json(&json!({"fridge_id": "fridge-1", "units": [
            {"unit_id": "x-0", "sku": SKU, "expires_at": soon.to_string()},
            {"unit_id": "x-1", "sku": SKU, "expires_at": soon.to_string()}]}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 201);
    cut_off(&pos).await?;
    let stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(available(&stock, SKU), 2);
    assert_eq!(stock["skus"][0]["expiring_24h"], 2);
    offset.store(3 * 3_600_000, Ordering::SeqCst);
    let stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(available(&stock, SKU), 0);
    assert!(
        stock["units"]
            .as_array()
            .expect("units")
            .iter()
            .all(|u| u["state"] == "expired")
    );
    let client = http();
    let (status, body) = sell_unit(&client, &url, "fridge-1", "x-0", SKU, "s-1").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("unit_not_available"))
    );
    let resp = client
        .post(format!("{url}/v1/sales"))
        .header("Idempotency-Key", "s-2")
        .json(
            &json!({"fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}],
            "payment": {"method": "cash", "amount_minor": price(SKU), "currency": "EUR"}}),
        )
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 409);
    Ok(())
}

/// A card payment taken offline may wait `payments.offline_hours_max` for its capture: past it
/// the device takes no more card payments offline (cash still works) until it has captured
/// it; the limit and the oldest payment's age are in its health and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_card_payments_have_an_age_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let offset = Arc::new(AtomicI64::new(0));
    let pos = start_agent_with(
        dir.path(),
        &hub,
        "pos-1",
        Role::Pos,
        &["fridge-1"],
        |c| {
            c.payments.offline_hours_max = 24;
            c.orders.capture_interval_ms = 20;
        },
        Clock::offset(offset.clone()),
    )
    .await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "u", SKU, 5).await?;
    let health = health(&url).await?;
    assert_eq!(
        health["offline_payments"],
        json!({"hours_max": 24, "oldest_age_seconds": null})
    );
    cut_off(&pos).await?;
    let client = http();
    let (status, first) = sell_one(&client, &url, "card", "card-1".into()).await?;
    assert_eq!(status, 201, "{first}");

    // 23 hours on, still within the limit; 25 hours on, past it.
    offset.store(23 * 3_600_000, Ordering::SeqCst);
    assert_eq!(
        sell_one(&client, &url, "card", "card-2".into()).await?.0,
        201
    );
    offset.store(25 * 3_600_000, Ordering::SeqCst);
    let (status, body) = sell_one(&client, &url, "card", "card-3".into()).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("offline_payment_too_old")),
        "{body}"
    );
    assert_eq!(
        sell_one(&client, &url, "cash", "cash-1".into()).await?.0,
        201,
        "cash still works"
    );
    let health = larder_tests::health(&url).await?;
    let age = health["offline_payments"]["oldest_age_seconds"]
        .as_i64()
        .unwrap_or(0);
    assert!((25 * 3600..26 * 3600).contains(&age), "{health}");
    let metrics = metrics_text(&url).await?;
    assert!(
        metrics.contains("larder_agent_offline_payment_hours_max 24"),
        "{metrics}"
    );
    let taken = jiff::Timestamp::now().as_second();
    let oldest: i64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("larder_agent_offline_payment_oldest_taken_timestamp_seconds ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // The first payment's time: the test's start, give or take the test's own run.
    assert!(
        (taken - 120..=taken).contains(&oldest),
        "{oldest} vs {taken}"
    );

    // Online again, the payments are captured, and card sales are taken again.
    pos.set_network(true);
    eventually(WAIT, "the offline payments captured", || async {
        let h = larder_tests::health(&url).await.ok()?;
        h["offline_payments"]["oldest_age_seconds"]
            .is_null()
            .then_some(())
    })
    .await?;
    let order = agent_order(&url, first["order_id"].as_str().unwrap_or_default()).await;
    let history = order.map(|o| o["history"].to_string()).unwrap_or_default();
    assert!(history.contains("payment_captured"), "{history}");
    cut_off(&pos).await?;
    assert_eq!(
        sell_one(&client, &url, "card", "card-4".into()).await?.0,
        201
    );
    // The clock set back a day behind that payment: how long it has waited is unknown, so no
    // more card payments offline.
    offset.store(0, Ordering::SeqCst);
    let (status, body) = sell_one(&client, &url, "card", "card-5".into()).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("offline_payment_too_old")),
        "{body}"
    );
    Ok(())
}

/// `larder-agent status` reads a running agent's health over its local HTTP API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_a_running_agents_health() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;
    let exe = env!("CARGO_BIN_EXE_agent-node");
    let (ok, out) = run_to_end(exe, &["status", "--url", &url]).await?;
    assert!(ok, "{out}");
    assert!(
        out.contains("device           pos-1 (pos, region demo)"),
        "{out}"
    );
    assert!(out.contains("online           true"), "{out}");
    assert!(
        out.contains("offline cards    none waiting for capture"),
        "{out}"
    );
    // Nothing listens there: a clear error and exit code 1.
    let gone = format!("http://127.0.0.1:{}", larder_hub::mqtt::free_port()?);
    let (ok, out) = run_to_end(exe, &["status", "--url", &gone]).await?;
    assert!(!ok && out.contains("cannot reach the agent"), "{out}");
    Ok(())
}
