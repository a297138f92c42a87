//! `backup`: the hub's ingest in a region of 1,000 fridges, in rounds with and without
//! `larder-hub backup` copying the region store meanwhile (one backup after another for the
//! whole round), alternated so both see the same machine: the ingest rate with backups against
//! the rate without (goal: at least 0.8x), and how long each backup took.

use super::*;

const FRIDGES: u32 = 1_000;
const DEVICES: usize = 1_000;
/// Envelopes each device sends per round.
const PER_ROUND: u64 = 10;
/// Measured rounds, alternating: without backups, with, without, …
const ROUNDS: usize = 6;

/// One piece: the benchmark's run, setup to figures, as BENCHMARKS.md describes it.
pub(crate) async fn backup() -> Result<()> {
    use larder_shared::{DeviceId, FridgeId, RegionId};
    println!(
        "## backup under ingest: {DEVICES} devices x {PER_ROUND} envelopes a round, {FRIDGES} fridges, {ROUNDS} rounds alternating without and with backups\n"
    );
    let dir = tempfile::tempdir()?;
    let hub_dir = dir.path().join("hub");
    let hub = start_hub(&hub_dir, FRIDGES).await?;
    let config = larder_demo::hub_config(
        &hub_dir,
        0,
        FRIDGES,
        larder_hub::http::token_sha256(ADMIN_TOKEN),
    )?;
    let hub_http = format!("http://{}", hub.http_addr);
    let region = RegionId::new(larder_demo::REGION)?;
    let rounds = ROUNDS + 1; // the first fills the store and is not measured
    let mut devices = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let name = format!("pos-{i:05}");
        let fridge = format!("fridge-{}", i as u32 % FRIDGES + 1);
        let key = larder_demo::seeded_key(13, &name);
        enroll(&hub_http, &name, Role::Pos, &[&fridge], &key.public()).await?;
        let id = DeviceId::new(name.as_str())?;
        let envs = larder_tests::ingest::envelopes(
            &region,
            &id,
            &FridgeId::new(fridge.as_str())?,
            &key,
            &hub.public_key,
            PER_ROUND * rounds as u64,
        )?;
        devices.push((id, key, envs));
    }
    let mut clients = Vec::with_capacity(DEVICES);
    for (i, (id, key, _)) in devices.iter().enumerate() {
        let (client, events) =
            larder_tests::ingest::connect(&hub.broker, id, key, i as u64, 512 * 1024).await?;
        drive(events, None, (id.clone(), key.clone()));
        clients.push(client);
    }
    let accepted = || {
        hub.metrics
            .envelopes_accepted
            .get_or_create(&vec![("region", larder_demo::REGION.to_owned())])
            .get() as usize
    };
    let per_round = DEVICES * PER_ROUND as usize;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut took_each: Vec<Duration> = Vec::new();
    let mut store_bytes = 0;
    for round in 0..rounds {
        let backing_up = round % 2 == 0 && round > 0;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backups = backing_up.then(|| {
            let (config, stop) = (config.clone(), stop.clone());
            let out = dir.path().join(format!("backups-{round}"));
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut took = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let to = out.join(n.to_string());
                    let started = Instant::now();
                    larder_hub::backup::backup(&config, &to, 0)?;
                    took.push(started.elapsed());
                    std::fs::remove_dir_all(&to)?;
                    n += 1;
                }
                Ok(took)
            })
        });
        let before = accepted();
        let started = Instant::now();
        let mut sends = Vec::new();
        let chunk = round * PER_ROUND as usize..(round + 1) * PER_ROUND as usize;
        for ((id, _, envs), c) in devices.iter().zip(&clients) {
            let (c, envs) = (c.clone(), envs[chunk.clone()].to_vec());
            let topic = topics::device(&region, id, DeviceTopic::Up);
            sends.push(tokio::spawn(async move {
                for e in envs {
                    let _ = c
                        .publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, e)
                        .await;
                }
            }));
        }
        let took = until_count(before + per_round, started, accepted).await?;
        stop.store(true, Ordering::SeqCst);
        if let Some(b) = backups {
            let durations = b
                .join()
                .map_err(|_| anyhow::anyhow!("the backup thread panicked"))??;
            took_each.extend(durations);
        }
        let rate = per_round as f64 / took.as_secs_f64();
        match (round, backing_up) {
            (0, _) => {}
            (_, true) => with.push(rate),
            (_, false) => without.push(rate),
        }
        store_bytes = std::fs::metadata(config.region_db(&region))?.len();
        eprintln!(
            "round {round}: {rate:.0} envelopes/s{}",
            if backing_up { " with backups" } else { "" }
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (plain, backed) = (mean(&without), mean(&with));
    took_each.sort();
    println!(
        "region store: {:.1} MiB at the end ({} envelopes taken)",
        store_bytes as f64 / (1024.0 * 1024.0),
        accepted()
    );
    println!(
        "ingest without backups {plain:.0} envelopes/s (rounds: {}), with backups running {backed:.0} envelopes/s (rounds: {}): {:.2}x (goal at least 0.8x)",
        without
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        with.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        backed / plain
    );
    println!(
        "backups taken during ingest: {}, each p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        took_each.len(),
        ms(percentile(&took_each, 0.5)),
        ms(percentile(&took_each, 0.99)),
        ms(took_each.last().copied().unwrap_or_default())
    );
    hub.shutdown().await;
    Ok(())
}
