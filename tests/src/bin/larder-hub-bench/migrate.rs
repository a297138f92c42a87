//! `migrate`: the region store's migrations from version 0 (a store of the release before
//! versions), on the checked-in fixture region and on the same store grown with an archive of
//! millions of records, each migrated three times on a fresh copy, beside the floor of opening
//! the store once it is migrated: how the migrations' time grows with the store.

use std::path::Path;

use super::*;

/// Archived records the grown store gets (about a gigabyte with their indexes).
const ARCHIVE_ROWS: u64 = 4_000_000;
const RUNS: usize = 3;

/// Grows the store at `path` with [`ARCHIVE_ROWS`] archived orders of 1,000 fridges.
fn grow(path: &Path) -> Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ARCHIVE_ROWS})
         INSERT INTO archive (fridge, epoch, kind, record_id, record, archived_at_ms)
         SELECT 'fridge-' || (i % 1000 + 1), i / 4000000, 'order', 'o-' || i,
                '{{\"order_id\":\"o-' || i || '\",\"status\":\"completed\",\"lines\":[{{\"sku\":\"lasagna\",\"quantity\":1,\"unit_price_minor\":890}}],\"total_minor\":890,\"channel\":\"pos\"}}',
                1700000000000 + i * 7
         FROM n;
         COMMIT;"
    ))?;
    Ok(())
}

/// One piece: the benchmark's run, setup to figures, as BENCHMARKS.md describes it.
pub(crate) async fn migrate() -> Result<()> {
    println!("## the region store's migrations from version 0, {RUNS} runs each on a fresh copy\n");
    let dir = tempfile::tempdir()?;
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stores-v0/hub/region-demo.db");
    let grown = dir.path().join("grown.db");
    std::fs::copy(&fixture, &grown)?;
    let started = Instant::now();
    grow(&grown)?;
    eprintln!("grown in {:.1} s", started.elapsed().as_secs_f64());
    for (name, source) in [("the fixture region", &fixture), ("grown", &grown)] {
        let mib = std::fs::metadata(source)?.len() as f64 / (1024.0 * 1024.0);
        for run in 1..=RUNS {
            let copy = dir.path().join("copy.db");
            for ext in ["db", "db-wal", "db-shm"] {
                let _ = std::fs::remove_file(copy.with_extension(ext));
            }
            std::fs::copy(source, &copy)?;
            // On disk before the clock starts: the migration's commit syncs, and on ext4 that
            // would write the whole fresh copy out with it.
            std::fs::File::open(&copy)?.sync_all()?;
            let started = Instant::now();
            let (conn, plan) = larder_hub::store::RegionStore::open_migrated(&copy)?;
            let migrated = started.elapsed();
            drop(conn);
            let started = Instant::now();
            let store = larder_hub::store::RegionStore::open(&copy)?;
            let floor = started.elapsed();
            drop(store);
            println!(
                "{name} ({mib:.1} MiB) run {run}: version {} to {} in {:.1} ms; opening it \
                 migrated {:.1} ms; migrations {:.1} ms",
                plan.found,
                plan.target,
                ms(migrated),
                ms(floor),
                ms(migrated.saturating_sub(floor))
            );
        }
    }
    Ok(())
}
