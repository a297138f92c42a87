//! `larder-hub-bench connected`: many devices connected at once, and what each costs the hub.

use super::*;

/// `LARDER_BENCH_DEVICES` overrides it.
pub(super) const CONNECTED_DEVICES: usize = 10_000;

pub(super) fn connected_devices() -> usize {
    std::env::var("LARDER_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CONNECTED_DEVICES)
}

/// The hub's resident memory per connected, idle device.
///
/// One piece: a benchmark's run, setup to figures, as BENCHMARKS.md describes it.
pub(super) async fn connected() -> Result<()> {
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
pub(super) fn scopeguard_kill(pid: u32) -> impl Drop {
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
