//! The embedded broker's memory per device: it keeps three segments of a downlink window and an
//! envelope (`sync.inflight_bytes_max` + `mqtt.max_message_bytes`) of a device's downlink, and
//! 3 MiB of any other filter (a wildcard an admitted device subscribes to), so a device away
//! with a persistent session gets the newest of what was routed to it, not everything; and a
//! hub whose downlink window is that small still brings a device up to date, a change larger
//! than the window included.

use std::time::Duration;

use larder_demo::{REGION, seeded_key};
use larder_shared::domain::Role;
use larder_shared::envelope::MAX_MESSAGE_BYTES_DEFAULT;
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, RegionId};
use larder_tests::ingest::connect_session;
use larder_tests::*;
use rumqttc::{Event, Packet, QoS};

const WAIT: Duration = Duration::from_secs(30);
/// The smallest downlink window the hub's config allows.
const WINDOW: usize = 16 * 1024;
/// The smallest largest envelope the hub's config allows.
const MESSAGE_MAX: usize = 16 * 1024;
/// What the hub gives each segment of a device's `down`: a window and one envelope.
const SEGMENT: usize = WINDOW + MESSAGE_MAX;
const MESSAGE_BYTES: usize = 1024;

/// Subscribes `away` to `filter` with a persistent session, disconnects it, has `sender`
/// publish `count` messages of `MESSAGE_BYTES` to `topic`, reconnects `away` and returns the
/// numbers of the messages it then gets, up to the last one.
async fn kept_while_away(
    hub: &larder_hub::HubHandle,
    (away, sender): (&str, &str),
    filter: &str,
    topic: &str,
    count: usize,
) -> anyhow::Result<Vec<usize>> {
    let hub_url = format!("http://{}", hub.http_addr);
    let (away, sender) = (DeviceId::new(away)?, DeviceId::new(sender)?);
    for d in [&away, &sender] {
        let key = seeded_key(9, d.as_str());
        enroll(
            &hub_url,
            d.as_str(),
            Role::Pos,
            &["fridge-1"],
            &key.public(),
        )
        .await?;
    }
    let away_key = seeded_key(9, away.as_str());
    let max_packet = MAX_MESSAGE_BYTES_DEFAULT + 1024;

    let (client, mut events) =
        connect_session(&hub.broker, &away, &away_key, 1, max_packet, false).await?;
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) =
            tokio::time::timeout(WAIT, events.poll()).await??
        {
            break;
        }
    }
    client.disconnect().await?;
    while tokio::time::timeout(WAIT, events.poll()).await?.is_ok() {}

    let sender_key = seeded_key(9, sender.as_str());
    let (client, mut events) =
        larder_tests::ingest::connect(&hub.broker, &sender, &sender_key, 1, max_packet).await?;
    let publishing = tokio::spawn({
        let (client, topic) = (client.clone(), topic.to_owned());
        async move {
            for i in 0..count {
                let mut payload = format!("{i:05}").into_bytes();
                payload.resize(MESSAGE_BYTES, b'.');
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await?;
            }
            anyhow::Ok(())
        }
    });
    let mut acked = 0;
    while acked < count {
        if let Event::Incoming(Packet::PubAck(_)) =
            tokio::time::timeout(WAIT, events.poll()).await??
        {
            acked += 1;
        }
    }
    publishing.await??;

    let (_client, mut events) =
        connect_session(&hub.broker, &away, &away_key, 2, max_packet, false).await?;
    let mut got = Vec::new();
    while got.last() != Some(&(count - 1)) {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(WAIT, events.poll())
            .await
            .map_err(|_| anyhow::anyhow!("the newest never came; got {got:?}"))??
        {
            got.push(std::str::from_utf8(&p.payload[..5])?.parse::<usize>()?);
        }
    }
    let first = got[0];
    assert_eq!(
        got,
        (first..count).collect::<Vec<_>>(),
        "the newest, in order"
    );
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_away_gets_the_newest_of_its_downlink_not_all() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.sync.inflight_bytes_max = WINDOW as u64;
        c.mqtt.max_message_bytes = MESSAGE_MAX;
    })
    .await?;
    let down = topics::device(
        &RegionId::new(REGION)?,
        &DeviceId::new("pos-away")?,
        DeviceTopic::Down,
    );
    // 200 KiB routed to it while away, far more than three segments of a window and an
    // envelope (32 KiB).
    let got = kept_while_away(&hub, ("pos-away", "pos-sender"), &down, &down, 200).await?;
    assert!(got[0] > 0, "all 200 kept: the segments are not bounded");
    let kept = got.len() * MESSAGE_BYTES;
    // The two full segments behind the one being filled hold two windows at least.
    assert!(
        (2 * WINDOW..=3 * SEGMENT + MESSAGE_BYTES).contains(&kept),
        "kept {kept} bytes, segments of {SEGMENT}"
    );

    // A wildcard another admitted device subscribes to is kept in 3 segments of 1 MiB.
    let filter = topics::region_devices_filter(&RegionId::new(REGION)?, DeviceTopic::Down)
        .replace("/down", "/+");
    let spied = topics::device(
        &RegionId::new(REGION)?,
        &DeviceId::new("pos-spied")?,
        DeviceTopic::Down,
    );
    let got = kept_while_away(&hub, ("pos-spy", "pos-spied"), &filter, &spied, 4_000).await?;
    assert!(
        got[0] > 0,
        "all 4,000 kept: the default segments are not bounded"
    );
    assert!(
        got.len() * MESSAGE_BYTES <= 3 * 1024 * 1024 + MESSAGE_BYTES,
        "kept {} messages",
        got.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_downlink_window_still_brings_a_device_up_to_date() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.sync.inflight_bytes_max = WINDOW as u64;
    })
    .await?;
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;
    // One refill whose change alone is larger than the window, and several smaller ones.
    refill(&fridge_url, "fridge-1", "big", "lasagna", 400).await?;
    for batch in 0..6 {
        refill(&fridge_url, "fridge-1", &format!("r{batch}"), "lasagna", 40).await?;
    }
    synced(&fridge_url, WAIT).await?;

    // A POS enrolled now gets the whole history through the window.
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let pos_url = format!("http://{}", pos.http_addr);
    synced(&pos_url, WAIT).await?;
    let want = available(&agent_stock(&fridge_url, "fridge-1").await?, "lasagna");
    assert_eq!(want, 640);
    eventually(WAIT, "the POS to hold every unit", || async {
        let stock = agent_stock(&pos_url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == want).then_some(())
    })
    .await?;
    Ok(())
}
