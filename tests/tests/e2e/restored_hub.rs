//! A hub restored from a backup is behind its devices, and learns it (the real `hub-node`
//! binary, killed with SIGKILL, restored with `larder-hub restore`): the restored store is of a
//! new generation, the POS sees it in the next acknowledgement and offers again every sale the
//! lost store had acknowledged after the backup (kept after its ledger's compaction), each
//! lands once, and the downlink starts again so what another device stocks after the restore
//! reaches the POS. An app order the lost store made comes back from the fridge it reached.

use std::collections::HashSet;
use std::time::Duration;

use larder_demo::{agent_config, seeded_key};
use larder_shared::domain::Role;
use larder_tests::*;

const WAIT: Duration = Duration::from_secs(60);

async fn sell(url: &str, from: usize, to: usize) -> anyhow::Result<()> {
    let client = http();
    for i in from..to {
        let unit = format!("u{i}");
        let (status, body) = sell_unit(&client, url, "fridge-1", &unit, "lasagna", &unit).await?;
        anyhow::ensure!(status == 201, "{unit}: {status} {body}");
    }
    Ok(())
}

/// The hub's order ids once it holds `n` of them, each once.
async fn orders_at_hub(hub_url: &str, n: usize) -> anyhow::Result<Vec<String>> {
    eventually(WAIT, &format!("{n} orders at the hub"), || async {
        let ids = hub_order_ids(hub_url).await.ok()?;
        (ids.len() >= n).then_some(ids)
    })
    .await
}

/// One piece: the scenario in the order it happens (sell, back up, sell, lose the hub,
/// restore, re-offer, order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_hub_gets_back_what_it_acknowledged_after_its_backup() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut hub, config, broker_port) = hub_process(dir.path())?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    enroll_all(
        &hub.url,
        &[("fridge-1", Role::Fridge), ("pos-1", Role::Pos)],
    )
    .await?;

    // A POS whose ledger is compacted every 8 changes: what the hub acknowledged leaves the
    // ledger's log soon after, and is kept only for a restored hub.
    let pos = agent(dir.path(), "pos-1", Role::Pos, broker_port, 8).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;
    // A fridge whose refills reach the POS through the hub's downlink.
    let fridge = agent(dir.path(), "fridge-1", Role::Fridge, broker_port, 4).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;
    refill(&fridge_url, "fridge-1", "early", "lasagna", 2).await?;
    sell(&url, 0, 10).await?;
    orders_at_hub(&hub.url, 10).await?;

    let backup = dir.path().join("backup").to_string_lossy().to_string();
    let (ok, said) =
        run_to_end(hub_exe, &["backup", "--config", &config, "--out", &backup]).await?;
    assert!(ok, "{said}");

    // Twenty more sales, acknowledged by the store about to be lost.
    sell(&url, 10, 30).await?;
    refill(&fridge_url, "fridge-1", "lost", "lasagna", 5).await?;
    eventually(WAIT, "the fridge's refills at the POS", || async {
        let stock = agent_stock(&url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == 7).then_some(())
    })
    .await?;
    let before: HashSet<String> = orders_at_hub(&hub.url, 30).await?.into_iter().collect();
    synced(&url, WAIT).await?;
    synced(&fridge_url, WAIT).await?;
    // The fridge goes offline before the hub is lost, and stays off until later: the restored
    // hub's downlink has a hole where its refills were.
    fridge.shutdown().await;
    hub.kill();

    let hub = restored(&config, &backup).await?;

    // Every sale is back, each once: the ten of the backup and the twenty re-offered.
    let after = orders_at_hub(&hub.url, 30).await?;
    let unique: HashSet<String> = after.iter().cloned().collect();
    assert_eq!(unique.len(), after.len(), "no order twice: {after:?}");
    assert_eq!(unique, before);
    let metrics = metrics_text(&url).await?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "larder_agent_hub_generations_total 1"),
        "{metrics}"
    );

    // The downlink starts again at the restored hub's position: the POS sees what a new
    // device stocks, numbered by the restored hub where the lost store had numbered the
    // fridge's refills.
    enroll_all(&hub.url, &[("pos-2", Role::Pos)]).await?;
    let pos2 = agent(dir.path(), "pos-2", Role::Pos, broker_port, 5_000).await?;
    let pos2_url = format!("http://{}", pos2.http_addr);
    synced(&pos2_url, WAIT).await?;
    refill(&pos2_url, "fridge-1", "late", "lasagna", 3).await?;
    eventually(WAIT, "the late refill at the POS", || async {
        let stock = agent_stock(&url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == 10).then_some(())
    })
    .await?;

    // The fridge comes back, learns of the restore and offers its refills again.
    let fridge = agent(dir.path(), "fridge-1", Role::Fridge, broker_port, 4).await?;
    eventually(WAIT, "every refill at the hub", || async {
        let stock = hub_stock(&hub.url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == 10).then_some(())
    })
    .await?;
    // And it takes the downlink from the restored hub's position: the ledger is the same on
    // all four sides.
    eventually(WAIT, "the fridge-1 ledger the same everywhere", || async {
        let at_hub = hub_stock(&hub.url, "fridge-1").await.ok()?["state_digest"]
            .as_str()?
            .to_owned();
        for agent in [&fridge, &pos, &pos2] {
            if agent.digests().await.first()?.state_digest != at_hub {
                return None;
            }
        }
        Some(())
    })
    .await?;
    fridge.shutdown().await;
    pos2.shutdown().await;
    pos.shutdown().await;
    Ok(())
}

/// Restores the hub of `config` from the backup in `backup` (`restore --replace`, which must
/// say it made a new generation) and starts it again.
async fn restored(config: &str, backup: &str) -> anyhow::Result<Process> {
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let restore = ["restore", "--config", config, "--from", backup, "--replace"];
    let (ok, said) = run_to_end(hub_exe, &restore).await?;
    assert!(ok && said.contains("new generation"), "{said}");
    Process::spawn(hub_exe, &["run", "--config", config], "hub ")
}

/// Places an app order at the hub for `quantity` of `sku` at fridge-1.
async fn place(
    hub_url: &str,
    id: &str,
    sku: &str,
    quantity: u32,
) -> anyhow::Result<(u16, serde_json::Value)> {
    post(
        &format!("{hub_url}/v1/regions/{}/orders", larder_demo::REGION),
        &format!("place-{id}"),
        &serde_json::json!({"customer_id": "cust-1", "fridge_id": "fridge-1", "order_id": id,
            "lines": [{"sku": sku, "quantity": quantity}]}),
    )
    .await
}

/// The units an order reserved.
fn units_of(order: &serde_json::Value) -> HashSet<String> {
    order["reserved_units"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

/// One piece: the scenario in the order it happens (stock, back up, order, lose the hub,
/// restore, order again, give back).
///
/// An app order is a change the hub makes to the fridge's ledger; the lost store made this one
/// after the backup and sent it to the fridge, which kept it with the hub's signature. The
/// restored store lacks it, and makes an order of its own before the fridge is back; the
/// fridge then gives the lost one back and the hub takes it on its own signature. The restored
/// store writes under a new actor, so its order and the one given back stand side by side in
/// the ledger (under the lost store's actor they would be two changes of one number, and
/// neither side could merge the other's), the same at the hub and on the fridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_order_the_lost_store_made_comes_back_from_the_fridge() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut hub, config, broker_port) = hub_process(dir.path())?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    enroll_all(&hub.url, &[("fridge-1", Role::Fridge)]).await?;
    let fridge = agent(dir.path(), "fridge-1", Role::Fridge, broker_port, 4).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;
    refill(&fridge_url, "fridge-1", "l", "lasagna", 6).await?;
    refill(&fridge_url, "fridge-1", "c", "curry-veg", 3).await?;
    synced(&fridge_url, WAIT).await?;
    eventually(WAIT, "the refills at the hub", || async {
        let stock = hub_stock(&hub.url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == 6 && available(&stock, "curry-veg") == 3).then_some(())
    })
    .await?;
    let backup = dir.path().join("backup").to_string_lossy().to_string();
    let (ok, said) =
        run_to_end(hub_exe, &["backup", "--config", &config, "--out", &backup]).await?;
    assert!(ok, "{said}");

    // After the backup: an app order, which reaches the fridge.
    let (status, placed) = place(&hub.url, "app-lost", "lasagna", 2).await?;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(units_of(&placed).len(), 2, "{placed}");
    eventually(WAIT, "the order on the fridge", || async {
        let o = agent_order(&fridge_url, "app-lost").await?;
        (o["status"] == placed["status"]).then_some(())
    })
    .await?;
    synced(&fridge_url, WAIT).await?;
    fridge.shutdown().await;
    hub.kill();
    let hub = restored(&config, &backup).await?;
    let absent = hub_order(&hub.url, "app-lost").await?;
    assert_eq!(absent["error"]["code"], "unknown_order", "{absent}");
    // The restored hub's own order, while the fridge is away.
    let (status, next) = place(&hub.url, "app-new", "curry-veg", 1).await?;
    assert_eq!(status, 201, "{next}");

    // The fridge comes back and gives the lost order back: the same order, the same units.
    let fridge = agent(dir.path(), "fridge-1", Role::Fridge, broker_port, 4).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    let back = eventually(WAIT, "the order back at the hub", || async {
        let o = hub_order(&hub.url, "app-lost").await.ok()?;
        (o["status"] == placed["status"]).then_some(o)
    })
    .await?;
    assert_eq!(units_of(&back), units_of(&placed), "{back}");
    let metrics = metrics_text(&fridge_url).await?;
    let given: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("larder_agent_hub_changes_given_back_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(given >= 1, "{metrics}");
    // Every change of the hub's the fridge keeps is in the restored store, as the hub's and
    // with its signature, so a later restore can have it back too.
    let kept: HashSet<Vec<u8>> = rusqlite::Connection::open(dir.path().join("fridge-1/agent.db"))?
        .prepare("SELECT hash FROM hub_changes")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let at_hub: HashSet<Vec<u8>> =
        rusqlite::Connection::open(dir.path().join("hub/data/region-demo.db"))?
            .prepare("SELECT hash FROM changes WHERE author = 'hub' AND hub_sig IS NOT NULL")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
    assert!(kept.len() as u64 >= given, "{} kept", kept.len());
    assert!(
        kept.is_subset(&at_hub),
        "{} of {} kept at the hub",
        kept.intersection(&at_hub).count(),
        kept.len()
    );

    // Both orders hold their units, and the ledger is one at the hub and on the fridge.
    eventually(
        WAIT,
        "both orders in one ledger at the hub and on the fridge",
        || async {
            agent_order(&fridge_url, "app-new").await?;
            let at_hub = hub_stock(&hub.url, "fridge-1").await.ok()?;
            let digest = at_hub["state_digest"].as_str()?.to_owned();
            (available(&at_hub, "lasagna") == 4
                && available(&at_hub, "curry-veg") == 2
                && fridge.digests().await.first()?.state_digest == digest)
                .then_some(())
        },
    )
    .await?;
    let stock = agent_stock(&fridge_url, "fridge-1").await?;
    assert_eq!(
        (available(&stock, "lasagna"), available(&stock, "curry-veg")),
        (4, 2),
        "{stock}"
    );
    fridge.shutdown().await;
    Ok(())
}

/// Starts an in-process agent of the region on the embedded broker at `broker_port`, its
/// ledger compacted every `snapshot_every` changes.
async fn agent(
    dir: &std::path::Path,
    device: &str,
    role: Role,
    broker_port: u16,
    snapshot_every: usize,
) -> anyhow::Result<larder_agent::AgentHandle> {
    let mut config = agent_config(
        &dir.join(device),
        device,
        role,
        &fridge_ids(&["fridge-1"]),
        hub_public_key(),
        &format!("127.0.0.1:{broker_port}"),
    )?;
    config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
    config.writer.snapshot_every_changes = snapshot_every;
    Ok(larder_agent::start(config, seeded_key(7, device)).await?)
}

/// Enrolls devices of fridge-1 at the hub.
async fn enroll_all(hub_url: &str, devices: &[(&str, Role)]) -> anyhow::Result<()> {
    for (device, role) in devices {
        let key = seeded_key(7, device).public();
        enroll(hub_url, device, *role, &["fridge-1"], &key).await?;
    }
    Ok(())
}

/// A hub process (`hub-node run`) of one fridge in `dir/hub`: it, its config's path and its
/// embedded broker's port.
fn hub_process(dir: &std::path::Path) -> anyhow::Result<(Process, String, u16)> {
    let (broker_port, http_port) = (
        larder_hub::mqtt::free_port()?,
        larder_hub::mqtt::free_port()?,
    );
    let hub_toml = write_hub_config(&dir.join("hub"), broker_port, http_port, 1)?;
    let config = hub_toml.to_string_lossy().to_string();
    let hub = Process::spawn(
        env!("CARGO_BIN_EXE_hub-node"),
        &["run", "--config", &config],
        "hub ",
    )?;
    Ok((hub, config, broker_port))
}

/// The hub's disk is lost and there is no backup: started on an empty store with the same
/// config and key, and the devices enrolled again, it rebuilds the fridge's ledger from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_on_an_empty_store_rebuilds_every_ledger_from_its_devices() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut hub, config, broker_port) = hub_process(dir.path())?;
    let both = [("fridge-1", Role::Fridge), ("pos-1", Role::Pos)];
    enroll_all(&hub.url, &both).await?;
    let fridge = agent(dir.path(), "fridge-1", Role::Fridge, broker_port, 5_000).await?;
    let pos = agent(dir.path(), "pos-1", Role::Pos, broker_port, 8).await?;
    let (fridge_url, pos_url) = (
        format!("http://{}", fridge.http_addr),
        format!("http://{}", pos.http_addr),
    );
    synced(&fridge_url, WAIT).await?;
    synced(&pos_url, WAIT).await?;
    refill(&fridge_url, "fridge-1", "stock", "lasagna", 6).await?;
    sell(&pos_url, 0, 25).await?;
    let before: HashSet<String> = orders_at_hub(&hub.url, 25).await?.into_iter().collect();
    synced(&fridge_url, WAIT).await?;
    synced(&pos_url, WAIT).await?;
    let digest = pos.digests().await[0].state_digest.clone();

    // The disk is lost: the store and its WAL go; the key and the config are kept elsewhere.
    hub.kill();
    for ext in ["db", "db-wal", "db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("hub/data/region-demo.{ext}")));
    }
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;
    enroll_all(&hub.url, &both).await?;
    let after = orders_at_hub(&hub.url, 25).await?;
    let unique: HashSet<String> = after.iter().cloned().collect();
    assert_eq!(unique.len(), after.len(), "no order twice: {after:?}");
    assert_eq!(unique, before);
    eventually(WAIT, "the fridge's ledger rebuilt at the hub", || async {
        let at_hub = hub_stock(&hub.url, "fridge-1").await.ok()?;
        (at_hub["state_digest"].as_str()? == digest).then_some(())
    })
    .await?;
    assert_eq!(fridge.digests().await[0].state_digest, digest);
    fridge.shutdown().await;
    pos.shutdown().await;
    Ok(())
}
