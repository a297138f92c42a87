//! Hostile envelopes against a running hub: forged signature, unknown device, revoked device,
//! replay, another device's topic, a change authored by another actor, wrong region, oversized
//! and malformed payloads. Each is rejected and counted by reason, the hub's state does not
//! change, and an honest POS keeps syncing during the flood.

use std::time::Duration;

use larder_shared::domain::{Refill, RefillUnit, Role};
use larder_shared::envelope::{
    Batch, Body, BoxKey, Entry, Envelope, Header, MAX_MESSAGE_BYTES_DEFAULT, PROTOCOL_VERSION,
    Party,
};
use larder_shared::ledger::{Ledger, actor_for};
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{FridgeId, RegionId, SecretKey, Sku, UnitId};
use larder_tests::*;
use rumqttc::{AsyncClient, MqttOptions, QoS};

const FLOOD: u64 = 20;
/// Hostile envelopes sent in all: the named cases, their replays and mutants of a valid one.
const CASES_TOTAL: u64 = 10_000;

/// Every envelope the hub rejected in the test region, whatever the reason.
async fn rejected_total(hub_url: &str) -> anyhow::Result<u64> {
    let text = metrics_text(hub_url).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("larder_hub_envelopes_rejected_total{") && l.contains("region=\"demo\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

fn change(author: &str, unit: &str) -> Vec<u8> {
    let mut l = Ledger::new(
        FridgeId::new("fridge-1").expect("id"),
        actor_for(&device(author)),
    )
    .expect("ledger");
    l.refill(
        &Refill {
            units: vec![RefillUnit {
                unit_id: UnitId::new(unit).expect("id"),
                sku: Sku::new("lasagna").expect("sku"),
                expires_at_ms: i64::MAX / 2,
                batch: None,
            }],
            order_id: None,
        },
        &device(author),
        0,
    )
    .expect("refill")
    .changes
    .remove(0)
}

/// A well-formed envelope, sealed to the hub and signed by `key`.
fn envelope(
    region: &str,
    sender: &str,
    seq: u64,
    changes: Vec<Vec<u8>>,
    key: &SecretKey,
) -> Vec<u8> {
    batch_envelope(region, sender, seq, changes, key)
        .seal_to(key, &BoxKey::new(key, &hub_public_key()))
        .expect("a nonce")
}

fn batch_envelope(
    region: &str,
    sender: &str,
    seq: u64,
    changes: Vec<Vec<u8>>,
    key: &SecretKey,
) -> Envelope {
    // A well-formed audit chain from the sender's first entry, signed at its head.
    let ledger = FridgeId::new("fridge-1").expect("id");
    let mut head = larder_shared::audit::GENESIS;
    let entries = changes
        .into_iter()
        .enumerate()
        .map(|(i, change)| {
            let seq = i as u64 + 1;
            let prev = head;
            head = larder_shared::audit::entry_hash(
                &prev,
                &device(sender),
                seq,
                &ledger,
                0,
                &larder_shared::audit::change_digest(&change),
            );
            Entry {
                prev: Some(prev),
                ..Entry::change(seq, ledger.clone(), 0, change)
            }
        })
        .collect::<Vec<_>>();
    let up_to = entries.len() as u64;
    let head_sig = larder_shared::audit::sign_head(key, &device(sender), up_to, &head);
    Envelope {
        header: Header {
            region: RegionId::new(region).expect("id"),
            sender: Party::Device(device(sender)),
            recipient: Party::Hub,
            seq,
            sent_at_ms: 0,
        },
        body: Body::Changes(Batch {
            after: 0,
            up_to,
            entries,
            head_sig: Some(head_sig),
        }),
    }
}

fn broker_port(broker: &str) -> u16 {
    broker
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("broker port")
}

fn connect_token(key: &SecretKey, device_name: &str) -> String {
    larder_shared::auth::connect_token(
        key,
        &device(device_name),
        larder_runtime::Clock::system().now_ms(),
        [7; 16],
    )
}

/// Connects with these credentials; true once the broker acknowledged the connection.
async fn connects(broker: &str, client_id: &str, password: Option<String>) -> bool {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", broker_port(broker));
    if let Some(p) = password {
        opts.set_credentials(client_id, p);
    }
    let (_client, mut events) = AsyncClient::new(opts, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return ack.code == rumqttc::ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    outcome.await.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_admits_only_enrolled_devices_with_fresh_tokens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let pos = larder_demo::seeded_key(9, "pos-1");
    let gone = larder_demo::seeded_key(9, "gone-pos");
    enroll(&hub_url, "pos-1", Role::Pos, &["fridge-1"], &pos.public()).await?;
    enroll(
        &hub_url,
        "gone-pos",
        Role::Pos,
        &["fridge-1"],
        &gone.public(),
    )
    .await?;
    http()
        .delete(format!("{hub_url}/v1/regions/demo/devices/gone-pos"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    let now = larder_runtime::Clock::system().now_ms();
    let token = |key: &SecretKey, name: &str, at: i64, nonce: u8| {
        larder_shared::auth::connect_token(key, &device(name), at, [nonce; 16])
    };
    let fresh = token(&pos, "pos-1", now, 1);
    let cases: Vec<(&str, &str, Option<String>, bool)> = vec![
        ("a stranger without credentials", "stranger", None, false),
        (
            "a stranger with a made-up password",
            "stranger",
            Some("secret".into()),
            false,
        ),
        (
            "an enrolled device with a fresh token",
            "pos-1",
            Some(fresh.clone()),
            true,
        ),
        ("the same token again", "pos-1", Some(fresh), false),
        (
            "a token signed by another key",
            "pos-1",
            Some(token(&gone, "pos-1", now, 2)),
            false,
        ),
        (
            "a stale token",
            "pos-1",
            Some(token(&pos, "pos-1", now - 10 * 60 * 1000, 3)),
            false,
        ),
        (
            "a revoked device",
            "gone-pos",
            Some(token(&gone, "gone-pos", now, 4)),
            false,
        ),
    ];
    for (name, client_id, password, admitted) in cases {
        assert_eq!(
            connects(&hub.broker, client_id, password).await,
            admitted,
            "{name}"
        );
    }
    let metrics = metrics_text(&hub_url).await?;
    for reason in [
        "unknown_device",
        "replayed_token",
        "bad_token",
        "stale_token",
        "revoked_device",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason} counted: {metrics}"
        );
    }
    hub.shutdown().await;
    Ok(())
}

fn up(device_name: &str) -> String {
    topics::device(
        &RegionId::new("demo").expect("id"),
        &device(device_name),
        DeviceTopic::Up,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_envelopes_are_rejected_and_counted() -> anyhow::Result<()> {
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
    refill(&fridge_url, "fridge-1", "honest", "lasagna", 80).await?;
    eventually(
        Duration::from_secs(20),
        "the POS to see the refill",
        || async {
            (available(&agent_stock(&pos_url, "fridge-1").await.ok()?, "lasagna") == 80)
                .then_some(())
        },
    )
    .await?;

    let evil = larder_demo::seeded_key(9, "evil-pos");
    let gone = larder_demo::seeded_key(9, "gone-pos");
    let ghost = larder_demo::seeded_key(9, "ghost");
    enroll(
        &hub_url,
        "evil-pos",
        Role::Pos,
        &["fridge-1"],
        &evil.public(),
    )
    .await?;
    enroll(
        &hub_url,
        "gone-pos",
        Role::Pos,
        &["fridge-1"],
        &gone.public(),
    )
    .await?;
    let revoked = http()
        .delete(format!("{hub_url}/v1/regions/demo/devices/gone-pos"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(revoked.status().as_u16(), 200);

    let forged_unit = change("pos-1", "forged-unit");
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "bad_signature",
            up("pos-1"),
            envelope("demo", "pos-1", 1_000, vec![forged_unit.clone()], &evil),
        ),
        (
            "unknown_device",
            up("ghost"),
            envelope(
                "demo",
                "ghost",
                1,
                vec![change("ghost", "ghost-unit")],
                &ghost,
            ),
        ),
        (
            "revoked_device",
            up("gone-pos"),
            envelope(
                "demo",
                "gone-pos",
                1,
                vec![change("gone-pos", "gone-unit")],
                &gone,
            ),
        ),
        (
            "wrong_topic",
            up("pos-1"),
            envelope(
                "demo",
                "evil-pos",
                1,
                vec![change("evil-pos", "topic-unit")],
                &evil,
            ),
        ),
        (
            "foreign_actor",
            up("evil-pos"),
            envelope("demo", "evil-pos", 2, vec![forged_unit.clone()], &evil),
        ),
        (
            "wrong_region",
            up("evil-pos"),
            envelope(
                "elsewhere",
                "evil-pos",
                3,
                vec![change("evil-pos", "region-unit")],
                &evil,
            ),
        ),
        (
            "oversized",
            up("evil-pos"),
            vec![1u8; MAX_MESSAGE_BYTES_DEFAULT + 100],
        ),
        (
            "malformed",
            up("evil-pos"),
            [vec![PROTOCOL_VERSION], vec![0xff; 200]].concat(),
        ),
        (
            "version",
            up("evil-pos"),
            [vec![1u8], vec![0xff; 200]].concat(),
        ),
        // Signed by the sender but sent in clear: every body on a device topic is sealed.
        (
            "not_sealed",
            up("evil-pos"),
            batch_envelope(
                "demo",
                "evil-pos",
                4,
                vec![change("evil-pos", "clear-unit")],
                &evil,
            )
            .seal(&evil),
        ),
        // Sealed, but not to the hub: the hub cannot open it.
        (
            "undecryptable",
            up("evil-pos"),
            batch_envelope(
                "demo",
                "evil-pos",
                5,
                vec![change("evil-pos", "unopened-unit")],
                &evil,
            )
            .seal_to(&evil, &BoxKey::new(&evil, &evil.public()))
            .expect("a nonce"),
        ),
    ];

    // The attacker is a compromised but enrolled device: the broker admits it, so everything
    // below reaches the hub's own checks.
    let mut opts = MqttOptions::new("evil-pos", "127.0.0.1", broker_port(&hub.broker));
    opts.set_credentials("evil-pos", connect_token(&evil, "evil-pos"));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (attacker, mut events) = AsyncClient::new(opts, 1_024);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });

    // The honest POS sells while the flood goes on.
    let honest = tokio::spawn({
        let pos_url = pos_url.clone();
        async move {
            let client = http();
            for i in 0..30 {
                let (s, b) = sell_unit(
                    &client,
                    &pos_url,
                    "fridge-1",
                    &format!("honest-{i}"),
                    "lasagna",
                    &format!("h{i}"),
                )
                .await?;
                anyhow::ensure!(s == 201, "honest sale {i}: {b}");
            }
            anyhow::Ok(())
        }
    });
    for _ in 0..FLOOD {
        for (_, topic, bytes) in &cases {
            attacker
                .publish(topic.as_str(), QoS::AtLeastOnce, false, bytes.clone())
                .await?;
        }
    }
    let counts = |reason: &str| hub.metrics.rejected_count("demo", reason);
    for (reason, _, _) in &cases {
        eventually(
            Duration::from_secs(30),
            &format!("{FLOOD} rejections for {reason}"),
            || async { (counts(reason) == FLOOD).then_some(()) },
        )
        .await?;
    }
    honest.await??;

    // A valid envelope is accepted once; its replays change nothing.
    let region = hub.regions.get(&RegionId::new("demo")?).expect("region");
    let valid = envelope(
        "demo",
        "evil-pos",
        50,
        vec![change("evil-pos", "evil-unit")],
        &evil,
    );
    attacker
        .publish(up("evil-pos"), QoS::AtLeastOnce, false, valid.clone())
        .await?;
    eventually(
        Duration::from_secs(20),
        "the valid envelope to be merged",
        || async {
            let s = hub_stock(&hub_url, "fridge-1").await.ok()?;
            s["units"]
                .as_array()?
                .iter()
                .any(|u| u["unit_id"] == "evil-unit")
                .then_some(())
        },
    )
    .await?;
    // Honest devices finish syncing first, so that only the replays could move the head.
    synced(&pos_url, Duration::from_secs(30)).await?;
    synced(&fridge_url, Duration::from_secs(30)).await?;
    let head_before = *region.head.borrow();
    for _ in 0..FLOOD {
        attacker
            .publish(up("evil-pos"), QoS::AtLeastOnce, false, valid.clone())
            .await?;
    }
    eventually(
        Duration::from_secs(20),
        "the replays to be rejected",
        || async { (counts("replayed") == FLOOD).then_some(()) },
    )
    .await?;
    assert_eq!(
        *region.head.borrow(),
        head_before,
        "a replay changed nothing"
    );

    // A storm of mutants of that accepted envelope (every kind of bit flip, truncation and
    // extension) brings the cases to 10,000, while the honest POS keeps selling: every mutant
    // is rejected, and nothing but the honest sales moves the hub.
    let named = cases.len() as u64 * FLOOD + FLOOD;
    let mutants: Vec<Vec<u8>> = (0..CASES_TOTAL - named)
        .map(|i| {
            let mut m = valid.clone();
            match i % 4 {
                0 | 1 => {
                    let bit = (i as usize * 7_919) % (m.len() * 8);
                    m[bit / 8] ^= 1 << (bit % 8);
                }
                2 => m.truncate((i as usize * 31) % m.len()),
                _ => m.extend_from_slice(&i.to_le_bytes()[..1 + i as usize % 8]),
            }
            m
        })
        .collect();
    let rejected_before = rejected_total(&hub_url).await?;
    let honest = tokio::spawn({
        let pos_url = pos_url.clone();
        async move {
            let client = http();
            for i in 30..40 {
                let (s, b) = sell_unit(
                    &client,
                    &pos_url,
                    "fridge-1",
                    &format!("honest-{i}"),
                    "lasagna",
                    &format!("h{i}"),
                )
                .await?;
                anyhow::ensure!(s == 201, "honest sale {i} during the storm: {b}");
            }
            anyhow::Ok(())
        }
    });
    for m in &mutants {
        attacker
            .publish(up("evil-pos"), QoS::AtLeastOnce, false, m.clone())
            .await?;
    }
    let n = mutants.len() as u64;
    eventually(
        Duration::from_secs(60),
        &format!("{n} mutants rejected"),
        || async {
            let now = rejected_total(&hub_url).await.ok()?;
            (now >= rejected_before + n).then_some(())
        },
    )
    .await?;
    assert_eq!(
        rejected_total(&hub_url).await?,
        rejected_before + n,
        "every mutant rejected once, nothing else"
    );
    honest.await??;
    eprintln!(
        "{} hostile envelopes in all: {named} named cases, {n} mutants",
        named + n
    );

    synced(&pos_url, Duration::from_secs(30)).await?;
    let stock = hub_stock(&hub_url, "fridge-1").await?;
    let ids: Vec<&str> = stock["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter_map(|u| u["unit_id"].as_str())
        .collect();
    for forged in [
        "forged-unit",
        "ghost-unit",
        "gone-unit",
        "topic-unit",
        "region-unit",
    ] {
        assert!(!ids.contains(&forged), "{forged} reached the hub");
    }
    assert_eq!(
        available(&stock, "lasagna"),
        80 - 40 + 1,
        "honest sales and the one valid refill only"
    );
    assert_eq!(
        hub_order_ids(&hub_url).await?.len(),
        40,
        "every honest sale reached the hub"
    );
    let metrics = metrics_text(&hub_url).await?;
    assert!(metrics.contains("reason=\"bad_signature\""), "{metrics}");
    poller.abort();
    pos.shutdown().await;
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

/// An attacker's MQTT connection as an enrolled device, with a fresh connect token. The
/// connection is retried while the broker is not listening yet (rumqttd gives no ready
/// signal); a refused token is not retried.
fn attacker_client(broker: &str, key: &SecretKey, name: &str) -> AsyncClient {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("randomness");
    let token = larder_shared::auth::connect_token(
        key,
        &device(name),
        larder_runtime::Clock::system().now_ms(),
        nonce,
    );
    let mut opts = MqttOptions::new(name, "127.0.0.1", broker_port(broker));
    opts.set_credentials(name, token);
    let (client, mut events) = AsyncClient::new(opts, 64);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(_) => {}
                Err(rumqttc::ConnectionError::Io(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => return,
            }
        }
    });
    client
}

/// Replays of an accepted envelope a day of hub time later, and after the hub restarted on its
/// store: both refused as `replayed` (the per-device sequence numbers are on disk), nothing
/// moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_a_day_later_and_after_a_hub_restart_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let offset = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let clock = larder_runtime::Clock::offset(offset.clone());
    let hub = start_hub_with_clock(&dir.path().join("hub"), 1, |_| {}, clock.clone()).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let evil = larder_demo::seeded_key(9, "evil-pos");
    enroll(
        &hub_url,
        "evil-pos",
        Role::Pos,
        &["fridge-1"],
        &evil.public(),
    )
    .await?;
    let region = RegionId::new("demo")?;
    let valid = envelope(
        "demo",
        "evil-pos",
        50,
        vec![change("evil-pos", "replayed-unit")],
        &evil,
    );
    let attacker = attacker_client(&hub.broker, &evil, "evil-pos");
    attacker
        .publish(up("evil-pos"), QoS::AtLeastOnce, false, valid.clone())
        .await?;
    eventually(
        Duration::from_secs(20),
        "the envelope to be merged",
        || async {
            let s = hub_stock(&hub_url, "fridge-1").await.ok()?;
            s["units"]
                .as_array()?
                .iter()
                .any(|u| u["unit_id"] == "replayed-unit")
                .then_some(())
        },
    )
    .await?;
    let head = *hub.regions.get(&region).expect("region").head.borrow();

    // A day later.
    offset.fetch_add(86_400_000, std::sync::atomic::Ordering::SeqCst);
    attacker
        .publish(up("evil-pos"), QoS::AtLeastOnce, false, valid.clone())
        .await?;
    eventually(
        Duration::from_secs(20),
        "the day-old replay refused",
        || async { (hub.metrics.rejected_count("demo", "replayed") == 1).then_some(()) },
    )
    .await?;
    assert_eq!(
        *hub.regions.get(&region).expect("region").head.borrow(),
        head
    );
    let _ = attacker.disconnect().await;
    hub.shutdown().await;

    // After a restart on the same store (a new broker, a new connection, a fresh token).
    let hub = start_hub_with_clock(&dir.path().join("hub"), 1, |_| {}, clock).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    assert_eq!(
        *hub.regions.get(&region).expect("region").head.borrow(),
        head,
        "the restarted hub holds what it held"
    );
    // The restarted hub subscribes to the device topics on its new broker shortly after it
    // starts, with no signal when it has: until then a publish reaches no one, so the replay is
    // sent again until the hub has seen one.
    let attacker = attacker_client(&hub.broker, &evil, "evil-pos");
    eventually(
        Duration::from_secs(20),
        "the replay after the restart refused",
        || async {
            if hub.metrics.rejected_count("demo", "replayed") >= 1 {
                return Some(());
            }
            let _ = attacker
                .publish(up("evil-pos"), QoS::AtLeastOnce, false, valid.clone())
                .await;
            None
        },
    )
    .await?;
    assert_eq!(
        *hub.regions.get(&region).expect("region").head.borrow(),
        head
    );
    let units = hub_stock(&hub_url, "fridge-1").await?["units"]
        .as_array()
        .map_or(0, |u| {
            u.iter().filter(|u| u["unit_id"] == "replayed-unit").count()
        });
    assert_eq!(units, 1, "the unit once, as before");
    let _ = attacker.disconnect().await;
    hub.shutdown().await;
    Ok(())
}
