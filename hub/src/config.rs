//! The hub's TOML configuration: the regions it owns (with their fridges and catalog), the HTTP
//! and MQTT endpoints, the bearer tokens and the limits. Unknown keys are refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use larder_shared::catalog::CatalogItem;
use larder_shared::envelope::MAX_MESSAGE_BYTES_DEFAULT;
use larder_shared::{DeviceId, FridgeId, RegionId};
use serde::{Deserialize, Serialize};

/// `[http]`, with the hub's defaults.
pub type HttpConfig = larder_runtime::http::HttpConfig<HubHttp>;

/// The hub's `[http]` defaults: port 8080, room for many kitchens and apps, and live event
/// streams.
#[derive(Debug, Clone)]
pub struct HubHttp;

impl larder_runtime::http::HttpDefaults for HubHttp {
    const LISTEN: std::net::SocketAddr =
        std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
    const CONNECTIONS_MAX: u64 = 1_024;
    const CONNECTIONS_PER_ADDRESS_MAX: Option<u64> = Some(64);
    const EVENT_STREAMS: Option<(u64, u64)> = Some((256, 8));
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Where the region databases and the hub key live. Relative to the config file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The hub's Ed25519 key; created on first start if missing. Default: `hub.key` in data_dir.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub compaction: CompactionConfig,
    #[serde(default)]
    pub orders: OrdersConfig,
    pub regions: Vec<RegionConfig>,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Customers' identity provider; without it, no customer token is taken.
    #[serde(default)]
    pub customers: Option<crate::identity::CustomersConfig>,
    /// The payment provider (`orders.payment_provider = "external"`).
    #[serde(default)]
    pub payments: Option<crate::payments::PaymentsConfig>,
}

/// Embedded broker, or an external one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    Embedded,
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub mode: BrokerMode,
    /// Where the embedded broker listens, or the external broker's `host:port`.
    pub broker: String,
    /// The hub's own MQTT client id.
    pub client_id: String,
    pub keepalive_seconds: u64,
    pub max_message_bytes: usize,
    /// Most client connections the embedded broker accepts.
    pub connections_max: usize,
    /// Subscribe to every region's uplinks, not just this hub's, so that envelopes for regions
    /// it does not own are seen, ignored and counted (`unknown_region`). For a shared broker
    /// where a misrouted device should show up in the metrics; it costs each hub every
    /// region's traffic, so large clusters leave it off.
    pub watch_other_regions: bool,
    /// MQTT over TLS (`[mqtt.tls]`); unset, plain TCP.
    pub tls: Option<MqttTlsConfig>,
}

/// TLS for the broker connections.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// Embedded broker: the certificate (PEM, leaf first, then any intermediates) it presents.
    /// It must name the addresses agents and the hub's own client connect to.
    pub cert_file: Option<PathBuf>,
    /// Embedded broker: the certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// What the hub's own MQTT client trusts (PEM): the CA of the broker's certificate.
    /// Default: `cert_file` (a self-signed certificate trusts itself).
    pub ca_file: Option<PathBuf>,
}

impl MqttTlsConfig {
    /// The file the hub's own client trusts.
    pub fn client_ca(&self) -> Option<&Path> {
        self.ca_file.as_deref().or(self.cert_file.as_deref())
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            mode: BrokerMode::Embedded,
            broker: "127.0.0.1:1883".into(),
            client_id: "larder-hub".into(),
            keepalive_seconds: 15,
            max_message_bytes: MAX_MESSAGE_BYTES_DEFAULT,
            connections_max: 10_000,
            watch_other_regions: false,
            tls: None,
        }
    }
}

/// Bounded history: when finished records leave the live ledgers, and how long the archive and
/// the audit log keep them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// Finished records (units sold, taken or removed, and their orders) older than this leave
    /// the live ledger documents for the archive at the next compaction.
    pub archive_after_hours: u64,
    /// How often the hub compacts every ledger that has such records.
    pub interval_seconds: u64,
    /// A replica not heard from for this long no longer holds back the retirement of an old
    /// epoch; when it returns it rebases onto the newest epoch like any other.
    pub dormant_after_seconds: u64,
    /// Archived records and audit-log entries older than this are deleted.
    pub retention_days: u64,
    /// Stored answers to requests with an `Idempotency-Key` are kept this long; a retry after
    /// it is a new request.
    pub idempotency_retention_hours: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            archive_after_hours: 7 * 24,
            interval_seconds: 3_600,
            dormant_after_seconds: 30 * 86_400,
            retention_days: 730,
            idempotency_retention_hours: 7 * 24,
        }
    }
}

/// Where app orders' payments come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentProviderMode {
    /// The hub asks the simulated provider after each grace window.
    Simulated,
    /// A payment provider (`[payments]`): the hub asks its API to capture, and takes
    /// outcomes from its signed webhook.
    External,
}

/// App orders: the grace window, payments, the pickup hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersConfig {
    /// An app order may be cancelled free this long after it was placed; payment is captured
    /// after it.
    pub grace_window_seconds: u64,
    /// After the grace window, a payment not answered within this is timed out and the units
    /// released.
    pub payment_timeout_seconds: u64,
    /// A paid order not picked up within this is `expired_no_show` and its units released.
    pub pickup_hold_hours: u64,
    /// How often the hub applies what time makes due (captures, timeouts, no-shows, expiry).
    pub tick_interval_ms: u64,
    pub payment_provider: PaymentProviderMode,
    /// Outcome rates of the simulated provider.
    pub simulated_payments: larder_shared::payments::SimulatedRates,
    /// A simulated payment that "fails later" is reported failed this long after its capture.
    pub fail_later_after_seconds: u64,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            grace_window_seconds: 20,
            payment_timeout_seconds: 60,
            pickup_hold_hours: 24,
            tick_interval_ms: 1_000,
            payment_provider: PaymentProviderMode::Simulated,
            simulated_payments: larder_shared::payments::SimulatedRates::default(),
            fail_later_after_seconds: 60,
        }
    }
}

impl OrdersConfig {
    pub fn policy(&self) -> larder_shared::ledger::OrderPolicy {
        larder_shared::ledger::OrderPolicy {
            grace_ms: (self.grace_window_seconds * 1000) as i64,
            payment_timeout_ms: (self.payment_timeout_seconds * 1000) as i64,
            pickup_hold_ms: (self.pickup_hold_hours * 3_600_000) as i64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub retransmit_after_ms: u64,
    pub batch_entries_max: u64,
    pub inflight_entries_max: u64,
    /// Bytes of downlink envelopes sent to a device and not yet acknowledged (one envelope may
    /// take it past). The embedded broker keeps at most three times this plus
    /// `mqtt.max_message_bytes` of each device's downlink in memory.
    pub inflight_bytes_max: u64,
    /// Commands a region writer commits together.
    pub group_commit_max: usize,
    /// Commands waiting for a region writer; past it, uplinks wait (in the MQTT client, after
    /// two groups' worth held by the region's verifier) and API calls get 503.
    pub queue_depth_max: usize,
    /// Changes a ledger's log grows by before the hub saves a snapshot of the document.
    pub snapshot_every_changes: usize,
    /// How often each online device gets a signed time beacon (and once as it connects).
    pub time_beacon_interval_seconds: u64,
    /// After a device rotates its key, how long the old key is still accepted (envelopes it
    /// signed before the rotation, still on their way, and connect tokens).
    pub key_overlap_seconds: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            retransmit_after_ms: 5_000,
            batch_entries_max: 512,
            inflight_entries_max: 4_096,
            inflight_bytes_max: 512 * 1024,
            group_commit_max: 256,
            queue_depth_max: 4_096,
            snapshot_every_changes: 5_000,
            time_beacon_interval_seconds: 60,
            key_overlap_seconds: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub id: RegionId,
    #[serde(default)]
    pub fridges: Vec<FridgeConfig>,
    #[serde(default)]
    pub catalog: Option<CatalogConfig>,
    /// The region's time zone (IANA name), for the subscription cut-off and report dates.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Local time (`HH:MM`) at which the next day's subscription occurrences become orders;
    /// before it an occurrence can be cancelled free, after it not.
    #[serde(default = "default_cutoff")]
    pub subscription_cutoff: String,
    /// Units per sku a fridge should hold after a delivery, unless its `par_levels` say
    /// otherwise.
    #[serde(default = "default_par")]
    pub par_level_default: u32,
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_cutoff() -> String {
    "20:00".into()
}

fn default_par() -> u32 {
    4
}

impl RegionConfig {
    pub fn time_zone(&self) -> Result<jiff::tz::TimeZone, String> {
        jiff::tz::TimeZone::get(&self.timezone)
            .map_err(|e| format!("{:?} is not a known time zone: {e}", self.timezone))
    }

    pub fn cutoff(&self) -> Result<jiff::civil::Time, String> {
        self.subscription_cutoff
            .parse::<jiff::civil::Time>()
            .map_err(|e| format!("{:?} is not a time HH:MM: {e}", self.subscription_cutoff))
    }

    /// The par level of `sku` at `fridge`.
    pub fn par(&self, fridge: &FridgeId, sku: &str) -> u32 {
        self.fridges
            .iter()
            .find(|f| &f.id == fridge)
            .and_then(|f| f.par_levels.get(sku).copied())
            .unwrap_or(self.par_level_default)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    pub currency: String,
    #[serde(deserialize_with = "larder_shared::catalog::written_items")]
    pub items: Vec<CatalogItem>,
}

/// Who may call the API: a token (stored as its SHA-256), a role and the regions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// SHA-256 of the token, 64 hex digits (`larder-hub token create` prints one).
    pub sha256: String,
    pub role: TokenRole,
    /// Regions this token may touch; `["*"]` for all.
    pub regions: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    Admin,
    Kitchen,
    App,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("larder-hub-data")
}

pub use larder_runtime::config::Problem;

mod fridge;
pub use fridge::FridgeConfig;

impl HubConfig {
    pub fn load(path: &Path) -> Result<Self, Vec<Problem>> {
        Self::parse(&larder_runtime::config::read(path)?, path)
    }

    /// Parses a config file's text; `path` names the file in problems, and relative paths in
    /// it are taken from its folder.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Vec<Problem>> {
        use larder_runtime::config::resolve;
        let mut config: HubConfig = larder_runtime::config::parse_named(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        resolve(base, &mut config.data_dir);
        let tls = config
            .mqtt
            .tls
            .iter_mut()
            .flat_map(|tls| [&mut tls.cert_file, &mut tls.key_file, &mut tls.ca_file]);
        for f in tls.chain([&mut config.key_file]).flatten() {
            resolve(base, f);
        }
        if let Some(p) = &mut config.payments {
            resolve(base, &mut p.webhook_secret_file);
            if let Some(f) = &mut p.api_key_file {
                resolve(base, f);
            }
        }
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("hub.key"))
    }

    pub fn region_db(&self, region: &RegionId) -> PathBuf {
        self.data_dir.join(format!("region-{region}.db"))
    }

    pub fn region(&self, id: &RegionId) -> Option<&RegionConfig> {
        self.regions.iter().find(|r| &r.id == id)
    }

    /// One piece: a flat list of independent checks, read top to bottom like the config file.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if let Some(tls) = &self.mqtt.tls {
            p.extend(tls_problems(tls, self.mqtt.mode));
        }
        if self.regions.is_empty() {
            p.push(Problem("regions: a hub owns at least one region".into()));
        }
        if let Some(c) = &self.customers {
            p.extend(c.problems().into_iter().map(Problem));
        }
        match (&self.payments, self.orders.payment_provider) {
            (Some(pay), _) => p.extend(pay.problems().into_iter().map(Problem)),
            (None, PaymentProviderMode::External) => p.push(Problem(
                "payments: orders.payment_provider = \"external\" needs a [payments] section \
                 (the provider's webhook secret)"
                    .into(),
            )),
            (None, PaymentProviderMode::Simulated) => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.regions {
            if !seen.insert(&r.id) {
                p.push(Problem(format!("regions: {} is listed twice", r.id)));
            }
            let mut fridges = std::collections::BTreeSet::new();
            for f in &r.fridges {
                if let Err(e) = f.hours() {
                    p.push(Problem(format!(
                        "regions.{}.fridges.{}.opening_hours: {e}",
                        r.id, f.id
                    )));
                }
                if f.location.as_ref().is_some_and(|l| l.len() > 200) {
                    p.push(Problem(format!(
                        "regions.{}.fridges.{}.location: at most 200 bytes",
                        r.id, f.id
                    )));
                }
                if !fridges.insert(&f.id) {
                    p.push(Problem(format!(
                        "regions.{}.fridges: {} is listed twice",
                        r.id, f.id
                    )));
                }
            }
            if let Err(e) = r.time_zone() {
                p.push(Problem(format!("regions.{}.timezone: {e}", r.id)));
            }
            if let Err(e) = r.cutoff() {
                p.push(Problem(format!(
                    "regions.{}.subscription_cutoff: {e}",
                    r.id
                )));
            }
            if let Some(c) = &r.catalog
                && let Err(e) = larder_shared::limits::catalog(&c.currency, &c.items)
            {
                p.push(Problem(format!("regions.{}.catalog: {e}", r.id)));
            }
        }
        let c = &self.compaction;
        for (name, value, min, max) in [
            (
                "compaction.archive_after_hours",
                c.archive_after_hours,
                1,
                24 * 3650,
            ),
            (
                "compaction.interval_seconds",
                c.interval_seconds,
                1,
                7 * 86_400,
            ),
            (
                "compaction.dormant_after_seconds",
                c.dormant_after_seconds,
                1,
                3650 * 86_400,
            ),
            ("compaction.retention_days", c.retention_days, 1, 36_500),
            (
                "compaction.idempotency_retention_hours",
                c.idempotency_retention_hours,
                1,
                8_760,
            ),
            (
                "orders.grace_window_seconds",
                self.orders.grace_window_seconds,
                10,
                30,
            ),
            (
                "orders.payment_timeout_seconds",
                self.orders.payment_timeout_seconds,
                1,
                86_400,
            ),
            (
                "orders.pickup_hold_hours",
                self.orders.pickup_hold_hours,
                1,
                24 * 14,
            ),
            (
                "orders.tick_interval_ms",
                self.orders.tick_interval_ms,
                10,
                60_000,
            ),
            (
                "orders.fail_later_after_seconds",
                self.orders.fail_later_after_seconds,
                1,
                30 * 86_400,
            ),
            (
                "sync.retransmit_after_ms",
                self.sync.retransmit_after_ms,
                100,
                3_600_000,
            ),
            (
                "sync.batch_entries_max",
                self.sync.batch_entries_max,
                1,
                100_000,
            ),
            (
                "sync.inflight_entries_max",
                self.sync.inflight_entries_max,
                self.sync.batch_entries_max,
                10_000_000,
            ),
            (
                "sync.inflight_bytes_max",
                self.sync.inflight_bytes_max,
                16 * 1024,
                1 << 30,
            ),
            (
                "sync.group_commit_max",
                self.sync.group_commit_max as u64,
                1,
                10_000,
            ),
            (
                "sync.queue_depth_max",
                self.sync.queue_depth_max as u64,
                1,
                1_000_000,
            ),
            (
                "sync.snapshot_every_changes",
                self.sync.snapshot_every_changes as u64,
                1,
                10_000_000,
            ),
            (
                "sync.time_beacon_interval_seconds",
                self.sync.time_beacon_interval_seconds,
                1,
                86_400,
            ),
            (
                "sync.key_overlap_seconds",
                self.sync.key_overlap_seconds,
                0,
                365 * 86_400,
            ),
            (
                "mqtt.keepalive_seconds",
                self.mqtt.keepalive_seconds,
                5,
                3600,
            ),
            (
                "mqtt.connections_max",
                self.mqtt.connections_max as u64,
                1,
                10_000_000,
            ),
        ]
        .into_iter()
        .chain(self.http.ranges())
        {
            if value < min || value > max {
                p.push(Problem(format!("{name}: {value} is outside {min}..={max}")));
            }
        }
        if let Some(problem) = self.orders.simulated_payments.problem() {
            p.push(Problem(format!("orders.simulated_payments: {problem}")));
        }
        if let Err(e) = DeviceId::new(self.mqtt.client_id.as_str()) {
            p.push(Problem(format!("mqtt.client_id: {e}")));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                p.push(Problem(format!("tokens[{i}].sha256: not 64 hex digits")));
            }
            for r in &t.regions {
                if r != "*"
                    && RegionId::new(r.as_str()).map_or(true, |id| self.region(&id).is_none())
                {
                    p.push(Problem(format!(
                        "tokens[{i}].regions: {r} is not a region of this hub"
                    )));
                }
            }
        }
        if self.mqtt.mode == BrokerMode::Embedded && self.mqtt.broker.parse::<SocketAddr>().is_err()
        {
            p.push(Problem(format!(
                "mqtt.broker: the embedded broker needs an ip:port to listen on, got {:?}",
                self.mqtt.broker
            )));
        }
        if !(16 * 1024..=16 * 1024 * 1024).contains(&self.mqtt.max_message_bytes) {
            p.push(Problem(format!(
                "mqtt.max_message_bytes: {} is outside 16384..=16777216",
                self.mqtt.max_message_bytes
            )));
        }
        p
    }
}

/// What is wrong with `[mqtt.tls]`: files that do not parse, or the embedded broker without
/// its certificate and key.
fn tls_problems(tls: &MqttTlsConfig, mode: BrokerMode) -> Vec<Problem> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut p = Vec::new();
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            match CertificateDer::pem_file_iter(cert).map(|certs| certs.count()) {
                Ok(0) => p.push(Problem(format!(
                    "mqtt.tls.cert_file: {}: no certificate in the file",
                    cert.display()
                ))),
                Ok(_) => {}
                Err(e) => p.push(Problem(format!(
                    "mqtt.tls.cert_file: {}: {e}",
                    cert.display()
                ))),
            }
            if let Err(e) = PrivateKeyDer::from_pem_file(key) {
                p.push(Problem(format!(
                    "mqtt.tls.key_file: {}: {e}",
                    key.display()
                )));
            }
        }
        (None, None) if mode == BrokerMode::External => {}
        _ if mode == BrokerMode::External => p.push(Problem(
            "mqtt.tls: cert_file and key_file are for the embedded broker; an external broker \
             needs only ca_file"
                .into(),
        )),
        _ => p.push(Problem(
            "mqtt.tls: the embedded broker needs both cert_file and key_file".into(),
        )),
    }
    if let Some(ca) = tls.client_ca()
        && let Err(e) = larder_runtime::tls::client_config(ca)
    {
        p.push(Problem(format!("mqtt.tls.ca_file: {e}")));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_and_refuses_unknown_keys() {
        let ok: HubConfig = toml::from_str("[[regions]]\nid = \"north\"\n").expect("parses");
        assert!(ok.problems().is_empty());
        let err = toml::from_str::<HubConfig>("[[regions]]\nid = \"north\"\nsize = 3\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("size"), "{err}");
    }

    #[test]
    fn config_check_names_every_bad_entry_in_every_region() {
        let text = "[[regions]]\nid = \"north\"\nsize = 3\n\n\
                    [[regions]]\nid = \"south\"\nfridges = [{ id = \"f 1\" }]\n\
                    [http]\nlisten = \"nowhere\"\n";
        let problems = HubConfig::parse(text, Path::new("hub.toml")).expect_err("three problems");
        let problems: Vec<String> = problems.into_iter().map(|p| p.0).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("hub.toml: line 3:"), "{problems:?}");
        assert!(problems[0].contains("size"), "{problems:?}");
        assert!(problems[1].starts_with("hub.toml: line 7:"), "{problems:?}");
        assert!(problems[1].contains("f 1"), "{problems:?}");
        assert!(problems[2].starts_with("hub.toml: line 9:"), "{problems:?}");

        // A missing table is one problem, however the file begins.
        let problems =
            HubConfig::parse("data_dir = \"x\"\n", Path::new("hub.toml")).expect_err("no regions");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].0.contains("regions"), "{problems:?}");
    }

    /// A catalog item in the config takes only an item's keys: a misspelt optional one is an
    /// error naming it, not a silent default.
    #[test]
    fn catalog_items_refuse_unknown_keys() {
        let catalog = |key: &str| {
            format!(
                "[[regions]]\nid = \"north\"\n[regions.catalog]\ncurrency = \"EUR\"\n\
                 [[regions.catalog.items]]\nsku = \"lasagna\"\nname = \"Lasagna\"\n\
                 price_minor = 890\n{key} = 72\n"
            )
        };
        let ok: HubConfig = toml::from_str(&catalog("shelf_life_hours")).expect("parses");
        let items = &ok.regions[0].catalog.as_ref().expect("catalog").items;
        assert_eq!(items[0].shelf_life_hours, 72);
        let err = toml::from_str::<HubConfig>(&catalog("shelf_life_hour"))
            .expect_err("unknown key in an item");
        assert!(err.to_string().contains("shelf_life_hour"), "{err}");
    }

    #[test]
    fn value_problems_are_reported() {
        let c: HubConfig = toml::from_str(
            "[[regions]]\nid = \"north\"\n[[regions]]\nid = \"north\"\n[[tokens]]\nsha256 = \"x\"\nrole = \"admin\"\nregions = [\"south\"]\n",
        )
        .expect("parses");
        assert_eq!(c.problems().len(), 3, "{:?}", c.problems());
    }

    #[test]
    fn payment_rates_past_one_in_one_are_refused_without_overflow() {
        let c: HubConfig = toml::from_str(
            "[orders.simulated_payments]\nrefuse_per_mille = 4294967295\nno_answer_per_mille = 1\n\
             [[regions]]\nid = \"north\"\n",
        )
        .expect("parses");
        let problems = c.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].0.starts_with("orders.simulated_payments"));
        let c: HubConfig = toml::from_str(
            "[orders.simulated_payments]\nrefuse_per_mille = 500\nno_answer_per_mille = 500\n\
             [[regions]]\nid = \"north\"\n",
        )
        .expect("parses");
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }

    #[test]
    fn tls_needs_readable_files_and_both_halves_for_the_embedded_broker() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let c: HubConfig = toml::from_str(&format!(
            "[mqtt.tls]\ncert_file = {missing:?}\n[[regions]]\nid = \"north\"\n"
        ))
        .expect("parses");
        let problems = c.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.0.contains("needs both cert_file and key_file")),
            "{problems:?}"
        );
        let c: HubConfig = toml::from_str(&format!(
            "[mqtt.tls]\ncert_file = {missing:?}\nkey_file = {missing:?}\n[[regions]]\nid = \"north\"\n"
        ))
        .expect("parses");
        let problems = c.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.0.starts_with("mqtt.tls.cert_file"))
                && problems
                    .iter()
                    .any(|p| p.0.starts_with("mqtt.tls.key_file"))
                && problems.iter().any(|p| p.0.starts_with("mqtt.tls.ca_file")),
            "{problems:?}"
        );
    }
}
