//! A POS sells 100 units while the hub is down (killed with kill -9); when the hub process comes
//! back, the POS reconnects and the hub's and the fridge's stock converge with every sale
//! present exactly once.

use std::collections::BTreeSet;
use std::time::Duration;

use larder_shared::domain::Role;
use larder_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_sells_offline_and_converges_after_the_hub_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker_port = larder_hub::mqtt::free_port()?;
    let http_port = larder_hub::mqtt::free_port()?;
    let hub_toml = write_hub_config(&dir.path().join("hub"), broker_port, http_port, 1)?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let config = hub_toml.to_string_lossy().to_string();
    let mut hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;
    let hub_url = hub.url.clone();
    let broker = format!("127.0.0.1:{broker_port}");

    let fridge_key = larder_demo::seeded_key(7, "fridge-1");
    let pos_key = larder_demo::seeded_key(7, "pos-1");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &fridge_key.public(),
    )
    .await?;
    enroll(
        &hub_url,
        "pos-1",
        Role::Pos,
        &["fridge-1"],
        &pos_key.public(),
    )
    .await?;
    let mut fridge_cfg = larder_demo::agent_config(
        &dir.path().join("fridge"),
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub_public_key(),
        &broker,
    )?;
    let mut pos_cfg = larder_demo::agent_config(
        &dir.path().join("pos"),
        "pos-1",
        Role::Pos,
        &fridge_ids(&["fridge-1"]),
        hub_public_key(),
        &broker,
    )?;
    fridge_cfg.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
    pos_cfg.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
    // This test is about the POS's offline sales; with no escrow granted to the hub, it may
    // sell every unit (tests/tests/e2e/escrow.rs covers the escrow).
    fridge_cfg.orders.escrow_share = 0.0;
    let fridge = larder_agent::start(fridge_cfg, fridge_key).await?;
    let pos = larder_agent::start(pos_cfg, pos_key).await?;
    let (fridge_url, pos_url) = (
        format!("http://{}", fridge.http_addr),
        format!("http://{}", pos.http_addr),
    );
    synced(&fridge_url, Duration::from_secs(20)).await?;
    synced(&pos_url, Duration::from_secs(20)).await?;

    refill(&fridge_url, "fridge-1", "unit", "lasagna", 100).await?;
    eventually(
        Duration::from_secs(20),
        "the POS to see the refill",
        || async {
            (available(&agent_stock(&pos_url, "fridge-1").await.ok()?, "lasagna") == 100)
                .then_some(())
        },
    )
    .await?;

    hub.kill();
    eventually(
        Duration::from_secs(20),
        "the POS to notice the hub is gone",
        || async { (health(&pos_url).await.ok()?["online"] == false).then_some(()) },
    )
    .await?;

    let client = http();
    let mut acked = BTreeSet::new();
    for i in 0..100 {
        let (status, body) = sell_unit(
            &client,
            &pos_url,
            "fridge-1",
            &format!("unit-{i}"),
            "lasagna",
            &format!("sale-{i}"),
        )
        .await?;
        assert_eq!(status, 201, "offline sale {i}: {body}");
        acked.insert(body["order_id"].as_str().expect("order id").to_owned());
    }
    assert_eq!(acked.len(), 100, "every sale got its own order");
    assert_eq!(health(&pos_url).await?["pending_changes"], 100);

    let mut hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;
    synced(&pos_url, Duration::from_secs(30)).await?;
    eventually(
        Duration::from_secs(30),
        "the fridge and hub stock to converge",
        || async {
            let f = agent_stock(&fridge_url, "fridge-1").await.ok()?;
            let h = hub_stock(&hub_url, "fridge-1").await.ok()?;
            (available(&f, "lasagna") == 0 && available(&h, "lasagna") == 0).then_some(())
        },
    )
    .await?;

    let at_hub = hub_order_ids(&hub_url).await?;
    let distinct: BTreeSet<String> = at_hub.iter().cloned().collect();
    assert_eq!(at_hub.len(), 100, "exactly the 100 sales, none twice");
    assert_eq!(distinct, acked, "every acknowledged sale is at the hub");
    let hub_digest = hub_stock(&hub_url, "fridge-1").await?["state_digest"].clone();
    let fridge_digest = fridge.digests().await[0].state_digest.clone();
    let pos_digest = pos.digests().await[0].state_digest.clone();
    assert_eq!(hub_digest, serde_json::json!(fridge_digest));
    assert_eq!(fridge_digest, pos_digest);

    // The hub folded the ledger into a snapshot (every 16 changes in this config); a restart
    // loads snapshot plus tail into the same state.
    let db = dir.path().join("hub").join("data").join("region-demo.db");
    let snapshots: i64 = rusqlite::Connection::open(&db)?.query_row(
        "SELECT COUNT(*) FROM ledger_snapshots",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(snapshots, 1, "the hub snapshotted fridge-1's ledger");
    hub.kill();
    let _hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;
    assert_eq!(
        hub_stock(&hub_url, "fridge-1").await?["state_digest"],
        serde_json::json!(pos_digest)
    );
    pos.shutdown().await;
    fridge.shutdown().await;
    Ok(())
}
