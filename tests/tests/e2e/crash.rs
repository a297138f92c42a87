//! kill -9 a real agent process during a burst of concurrent sales: after restart every sale
//! that got a 2xx is there exactly once, the database passes `PRAGMA integrity_check`, and the
//! rest reaches the hub.

use std::collections::BTreeSet;
use std::time::Duration;

use larder_shared::domain::Role;
use larder_tests::*;

const UNITS: usize = 400;
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_sales_burst_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
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
    let (config, _) = write_agent_config(
        &dir.path().join("agent"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub.public_key,
        &hub.broker,
    )?;
    let config = config.to_string_lossy().to_string();
    let exe = env!("CARGO_BIN_EXE_agent-node");
    let mut agent = Process::spawn(exe, &["run", "--config", &config], "listening on ")?;
    synced(&agent.url, Duration::from_secs(20)).await?;
    refill(&agent.url, "fridge-1", "unit", "wrap-chicken", UNITS).await?;

    // Sales from several clients; the process is killed while they are in flight.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (url, acked) = (agent.url.clone(), acked.clone());
        clients.spawn(async move {
            let client = http();
            for i in (c..UNITS).step_by(CLIENTS) {
                let unit = format!("unit-{i}");
                match sell_unit(
                    &client,
                    &url,
                    "fridge-1",
                    &unit,
                    "wrap-chicken",
                    &format!("k{i}"),
                )
                .await
                {
                    Ok((201, body)) => {
                        let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                        acked.lock().expect("lock").push((order, unit));
                    }
                    Ok((status, body)) => panic!("sale of {unit}: {status} {body}"),
                    Err(_) => return, // the agent died under this request
                }
            }
        });
    }
    let kill_after = 40 + (std::process::id() as usize % 80);
    eventually(
        Duration::from_secs(60),
        "some sales to be acknowledged",
        || async { (acked.lock().ok()?.len() >= kill_after).then_some(()) },
    )
    .await?;
    agent.kill();
    while clients.join_next().await.is_some() {}
    let acked: Vec<(String, String)> = acked.lock().expect("lock").clone();
    assert!(acked.len() >= kill_after);

    let db = dir.path().join("agent").join("data").join("agent.db");
    let conn = rusqlite::Connection::open(&db)?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    assert_eq!(integrity, "ok");
    drop(conn);

    let agent = Process::spawn(exe, &["run", "--config", &config], "listening on ")?;
    let client = http();
    for (order, unit) in &acked {
        let o: serde_json::Value = client
            .get(format!("{}/v1/orders/{order}", agent.url))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            o["order_id"],
            order.as_str(),
            "acknowledged {order} survived the crash: {o}"
        );
        assert_eq!(o["lines"][0]["unit_ids"][0], unit.as_str());
    }
    let orders: serde_json::Value = client
        .get(format!("{}/v1/orders?limit=500", agent.url))
        .send()
        .await?
        .json()
        .await?;
    let list = orders["orders"].as_array().cloned().unwrap_or_default();
    let units: Vec<String> = list
        .iter()
        .filter_map(|o| o["lines"][0]["unit_ids"][0].as_str().map(str::to_owned))
        .collect();
    let distinct: BTreeSet<&String> = units.iter().collect();
    assert_eq!(units.len(), distinct.len(), "no unit sold twice");
    assert!(
        list.len() >= acked.len() && list.len() <= acked.len() + CLIENTS,
        "at most the in-flight sales beyond the acknowledged ones"
    );
    let sold =
        UNITS as u64 - available(&agent_stock(&agent.url, "fridge-1").await?, "wrap-chicken");
    assert_eq!(sold, list.len() as u64, "stock agrees with the orders");

    synced(&agent.url, Duration::from_secs(30)).await?;
    let at_hub: BTreeSet<String> = hub_order_ids(&hub_url).await?.into_iter().collect();
    let here: BTreeSet<String> = list
        .iter()
        .filter_map(|o| o["order_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(at_hub, here, "the hub holds exactly the agent's orders");
    hub.shutdown().await;
    Ok(())
}
