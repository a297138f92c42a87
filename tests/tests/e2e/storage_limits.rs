//! The agent's limits on what it keeps: the disk reserve (on a small tmpfs made by the test,
//! which needs root, as CI runs it) and the outbox cap. At either limit, writes get 507 with a
//! clear code, reads keep working, nothing stored is damaged, and writes resume by themselves.
//! A hub acknowledgement whose commit failed is recorded with the next write group.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use larder_shared::domain::Role;
use larder_tests::*;

const SKU: &str = "wrap-chicken";
const TMPFS_BYTES: u64 = 16 * 1024 * 1024;
const RESERVE_BYTES: u64 = 4 * 1024 * 1024;

/// A tmpfs of `TMPFS_BYTES`, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_BYTES}"), "tmpfs"])
            .arg(at)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "this test mounts a small tmpfs and needs root (CI runs it as root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Self(at.to_path_buf()))
    }

    fn free_bytes(&self) -> anyhow::Result<u64> {
        let s = rustix::fs::statvfs(&self.0)?;
        Ok(s.f_bavail * s.f_frsize)
    }

    /// Grows (or shrinks) a filler file so that `free` bytes stay free, to within a page.
    fn leave_free(&self, free: u64) -> anyhow::Result<()> {
        let filler = self.0.join("filler");
        let current = std::fs::metadata(&filler).map_or(0, |m| m.len());
        let target = (current + self.free_bytes()?).saturating_sub(free);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&filler)?;
        file.set_len(0)?;
        // tmpfs allocates on write, not on set_len: write the bytes.
        use std::io::Write;
        let mut w = std::io::BufWriter::new(file);
        let chunk = vec![0u8; 64 * 1024];
        let mut left = target;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            match w.write_all(&chunk[..n]) {
                Ok(()) => left -= n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC: the disk is full
                Err(e) => return Err(e.into()),
            }
        }
        match w.flush() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(28) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn remove_filler(&self) -> anyhow::Result<()> {
        std::fs::remove_file(self.0.join("filler"))?;
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn start_on(
    data_dir: &Path,
    hub: &larder_hub::HubHandle,
    reserve: u64,
) -> anyhow::Result<larder_agent::AgentHandle> {
    let mut config = larder_demo::agent_config(
        data_dir,
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    config.store.disk_reserve_bytes = reserve;
    Ok(larder_agent::start(config, larder_demo::seeded_key(7, "fridge-1")).await?)
}

fn orders_in(db: &Path) -> anyhow::Result<i64> {
    let conn = rusqlite::Connection::open(db)?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(check == "ok", "integrity_check: {check}");
    Ok(conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_reserve_writes_are_refused_and_resume_when_space_returns()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = larder_demo::seeded_key(7, "fridge-1");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let disk = SmallDisk::mount(&dir.path().join("small"))?;
    let data = disk.0.join("data");
    let agent = start_on(&data, &hub, RESERVE_BYTES).await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, Duration::from_secs(20)).await?;
    refill(&url, "fridge-1", "unit", SKU, 400).await?;
    let client = http();
    let (status, first) = sell_unit(&client, &url, "fridge-1", "unit-0", SKU, "s0").await?;
    assert_eq!(status, 201, "{first}");

    // Below the reserve: the write is refused with the contract's error shape, reads work, and
    // a retry of a request already done still gets its first answer.
    disk.leave_free(RESERVE_BYTES / 2)?;
    let (status, body) = sell_unit(&client, &url, "fridge-1", "unit-1", SKU, "s1").await?;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("reserve")),
        "{body}"
    );
    let low = health(&url).await?;
    assert_eq!(low["storage_low"], true, "{low}");
    assert_eq!(available(&agent_stock(&url, "fridge-1").await?, SKU), 399);
    let (status, again) = sell_unit(&client, &url, "fridge-1", "unit-0", SKU, "s0").await?;
    assert_eq!(
        (status, &again),
        (201, &first),
        "an idempotent retry is answered"
    );
    let metrics = metrics_text(&url).await?;
    assert!(
        metrics.contains("larder_agent_writes_refused_total{reason=\"insufficient_storage\"}"),
        "{metrics}"
    );

    // Space returns: writes resume without a restart.
    disk.remove_filler()?;
    let (status, body) = sell_unit(&client, &url, "fridge-1", "unit-1", SKU, "s1").await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(health(&url).await?["storage_low"], false);
    agent.shutdown().await;

    // With no reserve, the disk really fills up: SQLite's own disk-full error refuses the
    // write, every sale answered 201 is there, and the database is intact.
    let agent = start_on(&data, &hub, 0).await?;
    let url = format!("http://{}", agent.http_addr);
    disk.leave_free(0)?;
    let mut sold = 2;
    let mut refused = None;
    for i in 2..400 {
        let (status, body) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &format!("unit-{i}"),
            SKU,
            &format!("s{i}"),
        )
        .await?;
        match status {
            201 => sold += 1,
            507 => {
                refused = Some(body);
                break;
            }
            other => bail!("sale {i}: {other} {body}"),
        }
    }
    let refused = refused.context("a full disk refused a sale")?;
    assert_eq!(
        refused["error"]["code"], "insufficient_storage",
        "{refused}"
    );
    assert_eq!(
        available(&agent_stock(&url, "fridge-1").await?, SKU),
        400 - sold
    );
    agent.shutdown().await;
    disk.remove_filler()?;
    assert_eq!(orders_in(&data.join("agent.db"))?, sold as i64);

    let agent = start_on(&data, &hub, RESERVE_BYTES).await?;
    let url = format!("http://{}", agent.http_addr);
    let (status, body) = sell_unit(&client, &url, "fridge-1", "unit-399", SKU, "s399").await?;
    assert_eq!(status, 201, "{body}");
    synced(&url, Duration::from_secs(30)).await?;
    assert_eq!(hub_order_ids(&hub_url).await?.len(), sold as usize + 1);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_outbox_cap_writes_wait_for_the_hub() -> anyhow::Result<()> {
    const CAP: u64 = 1_000;
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = larder_demo::seeded_key(7, "pos-1");
    enroll(&hub_url, "pos-1", Role::Pos, &["fridge-1"], &key.public()).await?;
    let mut config = larder_demo::agent_config(
        &dir.path().join("pos"),
        "pos-1",
        Role::Pos,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;
    config.store.outbox_max_changes = CAP;
    let pos = larder_agent::start(config, key).await?;
    let url = format!("http://{}", pos.http_addr);
    synced(&url, Duration::from_secs(20)).await?;
    assert_eq!(health(&url).await?["outbox_limit"], CAP);
    cut_off(&pos).await?;

    // A POS may sell units it has not seen refilled; each sale is one change.
    let client = http();
    for i in 0..CAP {
        let (status, body) = sell_unit(
            &client,
            &url,
            "fridge-1",
            &format!("u{i}"),
            SKU,
            &format!("k{i}"),
        )
        .await?;
        assert_eq!(status, 201, "sale {i}: {body}");
    }
    let h = health(&url).await?;
    assert_eq!(
        (h["pending_changes"].as_u64(), h["outbox_full"].as_bool()),
        (Some(CAP), Some(true))
    );
    let (status, body) = sell_unit(&client, &url, "fridge-1", "u-over", SKU, "k-over").await?;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "outbox_full");
    assert_eq!(
        health(&url).await?["pending_changes"],
        CAP,
        "nothing was dropped"
    );
    let metrics = metrics_text(&url).await?;
    assert!(
        metrics.contains("larder_agent_outbox_limit 1000"),
        "{metrics}"
    );

    // The hub acknowledges the outbox: writes resume, and every sale reached it once.
    pos.set_network(true);
    synced(&url, Duration::from_secs(60)).await?;
    let (status, body) = sell_unit(&client, &url, "fridge-1", "u-over", SKU, "k-over").await?;
    assert_eq!(status, 201, "{body}");
    synced(&url, Duration::from_secs(30)).await?;
    // Every sale reached the hub's order list, each once. (Waited for rather than read once:
    // one full-suite run saw the list short right after the agent reported itself synced;
    // the missing ids are printed if it never fills.)
    let filled = eventually(Duration::from_secs(30), "every sale at the hub", || async {
        let ids = hub_order_ids(&hub_url).await.ok()?;
        (ids.len() > CAP as usize).then_some(ids)
    })
    .await;
    let ids = match filled {
        Ok(ids) => ids,
        Err(e) => {
            let ids = hub_order_ids(&hub_url).await?;
            panic!("{e}: {} of {} orders at the hub", ids.len(), CAP + 1);
        }
    };
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(
        (ids.len(), distinct.len()),
        (CAP as usize + 1, CAP as usize + 1),
        "each sale once"
    );
    pos.shutdown().await;
    Ok(())
}

/// The hub's acknowledgement whose commit failed (the store refused to record it, as a failing
/// disk would) is recorded with the agent's next write group, without a new acknowledgement:
/// otherwise a full outbox would refuse every write while nothing new went out to earn one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_whose_commit_failed_is_recorded_with_the_next_group()
-> anyhow::Result<()> {
    const WAIT: Duration = Duration::from_secs(20);
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let url = format!("http://{}", fridge.http_addr);
    synced(&url, WAIT).await?;
    refill(&url, "fridge-1", "a", SKU, 1).await?;
    synced(&url, WAIT).await?;
    let store = rusqlite::Connection::open(dir.path().join("fridge-1").join("agent.db"))?;
    store.execute_batch(
        "CREATE TRIGGER no_room BEFORE INSERT ON meta WHEN NEW.key = 'up_acked'
         BEGIN SELECT RAISE(ABORT, 'no room'); END;",
    )?;
    let (status, body) = sell_unit(&http(), &url, "fridge-1", "a-0", SKU, "sale-1").await?;
    ensure!(status == 201, "sale: {status} {body}");
    eventually(WAIT, "the ack's commit to fail", || async {
        let m = metrics_text(&url).await.ok()?;
        m.contains("larder_agent_commit_failures_total 1")
            .then_some(())
    })
    .await?;
    assert_eq!(
        health(&url).await?["pending_changes"],
        1,
        "the ack is not recorded"
    );
    store.execute_batch("DROP TRIGGER no_room")?;

    // A write that changes nothing (the unit is sold) still makes a group, which records it.
    let (status, body) = sell_unit(&http(), &url, "fridge-1", "a-0", SKU, "sale-2").await?;
    ensure!(status == 409, "the unit is sold: {status} {body}");
    assert_eq!(
        health(&url).await?["pending_changes"],
        0,
        "recorded by the next group"
    );
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
