//! `larder-crash hub-power-cut`: cuts the power under an in-process hub while fridge agents sell
//! and sync through it and an app places orders through its API, on the file layer that loses
//! the writes not yet synced, and checks every image the cuts leave. The agents' files are on
//! the same layer, never cut.

use std::sync::atomic::Ordering;

use larder_hub::HubHandle;
use larder_tests::powercut::{CutReport, PowerCut};

use super::*;

const FRIDGES: usize = 3;
/// Units each fridge sells per burst.
const SALES: usize = 24;
/// Orders the app places per burst (at fridge-1).
const APP_ORDERS: usize = 8;
const APP_SKU: &str = "lasagna";

/// What the hub had acknowledged at a cut: each device's uplink position its acknowledgements
/// had reached, and the app orders answered 201.
#[derive(Debug, Clone, Default)]
struct Acknowledged {
    up_acked: Vec<(String, u64)>,
    app_orders: Vec<String>,
}

/// A fridge agent of the run, and the shared state its acknowledgements are read from.
struct Fridge {
    name: String,
    agent: larder_agent::AgentHandle,
    url: String,
}

/// One image of the hub's disk after a cut, checked with SQL: intact, every device's uplink
/// held at least as far as the hub had acknowledged it, every app order answered 201 there with
/// its stored answer.
fn check_image(db: &str, at_cut: &Acknowledged) -> Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(integrity == "ok", "integrity_check: {integrity}");
    for (device, acked) in &at_cut.up_acked {
        let held: i64 = conn
            .query_row(
                "SELECT up_hwm FROM devices WHERE device_id = ?1",
                [device],
                |r| r.get(0),
            )
            .unwrap_or(0);
        ensure!(
            held as u64 >= *acked,
            "{device}: the hub had acknowledged its uplink up to {acked}, the image holds {held}"
        );
    }
    for order in &at_cut.app_orders {
        let (placed, answer): (bool, bool) = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = ?1),
                    EXISTS (SELECT 1 FROM idempotency WHERE key = ?2)",
            [order, &format!("place-{order}")],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        ensure!(
            placed && answer,
            "app order {order} answered 201 before the cut: order {placed}, stored answer {answer}"
        );
    }
    Ok(())
}

async fn start_fridge(name: &str, data: &std::path::Path, broker: &str) -> Result<Fridge> {
    let mut config = larder_demo::agent_config(
        data,
        name,
        Role::Fridge,
        &fridge_ids(&[name]),
        hub_public_key(),
        broker,
    )?;
    config.sync.batch_entries_max = TEST_BATCH_ENTRIES_MAX;
    config.mqtt.reconnect_delay_ms_min = 50;
    config.mqtt.reconnect_delay_ms_max = 1_000;
    config.orders.escrow_share = 0.0;
    let agent = larder_agent::start(config, larder_demo::seeded_key(7, name)).await?;
    let url = format!("http://{}", agent.http_addr);
    Ok(Fridge {
        name: name.to_owned(),
        agent,
        url,
    })
}

/// Places app order `id` at fridge-1 with its Idempotency-Key: the status and the order id
/// answered.
async fn place(hub_url: &str, id: &str) -> Result<(u16, String)> {
    let (status, body) = post(
        &format!("{hub_url}/v1/regions/{}/orders", larder_demo::REGION),
        &format!("place-{id}"),
        &serde_json::json!({"customer_id": "cust-1", "fridge_id": "fridge-1", "order_id": id,
            "lines": [{"sku": APP_SKU, "quantity": 1}]}),
    )
    .await?;
    Ok((
        status,
        body["order_id"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// What the hub has acknowledged as the devices and the app know it now.
fn acknowledged(fridges: &[Fridge], app: &Arc<Mutex<Vec<String>>>) -> Acknowledged {
    Acknowledged {
        up_acked: fridges
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    f.agent.shared.up_acked.load(Ordering::SeqCst),
                )
            })
            .collect(),
        app_orders: app.lock().map(|a| a.clone()).unwrap_or_default(),
    }
}

/// One piece: the cut schedule's loop, each burst's cuts checked as images and the last
/// restarted as the hub.
pub(crate) async fn run(seed: u64, cuts: usize, per_burst: usize) -> Result<String> {
    let vfs = PowerCut::install().map_err(|e| anyhow::anyhow!(e))?;
    let per_burst = per_burst.max(1);
    let mut rng = Rng(seed);
    let mut draw = Rng(seed ^ 0x00c0_ffee);
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().display().to_string();
    let mut hub_dir = format!("{root}/hub-0");
    let mut hub: HubHandle = start_hub(std::path::Path::new(&hub_dir), FRIDGES as u32).await?;
    let mut hub_url = format!("http://{}", hub.http_addr);
    let mut fridges = Vec::with_capacity(FRIDGES);
    for i in 1..=FRIDGES {
        let name = format!("fridge-{i}");
        let key = larder_demo::seeded_key(7, &name);
        enroll(&hub_url, &name, Role::Fridge, &[&name], &key.public()).await?;
        fridges.push(start_fridge(&name, &tmp.path().join(&name), &hub.broker).await?);
    }
    let mut sales: Vec<(String, String)> = Vec::new();
    let mut app_orders: Vec<String> = Vec::new();
    let (mut images, mut burst) = (0usize, 0usize);
    let mut totals = CutReport::default();
    while images < cuts {
        let prefix = format!("b{burst}");
        for f in &fridges {
            synced(&f.url, Duration::from_secs(60)).await?;
            refill(&f.url, &f.name, &format!("{prefix}-{}", f.name), SKU, SALES).await?;
        }
        refill(
            &fridges[0].url,
            "fridge-1",
            &format!("{prefix}-app"),
            APP_SKU,
            APP_ORDERS,
        )
        .await?;
        for f in &fridges {
            synced(&f.url, Duration::from_secs(60)).await?;
        }
        // Ingest: every fridge sells its units; the app places its orders at the hub.
        let sold: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let mut sellers = tokio::task::JoinSet::new();
        for f in &fridges {
            let (url, name, sold) = (f.url.clone(), f.name.clone(), sold.clone());
            let prefix = prefix.clone();
            sellers.spawn(async move {
                let client = http();
                for i in 0..SALES {
                    let unit = format!("{prefix}-{name}-{i}");
                    let (status, body) =
                        sell_unit(&client, &url, &name, &unit, SKU, &format!("k-{unit}")).await?;
                    ensure!(status == 201, "{unit}: {status} {body}");
                    let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                    if let Ok(mut s) = sold.lock() {
                        s.push((order, unit));
                    }
                }
                anyhow::Ok(())
            });
        }
        let placed: Arc<Mutex<Vec<String>>> = Arc::default();
        let app = tokio::spawn({
            let (hub_url, placed, prefix) = (hub_url.clone(), placed.clone(), prefix.clone());
            async move {
                for j in 0..APP_ORDERS {
                    let id = format!("{prefix}-app-{j}");
                    match place(&hub_url, &id).await {
                        Ok((201, _)) => {
                            if let Ok(mut p) = placed.lock() {
                                p.push(id);
                            }
                        }
                        Ok((status, _)) => bail!("app order {id}: {status}"),
                        // The hub runs through the cuts at I/O points, and this task is
                        // stopped before the last: no request may fail.
                        Err(e) => bail!("app order {id}: {e}"),
                    }
                }
                Ok(())
            }
        });

        // Cuts at exact points of the hub's I/O: the power fails right after its nth write,
        // truncation or sync from now. Each image is checked against what the hub had
        // acknowledged at that instant; the hub runs on.
        let mut fired_here = 0;
        while fired_here + 1 < per_burst && images < cuts {
            let image = format!("{root}/image-{burst}-{fired_here}");
            let at_cut = Arc::new(Mutex::new(None::<Acknowledged>));
            {
                let shared: Vec<(String, Arc<larder_agent::Shared>)> = fridges
                    .iter()
                    .map(|f| (f.name.clone(), f.agent.shared.clone()))
                    .collect();
                let (placed, at_cut) = (placed.clone(), at_cut.clone());
                vfs.arm(
                    &hub_dir,
                    &image,
                    1 + rng.below(120),
                    rng.below(u64::MAX),
                    move || {
                        let now = Acknowledged {
                            up_acked: shared
                                .iter()
                                .map(|(n, s)| (n.clone(), s.up_acked.load(Ordering::SeqCst)))
                                .collect(),
                            app_orders: placed.lock().map(|p| p.clone()).unwrap_or_default(),
                        };
                        if let Ok(mut c) = at_cut.lock() {
                            *c = Some(now);
                        }
                    },
                );
            }
            let report = loop {
                if let Some(r) = vfs.fired() {
                    break Some(r);
                }
                if sellers.is_empty()
                    || sold.lock().map(|s| s.len()).unwrap_or(0) >= SALES * FRIDGES
                {
                    vfs.disarm();
                    break vfs.fired();
                }
                // Polled: the file layer records a cut in a flag and wakes nobody.
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let Some(report) = report else {
                vfs.forget(&image);
                break;
            };
            let at_cut = at_cut
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .unwrap_or_default();
            images += 1;
            fired_here += 1;
            totals.add(report);
            check_image(&format!("{image}/region-demo.db"), &at_cut)
                .with_context(|| format!("cut {images} (burst {burst}, at an I/O point)"))?;
            vfs.forget(&image);
        }

        // The last cut of the burst, once half its sales are made and a few microseconds
        // more, is started as the hub again. No acknowledgement may reach a device after the
        // cut: every device is cut off the network first, and the app stops asking.
        eventually(
            Duration::from_secs(60),
            "half the burst's sales",
            || async { (sold.lock().ok()?.len() >= SALES * FRIDGES / 2).then_some(()) },
        )
        .await?;
        // The fault's timing, not a wait for anything: the cut lands at a random moment.
        tokio::time::sleep(Duration::from_micros(rng.below(4_000))).await;
        for f in &fridges {
            cut_off(&f.agent).await?;
        }
        app.abort();
        let _ = app.await;
        let at_cut = acknowledged(&fridges, &placed);
        let image = format!("{root}/hub-{}", burst + 1);
        totals.add(vfs.cut(&hub_dir, &image, |n| draw.below(n)));
        images += 1;
        check_image(&format!("{image}/region-demo.db"), &at_cut)
            .with_context(|| format!("cut {images} (burst {burst}, restarted)"))?;
        hub.shutdown().await;
        vfs.forget(&hub_dir);
        hub_dir = image;
        // The devices sell on offline meanwhile.
        while let Some(r) = sellers.join_next().await {
            r??;
        }
        hub = start_hub(std::path::Path::new(&hub_dir), FRIDGES as u32).await?;
        hub_url = format!("http://{}", hub.http_addr);
        let mut restarted = Vec::with_capacity(FRIDGES);
        for f in fridges {
            f.agent.shutdown().await;
            restarted.push(start_fridge(&f.name, &tmp.path().join(&f.name), &hub.broker).await?);
        }
        fridges = restarted;
        // Every app order again with its key: the ones answered before the cut answer the
        // same order, the others are placed now or found placed; each is one order.
        for j in 0..APP_ORDERS {
            let id = format!("{prefix}-app-{j}");
            let (status, order) = place(&hub_url, &id).await?;
            ensure!(
                status == 201 && order == id,
                "burst {burst}: the retry of app order {id}: {status} {order}"
            );
        }
        sales.extend(sold.lock().map(|s| s.clone()).unwrap_or_default());
        app_orders.extend((0..APP_ORDERS).map(|j| format!("{prefix}-app-{j}")));
        burst += 1;
        if burst % 10 == 0 {
            eprintln!("{images} power cuts under the hub, {} sales", sales.len());
        }
    }
    for f in &fridges {
        synced(&f.url, Duration::from_secs(120)).await?;
    }
    let held = hub_holds(&hub_url, &sales).await?;
    // Each app order by its id (the listing holds 10,000 orders at most).
    for order in &app_orders {
        let o = hub_order(&hub_url, order).await?;
        ensure!(
            o["order_id"] == order.as_str(),
            "app order {order} not at the hub: {o}"
        );
    }
    let mine: BTreeSet<&String> = sales.iter().map(|(o, _)| o).collect();
    let walk_up: BTreeSet<&String> = held
        .iter()
        .map(|(o, _)| o)
        .filter(|o| !app_orders.contains(o))
        .collect();
    ensure!(
        walk_up == mine,
        "the hub holds {} sales, the devices made {}",
        walk_up.len(),
        mine.len()
    );
    let (writes, syncs) = vfs.counts();
    for f in fridges {
        f.agent.shutdown().await;
    }
    hub.shutdown().await;
    Ok(format!(
        "hub power cut: {images} cuts in {burst} bursts ({} of them at exact I/O points) under \
         {FRIDGES} fridges syncing and an app placing orders; of {} unsynced writes at the cuts \
         {} kept, {} torn, {} lost ({writes} writes and {syncs} syncs in all); every image \
         intact, every uplink the hub had acknowledged and every app order it had answered 201 \
         present; {} sales and {} app orders at the hub exactly once",
        images - burst,
        totals.unsynced,
        totals.kept,
        totals.torn,
        totals.lost,
        mine.len(),
        app_orders.len()
    ))
}
