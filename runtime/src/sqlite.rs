//! SQLite as the agent and the hub use it: connections in WAL mode with `synchronous=FULL` (a
//! commit is on disk before it is acknowledged), a few read-only connections beside the one
//! writer, and a checkpointer thread that keeps checkpoints out of the writer's commits.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::Connection;

pub mod migrate;

/// Store errors: the disk or the database file said no.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A store a newer release wrote: this program would not know what it stored.
    #[error(
        "the {store} is at version {found}, newer than this program's {supported}: run the \
         release that wrote it (or a newer one); this one would not know what it stored"
    )]
    TooNew {
        store: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("migrating the {store} to version {version} ({name}) failed: {error}")]
    Migration {
        store: &'static str,
        version: u32,
        name: &'static str,
        error: rusqlite::Error,
    },
}

/// How often the checkpointer moves the WAL into the database file.
pub const CHECKPOINT_INTERVAL_MS: u64 = 500;

/// Opens a connection in WAL mode with `synchronous=FULL` (the agent's and the hub's stores).
pub fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Copies the database at `from` into a new file `to` (`VACUUM INTO`): one read transaction, so
/// the copy is the database as one commit left it, taken while its writer goes on (a WAL
/// reader blocks no writer). The copy is synced to disk before this returns.
pub fn copy_into(from: &Path, to: &Path) -> Result<(), StoreError> {
    let conn = open_connection(from)?;
    conn.execute("VACUUM INTO ?1", [to.to_string_lossy().as_ref()])?;
    drop(conn);
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Corrupt(format!("syncing {}: {e}", to.display())))?;
    Ok(())
}

/// SQLite's own check of a database file (`PRAGMA integrity_check`), read-only: the problems
/// it names, none if the file is sound.
pub fn integrity_problems(path: &Path) -> Result<Vec<String>, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut problems = Vec::new();
    for row in rows {
        let row = row?;
        if row != "ok" {
            problems.push(row);
        }
    }
    Ok(problems)
}

/// A few read-only WAL connections, the first idle one used (the agent's and the hub's read
/// side).
#[derive(Debug)]
pub struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Readers {
    /// `size` read-only connections; each with a page cache of `cache_kib` KiB if given
    /// (SQLite's default is 2 MiB per connection).
    pub fn open(path: &Path, size: usize, cache_kib: Option<u32>) -> Result<Self, StoreError> {
        Self::open_with(path, size, cache_kib, |_| Ok(()))
    }

    /// As [`Readers::open`], with `setup` run on each connection once it is open (to attach
    /// another database file, say).
    pub fn open_with(
        path: &Path,
        size: usize,
        cache_kib: Option<u32>,
        setup: impl Fn(&Connection) -> Result<(), rusqlite::Error>,
    ) -> Result<Self, StoreError> {
        let mut conns = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            let conn = open_connection(path)?;
            conn.pragma_update(None, "query_only", "ON")?;
            if let Some(kib) = cache_kib {
                conn.pragma_update(None, "cache_size", -i64::from(kib))?;
            }
            setup(&conn)?;
            conns.push(Mutex::new(conn));
        }
        Ok(Self {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Runs `f` on the first idle connection, or waits for the next one in turn when all are
    /// busy. Preferring the first keeps one page cache warm when reads come one at a time,
    /// instead of the same pages cached by every connection.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        // A connection poisoned by a panic is passed over here, as a busy one is.
        for conn in &self.conns {
            if let Ok(conn) = conn.try_lock() {
                return Ok(f(&conn)?);
            }
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
        let conn = self.conns[i]
            .lock()
            .map_err(|_| StoreError::Corrupt("read connection poisoned".into()))?;
        Ok(f(&conn)?)
    }
}

/// A connection for [`run_checkpointer`]: checkpoints copy pages through and need no cache to
/// speak of.
pub fn checkpoint_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_connection(path)?;
    conn.pragma_update(None, "cache_size", -256)?;
    Ok(conn)
}

/// Runs a passive WAL checkpoint on `conn` every [`CHECKPOINT_INTERVAL_MS`], on a thread named
/// `name`, and a last one when the sender of `stop` is dropped (the agent's store and each of the
/// hub's region stores, whose writers set `wal_autocheckpoint` to 0).
pub fn run_checkpointer(
    conn: Connection,
    name: String,
    stop: std::sync::mpsc::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let interval = std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval)
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                }
            }
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot start the checkpointer: {e}")))
}
