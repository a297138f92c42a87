//! The region store's generation: a random id made when the store is created, and made anew
//! when it is restored from a backup or a replica. The hub names it in every acknowledgement,
//! so a device that sees it change knows the store may lack what an earlier one acknowledged,
//! and offers it again (see `docs/PROTOCOL.md`, "Store generations").

use larder_shared::envelope::Generation;
use rusqlite::{Connection, OptionalExtension};

use super::StoreError;

/// The meta key of the store's generation.
pub const META_GENERATION: &str = "generation";
/// The meta key of the change position the store stood at when its generation was made (absent
/// in a store whose generation an earlier release made: read as 0, so devices give back every
/// change of the hub's they keep).
pub const META_GENERATION_FROM: &str = "generation_from";

/// Gives the store a generation if it has none (a new store, or one from before generations):
/// the region store's migration, idempotent.
pub(super) fn ensure(conn: &Connection) -> Result<(), rusqlite::Error> {
    let generation = fresh().map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
    let made = conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
        [META_GENERATION, &generation.to_string()],
    )?;
    if made == 1 {
        set_from(conn)?;
    }
    Ok(())
}

/// Gives the store a new generation (a restored store: what devices were told before is not
/// all in it), made at the change position it stands at. Answers the new one.
pub fn renew(conn: &Connection) -> Result<Generation, StoreError> {
    let generation = fresh().map_err(|e| StoreError::Corrupt(e.to_owned()))?;
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [META_GENERATION, &generation.to_string()],
    )?;
    set_from(conn)?;
    Ok(generation)
}

/// Records the highest change number the store ever gave (`changes` numbers rows
/// AUTOINCREMENT: every change numbered up to it is in the store, or in a later epoch's base).
fn set_from(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value)
         SELECT ?1, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)",
        [META_GENERATION_FROM],
    )?;
    Ok(())
}

impl super::RegionStore {
    /// The store's generation, and the change position it was made at.
    pub fn generation(&self) -> Result<(Generation, u64), StoreError> {
        read(&self.conn)
    }
}

/// The store's generation, and the change position it was made at.
pub fn read(conn: &Connection) -> Result<(Generation, u64), StoreError> {
    let meta = |key: &str| -> Result<Option<String>, StoreError> {
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    };
    let generation = meta(META_GENERATION)?
        .as_deref()
        .and_then(Generation::parse)
        .ok_or_else(|| StoreError::Corrupt("the region store has no generation".into()))?;
    let from = meta(META_GENERATION_FROM)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((generation, from))
}

fn fresh() -> Result<Generation, &'static str> {
    Generation::random().ok_or("the OS gave no randomness for the store's generation")
}
