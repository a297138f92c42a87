//! The catalog end to end: a version published through the hub's API reaches every agent
//! (one offline during the change catches up when it reconnects), and each sale is priced from
//! the version its device holds and records it. A POS that sold offline from the older version
//! keeps its price, and the hub records one `price_changed` conflict naming both versions.
//! Ratings, the versions and ratings surviving a hub restart, and the region's live event feed
//! (Server-Sent Events) showing all of it. Real hub, real agents, MQTT over TCP, HTTP.

use std::time::Duration;

use larder_demo::{REGION, demo_catalog};
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const SKU: &str = "lasagna";

async fn put_catalog(hub_http: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let resp = http()
        .put(format!("{hub_http}/v1/regions/{REGION}/catalog"))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// The demo catalog with the lasagna at `price`.
fn catalog_with_lasagna_at(price: i64) -> Value {
    let mut c = serde_json::to_value(demo_catalog()).unwrap_or_default();
    for item in c["items"].as_array_mut().into_iter().flatten() {
        if item["sku"] == SKU {
            item["price_minor"] = json!(price);
        }
    }
    c
}

async fn catalog_version(url: &str) -> Option<u64> {
    health(url).await.ok()?["catalog_version"].as_u64()
}

/// Sells one lasagna unit at `url`, paying `amount`.
async fn sell(url: &str, unit: &str, amount: i64) -> anyhow::Result<Value> {
    let resp = http()
        .post(format!("{url}/v1/sales"))
        .header("Idempotency-Key", format!("sale-{unit}"))
        .json(&json!({
            "fridge_id": "fridge-1",
            "lines": [{"sku": SKU, "unit_id": unit, "quantity": 1}],
            "payment": {"method": "cash", "amount_minor": amount, "currency": "EUR"},
        }))
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 201, "sale of {unit}: {}", resp.status());
    Ok(resp.json().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_catalog_version_reaches_every_agent_and_an_offline_price_stands()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub_dir = dir.path().join("hub");
    let hub = start_hub(&hub_dir, 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let FridgeAndPos {
        fridge,
        pos,
        fridge_url,
        pos_url,
    } = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    refill(&fridge_url, "fridge-1", "u", SKU, 4).await?;
    synced(&pos_url, WAIT).await?;
    let mut feed = EventFeed::open(&hub_http, REGION).await?;

    let before = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    let v1 = before["version"].as_u64().unwrap_or(0);
    assert!(v1 > 0, "the config's catalog is published: {before}");
    assert_eq!(catalog_version(&pos_url).await, Some(v1));

    // Bad catalogs change nothing.
    let mut bad = catalog_with_lasagna_at(-1);
    assert_eq!(put_catalog(&hub_http, &bad).await?.0, 422);
    bad = catalog_with_lasagna_at(990);
    bad["currency"] = json!("euro");
    assert_eq!(put_catalog(&hub_http, &bad).await?.0, 422);
    assert_eq!(put_catalog(&hub_http, &json!({"items": []})).await?.0, 422);

    // The POS is offline while the price goes up.
    cut_off(&pos).await?;
    let (status, published) = put_catalog(&hub_http, &catalog_with_lasagna_at(990)).await?;
    assert_eq!(status, 201, "{published}");
    let v2 = published["version"].as_u64().unwrap_or(0);
    assert_eq!(v2, v1 + 1);
    // The same catalog again is no new version.
    let (status, again) = put_catalog(&hub_http, &catalog_with_lasagna_at(990)).await?;
    assert_eq!((status, again["version"].as_u64()), (200, Some(v2)));
    feed.until(WAIT, "catalog", |e| e["version"] == v2).await?;
    // PUT takes what GET answers (ratings and all); a change made to an older version than
    // the current one is refused, so two editors cannot undo each other.
    let mut current = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    assert_eq!(
        put_catalog(&hub_http, &current).await?,
        (200, again.clone())
    );
    current["version"] = json!(v1);
    current["items"][0]["price_minor"] = json!(1);
    let (status, stale) = put_catalog(&hub_http, &current).await?;
    assert_eq!(
        (status, &stale["error"]["code"]),
        (409, &json!("catalog_version_conflict"))
    );
    // A key that is not an item's is refused, not dropped: a misspelt optional one would
    // otherwise publish its default without a word.
    let mut misspelt = catalog_with_lasagna_at(990);
    misspelt["items"][0]["shelf_life_hour"] = json!(72);
    let (status, refused) = put_catalog(&hub_http, &misspelt).await?;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (422, &json!("invalid_request"))
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shelf_life_hour")),
        "the key is named: {refused}"
    );

    eventually(WAIT, "the fridge to hold the new version", || async {
        (catalog_version(&fridge_url).await? == v2).then_some(())
    })
    .await?;
    let at_fridge = sell(&fridge_url, "u-0", 990).await?;
    assert_eq!(at_fridge["catalog_version"].as_u64(), Some(v2));
    assert_eq!(at_fridge["total_minor"], 990);
    // Offline, the POS still holds the old version and prices from it.
    assert_eq!(catalog_version(&pos_url).await, Some(v1));
    let at_pos = sell(&pos_url, "u-1", 890).await?;
    assert_eq!(at_pos["catalog_version"].as_u64(), Some(v1));
    assert_eq!(at_pos["total_minor"], 890);
    let pos_order = at_pos["order_id"].as_str().unwrap_or_default().to_owned();
    // The hub's metrics show the offline POS falling behind, the fridge caught up.
    eventually(WAIT, "the POS's sync lag in the metrics", || async {
        let text = metrics_text(&hub_http).await.ok()?;
        let gauge = |device: &str| -> Option<f64> {
            let prefix = format!(
                "larder_hub_device_sync_lag_seconds{{region=\"{REGION}\",device=\"{device}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))?
                .trim()
                .parse()
                .ok()
        };
        (gauge("pos-1")? > 0.0 && gauge("fridge-1")? == 0.0).then_some(())
    })
    .await?;
    let fridge_order = at_fridge["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    feed.until(WAIT, "sale", |e| e["order_id"] == fridge_order.as_str())
        .await?;

    // Back online, the POS catches up with the version it missed and its sale reaches the hub.
    pos.set_network(true);
    synced(&pos_url, WAIT).await?;
    eventually(WAIT, "the POS to hold the new version", || async {
        (catalog_version(&pos_url).await? == v2).then_some(())
    })
    .await?;
    let conflict = feed
        .until(WAIT, "conflict", |e| {
            e["conflict"]["kind"] == "price_changed"
                && e["conflict"]["orders"] == json!([pos_order.as_str()])
        })
        .await?;
    let detail = conflict["conflict"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("version {v1} for 890")) && detail.contains("prices it 990"),
        "{detail}"
    );
    assert!(
        conflict["conflict"]["flagged_order"].is_null(),
        "nothing to refund"
    );

    // The POS's price stands; the order names the conflict; the fridge's sale has none.
    let order = get(&format!(
        "{hub_http}/v1/regions/{REGION}/orders/{pos_order}"
    ))
    .await?;
    assert_eq!(order["total_minor"], 890);
    assert_eq!(order["catalog_version"].as_u64(), Some(v1));
    let cid = conflict["conflict"]["conflict_id"].clone();
    assert_eq!(order["conflicts"], json!([cid]));
    let conflicts = get(&format!("{hub_http}/v1/regions/{REGION}/conflicts")).await?;
    let priced: Vec<&Value> = conflicts["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["kind"] == "price_changed")
        .collect();
    assert_eq!(priced.len(), 1, "{conflicts}");
    let fridge_sale = get(&format!(
        "{hub_http}/v1/regions/{REGION}/orders/{fridge_order}"
    ))
    .await?;
    assert!(
        fridge_sale["conflicts"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    // Every replica hears of it.
    eventually(WAIT, "the conflict at the fridge", || async {
        let list = get(&format!("{fridge_url}/v1/conflicts")).await.ok()?;
        list["conflicts"]
            .as_array()?
            .iter()
            .any(|c| c["conflict_id"] == cid)
            .then_some(())
    })
    .await?;

    let metrics = metrics_text(&hub_http).await?;
    assert!(
        metrics.contains(r#"larder_hub_http_request_seconds_count{method="PUT",route="/v1/regions/{r}/catalog"} 8"#),
        "every PUT timed: {metrics}"
    );
    // Ratings: counted in order per sku, shown on the catalog.
    let rate = |key: &'static str, stars: Value, sku: &'static str| {
        let url = format!("{hub_http}/v1/regions/{REGION}/catalog/{sku}/ratings");
        // One rating per customer and sku: each key is a customer of its own.
        async move { post(&url, key, &json!({"stars": stars, "customer_id": key})).await }
    };
    let (status, first) = rate("r-1", json!(5), SKU).await?;
    assert_eq!((status, first["count"].as_u64()), (201, Some(1)));
    // A retry (same Idempotency-Key) answers the same and counts nothing.
    assert_eq!(rate("r-1", json!(5), SKU).await?, (201, first.clone()));
    let (_, second) = rate("r-2", json!(4), SKU).await?;
    assert_eq!(
        (second["average"].as_f64(), second["count"].as_u64()),
        (Some(4.5), Some(2))
    );
    assert_eq!(rate("r-3", json!(6), SKU).await?.0, 422);
    assert_eq!(rate("r-4", json!(0), SKU).await?.0, 422);
    assert_eq!(rate("r-5", json!("five"), SKU).await?.0, 422);
    assert_eq!(rate("r-6", json!(3), "no-such-meal").await?.0, 404);
    feed.until(WAIT, "rating", |e| e["sku"] == SKU && e["count"] == 2)
        .await?;

    // A restart keeps the version published through the API (the config's catalog did not
    // change) and the ratings.
    fridge.shutdown().await;
    pos.shutdown().await;
    hub.shutdown().await;
    let hub = start_hub(&hub_dir, 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let after = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    assert_eq!(after["version"].as_u64(), Some(v2));
    let lasagna = after["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sku"] == SKU)
        .cloned()
        .unwrap_or_default();
    assert_eq!(lasagna["price_minor"], 990);
    assert_eq!(lasagna["rating"], json!({"average": 4.5, "count": 2}));
    hub.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_feed_needs_a_kitchen_or_admin_token_of_the_region() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.tokens.push(larder_hub::config::TokenConfig {
            sha256: larder_hub::http::token_sha256("app-token"),
            role: larder_hub::config::TokenRole::App,
            regions: vec![REGION.into()],
        });
    })
    .await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let url = format!("{hub_http}/v1/regions/{REGION}/events");
    assert_eq!(http().get(&url).send().await?.status(), 401);
    let wrong = http().get(&url).bearer_auth("not-a-token").send().await?;
    assert_eq!(wrong.status(), 401);
    // An app token may read the catalog and rate, not watch the region or publish a catalog.
    let app = http().get(&url).bearer_auth("app-token").send().await?;
    assert_eq!(app.status(), 403);
    let catalog_url = format!("{hub_http}/v1/regions/{REGION}/catalog");
    let read = http()
        .get(&catalog_url)
        .bearer_auth("app-token")
        .send()
        .await?;
    assert_eq!(read.status(), 200);
    let publish = http()
        .put(&catalog_url)
        .bearer_auth("app-token")
        .json(&catalog_with_lasagna_at(1))
        .send()
        .await?;
    assert_eq!(publish.status(), 403);
    let other = http()
        .get(format!("{hub_http}/v1/regions/elsewhere/events"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(other.status(), 404);
    hub.shutdown().await;
    Ok(())
}
