//! Measures the ledger's per-command cost as a document grows: refill N units, then sell them
//! one by one, timing each sale (the pure core, no IO).
//!
//! `cargo run --release -p larder-shared --example ledger_cost -- 20000 [merge batch size]`

use std::time::Instant;

use larder_shared::catalog::{Catalog, CatalogItem};
use larder_shared::domain::{Channel, Payment, PaymentMethod, Refill, RefillUnit, Sale, SaleLine};
use larder_shared::ledger::{Ledger, actor_for};
use larder_shared::{DeviceId, FridgeId, OrderId, Sku, UnitId};

/// One piece: the example's measurement from start to print.
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000);
    let dev = DeviceId::new("fridge-1").expect("id");
    let mut l =
        Ledger::new(FridgeId::new("fridge-1").expect("id"), actor_for(&dev)).expect("ledger");
    let sku = Sku::new("lasagna").expect("sku");
    let catalog = Catalog {
        version: 1,
        currency: "EUR".into(),
        items: vec![CatalogItem {
            sku: sku.clone(),
            name: "L".into(),
            price_minor: 890,
            allergens: vec![],
            shelf_life_hours: 72,
        }],
    };
    let start = Instant::now();
    let mut refill_changes = Vec::new();
    for chunk in 0..n.div_ceil(1000) {
        let units = (chunk * 1000..((chunk + 1) * 1000).min(n))
            .map(|i| RefillUnit {
                unit_id: UnitId::new(format!("u{i}")).expect("id"),
                sku: sku.clone(),
                expires_at_ms: i64::MAX / 2,
                batch: None,
            })
            .collect();
        let change = l
            .refill(
                &Refill {
                    units,
                    order_id: None,
                },
                &dev,
                0,
            )
            .expect("refill");
        refill_changes.extend(change.changes);
    }
    println!("refill of {n} units: {:?}", start.elapsed());
    let mut samples = Vec::with_capacity(n);
    let mut view_samples = Vec::with_capacity(n);
    let mut bytes = 0usize;
    let mut all_changes = Vec::with_capacity(n);
    for i in 0..n {
        let sale = Sale {
            order_id: OrderId::new(format!("o{i}")).expect("id"),
            channel: Channel::Fridge,
            lines: vec![SaleLine {
                sku: sku.clone(),
                unit_id: Some(UnitId::new(format!("u{i}")).expect("id")),
                quantity: 1,
            }],
            payment: Payment {
                method: PaymentMethod::Card,
                amount_minor: 890,
                currency: "EUR".into(),
            },
            payment_pending: false,
        };
        let t = Instant::now();
        let (change, _) = l.sell(&sale, &catalog, &dev, 1).expect("sale");
        samples.push(t.elapsed());
        bytes += change.changes.iter().map(Vec::len).sum::<usize>();
        all_changes.extend(change.changes);
        let t = Instant::now();
        let _ = l.unit(&UnitId::new(format!("u{i}")).expect("id"), 0);
        let _ = l.order(&OrderId::new(format!("o{i}")).expect("id"));
        view_samples.push(t.elapsed());
    }
    for (name, s) in [("sell", &mut samples), ("views", &mut view_samples)] {
        let first: Vec<_> = s[..n / 10].to_vec();
        let last: Vec<_> = s[n - n / 10..].to_vec();
        let avg = |v: &[std::time::Duration]| {
            v.iter().map(|d| d.as_secs_f64()).sum::<f64>() / v.len() as f64 * 1e6
        };
        s.sort();
        println!(
            "{name}: first 10% avg {:.1} µs, last 10% avg {:.1} µs, p50 {:?}, p99 {:?}",
            avg(&first),
            avg(&last),
            s[n / 2],
            s[n * 99 / 100]
        );
    }
    println!("change bytes per sale: {}", bytes / n);
    // A replica that has the refills merges the sales in batches, as the hub does.
    let mut replica = Ledger::load(
        FridgeId::new("fridge-1").expect("id"),
        actor_for(&DeviceId::new("hub").expect("id")),
        None,
        &[],
    )
    .expect("replica");
    replica.apply_changes(&refill_changes).expect("refills");
    let t = Instant::now();
    let mut check = std::time::Duration::ZERO;
    let batch_size: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    for batch in all_changes.chunks(batch_size) {
        let c = Instant::now();
        Ledger::check_authors(batch, &actor_for(&dev)).expect("authors");
        check += c.elapsed();
        replica.apply_changes(batch).expect("merge");
    }
    println!(
        "merge of {n} sale changes in batches of {batch_size}: {:?} (author checks {:?})",
        t.elapsed(),
        check
    );
    let t = Instant::now();
    let saved = l.save();
    println!("save: {} bytes in {:?}", saved.len(), t.elapsed());
}
