//! The hub's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct HubMetrics {
    registry: Registry,
    pub envelopes_accepted: Family<Labels, Counter>,
    pub envelopes_rejected: Family<Labels, Counter>,
    /// Envelopes taken from devices, by region and protocol version: how far a rollout came.
    pub uplink_versions: Family<Labels, Counter>,
    pub changes_merged: Family<Labels, Counter>,
    /// Changes too large for a message, withheld: by region and direction (`up` from a
    /// device, `down` to one). Alert on any.
    pub changes_withheld: Family<Labels, Counter>,
    pub downlink_envelopes: Family<Labels, Counter>,
    pub devices_online: Family<Labels, Gauge>,
    pub commit_seconds: Histogram,
    pub commit_failures: Counter,
    pub connections_refused: Family<Labels, Counter>,
    pub http_requests: Family<Labels, Counter>,
    pub ledgers_compacted: Family<Labels, Counter>,
    pub records_archived: Family<Labels, Counter>,
    pub epoch_rows_retired: Family<Labels, Counter>,
    pub conflicts: Family<Labels, Counter>,
    pub order_transitions: Family<Labels, Counter>,
    pub http_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Per device: changes sent down and not yet acknowledged.
    pub device_unacked: Family<Labels, Gauge>,
    /// Per device: seconds since its downlink was last caught up (0 while it is).
    pub device_sync_lag: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

fn http_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for HubMetrics {
    /// One piece: the registry, one metric after another.
    fn default() -> Self {
        let mut registry = Registry::with_prefix("larder_hub");
        let m = Self {
            registry: Registry::default(),
            envelopes_accepted: Family::default(),
            envelopes_rejected: Family::default(),
            uplink_versions: Family::default(),
            changes_merged: Family::default(),
            changes_withheld: Family::default(),
            downlink_envelopes: Family::default(),
            devices_online: Family::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            commit_failures: Counter::default(),
            connections_refused: Family::default(),
            http_requests: Family::default(),
            ledgers_compacted: Family::default(),
            records_archived: Family::default(),
            epoch_rows_retired: Family::default(),
            conflicts: Family::default(),
            order_transitions: Family::default(),
            http_seconds: Family::new_with_constructor(http_histogram),
            device_unacked: Family::default(),
            device_sync_lag: Family::default(),
        };
        registry.register(
            "http_request_seconds",
            "HTTP request duration, by method and route",
            m.http_seconds.clone(),
        );
        registry.register(
            "device_unacked_changes",
            "Changes sent down to a device and not yet acknowledged, by region and device",
            m.device_unacked.clone(),
        );
        registry.register(
            "device_sync_lag_seconds",
            "Seconds since a device last held every change of its fridges' ledgers (0 while it does), by region and device",
            m.device_sync_lag.clone(),
        );
        registry.register(
            "conflicts_detected",
            "Conflict records the hub wrote after merging (one per conflict, however often noticed), by region and kind",
            m.conflicts.clone(),
        );
        registry.register(
            "order_transitions",
            "App order status changes the hub made, by region and status",
            m.order_transitions.clone(),
        );
        registry.register(
            "ledgers_compacted",
            "Ledgers moved onto a new epoch by compaction, by region",
            m.ledgers_compacted.clone(),
        );
        registry.register(
            "records_archived",
            "Finished records moved from live ledgers to the archive, by region",
            m.records_archived.clone(),
        );
        registry.register(
            "epoch_rows_retired",
            "Stored rows of retired ledger epochs deleted, by region",
            m.epoch_rows_retired.clone(),
        );
        registry.register(
            "envelopes_accepted",
            "Envelopes accepted (committed), by region",
            m.envelopes_accepted.clone(),
        );
        registry.register(
            "envelopes_rejected",
            "Envelopes rejected, by region and reason",
            m.envelopes_rejected.clone(),
        );
        registry.register(
            "uplink_versions",
            "Envelopes taken from devices, by region and protocol version (an older version's count stops growing once every device is upgraded)",
            m.uplink_versions.clone(),
        );
        registry.register(
            "changes_merged",
            "Ledger changes merged, by region",
            m.changes_merged.clone(),
        );
        registry.register(
            "changes_withheld",
            "Ledger changes too large for a message, withheld (audit link kept, change not sent or merged), by region and direction; alert on any",
            m.changes_withheld.clone(),
        );
        registry.register(
            "downlink_envelopes",
            "Envelopes sent down to devices, by region and kind",
            m.downlink_envelopes.clone(),
        );
        registry.register(
            "devices_online",
            "Devices whose presence is online, by region",
            m.devices_online.clone(),
        );
        registry.register(
            "commit_seconds",
            "Duration of one region group commit",
            m.commit_seconds.clone(),
        );
        registry.register(
            "connections_refused",
            "Broker connections refused, by reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "commit_failures",
            "Region commits that failed",
            m.commit_failures.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        Self { registry, ..m }
    }
}

impl HubMetrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a withheld change (`direction`: `up` or `down`).
    pub fn withheld(&self, region: &str, direction: &str) {
        self.changes_withheld
            .get_or_create(&vec![
                ("region", region.to_owned()),
                ("direction", direction.to_owned()),
            ])
            .inc();
    }

    pub fn rejected(&self, region: &str, reason: &str) {
        self.rejected_by(region, reason, 1);
    }

    /// Counts `n` envelopes rejected for `reason`.
    pub fn rejected_by(&self, region: &str, reason: &str, n: u64) {
        self.envelopes_rejected
            .get_or_create(&vec![
                ("region", region.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc_by(n);
    }

    /// How many envelopes were rejected for `reason` in `region` (for tests and the demo).
    pub fn rejected_count(&self, region: &str, reason: &str) -> u64 {
        self.envelopes_rejected
            .get_or_create(&vec![
                ("region", region.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .get()
    }
}
