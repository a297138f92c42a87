//! The Larder agent: runs on a fridge or a POS terminal, keeps the device's ledgers in SQLite,
//! answers the local HTTP API and syncs with the hub over MQTT.
//!
//! Data flow: HTTP handlers ([`api`]) → bounded channel → the single [`writer`] thread (group
//! commit into [`store`]) → outbox → [`sync`] task → MQTT → hub; and back: hub → [`sync`] →
//! [`writer`] → store. Reads go to the store's read connections.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod api;
mod cli;
pub mod config;
mod metrics;
mod store;
mod sync;
mod systemd;
mod writer;

pub use cli::main;
pub use config::AgentConfig;
pub use metrics::{Metrics, Shared};
pub use store::{AGENT_SCHEMA as STORE_SCHEMA, StoreError};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use larder_runtime::keys::write_key;
use larder_shared::{FridgeId, SecretKey};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::store::{ReadPool, Store};
use crate::writer::{Command, Writer};

/// Read connections for the HTTP API and the sync task.
const READ_CONNECTIONS: usize = 4;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Startup(#[from] larder_runtime::StartupError),
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("mqtt.tls_ca_file: {0}")]
    Tls(String),
}

/// Reads the device key, or creates it (mode 0600) if the file does not exist.
pub fn load_or_create_key(path: &Path) -> Result<SecretKey, StartError> {
    let err = |message: String| StartError::Key {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => SecretKey::from_file_text(&text).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate().map_err(|e| err(e.to_string()))?;
            write_key(path, &key).map_err(|e| err(e.to_string()))?;
            info!(path = %path.display(), public_key = %key.public(), "created a new device key");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Where a rotation's next key waits until the hub confirms it: `KEY_FILE.next`.
pub fn pending_key_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

/// Creates the next key for a rotation (`KEY_FILE.next`, mode 0600); the running agent
/// announces it to the hub and switches once the hub confirms. An existing pending key is
/// kept (and answered), so running this twice does not start two rotations.
pub fn prepare_rotation(key_path: &Path) -> std::io::Result<(SecretKey, bool)> {
    let next = pending_key_path(key_path);
    match std::fs::read_to_string(&next) {
        Ok(text) => SecretKey::from_file_text(&text)
            .map(|k| (k, false))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate().map_err(|e| std::io::Error::other(e.to_string()))?;
            write_key(&next, &key)?;
            Ok((key, true))
        }
        Err(e) => Err(e),
    }
}

/// Reads a pending rotation's key, if there is one that differs from `current` (a pending file
/// equal to the current key is what a crash between the two steps of [`finish_rotation`]
/// leaves: it is removed).
fn pending_key(key_path: &Path, current: &SecretKey) -> Option<SecretKey> {
    let next = pending_key_path(key_path);
    let text = std::fs::read_to_string(&next).ok()?;
    match SecretKey::from_file_text(&text) {
        Ok(k) if k.public() == current.public() => {
            let _ = std::fs::remove_file(&next);
            None
        }
        Ok(k) => Some(k),
        Err(e) => {
            warn!(path = %next.display(), error = %e, "unreadable pending key ignored");
            None
        }
    }
}

/// Makes the confirmed next key the device key: written beside the key file, synced, renamed
/// over it, the directory synced, then the pending file removed.
pub(crate) fn finish_rotation(key_path: &Path, key: &SecretKey) -> std::io::Result<()> {
    let mut tmp_name = key_path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    write_key(&tmp, key)?;
    std::fs::rename(&tmp, key_path)?;
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    std::fs::remove_file(pending_key_path(key_path))
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    pub http_addr: SocketAddr,
    pub shared: Arc<Shared>,
    pub config: AgentConfig,
    /// The HTTP API as an in-process service, the same router the listener serves (the fuzz
    /// targets call it without a socket).
    pub api: axum::Router,
    writer_tx: mpsc::Sender<Command>,
    shutdown_tx: watch::Sender<bool>,
    network_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    checkpointer: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

/// One ledger document's size, for benchmarks and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerStats {
    pub fridge_id: FridgeId,
    pub epoch: u32,
    /// The document saved (compressed), as a snapshot stores it.
    pub document_bytes: usize,
    pub units: usize,
    pub orders: usize,
}

/// One ledger's digests, for convergence checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerDigest {
    pub fridge_id: FridgeId,
    pub state_digest: String,
}

impl AgentHandle {
    /// Cuts the agent off the network (`false`) or lets it reconnect (`true`).
    pub fn set_network(&self, online: bool) {
        self.network_tx.send_replace(online);
    }

    /// Local changes not yet acknowledged by the hub.
    pub fn pending_changes(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared
            .outbox_head
            .load(Relaxed)
            .saturating_sub(self.shared.up_acked.load(Relaxed))
    }

    /// The state digest of every ledger held here, as the writer sees it now.
    pub async fn digests(&self) -> Vec<LedgerDigest> {
        let (reply, rx) = oneshot::channel();
        if self
            .writer_tx
            .send(Command::Digests { reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Whether the writer thread answers a command within `limit`.
    pub async fn writer_alive(&self, limit: std::time::Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.writer_tx.try_send(Command::Ping { reply }).is_err() {
            // A full queue means the writer is busy, not stuck: it still counts as alive when
            // it drains the queue within the limit.
            return tokio::time::timeout(limit, self.writer_tx.reserve())
                .await
                .is_ok_and(|r| r.is_ok());
        }
        tokio::time::timeout(limit, rx)
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Size and epoch of every ledger document held here.
    pub async fn ledger_stats(&self) -> Vec<LedgerStats> {
        let (reply, rx) = oneshot::channel();
        if self.writer_tx.send(Command::Stats { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the sync task and the HTTP server, then the writer once every command is done.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        // The writer ends when its last sender is gone: the in-process router holds one too.
        self.api = axum::Router::new();
        drop(self.writer_tx);
        if let Some(thread) = self.writer_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some((stop, thread)) = self.checkpointer.take() {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts an agent: opens the store, loads the ledgers, binds the HTTP API and starts syncing.
pub async fn start(config: AgentConfig, key: SecretKey) -> Result<AgentHandle, StartError> {
    start_with_clock(config, key, larder_runtime::Clock::system()).await
}

/// A seed for the simulated payment provider: stable per device.
fn seed_of(device: &larder_shared::DeviceId) -> u64 {
    device
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// Sends the card payments taken offline for capture, every `every` while online, and records
/// each answer: captured, or `payment_failed_after_sale` (refused, or failed later). A payment
/// the provider does not answer stays pending and is asked again.
async fn capture_offline_payments(
    writer: mpsc::Sender<writer::Command>,
    shared: Arc<Shared>,
    provider: impl larder_shared::payments::PaymentProvider,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    use larder_shared::payments::CaptureResult;
    // A periodic job, not a wait for an event: captures go out at this pace while online.
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !shared.online.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        if writer
            .send(writer::Command::PendingCaptures { reply })
            .await
            .is_err()
        {
            return;
        }
        let Ok(pending) = rx.await else { return };
        for capture in pending {
            let ok = match provider.capture(&capture.order, capture.amount_minor, &capture.currency)
            {
                CaptureResult::Captured => true,
                CaptureResult::Refused | CaptureResult::CapturedThenFails => false,
                CaptureResult::NoAnswer => continue,
            };
            if writer
                .send(writer::Command::Captured { capture, ok })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// [`start`] with the clock records are stamped with (simulations move it).
///
/// One piece: start-up in the order its parts depend on each other (store, writer, API, sync,
/// captures), each step a call.
pub async fn start_with_clock(
    config: AgentConfig,
    key: SecretKey,
    clock: larder_runtime::Clock,
) -> Result<AgentHandle, StartError> {
    let tls = config
        .mqtt
        .tls_ca_file
        .as_deref()
        .map(larder_runtime::tls::client_config)
        .transpose()
        .map_err(StartError::Tls)?;
    larder_runtime::config::create_data_dir(&config.data_dir)?;
    let db = config.database_path();
    let store = Store::open(&db)?;
    let env_seq_reserved = store.meta_u64(store::META_ENV_SEQ_RESERVED)?;
    let shared = Arc::new(Shared::default());
    let (writer, outbox_head) = Writer::open(store, &config, clock.clone(), shared.clone())?;
    let reads = Arc::new(ReadPool::open(&db, READ_CONNECTIONS)?);
    let (checkpoint_stop, checkpoint_rx) = std::sync::mpsc::channel();
    let checkpointer = store::spawn_checkpointer(&db, checkpoint_rx)?;
    let (writer_tx, writer_rx) = mpsc::channel(config.writer.queue_depth_max);
    let writer_thread = std::thread::Builder::new()
        .name(format!("writer-{}", config.device_id))
        .spawn(move || writer.run(writer_rx))
        .map_err(larder_runtime::StartupError::Thread)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (network_tx, network_rx) = watch::channel(true);

    let state = api::ApiState {
        device_id: config.device_id.clone(),
        role: config.role,
        region: config.region.clone(),
        fridges: config.fridges.clone(),
        writer: writer_tx.clone(),
        reads: reads.clone(),
        shared: shared.clone(),
        clock: clock.clone(),
    };
    let app = api::router(state, config.http.request_body_bytes_max);
    let api = app.clone();
    let (http_addr, http) = config.http.start(app, shutdown_rx.clone()).await?;
    let ctx = sync::SyncContext {
        device: config.device_id.clone(),
        region: config.region.clone(),
        pending_key: pending_key(&config.key_path(), &key),
        key_path: config.key_path(),
        key,
        hub_key: config.hub_public_key,
        tls,
        mqtt: config.mqtt.clone(),
        sync: config.sync.clone(),
        writer: writer_tx.clone(),
        reads,
        shared: shared.clone(),
        outbox_head,
        network: network_rx,
        env_seq_reserved,
        clock: clock.clone(),
    };
    let captures = tokio::spawn(capture_offline_payments(
        writer_tx.clone(),
        shared.clone(),
        larder_shared::payments::SimulatedProvider::new(
            seed_of(&config.device_id),
            config.orders.simulated_payments,
        ),
        std::time::Duration::from_millis(config.orders.capture_interval_ms),
        shutdown_rx.clone(),
    ));
    let sync = tokio::spawn(sync::run(ctx, shutdown_rx));
    info!(device = %config.device_id, role = config.role.as_str(), http = %http_addr, "agent started");
    Ok(AgentHandle {
        http_addr,
        shared,
        config,
        api,
        writer_tx,
        shutdown_tx,
        network_tx,
        tasks: vec![sync, http, captures],
        writer_thread: Some(writer_thread),
        checkpointer: Some((checkpoint_stop, checkpointer)),
    })
}
