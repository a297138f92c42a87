//! The agent's health counters and Prometheus metrics, shared by the writer, the sync task and
//! the HTTP API.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-reason counters.
pub(crate) type ReasonLabels = Vec<(&'static str, String)>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sales: Counter,
    pub pending_changes: Gauge,
    pub commit_seconds: Histogram,
    pub commit_group_size: Histogram,
    pub commit_failures: Counter,
    pub downlink_batches: Counter,
    pub downlink_rejected: Counter,
    /// Changes too large for a message, withheld (`direction`: `up`, `down`). Alert on any.
    pub changes_withheld: Family<ReasonLabels, Counter>,
    pub envelopes_sent: Counter,
    pub envelope_bytes_sent: Counter,
    pub envelopes_rejected: Family<ReasonLabels, Counter>,
    pub mqtt_connected: Gauge,
    pub mqtt_connects: Counter,
    pub mqtt_connect_failures: Counter,
    pub http_requests: Family<ReasonLabels, Counter>,
    pub disk_free_bytes: Gauge,
    pub outbox_limit: Gauge,
    pub writes_refused: Family<ReasonLabels, Counter>,
    /// Times the hub's store was seen at a new generation (restored or rebuilt).
    pub hub_generations: Counter,
    /// Local changes offered again to a hub whose store came back behind them.
    pub changes_reoffered: Counter,
    /// Changes the hub made, given back to a hub whose store came back without them.
    pub hub_changes_given_back: Counter,
    /// 1 while the hub does not read this agent's protocol version (it sent a notice): upgrade
    /// the agent. Its outbox is kept meanwhile.
    pub protocol_refused: Gauge,
    /// When the oldest card payment taken offline and not yet captured was taken, Unix
    /// seconds (0: none); with `offline_payment_hours_max`, alert on `time() - this`.
    pub offline_payment_oldest_seconds: Gauge,
    pub offline_payment_hours_max: Gauge,
}

impl Default for Metrics {
    /// One piece: the registry, one metric after another.
    fn default() -> Self {
        let mut registry = Registry::with_prefix("larder_agent");
        let m = Self {
            sales: Counter::default(),
            pending_changes: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            commit_group_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_failures: Counter::default(),
            downlink_batches: Counter::default(),
            downlink_rejected: Counter::default(),
            changes_withheld: Family::default(),
            envelopes_sent: Counter::default(),
            envelope_bytes_sent: Counter::default(),
            envelopes_rejected: Family::default(),
            mqtt_connected: Gauge::default(),
            mqtt_connects: Counter::default(),
            mqtt_connect_failures: Counter::default(),
            http_requests: Family::default(),
            disk_free_bytes: Gauge::default(),
            outbox_limit: Gauge::default(),
            writes_refused: Family::default(),
            hub_generations: Counter::default(),
            changes_reoffered: Counter::default(),
            hub_changes_given_back: Counter::default(),
            protocol_refused: Gauge::default(),
            offline_payment_oldest_seconds: Gauge::default(),
            offline_payment_hours_max: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("sales", "Sales committed", m.sales.clone());
        registry.register(
            "offline_payment_oldest_taken_timestamp_seconds",
            "When the oldest card payment taken offline and not yet captured was taken (0: none)",
            m.offline_payment_oldest_seconds.clone(),
        );
        registry.register(
            "offline_payment_hours_max",
            "How long a card payment taken offline may wait for its capture (payments.offline_hours_max)",
            m.offline_payment_hours_max.clone(),
        );
        registry.register(
            "pending_changes",
            "Local changes not yet acknowledged by the hub",
            m.pending_changes.clone(),
        );
        registry.register(
            "commit_seconds",
            "Duration of one group commit",
            m.commit_seconds.clone(),
        );
        registry.register(
            "commit_group_size",
            "Commands per group commit",
            m.commit_group_size.clone(),
        );
        registry.register(
            "commit_failures",
            "Group commits that failed (storage)",
            m.commit_failures.clone(),
        );
        registry.register(
            "downlink_batches",
            "Batches of other replicas' changes applied",
            m.downlink_batches.clone(),
        );
        registry.register(
            "changes_withheld",
            "Ledger changes too large for a message, withheld (audit link kept, change not sent or applied), by direction; alert on any",
            m.changes_withheld.clone(),
        );
        registry.register(
            "downlink_rejected",
            "Downlink batches or changes refused",
            m.downlink_rejected.clone(),
        );
        registry.register(
            "envelopes_sent",
            "Envelopes published to the hub",
            m.envelopes_sent.clone(),
        );
        registry.register(
            "envelope_bytes_sent",
            "Bytes of envelopes published to the hub",
            m.envelope_bytes_sent.clone(),
        );
        registry.register(
            "envelopes_rejected",
            "Envelopes from the broker refused, by reason",
            m.envelopes_rejected.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected to the broker",
            m.mqtt_connected.clone(),
        );
        registry.register(
            "mqtt_connects",
            "Successful broker connections",
            m.mqtt_connects.clone(),
        );
        registry.register(
            "mqtt_connect_failures",
            "Connection attempts that failed (unreachable, TLS handshake, refused by the broker)",
            m.mqtt_connect_failures.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes on the database's filesystem, as last checked by the writer",
            m.disk_free_bytes.clone(),
        );
        registry.register(
            "outbox_limit",
            "The outbox cap: local changes that may wait for the hub's acknowledgement",
            m.outbox_limit.clone(),
        );
        registry.register(
            "writes_refused",
            "Local writes refused to protect the disk, by reason (insufficient_storage, outbox_full)",
            m.writes_refused.clone(),
        );
        registry.register(
            "hub_generations",
            "Times the hub's store was seen at a new generation (restored or rebuilt), each followed by the outbox offered again",
            m.hub_generations.clone(),
        );
        registry.register(
            "changes_reoffered",
            "Outbox positions the hub had acknowledged, offered again because its store came back behind them",
            m.changes_reoffered.clone(),
        );
        registry.register(
            "hub_changes_given_back",
            "Changes the hub made (app orders, kitchen statuses, escrow consumed or returned), given back because its store came back without them",
            m.hub_changes_given_back.clone(),
        );
        registry.register(
            "protocol_refused",
            "1 while the hub does not read this agent's protocol version: upgrade the agent (its outbox is kept)",
            m.protocol_refused.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn reject(&self, reason: &str) {
        self.envelopes_rejected
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }
}

/// State the writer, sync task and HTTP API share.
#[derive(Debug, Default)]
pub struct Shared {
    pub metrics: Metrics,
    pub outbox_head: AtomicU64,
    pub up_acked: AtomicU64,
    pub online: AtomicBool,
    pub last_sync_at_ms: AtomicI64,
    pub catalog_version: AtomicU64,
    /// Free bytes on the database's filesystem at the last write.
    pub disk_free_bytes: AtomicU64,
    /// Set while free space is below the disk reserve (writes refused).
    pub storage_low: AtomicBool,
    /// The outbox cap (`store.outbox_max_changes`).
    pub outbox_limit: AtomicU64,
    /// When the oldest card payment taken offline and not yet captured was taken (0: none).
    pub oldest_offline_payment_ms: AtomicI64,
    /// `payments.offline_hours_max`.
    pub offline_hours_max: AtomicU64,
}
