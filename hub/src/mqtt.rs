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
use larder_shared::envelope::{Body, BoxKey, Entry, EntryKind, Envelope, Header, Party};
use larder_shared::reliable::{SenderLimits, SeqAllocator, StreamSender, build_batch};
use larder_shared::topics::{self, DeviceTopic};
use larder_shared::{DeviceId, FridgeId, RegionId, SecretKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

mod presence;
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

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker on {0} did not accept connections within 10 s")]
    NotReady(SocketAddr),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Longest a connect token stays valid, either side of the hub's clock.
pub const CONNECT_TOKEN_AGE_MS_MAX: i64 = 5 * 60 * 1000;
/// Connect-token nonces remembered to refuse replays (older ones are stale anyway).
const NONCES_MAX: usize = 100_000;

/// Who may connect to the embedded broker: the hub's own client and enrolled, unrevoked devices
/// of its regions, each proving its key with a fresh connect token as the MQTT password
/// (checked through rumqttd's external authentication hook). A token is accepted once.
#[derive(Debug)]
pub struct Admission {
    pub hub_client_id: String,
    pub hub_key: larder_shared::PublicKey,
    pub regions: Vec<Arc<crate::store::RegionReads>>,
    nonces: std::sync::Mutex<HashMap<[u8; 16], i64>>,
    /// Where each admitted connection's session is recorded, for presence.
    presence: PresenceBook,
    /// Judges connect tokens' ages.
    clock: larder_runtime::Clock,
}

impl Admission {
    pub fn new(
        hub_client_id: String,
        hub_key: larder_shared::PublicKey,
        regions: Vec<Arc<crate::store::RegionReads>>,
        presence: PresenceBook,
        clock: larder_runtime::Clock,
    ) -> Self {
        Self {
            hub_client_id,
            hub_key,
            regions,
            nonces: std::sync::Mutex::new(HashMap::new()),
            presence,
            clock,
        }
    }

    /// Whether this CONNECT may proceed.
    pub fn admit(&self, client_id: &str, password: &str, now_ms: i64) -> Result<(), &'static str> {
        let device = DeviceId::new(client_id).map_err(|_| "bad_client_id")?;
        let keys = if client_id == self.hub_client_id {
            vec![self.hub_key]
        } else {
            let (reads, record) = self
                .regions
                .iter()
                .find_map(|r| r.device(&device).ok().flatten().map(|d| (r, d)))
                .ok_or("unknown_device")?;
            if record.revoked_at_ms.is_some() {
                return Err("revoked_device");
            }
            // The key in force, then keys a rotation retired that are inside their overlap.
            let mut keys = vec![record.public_key];
            keys.extend(
                reads
                    .retired_keys(&device, Some(now_ms))
                    .unwrap_or_default(),
            );
            keys
        };
        let mut verdict = Err("bad_token");
        for key in &keys {
            verdict = larder_shared::auth::verify_connect_token(
                password,
                key,
                &device,
                now_ms,
                CONNECT_TOKEN_AGE_MS_MAX,
            )
            .map_err(|e| match e {
                larder_shared::auth::TokenError::Stale { .. } => "stale_token",
                _ => "bad_token",
            });
            if verdict.is_ok() {
                break;
            }
        }
        let nonce = verdict?;
        let mut nonces = self.nonces.lock().map_err(|_| "internal")?;
        if nonces.len() >= NONCES_MAX {
            nonces.retain(|_, at| now_ms - *at <= CONNECT_TOKEN_AGE_MS_MAX);
        }
        if nonces.len() >= NONCES_MAX {
            return Err("busy");
        }
        if nonces.insert(nonce, now_ms).is_some() {
            return Err("replayed_token");
        }
        drop(nonces);
        if let Some(session) = larder_shared::auth::token_session(password) {
            self.presence.admitted(&device, session);
        }
        Ok(())
    }
}

/// Segments of a device's `down` subscription the embedded broker keeps (see
/// [`start_embedded_broker`]).
pub const DOWN_SEGMENTS: usize = 3;

/// Starts rumqttd on its own thread and waits until it accepts TCP connections.
///
/// rumqttd only logs bind errors and never reports readiness, so the address is checked free
/// first and then polled until it answers.
///
/// rumqttd keeps what it routes to a subscription in memory, in segments, and drops the
/// oldest segment only when a new one would pass the count, whether delivered or not. A
/// device's `down` subscription gets three segments of `down_segment_bytes`: the hub's
/// downlink window in bytes (`sync.inflight_bytes_max`) and one largest envelope, which is how
/// far a window can go. The two full segments kept behind the one being filled hold at least
/// two windows, so a device that falls behind by more loses the oldest, and the hub's
/// go-back-N resend still finds a whole copy of its window within what is kept.
pub fn start_embedded_broker(
    addr: SocketAddr,
    tls: Option<&crate::config::MqttTlsConfig>,
    max_payload_bytes: usize,
    connections_max: usize,
    down_segment_bytes: usize,
    admission: Arc<Admission>,
    metrics: Arc<HubMetrics>,
) -> Result<(), BrokerError> {
    std::net::TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload_bytes,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, _user: String, password: String| {
        let (admission, metrics) = (admission.clone(), metrics.clone());
        async move {
            let now = admission.clock.network_ms();
            match admission.admit(&client_id, &password, now) {
                Ok(()) => true,
                Err(reason) => {
                    metrics
                        .connections_refused
                        .get_or_create(&vec![("reason", reason.to_owned())])
                        .inc();
                    warn!(client_id = %client_id, reason, "broker connection refused");
                    false
                }
            }
        }
    });
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_owned(),
        rumqttd::ServerSettings {
            name: "v4".into(),
            listen: addr,
            tls: tls.and_then(|t| {
                Some(rumqttd::TlsConfig::Rustls {
                    capath: None,
                    certpath: t.cert_file.as_ref()?.display().to_string(),
                    keypath: t.key_file.as_ref()?.display().to_string(),
                })
            }),
            next_connection_delay_ms: 1,
            connections,
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: connections_max,
            max_outgoing_packet_count: 1_000,
            // Any filter not named below (the catalog's, presence's, or a wildcard an admitted
            // device subscribes to): 3 MiB at most.
            max_segment_size: 1024 * 1024,
            max_segment_count: 3,
            // Keys that no subscription can match two of: rumqttd applies the last match.
            custom_segment: Some(HashMap::from([
                (
                    topics::all_devices_filter(DeviceTopic::Down),
                    rumqttd::SegmentConfig {
                        // rumqttd refuses (panics on) segments under 1 KiB.
                        max_segment_size: down_segment_bytes.max(1024),
                        max_segment_count: DOWN_SEGMENTS,
                    },
                ),
                (
                    // The hub's uplink subscription, one per region (or one for all): room
                    // for bursts while the region writers catch up.
                    topics::all_devices_filter(DeviceTopic::Up),
                    rumqttd::SegmentConfig {
                        max_segment_size: 16 * 1024 * 1024,
                        max_segment_count: 8,
                    },
                ),
            ])),
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            info!(%addr, "embedded MQTT broker ready");
            return Ok(());
        }
        // Readiness poll of a broker that offers no ready signal.
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotReady(addr))
}

/// A free loopback port (for the demo and tests); the caller retries if it is taken meanwhile.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

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

struct Downlink {
    sender: StreamSender,
    fridges: Vec<FridgeId>,
    /// `(after, head)` of the last read that found nothing for this device, so the pump does
    /// not read the same empty range again.
    idle: Option<(u64, u64)>,
    /// When the last time beacon went to this device (hub clock, ms).
    beacon_sent_ms: i64,
    /// Batches sent and not yet acknowledged: `(up_to, changes)`, in order.
    in_flight: std::collections::VecDeque<(u64, usize)>,
    /// Since when the device has lacked changes of its ledgers (`None` while it has them all).
    behind_since_ms: Option<i64>,
}

impl Downlink {
    fn unacked(&self) -> usize {
        self.in_flight.iter().map(|(_, n)| n).sum()
    }

    fn on_acked(&mut self, acked: u64) {
        while self
            .in_flight
            .front()
            .is_some_and(|(up_to, _)| *up_to <= acked)
        {
            self.in_flight.pop_front();
        }
    }

    /// Whether the device holds every change of its ledgers up to `head`, as far as the hub
    /// knows; keeps `behind_since_ms` up to date.
    fn note_progress(&mut self, head: u64, now_ms: i64) {
        let caught_up = self.in_flight.is_empty()
            && (self.sender.acked() >= head || self.idle.is_some_and(|(_, h)| h == head));
        if caught_up {
            self.behind_since_ms = None;
        } else if self.behind_since_ms.is_none() {
            self.behind_since_ms = Some(now_ms);
        }
    }
}

struct HubLink {
    ctx: MqttContext,
    limits: SenderLimits,
    devices: HashMap<(RegionId, DeviceId), Downlink>,
    seqs: HashMap<RegionId, SeqAllocator>,
    outcomes_tx: mpsc::Sender<(RegionId, DeviceId, UplinkOutcome)>,
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
}

/// Most uplink outcomes handled in one go (see `HubLink::on_outcomes`).
const OUTCOMES_AT_ONCE_MAX: usize = 1_024;

/// The shortest time between two relays of new heads to every device (see `run`).
const RELAY_COALESCE: Duration = Duration::from_millis(20);

/// Most changes one shared downlink read holds; a longer range is read per device.
const SHARED_READ_MAX: u64 = 16_384;

/// One pump pass's read of a region's changes in `(after, head]`, made when the first device
/// needs it.
enum SharedRead {
    Unread {
        after: u64,
        head: u64,
    },
    Read {
        after: u64,
        head: u64,
        rows: Arc<Vec<(String, Entry)>>,
    },
    /// The range was too long or the read failed: devices read their own.
    Unusable,
}

impl SharedRead {
    /// The rows, when they hold everything a device that lacks nothing up to `known` can be
    /// sent up to `head`.
    async fn covering(
        &mut self,
        known: u64,
        head: u64,
        reads: &Arc<crate::store::RegionReads>,
    ) -> Option<Arc<Vec<(String, Entry)>>> {
        if let SharedRead::Unread { after, head: upto } = *self {
            let reads = Arc::clone(reads);
            let read = tokio::task::spawn_blocking(move || {
                reads.changes_between(after, upto, SHARED_READ_MAX)
            })
            .await;
            *self = match read {
                Ok(Ok(rows)) if (rows.len() as u64) < SHARED_READ_MAX => SharedRead::Read {
                    after,
                    head: upto,
                    rows: Arc::new(rows),
                },
                _ => SharedRead::Unusable,
            };
        }
        match self {
            SharedRead::Read {
                after,
                head: read_head,
                rows,
            } if known >= *after && head == *read_head => Some(rows.clone()),
            _ => None,
        }
    }
}

/// The devices an event may have given downlink work to.
enum Scope {
    None,
    Device((RegionId, DeviceId)),
    Devices(Vec<(RegionId, DeviceId)>),
    All,
}

/// Runs the hub's MQTT client until `shutdown` turns true.
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
                        None => link.on_message(&topic, payload).await,
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
        let ours = larder_shared::envelope::open(payload, self.ctx.config.max_message_bytes)
            .and_then(|u| u.verify(payload, &hub_key))
            .and_then(larder_shared::envelope::Verified::plain)
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
        let bytes = match &env.header.recipient {
            Party::Device(device) => {
                self.ensure_box(region, device)?;
                let device_box = self.boxes.get(&(region.clone(), device.clone()))?;
                env.seal_to(&self.ctx.key, device_box)?
            }
            _ => env.seal(&self.ctx.key),
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
    async fn on_message(&mut self, topic: &str, payload: bytes::Bytes) -> Scope {
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
                        let _ = tx.send((region, device, outcome)).await;
                    }
                });
            }
            DeviceTopic::Down => {}
        }
        Scope::None
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

    async fn load_downlink(&self, region: &RegionId, device: &DeviceId) -> Option<Downlink> {
        let reads = self.ctx.regions.get(region)?.reads.clone();
        let id = device.clone();
        let (record, progress) = tokio::task::spawn_blocking(move || reads.device_progress(&id))
            .await
            .ok()?
            .ok()??;
        if record.revoked_at_ms.is_some() {
            return None;
        }
        Some(Downlink {
            sender: StreamSender::new(progress.down_acked, self.limits),
            fridges: record.fridges,
            idle: None,
            beacon_sent_ms: 0,
            in_flight: std::collections::VecDeque::new(),
            behind_since_ms: None,
        })
    }

    /// Handles uplink outcomes that arrived together. Acks are cumulative, so a device with
    /// several accepted uplinks among them gets one signed ack, the furthest (a gap flag at
    /// that point kept): one signature per device per group commit, not per envelope.
    async fn on_outcomes(
        &mut self,
        client: &AsyncClient,
        outcomes: Vec<(RegionId, DeviceId, UplinkOutcome)>,
    ) -> Scope {
        let mut acks: Vec<((RegionId, DeviceId), larder_shared::envelope::Ack)> = Vec::new();
        let mut held: HashMap<(RegionId, DeviceId), usize> = HashMap::new();
        let mut pumps = Vec::new();
        for (region, device, outcome) in outcomes {
            if let UplinkOutcome::Ack(ack) = outcome {
                let key = (region, device);
                match held.get(&key) {
                    Some(&i) => merge_ack(&mut acks[i].1, ack),
                    None => {
                        held.insert(key.clone(), acks.len());
                        acks.push((key, ack));
                    }
                }
                continue;
            }
            if let Scope::Device(key) = self.on_outcome(client, region, device, outcome).await {
                pumps.push(key);
            }
        }
        for ((region, device), ack) in acks {
            if let Scope::Device(key) = self
                .on_outcome(client, region, device, UplinkOutcome::Ack(ack))
                .await
            {
                pumps.push(key);
            }
        }
        let mut seen = std::collections::HashSet::new();
        pumps.retain(|k| seen.insert(k.clone()));
        Scope::Devices(pumps)
    }

    /// Publishes what an uplink's outcome calls for; answers the device when its downlink may
    /// have work (it came online, acknowledged, or changed keys). The changes an accepted
    /// uplink adds reach the other devices through the head it moves.
    async fn on_outcome(
        &mut self,
        client: &AsyncClient,
        region: RegionId,
        device: DeviceId,
        outcome: UplinkOutcome,
    ) -> Scope {
        let key = (region.clone(), device.clone());
        let mut scope = match outcome {
            UplinkOutcome::DownAcked(_) | UplinkOutcome::KeyRotated(_) => {
                Scope::Device(key.clone())
            }
            UplinkOutcome::Ack(_) | UplinkOutcome::Rejected(_) => Scope::None,
        };
        if !matches!(outcome, UplinkOutcome::Rejected(_))
            && !self
                .devices
                .get(&key)
                .is_some_and(|d| d.sender.is_connected())
        {
            // Accepted traffic means the device is online even if its presence was missed.
            self.set_presence(&region, &device, true).await;
            scope = Scope::Device(key.clone());
        }
        match outcome {
            UplinkOutcome::Ack(ack) => self.send_ack(client, key, ack).await,
            UplinkOutcome::KeyRotated(key) => {
                let to = Party::Device(device.clone());
                let body = Body::KeyRotated(larder_shared::rotation::KeyRotated { key });
                let sealed = self.seal(&region, to, body).await;
                // Sealed to the key the device held until now; what follows goes to the new one.
                self.boxes.remove(&(region.clone(), device.clone()));
                if let Some(bytes) = sealed
                    && !self.publish_down(client, &region, &device, bytes)
                {
                    debug!(device = %device, "rotation confirmation not queued; the device will resend");
                }
            }
            UplinkOutcome::DownAcked(up_to) => {
                if let Some(d) = self.devices.get_mut(&key) {
                    let ack = larder_shared::envelope::Ack { up_to, gap: false };
                    d.sender.on_ack(ack, self.ctx.clock.network_ms());
                    d.on_acked(d.sender.acked());
                }
            }
            UplinkOutcome::Rejected(_) => {}
        }
        scope
    }

    /// Queues a downlink envelope for `device`; false, and the link marked jammed, when the
    /// client's request queue is full.
    fn publish_down(
        &mut self,
        client: &AsyncClient,
        region: &RegionId,
        device: &DeviceId,
        bytes: Vec<u8>,
    ) -> bool {
        let topic = topics::device(region, device, DeviceTopic::Down);
        let queued = client
            .try_publish(topic, QoS::AtLeastOnce, false, bytes)
            .is_ok();
        self.jammed |= !queued;
        queued
    }

    /// Acknowledges a device's uplinks, or holds the ack while the request queue is full.
    async fn send_ack(
        &mut self,
        client: &AsyncClient,
        key: (RegionId, DeviceId),
        ack: larder_shared::envelope::Ack,
    ) {
        if !self.jammed {
            let to = Party::Device(key.1.clone());
            let Some(bytes) = self.seal(&key.0, to, Body::Ack(ack)).await else {
                return;
            };
            if self.publish_down(client, &key.0, &key.1, bytes) {
                return;
            }
        }
        match self.held_acks.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut held) => merge_ack(held.get_mut(), ack),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(ack);
            }
        }
    }

    /// Sends the acks held while the request queue was full, until it fills again.
    async fn send_held_acks(&mut self, client: &AsyncClient) {
        let held: Vec<_> = self.held_acks.drain().collect();
        for (key, ack) in held {
            self.send_ack(client, key, ack).await;
        }
    }

    /// Sends every online device the changes it lacks, within its window.
    async fn pump(&mut self, client: &AsyncClient, scope: Scope) {
        if !self.connected || self.jammed {
            return;
        }
        let all = matches!(scope, Scope::All);
        let keys: Vec<(RegionId, DeviceId)> = match scope {
            Scope::None => return,
            Scope::Device(key) => vec![key],
            Scope::Devices(keys) => keys,
            Scope::All => self.devices.keys().cloned().collect(),
        };
        // A pass over every device shares one read of what each region committed since the
        // last such pass among the devices caught up to it: one read per region, not per device.
        let mut shared: HashMap<RegionId, SharedRead> = HashMap::new();
        if all {
            for (region, handle) in &self.ctx.regions {
                let head = *handle.head.borrow();
                if let Some(after) = self.pumped.insert(region.clone(), head)
                    && after < head
                {
                    shared.insert(region.clone(), SharedRead::Unread { after, head });
                }
            }
        }
        let now = self.ctx.clock.network_ms();
        let beacon_every = (self.ctx.sync.time_beacon_interval_seconds * 1000) as i64;
        for key in keys {
            if self.jammed {
                // The rest wait for room: the next pass serves them.
                break;
            }
            if self
                .devices
                .get(&key)
                .is_some_and(|d| now - d.beacon_sent_ms >= beacon_every)
            {
                let beacon = Body::Time(larder_shared::envelope::TimeBeacon { hub_ms: now });
                if let Some(bytes) = self
                    .seal(&key.0, Party::Device(key.1.clone()), beacon)
                    .await
                    && self.publish_down(client, &key.0, &key.1, bytes)
                    && let Some(d) = self.devices.get_mut(&key)
                {
                    d.beacon_sent_ms = now;
                }
            }
            let Some(handle) = self.ctx.regions.get(&key.0) else {
                continue;
            };
            let head = *handle.head.borrow();
            let reads_pool = handle.reads.clone();
            while let Some(d) = self.devices.get(&key) {
                let Some(window) = d.sender.poll_send(head) else {
                    break;
                };
                if d.idle == Some((window.after, head)) {
                    break;
                }
                // How far the device is known to lack nothing: its window, or further when
                // its last read found nothing for it up to a later head.
                let known = match d.idle {
                    Some((after, h)) if after == window.after => h,
                    _ => window.after,
                };
                let (device, fridges) = (key.1.clone(), d.fridges.clone());
                let rows = match shared.get_mut(&key.0) {
                    Some(read) => read.covering(known, head, &reads_pool).await,
                    None => None,
                };
                let entries = if let Some(rows) = rows {
                    rows.iter()
                        .filter(|(author, e)| {
                            e.seq > window.after
                                && author.as_str() != device.as_str()
                                && fridges.contains(&e.ledger)
                        })
                        .take(window.entries_max as usize)
                        .map(|(_, e)| e.clone())
                        .collect()
                } else {
                    let reads = reads_pool.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        reads.downlink_after(&device, &fridges, window.after, window.entries_max)
                    })
                    .await;
                    let Ok(Ok(entries)) = read else {
                        warn!(device = %key.1, "reading the downlink failed");
                        break;
                    };
                    entries
                };
                let Some(batch) = build_batch(window, entries, head) else {
                    break;
                };
                let (up_to, changes) = (batch.up_to, batch.entries.len());
                for e in batch
                    .entries
                    .iter()
                    .filter(|e| e.kind == EntryKind::Withheld)
                {
                    error!(device = %key.1, seq = e.seq, ledger = %e.ledger,
                        "a change too large for a message was withheld from the device's downlink");
                    self.ctx.metrics.withheld(key.0.as_str(), "down");
                }
                if batch.entries.is_empty() {
                    // Nothing for this device yet; the range is covered by its next batch.
                    if let Some(d) = self.devices.get_mut(&key) {
                        d.idle = Some((window.after, head));
                    }
                    break;
                }
                let Some(bytes) = self
                    .seal(&key.0, Party::Device(key.1.clone()), Body::Changes(batch))
                    .await
                else {
                    break;
                };
                let len = bytes.len();
                if !self.publish_down(client, &key.0, &key.1, bytes) {
                    break;
                }
                if let Some(d) = self.devices.get_mut(&key) {
                    d.sender.on_sent(up_to, len);
                    // A resend after a timeout covers batches already counted.
                    if d.in_flight.back().is_none_or(|(last, _)| *last < up_to) {
                        d.in_flight.push_back((up_to, changes));
                    }
                }
            }
        }
    }

    /// Sets each device's unacknowledged-changes and sync-lag gauges.
    fn update_sync_gauges(&mut self, now_ms: i64) {
        for ((region, device), d) in &mut self.devices {
            let Some(handle) = self.ctx.regions.get(region) else {
                continue;
            };
            d.note_progress(*handle.head.borrow(), now_ms);
            let labels = vec![
                ("region", region.to_string()),
                ("device", device.to_string()),
            ];
            self.ctx
                .metrics
                .device_unacked
                .get_or_create(&labels)
                .set(d.unacked() as i64);
            let lag = d
                .behind_since_ms
                .map_or(0.0, |since| (now_ms - since) as f64 / 1000.0);
            self.ctx
                .metrics
                .device_sync_lag
                .get_or_create(&labels)
                .set(lag);
        }
    }
}

/// Folds `ack` into `into`: acks are cumulative, so the furthest wins, and a gap flagged at
/// the same point is kept.
fn merge_ack(into: &mut larder_shared::envelope::Ack, ack: larder_shared::envelope::Ack) {
    if ack.up_to > into.up_to {
        *into = ack;
    } else if ack.up_to == into.up_to {
        into.gap |= ack.gap;
    }
}
