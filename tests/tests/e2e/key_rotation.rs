//! Device key rotation against a real hub and agent: the agent announces its next key signed
//! with its current one, switches once the hub confirms, and sells on under the new key; the
//! old key still syncs a backlog inside the overlap window and is refused after it.

use std::time::Duration;

use larder_demo::{REGION, agent_config, seeded_key};
use larder_shared::SecretKey;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// The key the hub holds for `device`.
async fn hub_key_of(hub_url: &str, device: &str) -> anyhow::Result<String> {
    let v: Value = http()
        .get(format!("{hub_url}/v1/regions/{REGION}/devices"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?;
    v["devices"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["device_id"] == device))
        .and_then(|d| d["public_key"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no {device} in {v}"))
}

/// Sells one unit through the agent and returns the order id.
async fn sell(url: &str, unit: &str, key: &str) -> anyhow::Result<String> {
    let (status, body) = sell_unit(&http(), url, "fridge-1", unit, "lasagna", key).await?;
    anyhow::ensure!(status == 201, "sale of {unit}: {body}");
    Ok(body["order_id"].as_str().unwrap_or_default().to_owned())
}

async fn at_hub(hub_url: &str, order: &str) -> anyhow::Result<()> {
    eventually(WAIT, &format!("order {order} at the hub"), || async {
        hub_order_ids(hub_url)
            .await
            .ok()?
            .iter()
            .any(|o| o == order)
            .then_some(())
    })
    .await
}

/// Enrolls `fridge-1` with its first key, written to the agent's key file; answers that key,
/// the agent's config and its key path.
async fn enrolled_fridge(
    dir: &std::path::Path,
    hub: &larder_hub::HubHandle,
) -> anyhow::Result<(
    SecretKey,
    larder_agent::config::AgentConfig,
    std::path::PathBuf,
)> {
    let old = seeded_key(7, "fridge-1");
    let hub_url = format!("http://{}", hub.http_addr);
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &old.public(),
    )
    .await?;
    let config = agent_config(
        &dir.join("agent"),
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    let key_path = config.key_path();
    larder_runtime::keys::write_key(&key_path, &old)?;
    Ok((old, config, key_path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_takes_over_and_the_old_one_still_syncs_inside_the_overlap()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let (old, config, key_path) = enrolled_fridge(dir.path(), &hub).await?;

    let agent = larder_agent::start(config.clone(), old.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "u", "lasagna", 6).await?;
    let first = sell(&url, "u-0", "k0").await?;
    at_hub(&hub_url, &first).await?;
    agent.shutdown().await;

    // `larder-agent rotate-key` does this: the next key waits beside the key file.
    let (next, created) = larder_agent::prepare_rotation(&key_path)?;
    assert!(created);
    let (again, created) = larder_agent::prepare_rotation(&key_path)?;
    assert!(!created, "a second rotate-key keeps the pending key");
    assert_eq!(again.public(), next.public());
    assert_eq!(
        hub_key_of(&hub_url, "fridge-1").await?,
        old.public().to_string()
    );

    // The agent announces it at start and switches once the hub confirms.
    let agent = larder_agent::start(config.clone(), old.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    eventually(WAIT, "the hub to hold the new key", || async {
        (hub_key_of(&hub_url, "fridge-1").await.ok()? == next.public().to_string()).then_some(())
    })
    .await?;
    eventually(WAIT, "the agent to keep the new key", || async {
        let text = std::fs::read_to_string(&key_path).ok()?;
        let stored = SecretKey::from_file_text(&text).ok()?;
        (stored.public() == next.public() && !larder_agent::pending_key_path(&key_path).exists())
            .then_some(())
    })
    .await?;
    // Sales now travel signed with the new key.
    let second = sell(&url, "u-1", "k1").await?;
    at_hub(&hub_url, &second).await?;
    agent.shutdown().await;

    // Inside the overlap window the old key still syncs (a backlog signed before the switch).
    let agent = larder_agent::start(config.clone(), old.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    let third = sell(&url, "u-2", "k2").await?;
    at_hub(&hub_url, &third).await?;
    agent.shutdown().await;

    // A retired key cannot rotate the device again, and a proof made by another key is
    // refused: the hub still holds the new key.
    assert_eq!(
        hub_key_of(&hub_url, "fridge-1").await?,
        next.public().to_string()
    );
    let refused_before = hub.metrics.rejected_count(REGION, "retired_key");
    let thief = SecretKey::from_seed([9; 32]);
    larder_runtime::keys::write_key(&larder_agent::pending_key_path(&key_path), &thief)?;
    let agent = larder_agent::start(config.clone(), old.clone()).await?;
    eventually(
        WAIT,
        "the hub to refuse a rotation signed by a retired key",
        || async {
            (hub.metrics.rejected_count(REGION, "retired_key") > refused_before).then_some(())
        },
    )
    .await?;
    agent.shutdown().await;
    std::fs::remove_file(larder_agent::pending_key_path(&key_path))?;
    assert_eq!(
        hub_key_of(&hub_url, "fridge-1").await?,
        next.public().to_string()
    );

    // Every head the device signed, under either key, verifies in the audit chain.
    let store = larder_hub::store::RegionStore::open(
        &dir.path().join("hub").join(format!("region-{REGION}.db")),
    )?;
    let audits = larder_hub::audit::verify(&store)?;
    let fridge = audits
        .iter()
        .find(|a| a.device.as_str() == "fridge-1")
        .ok_or_else(|| anyhow::anyhow!("no audit for fridge-1"))?;
    assert!(fridge.signed_heads >= 3, "{fridge:?}");
    assert!(fridge.problems.is_empty(), "{fridge:?}");
    hub.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_overlap_only_the_new_key_is_accepted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.sync.key_overlap_seconds = 0;
    })
    .await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let (old, config, key_path) = enrolled_fridge(dir.path(), &hub).await?;
    let (next, _) = larder_agent::prepare_rotation(&key_path)?;
    let agent = larder_agent::start(config.clone(), old.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    eventually(WAIT, "the hub to hold the new key", || async {
        (hub_key_of(&hub_url, "fridge-1").await.ok()? == next.public().to_string()).then_some(())
    })
    .await?;
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "u", "lasagna", 2).await?;
    synced(&url, WAIT).await?;
    agent.shutdown().await;

    // With no overlap, the old key cannot even connect: its sale waits on the device.
    let refused_before = hub
        .metrics
        .connections_refused
        .get_or_create(&vec![("reason", "bad_token".to_owned())])
        .get();
    let agent = larder_agent::start(config.clone(), old.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    let order = sell(&url, "u-0", "k0").await?;
    eventually(WAIT, "the broker to refuse the old key", || async {
        (hub.metrics
            .connections_refused
            .get_or_create(&vec![("reason", "bad_token".to_owned())])
            .get()
            > refused_before)
            .then_some(())
    })
    .await?;
    assert_eq!(health(&url).await?["online"], false);
    assert!(!hub_order_ids(&hub_url).await?.contains(&order));
    agent.shutdown().await;

    // With the new key the same store syncs its backlog.
    let agent = larder_agent::start(config.clone(), next.clone()).await?;
    at_hub(&hub_url, &order).await?;
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
