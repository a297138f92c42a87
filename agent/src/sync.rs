//! The sync task: the agent's side of MQTT.
//!
//! Data flow: one poller task owns the rumqttc event loop and polls it all the time, forwarding
//! connection events and incoming publishes over a bounded channel → this task verifies each
//! envelope from the hub and hands it to the writer (downlink changes, acks, catalogs) → after
//! the writer commits, it publishes the stream acknowledgement. Outgoing, it wakes when the
//! outbox grows, when acks move the window or on a timer, reads the outbox from a read
//! connection and publishes signed `Changes` envelopes within the sender's window.
//!
//! Reconnects back off exponentially with jitter. The outbox is forgotten only on the hub's
//! signed acknowledgement, never on a broker PUBACK.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use larder_shared::auth::connect_token;
use larder_shared::envelope::{
    self, Ack, Batch, Body, BoxKey, EntryKind, Envelope, Generation, Header, Party,
};
use larder_shared::presence::{Presence, Session};
use larder_shared::reliable::{SenderLimits, SeqAllocator, StreamSender, build_batch};
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, PublicKey, RegionId, SecretKey};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{MqttConfig, SyncConfig};
use crate::metrics::Shared;
use crate::store::ReadPool;
use larder_runtime::mqtt::{Request, queue_requests};

use crate::writer::Command;

/// How long a connection may go without an acknowledgement from the hub before the device
/// says its stream position again: how soon an idle device that never reconnected (an
/// external broker) learns that the hub's store was restored.
const POSITION_EVERY_MS: i64 = 30_000;
/// Envelope sequence numbers reserved per persisted block.
const ENV_SEQ_BLOCK: u64 = 1_000;
/// Events buffered between the poller and the sync task.
const EVENT_QUEUE_MAX: usize = 256;

/// Everything the sync task needs.
#[derive(Debug)]
pub(crate) struct SyncContext {
    pub device: DeviceId,
    pub region: RegionId,
    pub key: SecretKey,
    /// A rotation's next key, announced to the hub until it confirms (see `larder_shared::rotation`).
    pub pending_key: Option<SecretKey>,
    /// The device key file, which the next key replaces once confirmed.
    pub key_path: std::path::PathBuf,
    pub hub_key: PublicKey,
    pub mqtt: MqttConfig,
    /// TLS to the broker, trusting only the configured CA file (`mqtt.tls_ca_file`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub sync: SyncConfig,
    pub writer: mpsc::Sender<Command>,
    pub reads: Arc<ReadPool>,
    pub shared: Arc<Shared>,
    pub outbox_head: watch::Receiver<u64>,
    /// `false` cuts the agent off the network (the demo's partitions); `true` reconnects.
    pub network: watch::Receiver<bool>,
    pub env_seq_reserved: u64,
    /// The trusted clock, which takes the hub's time beacons.
    pub clock: larder_runtime::Clock,
}

enum LinkEvent {
    /// Connected for this session (the connect token's, or one made for a password).
    Connected(Session),
    Lost(String),
    Message(String, bytes::Bytes),
}

/// Why the session loop ended.
enum SessionEnd {
    Shutdown,
    NetworkOff,
}

struct Sync {
    ctx: SyncContext,
    sender: StreamSender,
    seqs: SeqAllocator,
    up_topic: String,
    down_topic: String,
    presence_topic: String,
    catalog_topic: String,
    /// The last connection failure, so repeats are not logged again.
    last_error: Option<String>,
    /// The session of the connection up now, whose signed presence the hub takes.
    session: Option<Session>,
    /// The key connect tokens are signed with, for the connection's poller.
    key_tx: watch::Sender<SecretKey>,
    /// When the pending key rotation was last announced.
    rotation_announced_ms: i64,
    /// Seals bodies between the device key and the hub's (see `envelope`).
    hub_box: BoxKey,
    /// The same for the pending key of a rotation: the hub's confirmation may come sealed to it.
    pending_box: Option<BoxKey>,
    /// The hub store's generation the writer last confirmed (see `Command::HubGeneration`).
    hub_generation: Option<Generation>,
    /// Since when this connection waits for the hub's first acknowledgement (or, after a
    /// quiet spell, its next one).
    unanswered_since_ms: Option<i64>,
    /// When the hub last acknowledged anything.
    acked_at_ms: i64,
    /// The hub acknowledged something on this connection.
    answered: bool,
}

/// A reconnect delay: exponential in `attempt`, capped, with up to 50 % jitter.
pub(crate) fn backoff_ms(min_ms: u64, max_ms: u64, attempt: u32, jitter_seed: u64) -> u64 {
    let base = min_ms.saturating_mul(1u64 << attempt.min(16)).min(max_ms);
    let jitter = if base == 0 {
        0
    } else {
        jitter_seed % (base / 2 + 1)
    };
    (base / 2 + jitter).max(min_ms.min(max_ms))
}

/// Runs the sync task until `shutdown` turns true.
pub(crate) async fn run(ctx: SyncContext, mut shutdown: watch::Receiver<bool>) {
    let up_acked = ctx.shared.up_acked.load(Ordering::Relaxed);
    let limits = SenderLimits {
        batch_entries_max: ctx.sync.batch_entries_max,
        batch_bytes_max: ctx
            .mqtt
            .max_message_bytes
            .saturating_sub(envelope::ENVELOPE_OVERHEAD_BYTES_MAX + 64),
        inflight_entries_max: ctx.sync.inflight_entries_max,
        // The hub reads every device's uplinks from one subscription: nothing here for the
        // broker to keep per device.
        inflight_bytes_max: usize::MAX,
        retransmit_after_ms: ctx.sync.retransmit_after_ms as i64,
    };
    let mut sync = Sync {
        up_topic: topics::device(&ctx.region, &ctx.device, DeviceTopic::Up),
        down_topic: topics::device(&ctx.region, &ctx.device, DeviceTopic::Down),
        presence_topic: topics::device(&ctx.region, &ctx.device, DeviceTopic::Presence),
        catalog_topic: topics::catalog(&ctx.region),
        last_error: None,
        key_tx: watch::Sender::new(ctx.key.clone()),
        session: None,
        rotation_announced_ms: 0,
        hub_box: BoxKey::new(&ctx.key, &ctx.hub_key),
        pending_box: ctx
            .pending_key
            .as_ref()
            .map(|k| BoxKey::new(k, &ctx.hub_key)),
        sender: StreamSender::new(up_acked, limits),
        hub_generation: None,
        unanswered_since_ms: None,
        acked_at_ms: 0,
        answered: false,
        seqs: SeqAllocator::resume(ctx.env_seq_reserved, ENV_SEQ_BLOCK),
        ctx,
    };
    loop {
        // Wait for the network to be allowed.
        while !*sync.ctx.network.borrow() {
            tokio::select! {
                r = sync.ctx.network.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
        match sync.session(&mut shutdown).await {
            SessionEnd::Shutdown => return,
            SessionEnd::NetworkOff => continue,
        }
    }
}

/// Credentials for one connection attempt: the password (a fresh connect token unless a
/// broker password is configured), the session it opens, and the will the broker publishes
/// for it: the device's signed `offline` of that session.
fn credentials(
    at_ms: i64,
    key: &SecretKey,
    region: &RegionId,
    device: &DeviceId,
    password: Option<&String>,
    presence_topic: &str,
) -> (String, Session, LastWill) {
    let mut nonce = [0u8; 16];
    let _ = getrandom::fill(&mut nonce);
    let session = Session { at_ms, nonce };
    let password = password
        .cloned()
        .unwrap_or_else(|| connect_token(key, device, session.at_ms, session.nonce));
    let offline = Presence {
        online: false,
        session,
    };
    let will = LastWill::new(
        presence_topic,
        offline.seal(key, region, device),
        QoS::AtLeastOnce,
        true,
    );
    (password, session, will)
}

impl Sync {
    fn options(&self) -> (MqttOptions, Session) {
        let (host, port) = larder_runtime::mqtt::host_port(&self.ctx.mqtt.broker);
        let mut o = MqttOptions::new(self.ctx.device.as_str(), host, port);
        o.set_keep_alive(Duration::from_secs(self.ctx.mqtt.keepalive_seconds));
        if let Some(tls) = &self.ctx.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o.set_clean_session(false);
        let (password, session, will) = credentials(
            self.ctx.clock.network_ms(),
            &self.key_tx.borrow(),
            &self.ctx.region,
            &self.ctx.device,
            self.ctx.mqtt.password.as_ref(),
            &self.presence_topic,
        );
        o.set_credentials(self.ctx.device.as_str(), password);
        o.set_last_will(will);
        let max = self.ctx.mqtt.max_message_bytes + 1024;
        o.set_max_packet_size(max, max);
        o.set_inflight(64);
        (o, session)
    }

    /// One piece: one MQTT connection's life; the poller task and the select over its events
    /// share the session's state.
    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> SessionEnd {
        let (options, mut session) = self.options();
        let (client, mut eventloop) = AsyncClient::new(options, 128);
        let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_QUEUE_MAX);
        let (min_ms, max_ms) = (
            self.ctx.mqtt.reconnect_delay_ms_min,
            self.ctx.mqtt.reconnect_delay_ms_max,
        );
        let (key, device) = (self.key_tx.subscribe(), self.ctx.device.clone());
        let password = self.ctx.mqtt.password.clone();
        let (region, presence_topic) = (self.ctx.region.clone(), self.presence_topic.clone());
        let clock = self.ctx.clock.clone();
        let poller = tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        attempt = 0;
                        LinkEvent::Connected(session)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        LinkEvent::Message(p.topic.clone(), p.payload.clone())
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        if ev_tx.send(LinkEvent::Lost(e.to_string())).await.is_err() {
                            return;
                        }
                        let mut seed = [0u8; 8];
                        let _ = getrandom::fill(&mut seed);
                        let delay = backoff_ms(min_ms, max_ms, attempt, u64::from_le_bytes(seed));
                        attempt = attempt.saturating_add(1);
                        // A connect token is accepted once: every attempt carries a fresh one,
                        // and a session of its own with its own signed will.
                        let (fresh, next, will) = credentials(
                            clock.network_ms(),
                            &key.borrow(),
                            &region,
                            &device,
                            password.as_ref(),
                            &presence_topic,
                        );
                        eventloop
                            .mqtt_options
                            .set_credentials(device.as_str(), fresh);
                        eventloop.mqtt_options.set_last_will(will);
                        session = next;
                        // Reconnect backoff: the next poll reconnects.
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        continue;
                    }
                };
                if ev_tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let end = loop {
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(LinkEvent::Connected(session)) => self.on_connected(&client, session).await,
                    Some(LinkEvent::Lost(e)) => self.on_lost(&e),
                    Some(LinkEvent::Message(topic, payload)) => self.on_message(&client, &topic, &payload).await,
                    None => break SessionEnd::Shutdown,
                },
                r = self.ctx.outbox_head.changed() => if r.is_err() { break SessionEnd::Shutdown },
                _ = tick.tick() => {
                    let now = self.ctx.clock.network_ms();
                    self.sender.tick(now);
                    let quiet = match self.unanswered_since_ms {
                        Some(since) => now - since >= self.ctx.sync.retransmit_after_ms as i64,
                        None => now - self.acked_at_ms >= POSITION_EVERY_MS,
                    };
                    if self.sender.is_connected() && quiet {
                        self.unanswered_since_ms = Some(now);
                        self.say_position(&client).await;
                    }
                    if self.sender.is_connected()
                        && now - self.rotation_announced_ms >= self.ctx.sync.retransmit_after_ms as i64
                    {
                        self.announce_rotation(&client).await;
                    }
                }
                r = self.ctx.network.changed() => {
                    if r.is_err() { break SessionEnd::Shutdown }
                    if !*self.ctx.network.borrow() { break SessionEnd::NetworkOff }
                }
                _ = shutdown.changed() => break SessionEnd::Shutdown,
            }
            self.pump(&client).await;
        };
        if self.sender.is_connected()
            && let Some(session) = self.session
        {
            let offline = Presence {
                online: false,
                session,
            };
            let sealed = offline.seal(&self.key_tx.borrow(), &self.ctx.region, &self.ctx.device);
            let _ = client.try_publish(&self.presence_topic, QoS::AtLeastOnce, true, sealed);
        }
        let _ = client.try_disconnect();
        // Give the event loop a moment to flush the disconnect, then stop it.
        let flush = tokio::time::timeout(Duration::from_millis(200), async {
            while let Some(ev) = ev_rx.recv().await {
                if matches!(ev, LinkEvent::Lost(_)) {
                    break;
                }
            }
        });
        let _ = flush.await;
        poller.abort();
        self.ctx.shared.metrics.mqtt_connected.set(0);
        self.ctx.shared.online.store(false, Ordering::Relaxed);
        self.sender.on_disconnected();
        end
    }

    async fn on_connected(&mut self, client: &AsyncClient, session: Session) {
        self.last_error = None;
        self.session = Some(session);
        let online = Presence {
            online: true,
            session,
        }
        .seal(&self.key_tx.borrow(), &self.ctx.region, &self.ctx.device);
        info!(device = %self.ctx.device, "connected to the hub's broker");
        self.ctx.shared.metrics.mqtt_connects.inc();
        self.ctx.shared.metrics.mqtt_connected.set(1);
        self.ctx.shared.online.store(true, Ordering::Relaxed);
        queue_requests(
            client,
            vec![
                Request::Subscribe(self.down_topic.clone()),
                Request::Subscribe(self.catalog_topic.clone()),
                Request::Publish {
                    topic: self.presence_topic.clone(),
                    retain: true,
                    payload: online,
                },
            ],
        );
        self.sender.on_connected(self.ctx.clock.network_ms());
        self.unanswered_since_ms = Some(self.ctx.clock.network_ms());
        self.answered = false;
        self.say_position(client).await;
        self.announce_rotation(client).await;
    }

    /// Sends the stream's position in an empty batch. Every connection opens with it, and it is
    /// repeated until the hub answers (its subscription may not have been up yet): the hub's
    /// acknowledgement names its store's generation, so a restored hub is noticed even when
    /// nothing waits to be sent.
    async fn say_position(&mut self, client: &AsyncClient) {
        let at = self.sender.acked();
        if let Some(bytes) = self
            .seal(Body::Changes(Batch::new(at, at, Vec::new())))
            .await
        {
            let _ = client.try_publish(&self.up_topic, QoS::AtLeastOnce, false, bytes);
        }
    }

    /// Announces the pending key rotation, if any, signed with the key in force; repeated until
    /// the hub confirms (a repeat of a rotation it already took is confirmed again).
    async fn announce_rotation(&mut self, client: &AsyncClient) {
        let Some(next) = &self.ctx.pending_key else {
            return;
        };
        let rotation = larder_shared::rotation::announce(
            &self.ctx.region,
            &self.ctx.device,
            &self.ctx.key.public(),
            next,
        );
        let new_key = rotation.new_key;
        self.rotation_announced_ms = self.ctx.clock.network_ms();
        if let Some(bytes) = self.seal(Body::KeyRotation(rotation)).await
            && client
                .try_publish(&self.up_topic, QoS::AtLeastOnce, false, bytes)
                .is_ok()
        {
            info!(device = %self.ctx.device, key = %new_key, "announced the device's next key");
        }
    }

    /// The hub confirmed a rotation: the next key replaces the key file and signs from now on.
    async fn on_key_rotated(&mut self, key: PublicKey) {
        let Some(next) = self.ctx.pending_key.clone().filter(|k| k.public() == key) else {
            if key != self.ctx.key.public() {
                warn!(%key, "the hub confirmed a key this device does not hold; ignored");
            }
            return;
        };
        let path = self.ctx.key_path.clone();
        let stored = next.clone();
        match tokio::task::spawn_blocking(move || crate::finish_rotation(&path, &stored)).await {
            Ok(Ok(())) => {
                info!(device = %self.ctx.device, %key, "the hub took the device's new key; signing with it from now on");
                self.hub_box = BoxKey::new(&next, &self.ctx.hub_key);
                self.ctx.key = next;
                self.key_tx.send_replace(self.ctx.key.clone());
                self.ctx.pending_key = None;
                self.pending_box = None;
            }
            other => warn!(
                ?other,
                path = %self.ctx.key_path.display(),
                "could not store the new key; the rotation will be announced again"
            ),
        }
    }

    fn on_lost(&mut self, error: &str) {
        self.unanswered_since_ms = None;
        if self.sender.is_connected() {
            info!(device = %self.ctx.device, error, "disconnected from the hub's broker");
        } else {
            self.ctx.shared.metrics.mqtt_connect_failures.inc();
        }
        if !self.sender.is_connected() && self.last_error.as_deref() != Some(error) {
            // Said once per kind of failure, not on every retry. The hub's broker closes the
            // connection of a device it does not admit without a CONNACK.
            warn!(
                device = %self.ctx.device,
                error,
                "cannot connect to the hub's broker; retrying with backoff. If the broker is up, it \
                 refused this device: check that it is enrolled and not revoked, and that its \
                 clock is within 5 minutes of the hub's"
            );
        }
        self.last_error = Some(error.to_owned());
        self.ctx.shared.metrics.mqtt_connected.set(0);
        self.ctx.shared.online.store(false, Ordering::Relaxed);
        self.sender.on_disconnected();
    }

    /// Seals an envelope to the hub with a fresh, persisted sequence number.
    async fn seal(&mut self, body: Body) -> Option<Vec<u8>> {
        let (seq, reserve) = self.seqs.allocate();
        if let Some(up_to) = reserve {
            let (reply, rx) = oneshot::channel();
            if self
                .ctx
                .writer
                .send(Command::ReserveEnvSeq { up_to, reply })
                .await
                .is_err()
                || !matches!(rx.await, Ok(Ok(())))
            {
                warn!("could not persist the envelope sequence; not sending");
                self.seqs = SeqAllocator::resume(up_to, ENV_SEQ_BLOCK);
                return None;
            }
        }
        let env = Envelope {
            header: Header {
                region: self.ctx.region.clone(),
                sender: Party::Device(self.ctx.device.clone()),
                recipient: Party::Hub,
                seq,
                sent_at_ms: self.ctx.clock.network_ms(),
            },
            body,
        };
        env.seal_to(&self.ctx.key, &self.hub_box)
    }

    /// Publishes outbox batches while the window allows.
    async fn pump(&mut self, client: &AsyncClient) {
        loop {
            let head = *self.ctx.outbox_head.borrow();
            let Some(window) = self.sender.poll_send(head) else {
                return;
            };
            let reads = self.ctx.reads.clone();
            let (after, limit) = (window.after, window.entries_max);
            let rows =
                match tokio::task::spawn_blocking(move || reads.outbox_after(after, limit)).await {
                    Ok(Ok(rows)) => rows,
                    other => {
                        warn!(?other, "reading the outbox failed");
                        return;
                    }
                };
            let hashes: HashMap<u64, [u8; 32]> = rows.iter().map(|(e, h)| (e.seq, *h)).collect();
            let entries = rows.into_iter().map(|(e, _)| e).collect();
            let Some(mut batch) = build_batch(window, entries, head) else {
                return;
            };
            for e in batch
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::Withheld)
            {
                error!(seq = e.seq, fridge = %e.ledger,
                    "a local change too large for a message is withheld: its audit link goes to the hub, the change stays here");
                self.ctx
                    .shared
                    .metrics
                    .changes_withheld
                    .get_or_create(&vec![("direction", "up".to_owned())])
                    .inc();
            }
            // Sign the audit chain's head as of the batch's last entry.
            if let Some(last) = batch.entries.last()
                && let Some(hash) = hashes.get(&last.seq)
            {
                batch.head_sig = Some(larder_shared::audit::sign_head(
                    &self.ctx.key,
                    &self.ctx.device,
                    last.seq,
                    hash,
                ));
            }
            let up_to = batch.up_to;
            let Some(bytes) = self.seal(Body::Changes(batch)).await else {
                return;
            };
            let len = bytes.len() as u64;
            if client
                .try_publish(&self.up_topic, QoS::AtLeastOnce, false, bytes)
                .is_err()
            {
                debug!("publish queue full; will retry");
                return;
            }
            self.ctx.shared.metrics.envelopes_sent.inc();
            self.ctx.shared.metrics.envelope_bytes_sent.inc_by(len);
            self.sender.on_sent(up_to, len as usize);
        }
    }

    async fn on_message(&mut self, client: &AsyncClient, topic: &str, payload: &[u8]) {
        if let Some((min, max)) = envelope::read_notice(payload) {
            self.protocol_refused(min, max);
            return;
        }
        let opened = match envelope::open(payload, self.ctx.mqtt.max_message_bytes) {
            Ok(o) => o,
            Err(envelope::EnvelopeError::Version(v)) if v > envelope::PROTOCOL_VERSION => {
                self.ctx.shared.metrics.reject("version");
                self.protocol_refused(v, v);
                return;
            }
            Err(e) => {
                self.ctx.shared.metrics.reject(e.reason());
                warn!(topic, error = %e, "envelope refused");
                return;
            }
        };
        let h = opened.header().clone();
        let recipient_ok = if topic == self.catalog_topic {
            h.recipient == Party::Region
        } else {
            h.recipient == Party::Device(self.ctx.device.clone())
        };
        if h.region != self.ctx.region || h.sender != Party::Hub || !recipient_ok {
            self.ctx.shared.metrics.reject("wrong_party");
            warn!(topic, sender = %h.sender, "envelope not from our hub to us; refused");
            return;
        }
        let from_region = topic == self.catalog_topic;
        let verified = opened.verify(payload, &self.ctx.hub_key);
        let env = match verified.and_then(|v| {
            if from_region {
                v.plain()
            } else {
                let mut keys = vec![&self.hub_box];
                keys.extend(self.pending_box.as_ref());
                v.open_sealed(&keys)
            }
        }) {
            Ok(env) => env,
            Err(e) => {
                self.ctx.shared.metrics.reject(e.reason());
                warn!(topic, error = %e, "envelope refused");
                return;
            }
        };
        match env.body {
            Body::Ack(ack) => self.on_ack(ack).await,
            // Not before the hub has acknowledged something on this connection: the
            // acknowledgement names its store's generation, and a restored store's downlink
            // must not be taken at the old one's positions. The hub sends it again.
            Body::Changes(_) if !self.answered => {
                debug!("downlink before the hub's first acknowledgement; left for its resend");
            }
            Body::Changes(batch) => {
                let (reply, rx) = oneshot::channel();
                if self
                    .ctx
                    .writer
                    .send(Command::Downlink { batch, reply })
                    .await
                    .is_err()
                {
                    return;
                }
                match rx.await {
                    Ok(Ok(ack)) => {
                        self.ctx
                            .shared
                            .last_sync_at_ms
                            .store(self.ctx.clock.network_ms(), Ordering::Relaxed);
                        if let Some(bytes) = self.seal(Body::Ack(ack)).await {
                            let _ =
                                client.try_publish(&self.up_topic, QoS::AtLeastOnce, false, bytes);
                        }
                    }
                    other => warn!(?other, "downlink not committed; the hub will resend"),
                }
            }
            Body::Catalog(catalog) => {
                let _ = self.ctx.writer.send(Command::Catalog(catalog)).await;
            }
            Body::Time(beacon) => self.ctx.clock.observe_beacon(beacon.hub_ms),
            Body::KeyRotated(r) => self.on_key_rotated(r.key).await,
            Body::KeyRotation(_) => {
                self.ctx.shared.metrics.reject("unexpected_kind");
                warn!(topic, "a key rotation from the hub; refused");
            }
        }
    }

    /// The hub reads none of this agent's envelopes: it reads versions `min..=max` (a notice),
    /// or writes a version newer than this agent reads.
    fn protocol_refused(&self, min: u8, max: u8) {
        if self.ctx.shared.metrics.protocol_refused.set(1) == 0 {
            error!(
                hub = ?(min..=max),
                agent = envelope::PROTOCOL_VERSION,
                outbox = self.ctx.shared.outbox_head.load(Ordering::Relaxed)
                    .saturating_sub(self.ctx.shared.up_acked.load(Ordering::Relaxed)),
                "the hub speaks protocol versions this agent does not: upgrade this agent; \
                 its outbox is kept until the hub takes it"
            );
        }
    }

    async fn on_ack(&mut self, ack: Ack) {
        let now = self.ctx.clock.network_ms();
        self.ctx
            .shared
            .last_sync_at_ms
            .store(now, Ordering::Relaxed);
        self.ctx.shared.metrics.protocol_refused.set(0);
        self.unanswered_since_ms = None;
        self.acked_at_ms = now;
        if let Some(generation) = ack.generation
            && self.hub_generation != Some(generation)
        {
            // No downlink is taken until the writer holds this generation: a batch of the new
            // store taken at the old one's positions would be taken as changes held.
            self.answered = false;
            let (reply, rx) = oneshot::channel();
            let up_to = ack.up_to;
            let asked = Command::HubGeneration {
                generation,
                up_to,
                origin: ack.origin,
                reply,
            };
            if self.ctx.writer.send(asked).await.is_err() {
                return;
            }
            // Not taken (its group failed, or reading what to give back did): the next
            // acknowledgement asks again.
            let Ok(Some(from)) = rx.await else { return };
            self.hub_generation = Some(generation);
            if from < self.sender.acked() {
                self.sender.restart_at(from, now);
            }
        }
        self.answered = true;
        if let Some(up_to) = self.sender.on_ack(ack, self.ctx.clock.network_ms()) {
            let _ = self.ctx.writer.send(Command::UpAcked { up_to }).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff_ms(200, 10_000, 0, 0), 200);
        assert!(backoff_ms(200, 10_000, 3, 0) >= 800);
        for seed in 0..100 {
            let d = backoff_ms(200, 10_000, 30, seed * 7919);
            assert!((5_000..=10_000).contains(&d), "{d}");
        }
        assert_ne!(
            backoff_ms(200, 10_000, 5, 1),
            backoff_ms(200, 10_000, 5, 1234)
        );
    }
}
