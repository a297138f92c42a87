//! The agent built for aarch64 (by `scripts/cross-build.sh aarch64-unknown-linux-gnu`), run
//! under `qemu-aarch64` against an x86 hub process: it enrolls, syncs, sells while the hub is
//! down, reconnects when the hub is back, and converges with the hub.
//!
//! Built only with the `arm-e2e` feature, because it needs the cross-built binary and
//! qemu-user: `scripts/arm-e2e.sh` builds both and runs it (CI does).
//! `LARDER_ARM_AGENT` names the binary and `LARDER_ARM_RUNNER` the emulator command
//! (defaults: the cross-build output and `qemu-aarch64 -L /usr/aarch64-linux-gnu`).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use larder_shared::domain::Role;
use larder_tests::*;

const SALES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_sells_offline_and_converges_with_an_x86_hub() -> anyhow::Result<()> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let agent_bin = std::env::var("LARDER_ARM_AGENT").unwrap_or_else(|_| {
        workspace
            .join("target/aarch64-unknown-linux-gnu/device/larder-agent")
            .to_string_lossy()
            .into_owned()
    });
    anyhow::ensure!(
        std::path::Path::new(&agent_bin).exists(),
        "{agent_bin} is missing: run scripts/cross-build.sh aarch64-unknown-linux-gnu"
    );
    let runner = std::env::var("LARDER_ARM_RUNNER")
        .unwrap_or_else(|_| "qemu-aarch64 -L /usr/aarch64-linux-gnu".into());
    let mut runner = runner.split_whitespace().map(str::to_owned);
    let emulator = runner.next().context("LARDER_ARM_RUNNER is empty")?;
    let mut prefix: Vec<String> = runner.collect();
    prefix.push(agent_bin);

    // The hub: a native (x86) process with its embedded broker.
    let dir = tempfile::tempdir()?;
    let broker_port = larder_hub::mqtt::free_port()?;
    let http_port = larder_hub::mqtt::free_port()?;
    let hub_toml = write_hub_config(&dir.path().join("hub"), broker_port, http_port, 1)?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let hub_config = hub_toml.to_string_lossy().to_string();
    let mut hub = Process::spawn(hub_exe, &["run", "--config", &hub_config], "hub ")?;
    let hub_url = hub.url.clone();
    let broker = format!("127.0.0.1:{broker_port}");

    // The ARM fridge agent: its own key, enrolled through the hub's API, its real CLI.
    let (agent_toml, key) = write_agent_config(
        &dir.path().join("fridge"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub_public_key(),
        &broker,
    )?;
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    // The test sells every unit it loads while the hub is down: no escrow held back for app
    // orders (tests/tests/e2e/escrow.rs covers the escrow).
    let mut text = std::fs::read_to_string(&agent_toml)?;
    text.push_str("[orders]\nescrow_share = 0.0\n");
    std::fs::write(&agent_toml, text)?;
    let agent_config = agent_toml.to_string_lossy().to_string();
    let mut args: Vec<&str> = prefix.iter().map(String::as_str).collect();
    args.extend(["run", "--config", &agent_config]);
    let agent = Process::spawn(&emulator, &args, "listening on ")?;
    let url = agent.url.clone();
    synced(&url, Duration::from_secs(60)).await?;
    assert_eq!(health(&url).await?["device_id"], "fridge-1");

    refill(&url, "fridge-1", "unit", "soup-lentil", SALES).await?;
    synced(&url, Duration::from_secs(60)).await?;
    eventually(
        Duration::from_secs(30),
        "the hub to see the refill",
        || async {
            (available(&hub_stock(&hub_url, "fridge-1").await.ok()?, "soup-lentil") == SALES as u64)
                .then_some(())
        },
    )
    .await?;

    // The hub goes away; the ARM agent keeps selling.
    hub.kill();
    offline(&url, Duration::from_secs(60)).await?;
    let client = http();
    let mut acked = BTreeSet::new();
    for i in 0..SALES {
        let (status, body) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &format!("unit-{i}"),
            "soup-lentil",
            &format!("arm-sale-{i}"),
        )
        .await?;
        assert_eq!(status, 201, "offline sale {i}: {body}");
        acked.insert(body["order_id"].as_str().context("order id")?.to_owned());
    }
    assert_eq!(health(&url).await?["pending_changes"], SALES as u64);

    // The hub comes back: the agent reconnects by itself and everything converges.
    let _hub = Process::spawn(hub_exe, &["run", "--config", &hub_config], "hub ")?;
    synced(&url, Duration::from_secs(90)).await?;
    let at_hub = hub_order_ids(&hub_url).await?;
    let distinct: BTreeSet<String> = at_hub.iter().cloned().collect();
    assert_eq!(at_hub.len(), SALES, "exactly the offline sales, none twice");
    assert_eq!(distinct, acked, "every acknowledged sale is at the hub");
    let hub_stock = hub_stock(&hub_url, "fridge-1").await?;
    let agent_stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(available(&hub_stock, "soup-lentil"), 0);
    assert_eq!(available(&agent_stock, "soup-lentil"), 0);
    let metrics = metrics_text(&url).await?;
    assert!(
        metrics.contains("larder_agent_"),
        "the ARM agent serves its metrics"
    );
    Ok(())
}
