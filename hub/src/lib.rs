//! The Larder hub: owns one or more regions, runs (or joins) the MQTT broker, verifies and merges
//! what devices send, relays each ledger's changes to every replica, and serves the kitchen and
//! admin API.
//!
//! Data flow: devices → broker → [`mqtt`] task → the region's single [`region`] writer (verify,
//! merge, commit, then ack) → [`store`] → downlink pump → other replicas. The HTTP API
//! ([`http`]) reads the region stores through WAL readers and sends admin commands (enroll,
//! revoke) to the same writer.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod audit;
pub mod backup;
pub mod broker_config;
pub mod cli;
pub mod config;
pub mod events;
pub mod http;
pub mod identity;
pub mod import;
pub mod metrics;
pub mod mqtt;
pub mod payments;
pub mod region;
pub mod store;
pub mod subscriptions;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use larder_shared::catalog::Catalog;
use larder_shared::{DeviceId, PublicKey, RegionId, SecretKey};
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::config::{BrokerMode, HubConfig, RegionConfig};
use crate::metrics::HubMetrics;
use crate::region::{RegionCommand, RegionWriter};
use crate::store::{RegionReads, RegionStore};

const READ_CONNECTIONS: usize = 4;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Startup(#[from] larder_runtime::StartupError),
    #[error("region {region}: {source}")]
    Store {
        region: RegionId,
        source: store::StoreError,
    },
    #[error(transparent)]
    Broker(#[from] mqtt::BrokerError),
    #[error("configuration: {0}")]
    Config(String),
}

/// What the rest of the hub holds of one region.
#[derive(Debug, Clone)]
pub struct RegionHandle {
    pub config: RegionConfig,
    pub tx: mpsc::Sender<RegionCommand>,
    /// `up` publishes go through the region's verifier (`region::verifier`) to the writer.
    pub uplinks: mpsc::Sender<region::verifier::VerifierCommand>,
    pub reads: Arc<RegionReads>,
    pub head: watch::Receiver<u64>,
    /// The current catalog, as the region writer publishes versions.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// The region's live event feed.
    pub events: events::Events,
    pub env_seq_reserved: u64,
    /// The region store's generation, named in every acknowledgement, and where it began.
    pub generation: (
        larder_shared::envelope::Generation,
        Option<larder_shared::envelope::Origin>,
    ),
    /// The region's clock, the one its writer stamps records with.
    pub clock: larder_runtime::Clock,
    /// Devices whose presence is online, as the MQTT task last heard.
    pub presence: Arc<RwLock<HashMap<DeviceId, bool>>>,
}

/// A running hub.
#[derive(Debug)]
pub struct HubHandle {
    pub http_addr: SocketAddr,
    pub broker: String,
    pub public_key: PublicKey,
    pub regions: BTreeMap<RegionId, RegionHandle>,
    pub metrics: Arc<HubMetrics>,
    /// The HTTP API as an in-process service, the same router the listener serves (the fuzz
    /// targets call it without a socket).
    pub api: axum::Router,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    writer_threads: Vec<std::thread::JoinHandle<()>>,
}

impl HubHandle {
    /// Stops the MQTT client and HTTP server, then the region writers. The embedded broker
    /// has no shutdown and lives until the process ends.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Through the verifier, which passes on the uplinks it holds and then the stop.
        for region in self.regions.values() {
            let stop = region::verifier::VerifierCommand::Stop;
            if region.uplinks.send(stop).await.is_err() {
                let _ = region.tx.send(region::RegionCommand::Stop).await;
            }
        }
        self.regions.clear();
        // The in-process router holds the regions' senders and read pools too.
        self.api = axum::Router::new();
        for t in self.writer_threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Reads the hub key, or creates it (mode 0600) if missing.
pub fn load_or_create_key(path: &std::path::Path) -> Result<SecretKey, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => SecretKey::from_file_text(&t).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate().map_err(|e| e.to_string())?;
            larder_runtime::keys::write_key(path, &key)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            info!(path = %path.display(), public_key = %key.public(), "created a new hub key");
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Compacts every region every `compaction.interval_seconds` until shutdown.
async fn run_compactions(
    regions: Vec<RegionHandle>,
    config: config::CompactionConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = std::time::Duration::from_secs(config.interval_seconds.max(1));
    let archive_after = std::time::Duration::from_secs(config.archive_after_hours * 3600);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for r in &regions {
            match http::compact_region(r, archive_after, None).await {
                Ok(report) if !report.ledgers.is_empty() || report.retired_rows > 0 => {
                    info!(region = %r.config.id, ledgers = report.ledgers.len(),
                        retired_rows = report.retired_rows, "compaction done");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(region = %r.config.id, error = %e, "compaction failed; will retry")
                }
            }
        }
    }
}

/// Starts a hub: region stores and writers, the broker (if embedded), the MQTT client and the
/// HTTP API.
pub async fn start(config: HubConfig, key: SecretKey) -> Result<HubHandle, StartError> {
    start_with_clock(config, key, larder_runtime::Clock::system()).await
}

/// Sends every region writer a tick every `orders.tick_interval_ms`, so what time makes due
/// (captures after grace windows, payment timeouts, no-shows) is applied.
async fn run_ticks(regions: Vec<RegionHandle>, every_ms: u64, mut shutdown: watch::Receiver<bool>) {
    let period = std::time::Duration::from_millis(every_ms.max(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for r in &regions {
            // A full queue means the writer is busy; the next tick will do.
            let _ = r.tx.try_send(RegionCommand::Tick);
        }
    }
}

/// [`start`] with the clock the region writers stamp records with and judge time by (tests
/// and simulations move it).
///
/// One piece: start-up in the order its parts depend on each other (stores, writers, broker, API,
/// MQTT client, timers), each step a call.
pub async fn start_with_clock(
    config: HubConfig,
    key: SecretKey,
    clock: larder_runtime::Clock,
) -> Result<HubHandle, StartError> {
    larder_runtime::config::create_data_dir(&config.data_dir)?;
    let metrics = Arc::new(HubMetrics::default());
    let payments = payments::Payments::start(&config, clock.clone())
        .map_err(StartError::Config)?
        .map(Arc::new);
    let mut regions = BTreeMap::new();
    let mut writer_threads = Vec::new();
    for rc in &config.regions {
        let path = config.region_db(&rc.id);
        let store_err = |source| StartError::Store {
            region: rc.id.clone(),
            source,
        };
        let store = RegionStore::open(&path).map_err(store_err)?;
        let generation = store.generation().map_err(store_err)?;
        info!(region = %rc.id, generation = %generation.0, origin = ?generation.1, "region store open");
        let fridges = rc.fridges.iter().map(|f| f.id.clone()).collect();
        let calendar = subscriptions::Calendar::of(rc)
            .map_err(|e| StartError::Config(format!("region {}: {e}", rc.id)))?;
        let events = events::Events::new(clock.clone());
        let (mut writer, head) = RegionWriter::open(
            rc.id.clone(),
            store,
            fridges,
            config.mqtt.max_message_bytes,
            &config.sync,
            config.compaction.clone(),
            config.orders.clone(),
            calendar,
            clock.clone(),
            metrics.clone(),
            events.clone(),
            key.clone(),
        )
        .map_err(store_err)?;
        if let Some(p) = &payments {
            writer.capture_through(p.captures.clone());
        }
        match &rc.catalog {
            Some(c) => writer.ensure_catalog(&c.currency, &c.items),
            None => writer.ensure_catalog("EUR", &[]),
        }
        .map_err(store_err)?;
        let catalog = writer.catalog_watch();
        let env_seq_reserved = writer.env_seq_reserved().map_err(store_err)?;
        let reads = Arc::new(RegionReads::open(&path, READ_CONNECTIONS).map_err(store_err)?);
        let (tx, rx) = mpsc::channel(config.sync.queue_depth_max);
        // The checkpointer makes its last checkpoint once the writer has stopped.
        let (checkpoint_stop, checkpoint_rx) = std::sync::mpsc::channel::<()>();
        let checkpointer = larder_runtime::sqlite::checkpoint_connection(&path)
            .and_then(|conn| {
                larder_runtime::sqlite::run_checkpointer(
                    conn,
                    format!("checkpoint-{}", rc.id),
                    checkpoint_rx,
                )
            })
            .map_err(store_err)?;
        writer_threads.push(
            std::thread::Builder::new()
                .name(format!("region-{}", rc.id))
                .spawn(move || {
                    writer.run(rx);
                    drop(checkpoint_stop);
                })
                .map_err(larder_runtime::StartupError::Thread)?,
        );
        writer_threads.push(checkpointer);
        // The verifier needs only a group's worth of lookahead: uplinks wait in the writer's
        // queue (`sync.queue_depth_max`), already checked.
        let (uplinks, uplinks_rx) = mpsc::channel(2 * config.sync.group_commit_max.max(1));
        let verifier = region::verifier::Verifier {
            reads: reads.clone(),
            hub_key: key.clone(),
            max_message_bytes: config.mqtt.max_message_bytes,
            group_max: config.sync.group_commit_max,
        };
        writer_threads.push(
            verifier
                .spawn(format!("verify-{}", rc.id), uplinks_rx, tx.clone())
                .map_err(larder_runtime::StartupError::Thread)?,
        );
        regions.insert(
            rc.id.clone(),
            RegionHandle {
                config: rc.clone(),
                tx,
                uplinks,
                reads,
                head,
                catalog,
                events,
                env_seq_reserved,
                generation,
                clock: clock.clone(),
                presence: Arc::new(RwLock::new(HashMap::new())),
            },
        );
    }
    let presence = if config.mqtt.mode == BrokerMode::Embedded {
        mqtt::PresenceBook::admitting()
    } else {
        mqtt::PresenceBook::default()
    };
    if config.mqtt.mode == BrokerMode::Embedded {
        let addr: SocketAddr = config.mqtt.broker.parse().map_err(|_| {
            StartError::Broker(mqtt::BrokerError::NotReady(SocketAddr::from((
                [127, 0, 0, 1],
                0,
            ))))
        })?;
        let admission = Arc::new(mqtt::Admission::new(
            config.mqtt.client_id.clone(),
            key.public(),
            regions.values().map(|r| r.reads.clone()).collect(),
            presence.clone(),
            clock.clone(),
        ));
        mqtt::start_embedded_broker(
            addr,
            config.mqtt.tls.as_ref(),
            config.mqtt.max_message_bytes + 1024,
            config.mqtt.connections_max,
            // A window, and the one envelope that may take it past its limit.
            (config.sync.inflight_bytes_max as usize).saturating_add(config.mqtt.max_message_bytes),
            admission,
            metrics.clone(),
        )?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = http::HubState {
        regions: Arc::new(regions.clone()),
        tokens: Arc::new(config.tokens.clone()),
        payments,
        clock: clock.clone(),
        customers: match &config.customers {
            Some(c) => Some(Arc::new(
                identity::Customers::new(c.clone()).map_err(StartError::Config)?,
            )),
            None => None,
        },
        metrics: metrics.clone(),
        archive_after: std::time::Duration::from_secs(config.compaction.archive_after_hours * 3600),
        shutdown: shutdown_rx.clone(),
        streams: {
            let (all, per_token) = config.http.event_streams();
            larder_runtime::http::Places::new(
                usize::try_from(per_token).unwrap_or(usize::MAX),
                usize::try_from(all).unwrap_or(usize::MAX),
            )
        },
    };
    let app = http::router(state, config.http.request_body_bytes_max);
    let api = app.clone();
    let (http_addr, http_task) = config.http.start(app, shutdown_rx.clone()).await?;
    let ctx = mqtt::MqttContext {
        regions: regions.clone(),
        key: key.clone(),
        config: config.mqtt.clone(),
        sync: config.sync.clone(),
        metrics: metrics.clone(),
        presence,
        clock: clock.clone(),
    };
    let compaction_task = tokio::spawn(run_compactions(
        regions.values().cloned().collect(),
        config.compaction.clone(),
        shutdown_rx.clone(),
    ));
    let tick_task = tokio::spawn(run_ticks(
        regions.values().cloned().collect(),
        config.orders.tick_interval_ms,
        shutdown_rx.clone(),
    ));
    let mqtt_task = tokio::spawn(mqtt::run(ctx, shutdown_rx));
    info!(http = %http_addr, broker = %config.mqtt.broker, regions = regions.len(), "hub started");
    Ok(HubHandle {
        http_addr,
        broker: config.mqtt.broker.clone(),
        public_key: key.public(),
        regions,
        metrics,
        api,
        shutdown_tx,
        tasks: vec![mqtt_task, http_task, compaction_task, tick_task],
        writer_threads,
    })
}
