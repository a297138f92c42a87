//! The demo's fleet: a seeded schedule of refills, sales, pickups and network cuts over the
//! agents' HTTP APIs, a summary every few seconds, and the final check.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use larder_agent::AgentHandle;
use larder_hub::HubHandle;
use larder_hub::http::{EnrollBody, enroll_device};
use larder_shared::domain::Role;
use larder_shared::{DeviceId, FridgeId, RegionId};
use serde_json::{Value, json};

use crate::{REGION, agent_config, demo_catalog, seeded_key, start_hub};

/// Options of `larder-hub demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Fridge agents to simulate.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub fridges: u32,
    /// POS agents to simulate.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=50))]
    pub pos: u32,
    /// How long to run before the final check; 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seed of the schedule (and of the device keys).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

struct Device {
    name: String,
    role: Role,
    fridges: Vec<FridgeId>,
    url: String,
    agent: AgentHandle,
    rejoin_at: Option<Instant>,
}

/// A small deterministic generator (xorshift64*), so a seed replays the same schedule.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

#[derive(Debug, Default)]
struct Tally {
    sales_ok: u64,
    sales_refused: u64,
    refills: u64,
    pickups: u64,
    partitions: u64,
    acked_orders: Vec<String>,
    errors: u64,
}

/// The customer whose token the demo mints.
pub const DEMO_CUSTOMER: &str = "alice";

/// Runs the demo; `Ok(false)` if the final check failed.
///
/// One piece: the demo's script from start to final check, read as the README tells it.
pub async fn run(opts: DemoOptions) -> anyhow::Result<bool> {
    let tmp = tempfile::tempdir().context("creating a temp dir")?;
    let mut token_bytes = [0u8; 16];
    getrandom::fill(&mut token_bytes).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let admin_token = hex::encode(token_bytes);
    // Customers log in with a stand-in identity provider; the demo mints one customer's token.
    let idp = crate::idp::Idp::start(crate::idp::KeyKind::Ed25519).await?;
    let customer_token = idp.token_for(DEMO_CUSTOMER, 12 * 3600)?;
    let hub = start_hub(
        &tmp.path().join("hub"),
        opts.fridges,
        &larder_hub::http::token_sha256(&admin_token),
        seeded_key(opts.seed, "hub"),
        Some(idp.customers_config()),
    )
    .await?;
    let region_id = RegionId::new(REGION)?;
    let region = hub.regions.get(&region_id).context("demo region")?.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    let mut devices = Vec::new();
    for i in 1..=opts.fridges {
        let fridge = FridgeId::new(format!("fridge-{i}"))?;
        devices.push((format!("fridge-{i}"), Role::Fridge, vec![fridge]));
    }
    for j in 1..=opts.pos {
        let fridges = (1..=opts.fridges)
            .filter(|i| (i - 1) % opts.pos.max(1) == j - 1)
            .map(|i| FridgeId::new(format!("fridge-{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let fridges = if fridges.is_empty() {
            vec![FridgeId::new(format!(
                "fridge-{}",
                (j - 1) % opts.fridges + 1
            ))?]
        } else {
            fridges
        };
        devices.push((format!("pos-{j}"), Role::Pos, fridges));
    }
    let mut fleet = Vec::new();
    for (name, role, fridges) in devices {
        let key = seeded_key(opts.seed, &name);
        enroll_device(
            &region,
            EnrollBody {
                device_id: DeviceId::new(name.as_str())?,
                role,
                site: None,
                fridges: fridges.clone(),
                public_key: key.public(),
            },
            None,
        )
        .await
        .with_context(|| format!("enrolling {name}"))?;
        let config = agent_config(
            &tmp.path().join(&name),
            &name,
            role,
            &fridges,
            hub.public_key,
            &hub.broker,
        )?;
        let agent = larder_agent::start(config, key)
            .await
            .with_context(|| format!("starting {name}"))?;
        fleet.push(Device {
            url: format!("http://{}", agent.http_addr),
            name,
            role,
            fridges,
            agent,
            rejoin_at: None,
        });
    }

    println!("Larder demo (seed {})", opts.seed);
    println!("  hub          http://{}", hub.http_addr);
    println!("  broker       mqtt://{}", hub.broker);
    println!("  admin token  {admin_token}");
    println!(
        "  dashboard    http://{}/#token={admin_token}&region={REGION}",
        hub.http_addr
    );
    println!(
        "  try          curl -H 'Authorization: Bearer {admin_token}' http://{}/v1/regions/{REGION}/fridges",
        hub.http_addr
    );
    println!(
        "  customer     {DEMO_CUSTOMER} (identity provider {})",
        idp.issuer
    );
    println!("  customer token {customer_token}");
    println!(
        "  shop         curl -H 'Authorization: Bearer {customer_token}' http://{}/v1/regions/{REGION}/shop/fridges",
        hub.http_addr
    );
    for d in &fleet {
        let fridges: Vec<&str> = d.fridges.iter().map(|f| f.as_str()).collect();
        println!(
            "  {:<6} {:<10} {}  (fridges {})",
            d.role.as_str(),
            d.name,
            d.url,
            fridges.join(", ")
        );
    }
    println!();

    wait_until(Duration::from_secs(20), || {
        fleet.iter().all(|d| {
            d.agent
                .shared
                .catalog_version
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        })
    })
    .await;

    let mut rng = Rng::new(opts.seed);
    let mut tally = Tally::default();
    let mut unit_counter = 0u64;
    let started = Instant::now();
    let deadline = (opts.seconds > 0).then(|| started + Duration::from_secs(opts.seconds));
    let mut next_summary = started + Duration::from_secs(3);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // Stock the fridges first.
    for d in fleet.iter().filter(|d| d.role == Role::Fridge) {
        refill(&http, d, &mut rng, &mut unit_counter, 12, &mut tally).await;
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => { println!("\ninterrupted: healing partitions and checking"); break; }
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        step(&http, &mut fleet, &mut rng, &mut unit_counter, &mut tally).await;
        if now >= next_summary {
            next_summary = now + Duration::from_secs(3);
            let converged = converged(&hub, &fleet).await;
            summary(started, &fleet, &tally, converged);
        }
    }

    for d in &mut fleet {
        d.agent.set_network(true);
        d.rejoin_at = None;
    }
    println!("final check: waiting for every replica to converge…");
    let check_started = Instant::now();
    let mut ok_converged = false;
    while check_started.elapsed() < Duration::from_secs(60) {
        if fleet.iter().all(|d| d.agent.pending_changes() == 0) && converged(&hub, &fleet).await {
            ok_converged = true;
            break;
        }
        // Polling the fleet for convergence in the demo's final check.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reads = region.reads.clone();
    let orders = tally.acked_orders.clone();
    let missing = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut missing = Vec::new();
        for o in orders {
            if !reads.order_exists(&o)? {
                missing.push(o);
            }
        }
        Ok(missing)
    })
    .await??;
    summary(started, &fleet, &tally, ok_converged);
    let ok = ok_converged && missing.is_empty();
    if ok {
        println!(
            "OK: {} replicas converged; all {} acknowledged sales reached the hub exactly once",
            fleet.len() + 1,
            tally.acked_orders.len()
        );
    } else {
        println!(
            "FAILED: converged = {ok_converged}; acknowledged sales missing at the hub: {}",
            missing.len()
        );
        for m in missing.iter().take(20) {
            println!("  missing {m}");
        }
    }
    for d in fleet {
        d.agent.shutdown().await;
    }
    hub.shutdown().await;
    Ok(ok)
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() && start.elapsed() < limit {
        // Waiting for the fleet to connect before the schedule starts.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn summary(started: Instant, fleet: &[Device], t: &Tally, converged: bool) {
    let online = fleet
        .iter()
        .filter(|d| {
            d.agent
                .shared
                .online
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .count();
    let pending: u64 = fleet.iter().map(|d| d.agent.pending_changes()).sum();
    println!(
        "[{:>4}s] sales {} (refused {}), refills {}, pickups {}, partitions {}, devices online {}/{}, pending changes {}, converged {}",
        started.elapsed().as_secs(),
        t.sales_ok,
        t.sales_refused,
        t.refills,
        t.pickups,
        t.partitions,
        online,
        fleet.len(),
        pending,
        if converged { "yes" } else { "not yet" }
    );
}

/// Whether every replica of every ledger (hub, fridge, POS) has the same state digest.
async fn converged(hub: &HubHandle, fleet: &[Device]) -> bool {
    let Some(region) = RegionId::new(REGION).ok().and_then(|r| hub.regions.get(&r)) else {
        return false;
    };
    let mut digests: BTreeMap<FridgeId, Vec<String>> = BTreeMap::new();
    for d in fleet {
        for ld in d.agent.digests().await {
            digests
                .entry(ld.fridge_id)
                .or_default()
                .push(ld.state_digest);
        }
    }
    for (fridge, list) in &mut digests {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if region
            .tx
            .send(larder_hub::region::RegionCommand::Digest {
                fridge: fridge.clone(),
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        match rx.await {
            Ok(Some(s)) => list.push(s.state_digest),
            _ => return false,
        }
    }
    digests.values().all(|l| l.windows(2).all(|w| w[0] == w[1]))
}

async fn post(http: &reqwest::Client, url: &str, key: String, body: Value) -> Option<(u16, Value)> {
    let resp = http
        .post(url)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.unwrap_or(Value::Null)))
}

async fn refill(
    http: &reqwest::Client,
    d: &Device,
    rng: &mut Rng,
    counter: &mut u64,
    n: u64,
    t: &mut Tally,
) {
    let catalog = demo_catalog();
    // The fleet's own clock, as a device's firmware would read it.
    let now = jiff::Timestamp::from_millisecond(larder_runtime::Clock::system().wall_ms())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let units: Vec<Value> = (0..n)
        .map(|_| {
            *counter += 1;
            let item = &catalog.items[rng.below(catalog.items.len() as u64) as usize];
            let hours = 24 + rng.below(72) as i64;
            let expires = now.checked_add(jiff::SignedDuration::from_hours(hours)).unwrap_or(now);
            json!({"unit_id": format!("u{}-{}", d.name, counter), "sku": item.sku, "expires_at": expires.to_string()})
        })
        .collect();
    let body = json!({"fridge_id": d.fridges[0], "units": units});
    match post(
        http,
        &format!("{}/v1/refills", d.url),
        format!("refill-{}-{counter}", d.name),
        body,
    )
    .await
    {
        Some((201, _)) => t.refills += 1,
        _ => t.errors += 1,
    }
}

async fn available_unit(
    http: &reqwest::Client,
    d: &Device,
    fridge: &FridgeId,
    rng: &mut Rng,
) -> Option<(String, String)> {
    let stock: Value = http
        .get(format!("{}/v1/stock?fridge_id={fridge}", d.url))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let units: Vec<&Value> = stock["units"]
        .as_array()?
        .iter()
        .filter(|u| u["state"] == "available")
        .collect();
    if units.is_empty() {
        return None;
    }
    let u = units[rng.below(units.len() as u64) as usize];
    Some((
        u["unit_id"].as_str()?.to_owned(),
        u["sku"].as_str()?.to_owned(),
    ))
}

async fn sell(http: &reqwest::Client, d: &Device, rng: &mut Rng, t: &mut Tally) {
    let fridge = d.fridges[rng.below(d.fridges.len() as u64) as usize].clone();
    let Some((unit, sku)) = available_unit(http, d, &fridge, rng).await else {
        return;
    };
    let price = demo_catalog()
        .items
        .iter()
        .find(|i| i.sku.as_str() == sku)
        .map_or(0, |i| i.price_minor);
    let method = if d.role == Role::Fridge {
        "fridge_card"
    } else if rng.below(3) == 0 {
        "cash"
    } else {
        "card"
    };
    let body = json!({
        "fridge_id": fridge,
        "lines": [{"sku": sku, "unit_id": unit, "quantity": 1}],
        "payment": {"method": method, "amount_minor": price, "currency": "EUR"},
    });
    match post(
        http,
        &format!("{}/v1/sales", d.url),
        format!("sale-{}-{}", d.name, rng.next_u64()),
        body,
    )
    .await
    {
        Some((201, v)) => {
            t.sales_ok += 1;
            if let Some(o) = v["order_id"].as_str() {
                t.acked_orders.push(o.to_owned());
            }
        }
        Some((409, _)) => t.sales_refused += 1,
        _ => t.errors += 1,
    }
}

async fn pickup(http: &reqwest::Client, d: &Device, rng: &mut Rng, t: &mut Tally) {
    let Some(fridge) = d.fridges.first() else {
        return;
    };
    let Ok(resp) = http
        .get(format!("{}/v1/stock?fridge_id={fridge}", d.url))
        .send()
        .await
    else {
        return;
    };
    let Ok(stock) = resp.json::<Value>().await else {
        return;
    };
    let sold: Vec<String> = stock["units"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|u| u["state"] == "sold")
                .filter_map(|u| u["unit_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if sold.is_empty() {
        return;
    }
    let taken = &sold[rng.below(sold.len() as u64) as usize];
    let session = format!("door-{}", rng.next_u64());
    let body = json!({"fridge_id": fridge, "session_id": session, "units_taken": [taken]});
    match post(
        http,
        &format!("{}/v1/door-sessions", d.url),
        session.clone(),
        body,
    )
    .await
    {
        Some((201, _)) => t.pickups += 1,
        Some((409, _)) => {}
        _ => t.errors += 1,
    }
}

async fn step(
    http: &reqwest::Client,
    fleet: &mut [Device],
    rng: &mut Rng,
    counter: &mut u64,
    t: &mut Tally,
) {
    let now = Instant::now();
    for d in fleet.iter_mut() {
        if d.rejoin_at.is_some_and(|at| now >= at) {
            d.agent.set_network(true);
            d.rejoin_at = None;
        }
    }
    let i = rng.below(fleet.len() as u64) as usize;
    let roll = rng.below(100);
    let d = &fleet[i];
    match (d.role, roll) {
        (Role::Fridge, 0..=7) => {
            let n = 1 + rng.below(6);
            refill(http, d, rng, counter, n, t).await
        }
        (Role::Fridge, 8..=27) => sell(http, d, rng, t).await,
        (Role::Fridge, 28..=40) => pickup(http, d, rng, t).await,
        (Role::Pos, 0..=2) if d.rejoin_at.is_none() => {
            let d = &mut fleet[i];
            d.agent.set_network(false);
            d.rejoin_at = Some(now + Duration::from_millis(2_000 + rng.below(6_000)));
            t.partitions += 1;
        }
        (Role::Pos, 3..=60) => sell(http, d, rng, t).await,
        _ => {}
    }
}
