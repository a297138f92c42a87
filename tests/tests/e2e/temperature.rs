//! Temperature: readings above the limit for long enough quarantine the fridge's units (removal
//! reason `temperature`), with an incident naming them; a short excursion does not. A held
//! reservation on a quarantined unit becomes a `reservation_lost` conflict. A quarantine whose
//! commit fails is made again when the reading is retried. Readings are taken only at the
//! fridge's own agent, within a bounded skew of its trusted clock, and an excursion is timed on
//! that clock: readings stamped in 2000 and 2100 quarantine nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use larder_runtime::Clock;

use larder_demo::REGION;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

async fn send_reading(
    url: &str,
    celsius: f64,
    at: jiff::Timestamp,
    key: &str,
) -> anyhow::Result<(u16, Value)> {
    let resp = http()
        .post(format!("{url}/v1/temperature"))
        .header("Idempotency-Key", key)
        .json(&json!({"fridge_id": "fridge-1", "celsius": celsius, "at": at.to_string()}))
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

async fn reading(url: &str, celsius: f64, at: jiff::Timestamp, key: &str) -> anyhow::Result<Value> {
    let (status, body) = send_reading(url, celsius, at, key).await?;
    anyhow::ensure!(status == 202, "reading: {status} {body}");
    Ok(body)
}

/// A fridge agent whose clock the test moves, and `minutes(m)`: moves it to `m` minutes past
/// the start and gives that time, as the firmware's clock would say it.
async fn fridge_on_a_clock(
    dir: &std::path::Path,
    hub: &larder_hub::HubHandle,
) -> anyhow::Result<(
    larder_agent::AgentHandle,
    impl Fn(i64) -> jiff::Timestamp + use<>,
)> {
    let offset = Arc::new(AtomicI64::new(0));
    let fridge = start_agent_with(
        dir,
        hub,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        |_| {},
        Clock::offset(offset.clone()),
    )
    .await?;
    let t0 = jiff::Timestamp::now();
    let minutes = move |m: i64| {
        offset.store(m * 60_000, Ordering::SeqCst);
        t0 + jiff::SignedDuration::from_mins(m)
    };
    Ok((fridge, minutes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_excursion_quarantines_the_units() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let (fridge, min) = fridge_on_a_clock(dir.path(), &hub).await?;
    let url = format!("http://{}", fridge.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "u", "curry-veg", 3).await?;
    synced(&url, WAIT).await?;
    let (status, body) = post(
        &format!("{hub_http}/v1/regions/{REGION}/orders"),
        "place",
        &json!({"customer_id": "c", "fridge_id": "fridge-1", "order_id": "warm-1",
            "lines": [{"sku": "curry-veg", "quantity": 1}]}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");

    // A short excursion: 20 minutes above 5 °C, then back to 3 °C.
    assert_eq!(reading(&url, 4.0, min(0), "r0").await?["excursion"], false);
    assert_eq!(reading(&url, 7.0, min(1), "r1").await?["excursion"], true);
    let r = reading(&url, 8.5, min(21), "r2").await?;
    assert_eq!(r["quarantined_units"], json!([]));
    assert_eq!(reading(&url, 3.0, min(25), "r3").await?["excursion"], false);
    assert_eq!(
        available(&agent_stock(&url, "fridge-1").await?, "curry-veg"),
        2
    );

    // A long one: 31 minutes.
    reading(&url, 7.0, min(30), "r4").await?;
    let r = reading(&url, 9.0, min(61), "r5").await?;
    assert_eq!(
        r["quarantined_units"].as_array().map(Vec::len),
        Some(3),
        "{r}"
    );
    // A retry of the reading gets the same answer and changes nothing.
    assert_eq!(reading(&url, 9.0, min(61), "r5").await?, r);
    let stock = agent_stock(&url, "fridge-1").await?;
    assert!(
        stock["units"]
            .as_array()
            .expect("units")
            .iter()
            .all(|u| u["state"] == "removed")
    );

    eventually(
        WAIT,
        "the incident and the lost reservation at the hub",
        || async {
            let stock = hub_stock(&hub_http, "fridge-1").await.ok()?;
            let incident = stock["incidents"].as_array()?.first()?.clone();
            let conflicts = get(&format!("{hub_http}/v1/regions/{REGION}/conflicts"))
                .await
                .ok()?;
            let lost = conflicts["conflicts"]
                .as_array()?
                .iter()
                .any(|c| c["kind"] == "reservation_lost" && c["flagged_order"] == "warm-1");
            (incident["units"].as_array()?.len() == 3 && incident["peak_celsius"] == 9.0 && lost)
                .then_some(())
        },
    )
    .await?;
    Ok(())
}

/// The reading that makes an excursion long enough is refused when its commit fails (the store
/// refuses the quarantine's change, as a failing disk would), and quarantines the units when it
/// is retried with the same key: the failed commit left the excursion as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_whose_commit_fails_is_made_on_the_retry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let (fridge, min) = fridge_on_a_clock(dir.path(), &hub).await?;
    let url = format!("http://{}", fridge.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "w", "curry-veg", 2).await?;
    assert_eq!(reading(&url, 7.0, min(0), "w0").await?["excursion"], true);

    let store = rusqlite::Connection::open(dir.path().join("fridge-1").join("agent.db"))?;
    store.execute_batch(
        "CREATE TRIGGER no_room BEFORE INSERT ON ledger_changes
         BEGIN SELECT RAISE(ABORT, 'no room'); END;",
    )?;
    let late = json!({"fridge_id": "fridge-1", "celsius": 9.0, "at": min(31).to_string()});
    let resp = http()
        .post(format!("{url}/v1/temperature"))
        .header("Idempotency-Key", "w1")
        .json(&late)
        .send()
        .await?;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    store.execute_batch("DROP TRIGGER no_room")?;

    let r = reading(&url, 9.0, min(31), "w1").await?;
    assert_eq!(
        r["quarantined_units"].as_array().map(Vec::len),
        Some(2),
        "{r}"
    );
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

/// A POS cannot report a fridge's temperature, and readings stamped far from the fridge agent's
/// clock (2000, then 2100) are refused: nothing is quarantined, no incident is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_elsewhere_or_from_another_time_quarantine_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fp = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    refill(&fp.fridge_url, "fridge-1", "t", "curry-veg", 2).await?;
    let now = jiff::Timestamp::now();
    let (status, body) = send_reading(&fp.pos_url, 6.0, now, "pos-reading").await?;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("fridge's own agent")),
        "{body}"
    );
    for (key, at) in [
        ("y2000", "2000-01-01T00:00:00Z"),
        ("y2100", "2100-01-01T00:00:00Z"),
    ] {
        let (status, body) = send_reading(&fp.fridge_url, 6.0, at.parse()?, key).await?;
        assert_eq!(status, 422, "{key}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("reading_skew_seconds_max")),
            "{body}"
        );
    }
    // A reading now starts an excursion, but only the agent's clock can make it long.
    assert_eq!(
        reading(&fp.fridge_url, 6.0, now, "now").await?["excursion"],
        true
    );
    synced(&fp.fridge_url, WAIT).await?;
    assert_eq!(
        available(&agent_stock(&fp.fridge_url, "fridge-1").await?, "curry-veg"),
        2
    );
    let stock = hub_stock(&hub_http, "fridge-1").await?;
    assert_eq!(stock["incidents"], json!([]), "{stock}");
    Ok(())
}
