//! The embedded broker's memory per device: it keeps three segments of `sync.inflight_bytes_max`
//! of a device's downlink, so a device away with a persistent session gets the newest of what
//! was routed to it, not everything; and a hub whose downlink window is that small still brings
//! a device up to date, a change larger than the window included.

use std::time::Duration;

use larder_hub::demo::{REGION, seeded_key};
use larder_shared::domain::Role;
use larder_shared::envelope::MAX_MESSAGE_BYTES_DEFAULT;
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, RegionId};
use larder_tests::ingest::connect_session;
use larder_tests::*;
use rumqttc::{Event, Packet, QoS};

const WAIT: Duration = Duration::from_secs(30);
/// The smallest downlink window the hub's config allows.
const WINDOW: u64 = 16 * 1024;
const MESSAGES: usize = 100;
const MESSAGE_BYTES: usize = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_away_gets_the_newest_of_its_downlink_not_all() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.sync.inflight_bytes_max = WINDOW;
    })
    .await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let (away, sender) = (DeviceId::new("pos-away")?, DeviceId::new("pos-sender")?);
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
    let down = topics::device(&RegionId::new(REGION)?, &away, DeviceTopic::Down);
    let max_packet = MAX_MESSAGE_BYTES_DEFAULT + 1024;

    // The device subscribes with a persistent session, then goes away.
    let (client, mut events) =
        connect_session(&hub.broker, &away, &away_key, 1, max_packet, false).await?;
    client.subscribe(&down, QoS::AtLeastOnce).await?;
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await?? {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    client.disconnect().await?;
    while tokio::time::timeout(WAIT, events.poll()).await?.is_ok() {}

    // 100 KiB is routed to it meanwhile, far more than three 16 KiB segments.
    let (client, mut events) = larder_tests::ingest::connect(
        &hub.broker,
        &sender,
        &seeded_key(9, sender.as_str()),
        1,
        max_packet,
    )
    .await?;
    for i in 0..MESSAGES {
        let mut payload = format!("{i:03}").into_bytes();
        payload.resize(MESSAGE_BYTES, b'.');
        client
            .publish(&down, QoS::AtLeastOnce, false, payload)
            .await?;
    }
    let mut acked = 0;
    while acked < MESSAGES {
        if let Event::Incoming(Packet::PubAck(_)) =
            tokio::time::timeout(WAIT, events.poll()).await??
        {
            acked += 1;
        }
    }

    // Back with its session: what the broker kept, oldest first, up to the newest.
    let (_client, mut events) =
        connect_session(&hub.broker, &away, &away_key, 2, max_packet, false).await?;
    let mut got = Vec::new();
    while got.last() != Some(&(MESSAGES - 1)) {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(WAIT, events.poll())
            .await
            .map_err(|_| anyhow::anyhow!("the newest never came; got {got:?}"))??
        {
            got.push(std::str::from_utf8(&p.payload[..3])?.parse::<usize>()?);
        }
    }
    let first = got[0];
    assert_eq!(
        got,
        (first..MESSAGES).collect::<Vec<_>>(),
        "the newest, in order"
    );
    assert!(
        first > 0,
        "all {MESSAGES} kept: the segments are not bounded"
    );
    // Three segments, the oldest of which may have just gone: at least two windows kept.
    let kept = got.len() * MESSAGE_BYTES;
    assert!(
        kept >= 2 * WINDOW as usize - MESSAGE_BYTES && kept <= 3 * WINDOW as usize + MESSAGE_BYTES,
        "kept {kept} bytes of a {WINDOW}-byte window"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_downlink_window_still_brings_a_device_up_to_date() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.sync.inflight_bytes_max = WINDOW;
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
