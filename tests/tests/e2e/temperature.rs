//! Temperature: readings above the limit for long enough quarantine the fridge's units (removal
//! reason `temperature`), with an incident naming them; a short excursion does not. A held
//! reservation on a quarantined unit becomes a `reservation_lost` conflict. A quarantine whose
//! commit fails is made again when the reading is retried.

use std::time::Duration;

use larder_hub::demo::REGION;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

async fn reading(url: &str, celsius: f64, at: jiff::Timestamp, key: &str) -> anyhow::Result<Value> {
    let resp = http()
        .post(format!("{url}/v1/temperature"))
        .header("Idempotency-Key", key)
        .json(&json!({"fridge_id": "fridge-1", "celsius": celsius, "at": at.to_string()}))
        .send()
        .await?;
    anyhow::ensure!(resp.status().as_u16() == 202, "reading: {}", resp.status());
    Ok(resp.json().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_excursion_quarantines_the_units() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
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

    let t0 = jiff::Timestamp::now();
    let min = |m: i64| t0 + jiff::SignedDuration::from_mins(m);
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
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let url = format!("http://{}", fridge.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "w", "curry-veg", 2).await?;
    let t0 = jiff::Timestamp::now();
    let min = |m: i64| t0 + jiff::SignedDuration::from_mins(m);
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
