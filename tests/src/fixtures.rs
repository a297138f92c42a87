//! Stores a release wrote, kept in the repository (`tests/fixtures/stores-v0/`, written by the
//! release before stores had versions), and how they were written: `larder-fixtures --out
//! DIR`. Later releases are tested against them (`e2e upgrade::`): they must open them, keep
//! every record and sync what the devices had not sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use larder_demo::REGION;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    FridgeAndPos, compact, cut_off, health, http, post, refill, sell_unit, start_fridge_and_pos,
    start_hub, synced,
};

/// The sku the fixtures stock and sell.
pub const SKU: &str = "wrap-chicken";

const WAIT: Duration = Duration::from_secs(30);

/// What the fixture's stores hold, written beside them as `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The program that wrote them: its version and commit.
    pub written_by: String,
    /// Every order in the hub's store.
    pub hub_orders: Vec<String>,
    pub subscriptions: usize,
    pub ratings: usize,
    /// Finished records a compaction moved to the hub's archive.
    pub hub_archive: usize,
    /// Entries of the devices' audit chains at the hub.
    pub hub_audit: usize,
    /// Sales the fridge made offline: in its outbox, not at the hub.
    pub offline_sales: Vec<String>,
}

/// The store files of a fixture, as paths below its directory: the hub's region store, and
/// each agent's store and archive.
pub fn store_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from(format!("hub/region-{REGION}.db"))];
    for device in ["fridge-1", "pos-1"] {
        files.push(Path::new(device).join("agent.db"));
        files.push(Path::new(device).join("archive.db"));
    }
    files
}

/// The fixture written by the release before stores had versions.
pub fn stores_v0() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stores-v0")
}

/// Copies a fixture's stores into `to` (hub data under `to/hub`, each agent's under
/// `to/DEVICE`, as [`start_hub`] and [`crate::start_agent`] lay them out) and reads its manifest.
pub fn copy_fixture(from: &Path, to: &Path) -> Result<Manifest> {
    for file in store_files() {
        let dest = to.join(&file);
        std::fs::create_dir_all(dest.parent().context("a store's directory")?)?;
        std::fs::copy(from.join(&file), &dest)
            .with_context(|| format!("copying {}", file.display()))?;
    }
    let manifest = std::fs::read(from.join("manifest.json"))?;
    Ok(serde_json::from_slice(&manifest)?)
}

/// Writes a fixture into `out`: a hub region with sales, an app order, a subscription, a
/// rating, an archive and audit chains; a fridge agent with sales it made offline still in its
/// outbox; a POS agent. Each store is copied with `VACUUM INTO` once its program stopped.
///
/// One piece: the scene in the order it happens, then the copies and the manifest.
pub async fn write(out: &Path, written_by: &str) -> Result<Manifest> {
    let work = tempfile::tempdir()?;
    let hub = start_hub(&work.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let FridgeAndPos {
        fridge,
        pos,
        fridge_url,
        pos_url,
    } = start_fridge_and_pos(work.path(), &hub, WAIT).await?;
    refill(&fridge_url, "fridge-1", "u", SKU, 8).await?;
    for (url, unit) in [
        (&fridge_url, "u-0"),
        (&fridge_url, "u-1"),
        (&pos_url, "u-2"),
    ] {
        let (status, body) = sell_unit(&http(), url, "fridge-1", unit, SKU, unit).await?;
        ensure!(status == 201, "sale of {unit}: {status} {body}");
    }
    synced(&fridge_url, WAIT).await?;
    synced(&pos_url, WAIT).await?;
    let region = format!("{hub_http}/v1/regions/{REGION}");
    let tomorrow = jiff::Zoned::now().date().tomorrow()?.to_string();
    for (path, key, body) in [
        (
            "orders",
            "place-app-1",
            json!({"customer_id": "cust-1", "fridge_id": "fridge-1", "order_id": "app-1",
                   "lines": [{"sku": SKU, "quantity": 1}]}),
        ),
        (
            "subscriptions",
            "subscribe-1",
            json!({"customer_id": "cust-1", "fridge_id": "fridge-1",
                   "lines": [{"sku": SKU, "quantity": 1}], "weekdays": ["mon", "thu"],
                   "start_date": tomorrow}),
        ),
        (
            &format!("catalog/{SKU}/ratings"),
            "rate-1",
            json!({"stars": 5, "customer_id": "cust-1"}),
        ),
    ] {
        let (status, body) = post(&format!("{region}/{path}"), key, &body).await?;
        ensure!(status == 201, "POST {path}: {status} {body}");
    }
    synced(&fridge_url, WAIT).await?;
    synced(&pos_url, WAIT).await?;
    compact(&hub_http, 0).await?;
    synced(&fridge_url, WAIT).await?;

    cut_off(&fridge).await?;
    let mut offline_sales = Vec::new();
    for unit in ["u-5", "u-6"] {
        let (status, body) = sell_unit(&http(), &fridge_url, "fridge-1", unit, SKU, unit).await?;
        ensure!(status == 201, "offline sale of {unit}: {status} {body}");
        let order = body["order_id"].as_str().ok_or_else(|| anyhow!("{body}"))?;
        offline_sales.push(order.to_owned());
    }
    ensure!(health(&fridge_url).await?["pending_changes"] == json!(2));
    fridge.shutdown().await;
    pos.shutdown().await;
    hub.shutdown().await;

    std::fs::create_dir_all(out)?;
    for file in store_files() {
        let dest = out.join(&file);
        std::fs::create_dir_all(dest.parent().context("a store's directory")?)?;
        if dest.exists() {
            std::fs::remove_file(&dest)?;
        }
        rusqlite::Connection::open(work.path().join(&file))?
            .execute("VACUUM INTO ?1", [dest.to_string_lossy().as_ref()])
            .with_context(|| format!("copying {}", file.display()))?;
    }
    let hub_db = rusqlite::Connection::open(out.join(&store_files()[0]))?;
    let count = |table: &str| -> Result<usize> {
        let n: i64 =
            hub_db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
        Ok(usize::try_from(n)?)
    };
    let mut orders = hub_db.prepare("SELECT order_id FROM orders ORDER BY order_id")?;
    let hub_orders = orders
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    let manifest = Manifest {
        written_by: written_by.to_owned(),
        hub_orders,
        subscriptions: count("subscriptions")?,
        ratings: count("ratings")?,
        hub_archive: count("archive")?,
        hub_audit: count("audit")?,
        offline_sales,
    };
    ensure!(
        manifest.hub_archive > 0 && manifest.hub_audit > 0 && manifest.subscriptions == 1,
        "the scene left too little: {manifest:?}"
    );
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(manifest)
}
