//! A standby hub takes over from a primary that died, on a real Mosquitto with Litestream (the
//! real binaries: `mosquitto`, and `LARDER_LITESTREAM` or `litestream` on the PATH). Fifty
//! devices (a fridge agent and a POS at each of 25 fridges) sell through the primary, which
//! Litestream replicates; the primary is killed with `kill -9` mid-ingest, its disk counted as
//! lost. The standby, holding the same key, runs `larder-hub promote` from the replica and
//! serves; every device sees the new store generation and offers again what the replica
//! lacks. Every sale any agent answered 201 is at the standby exactly once, and every fridge's
//! ledger is the same at the standby and at both its devices (so conflicts and escrow balance).
//! Prints the failover time (the primary's death to the standby's first accepted envelope) and
//! the changes offered again: the figures in docs/BENCHMARKS.md. Run by CI
//! (`--features broker-e2e,replication-e2e`).

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use larder_agent::AgentHandle;
use larder_shared::domain::Role;
use larder_tests::mosquitto::{Mosquitto, add_device, run, write_external_hub_config};
use larder_tests::*;

const WAIT: Duration = Duration::from_secs(120);
/// Fridges of the region, each with a fridge agent and a POS.
const FRIDGES: u32 = 25;
/// The pace of each device's sales (a busy shop's till, not a stress test).
const SALE_EVERY: Duration = Duration::from_millis(250);

fn litestream() -> String {
    std::env::var("LARDER_LITESTREAM").unwrap_or_else(|_| "litestream".to_owned())
}

/// A hub config for the region on the external broker; primary and standby differ only in
/// their directory (and so their data directory and HTTP port).
fn hub_config(dir: &std::path::Path, broker_port: u16) -> anyhow::Result<String> {
    let c = larder_demo::hub_config(
        &dir.join("data"),
        broker_port,
        FRIDGES,
        larder_hub::http::token_sha256(ADMIN_TOKEN),
    )?;
    write_external_hub_config(dir, &c, broker_port, "hub-demo")
}

/// The region's devices: `(device, role, fridge)`.
fn devices() -> Vec<(String, Role, String)> {
    (1..=FRIDGES)
        .flat_map(|i| {
            let fridge = format!("fridge-{i}");
            [
                (fridge.clone(), Role::Fridge, fridge.clone()),
                (format!("pos-{i}"), Role::Pos, fridge),
            ]
        })
        .collect()
}

/// Sells at `url` every [`SALE_EVERY`] until `stop`, recording each order answered 201.
async fn sell_until(
    device: String,
    fridge: String,
    url: String,
    stop: Arc<AtomicBool>,
    sold: Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<()> {
    let client = http();
    let mut pace = tokio::time::interval(SALE_EVERY);
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        pace.tick().await;
        let unit = format!("{device}-u{n}");
        let (status, body) = sell_unit(&client, &url, &fridge, &unit, "lasagna", &unit).await?;
        anyhow::ensure!(status == 201, "{unit}: {status} {body}");
        let order = body["order_id"].as_str().unwrap_or_default().to_owned();
        sold.lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(order);
        n += 1;
    }
    Ok(())
}

/// The standby's count of accepted envelopes.
async fn accepted(hub_url: &str) -> Option<u64> {
    let text = metrics_text(hub_url).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("larder_hub_envelopes_accepted_total{region=\"demo\"} "))?
        .trim()
        .parse()
        .ok()
}

/// An agent's counter, by its exposition name.
async fn agent_counter(agent: &AgentHandle, name: &str) -> anyhow::Result<u64> {
    let text = metrics_text(&format!("http://{}", agent.http_addr)).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in the agent's metrics"))
}

/// One piece: the scenario in the order it happens (enroll, broker, primary and replication,
/// devices, ingest, kill, promote, take over, check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_the_replica_and_loses_no_acknowledged_sale() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let port = larder_hub::mqtt::free_port()?;
    let primary_config = hub_config(&dir.path().join("primary"), port)?;
    let standby_config = hub_config(&dir.path().join("standby"), port)?;
    for (device, role, fridge) in devices() {
        let id = (device.as_str(), role.as_str(), fridge.as_str());
        add_device(hub_exe, &primary_config, "demo", id)?;
    }
    let out = dir.path().join("broker-files");
    let said = run(
        hub_exe,
        &[
            "broker-config",
            "--config",
            &primary_config,
            "--out",
            &out.to_string_lossy(),
        ],
    )?;
    anyhow::ensure!(said.contains("50 device(s)"), "{said}");
    let broker = Mosquitto::start(
        &dir.path().join("broker"),
        port,
        &std::fs::read_to_string(out.join("passwords"))?,
        &std::fs::read_to_string(out.join("acl"))?,
    )
    .await?;

    let mut primary = Process::spawn(hub_exe, &["run", "--config", &primary_config], "hub ")?;
    let replica = dir.path().join("replica").to_string_lossy().to_string();
    let yml = dir
        .path()
        .join("litestream.yml")
        .to_string_lossy()
        .to_string();
    let litestream_config = [
        "litestream-config",
        "--config",
        &primary_config,
        "--replica",
        &replica,
        "--out",
        &yml,
    ];
    run(hub_exe, &litestream_config)?;
    let mut replicating = tokio::process::Command::new(litestream())
        .args(["replicate", "-config", &yml])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;

    let mut agents = Vec::new();
    for (device, role, fridge) in devices() {
        let mut config = larder_demo::agent_config(
            &dir.path().join(&device),
            &device,
            role,
            &fridge_ids(&[&fridge]),
            hub_public_key(),
            &format!("127.0.0.1:{port}"),
        )?;
        config.mqtt.password = Some(broker.password(&device)?);
        config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
        let agent = larder_agent::start(config, larder_demo::seeded_key(7, &device)).await?;
        agents.push((device, fridge, agent));
    }
    for (_, _, agent) in &agents {
        synced(&format!("http://{}", agent.http_addr), WAIT).await?;
    }

    // Every device sells; the primary dies once it holds 300 sales.
    let stop = Arc::new(AtomicBool::new(false));
    let sold = Arc::new(Mutex::new(Vec::new()));
    let sellers: Vec<_> = agents
        .iter()
        .map(|(device, fridge, agent)| {
            tokio::spawn(sell_until(
                device.clone(),
                fridge.clone(),
                format!("http://{}", agent.http_addr),
                stop.clone(),
                sold.clone(),
            ))
        })
        .collect();
    eventually(WAIT, "300 sales at the primary", || async {
        (hub_order_ids(&primary.url).await.ok()?.len() >= 300).then_some(())
    })
    .await?;
    // The primary's host dies: the hub and its Litestream, and its disk is not used again.
    primary.kill();
    let died = Instant::now();
    replicating.kill().await?;

    // The standby takes over from the replica.
    let promote = [
        "promote",
        "--config",
        &standby_config,
        "--replica",
        &replica,
        "--litestream",
        &litestream(),
    ];
    let said = run(hub_exe, &promote)?;
    anyhow::ensure!(said.contains("region demo: promoted"), "{said}");
    let standby = Process::spawn(hub_exe, &["run", "--config", &standby_config], "hub ")?;
    eventually(WAIT, "the standby's first accepted envelope", || async {
        (accepted(&standby.url).await? > 0).then_some(())
    })
    .await?;
    let failover = died.elapsed();
    let held_at_promote = hub_order_ids(&standby.url).await?.len();

    // Selling goes on through the standby for a while, then stops, and everything syncs.
    eventually(WAIT, "100 new sales at the standby", || async {
        (hub_order_ids(&standby.url).await.ok()?.len() >= held_at_promote + 100).then_some(())
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    for s in sellers {
        s.await??;
    }
    for (_, _, agent) in &agents {
        synced(&format!("http://{}", agent.http_addr), WAIT).await?;
    }

    // Every sale answered 201 is at the standby, once.
    let sold: Vec<String> = sold
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let at_standby = eventually(WAIT, "every sale at the standby", || async {
        let held = hub_order_ids(&standby.url).await.ok()?;
        (held.len() >= sold.len()).then_some(held)
    })
    .await?;
    let unique: HashSet<&String> = at_standby.iter().collect();
    assert_eq!(unique.len(), at_standby.len(), "an order held twice");
    let sold_set: HashSet<&String> = sold.iter().collect();
    assert_eq!(sold_set.len(), sold.len(), "an order id answered twice");
    assert_eq!(
        unique, sold_set,
        "the standby holds exactly the sales answered 201"
    );

    // Each fridge's ledger is the same at the standby and at both its devices.
    for i in 1..=FRIDGES {
        let fridge = format!("fridge-{i}");
        let holders: Vec<&AgentHandle> = agents
            .iter()
            .filter(|(_, f, _)| *f == fridge)
            .map(|(_, _, a)| a)
            .collect();
        eventually(WAIT, &format!("{fridge} the same everywhere"), || async {
            let hub = hub_stock(&standby.url, &fridge).await.ok()?["state_digest"]
                .as_str()?
                .to_owned();
            for a in &holders {
                if a.digests().await.first()?.state_digest != hub {
                    return None;
                }
            }
            Some(())
        })
        .await?;
    }
    let (mut reoffered, mut given_back) = (0, 0);
    for (device, _, agent) in &agents {
        let seen = agent_counter(agent, "larder_agent_hub_generations_total").await?;
        assert_eq!(seen, 1, "{device} saw the standby's generation once");
        reoffered += agent_counter(agent, "larder_agent_changes_reoffered_total").await?;
        given_back += agent_counter(agent, "larder_agent_hub_changes_given_back_total").await?;
    }
    println!(
        "failover: {} ms from the primary's death to the standby's first accepted envelope; \
         {reoffered} changes offered again and {given_back} of the hub's given back by {} \
         devices; {held_at_promote} of {} sales at the standby by its first accepted envelope",
        failover.as_millis(),
        agents.len(),
        sold.len()
    );
    for (_, _, agent) in agents {
        agent.shutdown().await;
    }
    drop(standby);
    Ok(())
}
