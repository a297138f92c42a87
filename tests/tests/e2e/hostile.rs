//! Hostile clients of what is built, as the adversarial pass tried them: a refill tagged with
//! an unpaid app order, one order id claimed in two fridges or in the subscriptions' namespace,
//! and a POS selling another fridge's unit. Each is refused and changes nothing. Real hub,
//! agents, MQTT, HTTP and SQLite.

use std::time::Duration;

use larder_demo::REGION;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn expires() -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48)).to_string()
}

async fn place(hub_http: &str, fridge: &str, id: &str) -> anyhow::Result<(u16, Value)> {
    post(
        &format!("{hub_http}/v1/regions/{REGION}/orders"),
        &format!("place-{fridge}-{id}"),
        &json!({"customer_id": "cust-1", "fridge_id": fridge, "order_id": id,
            "lines": [{"sku": "lasagna", "quantity": 1}]}),
    )
    .await
}

async fn hub_order(hub_http: &str, id: &str) -> anyhow::Result<Value> {
    get(&format!("{hub_http}/v1/regions/{REGION}/orders/{id}")).await
}

async fn tagged_refill(url: &str, order: &str, unit: &str) -> anyhow::Result<(u16, Value)> {
    post(
        &format!("{url}/v1/refills"),
        &format!("tagged-{unit}"),
        &json!({"fridge_id": "fridge-1", "order_id": order, "units": [
            {"unit_id": unit, "sku": "lasagna", "expires_at": expires()}]}),
    )
    .await
}

/// A refill tagged with a reserved, unpaid app order (inside its grace window) does not make it
/// ready to pick: a POS may not tag refills at all, the fridge refuses an order that expects no
/// placement, and the order stays `reserved` everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refill_tagged_with_an_unpaid_order_does_not_skip_payment() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fp = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    refill(&fp.fridge_url, "fridge-1", "u", "lasagna", 2).await?;
    synced(&fp.fridge_url, WAIT).await?;
    let (status, body) = place(&hub_http, "fridge-1", "unpaid-1").await?;
    assert_eq!(
        (status, &body["status"]),
        (201, &json!("reserved")),
        "{body}"
    );
    eventually(WAIT, "the agents to see the order", || async {
        let mut seen = true;
        for url in [&fp.fridge_url, &fp.pos_url] {
            let o = get(&format!("{url}/v1/orders/unpaid-1")).await.ok()?;
            seen &= o["status"] == "reserved";
        }
        seen.then_some(())
    })
    .await?;

    let (status, body) = tagged_refill(&fp.pos_url, "unpaid-1", "t-pos").await?;
    assert_eq!(status, 422, "a POS does not place orders' units: {body}");
    let (status, body) = tagged_refill(&fp.fridge_url, "unpaid-1", "t-fridge").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("wrong_status")),
        "{body}"
    );
    let (status, body) = tagged_refill(&fp.fridge_url, "no-such-order", "t-none").await?;
    assert_eq!(status, 404, "{body}");

    synced(&fp.fridge_url, WAIT).await?;
    synced(&fp.pos_url, WAIT).await?;
    assert_eq!(
        hub_order(&hub_http, "unpaid-1").await?["status"],
        "reserved"
    );
    for url in [&fp.fridge_url, &fp.pos_url] {
        let o = get(&format!("{url}/v1/orders/unpaid-1")).await?;
        assert_eq!(o["status"], "reserved", "{url}: {o}");
        let stock = agent_stock(url, "fridge-1").await?;
        assert_eq!(
            stock["units"].as_array().map(Vec::len),
            Some(2),
            "no tagged unit loaded at {url}"
        );
    }
    Ok(())
}

/// An order id is one order in the region: placing it again in another fridge is 409 and
/// changes nothing, so the first order stays reachable; an id in the subscriptions' namespace
/// (`sub-…`) is refused, so no app can take an occurrence's id before it is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_ids_are_unique_in_the_region_and_occurrence_ids_cannot_be_claimed()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 2).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let mut agents = Vec::new();
    for f in ["fridge-1", "fridge-2"] {
        let agent = start_agent(dir.path(), &hub, f, Role::Fridge, &[f]).await?;
        let url = format!("http://{}", agent.http_addr);
        synced(&url, WAIT).await?;
        refill(&url, f, &format!("{f}-u"), "lasagna", 1).await?;
        synced(&url, WAIT).await?;
        agents.push(agent);
    }
    let (status, body) = place(&hub_http, "fridge-1", "twice").await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = place(&hub_http, "fridge-2", "twice").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("order_exists")),
        "{body}"
    );
    let first = hub_order(&hub_http, "twice").await?;
    assert_eq!(first["fridge_id"], "fridge-1", "{first}");
    assert_eq!(first["status"], "reserved");
    let stock = hub_stock(&hub_http, "fridge-2").await?;
    assert_eq!(
        available(&stock, "lasagna"),
        1,
        "nothing reserved in fridge-2"
    );

    let (status, body) = place(&hub_http, "fridge-1", "sub-0123456789ab-2030-01-01").await?;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sub-")),
        "{body}"
    );
    assert_eq!(hub_order_ids(&hub_http).await?, vec!["twice".to_owned()]);
    Ok(())
}

/// A POS serving two fridges sells a unit only from the fridge whose ledger holds it, and only
/// under its own sku: the other fridge's unit, or the unit as another sku, is refused with
/// nothing recorded; a unit no ledger knows is still sold (offline first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pos_sells_a_unit_only_from_its_own_fridge_and_under_its_own_sku() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 2).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let pos = start_agent(
        dir.path(),
        &hub,
        "pos-1",
        Role::Pos,
        &["fridge-1", "fridge-2"],
    )
    .await?;
    let pos_url = format!("http://{}", pos.http_addr);
    synced(&pos_url, WAIT).await?;
    let (status, report) = post(
        &format!("{hub_http}/v1/regions/{REGION}/imports/units"),
        "load",
        &json!({"rows": [{"line": 2, "unit_id": "f2-lasagna", "fridge_id": "fridge-2",
            "sku": "lasagna", "expires_at": expires()}]}),
    )
    .await?;
    assert_eq!((status, &report["accepted"]), (200, &json!(1)), "{report}");
    eventually(WAIT, "the POS to hold fridge-2's unit", || async {
        let stock = agent_stock(&pos_url, "fridge-2").await.ok()?;
        (available(&stock, "lasagna") == 1).then_some(())
    })
    .await?;

    let client = http();
    let (status, body) =
        sell_unit(&client, &pos_url, "fridge-1", "f2-lasagna", "lasagna", "s1").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("unit_not_available")),
        "fridge-2's unit sold as fridge-1's: {body}"
    );
    let (status, body) = sell_unit(
        &client,
        &pos_url,
        "fridge-2",
        "f2-lasagna",
        "soup-lentil",
        "s2",
    )
    .await?;
    assert_eq!(status, 422, "sold under another sku's price: {body}");
    let (status, body) = sell_unit(
        &client,
        &pos_url,
        "fridge-1",
        "f2-lasagna",
        "soup-lentil",
        "s3",
    )
    .await?;
    assert_eq!(status, 409, "{body}");
    // Its own fridge sells it, and a unit nobody has loaded yet still sells.
    let (status, body) =
        sell_unit(&client, &pos_url, "fridge-2", "f2-lasagna", "lasagna", "s4").await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = sell_unit(
        &client,
        &pos_url,
        "fridge-1",
        "not-yet-loaded",
        "lasagna",
        "s5",
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    synced(&pos_url, WAIT).await?;
    let orders = hub_order_ids(&hub_http).await?;
    assert_eq!(orders.len(), 2, "only the two good sales: {orders:?}");
    Ok(())
}

/// A web page shown on the device cannot drive its agent: a cross-site form post (`text/plain`
/// with a foreign `Origin`), a JSON post from another origin, and a request under a rebound
/// domain name are refused and change nothing; the device's own apps (no `Origin`, the
/// address or `localhost` as `Host`) are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_on_the_device_cannot_drive_the_local_api() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let url = format!("http://{}", fridge.http_addr);
    let port = fridge.http_addr.port();
    synced(&url, WAIT).await?;
    let body = json!({"fridge_id": "fridge-1", "units": [
        {"unit_id": "csrf-1", "sku": "lasagna", "expires_at": expires()}]})
    .to_string();
    let attempts: [(&str, &str, Option<&str>, u16); 4] = [
        ("text/plain", "127.0.0.1", Some("http://evil.example"), 403),
        ("text/plain", "127.0.0.1", None, 415),
        (
            "application/json",
            "127.0.0.1",
            Some("http://evil.example"),
            403,
        ),
        ("application/json", "evil.example", None, 421),
    ];
    for (i, (content_type, host, origin, want)) in attempts.into_iter().enumerate() {
        let mut req = http()
            .post(format!("{url}/v1/refills"))
            .header("Idempotency-Key", format!("csrf-{i}"))
            .header("Content-Type", content_type)
            .header("Host", format!("{host}:{port}"))
            .body(body.clone());
        if let Some(origin) = origin {
            req = req.header("Origin", origin);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await?;
        assert_eq!(status, want, "attempt {i}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    let stock = agent_stock(&url, "fridge-1").await?;
    assert_eq!(stock["units"], json!([]), "nothing loaded: {stock}");
    // The device's own app, by address and as localhost, with its own origin.
    for (i, host) in ["127.0.0.1", "localhost"].into_iter().enumerate() {
        let resp = http()
            .post(format!("{url}/v1/refills"))
            .header("Idempotency-Key", format!("own-{i}"))
            .header("Content-Type", "application/json")
            .header("Host", format!("{host}:{port}"))
            .header("Origin", format!("http://{host}:{port}"))
            .body(
                json!({"fridge_id": "fridge-1", "units": [
                    {"unit_id": format!("own-{i}"), "sku": "lasagna", "expires_at": expires()}]})
                .to_string(),
            )
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 201, "{host}");
    }
    Ok(())
}

/// Refusals are not stored without limit: 300 refused cancels of a completed sale are each
/// answered 409, and its history holds one `cancel_rejected`, at the agent and at the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cancel_is_recorded_once_however_often_it_is_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fp = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    refill(&fp.fridge_url, "fridge-1", "c", "lasagna", 1).await?;
    eventually(WAIT, "the POS to see the unit", || async {
        let stock = agent_stock(&fp.pos_url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == 1).then_some(())
    })
    .await?;
    let (status, sale) =
        sell_unit(&http(), &fp.pos_url, "fridge-1", "c-0", "lasagna", "sale").await?;
    assert_eq!(status, 201, "{sale}");
    let order = sale["order_id"].as_str().unwrap_or_default().to_owned();
    for i in 0..300 {
        let (status, body) = post(
            &format!("{}/v1/orders/{order}/cancel", fp.pos_url),
            &format!("cancel-{i}"),
            &json!({}),
        )
        .await?;
        assert_eq!(status, 409, "{body}");
    }
    synced(&fp.pos_url, WAIT).await?;
    let refusals = |o: &Value| {
        o["history"].as_array().map_or(0, |h| {
            h.iter()
                .filter(|e| e["status"] == "cancel_rejected")
                .count()
        })
    };
    let at_pos = get(&format!("{}/v1/orders/{order}", fp.pos_url)).await?;
    assert_eq!(refusals(&at_pos), 1, "{at_pos}");
    eventually(WAIT, "the hub to hold the refusal", || async {
        let o = get(&format!("{hub_http}/v1/regions/{REGION}/orders/{order}"))
            .await
            .ok()?;
        (refusals(&o) == 1).then_some(())
    })
    .await?;
    Ok(())
}

/// Whether the hub shows `device` online (its devices listing).
async fn hub_says_online(hub_http: &str, device: &str) -> anyhow::Result<bool> {
    let v = get(&format!("{hub_http}/v1/regions/{REGION}/devices")).await?;
    Ok(v["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device_id"] == device))
        .is_some_and(|d| d["online"] == true))
}

/// An admitted device cannot take another device on or off line, nor bring back an `online`
/// it captured after that device went away, nor remove the region's retained catalog: the
/// hub takes only presence the device signed for its current connection, and puts its
/// catalog back, so a POS that connects afterwards still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_device_cannot_fake_presence_or_remove_the_catalog() -> anyhow::Result<()> {
    use larder_shared::DeviceId;
    use larder_shared::topics::{self, DeviceTopic};
    use rumqttc::{Event, Packet, QoS};
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    synced(&format!("http://{}", fridge.http_addr), WAIT).await?;
    let evil_key = larder_demo::seeded_key(7, "pos-evil");
    enroll(
        &hub_http,
        "pos-evil",
        Role::Pos,
        &["fridge-1"],
        &evil_key.public(),
    )
    .await?;
    let region = larder_shared::RegionId::new(REGION)?;
    let fridge_presence =
        topics::device(&region, &DeviceId::new("fridge-1")?, DeviceTopic::Presence);
    let (evil, mut events) = larder_tests::ingest::connect(
        &hub.broker,
        &DeviceId::new("pos-evil")?,
        &evil_key,
        1,
        1 << 20,
    )
    .await?;
    evil.subscribe(&fridge_presence, QoS::AtLeastOnce).await?;
    // The fridge's own retained `online`, captured.
    let captured = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = events.poll().await
                && p.topic == fridge_presence
            {
                return p.payload.to_vec();
            }
        }
    })
    .await?;
    let (tx, mut polled) = tokio::sync::mpsc::unbounded_channel();
    let poller = tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            let _ = tx.send(ev);
        }
    });
    let refused = |reason: &'static str| {
        let hub_http = hub_http.clone();
        async move {
            let text = metrics_text(&hub_http).await.ok()?;
            text.lines()
                .find(|l| {
                    l.starts_with("larder_hub_envelopes_rejected_total{")
                        && l.contains(&format!("reason=\"{reason}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        }
    };

    // A plain `offline` in the fridge's name is not taken.
    assert!(hub_says_online(&hub_http, "fridge-1").await?);
    evil.publish(&fridge_presence, QoS::AtLeastOnce, true, "offline")
        .await?;
    eventually(WAIT, "the forged offline refused", || async {
        (refused("bad_presence").await? >= 1).then_some(())
    })
    .await?;
    assert!(
        hub_says_online(&hub_http, "fridge-1").await?,
        "a forged offline was taken"
    );

    // The fridge goes away; its captured `online` brought back is not taken.
    cut_off(&fridge).await?;
    eventually(WAIT, "the hub to see the fridge go", || async {
        (!hub_says_online(&hub_http, "fridge-1").await.ok()?).then_some(())
    })
    .await?;
    evil.publish(&fridge_presence, QoS::AtLeastOnce, true, captured)
        .await?;
    eventually(WAIT, "the replayed online refused", || async {
        (refused("bad_presence").await? >= 2).then_some(())
    })
    .await?;
    assert!(
        !hub_says_online(&hub_http, "fridge-1").await?,
        "a replayed online was taken"
    );

    // The retained catalog deleted: the hub puts it back, and a POS connecting after gets it.
    evil.publish(
        topics::catalog(&region),
        QoS::AtLeastOnce,
        true,
        Vec::<u8>::new(),
    )
    .await?;
    eventually(WAIT, "the catalog put back", || async {
        (refused("catalog_overwritten").await? >= 1).then_some(())
    })
    .await?;
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    synced(&format!("http://{}", pos.http_addr), WAIT).await?;
    poller.abort();
    while polled.try_recv().is_ok() {}
    Ok(())
}
