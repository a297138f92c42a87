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
//!   importer's peak memory, in a child process of its own).
//!
//! Run with `cargo run --release -p larder-tests --bin larder-hub-bench -- all` (or one of
//! `orders`, `ingest`, `connected`, `import`). Everything runs on loopback with real SQLite
//! files, real HTTP and real MQTT through the hub's embedded broker. The agent's benchmarks
//! are `larder-bench`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use larder_shared::domain::Role;
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, RegionId};
use larder_tests::*;

/// The hub's own allocator (`hub/src/main.rs`): the hub runs in this process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ORDER_FRIDGES: u32 = 1_000;
const ORDER_SKUS: usize = 50;
const UNITS_PER_SKU: usize = 4;
const ORDERS_PLACED: usize = 5_000;
const STATUS_READS: usize = 20_000;
const PLANS: usize = 20;

/// The hub's order platform for a region of 1,000 fridges with 50 skus: app order placement,
/// order status reads and the refill plan, over HTTP. The region store is seeded before the
/// hub starts as if every fridge had enrolled and sent one refill of 4 units per sku (200,000
/// units), and every fridge is marked online, so orders take the ordinary (non-escrow) path.
async fn orders() -> Result<()> {
    use larder_shared::catalog::CatalogItem;
    let dir = tempfile::tempdir_in(".")?;
    let hub_dir = dir.path().join("hub");
    let items: Vec<CatalogItem> = (0..ORDER_SKUS)
        .map(|i| CatalogItem {
            sku: larder_shared::Sku::new(format!("meal-{i:02}")).expect("sku"),
            name: format!("Meal {i}"),
            price_minor: 500 + i as i64,
            allergens: vec![],
            shelf_life_hours: 72,
        })
        .collect();
    let catalog_items = items.clone();
    let tweak = move |c: &mut larder_hub::config::HubConfig| {
        c.regions[0].catalog = Some(larder_hub::config::CatalogConfig {
            currency: "EUR".into(),
            items: catalog_items.clone(),
        });
        c.orders.payment_provider = larder_hub::config::PaymentProviderMode::External;
    };
    let seeded = Instant::now();
    {
        let mut config = larder_demo::hub_config(
            &hub_dir,
            1883,
            ORDER_FRIDGES,
            larder_hub::http::token_sha256(ADMIN_TOKEN),
        )?;
        tweak(&mut config);
        std::fs::create_dir_all(&hub_dir)?;
        let region = config.regions[0].id.clone();
        let mut store = larder_hub::store::RegionStore::open(&config.region_db(&region))?;
        let now = larder_runtime::Clock::system().now_ms();
        let key = larder_demo::seeded_key(7, "bench").public();
        let mut batch = larder_hub::store::RegionBatch::default();
        for f in 1..=ORDER_FRIDGES {
            let fridge = larder_shared::FridgeId::new(format!("fridge-{f}"))?;
            let device = larder_shared::DeviceId::new(format!("fridge-{f}"))?;
            let mut ledger = larder_shared::ledger::Ledger::new(
                fridge.clone(),
                larder_shared::ledger::actor_for(&device),
            )?;
            let units = items
                .iter()
                .flat_map(|item| {
                    (0..UNITS_PER_SKU).map(move |n| larder_shared::domain::RefillUnit {
                        unit_id: larder_shared::UnitId::new(format!("f{f}-{}-{n}", item.sku))
                            .expect("unit"),
                        sku: item.sku.clone(),
                        expires_at_ms: now + 3 * 86_400_000,
                        batch: None,
                    })
                })
                .collect();
            let change = ledger.refill(
                &larder_shared::domain::Refill {
                    units,
                    order_id: None,
                },
                &device,
                now,
            )?;
            batch
                .units
                .extend(change.units.into_iter().map(|u| (fridge.clone(), u)));
            use sha2::Digest;
            for bytes in change.changes {
                batch.changes.push(larder_hub::store::StoredChange {
                    ledger: fridge.clone(),
                    author: device.clone(),
                    epoch: 0,
                    hash: sha2::Sha256::digest(&bytes).into(),
                    bytes,
                });
            }
            batch.enroll.push(larder_hub::store::DeviceRecord {
                device_id: device,
                role: Role::Fridge,
                site: None,
                fridges: vec![fridge],
                public_key: key,
                enrolled_at_ms: now,
                revoked_at_ms: None,
                last_seen_ms: Some(now),
            });
            if f % 100 == 0 {
                store.commit(&std::mem::take(&mut batch))?;
            }
        }
    }
    println!("## The hub's orders for {ORDER_FRIDGES} fridges x {ORDER_SKUS} skus");
    println!(
        "seeded {} units in {:.1} s",
        ORDER_FRIDGES as usize * ORDER_SKUS * UNITS_PER_SKU,
        seeded.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let hub = start_hub_with(&hub_dir, ORDER_FRIDGES, tweak).await?;
    println!(
        "hub started (1,000 ledgers loaded) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for h in hub.regions.values() {
        let mut p = h.presence.write().expect("presence");
        for f in 1..=ORDER_FRIDGES {
            p.insert(larder_shared::DeviceId::new(format!("fridge-{f}"))?, true);
        }
    }
    let base = format!(
        "http://{}/v1/regions/{}",
        hub.http_addr,
        larder_demo::REGION
    );
    let client = http();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut placed = Vec::with_capacity(ORDERS_PLACED);
    let mut samples = Vec::with_capacity(ORDERS_PLACED);
    for i in 0..ORDERS_PLACED + 100 {
        let f = 1 + next(u64::from(ORDER_FRIDGES));
        let sku = next(ORDER_SKUS as u64);
        let body = serde_json::json!({"customer_id": format!("c-{i}"), "fridge_id": format!("fridge-{f}"),
            "lines": [{"sku": format!("meal-{sku:02}"), "quantity": 1}]});
        let start = Instant::now();
        let resp = client
            .post(format!("{base}/orders"))
            .bearer_auth(ADMIN_TOKEN)
            .header("Idempotency-Key", format!("bench-{i}"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let answer: serde_json::Value = resp.json().await?;
        let took = start.elapsed();
        if status != 201 {
            bail!("placing an order: {status} {answer}");
        }
        // The first hundred warm the connection and the caches.
        if i >= 100 {
            samples.push(took);
            placed.push(answer["order_id"].as_str().unwrap_or_default().to_owned());
        }
    }
    summary(
        "app order placement (HTTP, durable, replicated to the fridge's stream)",
        &mut samples,
        5.0,
    );
    let mut samples = Vec::with_capacity(STATUS_READS);
    for _ in 0..STATUS_READS {
        let id = &placed[next(placed.len() as u64) as usize];
        let start = Instant::now();
        let resp = client
            .get(format!("{base}/orders/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let ok = resp.status().is_success();
        let _ = resp.bytes().await?;
        samples.push(start.elapsed());
        if !ok {
            bail!("reading {id} failed");
        }
    }
    summary("order status read (HTTP)", &mut samples, 1.0);
    let mut http_samples = Vec::with_capacity(PLANS);
    let mut rows = 0;
    for _ in 0..PLANS {
        let start = Instant::now();
        let plan: serde_json::Value = client
            .get(format!("{base}/refill-plan"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        http_samples.push(start.elapsed());
        rows = plan["rows"].as_array().map_or(0, Vec::len);
    }
    let region = hub.regions.values().next().expect("a region").clone();
    let mut compute = Vec::with_capacity(PLANS);
    let mut counts = Vec::with_capacity(PLANS);
    let skus: Vec<String> = items.iter().map(|i| i.sku.to_string()).collect();
    // Tomorrow's plan: the next delivery is fixed while the kitchen asks again and again.
    let next_delivery = larder_runtime::Clock::system().now_ms() + 86_400_000;
    for _ in 0..PLANS {
        let start = Instant::now();
        let now = larder_runtime::Clock::system().now_ms();
        let (reply, rx) = tokio::sync::oneshot::channel();
        region
            .tx
            .send(larder_hub::region::RegionCommand::StockCounts {
                now_ms: now,
                before_ms: next_delivery,
                reply,
            })
            .await?;
        let stock = rx.await?;
        counts.push(start.elapsed());
        let subs = region.reads.subscriptions()?;
        let date = jiff::Timestamp::now()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .date();
        let scheduled = larder_hub::subscriptions::scheduled_on(&subs, &Default::default(), date);
        let plan =
            larder_hub::subscriptions::refill_plan(&region.config, &skus, &stock, &scheduled);
        compute.push(start.elapsed());
        assert_eq!(plan.len(), rows);
    }
    println!("refill plan: {rows} rows (fridge x sku)");
    summary(
        "  of which the stock counts from the region writer",
        &mut counts,
        50.0,
    );
    summary(
        "refill plan, computed (stock counts from the region writer + schedules + plan)",
        &mut compute,
        50.0,
    );
    summary(
        &format!("refill plan over HTTP (with its {rows}-row JSON)"),
        &mut http_samples,
        50.0,
    );
    println!();
    hub.shutdown().await;
    Ok(())
}

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
/// `LARDER_BENCH_DEVICES` overrides it.
const CONNECTED_DEVICES: usize = 10_000;

fn connected_devices() -> usize {
    std::env::var("LARDER_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CONNECTED_DEVICES)
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

/// The hub's resident memory per connected, idle device.
async fn connected() -> Result<()> {
    let devices = connected_devices();
    use larder_shared::topics::{self, DeviceTopic};
    use larder_shared::{DeviceId, RegionId};
    use std::io::BufRead;
    println!("## connected: {devices} idle devices, the hub in its own process\n");
    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["__hub", &dir.path().join("hub").display().to_string()])
        .env("RUST_LOG", "warn,rumqttd=off")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let guard = scopeguard_kill(child.id());
    let mut line = String::new();
    std::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?,
    )
    .read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let (hub_http, broker) = match words.as_slice() {
        ["hub", url, "broker", broker] => (url.to_string(), broker.to_string()),
        _ => bail!("the hub said {line:?}"),
    };
    let pid = child.id();
    let rss_kib = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    };
    let region = RegionId::new(larder_demo::REGION)?;
    let mut keys = Vec::with_capacity(devices);
    for i in 0..devices {
        let name = format!("idle-{i:05}");
        let key = larder_demo::seeded_key(13, &name);
        enroll(&hub_http, &name, Role::Pos, &["fridge-1"], &key.public()).await?;
        keys.push((DeviceId::new(name.as_str())?, key));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // settle before the baseline
    let before = rss_kib();
    let started = Instant::now();
    let mut clients = Vec::with_capacity(devices);
    for (i, (id, key)) in keys.iter().enumerate() {
        // As an agent does: its down topic and the catalog, and a retained, signed `online`.
        let token = larder_tests::ingest::connect_token(id, key, i as u64);
        let (client, events) =
            larder_tests::ingest::connect_with_token(&broker, id, &token, 512 * 1024, true).await?;
        client
            .subscribe(
                topics::device(&region, id, DeviceTopic::Down),
                rumqttc::QoS::AtLeastOnce,
            )
            .await?;
        client
            .subscribe(topics::catalog(&region), rumqttc::QoS::AtLeastOnce)
            .await?;
        client
            .publish(
                topics::device(&region, id, DeviceTopic::Presence),
                rumqttc::QoS::AtLeastOnce,
                true,
                larder_tests::ingest::online_presence(&region, id, key, &token)?,
            )
            .await?;
        drive(events, None, (id.clone(), key.clone()));
        clients.push(client);
    }
    let online = || async {
        let text = metrics_text(&hub_http).await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("larder_hub_devices_online{region=\"demo\"} "))?
            .trim()
            .parse::<usize>()
            .ok()
    };
    // Polling the hub's gauge is the measurement: how long until every device is online.
    while online().await.unwrap_or(0) < devices {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {:?} devices online after 10 minutes", online().await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connected_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await; // idle: keepalives only
    let after = rss_kib();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / devices as f64;
    println!(
        "hub RSS {:.1} MB before, {:.1} MB with {devices} devices online (all online in {:.1} s): {:.1} KiB per device",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        connected_in.as_secs_f64(),
        per / 1024.0
    );
    println!();
    drop(clients);
    drop(guard);
    let _ = child.wait();
    Ok(())
}

/// Kills the child process `pid` when dropped (also when the benchmark fails).
fn scopeguard_kill(pid: u32) -> impl Drop {
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    Kill(pid)
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
             usage: larder-hub-bench [orders|ingest|connected|import|all]   (default: all)\n\n\
             orders     the order platform of a region of 1,000 fridges\n\
             ingest     1,000 devices sending signed changes, beside the broker's raw rate\n\
             connected  hub memory per idle device (LARDER_BENCH_DEVICES, default 10000)\n\
             import     larder-hub import units of 1,000,000 rows\n\n\
             The agent's benchmarks are in larder-bench; figures in docs/BENCHMARKS.md."
        );
        return Ok(());
    }
    bench_start("Larder's hub benchmarks", &which);
    match which.as_str() {
        "orders" => orders().await,
        "import" => import().await,
        "ingest" => ingest().await,
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
            import().await
        }
        other => {
            bail!(
                "unknown benchmark {other:?}: orders, ingest, connected, import or all (the agent's are in larder-bench)"
            )
        }
    }
}
