//! A flapping network: a fridge and two POS terminals sell through their agents while a
//! fault-injecting TCP proxy between each agent and the hub's broker cuts its link every 1 to
//! 30 s (a reset or a blackhole, for 0.1 to 5 s). Every sale answered 201 reaches the hub
//! exactly once, every replica converges with the hub's, and after every cut traffic flows
//! again within two keepalive intervals of the link coming back.
//!
//! CI runs 60 s of flapping (about a dozen cuts); `LARDER_FLAP_SECONDS=3600` runs the hour.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_shared::domain::Role;
use larder_tests::flaky::{FlakyProxy, Link};
use larder_tests::*;

const KEEPALIVE_SECONDS: u64 = 5;

/// splitmix64, for the cut schedule.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One link's history: when it came back up after each cut, and when it was cut next.
struct Flaps {
    ups: Vec<(Instant, Option<Instant>)>,
    cuts: u64,
    resets: u64,
}

async fn flap(proxy: &FlakyProxy, seed: u64, until: Instant) -> Flaps {
    let mut rng = seed;
    let mut flaps = Flaps {
        ups: Vec::new(),
        cuts: 0,
        resets: 0,
    };
    loop {
        let up_for = Duration::from_millis(1_000 + next(&mut rng) % 29_001);
        let cut_at = Instant::now() + up_for;
        if cut_at >= until {
            tokio::time::sleep_until(until.into()).await;
            return flaps;
        }
        tokio::time::sleep_until(cut_at.into()).await;
        if let Some(last) = flaps.ups.last_mut() {
            last.1 = Some(Instant::now());
        }
        let reset = next(&mut rng).is_multiple_of(2);
        proxy.set(if reset { Link::Reset } else { Link::Blackhole });
        flaps.cuts += 1;
        flaps.resets += u64::from(reset);
        tokio::time::sleep(Duration::from_millis(100 + next(&mut rng) % 4_901)).await;
        proxy.set(Link::Up);
        flaps.ups.push((Instant::now(), None));
    }
}

/// Sells units `{prefix}-0..n` one by one at `pace`, until `until` or the units run out;
/// returns the orders answered 201.
async fn sell(
    url: String,
    prefix: &'static str,
    n: usize,
    pace: Duration,
    until: Instant,
) -> anyhow::Result<Vec<String>> {
    let client = http();
    let mut orders = Vec::new();
    for i in 0..n {
        if Instant::now() >= until {
            break;
        }
        let unit = format!("{prefix}-{i}");
        let (status, body) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &unit,
            "lasagna",
            &format!("sale-{unit}"),
        )
        .await?;
        anyhow::ensure!(status == 201, "sale of {unit}: {status} {body}");
        let order = body["order_id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no order id in {body}"))?;
        orders.push(order.to_owned());
        tokio::time::sleep(pace).await;
    }
    Ok(orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_survive_a_flapping_network_and_links_recover_within_two_keepalives()
-> anyhow::Result<()> {
    let seconds: u64 = std::env::var("LARDER_FLAP_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path(), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let devices = [
        ("fridge-1", Role::Fridge, "a"),
        ("pos-1", Role::Pos, "b"),
        ("pos-2", Role::Pos, "c"),
    ];
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for (name, role, _) in devices {
        let proxy = FlakyProxy::start(hub.broker.clone()).await?;
        let via = proxy.addr.to_string();
        let agent = start_agent_with(
            dir.path(),
            &hub,
            name,
            role,
            &["fridge-1"],
            |c| {
                c.mqtt.broker = via.clone();
                c.mqtt.keepalive_seconds = KEEPALIVE_SECONDS;
                // Reconnect attempts at most a keepalive apart.
                c.mqtt.reconnect_delay_ms_max = KEEPALIVE_SECONDS * 1000;
                // Every unit may be sold at the fridge or the POS: no escrow for the hub.
                c.orders.escrow_share = 0.0;
            },
            larder_runtime::Clock::system(),
        )
        .await?;
        proxies.push(proxy);
        agents.push(agent);
    }
    let urls: Vec<String> = agents
        .iter()
        .map(|a| format!("http://{}", a.http_addr))
        .collect();
    for url in &urls {
        synced(url, Duration::from_secs(30)).await?;
    }
    // Units for each seller, loaded before the flapping starts and seen by every replica.
    let per_seller = 200;
    for (_, _, prefix) in devices {
        refill(&urls[0], "fridge-1", prefix, "lasagna", per_seller).await?;
    }
    for url in &urls {
        eventually(
            Duration::from_secs(30),
            "every replica to see the refills",
            || async {
                (available(&agent_stock(url, "fridge-1").await.ok()?, "lasagna")
                    == 3 * per_seller as u64)
                    .then_some(())
            },
        )
        .await?;
    }

    let until = Instant::now() + Duration::from_secs(seconds);
    let pace = Duration::from_millis((seconds * 1000 / per_seller as u64).max(50));
    let proxies: Vec<Arc<FlakyProxy>> = proxies.into_iter().map(Arc::new).collect();
    let flapping: Vec<_> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.clone();
            tokio::spawn(async move { flap(&p, 0x5eed + i as u64, until).await })
        })
        .collect();
    let selling: Vec<_> = devices
        .iter()
        .zip(&urls)
        .map(|((_, _, prefix), url)| {
            tokio::spawn(sell(url.clone(), prefix, per_seller, pace, until))
        })
        .collect();
    let mut flaps = Vec::new();
    for f in flapping {
        flaps.push(f.await?);
    }
    let mut sold = Vec::new();
    for s in selling {
        sold.push(s.await?);
    }
    let mut acknowledged = BTreeSet::new();
    for orders in sold {
        for o in orders? {
            anyhow::ensure!(acknowledged.insert(o.clone()), "order {o} answered twice");
        }
    }

    // After every cut, traffic reached the device again within two keepalive intervals of
    // the link coming back (or the link was cut again before that much time had passed).
    let bound = Duration::from_secs(2 * KEEPALIVE_SECONDS);
    let mut worst = Duration::ZERO;
    let (mut cuts, mut resets) = (0, 0);
    for (proxy, f) in proxies.iter().zip(&flaps) {
        cuts += f.cuts;
        resets += f.resets;
        for (up, cut) in &f.ups {
            let end = cut.unwrap_or(until);
            let resumed = proxy
                .first_downstream_since(*up)
                .filter(|t| *t < end)
                .unwrap_or(end);
            let waited = resumed - *up;
            worst = worst.max(waited);
            anyhow::ensure!(
                waited <= bound,
                "no traffic for {waited:?} after the link came back (bound {bound:?})"
            );
        }
    }
    println!(
        "{seconds} s of flapping: {cuts} cuts ({resets} resets, {} blackholes), {} sales answered 201, longest wait for traffic after a cut {worst:?}",
        cuts - resets,
        acknowledged.len()
    );
    anyhow::ensure!(
        cuts >= 3,
        "only {cuts} cuts: the run was too short to test anything"
    );

    // The network heals: everything converges, every acknowledged sale at the hub once.
    for url in &urls {
        synced(url, Duration::from_secs(60)).await?;
    }
    let at_hub = eventually(Duration::from_secs(60), "every sale at the hub", || async {
        let ids = hub_order_ids(&hub_http).await.ok()?;
        (ids.len() >= acknowledged.len()).then_some(ids)
    })
    .await?;
    let unique: BTreeSet<String> = at_hub.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        at_hub.len(),
        "an order listed twice at the hub"
    );
    assert_eq!(
        unique, acknowledged,
        "the hub's orders are the acknowledged sales"
    );
    let hub_view = hub_stock(&hub_http, "fridge-1").await?;
    let expected = 3 * per_seller as u64 - acknowledged.len() as u64;
    assert_eq!(available(&hub_view, "lasagna"), expected);
    let hub_digest = hub_view["state_digest"].clone();
    for a in &agents {
        eventually(
            Duration::from_secs(60),
            "every replica equal to the hub's",
            || async {
                (serde_json::json!(a.digests().await[0].state_digest) == hub_digest).then_some(())
            },
        )
        .await?;
    }
    for a in agents {
        a.shutdown().await;
    }
    hub.shutdown().await;
    Ok(())
}
