//! The agent's SQLite store: ledger changes and snapshots (the write model), the outbox, the
//! stream positions, idempotency records and the stock and order projections (the read model).
//!
//! One [`Store`] (the writer's) writes; [`ReadPool`] connections read in WAL mode. Every write
//! goes through [`Store::commit_batch`], one transaction and one fsync (`synchronous=FULL`).

use std::path::Path;
use std::sync::Mutex;

use larder_shared::catalog::Catalog;
use larder_shared::domain::{OrderView, UnitView};
use larder_shared::envelope::Entry;
use larder_shared::{FridgeId, OrderId};
use rusqlite::{Connection, OptionalExtension, params};

pub mod projection;

pub use projection::SkuStock;

/// Store errors: the disk or the database file said no.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_snapshots (fridge TEXT PRIMARY KEY, bytes BLOB NOT NULL);
-- Every change applied to a ledger since its snapshot. Local changes carry their outbox
-- sequence number: the outbox is the rows with outbox_seq above the hub's acknowledgement.
CREATE TABLE IF NOT EXISTS ledger_changes (
    id INTEGER PRIMARY KEY, fridge TEXT NOT NULL, outbox_seq INTEGER UNIQUE, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, request_sha256 TEXT NOT NULL, outcome TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL) WITHOUT ROWID;
";

/// Meta keys.
pub(crate) const META_ENV_SEQ_RESERVED: &str = "env_seq_reserved";
pub(crate) const META_UP_ACKED: &str = "up_acked";
pub(crate) const META_DOWN_HWM: &str = "down_hwm";
pub(crate) const META_CATALOG: &str = "catalog";

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

/// What the writer loads on start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub snapshot: Option<Vec<u8>>,
    pub changes: Vec<Vec<u8>>,
}

/// One transaction's worth of writes.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Changes applied to a ledger (local and merged), to replay on start; local ones with
    /// their outbox sequence number.
    pub changes: Vec<(FridgeId, Option<u64>, Vec<u8>)>,
    pub units: Vec<(FridgeId, UnitView)>,
    pub orders: Vec<OrderView>,
    pub idempotency: Vec<(String, String, String)>,
    pub meta: Vec<(&'static str, String)>,
    /// Forget outbox entries up to this seq (the hub acknowledged them).
    pub outbox_forget_up_to: Option<u64>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.units.is_empty()
            && self.orders.is_empty()
            && self.idempotency.is_empty()
            && self.meta.is_empty()
            && self.outbox_forget_up_to.is_none()
    }
}

/// The writer's connection.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_connection(path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(projection::SCHEMA)?;
        // Checkpoints run on the checkpointer's connection, not in the writer's commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(Self { conn })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        match self.meta(key)? {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("meta {key} = {v:?}"))),
        }
    }

    /// The last outbox position handed out: the newest local change still stored, or the
    /// hub's acknowledgement if every local change was acknowledged and compacted away.
    pub fn outbox_head(&self) -> Result<u64, StoreError> {
        let max: Option<i64> =
            self.conn
                .query_row("SELECT MAX(outbox_seq) FROM ledger_changes", [], |r| {
                    r.get(0)
                })?;
        Ok((max.unwrap_or(0) as u64).max(self.meta_u64(META_UP_ACKED)?))
    }

    pub fn catalog(&self) -> Result<Catalog, StoreError> {
        match self.meta(META_CATALOG)? {
            None => Ok(Catalog::default()),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("catalog: {e}"))),
        }
    }

    pub fn load_ledger(&self, fridge: &FridgeId) -> Result<Loaded, StoreError> {
        let snapshot = self
            .conn
            .query_row(
                "SELECT bytes FROM ledger_snapshots WHERE fridge = ?1",
                [fridge.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        let mut stmt = self
            .conn
            .prepare("SELECT bytes FROM ledger_changes WHERE fridge = ?1 ORDER BY id")?;
        let changes = stmt
            .query_map([fridge.as_str()], |r| r.get(0))?
            .collect::<Result<Vec<Vec<u8>>, _>>()?;
        Ok(Loaded { snapshot, changes })
    }

    /// The stored outcome for an idempotency key: `(request_sha256, outcome)`.
    pub fn idempotency(&self, key: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT request_sha256, outcome FROM idempotency WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Writes a batch in one transaction and commits it (one fsync).
    pub fn commit_batch(&mut self, batch: &WriteBatch, now_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut change = tx.prepare_cached(
                "INSERT INTO ledger_changes (fridge, outbox_seq, bytes) VALUES (?1, ?2, ?3)",
            )?;
            for (fridge, seq, bytes) in &batch.changes {
                change.execute(params![fridge.as_str(), seq.map(|s| s as i64), bytes])?;
            }
            for (fridge, view) in &batch.units {
                projection::upsert_unit(&tx, fridge, view)?;
            }
            for view in &batch.orders {
                projection::upsert_order(&tx, view)?;
            }
            let mut idem = tx.prepare_cached(
                "INSERT INTO idempotency (key, request_sha256, outcome, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (key, hash, outcome) in &batch.idempotency {
                idem.execute(params![key, hash, outcome, now_ms])?;
            }
            let mut meta =
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
            for (key, value) in &batch.meta {
                meta.execute(params![key, value])?;
            }
            if let Some(up_to) = batch.outbox_forget_up_to {
                meta.execute(params![META_UP_ACKED, up_to.to_string()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a ledger's change log by a snapshot of the whole document, keeping the local
    /// changes the hub has not acknowledged (the outbox).
    pub fn compact_ledger(
        &mut self,
        fridge: &FridgeId,
        snapshot: &[u8],
        up_acked: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO ledger_snapshots (fridge, bytes) VALUES (?1, ?2)",
            params![fridge.as_str(), snapshot],
        )?;
        tx.execute(
            "DELETE FROM ledger_changes
             WHERE fridge = ?1 AND (outbox_seq IS NULL OR outbox_seq <= ?2)",
            params![fridge.as_str(), up_acked as i64],
        )?;
        tx.commit()?;
        Ok(())
    }
}

/// Watches free space on the database's filesystem against the configured reserve.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    dir: std::path::PathBuf,
    reserve_bytes: u64,
}

impl DiskGuard {
    pub fn new(dir: &Path, reserve_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            reserve_bytes,
        }
    }

    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes
    }

    /// Bytes an unprivileged writer may still use there, or `None` if the filesystem cannot
    /// tell (then writes are not held back; SQLite's own disk-full error still refuses them).
    pub fn free_bytes(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
}

/// Whether a store error means the disk is full.
pub fn is_disk_full(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
}

/// Read-only connections for the HTTP API and the sync task.
#[derive(Debug)]
pub struct ReadPool {
    readers: Readers,
}

/// A few read-only WAL connections, used in turn (the agent's and the hub's read side).
#[derive(Debug)]
pub struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Readers {
    pub fn open(path: &Path, size: usize) -> Result<Self, StoreError> {
        let mut conns = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            let conn = open_connection(path)?;
            conn.pragma_update(None, "query_only", "ON")?;
            conns.push(Mutex::new(conn));
        }
        Ok(Self {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Runs `f` on the next connection.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
        let conn = self.conns[i]
            .lock()
            .map_err(|_| StoreError::Corrupt("read connection poisoned".into()))?;
        Ok(f(&conn)?)
    }
}

impl ReadPool {
    pub fn open(path: &Path, size: usize) -> Result<Self, StoreError> {
        Ok(Self {
            readers: Readers::open(path, size)?,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        self.readers.with(f)
    }

    /// Outbox entries after `after`, at most `limit`, in order.
    pub fn outbox_after(&self, after: u64, limit: u64) -> Result<Vec<Entry>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT outbox_seq, fridge, bytes FROM ledger_changes
                 WHERE outbox_seq > ?1 ORDER BY outbox_seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
                let seq: i64 = r.get(0)?;
                let fridge: String = r.get(1)?;
                let change: Vec<u8> = r.get(2)?;
                Ok((seq, fridge, change))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, fridge, change) = row?;
                // Ids were validated before they were stored.
                if let Ok(ledger) = FridgeId::new(fridge) {
                    out.push(Entry {
                        seq: seq as u64,
                        ledger,
                        change,
                    });
                }
            }
            Ok(out)
        })
    }

    pub fn stock(
        &self,
        fridge: &FridgeId,
        now_ms: i64,
    ) -> Result<(Vec<SkuStock>, Vec<UnitView>), StoreError> {
        self.with(|c| projection::stock(c, fridge, now_ms))
    }

    pub fn order(&self, order: &OrderId) -> Result<Option<OrderView>, StoreError> {
        self.with(|c| {
            let json: Option<String> = c
                .query_row(
                    "SELECT view FROM orders WHERE order_id = ?1",
                    [order.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
        })
    }

    pub fn orders(&self, status: Option<&str>, limit: u32) -> Result<Vec<OrderView>, StoreError> {
        self.with(|c| projection::orders(c, None, status, limit))
    }
}

/// Moves the WAL into the database file every [`CHECKPOINT_INTERVAL_MS`] on its own thread and
/// connection, so that checkpoints never run inside the writer's commits. Stops when the sender
/// of `stop` is dropped.
pub fn spawn_checkpointer(
    path: &Path,
    stop: std::sync::mpsc::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let conn = open_connection(path)?;
    std::thread::Builder::new()
        .name("checkpointer".into())
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
