//! Protocol versions against a running hub, over real MQTT: a device one version behind
//! (envelopes as the release before writes them) keeps syncing and is answered in its version;
//! a device older than that is refused, counted, and sent a notice of the versions the hub
//! reads; an agent that gets such a notice says so and keeps its outbox; the hub's
//! acknowledgements in this version name its store's generation.

use std::time::Duration;

use larder_shared::domain::{Refill, RefillUnit, Role};
use larder_shared::envelope::{
    self, Ack, Batch, Body, BoxKey, Entry, Envelope, Generation, Header, MAX_MESSAGE_BYTES_DEFAULT,
    Party,
};
use larder_shared::ledger::{Ledger, actor_for};
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{FridgeId, RegionId, SecretKey, Sku, UnitId};
use larder_tests::*;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};

const WAIT: Duration = Duration::from_secs(30);

fn topic(device_name: &str, which: DeviceTopic) -> String {
    topics::device(
        &RegionId::new("demo").expect("id"),
        &device(device_name),
        which,
    )
}

/// A refill of `unit` into fridge-1 on `ledger`: the change it makes.
fn refill_change(ledger: &mut Ledger, author: &str, unit: &str) -> Vec<u8> {
    let refill = Refill {
        units: vec![RefillUnit {
            unit_id: UnitId::new(unit).expect("id"),
            sku: Sku::new("lasagna").expect("sku"),
            expires_at_ms: i64::MAX / 2,
            batch: None,
        }],
        order_id: None,
    };
    ledger
        .refill(&refill, &device(author), 0)
        .expect("refill")
        .changes
        .remove(0)
}

/// A device's stream as the test writes it: its audit chain and positions.
struct Device {
    name: &'static str,
    key: SecretKey,
    /// The device's replica of fridge-1's ledger, which its changes are made on.
    ledger: Ledger,
    chain: [u8; 32],
    stream: u64,
    env_seq: u64,
}

impl Device {
    /// The envelope of the next change, sealed to the hub in `version`.
    fn changes(&mut self, unit: &str, version: u8) -> Vec<u8> {
        let ledger = FridgeId::new("fridge-1").expect("id");
        let change = refill_change(&mut self.ledger, self.name, unit);
        let seq = self.stream + 1;
        let prev = self.chain;
        self.chain = larder_shared::audit::entry_hash(
            &prev,
            &device(self.name),
            seq,
            &ledger,
            0,
            &larder_shared::audit::change_digest(&change),
        );
        let head_sig =
            larder_shared::audit::sign_head(&self.key, &device(self.name), seq, &self.chain);
        let batch = Batch {
            after: self.stream,
            up_to: seq,
            entries: vec![Entry {
                prev: Some(prev),
                ..Entry::change(seq, ledger, 0, change)
            }],
            head_sig: Some(head_sig),
        };
        self.stream = seq;
        self.env_seq += 1;
        let env = Envelope {
            header: Header {
                region: RegionId::new("demo").expect("id"),
                sender: Party::Device(device(self.name)),
                recipient: Party::Hub,
                seq: self.env_seq,
                sent_at_ms: 0,
            },
            body: Body::Changes(batch),
        };
        env.seal_to_version(
            &self.key,
            &BoxKey::new(&self.key, &hub_public_key()),
            version,
        )
        .expect("a nonce")
    }

    /// Opens an envelope from the hub: its version and body.
    fn open(&self, bytes: &[u8]) -> anyhow::Result<(u8, Body)> {
        let opened = envelope::open(bytes, MAX_MESSAGE_BYTES_DEFAULT)?;
        let version = opened.version();
        let env = opened
            .verify(bytes, &hub_public_key())?
            .open_sealed(&[&BoxKey::new(&self.key, &hub_public_key())])?;
        Ok((version, env.body))
    }
}

/// Connects as `name` (a connect token of its key) and subscribes to its `down` topic.
async fn connect(
    hub: &larder_hub::HubHandle,
    name: &str,
    key: &SecretKey,
) -> (AsyncClient, EventLoop) {
    let port = hub
        .broker
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("broker port");
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    let now = larder_runtime::Clock::system().now_ms();
    let token = larder_shared::auth::connect_token(key, &device(name), now, [3; 16]);
    opts.set_credentials(name, token);
    let (client, events) = AsyncClient::new(opts, 16);
    client
        .subscribe(topic(name, DeviceTopic::Down), QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    (client, events)
}

/// The next publish on the subscribed topics.
async fn next_publish(events: &mut EventLoop) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = events.poll().await? {
                return anyhow::Ok(p.payload.to_vec());
            }
        }
    })
    .await?
}

/// The next acknowledgement from the hub, skipping its other messages (time beacons).
async fn next_ack(events: &mut EventLoop, dev: &Device) -> anyhow::Result<(u8, Ack)> {
    loop {
        let bytes = next_publish(events).await?;
        if let (version, Body::Ack(ack)) = dev.open(&bytes)? {
            return Ok((version, ack));
        }
    }
}

/// One piece: one device's conversation with the hub, version by version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_one_version_behind_syncs_and_an_older_one_is_told_to_upgrade()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = larder_demo::seeded_key(11, "pos-old");
    enroll(&hub_url, "pos-old", Role::Pos, &["fridge-1"], &key.public()).await?;
    let mut dev = Device {
        name: "pos-old",
        key,
        ledger: Ledger::new(
            FridgeId::new("fridge-1").expect("id"),
            actor_for(&device("pos-old")),
        )?,
        chain: larder_shared::audit::GENESIS,
        stream: 0,
        env_seq: 0,
    };
    let (client, mut events) = connect(&hub, "pos-old", &dev.key).await;
    let up = topic("pos-old", DeviceTopic::Up);

    // Version 2, the release before: taken, and answered in version 2 (no generation).
    let bytes = dev.changes("old-1", 2);
    client.publish(&up, QoS::AtLeastOnce, false, bytes).await?;
    let (version, ack) = next_ack(&mut events, &dev).await?;
    assert_eq!(version, 2, "answered in the device's version");
    assert_eq!(ack, Ack::new(1, false));
    let stock = hub_stock(&hub_url, "fridge-1").await?;
    assert_eq!(available(&stock, "lasagna"), 1, "{stock}");

    // A version the hub does not read: refused, counted, and the device told which it reads.
    // (What version 1 wrote does not matter: the first byte is all the hub reads of it.)
    let ancient = [vec![1u8], vec![0; 120]].concat();
    client
        .publish(&up, QoS::AtLeastOnce, false, ancient)
        .await?;
    let notice = loop {
        let bytes = next_publish(&mut events).await?;
        if let Some(versions) = envelope::read_notice(&bytes) {
            break versions;
        }
    };
    assert_eq!(
        notice,
        (envelope::PROTOCOL_VERSION_MIN, envelope::PROTOCOL_VERSION)
    );

    // Upgraded, the same device goes on in this version: the ack names the store's generation.
    let bytes = dev.changes("new-1", envelope::PROTOCOL_VERSION);
    client.publish(&up, QoS::AtLeastOnce, false, bytes).await?;
    let (version, ack) = next_ack(&mut events, &dev).await?;
    assert_eq!(version, envelope::PROTOCOL_VERSION);
    assert_eq!((ack.up_to, ack.gap), (2, false));
    let stored: String = rusqlite::Connection::open(dir.path().join("hub/region-demo.db"))?
        .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
            r.get(0)
        })?;
    assert_eq!(ack.generation, Generation::parse(&stored), "{stored}");
    let stock = hub_stock(&hub_url, "fridge-1").await?;
    assert_eq!(available(&stock, "lasagna"), 2, "{stock}");

    // The rollout's metric, as the operator reads it, and the refusal's count.
    let metrics = metrics_text(&hub_url).await?;
    for version in [2, 3] {
        let line =
            format!("larder_hub_uplink_versions_total{{region=\"demo\",version=\"{version}\"}} 1");
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    assert_eq!(hub.metrics.rejected_count("demo", "version"), 1);
    hub.shutdown().await;
    Ok(())
}

/// An agent told by a notice that the hub does not read its version keeps selling, keeps its
/// outbox, and shows it in a metric until the hub acknowledges it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_told_its_version_is_not_read_says_so_and_keeps_its_outbox() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let pos = start_agent(dir.path(), &hub, "pos-1", Role::Pos, &["fridge-1"]).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;
    // The hub has answered the agent's opening position: no acknowledgement is on its way that
    // would clear the refusal before the test reads it (the next one answers the sale below).
    eventually(WAIT, "the hub's first acknowledgement", || async {
        health(&url).await.ok()?["last_sync_at"]
            .as_str()
            .map(|_| ())
    })
    .await?;
    // The notice, as a hub that moved on would send it (any client may publish there: the
    // broker checks clients at connect only, and the notice changes nothing but a log line).
    let spy = larder_demo::seeded_key(11, "spy");
    enroll(&hub_url, "spy", Role::Pos, &["fridge-1"], &spy.public()).await?;
    let (client, mut events) = connect(&hub, "spy", &spy).await;
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let notice = envelope::notice(
        envelope::PROTOCOL_VERSION + 1,
        envelope::PROTOCOL_VERSION + 2,
    );
    client
        .publish(
            topic("pos-1", DeviceTopic::Down),
            QoS::AtLeastOnce,
            false,
            notice,
        )
        .await?;
    eventually(WAIT, "the agent shows the refusal", || async {
        let m = metrics_text(&url).await.ok()?;
        m.lines()
            .any(|l| l == "larder_agent_protocol_refused 1")
            .then_some(())
    })
    .await?;
    // Selling goes on; the sale waits in the outbox and reaches the hub, which acknowledges it.
    let (status, body) = sell_unit(&http(), &url, "fridge-1", "u1", "lasagna", "u1").await?;
    assert_eq!(status, 201, "{body}");
    eventually(
        WAIT,
        "the sale at the hub and the refusal cleared",
        || async {
            let m = metrics_text(&url).await.ok()?;
            let cleared = m.lines().any(|l| l == "larder_agent_protocol_refused 0");
            let at_hub = hub_sales(&hub_url).await.ok()?.len() == 1;
            (cleared && at_hub).then_some(())
        },
    )
    .await?;
    pos.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
