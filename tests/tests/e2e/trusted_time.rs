//! Trusted time: a device whose clock is a day behind takes the hub's signed time beacon, so a
//! unit past its expiry in real time is expired there too, and it states its drift bound.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_a_day_behind_follows_the_hubs_beacon() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let behind = Arc::new(AtomicI64::new(-86_400_000));
    let pos = start_agent_with(
        dir.path(),
        &hub,
        "pos-1",
        Role::Pos,
        &["fridge-1"],
        |_| {},
        Clock::offset(behind),
    )
    .await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, Duration::from_secs(20)).await?;
    let time = eventually(Duration::from_secs(20), "a beacon", || async {
        let h = health(&url).await.ok()?;
        (h["time"]["source"] == "beacon").then(|| h["time"].clone())
    })
    .await?;
    let bound = time["behind_bound_ms"].as_i64().expect("a bound");
    assert!((1_000..2_000).contains(&bound), "{time}");
    let now = jiff::Timestamp::now().as_millisecond();
    let trusted = time["now_ms"].as_i64().expect("now");
    assert!(
        (now - trusted).abs() < 60_000,
        "trusted {trusted} vs real {now}"
    );

    // Expired an hour ago in real time; the device's own clock says it has a day left.
    cut_off(&pos).await?;
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let resp = http()
        .post(format!("{url}/v1/refills"))
        .header("Idempotency-Key", "r")
        .json(&json!({"fridge_id": "fridge-1", "units": [
            {"unit_id": "old-0", "sku": "curry-veg", "expires_at": past.to_string()}]}))
        .send()
        .await?;
    // Trusted time says it expired: refused as a load of an expired unit, nothing loaded.
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("old-0 expires_at")),
        "{body}"
    );
    let stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(stock["units"], json!([]), "{stock}");
    Ok(())
}
