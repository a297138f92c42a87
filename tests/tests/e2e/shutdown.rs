//! A hub's shutdown stops every region thread (the verifier and the writer), even while
//! something else still holds a region's handle and so its queues' senders.

use std::time::Duration;

use anyhow::Context;
use larder_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stops_its_region_threads_while_a_region_handle_is_held() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let held = hub
        .regions
        .values()
        .next()
        .context("the hub has a region")?
        .clone();
    assert!(!held.uplinks.is_closed() && !held.tx.is_closed());
    // A guard, not a wait: shutdown joins the region threads, so a thread that does not stop
    // would hang it.
    tokio::time::timeout(Duration::from_secs(60), hub.shutdown())
        .await
        .context("the hub's shutdown did not finish")?;
    // Each queue's receiver went with its thread.
    assert!(held.uplinks.is_closed(), "the verifier is still running");
    assert!(held.tx.is_closed(), "the writer is still running");
    Ok(())
}
