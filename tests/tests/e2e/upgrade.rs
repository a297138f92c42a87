//! Upgrades: stores the release before versions wrote (`tests/fixtures/stores-v0/`) open in
//! this build with every record kept, and the fridge's offline sales in them sync; `migrate
//! --check` says what would run and changes nothing; a store newer than the program is
//! refused, untouched.

use std::path::Path;
use std::time::Duration;

use larder_demo::REGION;
use larder_hub::mqtt::free_port;
use larder_shared::domain::Role;
use larder_tests::fixtures::{SKU, copy_fixture, store_files, stores_v0};
use larder_tests::{
    eventually, get, hub_order_ids, hub_public_key, hub_sales, restart_agent, run_to_end,
    start_hub, synced, write_agent_config, write_hub_config,
};

const WAIT: Duration = Duration::from_secs(30);

fn user_version(db: &Path) -> anyhow::Result<u32> {
    let conn = rusqlite::Connection::open(db)?;
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

fn count(db: &Path, table: &str) -> anyhow::Result<usize> {
    let conn = rusqlite::Connection::open(db)?;
    let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
    Ok(usize::try_from(n)?)
}

/// The hub and the fridge agent of the release before versions, replaced by this build on the
/// same stores: every order, subscription, rating, archived record and audit entry is there,
/// the fridge's two offline sales reach the hub once each, and each store records its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_of_the_release_before_open_keep_every_record_and_sync() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let manifest = copy_fixture(&stores_v0(), dir.path())?;
    for file in store_files() {
        assert_eq!(
            user_version(&dir.path().join(&file))?,
            0,
            "{}",
            file.display()
        );
    }
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let hub_db = dir.path().join(&store_files()[0]);
    let orders = hub_order_ids(&hub_http).await?;
    for id in &manifest.hub_orders {
        assert!(orders.contains(id), "order {id} kept: {orders:?}");
    }
    let subs = get(&format!("{hub_http}/v1/regions/{REGION}/subscriptions")).await?;
    assert_eq!(
        subs["subscriptions"].as_array().map(Vec::len),
        Some(manifest.subscriptions)
    );
    let catalog = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    let rated = catalog["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["sku"] == SKU))
        .map(|i| i["rating"]["count"].clone());
    assert_eq!(
        rated,
        Some(serde_json::json!(manifest.ratings)),
        "{catalog}"
    );
    assert_eq!(count(&hub_db, "archive")?, manifest.hub_archive);
    assert!(count(&hub_db, "audit")? >= manifest.hub_audit);
    assert_eq!(
        user_version(&hub_db)?,
        larder_hub::store::REGION_SCHEMA.version()
    );

    // The fridge comes back on the new build with the sales it made offline.
    let fridge = restart_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;
    let at_hub = eventually(WAIT, "the offline sales at the hub", || async {
        let held = hub_sales(&hub_http).await.ok()?;
        manifest
            .offline_sales
            .iter()
            .all(|s| held.iter().any(|(o, _)| o == s))
            .then_some(held)
    })
    .await?;
    for sale in &manifest.offline_sales {
        let unit = &at_hub.iter().find(|(o, _)| o == sale).expect("held").1;
        let holding = at_hub.iter().filter(|(_, u)| u == unit).count();
        assert_eq!(holding, 1, "{sale}: its unit {unit} in one order");
    }
    assert_eq!(
        user_version(&dir.path().join("fridge-1/agent.db"))?,
        larder_agent::STORE_SCHEMA.version()
    );
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

/// `migrate --check` on the release before's stores names the migrations and changes nothing;
/// `migrate` runs them; a store newer than the program is refused by both, named with both
/// versions, and left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_check_says_what_would_run_and_a_newer_store_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = tempfile::tempdir()?;
    copy_fixture(&stores_v0(), fixture.path())?;
    let (broker_port, http_port) = (free_port()?, free_port()?);
    let hub_config = write_hub_config(&dir.path().join("hub"), broker_port, http_port, 1)?;
    let hub_db = dir
        .path()
        .join("hub/data")
        .join(format!("region-{REGION}.db"));
    std::fs::create_dir_all(hub_db.parent().expect("data dir"))?;
    std::fs::copy(fixture.path().join(&store_files()[0]), &hub_db)?;
    let (agent_config, _) = write_agent_config(
        &dir.path().join("fridge"),
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        hub_public_key(),
        &format!("127.0.0.1:{broker_port}"),
    )?;
    let agent_data = dir.path().join("fridge/data");
    std::fs::create_dir_all(&agent_data)?;
    for file in ["agent.db", "archive.db"] {
        std::fs::copy(
            fixture.path().join("fridge-1").join(file),
            agent_data.join(file),
        )?;
    }
    let agent_db = agent_data.join("agent.db");
    let cases = [
        (
            env!("CARGO_BIN_EXE_hub-node"),
            &hub_config,
            &hub_db,
            larder_hub::store::REGION_SCHEMA,
        ),
        (
            env!("CARGO_BIN_EXE_agent-node"),
            &agent_config,
            &agent_db,
            larder_agent::STORE_SCHEMA,
        ),
    ];
    for (exe, config, db, schema) in cases {
        let config = config.to_str().expect("a UTF-8 path");
        let target = schema.version();
        let (ok, said) = run_to_end(exe, &["migrate", "--config", config, "--check"]).await?;
        assert!(ok, "{said}");
        assert!(
            said.contains(&format!("at version 0, to version {target}")),
            "{said}"
        );
        assert!(
            said.contains("the schema before stores had versions"),
            "{said}"
        );
        assert_eq!(user_version(db)?, 0, "--check changes nothing");

        let (ok, said) = run_to_end(exe, &["migrate", "--config", config]).await?;
        assert!(
            ok && said.contains(&format!("{target} migration(s) ran")),
            "{said}"
        );
        assert_eq!(user_version(db)?, target);
        let (ok, said) = run_to_end(exe, &["migrate", "--config", config, "--check"]).await?;
        assert!(ok && said.contains("nothing to migrate"), "{said}");

        rusqlite::Connection::open(db)?.pragma_update(None, "user_version", target + 1)?;
        let newer = format!(
            "is at version {}, newer than this program's {target}",
            target + 1
        );
        for args in [
            &["migrate", "--config", config, "--check"][..],
            &["run", "--config", config],
        ] {
            let (ok, said) = run_to_end(exe, args).await?;
            assert!(!ok && said.contains(&newer), "{args:?}: {said}");
        }
        assert_eq!(user_version(db)?, target + 1, "left as it was");
    }
    Ok(())
}
