//! The hub's side of MQTT: the embedded broker, and the hub's own client.
//!
//! Data flow: a poller task owns the rumqttc event loop and forwards connection events and
//! publishes → the hub task routes `up` publishes to their region's writer (never blocking on
//! the answer: a small task waits for it and hands the outcome back) → on an outcome it
//! publishes the signed `Ack` to the device's `down` topic, or moves that device's downlink
//! window. The downlink pump wakes on new changes, acks, presence and a timer, and for every
//! online device sends the changes of its ledgers authored by others, within its window.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use larder_runtime::mqtt::{Request, queue_requests};
use larder_shared::envelope::{self, Body, BoxKey, Entry, EntryKind, Envelope, Header, Party};
use larder_shared::reliable::{SenderLimits, SeqAllocator, StreamSender, build_batch};
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, FridgeId, RegionId, SecretKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

mod broker;
mod downlink;
mod presence;

pub use broker::{
    Admission, BrokerError, CONNECT_TOKEN_AGE_MS_MAX, DOWN_SEGMENTS, free_port,
    start_embedded_broker,
};
use downlink::{Downlink, OUTCOMES_AT_ONCE_MAX, RELAY_COALESCE};
pub use presence::PresenceBook;

use crate::RegionHandle;
use crate::config::{MqttConfig, SyncConfig};
use crate::metrics::HubMetrics;
use crate::region::{RegionCommand, UplinkOutcome};

/// Envelope sequence numbers reserved per persisted block.
const ENV_SEQ_BLOCK: u64 = 1_000;
const EVENT_QUEUE_MAX: usize = 1_024;
/// How often the downlink pump re-reads which devices were revoked (by the API or the CLI).
const REVOCATION_CHECK_MS: i64 = 2_000;
/// How often a device whose protocol version the hub does not read is sent a notice.
const NOTICE_EVERY_MS: i64 = 60_000;
/// How long after the start the downlink waits for a device to speak first (see `pump`): past
/// the agent's 30 s between statements of its position.
const VERSION_WAIT_MS: i64 = 35_000;
/// The most devices kept in the notice book; past it, the book starts again.
const NOTICED_MAX: usize = 10_000;

pub struct MqttContext {
    pub regions: BTreeMap<RegionId, RegionHandle>,
    pub key: SecretKey,
    pub config: MqttConfig,
    pub sync: SyncConfig,
    pub metrics: Arc<HubMetrics>,
    /// Sessions admitted and presence taken (see [`PresenceBook`]).
    pub presence: PresenceBook,
    /// The network side's time: tokens, retransmits, presence, beacons.
    pub clock: larder_runtime::Clock,
}

impl std::fmt::Debug for MqttContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttContext")
            .field("regions", &self.regions.keys())
            .finish()
    }
}

enum LinkEvent {
    Connected,
    Lost(String),
    Message(String, bytes::Bytes),
}

struct HubLink {
    ctx: MqttContext,
    limits: SenderLimits,
    devices: HashMap<(RegionId, DeviceId), Downlink>,
    seqs: HashMap<RegionId, SeqAllocator>,
    outcomes_tx: mpsc::Sender<(RegionId, DeviceId, u8, UplinkOutcome)>,
    connected: bool,
    revocations_checked_ms: i64,
    /// The box each device's downlink bodies are sealed with, for the key it holds.
    boxes: HashMap<(RegionId, DeviceId), BoxKey>,
    /// Devices online per region (the `devices_online` gauge).
    online: HashMap<RegionId, i64>,
    /// Each region's head at the last pump over every device.
    pumped: HashMap<RegionId, u64>,
    /// The client's request queue was full at the last publish: nothing is sealed for it until
    /// its event loop takes a request again (see `run`).
    jammed: bool,
    /// Acks that found the request queue full, the furthest per device, sent when it has room:
    /// a dropped ack would make its device resend what the hub already holds.
    held_acks: HashMap<(RegionId, DeviceId), larder_shared::envelope::Ack>,
    /// Each region's catalog as last announced (the sealed envelope): anything else found on
    /// its retained topic (an admitted device's overwrite or delete) is replaced by it again.
    announced: HashMap<RegionId, Vec<u8>>,
    /// The protocol version of each device's last accepted envelope: what the hub writes to it
    /// (a device not heard from since the start gets the oldest version the hub writes).
    versions: HashMap<(RegionId, DeviceId), u8>,
    /// When each device whose version the hub does not read was last sent a notice.
    noticed: HashMap<(RegionId, DeviceId), i64>,
    /// Devices this process has sent an acknowledgement (naming its store's generation).
    answered: std::collections::HashSet<(RegionId, DeviceId)>,
    /// When this process's link started (see `VERSION_WAIT_MS`).
    started_ms: i64,
}

/// The devices an event may have given downlink work to.
enum Scope {
    None,
    Device((RegionId, DeviceId)),
    Devices(Vec<(RegionId, DeviceId)>),
    All,
}

/// Runs the hub's MQTT client until `shutdown` turns true.
///
/// One piece: this task alone takes the MQTT client's events (the rule that keeps it from
/// deadlocking on the client's queue), so every source it waits on is a branch of one `select!`;
/// each branch's work is a method of `HubLink`.
pub async fn run(ctx: MqttContext, mut shutdown: watch::Receiver<bool>) {
    let (host, port) = larder_runtime::mqtt::host_port(&ctx.config.broker);
    let mut opts = MqttOptions::new(ctx.config.client_id.clone(), host, port);
    let hub_id = DeviceId::new(ctx.config.client_id.as_str()).ok();
    // The embedded broker checks a fresh connect token; an external broker knows the hub by
    // the password derived from its key (`larder-hub broker-config`).
    let external = ctx.config.mode == crate::config::BrokerMode::External;
    let clock = ctx.clock.clone();
    let token = move |key: &SecretKey, id: &DeviceId| {
        if external {
            return larder_shared::auth::broker_password(key, id.as_str());
        }
        let mut nonce = [0u8; 16];
        let _ = getrandom::fill(&mut nonce);
        larder_shared::auth::connect_token(key, id, clock.network_ms(), nonce)
    };
    if let Some(id) = &hub_id {
        opts.set_credentials(ctx.config.client_id.clone(), token(&ctx.key, id));
    }
    let key = ctx.key.clone();
    if let Some(ca) = ctx.config.tls.as_ref().and_then(|t| t.client_ca()) {
        match larder_runtime::tls::client_config(ca) {
            Ok(tls) => {
                opts.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls),
                ));
            }
            Err(e) => warn!(error = %e, "mqtt.tls: cannot trust the broker; connecting fails"),
        }
    }
    opts.set_keep_alive(Duration::from_secs(ctx.config.keepalive_seconds));
    opts.set_clean_session(false);
    let max = ctx.config.max_message_bytes + 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 1_024);
    let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_QUEUE_MAX);
    // Told each time the event loop takes a request from the client's queue.
    let drained = Arc::new(tokio::sync::Notify::new());
    let took = drained.clone();
    let poller = tokio::spawn(async move {
        loop {
            let ev = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => LinkEvent::Connected,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    LinkEvent::Message(p.topic.clone(), p.payload.clone())
                }
                Ok(Event::Outgoing(Outgoing::Publish(_) | Outgoing::Subscribe(_))) => {
                    took.notify_one();
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    if ev_tx.send(LinkEvent::Lost(e.to_string())).await.is_err() {
                        return;
                    }
                    // A connect token is accepted once: every attempt carries a fresh one.
                    if let Some(id) = &hub_id {
                        eventloop
                            .mqtt_options
                            .set_credentials(id.as_str(), token(&key, id));
                    }
                    // Reconnect delay; the next poll reconnects.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if ev_tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    let limits = SenderLimits {
        batch_entries_max: ctx.sync.batch_entries_max,
        batch_bytes_max: ctx
            .config
            .max_message_bytes
            .saturating_sub(larder_shared::envelope::ENVELOPE_OVERHEAD_BYTES_MAX + 64),
        inflight_entries_max: ctx.sync.inflight_entries_max,
        inflight_bytes_max: ctx.sync.inflight_bytes_max as usize,
        retransmit_after_ms: ctx.sync.retransmit_after_ms as i64,
    };
    let (outcomes_tx, mut outcomes_rx) = mpsc::channel(EVENT_QUEUE_MAX);
    let mut heads: Vec<(RegionId, watch::Receiver<u64>)> = ctx
        .regions
        .iter()
        .map(|(r, h)| (r.clone(), h.head.clone()))
        .collect();
    let seqs = ctx
        .regions
        .iter()
        .map(|(r, h)| {
            (
                r.clone(),
                SeqAllocator::resume(h.env_seq_reserved, ENV_SEQ_BLOCK),
            )
        })
        .collect();
    let started_ms = ctx.clock.network_ms();
    let mut link = HubLink {
        ctx,
        limits,
        devices: HashMap::new(),
        seqs,
        outcomes_tx,
        connected: false,
        revocations_checked_ms: 0,
        boxes: HashMap::new(),
        online: HashMap::new(),
        pumped: HashMap::new(),
        jammed: false,
        held_acks: HashMap::new(),
        announced: HashMap::new(),
        versions: HashMap::new(),
        noticed: HashMap::new(),
        answered: std::collections::HashSet::new(),
        started_ms,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // Relays of new heads: at once when the last pass over every device is older than
    // RELAY_COALESCE, else at the end of that interval, so a busy region sends each device one
    // envelope per interval rather than one per group commit.
    let mut last_all = tokio::time::Instant::now()
        .checked_sub(RELAY_COALESCE)
        .unwrap_or_else(tokio::time::Instant::now);
    let mut relay_due: Option<tokio::time::Instant> = None;
    let (head_tx, mut head_rx) = mpsc::channel::<()>(16);
    for (_, mut rx) in heads.drain(..) {
        let tx = head_tx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if tx.send(()).await.is_err() {
                    return;
                }
            }
        });
    }
    // A catalog version published through the API is announced at once (retained).
    let (catalog_tx, mut catalog_rx) = mpsc::channel::<RegionId>(16);
    for (region, handle) in link.ctx.regions.iter() {
        let (tx, region, mut rx) = (catalog_tx.clone(), region.clone(), handle.catalog.clone());
        rx.mark_unchanged();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if tx.send(region.clone()).await.is_err() {
                    return;
                }
            }
        });
    }
    loop {
        // What the event can have given work to: one device, or all of them (a new head, the
        // tick's beacons and retransmits). Walking every device on every presence made
        // bringing N devices online cost N².
        let scope = tokio::select! {
            Some(region) = catalog_rx.recv() => {
                if link.connected {
                    link.announce_catalog(&client, &region).await;
                }
                Scope::None
            }
            ev = ev_rx.recv() => match ev {
                Some(LinkEvent::Connected) => {
                    link.on_connected(&client).await;
                    Scope::All
                }
                Some(LinkEvent::Lost(e)) => {
                    if link.connected { warn!(error = %e, "hub lost its broker connection"); }
                    link.connected = false;
                    Scope::None
                }
                Some(LinkEvent::Message(topic, payload)) => {
                    match topics::parse_catalog(&topic).filter(|r| link.ctx.regions.contains_key(r)) {
                        Some(region) => {
                            link.on_catalog_topic(&client, &region, &payload);
                            Scope::None
                        }
                        None => link.on_message(&client, &topic, payload).await,
                    }
                }
                None => break,
            },
            Some(first) = outcomes_rx.recv() => {
                // A group commit answers many uplinks at once: take every outcome waiting.
                let mut outcomes = vec![first];
                while outcomes.len() < OUTCOMES_AT_ONCE_MAX
                    && let Ok(more) = outcomes_rx.try_recv()
                {
                    outcomes.push(more);
                }
                link.on_outcomes(&client, outcomes).await
            }
            Some(()) = head_rx.recv() => {
                // Heads that moved meanwhile are all served by one pass.
                while head_rx.try_recv().is_ok() {}
                let due = last_all + RELAY_COALESCE;
                if due <= tokio::time::Instant::now() {
                    Scope::All
                } else {
                    relay_due.get_or_insert(due);
                    Scope::None
                }
            }
            _ = tokio::time::sleep_until(relay_due.unwrap_or_else(tokio::time::Instant::now)), if relay_due.is_some() => {
                Scope::All
            }
            // While the queue is full the loop only takes events, which is what lets the event
            // loop read the broker's acks and free room: sealing envelopes that cannot be
            // queued, and dropping acks that devices then answer with resends, fed on itself.
            () = drained.notified(), if link.jammed => {
                link.jammed = false;
                link.send_held_acks(&client).await;
                Scope::All
            }
            _ = tick.tick() => {
                let now = link.ctx.clock.network_ms();
                for d in link.devices.values_mut() { d.sender.tick(now); }
                link.update_sync_gauges(now);
                if now - link.revocations_checked_ms >= REVOCATION_CHECK_MS {
                    link.revocations_checked_ms = now;
                    link.drop_revoked().await;
                }
                Scope::All
            }
            _ = shutdown.changed() => break,
        };
        if matches!(scope, Scope::All) {
            last_all = tokio::time::Instant::now();
            relay_due = None;
        }
        link.pump(&client, scope).await;
    }
    let _ = client.try_disconnect();
    poller.abort();
}

impl HubLink {
    async fn on_connected(&mut self, client: &AsyncClient) {
        info!("hub connected to the broker");
        self.connected = true;
        let regions: Vec<RegionId> = self.ctx.regions.keys().cloned().collect();
        // Watching other regions, one filter takes every region's uplinks (the hub's own among
        // them: a second, overlapping filter could make the broker deliver them twice).
        let mut filters = Vec::new();
        if self.ctx.config.watch_other_regions {
            filters.push(topics::all_devices_filter(DeviceTopic::Up));
        }
        for region in &regions {
            if !self.ctx.config.watch_other_regions {
                filters.push(topics::region_devices_filter(region, DeviceTopic::Up));
            }
            filters.push(topics::region_devices_filter(region, DeviceTopic::Presence));
            // Its own catalog topic, to see (and undo) what anyone else leaves there.
            filters.push(topics::catalog(region));
        }
        // Never awaited here: this loop takes the event loop's events (see `queue_requests`).
        queue_requests(
            client,
            filters.into_iter().map(Request::Subscribe).collect(),
        );
        for region in &regions {
            self.announce_catalog(client, region).await;
        }
    }

    /// Publishes the region's current catalog, signed and retained on its catalog topic: every
    /// agent gets it now, and one that connects later gets it when it subscribes.
    async fn announce_catalog(&mut self, client: &AsyncClient, region: &RegionId) {
        let Some(catalog) = self
            .ctx
            .regions
            .get(region)
            .map(|h| (**h.catalog.borrow()).clone())
        else {
            return;
        };
        let version = catalog.version;
        if let Some(bytes) = self
            .seal(region, Party::Region, Body::Catalog(catalog))
            .await
        {
            self.announced.insert(region.clone(), bytes.clone());
            self.publish_catalog(client, region, bytes);
            info!(region = %region, version, "catalog announced");
        }
    }

    fn publish_catalog(&self, client: &AsyncClient, region: &RegionId, bytes: Vec<u8>) {
        queue_requests(
            client,
            vec![Request::Publish {
                topic: topics::catalog(region),
                retain: true,
                payload: bytes,
            }],
        );
    }

    /// A publish on a region's catalog topic: the hub's own announcement coming back, or
    /// someone else's overwrite or delete of the retained catalog, which is put back at once
    /// (agents check the hub's signature, so what was there could only have hidden it).
    fn on_catalog_topic(&mut self, client: &AsyncClient, region: &RegionId, payload: &[u8]) {
        let Some(announced) = self.announced.get(region) else {
            return;
        };
        if payload == announced.as_slice() {
            return;
        }
        // An announcement of the hub's own (the retained one of its previous run, or one a
        // reconnect re-sent) is no overwrite.
        let hub_key = self.ctx.key.public();
        let ours = envelope::open(payload, self.ctx.config.max_message_bytes)
            .and_then(|u| u.verify(payload, &hub_key))
            .and_then(envelope::Verified::plain)
            .is_ok_and(|e| {
                e.header.region == *region
                    && e.header.sender == Party::Hub
                    && matches!(e.body, Body::Catalog(_))
            });
        if ours {
            return;
        }
        warn!(region = %region, bytes = payload.len(),
            "the retained catalog was overwritten or deleted by a client; announced again");
        self.ctx
            .metrics
            .rejected(region.as_str(), "catalog_overwritten");
        self.publish_catalog(client, region, announced.clone());
    }

    /// Seals an envelope from the hub with a fresh, persisted sequence number.
    async fn seal(&mut self, region: &RegionId, to: Party, body: Body) -> Option<Vec<u8>> {
        let handle = self.ctx.regions.get(region)?;
        let alloc = self.seqs.get_mut(region)?;
        let (seq, reserve) = alloc.allocate();
        if let Some(up_to) = reserve {
            let (reply, rx) = oneshot::channel();
            let ok = handle
                .tx
                .send(RegionCommand::ReserveEnvSeq { up_to, reply })
                .await
                .is_ok()
                && matches!(rx.await, Ok(Ok(())));
            if !ok {
                warn!(region = %region, "could not persist the hub's envelope sequence");
                *alloc = SeqAllocator::resume(up_to, ENV_SEQ_BLOCK);
                return None;
            }
        }
        let kind = body.kind();
        let env = Envelope {
            header: Header {
                region: region.clone(),
                sender: Party::Hub,
                recipient: to,
                seq,
                sent_at_ms: self.ctx.clock.network_ms(),
            },
            body,
        };
        // A device gets the version it speaks; what every device of a region reads (the
        // catalog) goes in the oldest version the hub writes, which they all read.
        let bytes = match &env.header.recipient {
            Party::Device(device) => {
                self.ensure_box(region, device)?;
                let key = (region.clone(), device.clone());
                let version = self
                    .versions
                    .get(&key)
                    .copied()
                    .unwrap_or(envelope::PROTOCOL_VERSION_MIN);
                let device_box = self.boxes.get(&key)?;
                env.seal_to_version(&self.ctx.key, device_box, version)?
            }
            _ => env.seal_version(&self.ctx.key, envelope::PROTOCOL_VERSION_MIN),
        };
        self.ctx
            .metrics
            .downlink_envelopes
            .get_or_create(&vec![
                ("region", region.to_string()),
                ("kind", kind.to_owned()),
            ])
            .inc();
        Some(bytes)
    }

    /// The box for `device`'s key as the region's store holds it, made once and kept until the
    /// device rotates its key.
    fn ensure_box(&mut self, region: &RegionId, device: &DeviceId) -> Option<()> {
        let key = (region.clone(), device.clone());
        if !self.boxes.contains_key(&key) {
            let record = self.ctx.regions.get(region)?.reads.device(device).ok()??;
            self.boxes
                .insert(key, BoxKey::new(&self.ctx.key, &record.public_key));
        }
        Some(())
    }

    /// Handles a publish; answers which device it may have given downlink work to.
    async fn on_message(
        &mut self,
        client: &AsyncClient,
        topic: &str,
        payload: bytes::Bytes,
    ) -> Scope {
        let Some((region, device, which)) = topics::parse_device(topic) else {
            debug!(topic, "publish on an unknown topic ignored");
            return Scope::None;
        };
        let Some(handle) = self.ctx.regions.get(&region) else {
            self.ctx.metrics.rejected(region.as_str(), "unknown_region");
            return Scope::None;
        };
        match which {
            DeviceTopic::Presence => {
                // Only what the device signed for its current session counts: another
                // device publishing here cannot take it on or off line.
                let (book, reads, r, d) = (
                    self.ctx.presence.clone(),
                    handle.reads.clone(),
                    region.clone(),
                    device.clone(),
                );
                let read =
                    tokio::task::spawn_blocking(move || book.read(&reads, &r, &d, &payload)).await;
                let Ok(Some(online)) = read else {
                    debug!(region = %region, device = %device, "presence not taken: not signed for the device's session");
                    self.ctx.metrics.rejected(region.as_str(), "bad_presence");
                    return Scope::None;
                };
                self.set_presence(&region, &device, online).await;
                return Scope::Device((region, device));
            }
            DeviceTopic::Up => {
                // Judged as `envelope::open` would: an oversized or truncated message is the
                // verifier's to refuse, by that reason.
                let version = envelope::wire_version(&payload).unwrap_or(0);
                let sized = (envelope::ENVELOPE_MIN_BYTES..=self.ctx.config.max_message_bytes)
                    .contains(&payload.len());
                if sized && !envelope::reads_version(version) {
                    self.refuse_version(client, &region, &device, version).await;
                    return Scope::None;
                }
                let (reply, rx) = oneshot::channel();
                let uplink = crate::region::verifier::Uplink {
                    topic_device: device.clone(),
                    payload,
                    reply,
                };
                let cmd = crate::region::verifier::VerifierCommand::Uplink(uplink);
                if handle.uplinks.send(cmd).await.is_err() {
                    // Only at shutdown, or if the verifier thread died: the device resends.
                    error!(region = %region, device = %device, "the region's verifier has stopped; uplink not taken");
                    return Scope::None;
                }
                let tx = self.outcomes_tx.clone();
                tokio::spawn(async move {
                    if let Ok(outcome) = rx.await {
                        let _ = tx.send((region, device, version, outcome)).await;
                    }
                });
            }
            DeviceTopic::Down => {}
        }
        Scope::None
    }

    /// Refuses an envelope of a protocol version the hub does not read: counted, logged, and,
    /// to an enrolled device, answered with a [`notice`](envelope::notice) of the versions it
    /// reads, at most once a minute per device. The device keeps its outbox until it is
    /// upgraded.
    async fn refuse_version(
        &mut self,
        client: &AsyncClient,
        region: &RegionId,
        device: &DeviceId,
        version: u8,
    ) {
        self.ctx.metrics.rejected(region.as_str(), "version");
        let now = self.ctx.clock.network_ms();
        let key = (region.clone(), device.clone());
        if self
            .noticed
            .get(&key)
            .is_some_and(|at| now.saturating_sub(*at) < NOTICE_EVERY_MS)
        {
            return;
        }
        let Some(handle) = self.ctx.regions.get(region) else {
            return;
        };
        let (reads, id) = (handle.reads.clone(), device.clone());
        let enrolled = tokio::task::spawn_blocking(move || reads.device(&id)).await;
        if !matches!(enrolled, Ok(Ok(Some(_)))) {
            return;
        }
        if self.noticed.len() >= NOTICED_MAX {
            self.noticed.clear();
        }
        self.noticed.insert(key, now);
        warn!(region = %region, device = %device, version,
            reads = ?(envelope::PROTOCOL_VERSION_MIN..=envelope::PROTOCOL_VERSION),
            "a device speaks a protocol version this hub does not read: upgrade it; its outbox waits on the device");
        let notice = envelope::notice(envelope::PROTOCOL_VERSION_MIN, envelope::PROTOCOL_VERSION);
        self.publish_down(client, region, device, notice);
    }

    /// Records the version of a device's accepted envelope.
    fn note_version(&mut self, region: &RegionId, device: &DeviceId, version: u8) {
        self.versions
            .insert((region.clone(), device.clone()), version);
        self.ctx
            .metrics
            .uplink_versions
            .get_or_create(&vec![
                ("region", region.to_string()),
                ("version", version.to_string()),
            ])
            .inc();
    }

    async fn set_presence(&mut self, region: &RegionId, device: &DeviceId, online: bool) {
        let key = (region.clone(), device.clone());
        let now = self.ctx.clock.network_ms();
        let was_online = self
            .devices
            .get(&key)
            .is_some_and(|d| d.sender.is_connected());
        if online {
            if let Some(d) = self.devices.get_mut(&key) {
                d.sender.on_connected(now);
            } else if let Some(mut d) = self.load_downlink(region, device).await {
                d.sender.on_connected(now);
                self.devices.insert(key.clone(), d);
            }
        } else if let Some(d) = self.devices.get_mut(&key) {
            d.sender.on_disconnected();
        }
        let is_online = self
            .devices
            .get(&key)
            .is_some_and(|d| d.sender.is_connected());
        // Counted as devices come and go, not by walking every device on every presence.
        let count = self.online.entry(region.clone()).or_default();
        *count += i64::from(is_online) - i64::from(was_online);
        if let Some(handle) = self.ctx.regions.get(region) {
            let changed = match handle.presence.write() {
                Ok(mut presence) => presence.insert(device.clone(), online) != Some(online),
                Err(_) => false,
            };
            if changed {
                handle.events.publish(crate::events::EventKind::Device {
                    device_id: device.clone(),
                    online,
                });
            }
        }
        let online_count = self.online.get(region).copied().unwrap_or(0);
        self.ctx
            .metrics
            .devices_online
            .get_or_create(&vec![("region", region.to_string())])
            .set(online_count);
    }

    /// Stops sending to devices revoked since they were loaded.
    async fn drop_revoked(&mut self) {
        for (region, handle) in &self.ctx.regions {
            let reads = handle.reads.clone();
            let Ok(Ok(devices)) = tokio::task::spawn_blocking(move || reads.devices()).await else {
                continue;
            };
            for (d, _) in devices
                .into_iter()
                .filter(|(d, _)| d.revoked_at_ms.is_some())
            {
                if let Some(gone) = self.devices.remove(&(region.clone(), d.device_id.clone())) {
                    if gone.sender.is_connected() {
                        let count = self.online.entry(region.clone()).or_default();
                        *count -= 1;
                        self.ctx
                            .metrics
                            .devices_online
                            .get_or_create(&vec![("region", region.to_string())])
                            .set(*count);
                    }
                    info!(region = %region, device = %d.device_id, "revoked device: downlink stopped");
                }
            }
        }
    }
}
