//! The agent of the previous release (built from this repository's history by
//! `scripts/previous-release.sh`), run as a process against this release's hub: it syncs in
//! protocol version 2 and is answered in it (its sales reach the hub, the hub's app order
//! reaches it), sells while the hub is down, and is then replaced on the same store and config
//! by this release's agent, which migrates the store, syncs the outbox it inherited, and speaks
//! version 3.
//!
//! Built only with the `previous-release-e2e` feature, because it needs that binary:
//! `LARDER_PREVIOUS_AGENT` names it (the script builds it and runs this test; CI does).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use larder_shared::domain::Role;
use larder_tests::*;

const WAIT: Duration = Duration::from_secs(60);
const OFFLINE_SALES: usize = 5;

/// The hub's count of accepted envelopes of `version`, from its metrics.
async fn uplinks_of_version(hub_url: &str, version: u8) -> anyhow::Result<u64> {
    let text = metrics_text(hub_url).await?;
    let prefix = format!(
        "larder_hub_uplink_versions_total{{region=\"{}\",version=\"{version}\"}} ",
        larder_demo::REGION
    );
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// The version a store's file records.
fn user_version(db: &std::path::Path) -> anyhow::Result<u32> {
    let conn = rusqlite::Connection::open(db)?;
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// One piece: the device's life across the release in the order it happens (the old agent
/// syncs, takes an app order, sells offline, is replaced by the new one, which syncs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_the_previous_release_syncs_and_upgrades_in_place() -> anyhow::Result<()> {
    let previous = std::env::var("LARDER_PREVIOUS_AGENT").context(
        "LARDER_PREVIOUS_AGENT names the previous release's agent: run scripts/previous-release.sh",
    )?;
    anyhow::ensure!(
        std::path::Path::new(&previous).exists(),
        "{previous} is missing: run scripts/previous-release.sh"
    );
    let dir = tempfile::tempdir()?;
    let broker_port = larder_hub::mqtt::free_port()?;
    let http_port = larder_hub::mqtt::free_port()?;
    let hub_toml = write_hub_config(&dir.path().join("hub"), broker_port, http_port, 1)?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let hub_config = hub_toml.to_string_lossy().to_string();
    let mut hub = Process::spawn(hub_exe, &["run", "--config", &hub_config], "hub ")?;
    let hub_url = hub.url.clone();

    let (agent_toml, key) = write_agent_config(
        &dir.path().join("fridge"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub_public_key(),
        &format!("127.0.0.1:{broker_port}"),
    )?;
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    // Every unit may be sold offline: no escrow held back for app orders.
    let mut text = std::fs::read_to_string(&agent_toml)?;
    text.push_str("[orders]\nescrow_share = 0.0\n");
    std::fs::write(&agent_toml, text)?;
    let agent_config = agent_toml.to_string_lossy().to_string();

    // The previous release's agent syncs in version 2.
    let mut old = Process::spawn(
        &previous,
        &["run", "--config", &agent_config],
        "listening on ",
    )?;
    let url = old.url.clone();
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "l", "lasagna", 4).await?;
    refill(&url, "fridge-1", "c", "curry-veg", OFFLINE_SALES).await?;
    synced(&url, WAIT).await?;
    eventually(WAIT, "the refills at the hub", || async {
        let stock = hub_stock(&hub_url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == 4
            && available(&stock, "curry-veg") == OFFLINE_SALES as u64)
            .then_some(())
    })
    .await?;
    assert!(uplinks_of_version(&hub_url, 2).await? >= 1);
    assert_eq!(uplinks_of_version(&hub_url, 3).await?, 0);

    // The hub's app order reaches it, written in version 2.
    let (status, placed) = post(
        &format!("{hub_url}/v1/regions/{}/orders", larder_demo::REGION),
        "place-app-1",
        &serde_json::json!({"customer_id": "cust-1", "fridge_id": "fridge-1", "order_id": "app-1",
            "lines": [{"sku": "lasagna", "quantity": 2}]}),
    )
    .await?;
    assert_eq!(status, 201, "{placed}");
    eventually(WAIT, "the app order on the old agent", || async {
        let o = agent_order(&url, "app-1").await?;
        (o["status"] == placed["status"]).then_some(())
    })
    .await?;

    // The hub goes away; the old agent sells on, then is replaced while offline.
    hub.kill();
    offline(&url, WAIT).await?;
    let client = http();
    let mut sold = BTreeSet::new();
    for i in 0..OFFLINE_SALES {
        let (status, body) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &format!("c-{i}"),
            "curry-veg",
            &format!("offline-{i}"),
        )
        .await?;
        assert_eq!(status, 201, "offline sale {i}: {body}");
        sold.insert(body["order_id"].as_str().context("order id")?.to_owned());
    }
    assert_eq!(health(&url).await?["pending_changes"], OFFLINE_SALES as u64);
    old.kill();
    let db = dir.path().join("fridge/data/agent.db");
    let old_version = user_version(&db)?;
    assert!(
        old_version < larder_agent::STORE_SCHEMA.version(),
        "the old release's store is at version {old_version}"
    );

    // This release's agent on the same store and config, and the hub back.
    let new = Process::spawn(
        env!("CARGO_BIN_EXE_agent-node"),
        &["run", "--config", &agent_config],
        "listening on ",
    )?;
    let url = new.url.clone();
    assert_eq!(user_version(&db)?, larder_agent::STORE_SCHEMA.version());
    assert_eq!(health(&url).await?["pending_changes"], OFFLINE_SALES as u64);
    let _hub = Process::spawn(hub_exe, &["run", "--config", &hub_config], "hub ")?;
    synced(&url, WAIT).await?;
    let at_hub = hub_order_ids(&hub_url).await?;
    let offline_at_hub: BTreeSet<String> = at_hub
        .iter()
        .filter(|o| sold.contains(*o))
        .cloned()
        .collect();
    assert_eq!(offline_at_hub, sold, "every offline sale at the hub");
    let distinct: BTreeSet<&String> = at_hub.iter().collect();
    assert_eq!(distinct.len(), at_hub.len(), "none twice: {at_hub:?}");
    assert!(uplinks_of_version(&hub_url, 3).await? >= 1);
    assert!(agent_order(&url, "app-1").await.is_some());
    eventually(WAIT, "the same stock at the hub and the agent", || async {
        let at_hub = hub_stock(&hub_url, "fridge-1").await.ok()?;
        let at_agent = agent_stock(&url, "fridge-1").await.ok()?;
        let counts = |stock: &serde_json::Value| {
            (available(stock, "curry-veg"), available(stock, "lasagna"))
        };
        (counts(&at_hub) == (0, 2) && counts(&at_agent) == (0, 2)).then_some(())
    })
    .await?;
    Ok(())
}
