//! Helpers for Larder's end-to-end tests: start hubs and agents in-process or as real processes,
//! enroll devices, and talk to them over real HTTP. Nothing here fakes a component.

pub mod fixtures;
pub mod flaky;
pub mod fuzz;
pub mod ingest;
pub mod mosquitto;
#[cfg(feature = "power-cut")]
pub mod powercut;
mod process;
pub mod protocol_sim;
pub mod sim;

pub use process::Process;

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use larder_agent::AgentHandle;
use larder_demo::{REGION, agent_config, seeded_key};
use larder_hub::HubHandle;
use larder_shared::domain::Role;
use larder_shared::{DeviceId, FridgeId, PublicKey, SecretKey};
use serde_json::{Value, json};

/// Small batches in tests, so that every sync spans many envelopes.
pub const TEST_BATCH_ENTRIES_MAX: u64 = 16;

/// The admin token every test hub accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Waits until `check` returns `Some`, polling an observable condition until `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        // Below the servers' idle keep-alive limit (`http.header_read_timeout_ms`).
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

/// Starts an in-process hub with the embedded broker on a free port.
pub async fn start_hub(dir: &Path, fridges: u32) -> Result<HubHandle> {
    larder_demo::start_hub(
        dir,
        fridges,
        &larder_hub::http::token_sha256(ADMIN_TOKEN),
        seeded_key(7, "hub"),
        None,
    )
    .await
}

/// Starts an in-process hub like [`start_hub`], with its config adjusted by `tweak`.
pub async fn start_hub_with(
    dir: &Path,
    fridges: u32,
    tweak: impl Fn(&mut larder_hub::config::HubConfig),
) -> Result<HubHandle> {
    start_hub_with_clock(dir, fridges, tweak, larder_runtime::Clock::system()).await
}

/// [`start_hub_with`] with the clock the hub judges time by (tests move it instead of
/// waiting).
pub async fn start_hub_with_clock(
    dir: &Path,
    fridges: u32,
    tweak: impl Fn(&mut larder_hub::config::HubConfig),
    clock: larder_runtime::Clock,
) -> Result<HubHandle> {
    let mut last = None;
    for _ in 0..5 {
        let port = larder_hub::mqtt::free_port()?;
        let mut config = larder_demo::hub_config(
            dir,
            port,
            fridges,
            larder_hub::http::token_sha256(ADMIN_TOKEN),
        )?;
        tweak(&mut config);
        match larder_hub::start_with_clock(config, seeded_key(7, "hub"), clock.clone()).await {
            Ok(h) => return Ok(h),
            Err(e @ larder_hub::StartError::Broker(_)) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| anyhow!("no free port"), Into::into))
}

/// Runs a compaction of the test region now; finished records older than
/// `archive_after_seconds` leave the live ledgers. Returns the hub's report.
pub async fn compact(hub_http: &str, archive_after_seconds: u64) -> Result<Value> {
    let (status, report) = compact_keyed(hub_http, archive_after_seconds, None).await?;
    if status != 200 {
        bail!("compaction: {status} {report}");
    }
    Ok(report)
}

/// Asks the hub to compact its region now, with an Idempotency-Key if `key` is given: the
/// status and the answer.
pub async fn compact_keyed(
    hub_http: &str,
    archive_after_seconds: u64,
    key: Option<&str>,
) -> Result<(u16, Value)> {
    let mut request = http()
        .post(format!("{hub_http}/v1/regions/{REGION}/compaction"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let resp = request
        .json(&json!({"archive_after_seconds": archive_after_seconds}))
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

/// Enrolls a device over the hub's HTTP API.
pub async fn enroll(
    hub_http: &str,
    device: &str,
    role: Role,
    fridges: &[&str],
    key: &PublicKey,
) -> Result<()> {
    let resp = http()
        .post(format!("{hub_http}/v1/regions/{REGION}/devices"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"device_id": device, "role": role, "fridges": fridges, "public_key": key}))
        .send()
        .await?;
    if resp.status().as_u16() != 201 {
        bail!("enroll {device}: {} {}", resp.status(), resp.text().await?);
    }
    Ok(())
}

pub fn fridge_ids(names: &[&str]) -> Vec<FridgeId> {
    names
        .iter()
        .map(|n| FridgeId::new(*n).expect("fridge id"))
        .collect()
}

/// Starts an in-process agent (after enrolling it).
pub async fn start_agent(
    dir: &Path,
    hub: &HubHandle,
    device: &str,
    role: Role,
    fridges: &[&str],
) -> Result<AgentHandle> {
    start_agent_with(
        dir,
        hub,
        device,
        role,
        fridges,
        |_| {},
        larder_runtime::Clock::system(),
    )
    .await
}

/// A fridge's own agent (`fridge-1`) and a POS serving the same fridge (`pos-1`), both synced
/// within `limit`, with their API URLs.
#[derive(Debug)]
pub struct FridgeAndPos {
    pub fridge: AgentHandle,
    pub pos: AgentHandle,
    pub fridge_url: String,
    pub pos_url: String,
}

/// Starts [`FridgeAndPos`] on `hub` and waits until both agents are synced.
pub async fn start_fridge_and_pos(
    dir: &Path,
    hub: &HubHandle,
    limit: Duration,
) -> Result<FridgeAndPos> {
    let fridge = start_agent(dir, hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let pos = start_agent(dir, hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let (fridge_url, pos_url) = (
        format!("http://{}", fridge.http_addr),
        format!("http://{}", pos.http_addr),
    );
    synced(&fridge_url, limit).await?;
    synced(&pos_url, limit).await?;
    Ok(FridgeAndPos {
        fridge,
        pos,
        fridge_url,
        pos_url,
    })
}

/// Runs a command to its end; its exit status and what it printed (stdout, then stderr). One
/// that has not ended in two minutes (a server that started when it should have refused, say)
/// is killed and fails.
pub async fn run_to_end(exe: &str, args: &[&str]) -> Result<(bool, String)> {
    let run = tokio::process::Command::new(exe)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .map_err(|_| anyhow!("{exe} {args:?} did not end"))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Enrolls `pos-1` (serving fridge-1) at the hub at `hub_url` and starts it in-process on
/// the broker at `broker_port`, its data under `dir`.
pub async fn start_pos(dir: &Path, hub_url: &str, broker_port: u16) -> Result<AgentHandle> {
    let key = seeded_key(7, "pos-1");
    enroll(hub_url, "pos-1", Role::Pos, &["fridge-1"], &key.public()).await?;
    let mut config = agent_config(
        dir,
        "pos-1",
        Role::Pos,
        &fridge_ids(&["fridge-1"]),
        hub_public_key(),
        &format!("127.0.0.1:{broker_port}"),
    )?;
    config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
    Ok(larder_agent::start(config, key).await?)
}

/// Starts an in-process agent already enrolled at `hub` (one coming back, its data in
/// `dir/DEVICE`).
pub async fn restart_agent(
    dir: &Path,
    hub: &HubHandle,
    device: &str,
    role: Role,
    fridges: &[&str],
) -> Result<AgentHandle> {
    let config = test_agent_config(dir, hub, device, role, fridges)?;
    Ok(larder_agent::start(config, seeded_key(7, device)).await?)
}

/// The config of a test agent of `hub`, its data in `dir/DEVICE`.
fn test_agent_config(
    dir: &Path,
    hub: &HubHandle,
    device: &str,
    role: Role,
    fridges: &[&str],
) -> Result<larder_agent::config::AgentConfig> {
    let mut config = agent_config(
        &dir.join(device),
        device,
        role,
        &fridge_ids(fridges),
        hub.public_key,
        &hub.broker,
    )?;
    config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
    Ok(config)
}

/// Starts an in-process agent (after enrolling it) with its config adjusted by `tweak` and
/// its records stamped by `clock`.
pub async fn start_agent_with(
    dir: &Path,
    hub: &HubHandle,
    device: &str,
    role: Role,
    fridges: &[&str],
    tweak: impl Fn(&mut larder_agent::config::AgentConfig),
    clock: larder_runtime::Clock,
) -> Result<AgentHandle> {
    let key = seeded_key(7, device);
    enroll(
        &format!("http://{}", hub.http_addr),
        device,
        role,
        fridges,
        &key.public(),
    )
    .await?;
    let mut config = test_agent_config(dir, hub, device, role, fridges)?;
    tweak(&mut config);
    Ok(larder_agent::start_with_clock(config, key, clock).await?)
}

/// Every order at the hub as its listing shows them (10,000 at most).
async fn hub_listing(hub_url: &str) -> Result<Vec<Value>> {
    let v: Value = get(&format!(
        "{hub_url}/v1/regions/{}/orders?limit=10000",
        larder_demo::REGION
    ))
    .await?;
    Ok(v["orders"]
        .as_array()
        .ok_or_else(|| anyhow!("no orders in {v}"))?
        .clone())
}

/// One order at the hub by its id, as the API answers (an error body if there is none).
pub async fn hub_order(hub_url: &str, order: &str) -> Result<Value> {
    get(&format!(
        "{hub_url}/v1/regions/{}/orders/{order}",
        larder_demo::REGION
    ))
    .await
}

/// Every order at the hub (up to 10,000) with its first unit: a unit in two orders is a sale
/// doubled.
pub async fn hub_sales(hub_url: &str) -> Result<Vec<(String, String)>> {
    Ok(hub_listing(hub_url)
        .await?
        .iter()
        .filter_map(|o| {
            Some((
                o["order_id"].as_str()?.to_owned(),
                o["lines"][0]["unit_ids"][0].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// POSTs JSON (with the admin token and an Idempotency-Key); returns the status and body.
pub async fn post(url: &str, key: &str, body: &Value) -> Result<(u16, Value)> {
    let resp = http()
        .post(url)
        .bearer_auth(ADMIN_TOKEN)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// GETs JSON with the admin token.
pub async fn get(url: &str) -> Result<Value> {
    Ok(http()
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?)
}

/// The agent's health document.
pub async fn health(url: &str) -> Result<Value> {
    Ok(http()
        .get(format!("{url}/v1/health"))
        .send()
        .await?
        .json()
        .await?)
}

/// Waits until an agent reports that it is offline (cut off, or its hub gone).
pub async fn offline(url: &str, limit: Duration) -> Result<()> {
    eventually(limit, &format!("{url} to go offline"), || async {
        (health(url).await.ok()?["online"] == false).then_some(())
    })
    .await
}

/// Cuts an in-process agent off the network and waits until it reports being offline.
pub async fn cut_off(agent: &AgentHandle) -> Result<()> {
    agent.set_network(false);
    offline(
        &format!("http://{}", agent.http_addr),
        Duration::from_secs(30),
    )
    .await
}

/// Waits until an agent is online, has the catalog and has nothing pending.
pub async fn synced(url: &str, limit: Duration) -> Result<()> {
    eventually(limit, &format!("{url} to sync"), || async {
        let h = health(url).await.ok()?;
        (h["online"] == true && h["pending_changes"] == 0 && h["catalog_version"].as_u64()? > 0)
            .then_some(())
    })
    .await
}

/// Refills `n` units named `{prefix}-{i}` of `sku` at a fridge through an agent.
pub async fn refill(url: &str, fridge: &str, prefix: &str, sku: &str, n: usize) -> Result<()> {
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    let units: Vec<Value> = (0..n)
        .map(|i| json!({"unit_id": format!("{prefix}-{i}"), "sku": sku, "expires_at": expires.to_string()}))
        .collect();
    let resp = http()
        .post(format!("{url}/v1/refills"))
        .header("Idempotency-Key", format!("refill-{prefix}"))
        .json(&json!({"fridge_id": fridge, "units": units}))
        .send()
        .await?;
    if resp.status().as_u16() != 201 {
        bail!("refill: {} {}", resp.status(), resp.text().await?);
    }
    Ok(())
}

/// The price of a demo sku.
pub fn price(sku: &str) -> i64 {
    larder_demo::demo_catalog()
        .items
        .iter()
        .find(|i| i.sku.as_str() == sku)
        .map_or(0, |i| i.price_minor)
}

/// Sells one unit, paid in cash; returns the HTTP status and body.
pub async fn sell_unit(
    client: &reqwest::Client,
    url: &str,
    fridge: &str,
    unit: &str,
    sku: &str,
    key: &str,
) -> Result<(u16, Value)> {
    let resp = client
        .post(format!("{url}/v1/sales"))
        .header("Idempotency-Key", key)
        .json(&json!({
            "fridge_id": fridge,
            "lines": [{"sku": sku, "unit_id": unit, "quantity": 1}],
            "payment": {"method": "cash", "amount_minor": price(sku), "currency": "EUR"},
        }))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Per-sku available counts from a stock answer.
pub fn available(stock: &Value, sku: &str) -> u64 {
    stock["skus"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["sku"] == sku))
        .and_then(|s| s["available"].as_u64())
        .unwrap_or(0)
}

/// An agent's stock view.
pub async fn agent_stock(url: &str, fridge: &str) -> Result<Value> {
    Ok(http()
        .get(format!("{url}/v1/stock?fridge_id={fridge}"))
        .send()
        .await?
        .json()
        .await?)
}

/// An order as an agent answers it, once it has one of that id (`None` before, or on an error).
pub async fn agent_order(url: &str, id: &str) -> Option<Value> {
    let v: Value = http()
        .get(format!("{url}/v1/orders/{id}"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v.get("status").is_some().then_some(v)
}

/// The hub's stock view (with its ledger digest).
pub async fn hub_stock(hub_http: &str, fridge: &str) -> Result<Value> {
    Ok(http()
        .get(format!(
            "{hub_http}/v1/regions/{REGION}/fridges/{fridge}/stock"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?)
}

/// The Prometheus text a hub or an agent serves at `{base_url}/metrics` (with the admin token,
/// which the hub asks for).
pub async fn metrics_text(base_url: &str) -> Result<String> {
    Ok(http()
        .get(format!("{base_url}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?)
}

/// The order ids the hub holds (10,000 at most).
pub async fn hub_order_ids(hub_http: &str) -> Result<Vec<String>> {
    Ok(hub_listing(hub_http)
        .await?
        .iter()
        .filter_map(|o| o["order_id"].as_str().map(str::to_owned))
        .collect())
}

/// Writes a hub config for the test region and returns its path.
pub fn write_hub_config(
    dir: &Path,
    broker_port: u16,
    http_port: u16,
    fridges: u32,
) -> Result<PathBuf> {
    let mut c = larder_demo::hub_config(
        &dir.join("data"),
        broker_port,
        fridges,
        larder_hub::http::token_sha256(ADMIN_TOKEN),
    )?;
    c.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
    std::fs::create_dir_all(dir)?;
    let key = seeded_key(7, "hub");
    let key_path = dir.join("hub.key");
    if !key_path.exists() {
        larder_runtime::keys::write_key(&key_path, &key)?;
    }
    let regions = toml::to_string(&serde_json::json!({"regions": c.regions}))?;
    let text = format!(
        "data_dir = {:?}\nkey_file = {:?}\n[http]\nlisten = \"{}\"\n[mqtt]\nbroker = \"{}\"\n[sync]\nretransmit_after_ms = 2000\nsnapshot_every_changes = 16\n[[tokens]]\nsha256 = \"{}\"\nrole = \"admin\"\nregions = [\"*\"]\n{regions}",
        c.data_dir, key_path, c.http.listen, c.mqtt.broker, c.tokens[0].sha256,
    );
    let path = dir.join("hub.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Writes an agent config and its key; returns the config path.
pub fn write_agent_config(
    dir: &Path,
    device: &str,
    role: Role,
    fridges: &[&str],
    hub_key: PublicKey,
    broker: &str,
) -> Result<(PathBuf, SecretKey)> {
    std::fs::create_dir_all(dir)?;
    let key = seeded_key(7, device);
    let key_path = dir.join("device.key");
    if !key_path.exists() {
        larder_runtime::keys::write_key(&key_path, &key)?;
    }
    let text = format!(
        "device_id = \"{device}\"\nrole = \"{}\"\nregion = \"{REGION}\"\nfridges = {}\nhub_public_key = \"{hub_key}\"\ndata_dir = {:?}\nkey_file = {:?}\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nbroker = \"{broker}\"\nreconnect_delay_ms_min = 50\nreconnect_delay_ms_max = 1000\n[sync]\nretransmit_after_ms = 2000\nbatch_entries_max = {TEST_BATCH_ENTRIES_MAX}\n",
        role.as_str(),
        serde_json::to_string(fridges)?,
        dir.join("data"),
        key_path,
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok((path, key))
}

/// The hub public key tests use.
pub fn hub_public_key() -> PublicKey {
    seeded_key(7, "hub").public()
}

/// A device id.
pub fn device(name: &str) -> DeviceId {
    DeviceId::new(name).expect("device id")
}

/// A subscription to a region's live event feed (`GET /v1/regions/{r}/events`, SSE).
#[derive(Debug)]
pub struct EventFeed {
    resp: reqwest::Response,
    buf: String,
    /// Every event read so far: its name and data.
    pub seen: Vec<(String, Value)>,
}

impl EventFeed {
    /// Subscribes; events published from the moment this returns are delivered.
    pub async fn open(hub_http: &str, region: &str) -> Result<Self> {
        // No overall timeout: the response is a stream that stays open.
        let resp = reqwest::Client::new()
            .get(format!("{hub_http}/v1/regions/{region}/events"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "event feed: {}", resp.status());
        let kind = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(kind.starts_with("text/event-stream"), "content type {kind}");
        Ok(Self {
            resp,
            buf: String::new(),
            seen: Vec::new(),
        })
    }

    /// Reads events until one (already read or new) named `name` satisfies `pred`.
    pub async fn until(
        &mut self,
        limit: Duration,
        name: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut checked = 0;
        loop {
            if let Some((_, v)) = self.seen[checked..]
                .iter()
                .find(|(n, v)| n == name && pred(v))
            {
                return Ok(v.clone());
            }
            checked = self.seen.len();
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no matching {name} event within {limit:?}; saw {:?}",
                        self.seen
                    )
                })??
                .ok_or_else(|| anyhow::anyhow!("the event feed ended"))?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    self.seen
                        .push((event, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
            }
        }
    }
}

// Helpers of the benchmark binaries (`larder-bench`, `larder-hub-bench`).

/// The `p` quantile (0 to 1) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints a latency line: count, p50, p99 and max, and whether p99 met `goal_ms`.
pub fn summary(name: &str, samples: &mut [Duration], goal_ms: f64) {
    samples.sort();
    let p99 = ms(percentile(samples, 0.99));
    println!(
        "{name}: n = {}, p50 {:.3} ms, p99 {p99:.3} ms, max {:.3} ms (goal: p99 at most {goal_ms} ms, {})",
        samples.len(),
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 1.0)),
        if p99 <= goal_ms { "met" } else { "missed" }
    );
}

/// Sets up logging (warnings from the hubs and agents a benchmark runs go to stderr; RUST_LOG
/// overrides) and prints the heading `title` of a run, unless `which` is one of a benchmark's
/// own child processes (`__...`).
pub fn bench_start(title: &str, which: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !which.starts_with("__") {
        println!(
            "# {title} ({} build, {} cores)\n",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}
