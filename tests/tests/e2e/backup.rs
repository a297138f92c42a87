//! `larder-hub backup`, `backup verify` and `restore` (the real binary): a backup taken while a
//! POS sells holds every sale the hub had before it began, verifies, and restores into a new
//! hub that serves them; `verify` names a damaged file; `restore` refuses to overwrite a store
//! without `--replace`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use larder_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// Runs the hub's command line to its end: its exit status and what it printed.
async fn hub_cli(args: &[&str]) -> anyhow::Result<(bool, String)> {
    run_to_end(env!("CARGO_BIN_EXE_hub-node"), args).await
}

/// One piece: the scenario in the order it happens (sell, back up, verify, restore, damage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_selling_restores_every_sale_the_hub_had() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (broker_port, http_port) = (
        larder_hub::mqtt::free_port()?,
        larder_hub::mqtt::free_port()?,
    );
    let hub_toml = write_hub_config(&dir.path().join("hub"), broker_port, http_port, 1)?;
    let config = hub_toml.to_string_lossy().to_string();
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let mut hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;
    let pos = start_pos(&dir.path().join("pos"), &hub.url, broker_port).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, WAIT).await?;

    // The POS sells until the backup has ended; the backup starts once the hub holds some of
    // its sales.
    let stop = Arc::new(AtomicBool::new(false));
    let selling = tokio::spawn({
        let (url, stop) = (url.clone(), stop.clone());
        async move {
            let client = http();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let unit = format!("u{i}");
                let (status, body) =
                    sell_unit(&client, &url, "fridge-1", &unit, "lasagna", &unit).await?;
                anyhow::ensure!(status == 201, "{unit}: {status} {body}");
                i += 1;
            }
            anyhow::Ok(i)
        }
    });
    let before = eventually(WAIT, "30 sales at the hub", || async {
        let ids = hub_order_ids(&hub.url).await.ok()?;
        (ids.len() >= 30).then_some(ids)
    })
    .await?;
    let backup = dir.path().join("backup");
    let backup_dir = backup.to_string_lossy().to_string();
    let (ok, said) = hub_cli(&["backup", "--config", &config, "--out", &backup_dir]).await?;
    assert!(ok, "{said}");
    stop.store(true, Ordering::SeqCst);
    // Every sale meanwhile answered 201.
    selling.await??;
    let (ok, said) = hub_cli(&["backup", "verify", "--dir", &backup_dir]).await?;
    assert!(ok && said.contains("intact"), "{said}");
    pos.shutdown().await;
    hub.kill();

    // A new hub on the same key (its key file removed: the backup's is restored).
    let (broker_port, http_port) = (
        larder_hub::mqtt::free_port()?,
        larder_hub::mqtt::free_port()?,
    );
    let new_toml = write_hub_config(&dir.path().join("new"), broker_port, http_port, 1)?;
    std::fs::remove_file(dir.path().join("new/hub.key"))?;
    let new_config = new_toml.to_string_lossy().to_string();
    let (ok, said) = hub_cli(&["restore", "--config", &new_config, "--from", &backup_dir]).await?;
    assert!(ok && said.contains("region demo: restored"), "{said}");
    assert!(said.contains("hub key restored"), "{said}");
    let (ok, said) = hub_cli(&["restore", "--config", &new_config, "--from", &backup_dir]).await?;
    assert!(
        !ok && said.contains("--replace"),
        "a second restore: {said}"
    );
    let new_hub = Process::spawn(hub_exe, &["run", "--config", &new_config], "hub ")?;
    let after = hub_order_ids(&new_hub.url).await?;
    for id in &before {
        assert!(after.contains(id), "{id} restored");
    }
    drop(new_hub);
    let replace = [
        "restore",
        "--config",
        &new_config,
        "--from",
        &backup_dir,
        "--replace",
    ];
    let (ok, said) = hub_cli(&replace).await?;
    assert!(ok && said.contains("region demo: restored"), "{said}");
    assert!(
        dir.path()
            .join("new/data/region-demo.db.pre-restore")
            .exists(),
        "the replaced store kept beside it"
    );

    // A damaged copy is named by verify, and not restored.
    let copy = backup.join("region-demo.db");
    let mut bytes = std::fs::read(&copy)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&copy, bytes)?;
    let (ok, said) = hub_cli(&["backup", "verify", "--dir", &backup_dir]).await?;
    assert!(
        !ok && said.contains("region-demo.db: its content is not what the manifest records"),
        "{said}"
    );
    let (ok, said) = hub_cli(&replace).await?;
    assert!(
        !ok && said.contains("not what the manifest records"),
        "{said}"
    );
    Ok(())
}

/// A backup goes into a new directory: one that holds anything is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_refuses_a_directory_in_use() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub_toml = write_hub_config(&dir.path().join("hub"), 1, 1, 1)?;
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("something"), "kept")?;
    let (ok, said) = hub_cli(&[
        "backup",
        "--config",
        &hub_toml.to_string_lossy(),
        "--out",
        &out.to_string_lossy(),
    ])
    .await?;
    assert!(!ok && said.contains("is not empty"), "{said}");
    assert_eq!(std::fs::read_to_string(out.join("something"))?, "kept");
    Ok(())
}
