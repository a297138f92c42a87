//! A sale retried with the same Idempotency-Key creates one order and answers as the first did;
//! the same key with another body is 409 and changes nothing.

use std::time::Duration;

use larder_shared::domain::Role;
use larder_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_same_order_other_body_conflict() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let url = format!("http://{}", fridge.http_addr);
    synced(&url, Duration::from_secs(20)).await?;
    refill(&url, "fridge-1", "u", "soup-lentil", 5).await?;
    let client = http();

    let (s1, first) = sell_unit(&client, &url, "fridge-1", "u-0", "soup-lentil", "key-A").await?;
    assert_eq!(s1, 201, "{first}");
    let (s2, again) = sell_unit(&client, &url, "fridge-1", "u-0", "soup-lentil", "key-A").await?;
    assert_eq!(s2, 201, "a retry answers as the first time: {again}");
    assert_eq!(first, again);

    // Concurrent retries of a new key: one order between them.
    let mut retries = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        retries.spawn(async move {
            sell_unit(&client, &url, "fridge-1", "u-1", "soup-lentil", "key-B").await
        });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(answer) = retries.join_next().await {
        let (s, b) = answer??;
        assert_eq!(s, 201, "{b}");
        ids.insert(b["order_id"].as_str().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 1, "eight retries made one order");

    let (s3, conflict) =
        sell_unit(&client, &url, "fridge-1", "u-2", "soup-lentil", "key-A").await?;
    assert_eq!(s3, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_key_reused");

    let orders: serde_json::Value = client
        .get(format!("{url}/v1/orders"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        orders["orders"].as_array().map(Vec::len),
        Some(2),
        "{orders}"
    );
    let stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(
        available(&stock, "soup-lentil"),
        3,
        "u-2 was not sold by the conflicting request"
    );
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
