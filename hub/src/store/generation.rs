//! The region store's generation: a random id made when the store is created, and made anew
//! when it is restored from a backup or a replica. The hub names it in every acknowledgement,
//! so a device that sees it change knows the store may lack what an earlier one acknowledged,
//! and offers it again (see `docs/PROTOCOL.md`, "Store generations").

use larder_shared::envelope::Generation;
use rusqlite::{Connection, OptionalExtension};

use super::StoreError;

/// The meta key of the store's generation.
pub const META_GENERATION: &str = "generation";

/// Gives the store a generation if it has none (a new store, or one from before generations):
/// the region store's migration, idempotent.
pub(super) fn ensure(conn: &Connection) -> Result<(), rusqlite::Error> {
    let generation = fresh().map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
        [META_GENERATION, &generation.to_string()],
    )?;
    Ok(())
}

/// Gives the store a new generation (a restored store: what devices were told before is not
/// all in it). Answers the new one.
pub fn renew(conn: &Connection) -> Result<Generation, StoreError> {
    let generation = fresh().map_err(|e| StoreError::Corrupt(e.to_owned()))?;
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [META_GENERATION, &generation.to_string()],
    )?;
    Ok(generation)
}

impl super::RegionStore {
    /// The store's generation.
    pub fn generation(&self) -> Result<Generation, StoreError> {
        read(&self.conn)
    }
}

/// The store's generation.
pub fn read(conn: &Connection) -> Result<Generation, StoreError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [META_GENERATION],
            |r| r.get(0),
        )
        .optional()?;
    text.as_deref()
        .and_then(Generation::parse)
        .ok_or_else(|| StoreError::Corrupt("the region store has no generation".into()))
}

fn fresh() -> Result<Generation, &'static str> {
    Generation::random().ok_or("the OS gave no randomness for the store's generation")
}
