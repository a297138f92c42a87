//! Versioned stores: a store's schema is a list of migrations, and the file says how many it has
//! had (`PRAGMA user_version`). Opening a store runs the ones it lacks, each in one transaction
//! with the version it reaches, so a crash leaves the store at one version or the next, never
//! between. A store newer than the program is refused, naming both versions: an older program
//! does not know what a newer one stored, and a silent downgrade would lose it.
//!
//! Rules for a migration: it is only ever appended (a released one never changes), it states
//! what it does in its name (the log and `migrate --check` print it), and it is idempotent (it
//! may meet a store a crash left half way in a file it does not own, such as the agent's
//! archive). The first migration of each store is the schema as it was before stores carried a
//! version, written with `IF NOT EXISTS`: on such a store (version 0) it finds every table there
//! and only sets the version.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use super::StoreError;

/// One step of a store's schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// What it does, for a person (the log and `migrate --check`).
    pub name: &'static str,
    /// The step, inside its transaction.
    pub apply: fn(&Transaction<'_>) -> Result<(), rusqlite::Error>,
}

/// A kind of store's schema: version `n` is the first `n` migrations applied.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The store's kind, as errors name it ("agent store", "region store").
    pub store: &'static str,
    pub migrations: &'static [Migration],
}

/// What opening a store would run, or ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The store's version before.
    pub found: u32,
    /// The version this program writes.
    pub target: u32,
    /// The migrations past `found`: their versions and names, in order.
    pub pending: Vec<(u32, &'static str)>,
}

impl std::fmt::Display for Plan {
    /// One line per migration to run, or that there is none.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pending.is_empty() {
            return write!(f, "at version {}: nothing to migrate", self.found);
        }
        write!(f, "at version {}, to version {}:", self.found, self.target)?;
        for (version, name) in &self.pending {
            write!(f, "\n  {version}: {name}")?;
        }
        Ok(())
    }
}

impl Schema {
    /// The version this program writes: how many migrations it knows.
    pub fn version(&self) -> u32 {
        u32::try_from(self.migrations.len()).unwrap_or(u32::MAX)
    }

    /// What [`Schema::migrate`] would run on `conn`, changing nothing; refuses a store newer
    /// than this program.
    pub fn plan(&self, conn: &Connection) -> Result<Plan, StoreError> {
        let found = stored_version(conn)?;
        let target = self.version();
        if found > target {
            return Err(StoreError::TooNew {
                store: self.store,
                found,
                supported: target,
            });
        }
        let pending = (found..target)
            .map(|v| (v + 1, self.migrations[v as usize].name))
            .collect();
        Ok(Plan {
            found,
            target,
            pending,
        })
    }

    /// Runs the migrations `conn`'s store lacks, each in its own transaction that also records
    /// the version it reaches, and logs each. Returns what it ran (`pending`: the steps it
    /// applied itself, not those another process applied meanwhile).
    pub fn migrate(&self, conn: &mut Connection) -> Result<Plan, StoreError> {
        let mut plan = self.plan(conn)?;
        let mut ran = Vec::with_capacity(plan.pending.len());
        for &(version, name) in &plan.pending {
            let started = std::time::Instant::now();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Another process may have migrated it since the plan was made.
            let now = stored_version(&tx)?;
            if now >= version {
                continue;
            }
            (self.migrations[version as usize - 1].apply)(&tx).map_err(|e| {
                StoreError::Migration {
                    store: self.store,
                    version,
                    name,
                    error: e,
                }
            })?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(
                store = self.store,
                version,
                migration = name,
                ms = started.elapsed().as_millis() as u64,
                "store migrated"
            );
            ran.push((version, name));
        }
        plan.pending = ran;
        Ok(plan)
    }
}

/// What opening the store at `path` would run, read without changing anything: `None` when
/// there is no store there yet.
pub fn check(schema: &Schema, path: &Path) -> Result<Option<Plan>, StoreError> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    schema.plan(&conn).map(Some)
}

/// `migrate` on a command line, for the store at `path`: with `check`, prints what opening it
/// would run; else runs it through `open` (the store's own opening, which migrates) and prints
/// what ran. A missing store is left alone (the program creates it at start). Returns whether
/// it went well; an error is printed on stderr.
pub fn command(
    schema: &Schema,
    path: &Path,
    check: bool,
    open: impl FnOnce(&Path) -> Result<Plan, StoreError>,
) -> bool {
    let result = match self::check(schema, path) {
        Ok(Some(plan)) if !check && !plan.pending.is_empty() => open(path).map(|ran| {
            let pending = ran.pending.len();
            format!("{ran}\n  done: {pending} migration(s) ran")
        }),
        Ok(Some(plan)) => Ok(plan.to_string()),
        Ok(None) => Ok(format!(
            "no store yet: one is created at version {} when the program starts",
            schema.version()
        )),
        Err(e) => Err(e),
    };
    match result {
        Ok(said) => {
            println!("{} ({}): {said}", path.display(), schema.store);
            true
        }
        Err(e) => {
            eprintln!("{} ({}): {e}", path.display(), schema.store);
            false
        }
    }
}

/// Adds a column to a table unless it has one of that name: `ALTER TABLE ... ADD COLUMN` made
/// idempotent, for a migration (`definition` is the column's type and constraints).
pub fn add_column(
    tx: &Transaction<'_>,
    table: &str,
    column: &str,
    definition: &str,
) -> Result<(), rusqlite::Error> {
    let has: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        [table, column],
        |r| r.get(0),
    )?;
    if !has {
        tx.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {definition};"
        ))?;
    }
    Ok(())
}

/// The version a store's file records (0 for a new file or one from before versions).
pub fn stored_version(conn: &Connection) -> Result<u32, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: Schema = Schema {
        store: "test store",
        migrations: &[
            Migration {
                name: "create the table",
                apply: |tx| tx.execute_batch("CREATE TABLE IF NOT EXISTS t (a INTEGER);"),
            },
            Migration {
                name: "add a column",
                apply: |tx| add_column(tx, "t", "b", "TEXT NOT NULL DEFAULT 'x'"),
            },
        ],
    };

    /// A new store gets every migration; opening it again runs none; a store from before
    /// versions (the tables, version 0) keeps its rows and gets the rest.
    #[test]
    fn a_store_gets_the_migrations_it_lacks_once() {
        let mut new = Connection::open_in_memory().expect("open");
        let ran = SCHEMA.migrate(&mut new).expect("migrate");
        assert_eq!((ran.found, ran.pending.len()), (0, 2));
        assert_eq!(stored_version(&new).expect("version"), 2);
        let again = SCHEMA.migrate(&mut new).expect("again");
        assert!(again.pending.is_empty(), "{again}");

        let mut old = Connection::open_in_memory().expect("open");
        old.execute_batch("CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (7);")
            .expect("old");
        SCHEMA.migrate(&mut old).expect("migrate");
        let row: (i64, String) = old
            .query_row("SELECT a, b FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("kept");
        assert_eq!(row, (7, "x".to_owned()));
    }

    /// A migration that fails leaves the store at the version before it, with nothing of it.
    #[test]
    fn a_failed_migration_changes_nothing_of_its_step() {
        const BROKEN: Schema = Schema {
            store: "test store",
            migrations: &[
                SCHEMA.migrations[0],
                Migration {
                    name: "half done",
                    apply: |tx| {
                        tx.execute_batch("CREATE TABLE u (a INTEGER);")?;
                        tx.execute_batch("NOT SQL")
                    },
                },
            ],
        };
        let mut conn = Connection::open_in_memory().expect("open");
        let err = BROKEN.migrate(&mut conn).expect_err("fails");
        assert!(err.to_string().contains("half done"), "{err}");
        assert_eq!(stored_version(&conn).expect("version"), 1);
        let u: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'u')",
                [],
                |r| r.get(0),
            )
            .expect("read");
        assert!(!u, "the failed step's table is not there");
    }

    /// A store newer than the program is refused by name and both versions, and not touched.
    #[test]
    fn a_newer_store_is_refused() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", 3).expect("newer");
        let err = SCHEMA.migrate(&mut conn).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "the test store is at version 3, newer than this program's 2: run the release \
             that wrote it (or a newer one); this one would not know what it stored"
        );
        assert_eq!(stored_version(&conn).expect("version"), 3);
    }
}
