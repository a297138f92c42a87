//! Larder's agent benchmarks: durable sale latency against the fsync floor, throughput with
//! 32 clients, and the catch-up of a POS that sold 10,000 times offline. The agent runs in
//! this process under the system allocator, as the `larder-agent` binary does.
//!
//! Run with `cargo run --release -p larder-tests --bin larder-bench -- all` (or one of
//! `latency`, `throughput`, `catch-up`). Everything runs on loopback with real SQLite files,
//! real HTTP and real MQTT through the hub's embedded broker. The hub's benchmarks are
//! `larder-hub-bench`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use larder_agent::AgentHandle;
use larder_shared::domain::Role;
use larder_tests::*;

const LATENCY_SALES: usize = 2_000;
const THROUGHPUT_SALES: usize = 20_000;
const THROUGHPUT_CLIENTS: usize = 32;
const CATCH_UP_SALES: usize = 10_000;

/// One agent for the fridge, online long enough to get the catalog and the stock.
async fn fridge_with_stock(
    dir: &Path,
    units: usize,
) -> Result<(larder_hub::HubHandle, AgentHandle, String)> {
    let hub = start_hub(&dir.join("hub"), 1).await?;
    // These benchmarks measure the sale path: no escrow held back for app orders.
    let agent = start_agent_with(
        dir,
        &hub,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        |c| c.orders.escrow_share = 0.0,
        larder_runtime::Clock::system(),
    )
    .await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, Duration::from_secs(30)).await?;
    for chunk in 0..units.div_ceil(1_000) {
        let n = (units - chunk * 1_000).min(1_000);
        refill(&url, "fridge-1", &format!("c{chunk}"), "lasagna", n).await?;
    }
    Ok((hub, agent, url))
}

/// The mean of a Prometheus histogram of the agent, in milliseconds.
fn histogram_mean_ms(agent: &AgentHandle, name: &str) -> f64 {
    let text = agent.shared.metrics.encode();
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}")))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    value("sum") / value("count").max(1.0) * 1e3
}

fn unit(i: usize) -> String {
    format!("c{}-{}", i / 1_000, i % 1_000)
}

/// The fsync floor: single-row INSERTs, each in its own `synchronous=FULL` WAL transaction.
fn fsync_floor(dir: &Path, n: usize) -> Result<Vec<Duration>> {
    let conn = rusqlite::Connection::open(dir.join("baseline.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        [],
    )?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        conn.execute("INSERT INTO t (id, body) VALUES (?1, 'sale')", [i as i64])?;
        out.push(start.elapsed());
    }
    out.sort();
    Ok(out)
}

async fn latency() -> Result<()> {
    let dir = tempfile::tempdir_in(".")?;
    let (hub, agent, url) = fridge_with_stock(dir.path(), LATENCY_SALES).await?;
    agent.set_network(false);
    let client = http();
    for i in 0..50 {
        // warm-up on units the measured loop does not use
        let _ = sell_unit(
            &client,
            &url,
            "fridge-1",
            &unit(LATENCY_SALES - 1 - i),
            "lasagna",
            &format!("w{i}"),
        )
        .await?;
    }
    let mut samples = Vec::with_capacity(LATENCY_SALES);
    for i in 0..LATENCY_SALES - 50 {
        let start = Instant::now();
        let (s, b) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &unit(i),
            "lasagna",
            &format!("s{i}"),
        )
        .await?;
        samples.push(start.elapsed());
        if s != 201 {
            bail!("sale {i}: {s} {b}");
        }
    }
    samples.sort();
    let commit = histogram_mean_ms(&agent, "larder_agent_commit_seconds");
    let mut http_floor = Vec::with_capacity(samples.len());
    for _ in 0..samples.len() {
        let start = Instant::now();
        client
            .get(format!("{url}/v1/health"))
            .send()
            .await?
            .bytes()
            .await?;
        http_floor.push(start.elapsed());
    }
    http_floor.sort();
    let floor = fsync_floor(dir.path(), samples.len())?;
    println!(
        "## Durable sale latency, one client ({} sales, agent offline)",
        samples.len()
    );
    println!("| | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| sale through the agent's HTTP API | {:.3} | {:.3} |",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99))
    );
    println!(
        "| fsync floor: 1-row INSERT, own FULL WAL txn | {:.3} | {:.3} |",
        ms(percentile(&floor, 0.5)),
        ms(percentile(&floor, 0.99))
    );
    println!(
        "| HTTP round trip alone: GET /v1/health | {:.3} | {:.3} |",
        ms(percentile(&http_floor, 0.5)),
        ms(percentile(&http_floor, 0.99))
    );
    println!("mean group commit (SQLite write + fsync) inside a sale: {commit:.3} ms");
    println!(
        "p99 ratio sale / floor: {:.2} (goal at most 2.0)\n",
        percentile(&samples, 0.99).as_secs_f64() / percentile(&floor, 0.99).as_secs_f64()
    );
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

async fn throughput() -> Result<()> {
    let dir = tempfile::tempdir_in(".")?;
    let (hub, agent, url) = fridge_with_stock(dir.path(), THROUGHPUT_SALES).await?;
    agent.set_network(false);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..THROUGHPUT_CLIENTS {
        let (next, url) = (next.clone(), url.clone());
        tasks.spawn(async move {
            let client = http();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= THROUGHPUT_SALES {
                    return anyhow::Ok(());
                }
                let (s, b) = sell_unit(
                    &client,
                    &url,
                    "fridge-1",
                    &unit(i),
                    "lasagna",
                    &format!("t{i}"),
                )
                .await?;
                if s != 201 {
                    bail!("sale {i}: {s} {b}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = start.elapsed().as_secs_f64();
    let metrics = agent.shared.metrics.encode();
    let group = metrics
        .lines()
        .filter(|l| {
            l.starts_with("larder_agent_commit_group_size_sum")
                || l.starts_with("larder_agent_commit_group_size_count")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .collect::<Vec<_>>();
    println!(
        "## Durable sales per second, {THROUGHPUT_CLIENTS} concurrent clients ({THROUGHPUT_SALES} sales, agent offline)"
    );
    println!(
        "{:.0} sales/s in {:.2} s (goal at least 5,000)",
        THROUGHPUT_SALES as f64 / secs,
        secs
    );
    if let [sum, count] = group[..] {
        println!(
            "mean commands per group commit: {:.1}\n",
            sum / count.max(1.0)
        );
    }
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

async fn catch_up() -> Result<()> {
    let dir = tempfile::tempdir_in(".")?;
    let (hub, fridge, fridge_url) = fridge_with_stock(dir.path(), CATCH_UP_SALES).await?;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let pos_url = format!("http://{}", pos.http_addr);
    eventually(
        Duration::from_secs(120),
        "the POS to receive the stock",
        || async {
            (available(&agent_stock(&pos_url, "fridge-1").await.ok()?, "lasagna")
                == CATCH_UP_SALES as u64)
                .then_some(())
        },
    )
    .await?;
    synced(&pos_url, Duration::from_secs(30)).await?;
    pos.set_network(false);
    let client = http();
    for i in 0..CATCH_UP_SALES {
        let (s, b) = sell_unit(
            &client,
            &pos_url,
            "fridge-1",
            &unit(i),
            "lasagna",
            &format!("o{i}"),
        )
        .await?;
        if s != 201 {
            bail!("offline sale {i}: {s} {b}");
        }
    }
    let change_bytes: i64 = {
        let conn = rusqlite::Connection::open(dir.path().join("pos-1").join("agent.db"))?;
        // Every local change of this POS is unacknowledged: it sold offline from the start.
        conn.query_row(
            "SELECT COALESCE(SUM(LENGTH(bytes)), 0) FROM ledger_changes WHERE outbox_seq IS NOT NULL",
            [],
            |r| r.get(0),
        )?
    };
    let bytes_before = pos.shared.metrics.envelope_bytes_sent.get();
    if std::env::var_os("LARDER_BENCH_PAUSE").is_some() {
        // Lets a profiler attach to the catch-up phase alone.
        eprintln!("catch-up starts in 2 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let start = Instant::now();
    pos.set_network(true);
    let mut connected_after = None;
    let mut half_after = None;
    eventually(
        Duration::from_secs(120),
        "the hub to acknowledge every offline sale",
        || {
            if connected_after.is_none() && pos.shared.online.load(Ordering::Relaxed) {
                connected_after = Some(start.elapsed());
            }
            if half_after.is_none() && pos.pending_changes() <= CATCH_UP_SALES as u64 / 2 {
                half_after = Some(start.elapsed());
            }
            let done = pos.pending_changes() == 0;
            async move { done.then_some(()) }
        },
    )
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let sent = pos.shared.metrics.envelope_bytes_sent.get() - bytes_before;
    println!("## Catch-up of a POS offline for {CATCH_UP_SALES} sales");
    println!("connected after {connected_after:?}, half acknowledged after {half_after:?}");
    println!("{secs:.2} s from reconnect until the hub acknowledged all (goal at most 3 s)");
    println!(
        "{sent} envelope bytes sent for {change_bytes} bytes of changes: {:.3}x (goal at most 1.5x)\n",
        sent as f64 / change_bytes.max(1) as f64
    );
    let _ = fridge_url;
    pos.shutdown().await;
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if matches!(which.as_str(), "-h" | "--help" | "help") {
        println!(
            "Larder's agent benchmarks (build with --release)\n\n\
             usage: larder-bench [latency|throughput|catch-up|all]   (default: all)\n\n\
             latency     durable sale latency through the agent's HTTP API, one client\n\
             throughput  durable sales per second, 32 concurrent clients\n\
             catch-up    a POS offline for 10,000 sales reconnecting to a hub\n\n\
             The hub's benchmarks are in larder-hub-bench; figures in docs/BENCHMARKS.md."
        );
        return Ok(());
    }
    bench_start("Larder's agent benchmarks", &which);
    match which.as_str() {
        "latency" => latency().await,
        "throughput" => throughput().await,
        "catch-up" => catch_up().await,
        "all" => {
            latency().await?;
            throughput().await?;
            catch_up().await
        }
        other => {
            bail!(
                "unknown benchmark {other:?}: latency, throughput, catch-up or all (the hub's are in larder-hub-bench)"
            )
        }
    }
}
