//! The MQTT link's requests that must not be dropped (subscriptions, presence, the catalog) are
//! queued without waiting on a full request queue, and still reach the broker, in order.

use std::time::Duration;

use larder_demo::seeded_key;
use larder_runtime::mqtt::{Request, queue_requests};
use larder_shared::DeviceId;
use larder_shared::domain::Role;
use larder_shared::envelope::MAX_MESSAGE_BYTES_DEFAULT;
use larder_tests::*;
use rumqttc::{Event, Outgoing, Packet, QoS};

const WAIT: Duration = Duration::from_secs(30);

/// What `ingest::connect` gives its client's request queue.
const QUEUE: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_past_a_full_queue_arrive_in_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = seeded_key(9, "pos-link");
    enroll(
        &hub_url,
        "pos-link",
        Role::Pos,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let id = DeviceId::new("pos-link")?;
    let (client, mut events) =
        larder_tests::ingest::connect(&hub.broker, &id, &key, 1, MAX_MESSAGE_BYTES_DEFAULT + 1024)
            .await?;

    // Nobody polls the event loop yet: the queue fills and stays full.
    for i in 0..QUEUE {
        client.try_publish("test/filler", QoS::AtLeastOnce, false, i.to_string())?;
    }
    assert!(
        client
            .try_publish("test/filler", QoS::AtLeastOnce, false, "one too many")
            .is_err(),
        "the request queue should be full"
    );
    // Returns at once although nothing fits; the requests wait their turn.
    queue_requests(
        &client,
        vec![
            Request::Subscribe("test/echo".into()),
            Request::Publish {
                topic: "test/echo".into(),
                retain: false,
                payload: b"first".to_vec(),
            },
            Request::Publish {
                topic: "test/echo".into(),
                retain: false,
                payload: b"second".to_vec(),
            },
        ],
    );

    // Now the event loop runs: every filler goes out, then the subscription, then the two
    // publishes, which come back through it in order.
    let mut outgoing = Vec::new();
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT, async {
        while echoed.len() < 2 {
            match events.poll().await? {
                Event::Outgoing(Outgoing::Publish(_)) => outgoing.push("publish"),
                Event::Outgoing(Outgoing::Subscribe(_)) => outgoing.push("subscribe"),
                Event::Incoming(Packet::Publish(p)) if p.topic == "test/echo" => {
                    echoed.push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    })
    .await??;
    let subscribed_at = outgoing
        .iter()
        .position(|o| *o == "subscribe")
        .ok_or_else(|| anyhow::anyhow!("no subscription went out"))?;
    assert_eq!(
        subscribed_at, QUEUE,
        "the subscription comes after every filler"
    );
    assert_eq!(outgoing.len(), QUEUE + 3);
    assert_eq!(echoed, ["first", "second"]);
    Ok(())
}
