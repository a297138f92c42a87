//! A fridge refills while a POS sells the same fridge's stock, both cut off from the hub; after
//! healing, the fridge, the POS and the hub hold identical ledgers.

use std::time::Duration;

use larder_shared::domain::Role;
use larder_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_refill_and_sales_converge() -> anyhow::Result<()> {
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

    refill(&fridge_url, "fridge-1", "first", "salad-quinoa", 20).await?;
    eventually(
        Duration::from_secs(20),
        "the POS to see the first refill",
        || async {
            (available(
                &agent_stock(&pos_url, "fridge-1").await.ok()?,
                "salad-quinoa",
            ) == 20)
                .then_some(())
        },
    )
    .await?;

    fridge.set_network(false);
    pos.set_network(false);
    eventually(Duration::from_secs(10), "both agents offline", || async {
        let f = health(&fridge_url).await.ok()?;
        let p = health(&pos_url).await.ok()?;
        (f["online"] == false && p["online"] == false).then_some(())
    })
    .await?;

    let client = http();
    let fridge_side = refill(&fridge_url, "fridge-1", "second", "curry-veg", 15);
    let pos_side = async {
        for i in 0..12 {
            let (s, b) = sell_unit(
                &client,
                &pos_url,
                "fridge-1",
                &format!("first-{i}"),
                "salad-quinoa",
                &format!("p{i}"),
            )
            .await?;
            anyhow::ensure!(s == 201, "sale {i}: {b}");
        }
        anyhow::Ok(())
    };
    let (a, b) = tokio::join!(fridge_side, pos_side);
    a?;
    b?;
    // Each side sees only its own edits while partitioned.
    assert_eq!(
        available(&agent_stock(&fridge_url, "fridge-1").await?, "salad-quinoa"),
        20
    );
    assert_eq!(
        available(&agent_stock(&pos_url, "fridge-1").await?, "curry-veg"),
        0
    );

    fridge.set_network(true);
    pos.set_network(true);
    synced(&fridge_url, Duration::from_secs(30)).await?;
    synced(&pos_url, Duration::from_secs(30)).await?;
    let digests = eventually(
        Duration::from_secs(30),
        "three identical replicas",
        || async {
            let f = fridge.digests().await.first()?.state_digest.clone();
            let p = pos.digests().await.first()?.state_digest.clone();
            let h = hub_stock(&hub_url, "fridge-1").await.ok()?["state_digest"]
                .as_str()?
                .to_owned();
            (f == p && p == h).then_some((f, p, h))
        },
    )
    .await?;
    assert_eq!(digests.0, digests.2);
    for url in [&fridge_url, &pos_url] {
        let s = agent_stock(url, "fridge-1").await?;
        assert_eq!(available(&s, "salad-quinoa"), 8, "{url}");
        assert_eq!(available(&s, "curry-veg"), 15, "{url}");
    }
    let h = hub_stock(&hub_url, "fridge-1").await?;
    assert_eq!(
        (available(&h, "salad-quinoa"), available(&h, "curry-veg")),
        (8, 15)
    );
    pos.shutdown().await;
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
