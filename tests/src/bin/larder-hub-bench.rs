//! Larder's hub benchmarks, run under the hub's allocator (jemalloc, as the `larder-hub`
//! binary; its child processes are this binary too):
//! - `orders`: the hub's order platform for a region of 1,000 fridges (placement, status
//!   reads, the refill plan);
//! - `ingest`: 1,000 connected devices each sending signed ledger-change envelopes, verified,
//!   merged and committed by the hub, beside the same broker's raw QoS 1 pass-through of
//!   same-size messages;
//! - `connected`: the hub's resident memory per connected, idle device at 10,000 devices (the
//!   hub in a child process of its own);
//! - `import`: `larder-hub import units` of 1,000,000 rows into a running hub (rows/s, and the
//!   importer's peak memory, in a child process of its own);
//! - `backup`: ingest from 1,000 devices in a region of 1,000 fridges with and without
//!   `larder-hub backup` copying the store meanwhile.
//!
//! Run with `cargo run --release -p larder-tests --bin larder-hub-bench -- all` (or one of
//! `orders`, `ingest`, `connected`, `import`, `backup`, `migrate`). Everything runs on loopback with real SQLite
//! files, real HTTP and real MQTT through the hub's embedded broker. The agent's benchmarks
//! are `larder-bench`.

#[path = "larder-hub-bench/backup.rs"]
mod backup;
#[path = "larder-hub-bench/connected.rs"]
mod connected;
#[path = "larder-hub-bench/migrate.rs"]
mod migrate;
#[path = "larder-hub-bench/orders.rs"]
mod orders;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use larder_shared::domain::Role;
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, RegionId};
use larder_tests::*;

use backup::backup;
use connected::{connected, connected_devices};
use migrate::migrate;
use orders::orders;

/// The hub's own allocator (`hub/src/main.rs`): the hub runs in this process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const INGEST_DEVICES: usize = 1_000;
const INGEST_PER_DEVICE: u64 = 20;
const INGEST_FRIDGES: u32 = 100;

/// The region of the raw pass-through's topics: one no hub owns.
fn raw_region() -> RegionId {
    RegionId::new("bench-raw").expect("id")
}

fn raw_device(i: usize) -> DeviceId {
    DeviceId::new(format!("raw-{i}")).expect("id")
}

/// Drives a client's connection; counts the publishes it receives into `received`.
/// Connections the simulated devices lost and made again (reported with the figures).
static RECONNECTS: AtomicUsize = AtomicUsize::new(0);

/// Polls a simulated device's event loop; a lost connection is made again, as an agent does,
/// with a fresh connect token (rumqttc then resends what was in flight).
fn drive(
    mut events: rumqttc::EventLoop,
    received: Option<Arc<AtomicUsize>>,
    device: (larder_shared::DeviceId, larder_shared::SecretKey),
) {
    tokio::spawn(async move {
        let mut attempt = 0u64;
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                    if let Some(r) = &received {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if RECONNECTS.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("{}: connection lost ({e}); connecting again", device.0);
                    }
                    attempt += 1;
                    let token = larder_tests::ingest::connect_token(
                        &device.0,
                        &device.1,
                        1_000_000 + attempt,
                    );
                    events
                        .mqtt_options
                        .set_credentials(device.0.as_str(), token);
                    // Reconnect delay, as the hub's poller has: the next poll connects again.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// Waits (polling, this is a measurement) until `count()` reaches `n`; the time it took.
async fn until_count(n: usize, started: Instant, count: impl Fn() -> usize) -> Result<Duration> {
    while count() < n {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {} of {n} after 10 minutes", count());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

/// Hub ingest beside the broker's raw pass-through, in one run.
///
/// One piece: a benchmark's run, setup to figures, as BENCHMARKS.md describes it.
async fn ingest() -> Result<()> {
    use larder_shared::{DeviceId, FridgeId, RegionId};
    println!(
        "## ingest: {INGEST_DEVICES} devices x {INGEST_PER_DEVICE} envelopes, {INGEST_FRIDGES} fridges\n"
    );
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), INGEST_FRIDGES).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let region = RegionId::new(larder_demo::REGION)?;
    let mut devices = Vec::with_capacity(INGEST_DEVICES);
    for i in 0..INGEST_DEVICES {
        let name = format!("pos-{i:05}");
        let fridge = format!("fridge-{}", i as u32 % INGEST_FRIDGES + 1);
        let key = larder_demo::seeded_key(11, &name);
        enroll(&hub_http, &name, Role::Pos, &[&fridge], &key.public()).await?;
        let id = DeviceId::new(name.as_str())?;
        let envs = larder_tests::ingest::envelopes(
            &region,
            &id,
            &FridgeId::new(fridge.as_str())?,
            &key,
            &hub.public_key,
            INGEST_PER_DEVICE,
        )?;
        devices.push((id, key, envs));
    }
    let size = devices[0].2[0].len();
    let total = INGEST_DEVICES * INGEST_PER_DEVICE as usize;
    let max = 512 * 1024;
    let mut clients = Vec::with_capacity(INGEST_DEVICES);
    for (i, (id, key, _)) in devices.iter().enumerate() {
        let (client, events) =
            larder_tests::ingest::connect(&hub.broker, id, key, i as u64, max).await?;
        drive(events, None, (id.clone(), key.clone()));
        clients.push(client);
    }
    // One more device takes every raw message.
    let sub_key = larder_demo::seeded_key(11, "bench-sub");
    enroll(
        &hub_http,
        "bench-sub",
        Role::Pos,
        &["fridge-1"],
        &sub_key.public(),
    )
    .await?;
    let (sub, sub_events) =
        larder_tests::ingest::connect(&hub.broker, &DeviceId::new("bench-sub")?, &sub_key, 0, max)
            .await?;
    let received = Arc::new(AtomicUsize::new(0));
    // Uplink topics of a region no hub owns: the broker keeps them as it keeps the hub's
    // uplinks (`larder/v1/+/d/+/up`), and the hub does not see them.
    sub.subscribe(
        topics::region_devices_filter(&raw_region(), DeviceTopic::Up),
        rumqttc::QoS::AtLeastOnce,
    )
    .await?;
    drive(
        sub_events,
        Some(received.clone()),
        (DeviceId::new("bench-sub")?, sub_key.clone()),
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // the subscription settles (a measurement, not a test)

    let payload = vec![0x5a_u8; size];
    let started = Instant::now();
    let mut sends = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, payload) = (c.clone(), payload.clone());
        sends.push(tokio::spawn(async move {
            for _ in 0..INGEST_PER_DEVICE {
                let _ = c
                    .publish(
                        topics::device(&raw_region(), &raw_device(i), DeviceTopic::Up),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .await;
            }
        }));
    }
    let raw = until_count(total, started, || received.load(Ordering::Relaxed)).await?;
    let raw_rate = total as f64 / raw.as_secs_f64();

    let accepted = || {
        hub.metrics
            .envelopes_accepted
            .get_or_create(&vec![("region", larder_demo::REGION.to_owned())])
            .get() as usize
    };
    let before = accepted();
    let commits_before = commit_stats(&hub_http).await?;
    let cpu_before = cpu_by_thread();
    let process_before = process_cpu();
    let started = Instant::now();
    for ((id, _, envs), c) in devices.iter().zip(&clients) {
        let (c, envs) = (c.clone(), envs.clone());
        let topic =
            larder_shared::topics::device(&region, id, larder_shared::topics::DeviceTopic::Up);
        sends.push(tokio::spawn(async move {
            for e in envs {
                let _ = c
                    .publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, e)
                    .await;
            }
        }));
    }
    let took = until_count(before + total, started, accepted).await?;
    let cpu = cpu_by_thread();
    let commits_after = commit_stats(&hub_http).await?;
    let rate = total as f64 / took.as_secs_f64();
    let rejected: u64 = ["bad_signature", "replay", "gap", "chain_broken"]
        .iter()
        .map(|r| hub.metrics.rejected_count(larder_demo::REGION, r))
        .sum();
    println!("envelope size: {size} bytes");
    println!(
        "raw QoS 1 pass-through: {raw_rate:.0} messages/s ({total} in {:.2} s)",
        raw.as_secs_f64()
    );
    println!(
        "hub ingest (verified, merged, committed): {rate:.0} envelopes/s ({total} in {:.2} s), {:.2}x raw; {rejected} rejected; {} connections lost and made again",
        took.as_secs_f64(),
        rate / raw_rate,
        RECONNECTS.load(Ordering::Relaxed)
    );
    let (commits, commit_secs) = (
        commits_after.0.saturating_sub(commits_before.0),
        commits_after.1 - commits_before.1,
    );
    println!(
        "region commits: {commits}, {:.0} envelopes and {:.2} ms each on average",
        total as f64 / commits.max(1) as f64,
        commit_secs * 1000.0 / commits.max(1) as f64
    );
    let process = process_cpu().saturating_sub(process_before) as f64 / USER_HZ;
    let mut used: Vec<(String, f64)> = cpu
        .into_iter()
        .map(|(name, ticks)| {
            let spent = ticks.saturating_sub(cpu_before.get(&name).copied().unwrap_or(0));
            (name, spent as f64 / USER_HZ)
        })
        .filter(|(_, secs)| *secs > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let listed: f64 = used.iter().map(|(_, secs)| secs).sum();
    let threads: Vec<String> = used
        .iter()
        .map(|(name, secs)| format!("{name} {secs:.2}"))
        .collect();
    println!(
        "CPU seconds during ingest, by thread: {}, threads that ended meanwhile {:.2} ({:.2} cores busy on average)",
        threads.join(", "),
        (process - listed).max(0.0),
        process.max(listed) / took.as_secs_f64()
    );
    println!();
    hub.shutdown().await;
    Ok(())
}

/// The hub's region commits so far: how many, and the seconds they took in all (from the
/// `commit_seconds` histogram at `/metrics`).
async fn commit_stats(hub_http: &str) -> Result<(u64, f64)> {
    let text = larder_tests::metrics_text(hub_http).await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("larder_hub_commit_seconds_count ") as u64,
        value("larder_hub_commit_seconds_sum "),
    ))
}

/// The kernel's clock ticks per second in `/proc` times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU time (user and system, in `USER_HZ` ticks) of this process's threads, summed by thread
/// name (as the kernel keeps it: its first 15 bytes). Threads that have ended are not counted;
/// [`process_cpu`] counts them.
fn cpu_by_thread() -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        // After the name in parentheses: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        *by_name.entry(name.trim().to_owned()).or_insert(0) += stat_ticks(&fields);
    }
    by_name
}

/// CPU time (user and system, in `USER_HZ` ticks) of this process, ended threads included.
fn process_cpu() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    stat_ticks(&fields)
}

/// utime plus stime from the fields of a `stat` file after the name (state is the first).
fn stat_ticks(fields: &[&str]) -> u64 {
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    ticks(11) + ticks(12)
}

const IMPORT_ROWS: usize = 1_000_000;
const IMPORT_FRIDGES: u32 = 100;

/// The importer's peak resident memory, read from /proc while it runs (the high-water mark
/// only grows, so the last reading before it exits is its peak to within one interval).
fn peak_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `larder-hub import units` of [`IMPORT_ROWS`] rows over [`IMPORT_FRIDGES`] fridges.
async fn import() -> Result<()> {
    println!("## import: {IMPORT_ROWS} unit rows, {IMPORT_FRIDGES} fridges\n");
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), IMPORT_FRIDGES).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let file = dir.path().join("units.csv");
    {
        use std::io::Write;
        let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(72);
        let skus = [
            "lasagna",
            "salad-quinoa",
            "curry-veg",
            "soup-lentil",
            "wrap-chicken",
        ];
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
        writeln!(w, "unit_id,fridge_id,sku,expires_at,batch")?;
        for i in 0..IMPORT_ROWS {
            let fridge = i as u32 % IMPORT_FRIDGES + 1;
            writeln!(
                w,
                "imp-{i:07},fridge-{fridge},{},{expires},b{}",
                skus[i % skus.len()],
                i / 10_000
            )?;
        }
        w.flush()?;
    }
    let size = std::fs::metadata(&file)?.len();
    println!("file: {:.1} MB", size as f64 / 1e6);
    for run in ["first", "again (every row unchanged)"] {
        let started = Instant::now();
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["__import", &file.display().to_string(), &hub_http])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut peak = 0;
        // Sampling, not synchronisation: the importer runs for seconds; its peak is read
        // every 50 ms until it exits.
        while child.try_wait()?.is_none() {
            peak = peak.max(peak_kib(child.id()).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = child.wait_with_output()?;
        let elapsed = started.elapsed();
        if !out.status.success() {
            bail!(
                "the importer failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        println!(
            "{run}: {:.0} rows/s ({:.1} s); importer peak RSS {:.1} MB; {}",
            IMPORT_ROWS as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            peak as f64 / 1024.0,
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let stock = hub_stock(&hub_http, "fridge-1").await?;
    let per_fridge = IMPORT_ROWS / IMPORT_FRIDGES as usize;
    let on_hand: u64 = [
        "lasagna",
        "salad-quinoa",
        "curry-veg",
        "soup-lentil",
        "wrap-chicken",
    ]
    .iter()
    .map(|s| available(&stock, s))
    .sum();
    if on_hand != per_fridge as u64 {
        bail!("fridge-1 holds {on_hand} units, expected {per_fridge}");
    }
    println!("fridge-1 holds its {per_fridge} units\n");
    hub.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if matches!(which.as_str(), "-h" | "--help" | "help") {
        println!(
            "Larder's hub benchmarks (build with --release)\n\n\
             usage: larder-hub-bench [orders|ingest|connected|import|backup|migrate|all]   (default: all)\n\n\
             orders     the order platform of a region of 1,000 fridges\n\
             ingest     1,000 devices sending signed changes, beside the broker's raw rate\n\
             connected  hub memory per idle device (LARDER_BENCH_DEVICES, default 10000)\n\
             import     larder-hub import units of 1,000,000 rows\n\
             backup     ingest with and without larder-hub backup running\n\
             migrate    the region store's migrations from version 0, small and grown\n\n\
             The agent's benchmarks are in larder-bench; figures in docs/BENCHMARKS.md."
        );
        return Ok(());
    }
    bench_start("Larder's hub benchmarks", &which);
    match which.as_str() {
        "orders" => orders().await,
        "import" => import().await,
        "ingest" => ingest().await,
        "backup" => backup().await,
        "migrate" => migrate().await,
        "connected" => connected().await,
        // A hub in a process of its own, for `connected`: prints its addresses, runs until
        // killed.
        "__hub" => {
            let dir = std::env::args().nth(2).unwrap_or_default();
            // Room for the devices beside the hub's own connection.
            let hub = start_hub_with(std::path::Path::new(&dir), 1, |c| {
                c.mqtt.connections_max = connected_devices() + 100;
            })
            .await?;
            println!("hub http://{} broker {}", hub.http_addr, hub.broker);
            std::future::pending::<()>().await;
            Ok(())
        }
        // The importer itself, run by `import` as a child process so its memory is its own.
        "__import" => {
            let mut a = std::env::args().skip(2);
            let (file, hub, batch) = (
                a.next().unwrap_or_default(),
                a.next().unwrap_or_default(),
                a.next()
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(larder_hub::import::BATCH_ROWS_DEFAULT),
            );
            let summary = larder_hub::import::run(&larder_hub::import::Options {
                kind: larder_hub::import::Kind::Units,
                file: file.into(),
                region: larder_demo::REGION.into(),
                hub,
                token: ADMIN_TOKEN.into(),
                report: None,
                batch_rows: batch,
                progress: false,
            })
            .await?;
            println!("{summary}");
            if summary.accepted + summary.unchanged != summary.rows {
                bail!("rows unaccounted for: {summary}");
            }
            Ok(())
        }
        "all" => {
            orders().await?;
            ingest().await?;
            connected().await?;
            import().await?;
            backup().await?;
            migrate().await
        }
        other => {
            bail!(
                "unknown benchmark {other:?}: orders, ingest, connected, import, backup, migrate or all (the agent's are in larder-bench)"
            )
        }
    }
}
