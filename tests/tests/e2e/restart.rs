//! An agent that folds its change log into snapshots often keeps every order and every
//! unacknowledged change across a restart, and ships them all once it is back online.

use std::time::Duration;

use larder_demo::{agent_config, seeded_key};
use larder_shared::domain::Role;
use larder_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_keep_orders_and_the_outbox_across_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = seeded_key(7, "fridge-1");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let mut config = agent_config(
        &dir.path().join("agent"),
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    config.writer.snapshot_every_changes = 8;
    config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;

    let agent = larder_agent::start(config.clone(), key.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, Duration::from_secs(20)).await?;
    agent.set_network(false);
    eventually(Duration::from_secs(10), "the agent offline", || async {
        (health(&url).await.ok()?["online"] == false).then_some(())
    })
    .await?;
    refill(&url, "fridge-1", "u", "curry-veg", 40).await?;
    let client = http();
    let mut orders = Vec::new();
    for i in 0..40 {
        let (s, b) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &format!("u-{i}"),
            "curry-veg",
            &format!("k{i}"),
        )
        .await?;
        assert_eq!(s, 201, "{b}");
        orders.push(b["order_id"].as_str().expect("id").to_owned());
    }
    let digest_before = agent.digests().await;
    agent.shutdown().await;

    let db = dir.path().join("agent").join("agent.db");
    let snapshots: i64 = rusqlite::Connection::open(&db)?.query_row(
        "SELECT COUNT(*) FROM ledger_snapshots",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(snapshots, 1, "the change log was folded into a snapshot");

    let mut offline = config.clone();
    offline.mqtt.broker = "127.0.0.1:9".into(); // nothing listens there: stays offline
    let agent = larder_agent::start(offline, key.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    assert_eq!(
        agent.digests().await,
        digest_before,
        "the ledger reloads identical"
    );
    assert_eq!(
        health(&url).await?["pending_changes"],
        41,
        "the refill and 40 sales are still to ship"
    );
    for o in &orders {
        let v: serde_json::Value = client
            .get(format!("{url}/v1/orders/{o}"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(v["order_id"], o.as_str());
    }
    agent.shutdown().await;

    let agent = larder_agent::start(config, key).await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, Duration::from_secs(30)).await?;
    let mut at_hub = hub_order_ids(&hub_url).await?;
    at_hub.sort();
    orders.sort();
    assert_eq!(at_hub, orders);
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
