//! `larder-hub-bench orders`: app orders placed, read and planned against a hub's HTTP API.

use super::*;

pub(super) const ORDER_FRIDGES: u32 = 1_000;

pub(super) const ORDER_SKUS: usize = 50;

pub(super) const UNITS_PER_SKU: usize = 4;

pub(super) const ORDERS_PLACED: usize = 5_000;

pub(super) const STATUS_READS: usize = 20_000;

pub(super) const PLANS: usize = 20;

/// The hub's order platform for a region of 1,000 fridges with 50 skus: app order placement,
/// order status reads and the refill plan, over HTTP. The region store is seeded before the
/// hub starts as if every fridge had enrolled and sent one refill of 4 units per sku (200,000
/// units), and every fridge is marked online, so orders take the ordinary (non-escrow) path.
///
/// One piece: a benchmark's run, setup to figures, as BENCHMARKS.md describes it.
pub(super) async fn orders() -> Result<()> {
    use larder_shared::catalog::CatalogItem;
    let dir = tempfile::tempdir_in(".")?;
    let hub_dir = dir.path().join("hub");
    let items: Vec<CatalogItem> = (0..ORDER_SKUS)
        .map(|i| CatalogItem {
            sku: larder_shared::Sku::new(format!("meal-{i:02}")).expect("sku"),
            name: format!("Meal {i}"),
            price_minor: 500 + i as i64,
            allergens: vec![],
            shelf_life_hours: 72,
        })
        .collect();
    let catalog_items = items.clone();
    // An external provider that captures on its own: orders stay reserved, as the bench wants.
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "whsec-bench-0123456789")?;
    let tweak = move |c: &mut larder_hub::config::HubConfig| {
        c.payments = Some(larder_hub::payments::PaymentsConfig {
            url: None,
            api_key_file: None,
            webhook_secret_file: secret_file.clone(),
            webhook_tolerance_seconds: 300,
        });
        c.regions[0].catalog = Some(larder_hub::config::CatalogConfig {
            currency: "EUR".into(),
            items: catalog_items.clone(),
        });
        c.orders.payment_provider = larder_hub::config::PaymentProviderMode::External;
    };
    let seeded = Instant::now();
    {
        let mut config = larder_demo::hub_config(
            &hub_dir,
            1883,
            ORDER_FRIDGES,
            larder_hub::http::token_sha256(ADMIN_TOKEN),
        )?;
        tweak(&mut config);
        std::fs::create_dir_all(&hub_dir)?;
        let region = config.regions[0].id.clone();
        let mut store = larder_hub::store::RegionStore::open(&config.region_db(&region))?;
        let now = larder_runtime::Clock::system().now_ms();
        let key = larder_demo::seeded_key(7, "bench").public();
        let mut batch = larder_hub::store::RegionBatch::default();
        for f in 1..=ORDER_FRIDGES {
            let fridge = larder_shared::FridgeId::new(format!("fridge-{f}"))?;
            let device = larder_shared::DeviceId::new(format!("fridge-{f}"))?;
            let mut ledger = larder_shared::ledger::Ledger::new(
                fridge.clone(),
                larder_shared::ledger::actor_for(&device),
            )?;
            let units = items
                .iter()
                .flat_map(|item| {
                    (0..UNITS_PER_SKU).map(move |n| larder_shared::domain::RefillUnit {
                        unit_id: larder_shared::UnitId::new(format!("f{f}-{}-{n}", item.sku))
                            .expect("unit"),
                        sku: item.sku.clone(),
                        expires_at_ms: now + 3 * 86_400_000,
                        batch: None,
                    })
                })
                .collect();
            let change = ledger.refill(
                &larder_shared::domain::Refill {
                    units,
                    order_id: None,
                },
                &device,
                now,
            )?;
            batch
                .units
                .extend(change.units.into_iter().map(|u| (fridge.clone(), u)));
            use sha2::Digest;
            for bytes in change.changes {
                batch.changes.push(larder_hub::store::StoredChange {
                    ledger: fridge.clone(),
                    author: device.clone(),
                    epoch: 0,
                    hash: sha2::Sha256::digest(&bytes).into(),
                    bytes,
                    hub_sig: None,
                });
            }
            batch.enroll.push(larder_hub::store::DeviceRecord {
                device_id: device,
                role: Role::Fridge,
                site: None,
                fridges: vec![fridge],
                public_key: key,
                enrolled_at_ms: now,
                revoked_at_ms: None,
                last_seen_ms: Some(now),
            });
            if f % 100 == 0 {
                store.commit(&std::mem::take(&mut batch))?;
            }
        }
    }
    println!("## The hub's orders for {ORDER_FRIDGES} fridges x {ORDER_SKUS} skus");
    println!(
        "seeded {} units in {:.1} s",
        ORDER_FRIDGES as usize * ORDER_SKUS * UNITS_PER_SKU,
        seeded.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let hub = start_hub_with(&hub_dir, ORDER_FRIDGES, tweak).await?;
    println!(
        "hub started (1,000 ledgers loaded) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for h in hub.regions.values() {
        let mut p = h.presence.write().expect("presence");
        for f in 1..=ORDER_FRIDGES {
            p.insert(larder_shared::DeviceId::new(format!("fridge-{f}"))?, true);
        }
    }
    let base = format!(
        "http://{}/v1/regions/{}",
        hub.http_addr,
        larder_demo::REGION
    );
    let client = http();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut placed = Vec::with_capacity(ORDERS_PLACED);
    let mut samples = Vec::with_capacity(ORDERS_PLACED);
    for i in 0..ORDERS_PLACED + 100 {
        let f = 1 + next(u64::from(ORDER_FRIDGES));
        let sku = next(ORDER_SKUS as u64);
        let body = serde_json::json!({"customer_id": format!("c-{i}"), "fridge_id": format!("fridge-{f}"),
            "lines": [{"sku": format!("meal-{sku:02}"), "quantity": 1}]});
        let start = Instant::now();
        let resp = client
            .post(format!("{base}/orders"))
            .bearer_auth(ADMIN_TOKEN)
            .header("Idempotency-Key", format!("bench-{i}"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let answer: serde_json::Value = resp.json().await?;
        let took = start.elapsed();
        if status != 201 {
            bail!("placing an order: {status} {answer}");
        }
        // The first hundred warm the connection and the caches.
        if i >= 100 {
            samples.push(took);
            placed.push(answer["order_id"].as_str().unwrap_or_default().to_owned());
        }
    }
    summary(
        "app order placement (HTTP, durable, replicated to the fridge's stream)",
        &mut samples,
        5.0,
    );
    let mut samples = Vec::with_capacity(STATUS_READS);
    for _ in 0..STATUS_READS {
        let id = &placed[next(placed.len() as u64) as usize];
        let start = Instant::now();
        let resp = client
            .get(format!("{base}/orders/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let ok = resp.status().is_success();
        let _ = resp.bytes().await?;
        samples.push(start.elapsed());
        if !ok {
            bail!("reading {id} failed");
        }
    }
    summary("order status read (HTTP)", &mut samples, 1.0);
    let mut http_samples = Vec::with_capacity(PLANS);
    let mut rows = 0;
    for _ in 0..PLANS {
        let start = Instant::now();
        let plan: serde_json::Value = client
            .get(format!("{base}/refill-plan"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        http_samples.push(start.elapsed());
        rows = plan["rows"].as_array().map_or(0, Vec::len);
    }
    let region = hub.regions.values().next().expect("a region").clone();
    let mut compute = Vec::with_capacity(PLANS);
    let mut counts = Vec::with_capacity(PLANS);
    let skus: Vec<String> = items.iter().map(|i| i.sku.to_string()).collect();
    // Tomorrow's plan: the next delivery is fixed while the kitchen asks again and again.
    let next_delivery = larder_runtime::Clock::system().now_ms() + 86_400_000;
    for _ in 0..PLANS {
        let start = Instant::now();
        let now = larder_runtime::Clock::system().now_ms();
        let (reply, rx) = tokio::sync::oneshot::channel();
        region
            .tx
            .send(larder_hub::region::RegionCommand::StockCounts {
                now_ms: now,
                before_ms: next_delivery,
                reply,
            })
            .await?;
        let stock = rx.await?;
        counts.push(start.elapsed());
        let subs = region.reads.subscriptions()?;
        let date = jiff::Timestamp::now()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .date();
        let scheduled = larder_hub::subscriptions::scheduled_on(&subs, &Default::default(), date);
        let plan =
            larder_hub::subscriptions::refill_plan(&region.config, &skus, &stock, &scheduled);
        compute.push(start.elapsed());
        assert_eq!(plan.len(), rows);
    }
    println!("refill plan: {rows} rows (fridge x sku)");
    summary(
        "  of which the stock counts from the region writer",
        &mut counts,
        50.0,
    );
    summary(
        "refill plan, computed (stock counts from the region writer + schedules + plan)",
        &mut compute,
        50.0,
    );
    summary(
        &format!("refill plan over HTTP (with its {rows}-row JSON)"),
        &mut http_samples,
        50.0,
    );
    println!();
    hub.shutdown().await;
    Ok(())
}
