//! `larder-hub audit verify` (the real binary) on a region whose POS made 20 sales: an intact
//! log passes; an altered entry, altered change bytes and a deleted entry are each named with
//! their sequence number, and the command exits non-zero.

use std::process::Command;
use std::time::Duration;

use larder_tests::*;

fn verify(exe: &str, config: &str) -> anyhow::Result<(bool, String)> {
    let out = Command::new(exe)
        .args(["audit", "verify", "--config", config, "--region", "demo"])
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_every_gap_and_tampered_entry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker_port = larder_hub::mqtt::free_port()?;
    let http_port = larder_hub::mqtt::free_port()?;
    let hub_toml = write_hub_config(&dir.path().join("hub"), broker_port, http_port, 1)?;
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let config = hub_toml.to_string_lossy().to_string();
    let mut hub = Process::spawn(hub_exe, &["run", "--config", &config], "hub ")?;
    let pos = start_pos(&dir.path().join("pos"), &hub.url, broker_port).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, Duration::from_secs(20)).await?;
    let client = http();
    for i in 0..20 {
        let (status, body) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &format!("u{i}"),
            "lasagna",
            &format!("k{i}"),
        )
        .await?;
        assert_eq!(status, 201, "{body}");
    }
    synced(&url, Duration::from_secs(20)).await?;
    pos.shutdown().await;
    hub.kill();

    let (ok, out) = verify(hub_exe, &config)?;
    assert!(ok, "{out}");
    assert!(out.contains("pos-1: 20 entries"), "{out}");
    assert!(out.contains("chain intact"), "{out}");

    let db =
        rusqlite::Connection::open(dir.path().join("hub").join("data").join("region-demo.db"))?;
    // An entry's recorded content altered.
    let digest: Vec<u8> = db.query_row(
        "SELECT change_sha256 FROM audit WHERE device = 'pos-1' AND seq = 5",
        [],
        |r| r.get(0),
    )?;
    db.execute(
        "UPDATE audit SET change_sha256 = zeroblob(32) WHERE device = 'pos-1' AND seq = 5",
        [],
    )?;
    let (ok, out) = verify(hub_exe, &config)?;
    assert!(!ok, "{out}");
    assert!(out.contains("pos-1: entry 5 tampered"), "{out}");
    db.execute(
        "UPDATE audit SET change_sha256 = ?1 WHERE device = 'pos-1' AND seq = 5",
        [&digest],
    )?;
    assert!(verify(hub_exe, &config)?.0, "restored");

    // The change bytes the hub stored, altered.
    db.execute(
        "UPDATE changes SET bytes = x'00' WHERE hash = (SELECT change_sha256 FROM audit
         WHERE device = 'pos-1' AND seq = 3)",
        [],
    )?;
    let (ok, out) = verify(hub_exe, &config)?;
    assert!(!ok, "{out}");
    assert!(
        out.contains("entry 3 tampered: the stored change bytes"),
        "{out}"
    );

    // An entry removed from the middle of the chain.
    db.execute("DELETE FROM audit WHERE device = 'pos-1' AND seq = 9", [])?;
    let (ok, out) = verify(hub_exe, &config)?;
    assert!(!ok, "{out}");
    assert!(out.contains("pos-1: gap before entry 10"), "{out}");
    Ok(())
}
