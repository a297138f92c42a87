//! The agent's footprint: its resident memory idle and under 100 sales/s (a real agent process),
//! and a simulated year at one fridge (500 units a day refilled and sold through one POS, the
//! hub compacting every day): live document size, archive size, start-up time to serving HTTP,
//! and sale p99 at the end of the year against day one. The aarch64 binary's size is measured by
//! `scripts/footprint.sh`, which builds it and then runs this.
//!
//! `cargo build --release -p larder-tests --bins && target/release/larder-footprint all`
//! (or `memory`, or `year [--days N]`). Everything is real: SQLite files, HTTP, MQTT through the
//! hub's embedded broker. The year runs on a simulated clock that the agents stamp records with
//! (the network side keeps real time), moved one day per simulated day.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use larder_agent::AgentHandle;
use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::json;

const DAY_MS: i64 = 86_400_000;
const UNITS_PER_DAY: usize = 500;
/// On the first and the last day, this many more units are refilled and sold, one client
/// timing each sale, so each p99 rests on 2,000 samples.
const PROBE_UNITS: usize = 1_500;
const SKU: &str = "lasagna";
const LOAD_SALES_PER_SECOND: u64 = 100;
const LOAD_SECONDS: u64 = 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `RssAnon` and `RssFile` (the binary's pages) of a process, in bytes.
fn rss_split(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok((field("RssAnon:"), field("RssFile:")))
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The agent binary: `LARDER_AGENT_BIN` (scripts/footprint.sh sets it to the `device`
/// profile build, as shipped), else the agent CLI built beside this binary.
fn agent_exe() -> Result<PathBuf> {
    if let Ok(bin) = std::env::var("LARDER_AGENT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("agent-node");
    if !exe.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p larder-tests --bins`",
            exe.display()
        );
    }
    Ok(exe)
}

/// Resident memory of a real agent process: idle, then under 100 sales/s.
async fn memory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let (config, key) = write_agent_config(
        &dir.path().join("fridge"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub.public_key,
        &hub.broker,
    )?;
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let exe = agent_exe()?;
    let config = config.to_string_lossy().to_string();
    // As firmware-config/larder-agent.service runs it.
    let agent = Process::spawn_with_env(
        &exe.to_string_lossy(),
        &["run", "--config", &config],
        "listening on ",
        &[("MALLOC_ARENA_MAX", "2")],
    )?;
    let pid = agent.child.id();
    synced(&agent.url, Duration::from_secs(30)).await?;
    let units = (LOAD_SALES_PER_SECOND * LOAD_SECONDS) as usize;
    for chunk in 0..units.div_ceil(1_000) {
        let n = (units - chunk * 1_000).min(1_000);
        refill(&agent.url, "fridge-1", &format!("c{chunk}"), SKU, n).await?;
    }
    synced(&agent.url, Duration::from_secs(30)).await?;
    // Idle: connected, synced, nothing to do; sampled over five seconds.
    let mut idle = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await; // sampling interval, not synchronisation
        idle = idle.max(rss(pid)?.0);
    }
    let (idle_anon, idle_file) = rss_split(pid)?;
    // Under load: one sale every 10 ms for 30 s, sampled every second.
    let client = http();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / LOAD_SALES_PER_SECOND));
    let mut loaded = 0;
    let mut failures = 0;
    for i in 0..units {
        tick.tick().await;
        let (status, body) = sell_unit(
            &client,
            &agent.url,
            "fridge-1",
            &format!("c{}-{}", i / 1_000, i % 1_000),
            SKU,
            &format!("load-{i}"),
        )
        .await?;
        if status != 201 {
            if failures == 0 {
                // Expected once: the last free unit, which the fridge keeps for the hub's escrow.
                eprintln!("sale {i} refused: {status} {body}");
            }
            failures += 1;
        }
        if i % LOAD_SALES_PER_SECOND as usize == 0 {
            loaded = loaded.max(rss(pid)?.0);
        }
    }
    let rate = units as f64 / started.elapsed().as_secs_f64();
    synced(&agent.url, Duration::from_secs(30)).await?;
    let (now, peak) = rss(pid)?;
    let (loaded_anon, loaded_file) = rss_split(pid)?;
    loaded = loaded.max(now);
    println!(
        "agent resident memory ({}, a real x86_64 process with MALLOC_ARENA_MAX=2 as the systemd unit sets it, synced with a hub):",
        exe.display()
    );
    println!(
        "  idle:                    {:.1} MiB ({:.1} MiB heap and stacks, {:.1} MiB of the binary and libraries)",
        mib(idle),
        mib(idle_anon),
        mib(idle_file)
    );
    println!(
        "  under {rate:.0} sales/s ({units} sales, {failures} refused): {:.1} MiB (peak VmHWM {:.1} MiB; at the end {:.1} MiB heap and stacks, {:.1} MiB file-backed)",
        mib(loaded),
        mib(peak),
        mib(loaded_anon),
        mib(loaded_file)
    );
    println!("  goal: at most 20 MB");
    drop(agent);
    hub.shutdown().await;
    Ok(())
}

/// Sells the day's units through the POS: one client timed sale by sale, or 16 at once.
async fn sell_day(pos_url: &str, day: usize, timed: bool) -> Result<Vec<Duration>> {
    let client = http();
    let per_day = if timed {
        UNITS_PER_DAY + PROBE_UNITS
    } else {
        UNITS_PER_DAY
    };
    let units: Vec<String> = (0..per_day).map(|i| format!("d{day}-u{i}")).collect();
    if timed {
        let mut lat = Vec::with_capacity(units.len());
        for u in &units {
            let t = Instant::now();
            let (status, body) =
                sell_unit(&client, pos_url, "fridge-1", u, SKU, &format!("s-{u}")).await?;
            lat.push(t.elapsed());
            if status != 201 {
                bail!("sale of {u}: {status} {body}");
            }
        }
        lat.sort();
        return Ok(lat);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in units.chunks(UNITS_PER_DAY.div_ceil(16)) {
        let (client, url, chunk) = (client.clone(), pos_url.to_owned(), chunk.to_vec());
        tasks.spawn(async move {
            for u in chunk {
                let (status, body) =
                    sell_unit(&client, &url, "fridge-1", &u, SKU, &format!("s-{u}")).await?;
                if status != 201 {
                    bail!("sale of {u}: {status} {body}");
                }
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(Vec::new())
}

async fn refill_day(fridge_url: &str, day: usize, units: usize, now_ms: i64) -> Result<()> {
    let expires = jiff::Timestamp::from_millisecond(now_ms + 3 * DAY_MS)?;
    let all: Vec<_> = (0..units)
        .map(|i| json!({"unit_id": format!("d{day}-u{i}"), "sku": SKU, "expires_at": expires.to_string()}))
        .collect();
    for (n, chunk) in all.chunks(1_000).enumerate() {
        let resp = http()
            .post(format!("{fridge_url}/v1/refills"))
            .header("Idempotency-Key", format!("refill-d{day}-{n}"))
            .json(&json!({"fridge_id": "fridge-1", "units": chunk}))
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("refill of day {day}: {}", resp.text().await?);
        }
    }
    Ok(())
}

/// Waits until both agents have nothing pending and hold the hub's state.
async fn settle(hub: &larder_hub::HubHandle, agents: &[&AgentHandle]) -> Result<()> {
    let hub_url = format!("http://{}", hub.http_addr);
    eventually(
        Duration::from_secs(120),
        "the replicas to settle",
        || async {
            for a in agents {
                if a.pending_changes() > 0 {
                    return None;
                }
            }
            let digest = hub_stock(&hub_url, "fridge-1").await.ok()?["state_digest"]
                .as_str()?
                .to_owned();
            for a in agents {
                if a.digests().await.first()?.state_digest != digest {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
}

async fn compact_at(hub: &larder_hub::HubHandle, archive_before_ms: i64) -> Result<()> {
    let region = hub.regions.values().next().context("a region")?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    region
        .tx
        .send(larder_hub::region::RegionCommand::Compact {
            archive_before_ms,
            idem: None,
            reply,
        })
        .await
        .map_err(|_| anyhow::anyhow!("region writer gone"))?;
    rx.await??;
    Ok(())
}

async fn start_fridge(
    dir: &Path,
    hub: &larder_hub::HubHandle,
    clock: &Clock,
) -> Result<(AgentHandle, Duration)> {
    let mut config = larder_demo::agent_config(
        &dir.join("fridge-1"),
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    // The year sells every unit it loads: no escrow held back for app orders.
    config.orders.escrow_share = 0.0;
    let started = Instant::now();
    let agent = larder_agent::start_with_clock(
        config,
        larder_demo::seeded_key(7, "fridge-1"),
        clock.clone(),
    )
    .await?;
    let url = format!("http://{}", agent.http_addr);
    let client = http();
    loop {
        if client
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
    }
    Ok((agent, started.elapsed()))
}

fn archive_size(db: &Path) -> Result<(i64, i64)> {
    let conn = rusqlite::Connection::open(db)?;
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(record)), 0) FROM archive",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// A simulated year at one fridge.
///
/// One piece: the simulated year's run, setup to figures.
async fn year(days: usize, archive_after_hours: i64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    if std::env::var_os("LARDER_FOOTPRINT_KEEP").is_some() {
        eprintln!("keeping the simulation's files in {}", dir.path().display());
    }
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let offset = Arc::new(AtomicI64::new(0));
    let clock = Clock::offset(offset.clone());
    for (name, role) in [("fridge-1", Role::Fridge), ("pos-1", Role::Pos)] {
        let key = larder_demo::seeded_key(7, name);
        enroll(&hub_url, name, role, &["fridge-1"], &key.public()).await?;
    }
    let (mut fridge, startup_day_one_empty) = start_fridge(dir.path(), &hub, &clock).await?;
    let pos_config = larder_demo::agent_config(
        &dir.path().join("pos-1"),
        "pos-1",
        Role::Pos,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    let pos = larder_agent::start_with_clock(
        pos_config,
        larder_demo::seeded_key(7, "pos-1"),
        clock.clone(),
    )
    .await?;
    let (mut fridge_url, pos_url) = (
        format!("http://{}", fridge.http_addr),
        format!("http://{}", pos.http_addr),
    );
    synced(&fridge_url, Duration::from_secs(30)).await?;
    synced(&pos_url, Duration::from_secs(30)).await?;

    let started = Instant::now();
    let mut day_one = Vec::new();
    let mut last_day = Vec::new();
    let mut startup_day_one = startup_day_one_empty;
    let mut doc_day_one = 0;
    for day in 0..days {
        let now = clock.now_ms();
        let timed = day == 0 || day + 1 == days;
        let units = UNITS_PER_DAY + if timed { PROBE_UNITS } else { 0 };
        refill_day(&fridge_url, day, units, now).await?;
        // The POS sells a unit once it has seen its refill.
        eventually(
            Duration::from_secs(60),
            "the POS to see the refill",
            || async {
                (available(&agent_stock(&pos_url, "fridge-1").await.ok()?, SKU) >= units as u64)
                    .then_some(())
            },
        )
        .await?;
        // The timed days measure the agent's own sale path, as the latency benchmark does:
        // the POS is cut off meanwhile, so the hub's and the fridge's work (on this same
        // machine and disk) does not compete with it. It syncs right after.
        if timed {
            cut_off(&pos).await?;
            // Start from a quiet disk: flush what the hub and the fridge (same machine, same
            // disk) left dirty, so their writeback does not land in the POS's fsyncs.
            rustix::fs::sync();
        }
        let lat = sell_day(&pos_url, day, timed).await?;
        pos.set_network(true);
        settle(&hub, &[&fridge, &pos]).await?;
        offset.fetch_add(DAY_MS, Ordering::Relaxed);
        compact_at(&hub, clock.now_ms() - archive_after_hours * 3_600_000).await?;
        settle(&hub, &[&fridge, &pos]).await?;
        if day == 0 {
            day_one = lat;
            doc_day_one = fridge.ledger_stats().await[0].document_bytes;
            fridge.shutdown().await;
            let (f, t) = start_fridge(dir.path(), &hub, &clock).await?;
            (fridge, startup_day_one) = (f, t);
            fridge_url = format!("http://{}", fridge.http_addr);
        } else if day + 1 == days {
            last_day = lat;
        }
        if (day + 1) % 30 == 0 {
            let s = &fridge.ledger_stats().await[0];
            eprintln!(
                "day {:>3}: epoch {}, live document {:.0} KiB ({} units, {} orders), {:.0} s elapsed",
                day + 1,
                s.epoch,
                s.document_bytes as f64 / 1024.0,
                s.units,
                s.orders,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let stats = fridge.ledger_stats().await[0].clone();
    let fridge_db = dir.path().join("fridge-1").join("agent.db");
    let fridge_archive = dir.path().join("fridge-1").join("archive.db");
    let (archived, archive_bytes) = archive_size(&fridge_archive)?;
    let (hub_archived, hub_archive_bytes) =
        archive_size(&dir.path().join("hub").join("region-demo.db"))?;
    let db_bytes = std::fs::metadata(&fridge_db)?.len();
    let archive_file_bytes = std::fs::metadata(&fridge_archive)?.len();
    fridge.shutdown().await;
    let (fridge, startup_end) = start_fridge(dir.path(), &hub, &clock).await?;
    let restarted = fridge.ledger_stats().await[0].document_bytes;
    // The same store as the release before versions left it (version 0, the same tables):
    // start-up then runs every migration.
    fridge.shutdown().await;
    rusqlite::Connection::open(&fridge_db)?.pragma_update(None, "user_version", 0)?;
    let (fridge, startup_migrating) = start_fridge(dir.path(), &hub, &clock).await?;
    let (p50_1, p99_1) = (percentile(&day_one, 0.5), percentile(&day_one, 0.99));
    let (p50_n, p99_n) = (percentile(&last_day, 0.5), percentile(&last_day, 0.99));
    println!(
        "simulated year at one fridge: {days} days x {UNITS_PER_DAY} units refilled and sold through one POS, \
         compaction daily of records finished over {archive_after_hours} h ago ({:.0} s wall time)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  live document at the end: {:.0} KiB (epoch {}, {} units, {} orders; day one: {:.0} KiB); goal at most 1 MB",
        stats.document_bytes as f64 / 1024.0,
        stats.epoch,
        stats.units,
        stats.orders,
        doc_day_one as f64 / 1024.0
    );
    println!(
        "  archive on the fridge: {archived} records, {:.1} MiB of JSON, archive.db {:.1} MiB; at the hub: {hub_archived} records, {:.1} MiB of JSON; the fridge's agent.db {:.1} MiB",
        mib(archive_bytes as u64),
        mib(archive_file_bytes),
        mib(hub_archive_bytes as u64),
        mib(db_bytes)
    );
    println!(
        "  start-up to serving HTTP: {:.1} ms at the end of the year (day one: {:.1} ms; reloaded document {:.0} KiB); goal at most 200 ms",
        ms(startup_end),
        ms(startup_day_one),
        restarted as f64 / 1024.0
    );
    println!(
        "  start-up of the year's store from version 0 (every migration run): {:.1} ms, {:.1} ms more than without; goal for the migration at most 2 s",
        ms(startup_migrating),
        ms(startup_migrating) - ms(startup_end)
    );
    println!(
        "  sale at the POS, one client, offline meanwhile, 2,000 sales each: day one p50 {:.2} ms p99 {:.2} ms; last day p50 {:.2} ms p99 {:.2} ms; p99 ratio {:.2}x (goal at most 1.2x)",
        ms(p50_1),
        ms(p99_1),
        ms(p50_n),
        ms(p99_n),
        ms(p99_n) / ms(p99_1)
    );
    fridge.shutdown().await;
    pos.shutdown().await;
    hub.shutdown().await;
    if std::env::var_os("LARDER_FOOTPRINT_KEEP").is_some() {
        let _ = dir.keep();
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map_or("all", String::as_str);
    let flag = |name: &str, default: i64| -> Result<i64> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args.get(i + 1).context("flag value")?.parse()?),
            None => Ok(default),
        }
    };
    let days = flag("--days", 365)? as usize;
    let archive_after_hours = flag("--archive-after-hours", 168)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match what {
            "memory" => memory().await,
            "year" => year(days, archive_after_hours).await,
            "all" => {
                memory().await?;
                year(days, archive_after_hours).await
            }
            other => bail!("unknown benchmark {other}: memory, year or all"),
        }
    })
}
