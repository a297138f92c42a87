//! Careless input the agent once took while the hub refused it, and input both took that no
//! one should: each is refused in the contract's shape by the one set of rules in
//! `larder_shared::limits` (or the ledger), and changes nothing. Real hub, agents, HTTP, SQLite.

use std::time::Duration;

use larder_demo::REGION;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn in_hours(h: i64) -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(h)).to_string()
}

/// Posts to an agent or the hub and checks the refusal: its status and error code.
async fn refused(url: &str, key: &str, body: Value, want: (u16, &str)) -> anyhow::Result<()> {
    let (status, answer) = post(url, key, &body).await?;
    assert_eq!(
        (status, answer["error"]["code"].as_str().unwrap_or_default()),
        want,
        "{url} {body}: {answer}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_what_the_hub_refuses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let fp = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    let refills = format!("{}/v1/refills", fp.fridge_url);
    let unit = |id: &str, sku: &str, expires: String| json!({"fridge_id": "fridge-1", "units": [{"unit_id": id, "sku": sku, "expires_at": expires}]});
    refused(
        &refills,
        "no-sku",
        unit("x-1", "caviar", in_hours(24)),
        (422, "invalid_request"),
    )
    .await?;
    refused(
        &refills,
        "stale",
        unit("x-2", "lasagna", in_hours(-1)),
        (422, "invalid_request"),
    )
    .await?;
    refill(&fp.fridge_url, "fridge-1", "r", "lasagna", 2).await?;
    let (status, sale) =
        sell_unit(&http(), &fp.fridge_url, "fridge-1", "r-0", "lasagna", "s").await?;
    assert_eq!(status, 201, "{sale}");
    let removals = format!("{}/v1/removals", fp.fridge_url);
    let removal =
        |units: &[&str]| json!({"fridge_id": "fridge-1", "units": units, "reason": "damaged"});
    refused(
        &removals,
        "rm-sold",
        removal(&["r-0"]),
        (409, "unit_not_available"),
    )
    .await?;
    refused(
        &removals,
        "rm-ghost",
        removal(&["ghost-1"]),
        (409, "unit_not_available"),
    )
    .await?;
    // A door session naming an order this fridge has not heard of is taken, not refused: the
    // customer took the units (offline pickup, see ARCHITECTURE.md), and what they were taken
    // for is reconciled with the orders the hub holds.
    // A refill of the unit whose removal was refused loads it available, and the sold unit
    // is still sold.
    let (status, body) = post(
        &refills,
        "ghost-load",
        &unit("ghost-1", "lasagna", in_hours(24)),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let stock = agent_stock(&fp.fridge_url, "fridge-1").await?;
    let state = |id: &str| {
        stock["units"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["unit_id"] == id))
            .map(|u| u["state"].clone())
    };
    assert_eq!(state("ghost-1"), Some(json!("available")), "{stock}");
    assert_eq!(state("r-0"), Some(json!("sold")), "{stock}");
    assert_eq!(state("r-1"), Some(json!("available")), "{stock}");
    assert_eq!(state("x-1"), None);
    assert_eq!(state("x-2"), None);
    Ok(())
}

async fn put(region: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let resp = http()
        .put(format!("{region}/catalog"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json::<Value>().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_refuses_careless_catalogs_ratings_and_subscriptions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let region = format!("{hub_http}/v1/regions/{REGION}");
    let before = get(&format!("{region}/catalog")).await?;
    let (status, body) = put(&region, json!({"currency": "EUR", "items": []})).await?;
    assert_eq!(status, 422, "an empty catalog: {body}");
    let (status, body) = put(
        &region,
        json!({"currency": "EUR", "items": [
        {"sku": "lasagna", "name": "Lasagna", "price_minor": i64::MAX}]}),
    )
    .await?;
    assert_eq!(status, 422, "a price of i64::MAX: {body}");
    assert_eq!(
        get(&format!("{region}/catalog")).await?["version"],
        before["version"]
    );

    let ratings = format!("{region}/catalog/lasagna/ratings");
    refused(
        &ratings,
        "r-huge",
        json!({"stars": 5, "customer_id": "c".repeat(100_000)}),
        (422, "invalid_request"),
    )
    .await?;
    let (status, body) = post(
        &ratings,
        "r-1",
        &json!({"stars": 5, "customer_id": "cust-1"}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    refused(
        &ratings,
        "r-2",
        json!({"stars": 1, "customer_id": "cust-1"}),
        (409, "already_rated"),
    )
    .await?;
    let (status, body) = post(
        &ratings,
        "r-3",
        &json!({"stars": 4, "customer_id": "cust-2"}),
    )
    .await?;
    assert_eq!((status, &body["count"]), (201, &json!(2)), "{body}");

    let subs = format!("{region}/subscriptions");
    let tomorrow = (jiff::Zoned::now().date().tomorrow()?).to_string();
    let sub = |lines: Value, weekdays: Value, start: &str| {
        json!({"customer_id": "cust-1", "fridge_id": "fridge-1", "lines": lines,
               "weekdays": weekdays, "start_date": start})
    };
    let one = json!([{"sku": "lasagna", "quantity": 1}]);
    let twice = json!([{"sku": "lasagna", "quantity": 15}, {"sku": "lasagna", "quantity": 15}]);
    for (key, body) in [
        ("s-9999", sub(one.clone(), json!(["mon"]), "-009999-01-01")),
        ("s-1900", sub(one.clone(), json!(["mon"]), "1900-01-01")),
        ("s-dup", sub(one.clone(), json!(["mon", "mon"]), &tomorrow)),
        ("s-lines", sub(twice, json!(["mon"]), &tomorrow)),
    ] {
        refused(&subs, key, body, (422, "invalid_request")).await?;
    }
    assert_eq!(get(&subs).await?["subscriptions"], json!([]));
    let (status, body) = post(&subs, "s-ok", &sub(one, json!(["mon", "thu"]), &tomorrow)).await?;
    assert_eq!(status, 201, "{body}");

    // The metrics name devices and their sync lag: a token is asked for.
    let resp = http().get(format!("{hub_http}/metrics")).send().await?;
    assert_eq!(resp.status().as_u16(), 401);
    assert!(metrics_text(&hub_http).await?.contains("larder_hub_"));
    Ok(())
}
