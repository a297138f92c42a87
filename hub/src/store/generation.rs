//! The region store's generation: a random id made when the store is created, and made anew
//! when it is restored from a backup or a replica. The hub names it in every acknowledgement,
//! so a device that sees it change knows the store may lack what an earlier one acknowledged,
//! and offers it again (see `docs/PROTOCOL.md`, "Store generations").

use larder_shared::envelope::{Generation, Origin};
use rusqlite::{Connection, OptionalExtension};

use super::StoreError;

/// The meta key of the store's generation.
pub const META_GENERATION: &str = "generation";
/// The meta key of where the generation began (`generation:changes_up_to`, see [`Origin`]);
/// absent for a store made new or empty.
pub const META_GENERATION_ORIGIN: &str = "generation_origin";

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
/// all in it), which began at the generation the store had and the change position it stands
/// at. Answers the new one.
pub fn renew(conn: &Connection) -> Result<Generation, StoreError> {
    // A copy of a store from before generations has none to begin at: devices give back all.
    let was = read(conn).ok().map(|(g, _)| g);
    let generation = fresh().map_err(|e| StoreError::Corrupt(e.to_owned()))?;
    // `changes` numbers rows AUTOINCREMENT: every change numbered up to the highest number it
    // gave is in the store (or in a later epoch's base), and none after.
    let up_to: i64 = conn.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)",
        [],
        |r| r.get(0),
    )?;
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [META_GENERATION, &generation.to_string()],
    )?;
    match was {
        Some(was) => conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            [META_GENERATION_ORIGIN, &format!("{was}:{up_to}")],
        )?,
        None => conn.execute("DELETE FROM meta WHERE key = ?1", [META_GENERATION_ORIGIN])?,
    };
    Ok(generation)
}

impl super::RegionStore {
    /// The store's generation, and where it began.
    pub fn generation(&self) -> Result<(Generation, Option<Origin>), StoreError> {
        read(&self.conn)
    }
}

/// The store's generation, and where it began.
pub fn read(conn: &Connection) -> Result<(Generation, Option<Origin>), StoreError> {
    let meta = |key: &str| -> Result<Option<String>, StoreError> {
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    };
    let generation = meta(META_GENERATION)?
        .as_deref()
        .and_then(Generation::parse)
        .ok_or_else(|| StoreError::Corrupt("the region store has no generation".into()))?;
    let origin = meta(META_GENERATION_ORIGIN)?.and_then(|v| {
        let (g, up_to) = v.split_once(':')?;
        Some(Origin {
            generation: Generation::parse(g)?,
            changes_up_to: up_to.parse().ok()?,
        })
    });
    Ok((generation, origin))
}

fn fresh() -> Result<Generation, &'static str> {
    Generation::random().ok_or("the OS gave no randomness for the store's generation")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new store's generation began nowhere; each renewal begins where the store stood, at
    /// the generation it had and the highest change number it gave (deleted rows included).
    #[test]
    fn a_renewed_generation_begins_at_the_one_before_and_its_change_position() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("region.db");
        let store = super::super::RegionStore::open(&path).expect("store");
        let (first, origin) = store.generation().expect("generation");
        assert_eq!(origin, None);
        drop(store);
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "INSERT INTO changes (ledger, author, hash, bytes) VALUES ('f', 'hub', x'01', x'01');
             INSERT INTO changes (ledger, author, hash, bytes) VALUES ('f', 'hub', x'02', x'02');
             DELETE FROM changes WHERE hash = x'02';",
        )
        .expect("two changes, the last one gone");
        let second = renew(&conn).expect("renew");
        assert_ne!(second, first);
        let expected = Origin {
            generation: first,
            changes_up_to: 2,
        };
        assert_eq!(read(&conn).expect("read"), (second, Some(expected)));
        let third = renew(&conn).expect("renew");
        assert_eq!(
            read(&conn)
                .expect("read")
                .1
                .map(|o| (o.generation, o.changes_up_to)),
            Some((second, 2))
        );
        assert_ne!(third, second);
    }
}
