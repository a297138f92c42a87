//! Topic isolation on the embedded broker, which has no per-topic access control: an admitted
//! device that subscribes to another device's topics gets envelopes it can neither read nor
//! use. Their bodies are sealed between that device and the hub; passed off as its own they are
//! refused; replayed as they are, they change nothing.

use std::time::Duration;

use larder_demo::{REGION, agent_config, seeded_key};
use larder_shared::DeviceId;
use larder_shared::domain::Role;
use larder_shared::envelope::{self, BoxKey, EnvelopeError, MAX_MESSAGE_BYTES_DEFAULT};
use larder_tests::*;
use rumqttc::{Event, Packet, QoS};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reading_another_devices_topics_learns_and_gains_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let fridge_key = seeded_key(7, "fridge-1");
    let snoop_key = seeded_key(7, "pos-snoop");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &fridge_key.public(),
    )
    .await?;
    enroll(
        &hub_url,
        "pos-snoop",
        Role::Pos,
        &["fridge-1"],
        &snoop_key.public(),
    )
    .await?;

    // The snooping device is admitted (its own valid token) and subscribes to the fridge's
    // topics: nothing in the broker stops it.
    let snoop_id = DeviceId::new("pos-snoop")?;
    let (snoop, mut events) = larder_tests::ingest::connect(
        &hub.broker,
        &snoop_id,
        &snoop_key,
        1,
        MAX_MESSAGE_BYTES_DEFAULT + 1024,
    )
    .await?;
    snoop
        .subscribe(format!("larder/v1/{REGION}/d/fridge-1/+"), QoS::AtLeastOnce)
        .await?;
    // The subscription is in place before the fridge talks.
    tokio::time::timeout(WAIT, async {
        while !matches!(
            events.poll().await,
            Ok(Event::Incoming(Packet::SubAck(_))) | Err(_)
        ) {}
    })
    .await?;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let poller = tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = seen_tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });

    let config = agent_config(
        &dir.path().join("fridge"),
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    let agent = larder_agent::start(config, fridge_key.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "secret-unit", "lasagna", 2).await?;
    let (status, body) = sell_unit(
        &http(),
        &url,
        "fridge-1",
        "secret-unit-0",
        "lasagna",
        "k-secret",
    )
    .await?;
    anyhow::ensure!(status == 201, "{body}");
    synced(&url, WAIT).await?;

    // It saw the fridge's changes go up and the hub's acknowledgements come down.
    let mut up = Vec::new();
    let mut down = Vec::new();
    eventually(WAIT, "the snoop to see traffic both ways", || {
        while let Ok((topic, bytes)) = seen.try_recv() {
            if topic.ends_with("/up") {
                up.push(bytes);
            } else if topic.ends_with("/down") {
                down.push(bytes);
            }
        }
        let done = up.len() >= 2 && !down.is_empty();
        async move { done.then_some(()) }
    })
    .await?;
    for (bytes, sender_key) in up
        .iter()
        .map(|b| (b, fridge_key.public()))
        .chain(down.iter().map(|b| (b, hub.public_key)))
    {
        // Nothing of the sale travels in clear.
        for secret in [&b"secret-unit"[..], b"lasagna"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{} in clear",
                String::from_utf8_lossy(secret)
            );
        }
        // Genuine and signed, but sealed between the fridge and the hub: the snoop's key opens
        // nothing, whoever it pairs with.
        for peer in [fridge_key.public(), hub.public_key] {
            let verdict = envelope::open(bytes, MAX_MESSAGE_BYTES_DEFAULT)
                .and_then(|u| u.verify(bytes, &sender_key))
                .and_then(|v| v.open_sealed(&[&BoxKey::new(&snoop_key, &peer)]));
            assert_eq!(verdict, Err(EnvelopeError::Undecryptable));
        }
    }

    // Passed off as its own, on its own topic, the fridge's envelopes are refused; replayed on
    // the fridge's topic, they are the replays they are. The hub's state does not move.
    let before = hub_stock(&hub_url, "fridge-1").await?["state_digest"].clone();
    let (wrong_topic, replayed) = (
        hub.metrics.rejected_count(REGION, "wrong_topic"),
        hub.metrics.rejected_count(REGION, "replayed"),
    );
    for bytes in &up {
        snoop
            .publish(
                format!("larder/v1/{REGION}/d/pos-snoop/up"),
                QoS::AtLeastOnce,
                false,
                bytes.clone(),
            )
            .await?;
        snoop
            .publish(
                format!("larder/v1/{REGION}/d/fridge-1/up"),
                QoS::AtLeastOnce,
                false,
                bytes.clone(),
            )
            .await?;
    }
    let n = up.len() as u64;
    eventually(WAIT, "the hub to refuse every copy", || async {
        (hub.metrics.rejected_count(REGION, "wrong_topic") >= wrong_topic + n
            && hub.metrics.rejected_count(REGION, "replayed") >= replayed + n)
            .then_some(())
    })
    .await?;
    assert_eq!(
        hub_stock(&hub_url, "fridge-1").await?["state_digest"],
        before
    );
    poller.abort();
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
