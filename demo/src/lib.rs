//! Larder's demo (`larder-demo`): a hub with its embedded broker and a simulated fleet in one
//! process; and the fleet's parts (seeded keys, configs, a hub on a free port), which the
//! end-to-end tests and benchmarks build on.
//!
//! Each fridge and POS is a real agent (own SQLite file in a temp dir, own local HTTP API, MQTT
//! over loopback TCP). A seeded schedule refills fridges, sells at POS terminals and fridge card
//! readers over the agents' HTTP APIs, records pickups, and cuts POS agents off the network and
//! lets them rejoin. At the end every partition heals, and the demo checks that every replica of
//! every ledger converged and that every sale that got a 2xx reached the hub.

use std::net::SocketAddr;
use std::path::Path;

use larder_agent::config::AgentConfig;
use larder_shared::catalog::CatalogItem;
use larder_shared::domain::Role;
use larder_shared::{FridgeId, PublicKey, RegionId, SecretKey, SiteId, Sku};
use sha2::Digest;

pub mod fleet;
pub mod idp;
pub mod provider;

use larder_hub::HubHandle;
use larder_hub::config::{
    BrokerMode, CatalogConfig, FridgeConfig, HttpConfig, HubConfig, MqttConfig, RegionConfig,
    SyncConfig, TokenConfig, TokenRole,
};

/// The demo region's id.
pub const REGION: &str = "demo";

/// A key derived from a seed and a name, so a demo run is repeatable.
pub fn seeded_key(seed: u64, name: &str) -> SecretKey {
    let mut h = sha2::Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    SecretKey::from_seed(h.finalize().into())
}

/// The demo catalog.
pub fn demo_catalog() -> CatalogConfig {
    let items = [
        ("lasagna", "Lasagna al forno", 890),
        ("lasagna-lf", "Lactose-free lasagna", 920),
        ("salad-quinoa", "Quinoa salad", 750),
        ("curry-veg", "Vegetable curry", 820),
        ("soup-lentil", "Lentil soup", 590),
        ("wrap-chicken", "Chicken wrap", 680),
    ];
    CatalogConfig {
        currency: "EUR".into(),
        items: items
            .iter()
            .filter_map(|(sku, name, price)| {
                Some(CatalogItem {
                    sku: Sku::new(*sku).ok()?,
                    name: (*name).into(),
                    price_minor: *price,
                    allergens: vec![],
                    shelf_life_hours: 72,
                })
            })
            .collect(),
    }
}

/// A hub config for one region with `fridges` fridges, loopback addresses and one admin token.
pub fn hub_config(
    data_dir: &Path,
    broker_port: u16,
    fridges: u32,
    admin_token_sha256: String,
) -> anyhow::Result<HubConfig> {
    let fridges = (1..=fridges)
        .map(|i| -> anyhow::Result<FridgeConfig> {
            Ok(FridgeConfig {
                id: FridgeId::new(format!("fridge-{i}"))?,
                site: SiteId::new(format!("site-{i}"))?,
                low_stock_units: 2,
                par_levels: Default::default(),
                location: Some(format!("Lobby, {i} Market Street")),
                opening_hours: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(HubConfig {
        data_dir: data_dir.to_path_buf(),
        key_file: None,
        http: HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..HttpConfig::default()
        },
        mqtt: MqttConfig {
            mode: BrokerMode::Embedded,
            broker: format!("127.0.0.1:{broker_port}"),
            ..MqttConfig::default()
        },
        sync: SyncConfig {
            retransmit_after_ms: 2_000,
            ..SyncConfig::default()
        },
        compaction: larder_hub::config::CompactionConfig::default(),
        orders: larder_hub::config::OrdersConfig::default(),
        regions: vec![RegionConfig {
            id: RegionId::new(REGION)?,
            fridges,
            catalog: Some(demo_catalog()),
            timezone: "UTC".into(),
            subscription_cutoff: "20:00".into(),
            par_level_default: 4,
        }],
        tokens: vec![TokenConfig {
            sha256: admin_token_sha256,
            role: TokenRole::Admin,
            regions: vec!["*".into()],
        }],
        customers: None,
        payments: None,
    })
}

/// An agent config on loopback for the demo and tests.
pub fn agent_config(
    data_dir: &Path,
    device: &str,
    role: Role,
    fridges: &[FridgeId],
    hub_key: PublicKey,
    broker: &str,
) -> anyhow::Result<AgentConfig> {
    let mut c = AgentConfig::parse(&format!(
        "device_id = \"{device}\"\nrole = \"{}\"\nregion = \"{REGION}\"\nfridges = {}\nhub_public_key = \"{hub_key}\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nbroker = \"{broker}\"\nreconnect_delay_ms_min = 50\nreconnect_delay_ms_max = 1000\n\
         [sync]\nretransmit_after_ms = 2000\n",
        role.as_str(),
        serde_json::to_string(fridges)?,
    ))
    .map_err(|problems| anyhow::anyhow!(problems.join("; ")))?;
    c.data_dir = data_dir.to_path_buf();
    Ok(c)
}

/// Starts a hub on a free broker port, retrying if the port was taken meanwhile; customers'
/// tokens come from `customers`' provider, if given.
pub async fn start_hub(
    dir: &Path,
    fridges: u32,
    admin_token_sha256: &str,
    key: SecretKey,
    customers: Option<larder_hub::identity::CustomersConfig>,
) -> anyhow::Result<HubHandle> {
    let mut last = None;
    for _ in 0..5 {
        let port = larder_hub::mqtt::free_port()?;
        let mut config = hub_config(dir, port, fridges, admin_token_sha256.to_owned())?;
        config.customers = customers.clone();
        match larder_hub::start(config, key.clone()).await {
            Ok(h) => return Ok(h),
            Err(e @ larder_hub::StartError::Broker(_)) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no free port"), Into::into))
}
