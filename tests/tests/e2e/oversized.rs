//! No write path can make a change that cannot be sent: the requests that once stopped sync for
//! good (a 400 KB batch label at an agent, an import of 1,000 rows of 64-byte ids and batches)
//! are refused or split, and sync goes on behind them. Real hub, agents, MQTT, HTTP and SQLite.

use std::time::Duration;

use larder_demo::REGION;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A 64-byte id ending in `n`.
fn long_id(prefix: &str, n: usize) -> String {
    let tail = format!("{prefix}-{n}");
    format!("{}{tail}", "x".repeat(64 - tail.len()))
}

fn expires() -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48)).to_string()
}

/// The hub's count of `fridge`'s units, as its stock answer gives it.
async fn hub_units(hub_http: &str, fridge: &str) -> anyhow::Result<usize> {
    let stock = hub_stock(hub_http, fridge).await?;
    Ok(stock["units"].as_array().map_or(0, Vec::len))
}

/// Sells one unit at the POS and waits until the hub holds the sale.
async fn a_sale_reaches_the_hub(
    hub_http: &str,
    pos_url: &str,
    unit: &str,
    key: &str,
) -> anyhow::Result<()> {
    let (status, body) = sell_unit(&http(), pos_url, "fridge-1", unit, "lasagna", key).await?;
    anyhow::ensure!(status == 201, "sale: {status} {body}");
    let order = body["order_id"].as_str().unwrap_or_default().to_owned();
    eventually(WAIT, "the sale to reach the hub", || async {
        hub_order_ids(hub_http)
            .await
            .ok()?
            .contains(&order)
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_kb_batch_label_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fp = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    for url in [&fp.pos_url, &fp.fridge_url] {
        let resp = http()
            .post(format!("{url}/v1/refills"))
            .header("Idempotency-Key", "huge-batch")
            .json(&json!({"fridge_id": "fridge-1", "units": [
                {"unit_id": "huge-1", "sku": "lasagna", "expires_at": expires(),
                 "batch": "b".repeat(400_000)}]}))
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("batch") && message.contains("64"),
            "{message}"
        );
        assert_eq!(health(url).await?["pending_changes"], 0, "nothing written");
    }
    // Sync goes on: a refill and a sale after it reach the hub.
    refill(&fp.fridge_url, "fridge-1", "after", "lasagna", 2).await?;
    synced(&fp.fridge_url, WAIT).await?;
    eventually(WAIT, "the POS to see the refill", || async {
        let stock = agent_stock(&fp.pos_url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") >= 2).then_some(())
    })
    .await?;
    a_sale_reaches_the_hub(&hub_http, &fp.pos_url, "after-0", "sale-after").await?;
    assert_eq!(
        hub_units(&hub_http, "fridge-1").await?,
        2,
        "huge-1 never loaded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refill_of_1000_long_ids_is_split_into_changes_that_sync() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        // The smallest message a hub allows: every change must still fit.
        c.mqtt.max_message_bytes = larder_shared::limits::MESSAGE_BYTES_MIN;
    })
    .await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let small = |c: &mut larder_agent::config::AgentConfig| {
        c.mqtt.max_message_bytes = larder_shared::limits::MESSAGE_BYTES_MIN;
    };
    let mut agents = Vec::new();
    for (name, role) in [
        ("fridge-1", larder_shared::domain::Role::Fridge),
        ("pos-1", larder_shared::domain::Role::Pos),
    ] {
        let agent = start_agent_with(
            dir.path(),
            &hub,
            name,
            role,
            &["fridge-1"],
            small,
            larder_runtime::Clock::system(),
        )
        .await?;
        agents.push(agent);
    }
    let (fridge_url, pos_url) = (
        format!("http://{}", agents[0].http_addr),
        format!("http://{}", agents[1].http_addr),
    );
    synced(&fridge_url, WAIT).await?;
    let units: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"unit_id": long_id("u", i), "sku": "lasagna", "expires_at": expires(),
                   "batch": "b".repeat(64)})
        })
        .collect();
    let (status, body) = post(
        &format!("{fridge_url}/v1/refills"),
        "long-refill",
        &json!({"fridge_id": "fridge-1", "units": units}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    // About 160 KB of ids and labels, in changes of at most CHANGE_BYTES_MAX each through
    // 16 KiB messages: the outbox drains and every replica has them all.
    synced(&fridge_url, WAIT).await?;
    eventually(WAIT, "the hub and the POS to hold every unit", || async {
        let hub_n = hub_units(&hub_http, "fridge-1").await.ok()?;
        let pos_n = available(&agent_stock(&pos_url, "fridge-1").await.ok()?, "lasagna");
        (hub_n == 1000 && pos_n == 1000).then_some(())
    })
    .await?;
    a_sale_reaches_the_hub(&hub_http, &pos_url, &long_id("u", 7), "sale-long").await?;
    let metrics = metrics_text(&fridge_url).await?;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("larder_agent_changes_withheld_total{") && !l.ends_with(" 0")),
        "nothing withheld:\n{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_of_1000_long_rows_reaches_every_device_and_sync_goes_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fp = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    let rows: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"line": i + 2, "unit_id": long_id("imp", i), "fridge_id": "fridge-1",
                   "sku": "lasagna", "expires_at": expires(), "batch": "b".repeat(64)})
        })
        .collect();
    let (status, report) = post(
        &format!("{hub_http}/v1/regions/{REGION}/imports/units"),
        "import-long",
        &json!({ "rows": rows }),
    )
    .await?;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["accepted"], 1000, "{report}");
    eventually(WAIT, "both agents to hold every imported unit", || async {
        let f = available(
            &agent_stock(&fp.fridge_url, "fridge-1").await.ok()?,
            "lasagna",
        );
        let p = available(&agent_stock(&fp.pos_url, "fridge-1").await.ok()?, "lasagna");
        (f == 1000 && p == 1000).then_some(())
    })
    .await?;
    // Their own changes still go up: a refill and a sale reach the hub.
    refill(&fp.fridge_url, "fridge-1", "after", "lasagna", 1).await?;
    synced(&fp.fridge_url, WAIT).await?;
    a_sale_reaches_the_hub(&hub_http, &fp.pos_url, &long_id("imp", 3), "sale-imp").await?;
    let metrics = metrics_text(&hub_http).await?;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("larder_hub_changes_withheld_total{") && !l.ends_with(" 0")),
        "nothing withheld:\n{metrics}"
    );
    Ok(())
}
