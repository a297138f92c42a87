//! MQTT requests that must reach the broker's client in order without blocking the task that
//! drives its event loop.

use rumqttc::{AsyncClient, QoS};
use tracing::debug;

/// A request for the broker that must not be dropped (unlike a publish the sender resends).
#[derive(Debug, Clone)]
pub enum Request {
    /// Subscribe to a filter at QoS 1.
    Subscribe(String),
    /// Publish at QoS 1.
    Publish {
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    },
}

/// Queues `requests` on `client`, in order, without waiting for room in its request queue.
///
/// A task that awaits room there while also being the one that takes the event loop's events
/// can deadlock: the event loop waits for its events to be taken before it takes requests, so
/// neither moves. What fits is queued now; the rest waits in a task of its own, still in order.
pub fn queue_requests(client: &AsyncClient, requests: Vec<Request>) {
    let mut requests = requests.into_iter();
    for request in requests.by_ref() {
        let queued = match &request {
            Request::Subscribe(filter) => client.try_subscribe(filter.as_str(), QoS::AtLeastOnce),
            Request::Publish {
                topic,
                retain,
                payload,
            } => client.try_publish(topic.as_str(), QoS::AtLeastOnce, *retain, payload.clone()),
        };
        if queued.is_err() {
            let rest: Vec<Request> = std::iter::once(request).chain(requests).collect();
            let client = client.clone();
            tokio::spawn(async move {
                for request in rest {
                    let sent = match request {
                        Request::Subscribe(filter) => {
                            client.subscribe(filter, QoS::AtLeastOnce).await
                        }
                        Request::Publish {
                            topic,
                            retain,
                            payload,
                        } => {
                            client
                                .publish(topic, QoS::AtLeastOnce, retain, payload)
                                .await
                        }
                    };
                    if let Err(e) = sent {
                        // The event loop is gone: the next connection queues these again.
                        debug!(error = %e, "request not queued");
                        return;
                    }
                }
            });
            return;
        }
    }
}

/// A broker address `host:port` as host and port; without a port (or with one that does not
/// parse), MQTT's 1883.
pub fn host_port(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().unwrap_or(1883)),
        None => (addr.to_owned(), 1883),
    }
}
