//! The agent's TOML configuration: one struct per table, unknown keys refused, every limit
//! named with its unit, every path and address with a working default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use larder_runtime::config;
use larder_shared::domain::Role;
use larder_shared::envelope::MAX_MESSAGE_BYTES_DEFAULT;
use larder_shared::{DeviceId, FridgeId, PublicKey, RegionId, SiteId};
use serde::Deserialize;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    pub role: Role,
    pub region: RegionId,
    #[serde(default)]
    pub site: Option<SiteId>,
    /// The fridges whose ledgers this device holds: its own for a fridge, those it sells from
    /// for a POS.
    pub fridges: Vec<FridgeId>,
    /// Where the database lives (created if missing). Relative paths are relative to the
    /// config file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The device's Ed25519 key; created on first start if missing. Default: `device.key` in
    /// `data_dir`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The hub's public key (64 hex digits), to verify everything the hub sends.
    pub hub_public_key: PublicKey,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub writer: WriterConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub orders: OrdersConfig,
    #[serde(default)]
    pub payments: PaymentsConfig,
    #[serde(default)]
    pub temperature: TemperatureConfig,
}

/// Card payments taken offline: how long one may wait for its capture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// Once a card payment taken offline has waited longer than this for its capture, card
    /// sales taken offline get 409 `offline_payment_too_old` until it is captured (the
    /// device is online again); cash still works. 1 to 168.
    pub offline_hours_max: u64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            offline_hours_max: 24,
        }
    }
}

/// When a fridge's units are quarantined for warmth.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemperatureConfig {
    /// Readings above this start (or continue) an excursion.
    pub max_celsius: f64,
    /// An excursion this long quarantines every unit in the fridge (removal reason
    /// `temperature`).
    pub excursion_minutes: u64,
    /// How far a reading's `at` (the firmware's clock) may be from the agent's trusted time.
    /// A reading further off is refused; an excursion is timed on the agent's trusted clock.
    pub reading_skew_seconds_max: u64,
}

impl Default for TemperatureConfig {
    fn default() -> Self {
        Self {
            max_celsius: 5.0,
            excursion_minutes: 30,
            reading_skew_seconds_max: 300,
        }
    }
}

/// Escrow and the offline payment risk budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersConfig {
    /// Share of a fridge's free units per sku it grants the hub in escrow while online, so the
    /// hub can confirm app orders while the fridge is offline (at least one where two or more
    /// are free). Fridge agents only.
    pub escrow_share: f64,
    /// Card payments taken offline and not yet captured, at most. Past it card sales get 409
    /// `offline_limit_reached`; cash still works.
    pub offline_card_payments_max: u64,
    /// Total of card payments taken offline and not yet captured, in minor units, at most.
    pub offline_card_total_minor_max: u64,
    /// How often, while online, payments taken offline are sent for capture.
    pub capture_interval_ms: u64,
    /// The simulated payment provider's outcome rates (the provider is simulated).
    pub simulated_payments: larder_shared::payments::SimulatedRates,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            escrow_share: 0.25,
            offline_card_payments_max: 20,
            offline_card_total_minor_max: 20_000,
            capture_interval_ms: 2_000,
            simulated_payments: larder_shared::payments::SimulatedRates::default(),
        }
    }
}

/// Limits on what the agent keeps on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Free space kept on the database's filesystem. Below it, writes are refused with 507
    /// `insufficient_storage` (reads keep working) until space returns.
    pub disk_reserve_bytes: u64,
    /// Local changes that may wait for the hub's acknowledgement. At the cap, new writes are
    /// refused with 507 `outbox_full` until the hub acknowledges some: nothing unsynced is
    /// ever dropped to make room.
    pub outbox_max_changes: u64,
    /// Records that left the live ledgers at a compaction stay in the local archive this long.
    pub archive_retention_days: u64,
    /// A retry with the same `Idempotency-Key` gets the first answer for this long.
    pub idempotency_retention_hours: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            disk_reserve_bytes: 64 * 1024 * 1024,
            outbox_max_changes: 1_000_000,
            archive_retention_days: 730,
            idempotency_retention_hours: 168,
        }
    }
}

/// `[http]`, with the agent's defaults.
pub type HttpConfig = larder_runtime::http::HttpConfig<AgentHttp>;

/// The agent's `[http]` defaults: port 7070 on loopback, a few clients (the firmware and the
/// POS app) that share one address and may hold every place, and no event streams.
#[derive(Debug, Clone)]
pub struct AgentHttp;

impl larder_runtime::http::HttpDefaults for AgentHttp {
    const LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7070);
    const CONNECTIONS_MAX: u64 = 256;
    const CONNECTIONS_PER_ADDRESS_MAX: Option<u64> = None;
    const EVENT_STREAMS: Option<(u64, u64)> = None;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `host:port` of the hub's broker.
    pub broker: String,
    pub keepalive_seconds: u64,
    pub reconnect_delay_ms_min: u64,
    pub reconnect_delay_ms_max: u64,
    pub max_message_bytes: usize,
    /// The password an external broker (Mosquitto, EMQX) knows this device by, as
    /// `larder-hub broker-config` derived it. Unset (the default), the device proves itself
    /// with a fresh connect token signed by its key, which the hub's embedded broker checks.
    pub password: Option<String>,
    /// Connect over TLS, trusting only the certificates in this PEM file (the hub's CA, or the
    /// hub's own certificate): the hub is pinned, the system's roots are not used. The host of
    /// `broker` must be a name (or IP address) the hub's certificate is issued for. Unset: plain
    /// TCP. A relative path is resolved against the config file's directory.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: "127.0.0.1:1883".into(),
            keepalive_seconds: 15,
            reconnect_delay_ms_min: 200,
            reconnect_delay_ms_max: 10_000,
            max_message_bytes: MAX_MESSAGE_BYTES_DEFAULT,
            password: None,
            tls_ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub retransmit_after_ms: u64,
    pub batch_entries_max: u64,
    pub inflight_entries_max: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            retransmit_after_ms: 5_000,
            batch_entries_max: 512,
            inflight_entries_max: 4_096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    /// Commands waiting for the writer; past it, requests get 503 `overloaded`.
    pub queue_depth_max: usize,
    /// Commands committed together in one transaction.
    pub group_commit_max: usize,
    /// Changes kept per ledger before they are folded into a snapshot.
    pub snapshot_every_changes: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            queue_depth_max: 4_096,
            group_commit_max: 256,
            snapshot_every_changes: 5_000,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("larder-agent-data")
}

pub use larder_runtime::config::Problem;

impl AgentConfig {
    /// Reads, parses and checks a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, Vec<Problem>> {
        let mut config: Self = larder_runtime::config::parse_named(&config::read(path)?, path)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Parses a config's text: every problem serde finds, one line each (see
    /// [`larder_runtime::config::parse_toml`]).
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        config::parse_toml(text)
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        config::resolve(base, &mut self.data_dir);
        for path in [&mut self.key_file, &mut self.mqtt.tls_ca_file]
            .into_iter()
            .flatten()
        {
            config::resolve(base, path);
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("device.key"))
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("agent.db")
    }

    /// Every value problem, one line each.
    ///
    /// One piece: a flat list of independent checks, read top to bottom like the config file.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        match (self.role, self.fridges.len()) {
            (Role::Fridge, 1) => {}
            (Role::Fridge, n) => p.push(Problem(format!(
                "fridges: a fridge agent holds exactly its own fridge's ledger, {n} listed"
            ))),
            (Role::Pos, 0) => p.push(Problem(
                "fridges: a POS agent must list at least one fridge it sells from".into(),
            )),
            (Role::Pos, _) => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.fridges {
            if !seen.insert(f) {
                p.push(Problem(format!("fridges: {f} is listed twice")));
            }
        }
        let key = self.key_path();
        if key.exists()
            && let Err(e) = std::fs::read_to_string(&key)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    larder_shared::SecretKey::from_file_text(&t).map_err(|e| e.to_string())
                })
        {
            p.push(Problem(format!("key_file: {}: {e}", key.display())));
        }
        if let Some(ca) = &self.mqtt.tls_ca_file
            && let Err(e) = larder_runtime::tls::client_config(ca)
        {
            p.push(Problem(format!("mqtt.tls_ca_file: {e}")));
        }
        if self.mqtt.broker.parse::<SocketAddr>().is_err() && !self.mqtt.broker.contains(':') {
            p.push(Problem(format!(
                "mqtt.broker: {:?} is not host:port",
                self.mqtt.broker
            )));
        }
        if !(0.0..=0.9).contains(&self.orders.escrow_share) {
            p.push(Problem(format!(
                "orders.escrow_share: {} is outside 0.0..=0.9",
                self.orders.escrow_share
            )));
        }
        if !(-30.0..=30.0).contains(&self.temperature.max_celsius) {
            p.push(Problem(format!(
                "temperature.max_celsius: {} is outside -30.0..=30.0",
                self.temperature.max_celsius
            )));
        }
        if let Some(problem) = self.orders.simulated_payments.problem() {
            p.push(Problem(format!("orders.simulated_payments: {problem}")));
        }
        let ranges: [(&str, u64, u64, u64); 17] = [
            (
                "temperature.excursion_minutes",
                self.temperature.excursion_minutes,
                1,
                24 * 60,
            ),
            (
                "temperature.reading_skew_seconds_max",
                self.temperature.reading_skew_seconds_max,
                1,
                24 * 3600,
            ),
            (
                "orders.offline_card_payments_max",
                self.orders.offline_card_payments_max,
                0,
                100_000,
            ),
            (
                "payments.offline_hours_max",
                self.payments.offline_hours_max,
                1,
                168,
            ),
            (
                "orders.offline_card_total_minor_max",
                self.orders.offline_card_total_minor_max,
                0,
                1 << 40,
            ),
            (
                "orders.capture_interval_ms",
                self.orders.capture_interval_ms,
                10,
                3_600_000,
            ),
            (
                "store.idempotency_retention_hours",
                self.store.idempotency_retention_hours,
                1,
                24 * 365,
            ),
            (
                "store.archive_retention_days",
                self.store.archive_retention_days,
                1,
                36_500,
            ),
            (
                "store.disk_reserve_bytes",
                self.store.disk_reserve_bytes,
                0,
                1 << 40,
            ),
            (
                "store.outbox_max_changes",
                self.store.outbox_max_changes,
                1_000,
                100_000_000,
            ),
            (
                "mqtt.keepalive_seconds",
                self.mqtt.keepalive_seconds,
                5,
                3600,
            ),
            (
                "mqtt.reconnect_delay_ms_min",
                self.mqtt.reconnect_delay_ms_min,
                10,
                60_000,
            ),
            (
                "mqtt.reconnect_delay_ms_max",
                self.mqtt.reconnect_delay_ms_max,
                self.mqtt.reconnect_delay_ms_min,
                600_000,
            ),
            (
                "mqtt.max_message_bytes",
                self.mqtt.max_message_bytes as u64,
                16 * 1024,
                16 * 1024 * 1024,
            ),
            (
                "sync.batch_entries_max",
                self.sync.batch_entries_max,
                1,
                100_000,
            ),
            (
                "writer.group_commit_max",
                self.writer.group_commit_max as u64,
                1,
                10_000,
            ),
            (
                "writer.queue_depth_max",
                self.writer.queue_depth_max as u64,
                1,
                1_000_000,
            ),
        ];
        for (name, value, min, max) in ranges.into_iter().chain(self.http.ranges()) {
            if value < min || value > max {
                p.push(Problem(format!("{name}: {value} is outside {min}..={max}")));
            }
        }
        p.extend(self.http.problems().into_iter().map(Problem));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device_id = "pos-1"
role = "pos"
region = "north"
fridges = ["fridge-1"]
hub_public_key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::parse(MINIMAL).expect("parses");
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(c.http.listen.port(), 7070);
        assert_eq!(c.mqtt.max_message_bytes, MAX_MESSAGE_BYTES_DEFAULT);
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            AgentConfig::parse(&format!("{MINIMAL}\ncolour = \"red\"\n")).expect_err("unknown key");
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].contains("colour"), "{err:?}");
        let err = AgentConfig::parse(&format!("{MINIMAL}\n[mqtt]\nbrokr = \"x\"\n"))
            .expect_err("unknown key");
        assert!(err[0].contains("brokr"), "{err:?}");
    }

    #[test]
    fn every_parse_problem_is_reported_on_its_line() {
        // Lines 2, 8, 10 and 11 of this text are wrong, each differently.
        let text = format!(
            "{}\ncolour = \"red\"\n[mqtt]\nbrokr = \"x\"\nkeepalive_seconds = \"soon\"\n",
            MINIMAL.replace("device_id = \"pos-1\"", "device_id = \"Bad Id!\"")
        );
        let err = AgentConfig::parse(&text).expect_err("four problems");
        let lines: Vec<&str> = err
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(lines, ["line 2", "line 8", "line 10", "line 11"], "{err:?}");
        assert!(err[0].contains("Bad Id!"), "{err:?}");
        assert!(err[1].contains("colour"), "{err:?}");
        assert!(err[2].contains("brokr"), "{err:?}");
        assert!(
            err[3].contains("soon") || err[3].contains("integer"),
            "{err:?}"
        );
    }

    #[test]
    fn a_bad_required_value_is_not_also_reported_missing() {
        let text = MINIMAL.replace("role = \"pos\"", "role = \"toaster\"");
        let err = AgentConfig::parse(&text).expect_err("bad role");
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].contains("toaster"), "{err:?}");
    }

    #[test]
    fn a_syntax_error_is_reported_once() {
        let err = AgentConfig::parse(&format!("{MINIMAL}\nfridges = [\n")).expect_err("syntax");
        assert_eq!(err.len(), 1, "{err:?}");
    }

    #[test]
    fn value_problems_are_all_reported() {
        let text = MINIMAL
            .replace("role = \"pos\"", "role = \"fridge\"")
            .replace("fridges = [\"fridge-1\"]", "fridges = [\"a\", \"a\"]")
            + "[mqtt]\nkeepalive_seconds = 1\n";
        let c = AgentConfig::parse(&text).expect("parses");
        let problems = c.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
