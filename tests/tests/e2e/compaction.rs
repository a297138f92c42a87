//! Bounded history end to end: the hub compacts a ledger into a new epoch while a POS is offline
//! with sales of the old epoch. Every replica rebases, the POS's offline sales are carried over
//! and merged, nothing archived comes back, the old epoch retires once every replica has
//! acknowledged the new one, and the audit chains stay intact across it all. A replica dormant
//! past the configured time no longer holds retirement back, and still merges its late sales.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::Value;

const SKU: &str = "wrap-chicken";

async fn sell(url: &str, units: impl IntoIterator<Item = usize>) -> anyhow::Result<Vec<String>> {
    let client = http();
    let mut orders = Vec::new();
    for i in units {
        let (status, body) = sell_unit(
            &client,
            url,
            "fridge-1",
            &format!("unit-{i}"),
            SKU,
            &format!("{url}-sale-{i}"),
        )
        .await?;
        anyhow::ensure!(status == 201, "sale of unit-{i}: {status} {body}");
        orders.push(body["order_id"].as_str().unwrap_or_default().to_owned());
    }
    Ok(orders)
}

fn unit_ids(stock: &Value) -> BTreeSet<String> {
    stock["units"]
        .as_array()
        .map(|units| {
            units
                .iter()
                .filter_map(|u| u["unit_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn count(db: &Path, sql: &str) -> anyhow::Result<i64> {
    Ok(rusqlite::Connection::open(db)?.query_row(sql, [], |r| r.get(0))?)
}

async fn converged(hub_url: &str, agents: &[&larder_agent::AgentHandle]) -> anyhow::Result<String> {
    eventually(
        Duration::from_secs(30),
        "every replica to converge",
        || async {
            let hub = hub_stock(hub_url, "fridge-1").await.ok()?["state_digest"]
                .as_str()?
                .to_owned();
            for a in agents {
                if a.digests().await.first()?.state_digest != hub {
                    return None;
                }
            }
            Some(hub)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_carries_offline_sales_over_and_retires_the_old_epoch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let (fridge_url, pos_url) = (
        format!("http://{}", fridge.http_addr),
        format!("http://{}", pos.http_addr),
    );
    synced(&fridge_url, Duration::from_secs(20)).await?;
    synced(&pos_url, Duration::from_secs(20)).await?;
    refill(&fridge_url, "fridge-1", "unit", SKU, 30).await?;
    eventually(
        Duration::from_secs(20),
        "the POS to see the refill",
        || async {
            (available(&agent_stock(&pos_url, "fridge-1").await.ok()?, SKU) == 30).then_some(())
        },
    )
    .await?;
    let mut orders = sell(&pos_url, 0..10).await?;
    orders.extend(sell(&fridge_url, 20..25).await?);
    synced(&pos_url, Duration::from_secs(20)).await?;
    synced(&fridge_url, Duration::from_secs(20)).await?;
    converged(&hub_url, &[&fridge, &pos]).await?;

    // The POS goes offline and sells five more, on the old epoch.
    cut_off(&pos).await?;
    let offline = sell(&pos_url, 10..15).await?;
    orders.extend(offline.iter().cloned());

    // Everything finished so far leaves the live ledger. Asked again with the same
    // Idempotency-Key, the hub answers the same report and compacts nothing more; the key with
    // another request is refused.
    let (status, report) = compact_keyed(&hub_url, 0, Some("compact-1")).await?;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        compact_keyed(&hub_url, 0, Some("compact-1")).await?,
        (200, report.clone())
    );
    let (status, reused) = compact_keyed(&hub_url, 1, Some("compact-1")).await?;
    assert_eq!(
        (status, &reused["error"]["code"]),
        (409, &Value::from("idempotency_key_reused"))
    );
    let ledger = &report["ledgers"][0];
    assert_eq!(ledger["epoch"], 1, "{report}");
    assert_eq!(
        ledger["archived"], 30,
        "15 units and their 15 orders: {report}"
    );
    assert_eq!(ledger["live_units"], 15, "{report}");
    let archived: BTreeSet<String> = (0..10).chain(20..25).map(|i| format!("unit-{i}")).collect();
    assert!(unit_ids(&hub_stock(&hub_url, "fridge-1").await?).is_disjoint(&archived));

    // The fridge rebases and keeps selling on the new epoch.
    converged(&hub_url, &[&fridge]).await?;
    assert_eq!(
        available(&agent_stock(&fridge_url, "fridge-1").await?, SKU),
        15
    );
    orders.extend(sell(&fridge_url, [25]).await?);

    // The POS comes back: its old-epoch sales wait, it rebases, carries them over, and every
    // replica converges with all 21 sales and none of the archived units back.
    pos.set_network(true);
    synced(&pos_url, Duration::from_secs(30)).await?;
    converged(&hub_url, &[&fridge, &pos]).await?;
    let hub_units = unit_ids(&hub_stock(&hub_url, "fridge-1").await?);
    assert!(
        hub_units.is_disjoint(&archived),
        "no archived unit came back"
    );
    assert_eq!(available(&hub_stock(&hub_url, "fridge-1").await?, SKU), 9);
    for url in [&fridge_url, &pos_url] {
        let stock = agent_stock(url, "fridge-1").await?;
        assert_eq!(available(&stock, SKU), 9);
        assert!(unit_ids(&stock).is_disjoint(&archived));
    }
    let at_hub: BTreeSet<String> = hub_order_ids(&hub_url).await?.into_iter().collect();
    let acked: BTreeSet<String> = orders.iter().cloned().collect();
    assert_eq!(acked.len(), 21);
    assert_eq!(at_hub, acked, "every acknowledged sale is at the hub, once");
    for o in &offline {
        let (status, _) = get_order(&hub_url, o).await?;
        assert_eq!(status, 200, "offline order {o} at the hub");
    }

    // The old epoch retires once every replica acknowledged the new one.
    let hub_db = dir.path().join("hub").join("region-demo.db");
    eventually(Duration::from_secs(30), "epoch 0 to retire", || async {
        compact(&hub_url, 86_400).await.ok()?;
        (count(&hub_db, "SELECT COUNT(*) FROM changes WHERE epoch = 0").ok()? == 0).then_some(())
    })
    .await?;
    assert_eq!(
        count(&hub_db, "SELECT COUNT(*) FROM archive")?,
        30,
        "the archive keeps what left"
    );

    // On the devices: the old epoch's rows are gone, the archive answers for old orders.
    for (name, url) in [("fridge-1", &fridge_url), ("pos-1", &pos_url)] {
        let db = dir.path().join(name).join("agent.db");
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM ledger_changes WHERE epoch = 0")?,
            0
        );
        let archive = dir.path().join(name).join("archive.db");
        assert!(count(&archive, "SELECT COUNT(*) FROM archive")? >= 30);
        let resp = http()
            .get(format!("{url}/v1/orders/{}", orders[0]))
            .send()
            .await?;
        assert_eq!(
            resp.status().as_u16(),
            200,
            "archived order answered on {name}"
        );
    }

    // The audit chains held through the rebase and the carried-over change.
    let store = larder_hub::store::RegionStore::open(&hub_db)?;
    for d in larder_hub::audit::verify(&store)? {
        assert!(d.problems.is_empty(), "{}: {:?}", d.device, d.problems);
        assert!(d.entries > 0, "{} has an audit chain", d.device);
    }

    // A restart loads the new epoch's snapshot plus its changes into the same state.
    let digest = converged(&hub_url, &[&fridge, &pos]).await?;
    pos.shutdown().await;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    assert_eq!(pos.digests().await[0].state_digest, digest);
    pos.shutdown().await;
    fridge.shutdown().await;
    Ok(())
}

async fn get_order(hub_url: &str, order: &str) -> anyhow::Result<(u16, Value)> {
    let resp = http()
        .get(format!("{hub_url}/v1/regions/demo/orders?limit=10000"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    let found = body["orders"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["order_id"] == order).cloned());
    Ok(match found {
        Some(o) => (status, o),
        None => (404, Value::Null),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_replica_does_not_hold_retirement_back_and_still_merges_when_back()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.compaction.dormant_after_seconds = 1;
    })
    .await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let pos = start_agent(dir.path(), &hub, "pos-2", Role::Pos, &["fridge-1"]).await?;
    let (fridge_url, pos_url) = (
        format!("http://{}", fridge.http_addr),
        format!("http://{}", pos.http_addr),
    );
    synced(&fridge_url, Duration::from_secs(20)).await?;
    synced(&pos_url, Duration::from_secs(20)).await?;
    refill(&fridge_url, "fridge-1", "unit", SKU, 10).await?;
    eventually(
        Duration::from_secs(20),
        "the POS to see the refill",
        || async {
            (available(&agent_stock(&pos_url, "fridge-1").await.ok()?, SKU) == 10).then_some(())
        },
    )
    .await?;
    cut_off(&pos).await?;
    let late = sell(&pos_url, [0]).await?;
    sell(&fridge_url, 1..4).await?;
    synced(&fridge_url, Duration::from_secs(20)).await?;
    assert_eq!(compact(&hub_url, 0).await?["ledgers"][0]["epoch"], 1);

    // The offline POS never acknowledges epoch 1; once it counts as dormant, epoch 0 retires.
    let hub_db = dir.path().join("hub").join("region-demo.db");
    eventually(
        Duration::from_secs(30),
        "epoch 0 to retire without the POS",
        || async {
            compact(&hub_url, 86_400).await.ok()?;
            (count(&hub_db, "SELECT COUNT(*) FROM changes WHERE epoch = 0").ok()? == 0)
                .then_some(())
        },
    )
    .await?;

    // Back, it gets the new epoch's snapshot and its late sale is merged.
    pos.set_network(true);
    synced(&pos_url, Duration::from_secs(30)).await?;
    converged(&hub_url, &[&fridge, &pos]).await?;
    assert_eq!(available(&hub_stock(&hub_url, "fridge-1").await?, SKU), 6);
    let at_hub = hub_order_ids(&hub_url).await?;
    assert!(at_hub.contains(&late[0]), "the late sale reached the hub");
    assert_eq!(at_hub.len(), 4);
    pos.shutdown().await;
    fridge.shutdown().await;
    Ok(())
}
