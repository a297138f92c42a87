//! The hub's own changes (app orders, kitchen statuses, escrow consumed or returned), kept as the downlink
//! brought them, each with the hub's signature, to give back to a hub whose store lost them (see
//! `Writer::hub_generation`).

use larder_runtime::sqlite::migrate::add_column;
use larder_shared::FridgeId;
use larder_shared::envelope::{Generation, Origin};
use rusqlite::{Transaction, params};

use super::{Store, StoreError};

/// The agent store's fourth migration: the hub's signature beside each change of the outbox (a
/// change of the hub's given back travels with it), and the hub's changes kept. Idempotent.
pub(super) fn migrate(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    add_column(tx, "ledger_changes", "hub_sig", "BLOB")?;
    add_column(tx, "sent_changes", "hub_sig", "BLOB")?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS hub_changes (
             id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, generation TEXT,
             down_seq INTEGER NOT NULL, fridge TEXT NOT NULL, epoch INTEGER NOT NULL,
             bytes BLOB NOT NULL, sig BLOB NOT NULL);",
    )
}

/// How many of the hub's changes a device keeps: at a busy fridge's fifty app orders a day (a
/// handful of the hub's changes each, with the escrow it consumes), two to three weeks, far past a
/// nightly backup's recovery point or a replica's seconds. A store made empty is given back
/// all of them at once, which the board holds in memory while it stages them (a few MB).
pub(crate) const HUB_CHANGES_KEPT: u64 = 5_000;

/// A change the hub made, as its downlink brought it.
#[derive(Debug, Clone)]
pub(crate) struct HubChange {
    /// The generation of the hub's store that sent it last, and its position in that store's
    /// downlink stream (the store's change number): numbers compare within one generation only.
    pub generation: Option<Generation>,
    pub down_seq: u64,
    pub fridge: FridgeId,
    pub epoch: u32,
    pub bytes: Vec<u8>,
    /// The hub's signature (`larder_shared::audit::sign_hub_change`).
    pub sig: Vec<u8>,
}

/// Keeps `rows`; one that came before keeps its place and takes its latest generation and
/// position (a restored hub numbers what it sends again from where its store stands).
pub(super) fn keep(tx: &Transaction<'_>, rows: &[HubChange]) -> Result<(), rusqlite::Error> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO hub_changes (hash, generation, down_seq, fridge, epoch, bytes, sig)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (hash) DO UPDATE
             SET generation = excluded.generation, down_seq = excluded.down_seq",
    )?;
    for c in rows {
        insert.execute(params![
            &larder_shared::audit::change_digest(&c.bytes)[..],
            c.generation.map(|g| g.to_string()),
            c.down_seq as i64,
            c.fridge.as_str(),
            c.epoch,
            c.bytes,
            c.sig
        ])?;
    }
    Ok(())
}

/// Forgets all but the newest [`HUB_CHANGES_KEPT`].
pub(super) fn prune(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute(
        "DELETE FROM hub_changes WHERE id <= (SELECT MAX(id) FROM hub_changes) - ?1",
        [HUB_CHANGES_KEPT as i64],
    )?;
    Ok(())
}

impl Store {
    /// The hub's changes kept that a store begun at `origin` may lack: all of them for a store
    /// made new or empty (`None`), else every one but those the origin's generation sent at or
    /// below its position. In the order they first came (each after the changes it depends on).
    pub(crate) fn hub_changes_lacked(
        &self,
        origin: Option<Origin>,
    ) -> Result<Vec<HubChange>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT generation, down_seq, fridge, epoch, bytes, sig FROM hub_changes
             WHERE ?1 IS NULL OR generation IS NOT ?1 OR down_seq > ?2 ORDER BY id",
        )?;
        let (generation, up_to) = match origin {
            Some(o) => (Some(o.generation.to_string()), o.changes_up_to),
            None => (None, 0),
        };
        let rows = stmt.query_map(
            params![generation, up_to.min(i64::MAX as u64) as i64],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (generation, down_seq, fridge, epoch, bytes, sig) = row?;
            let fridge = FridgeId::new(fridge).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(HubChange {
                generation: generation.as_deref().and_then(Generation::parse),
                down_seq: down_seq as u64,
                fridge,
                epoch,
                bytes,
                sig,
            });
        }
        Ok(out)
    }
}
