//! Crash runs with real processes and SIGKILL.
//!
//! `larder-crash agent --points N` kills a real agent process at N random points of concurrent
//! sale bursts, over one data directory. After each kill the database must pass
//! `PRAGMA integrity_check`, and after each restart every sale that got a 201 must be there,
//! with its unit. At the end the agent syncs, and the hub must hold every acknowledged sale,
//! no unit in two orders, and nothing beyond the sales that were in flight at the kills.
//!
//! `larder-crash power-cut --cuts N` cuts the power under an in-process agent N times during
//! concurrent sale bursts. Its SQLite files run on a file layer that keeps what was synced and,
//! of each write not yet synced, the whole of it, a torn part or nothing. Every image of the
//! disk after a cut must pass `PRAGMA integrity_check`, hold every sale answered 201 before the
//! cut, and hold each sale of the burst wholly (its unit sold, its order and its idempotency
//! record) or not at all. The last cut of each burst is started as the agent again and goes on
//! as after a kill; at the end the hub holds every acknowledged sale, no unit in two orders.
//!
//! `larder-crash hub-power-cut --cuts N` does the same under an in-process hub, while three
//! fridge agents sell and sync through it and an app places orders through its API. Every
//! image must pass `PRAGMA integrity_check`, hold every device's uplink as far as the hub had
//! acknowledged it and every app order it had answered 201 with its stored answer; the last
//! cut of each burst is started as the hub again, and every app order retried with its key
//! answers one order. At the end the hub holds every sale the devices made exactly once.
//!
//! `larder-crash hub --devices D --sales S --kills K` runs a real hub process with D in-process
//! agents selling S units each, and kills the hub K times at random points meanwhile. At the
//! end every agent has synced and the hub holds exactly the union of the agents' orders.
//!
//! Build first: `cargo build --release -p larder-tests --bins` (it starts the `agent-node` and
//! `hub-node` binaries beside it). A failure prints the seed; `--seed` replays the schedule
//! (the kill points; process timing still varies).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::Value;

/// Power cuts under an in-process agent (the `power-cut` feature: its file layer needs
/// libclang to build).
#[cfg(feature = "power-cut")]
#[path = "larder-crash/power_cut.rs"]
mod power_cut;

/// Power cuts under an in-process hub (the `power-cut` feature, as above).
#[cfg(feature = "power-cut")]
#[path = "larder-crash/hub_power_cut.rs"]
mod hub_power_cut;

#[derive(Debug, Parser)]
#[command(
    name = "larder-crash",
    about = "Crash runs: SIGKILL real agent and hub processes"
)]
struct Cli {
    /// Seed of the kill schedule.
    #[arg(long, default_value_t = 1, global = true)]
    seed: u64,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Kill an agent process during sale bursts.
    Agent {
        /// Kill points (CI: 100; nightly: 1000).
        #[arg(long, default_value_t = 100)]
        points: usize,
    },
    /// Cut the power under an in-process agent during sale bursts: its SQLite files run on a
    /// file layer that loses the writes not yet synced (`larder_tests::powercut`).
    PowerCut {
        /// Power cuts in all (CI: 1000).
        #[arg(long, default_value_t = 1000)]
        cuts: usize,
        /// Cuts per sale burst at most: the others land at exact points of the agent's I/O and
        /// are checked as images; the last is restarted as the agent and goes on.
        #[arg(long, default_value_t = 10)]
        per_burst: usize,
    },
    /// Cut the power under an in-process hub while fridges sell and sync through it and an
    /// app places orders: its SQLite files run on the file layer that loses the writes not
    /// yet synced.
    HubPowerCut {
        /// Power cuts in all (CI: 1000).
        #[arg(long, default_value_t = 1000)]
        cuts: usize,
        /// Cuts per burst at most: the others land at exact points of the hub's I/O and are
        /// checked as images; the last is restarted as the hub and goes on.
        #[arg(long, default_value_t = 20)]
        per_burst: usize,
    },
    /// Kill the hub process while devices sell and sync.
    Hub {
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Sales per device.
        #[arg(long, default_value_t = 100)]
        sales: usize,
        /// Times the hub is killed.
        #[arg(long, default_value_t = 10)]
        kills: usize,
    },
}

/// A small deterministic generator for the schedule (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn sibling(name: &str) -> Result<String> {
    let exe = std::env::current_exe()?.with_file_name(name);
    ensure!(
        exe.exists(),
        "{} not found: build with `cargo build --release -p larder-tests --bins`",
        exe.display()
    );
    Ok(exe.display().to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let outcome = match cli.command {
        Mode::Agent { points } => agent_run(cli.seed, points).await,
        Mode::PowerCut { cuts, per_burst } => {
            #[cfg(feature = "power-cut")]
            let run = power_cut::run(cli.seed, cuts, per_burst).await;
            #[cfg(not(feature = "power-cut"))]
            let run: Result<String> = {
                let _ = (cuts, per_burst);
                Err(anyhow::anyhow!(
                    "built without the power-cut file layer: \
                     cargo build -p larder-tests --features power-cut --bin larder-crash"
                ))
            };
            run
        }
        Mode::HubPowerCut { cuts, per_burst } => {
            #[cfg(feature = "power-cut")]
            let run = hub_power_cut::run(cli.seed, cuts, per_burst).await;
            #[cfg(not(feature = "power-cut"))]
            let run: Result<String> = {
                let _ = (cuts, per_burst);
                Err(anyhow::anyhow!(
                    "built without the power-cut file layer: \
                     cargo build -p larder-tests --features power-cut --bin larder-crash"
                ))
            };
            run
        }
        Mode::Hub {
            devices,
            sales,
            kills,
        } => hub_run(cli.seed, devices, sales, kills).await,
    };
    match outcome {
        Ok(summary) => {
            println!(
                "{summary} ({:.0} s, seed {})",
                started.elapsed().as_secs_f64(),
                cli.seed
            );
            Ok(())
        }
        Err(e) => Err(e.context(format!("seed {}", cli.seed))),
    }
}

const UNITS_PER_ROUND: usize = 48;
const CLIENTS: usize = 6;
const SKU: &str = "wrap-chicken";

/// One piece: the kill schedule's loop, each kill followed by its checks.
async fn agent_run(seed: u64, points: usize) -> Result<String> {
    let mut rng = Rng(seed);
    let exe = sibling("agent-node")?;
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = larder_demo::seeded_key(7, "fridge-1");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let (config, _) = write_agent_config(
        &dir.path().join("agent"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub.public_key,
        &hub.broker,
    )?;
    // Every unit of a round is for walk-up sale: no escrow held back for app orders.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)? + "[orders]\nescrow_share = 0.0\n",
    )?;
    let config = config.display().to_string();
    let db: PathBuf = dir.path().join("agent").join("data").join("agent.db");
    let mut agent = Process::spawn(&exe, &["run", "--config", &config], "listening on ")?;
    let mut acked_all: Vec<(String, String)> = Vec::new();
    let mut in_flight_max = 0usize;
    for point in 0..points {
        let prefix = format!("r{point}");
        synced(&agent.url, Duration::from_secs(60)).await?;
        refill(&agent.url, "fridge-1", &prefix, SKU, UNITS_PER_ROUND)
            .await
            .with_context(|| format!("refill before kill point {point}"))?;
        // Kill after a random number of acknowledged sales, then a random few milliseconds more,
        // so the kill lands anywhere in the commit pipeline of the sales in flight.
        let kill_after = 1 + rng.below(UNITS_PER_ROUND as u64 - CLIENTS as u64) as usize;
        let extra_us = rng.below(4_000);
        let (acked, mut clients) = sale_burst(&agent.url, &prefix);
        eventually(Duration::from_secs(60), "sales before the kill", || async {
            (acked.lock().ok()?.len() >= kill_after).then_some(())
        })
        .await?;
        tokio::time::sleep(Duration::from_micros(extra_us)).await;
        agent.kill();
        while let Some(r) = clients.join_next().await {
            if let Err(e) = r? {
                bail!("kill point {point}: a sale was refused: {e}");
            }
        }
        let acked: Vec<(String, String)> = acked.lock().map(|a| a.clone()).unwrap_or_default();
        let conn = rusqlite::Connection::open(&db)?;
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        ensure!(
            integrity == "ok",
            "kill point {point}: integrity_check: {integrity}"
        );
        drop(conn);

        agent = Process::spawn(&exe, &["run", "--config", &config], "listening on ")?;
        let client = http();
        for (order, unit) in &acked {
            let o: Value = client
                .get(format!("{}/v1/orders/{order}", agent.url))
                .send()
                .await?
                .json()
                .await?;
            ensure!(
                o["order_id"] == order.as_str() && o["lines"][0]["unit_ids"][0] == unit.as_str(),
                "kill point {point}: acknowledged order {order} ({unit}) lost: {o}"
            );
        }
        // What was in flight may have landed; nothing else may appear.
        let stock = agent_stock(&agent.url, "fridge-1").await?;
        let sold_this_round = UNITS_PER_ROUND as u64
            - stock["skus"]
                .as_array()
                .map(|skus| {
                    skus.iter()
                        .filter(|s| s["sku"] == SKU)
                        .filter_map(|s| s["available"].as_u64())
                        .sum::<u64>()
                })
                .unwrap_or(0);
        ensure!(
            sold_this_round as usize >= acked.len()
                && sold_this_round as usize <= acked.len() + CLIENTS,
            "kill point {point}: {sold_this_round} units gone for {} acknowledged sales",
            acked.len()
        );
        in_flight_max = in_flight_max.max(sold_this_round as usize - acked.len());
        // Every sale of the round again, with its idempotency key: an acknowledged one answers
        // its first order, one that landed unacknowledged answers its order, the rest sell now.
        // So each unit ends in exactly one order, and the next round starts from its own refill.
        let round = sell_round(&agent.url, &prefix).await?;
        for (order, unit) in &acked {
            ensure!(
                round.iter().any(|(o, u)| o == order && u == unit),
                "kill point {point}: the retry of {unit} did not answer its order {order}"
            );
        }
        let distinct: BTreeSet<&String> = round.iter().map(|(o, _)| o).collect();
        ensure!(
            distinct.len() == UNITS_PER_ROUND,
            "kill point {point}: {} orders for {UNITS_PER_ROUND} units",
            distinct.len()
        );
        acked_all.extend(round);
        if (point + 1) % 10 == 0 {
            eprintln!(
                "{} kill points, {} acknowledged sales",
                point + 1,
                acked_all.len()
            );
        }
    }

    synced(&agent.url, Duration::from_secs(120)).await?;
    let hub_orders = hub_holds(&hub_url, &acked_all).await?;
    drop(agent);
    hub.shutdown().await;
    Ok(format!(
        "agent: {points} kill points; every sale acknowledged before a kill present after the \
         restart, its retry answering the same order; {} orders for as many units, all at the \
         hub ({} there), no unit in two orders; integrity ok after every kill; up to \
         {in_flight_max} unacknowledged sales landed per kill",
        acked_all.len(),
        hub_orders.len()
    ))
}

/// Sells every unit of round `prefix` with the idempotency key its first attempt used; answers
/// each unit's order.
async fn sell_round(url: &str, prefix: &str) -> Result<Vec<(String, String)>> {
    let client = http();
    let mut out = Vec::with_capacity(UNITS_PER_ROUND);
    for i in 0..UNITS_PER_ROUND {
        let unit = format!("{prefix}-{i}");
        let (status, body) =
            sell_unit(&client, url, "fridge-1", &unit, SKU, &format!("k-{unit}")).await?;
        ensure!(status == 201, "selling {unit} again: {status} {body}");
        out.push((
            body["order_id"].as_str().unwrap_or_default().to_owned(),
            unit,
        ));
    }
    Ok(out)
}

/// Checks the hub holds every acknowledged order and no unit in two orders; answers the
/// orders seen. The hub lists at most 10,000 orders: those beyond are fetched one by one.
async fn hub_holds(hub_url: &str, acked: &[(String, String)]) -> Result<Vec<(String, String)>> {
    let mut seen = hub_sales(hub_url).await?;
    let listed: BTreeSet<String> = seen.iter().map(|(o, _)| o.clone()).collect();
    for (order, _) in acked {
        if listed.contains(order) {
            continue;
        }
        let o = hub_order(hub_url, order).await?;
        let unit = o["lines"][0]["unit_ids"][0].as_str();
        ensure!(
            o["order_id"] == order.as_str() && unit.is_some(),
            "acknowledged order {order} never reached the hub: {o}"
        );
        seen.push((order.clone(), unit.unwrap_or_default().to_owned()));
    }
    let units: BTreeSet<&String> = seen.iter().map(|(_, u)| u).collect();
    ensure!(
        units.len() == seen.len(),
        "a unit sold in two orders at the hub"
    );
    Ok(seen)
}

/// Starts the hub process, retrying while its ports are still held by the killed one.
fn spawn_hub(exe: &str, config: &str) -> Result<Process> {
    let mut last = None;
    for _ in 0..40 {
        match Process::spawn(exe, &["run", "--config", config], "hub ") {
            Ok(p) => return Ok(p),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("the hub did not start")))
}

/// One piece: the kill schedule's loop, each kill followed by its checks.
async fn hub_run(seed: u64, devices: usize, sales: usize, kills: usize) -> Result<String> {
    let mut rng = Rng(seed);
    let exe = sibling("hub-node")?;
    let dir = tempfile::tempdir()?;
    let broker_port = larder_hub::mqtt::free_port()?;
    let http_port = larder_hub::mqtt::free_port()?;
    let config = write_hub_config(
        &dir.path().join("hub"),
        broker_port,
        http_port,
        devices as u32,
    )?
    .display()
    .to_string();
    let mut hub = spawn_hub(&exe, &config)?;
    let hub_url = hub.url.clone();
    let broker = format!("127.0.0.1:{broker_port}");
    let names: Vec<String> = (0..devices).map(|i| format!("fridge-{}", i + 1)).collect();
    let mut agents = Vec::with_capacity(devices);
    for name in &names {
        let key = larder_demo::seeded_key(7, name);
        enroll(&hub_url, name, Role::Fridge, &[name], &key.public()).await?;
        let mut config = larder_demo::agent_config(
            &dir.path().join(name),
            name,
            Role::Fridge,
            &fridge_ids(&[name]),
            hub_public_key(),
            &broker,
        )?;
        config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
        config.mqtt.reconnect_delay_ms_min = 50;
        config.mqtt.reconnect_delay_ms_max = 1_000;
        config.orders.escrow_share = 0.0;
        let agent = larder_agent::start(config, key).await?;
        let url = format!("http://{}", agent.http_addr);
        refill(&url, name, &format!("{name}-u"), SKU, sales).await?;
        agents.push((agent, url));
    }

    // Every device sells all its units while the hub is killed and restarted.
    let mut sellers = tokio::task::JoinSet::new();
    for (i, (_, url)) in agents.iter().enumerate() {
        let (url, name) = (url.clone(), names[i].clone());
        sellers.spawn(async move {
            let client = http();
            let mut orders = Vec::with_capacity(sales);
            for u in 0..sales {
                let unit = format!("{name}-u-{u}");
                let (status, body) =
                    sell_unit(&client, &url, &name, &unit, SKU, &format!("k-{unit}")).await?;
                ensure!(status == 201, "{unit}: {status} {body}");
                orders.push(body["order_id"].as_str().unwrap_or_default().to_owned());
            }
            anyhow::Ok((name, orders))
        });
    }
    // The kill schedule: a random time up, a kill -9, a random time down, a restart. These
    // waits are the faults' timing, not waits for anything to happen.
    let mut downtime_ms = 0;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1_300))).await;
        hub.kill();
        let down = 100 + rng.below(900);
        downtime_ms += down;
        tokio::time::sleep(Duration::from_millis(down)).await;
        hub = spawn_hub(&exe, &config)?;
    }
    let mut acked = std::collections::BTreeMap::new();
    while let Some(r) = sellers.join_next().await {
        let (name, orders) = r??;
        acked.insert(name, orders);
    }
    for (_, url) in &agents {
        synced(url, Duration::from_secs(180)).await?;
    }
    let mut total = 0;
    for name in &names {
        let v: Value = http()
            .get(format!(
                "{hub_url}/v1/regions/{}/orders?fridge_id={name}&limit=10000",
                larder_demo::REGION
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let at_hub: Vec<String> = v["orders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["order_id"].as_str().map(str::to_owned))
            .collect();
        let distinct: BTreeSet<&String> = at_hub.iter().collect();
        ensure!(
            distinct.len() == at_hub.len(),
            "{name}: an order twice at the hub"
        );
        let mine: BTreeSet<&String> = acked.get(name).into_iter().flatten().collect();
        ensure!(
            distinct == mine,
            "{name}: the hub holds {} orders, the device acknowledged {}",
            distinct.len(),
            mine.len()
        );
        total += at_hub.len();
    }
    for (agent, _) in agents {
        agent.shutdown().await;
    }
    drop(hub);
    Ok(format!(
        "hub: killed {kills} times ({:.1} s down in all) while {devices} devices sold {sales} \
         units each; every one of the {total} acknowledged sales is at the hub exactly once",
        downtime_ms as f64 / 1000.0
    ))
}

/// Sales acknowledged so far, as (order, unit).
type Acked = Arc<Mutex<Vec<(String, String)>>>;

/// Sells the round's units `{prefix}-0..` from `CLIENTS` concurrent clients, each unit once
/// with its own idempotency key, recording each sale answered 201. A client stops at the first
/// request that gets no answer (the agent died or lost power under it); a refused sale is an
/// error.
fn sale_burst(url: &str, prefix: &str) -> (Acked, tokio::task::JoinSet<Result<(), String>>) {
    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (url, acked, prefix) = (url.to_owned(), acked.clone(), prefix.to_owned());
        clients.spawn(async move {
            let client = http();
            for i in (c..UNITS_PER_ROUND).step_by(CLIENTS) {
                let unit = format!("{prefix}-{i}");
                let idem = format!("k-{unit}");
                match sell_unit(&client, &url, "fridge-1", &unit, SKU, &idem).await {
                    Ok((201, body)) => {
                        let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                        if let Ok(mut a) = acked.lock() {
                            a.push((order, unit));
                        }
                    }
                    Ok((status, body)) => return Err(format!("{unit}: {status} {body}")),
                    Err(_) => return Ok(()),
                }
            }
            Ok(())
        });
    }
    (acked, clients)
}
