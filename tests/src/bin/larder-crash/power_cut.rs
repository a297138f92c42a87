//! `larder-crash power-cut`: cuts the power under an in-process agent during sale bursts, on a
//! file layer that loses the writes not yet synced, and checks every image the cuts leave.

use super::*;

/// One image of the agent's disk after a cut, checked with SQL: intact, the `earlier` sales
/// of past bursts all there, every acknowledged sale of the burst present, and each sale of the
/// burst whole or absent. Answers how many sales of the burst it holds.
fn check_image(
    db: &str,
    prefix: &str,
    earlier: usize,
    acked: &[(String, String)],
) -> Result<usize> {
    let conn = rusqlite::Connection::open(db)?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(integrity == "ok", "integrity_check: {integrity}");
    let orders: i64 = conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))?;
    ensure!(
        orders as usize >= earlier + acked.len(),
        "{orders} orders on disk; past bursts made {earlier} and {} were acknowledged since",
        acked.len()
    );
    for (order, unit) in acked {
        let state: Option<String> = conn
            .query_row(
                "SELECT state FROM units WHERE fridge = 'fridge-1' AND unit_id = ?1",
                [unit],
                |r| r.get(0),
            )
            .ok();
        let has_order: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = ?1)",
            [order],
            |r| r.get(0),
        )?;
        let has_key: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM idempotency WHERE key = ?1)",
            [format!("k-{unit}")],
            |r| r.get(0),
        )?;
        ensure!(
            state.as_deref() == Some("sold") && has_order && has_key,
            "acknowledged sale {order} ({unit}) not whole after the cut: unit {state:?}, order {has_order}, key {has_key}"
        );
    }
    let count = |sql: &str, pattern: String| -> Result<usize> {
        Ok(conn.query_row(sql, [pattern], |r| r.get::<_, i64>(0))? as usize)
    };
    let sold = count(
        "SELECT count(*) FROM units WHERE unit_id LIKE ?1 AND state = 'sold'",
        format!("{prefix}-%"),
    )?;
    let orders = count(
        "SELECT count(*) FROM orders WHERE view LIKE ?1",
        format!("%\"{prefix}-%"),
    )?;
    let keys = count(
        "SELECT count(*) FROM idempotency WHERE key LIKE ?1",
        format!("k-{prefix}-%"),
    )?;
    ensure!(
        sold == orders && orders == keys,
        "a sale only partly on disk: {sold} units sold, {orders} orders, {keys} idempotency records"
    );
    Ok(sold)
}

/// One piece: the cut schedule's loop, each burst's cuts checked as images and the last
/// restarted.
pub(crate) async fn run(seed: u64, cuts: usize, per_burst: usize) -> Result<String> {
    let vfs = larder_tests::powercut::PowerCut::install().map_err(|e| anyhow::anyhow!(e))?;
    let per_burst = per_burst.max(1);
    let mut rng = Rng(seed);
    let mut draw = Rng(seed ^ 0x00c0_ffee);
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().display().to_string();
    // The hub runs in this process too; its files are on the same layer, never cut.
    let hub = start_hub(&tmp.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = larder_demo::seeded_key(7, "fridge-1");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let start = |data: String| {
        let key = key.clone();
        let (public, broker) = (hub.public_key, hub.broker.clone());
        async move {
            let mut config = larder_demo::agent_config(
                std::path::Path::new(&data),
                "fridge-1",
                Role::Fridge,
                &fridge_ids(&["fridge-1"]),
                public,
                &broker,
            )?;
            config.orders.escrow_share = 0.0;
            anyhow::Ok(larder_agent::start(config, key).await?)
        }
    };
    let mut data = format!("{root}/agent-0");
    let mut agent = start(data.clone()).await?;
    let mut url = format!("http://{}", agent.http_addr);
    let mut acked_all: Vec<(String, String)> = Vec::new();
    let (mut images, mut in_flight_max) = (0usize, 0usize);
    let mut totals = larder_tests::powercut::CutReport::default();
    let mut burst = 0;
    while images < cuts {
        let prefix = format!("r{burst}");
        synced(&url, Duration::from_secs(60)).await?;
        refill(&url, "fridge-1", &prefix, SKU, UNITS_PER_ROUND)
            .await
            .with_context(|| format!("refill of burst {burst}"))?;
        let (acked, mut clients) = sale_burst(&url, &prefix);
        let db = |dir: &str| format!("{dir}/agent.db");
        // Cuts at exact points of the agent's I/O: the power fails right after its nth write,
        // truncation or sync from now. Each image is checked against the sales acknowledged
        // at that instant; the agent runs on.
        let final_after =
            UNITS_PER_ROUND / 4 + rng.below((UNITS_PER_ROUND * 3 / 4 - CLIENTS) as u64) as usize;
        let mut fired_here = 0;
        while fired_here + 1 < per_burst && images < cuts {
            let image = format!("{root}/image-{burst}-{fired_here}");
            let at_cut = Arc::new(Mutex::new(None::<Vec<(String, String)>>));
            {
                let (acked, at_cut) = (acked.clone(), at_cut.clone());
                vfs.arm(
                    &data,
                    &image,
                    1 + rng.below(60),
                    rng.below(u64::MAX),
                    move || {
                        let now = acked.lock().map(|a| a.clone()).unwrap_or_default();
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
                if acked.lock().map(|a| a.len()).unwrap_or(0) >= final_after {
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
            let acked_then = at_cut
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .unwrap_or_default();
            images += 1;
            fired_here += 1;
            totals.add(report);
            let held = check_image(&db(&image), &prefix, acked_all.len(), &acked_then)
                .with_context(|| format!("cut {images} (burst {burst}, at an I/O point)"))?;
            in_flight_max = in_flight_max.max(held - acked_then.len());
            vfs.forget(&image);
        }
        // The last cut of the burst, after a number of acknowledged sales plus a few
        // microseconds, is started as the agent again. The agent it becomes must not meet
        // anything the cut agent sends after the cut: nothing leaves it from now on (what it
        // sent before was synced before it was sent).
        eventually(Duration::from_secs(60), "sales before the cut", || async {
            (acked.lock().ok()?.len() >= final_after).then_some(())
        })
        .await?;
        // The last cut of the burst lands at a random moment, not at an I/O point.
        tokio::time::sleep(Duration::from_micros(rng.below(4_000))).await;
        cut_off(&agent).await?;
        let last_acked: Vec<(String, String)> = acked.lock().map(|a| a.clone()).unwrap_or_default();
        let image = format!("{root}/agent-{}", burst + 1);
        totals.add(vfs.cut(&data, &image, |n| draw.below(n)));
        images += 1;
        let held = check_image(&db(&image), &prefix, acked_all.len(), &last_acked)
            .with_context(|| format!("cut {images} (burst {burst}, restarted)"))?;
        in_flight_max = in_flight_max.max(held - last_acked.len());
        let old_data = std::mem::replace(&mut data, image);
        agent.shutdown().await;
        vfs.forget(&old_data);
        while let Some(r) = clients.join_next().await {
            if let Err(e) = r? {
                bail!("burst {burst}: a sale was refused: {e}");
            }
        }
        agent = start(data.clone()).await?;
        url = format!("http://{}", agent.http_addr);
        let client = http();
        for (order, unit) in &last_acked {
            let o: Value = client
                .get(format!("{url}/v1/orders/{order}"))
                .send()
                .await?
                .json()
                .await?;
            ensure!(
                o["order_id"] == order.as_str() && o["lines"][0]["unit_ids"][0] == unit.as_str(),
                "burst {burst}: acknowledged order {order} ({unit}) lost after the restart: {o}"
            );
        }
        // Every sale of the burst again with its key: each unit ends in exactly one order.
        let round = sell_round(&url, &prefix).await?;
        for (order, unit) in &last_acked {
            ensure!(
                round.iter().any(|(o, u)| o == order && u == unit),
                "burst {burst}: the retry of {unit} did not answer its order {order}"
            );
        }
        let distinct: BTreeSet<&String> = round.iter().map(|(o, _)| o).collect();
        ensure!(
            distinct.len() == UNITS_PER_ROUND,
            "burst {burst}: {} orders for {UNITS_PER_ROUND} units",
            distinct.len()
        );
        acked_all.extend(round);
        burst += 1;
        if burst % 10 == 0 {
            eprintln!("{images} power cuts, {} sales", acked_all.len());
        }
    }
    let bursts = burst;
    synced(&url, Duration::from_secs(120)).await?;
    let hub_orders = hub_holds(&hub_url, &acked_all).await?;
    let (writes, syncs) = vfs.counts();
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(format!(
        "power cut: {images} cuts in {bursts} bursts ({} of them at exact I/O points); of {} unsynced writes at the cuts {} kept, \
         {} torn, {} lost ({writes} writes and {syncs} syncs in all); every image intact, every \
         sale answered 201 before a cut present and every sale whole or absent; up to \
         {in_flight_max} unacknowledged sales on disk per cut; {} orders for as many units, all \
         at the hub ({} there), no unit in two orders",
        images - bursts,
        totals.unsynced,
        totals.kept,
        totals.torn,
        totals.lost,
        acked_all.len(),
        hub_orders.len()
    ))
}
