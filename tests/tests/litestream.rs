//! Continuous replication with Litestream (the real binary: `LARDER_LITESTREAM`, or
//! `litestream` on the PATH), run beside a hub process with the config `larder-hub
//! litestream-config` writes. The hub process is killed (`kill -9`) while a POS sells, and its
//! host's Litestream with it; Litestream, started again on the surviving disk, catches up with
//! what the hub had committed; a new hub on the store Litestream restores takes the POS back,
//! and every sale the POS made, before and after the kill, is at the new hub exactly once. Run
//! by CI (`--features replication-e2e`).

use std::process::Stdio;
use std::time::Duration;

use larder_tests::*;

const WAIT: Duration = Duration::from_secs(60);

fn litestream() -> String {
    std::env::var("LARDER_LITESTREAM").unwrap_or_else(|_| "litestream".to_owned())
}

/// One piece: the scenario in the order it happens (replicate, sell, kill, catch up, restore,
/// take the POS back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_under_sales_comes_back_from_its_litestream_replica() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let broker_port = larder_hub::mqtt::free_port()?;
    let hub_toml = write_hub_config(
        &dir.path().join("hub"),
        broker_port,
        larder_hub::mqtt::free_port()?,
        1,
    )?;
    let config = hub_toml.to_string_lossy().to_string();
    let mut hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;

    let replica = dir.path().join("replica");
    let litestream_yml = dir.path().join("litestream.yml");
    let (ok, said) = run_to_end(
        hub_exe,
        &[
            "litestream-config",
            "--config",
            &config,
            "--replica",
            &replica.to_string_lossy(),
            "--out",
            &litestream_yml.to_string_lossy(),
        ],
    )
    .await?;
    assert!(ok, "{said}");
    let yml = litestream_yml.to_string_lossy().to_string();
    let mut replicating = tokio::process::Command::new(litestream())
        .args(["replicate", "-config", &yml])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;

    let pos = start_pos(&dir.path().join("pos"), &hub.url, broker_port).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;

    // Sales; the hub is killed once it holds 40 of them, and the POS sells on offline.
    let client = http();
    let mut sales = Vec::new();
    for i in 0..80 {
        if i == 60 {
            eventually(WAIT, "40 sales at the hub", || async {
                (hub_order_ids(&hub.url).await.ok()?.len() >= 40).then_some(())
            })
            .await?;
            hub.kill();
        }
        let unit = format!("u{i}");
        let (status, body) = sell_unit(&client, &url, "fridge-1", &unit, "lasagna", &unit).await?;
        anyhow::ensure!(status == 201, "{unit}: {status} {body}");
        let order = body["order_id"].as_str().unwrap_or_default().to_owned();
        sales.push((order, unit));
    }
    let pid = rustix::process::Pid::from_raw(replicating.id().unwrap_or_default() as i32)
        .ok_or_else(|| anyhow::anyhow!("litestream has no pid"))?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let stopped = tokio::time::timeout(Duration::from_secs(60), replicating.wait()).await??;
    assert!(stopped.success(), "litestream stopped cleanly: {stopped}");
    // Litestream comes back with the host, whose disk survived the hub's crash, and catches up
    // with what the hub had committed (its last sync interval, in its WAL).
    let (ok, said) = run_to_end(&litestream(), &["replicate", "-config", &yml, "-once"]).await?;
    assert!(ok, "{said}");

    // The standby: the replica restored into a new data directory, the same key and broker.
    let standby_toml = write_hub_config(
        &dir.path().join("standby"),
        broker_port,
        larder_hub::mqtt::free_port()?,
        1,
    )?;
    let restored = dir.path().join("standby/data/region-demo.db");
    std::fs::create_dir_all(restored.parent().expect("a data dir"))?;
    let primary_store = dir.path().join("hub/data/region-demo.db");
    let (ok, said) = run_to_end(
        &litestream(),
        &[
            "restore",
            "-config",
            &yml,
            "-o",
            &restored.to_string_lossy(),
            &primary_store.to_string_lossy(),
        ],
    )
    .await?;
    assert!(ok, "{said}");
    let standby_config = standby_toml.to_string_lossy().to_string();
    let standby = Process::spawn(hub_exe, &["run", "--config", &standby_config], "hub ")?;
    synced(&url, WAIT).await?;
    let at_hub = eventually(WAIT, "every sale at the new hub", || async {
        let held = hub_sales(&standby.url).await.ok()?;
        sales
            .iter()
            .all(|(order, _)| held.iter().any(|(o, _)| o == order))
            .then_some(held)
    })
    .await?;
    for (order, unit) in &sales {
        let holding: Vec<&String> = at_hub
            .iter()
            .filter(|(_, u)| u == unit)
            .map(|(o, _)| o)
            .collect();
        assert_eq!(holding, [order], "{unit} sold once, in {order}");
    }
    pos.shutdown().await;
    Ok(())
}
