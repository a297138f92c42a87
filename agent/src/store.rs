//! The agent's SQLite store: ledger changes and snapshots (the write model), the outbox, the
//! stream positions, idempotency records and the stock and order projections (the read model).
//!
//! One [`Store`] (the writer's) writes; [`ReadPool`] connections read in WAL mode. Every write
//! goes through [`Store::commit_batch`], one transaction and one fsync (`synchronous=FULL`).

use std::path::Path;

use larder_shared::catalog::Catalog;
use larder_shared::domain::{OrderView, UnitView};
use larder_shared::envelope::Entry;
use larder_shared::{FridgeId, OrderId};
use rusqlite::{Connection, OptionalExtension, params};

pub(crate) use larder_runtime::projection::{self, SkuStock};
pub use larder_runtime::sqlite::StoreError;
use larder_runtime::sqlite::migrate::{Migration, Plan, Schema};
use larder_runtime::sqlite::{Readers, checkpoint_connection, open_connection, run_checkpointer};

/// The schema as it stood before stores had versions: the first migration, never changed.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_snapshots (fridge TEXT PRIMARY KEY, bytes BLOB NOT NULL);
-- Every change applied to a ledger since its snapshot. Local changes carry their outbox
-- sequence number and audit-chain link: the outbox is the rows with outbox_seq above the hub's
-- acknowledgement.
CREATE TABLE IF NOT EXISTS ledger_changes (
    id INTEGER PRIMARY KEY, fridge TEXT NOT NULL, outbox_seq INTEGER UNIQUE, bytes BLOB NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0, chain_prev BLOB, chain_hash BLOB);

CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, request_sha256 TEXT NOT NULL, outcome TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (created_at_ms);
";

/// The archive lives in its own file (`archive.db` beside `agent.db`, attached as `arc`), so
/// the database every sale writes to stays the size of the live state however long the
/// archive's retention: finished records that left the live ledger documents at a compaction
/// (append-only; pruned after the retention period).
const ARCHIVE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS arc.archive (
    id INTEGER PRIMARY KEY, fridge TEXT NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL,
    record_id TEXT NOT NULL, record TEXT NOT NULL, archived_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS arc.archive_record ON archive (kind, record_id);
CREATE INDEX IF NOT EXISTS arc.archive_age ON archive (archived_at_ms);
";

/// The agent store's schema: one migration per change, appended only (see
/// `larder_runtime::sqlite::migrate`).
pub const AGENT_SCHEMA: Schema = Schema {
    store: "agent store",
    migrations: &[
        Migration {
            name: "ledgers, changes and outbox, idempotency, projections and the archive \
                   (the schema before stores had versions)",
            apply: |tx| {
                tx.execute_batch(SCHEMA)?;
                tx.execute_batch(projection::SCHEMA)?;
                tx.execute_batch(ARCHIVE_SCHEMA)
            },
        },
        Migration {
            name: "the archive holds each record once per epoch",
            apply: archive_once,
        },
        Migration {
            name: "local changes the hub acknowledged are kept a while, to offer again to a \
                   restored hub",
            apply: |tx| tx.execute_batch(SENT_CHANGES_SCHEMA),
        },
        Migration {
            name: "the hub's changes are kept with its signatures, to give back to a restored \
                   hub",
            apply: given_back::migrate,
        },
    ],
};

/// Local changes the hub acknowledged, moved here from `ledger_changes` when their ledger is
/// compacted and kept, the newest [`SENT_CHANGES_KEPT`], with their audit links: a hub whose
/// store was restored from a backup or a replica lacks the last of them, and gets them again
/// from here (see `Writer::hub_generation`).
const SENT_CHANGES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sent_changes (
    outbox_seq INTEGER PRIMARY KEY, fridge TEXT NOT NULL, bytes BLOB NOT NULL,
    epoch INTEGER NOT NULL, chain_prev BLOB, chain_hash BLOB);
";

/// How many acknowledged local changes a device keeps to offer a restored hub: at a busy
/// fridge's thousand sales a day, three weeks of them, far past a nightly backup's recovery
/// point or a replica's seconds. In the simulated year (docs/BENCHMARKS.md) they took 11 MiB of
/// a fridge's store and 66 MiB of a POS's, whose sales are larger changes.
pub(crate) const SENT_CHANGES_KEPT: u64 = 20_000;

/// Each record archived once per epoch: the archive's rows are committed before the rebase that
/// archives them (the two files are not atomic together in WAL mode), so a rebase redone after
/// a crash between the two commits adds nothing twice. A store from before this index may hold
/// such duplicates; they are removed, keeping the first, when it is created. Idempotent: the
/// index lives in the archive's file, which may have it when the agent store's version does
/// not say so.
fn archive_once(tx: &rusqlite::Transaction<'_>) -> Result<(), rusqlite::Error> {
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM arc.sqlite_master WHERE name = 'archive_once')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        tx.execute_batch(
            "DELETE FROM arc.archive WHERE id NOT IN
                 (SELECT MIN(id) FROM arc.archive GROUP BY fridge, epoch, kind, record_id);
             CREATE UNIQUE INDEX arc.archive_once ON archive (fridge, epoch, kind, record_id);",
        )?;
    }
    Ok(())
}

/// The archive's file for a database at `db`.
pub(crate) fn archive_path(db: &Path) -> std::path::PathBuf {
    db.with_file_name("archive.db")
}

/// Attaches the archive file as `arc` (WAL, `synchronous=FULL`), creating it if missing.
fn attach_archive(conn: &Connection, db: &Path) -> Result<(), StoreError> {
    conn.execute(
        "ATTACH DATABASE ?1 AS arc",
        [archive_path(db).to_string_lossy().as_ref()],
    )?;
    conn.pragma_update(Some("arc"), "journal_mode", "WAL")?;
    conn.pragma_update(Some("arc"), "synchronous", "FULL")?;
    conn.pragma_update(Some("arc"), "cache_size", -i64::from(ARCHIVE_CACHE_KIB))?;
    Ok(())
}

/// Meta keys.
pub(crate) const META_ENV_SEQ_RESERVED: &str = "env_seq_reserved";
pub(crate) const META_UP_ACKED: &str = "up_acked";
pub(crate) const META_DOWN_HWM: &str = "down_hwm";
pub(crate) const META_CATALOG: &str = "catalog";
/// The audit-chain link `seq:hash` of the newest compacted-away local change.
pub(crate) const META_CHAIN_ACKED: &str = "chain_acked";
/// The outbox position a rebase reached: positions are never handed out twice, even when the
/// rows that held them were replaced.
pub(crate) const META_OUTBOX_FLOOR: &str = "outbox_floor";
/// The hub store's generation last seen in an acknowledgement.
pub(crate) const META_HUB_GENERATION: &str = "hub_generation";
/// `1` while the downlink waits to restart at a restored hub's position.
pub(crate) const META_DOWN_RESTART: &str = "down_restart";

/// The page cache of each of the agent's read connections, in KiB: a fridge's stock and order
/// reads touch few pages, and a board has little memory.
pub(crate) const READ_CACHE_KIB: u32 = 512;

/// The page cache of the agent's writer connection, in KiB (SQLite's default is 2 MiB). A sale
/// touches the right-hand edges of a few B-trees and one unit's rows, which 128 pages hold;
/// other pages are read from the kernel's page cache, which the board can reclaim, rather than
/// kept in the agent's own memory (docs/BENCHMARKS.md, "Resident memory").
pub(crate) const WRITER_CACHE_KIB: u32 = 512;

/// The page cache for the attached archive on each connection, in KiB: it is written by the
/// daily compaction and read by history queries, and would otherwise keep SQLite's default
/// 2 MiB per connection once those have run.
pub(crate) const ARCHIVE_CACHE_KIB: u32 = 256;

/// What the writer loads on start.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub snapshot: Option<Vec<u8>>,
    pub changes: Vec<Vec<u8>>,
}

/// A change row: local ones carry their outbox position and audit-chain link.
#[derive(Debug, Clone)]
pub(crate) struct ChangeRow {
    pub fridge: FridgeId,
    pub epoch: u32,
    pub outbox_seq: Option<u64>,
    /// `(prev, hash)` of the audit chain, for local changes.
    pub chain: Option<([u8; 32], [u8; 32])>,
    pub bytes: Vec<u8>,
    /// A change of the hub's given back in the outbox: the hub's signature of it.
    pub hub_sig: Option<Vec<u8>>,
}

/// A ledger moved onto a new epoch: its rows and projections are replaced.
#[derive(Debug, Clone)]
pub(crate) struct RebaseWrite {
    pub fridge: FridgeId,
    pub epoch: u32,
    /// The new epoch's base document, the ledger's new snapshot.
    pub base: Vec<u8>,
    pub archived: Vec<larder_shared::ledger::compaction::Archived>,
}

/// A local row of the outbox, as a rebase re-links it.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub seq: u64,
    pub fridge: FridgeId,
    pub epoch: u32,
    pub bytes: Vec<u8>,
}

/// One transaction's worth of writes.
#[derive(Debug, Default)]
pub(crate) struct WriteBatch {
    /// Ledgers moved onto a new epoch; written before everything else of the batch.
    pub rebases: Vec<RebaseWrite>,
    /// New audit-chain links of outbox rows `(seq, prev, hash)` after a rebase.
    pub rechain: Vec<(u64, [u8; 32], [u8; 32])>,
    /// Changes applied to a ledger (local and merged), to replay on start; local ones with
    /// their outbox sequence number.
    pub changes: Vec<ChangeRow>,
    pub units: Vec<(FridgeId, UnitView)>,
    pub orders: Vec<OrderView>,
    pub idempotency: Vec<(String, String, String)>,
    pub meta: Vec<(&'static str, String)>,
    /// Forget outbox entries up to this seq (the hub acknowledged them).
    pub outbox_forget_up_to: Option<u64>,
    /// Changes of the hub's the downlink brought, to keep.
    pub hub_changes: Vec<HubChange>,
}

impl WriteBatch {
    pub(crate) fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.rebases.is_empty()
            && self.units.is_empty()
            && self.orders.is_empty()
            && self.idempotency.is_empty()
            && self.meta.is_empty()
            && self.outbox_forget_up_to.is_none()
            && self.hub_changes.is_empty()
    }
}

/// The writer's connection.
#[derive(Debug)]
pub(crate) struct Store {
    conn: Connection,
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let (conn, _) = Self::open_migrated(path)?;
        // Checkpoints run on the checkpointer's connection, not in the writer's commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "cache_size", -i64::from(WRITER_CACHE_KIB))?;
        Ok(Self { conn })
    }

    /// A connection to the store at `path` (the archive attached), brought to this program's
    /// version, and what that ran.
    pub(crate) fn open_migrated(path: &Path) -> Result<(Connection, Plan), StoreError> {
        let mut conn = open_connection(path)?;
        attach_archive(&conn, path)?;
        let ran = AGENT_SCHEMA.migrate(&mut conn)?;
        // The archive is a file of its own, which may be lost while the store's version says
        // it was made: its tables are made again, empty, if missing (both steps idempotent).
        let tx = conn.transaction()?;
        tx.execute_batch(ARCHIVE_SCHEMA)?;
        archive_once(&tx)?;
        tx.commit()?;
        Ok((conn, ran))
    }

    pub(crate) fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub(crate) fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        match self.meta(key)? {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("meta {key} = {v:?}"))),
        }
    }

    /// The last outbox position handed out: the newest local change still stored, or the
    /// hub's acknowledgement if every local change was acknowledged and compacted away.
    pub(crate) fn outbox_head(&self) -> Result<u64, StoreError> {
        let max: Option<i64> = self.conn.query_row(
            "SELECT MAX(seq) FROM (SELECT MAX(outbox_seq) AS seq FROM ledger_changes
                 UNION ALL SELECT MAX(outbox_seq) FROM sent_changes)",
            [],
            |r| r.get(0),
        )?;
        Ok((max.unwrap_or(0) as u64)
            .max(self.meta_u64(META_UP_ACKED)?)
            .max(self.meta_u64(META_OUTBOX_FLOOR)?))
    }

    pub(crate) fn catalog(&self) -> Result<Catalog, StoreError> {
        match self.meta(META_CATALOG)? {
            None => Ok(Catalog::default()),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("catalog: {e}"))),
        }
    }

    pub(crate) fn load_ledger(&self, fridge: &FridgeId) -> Result<Loaded, StoreError> {
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
    pub(crate) fn idempotency(&self, key: &str) -> Result<Option<(String, String)>, StoreError> {
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
    ///
    /// A batch with rebases first commits the records they archive, in a transaction of the
    /// archive's own file: SQLite keeps a transaction over two attached files atomic only
    /// outside WAL mode, so one transaction could leave the live state rebased and its records
    /// not archived (lost) after a power cut. Archived first, a cut between the two commits
    /// leaves the records in both places until the rebase is redone, which archives nothing
    /// twice ([`archive_once`]).
    pub(crate) fn commit_batch(
        &mut self,
        batch: &WriteBatch,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if batch.rebases.iter().any(|r| !r.archived.is_empty()) {
            let tx = self.conn.transaction()?;
            {
                let mut archive = tx.prepare_cached(
                    "INSERT OR IGNORE INTO arc.archive
                         (fridge, epoch, kind, record_id, record, archived_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for r in &batch.rebases {
                    for a in &r.archived {
                        archive.execute(params![
                            r.fridge.as_str(),
                            r.epoch.saturating_sub(1),
                            a.kind.as_str(),
                            a.id,
                            a.record.to_string(),
                            now_ms
                        ])?;
                    }
                }
            }
            tx.commit()?;
        }
        let acked = self.meta_u64(META_UP_ACKED)?.min(i64::MAX as u64) as i64;
        let tx = self.conn.transaction()?;
        for r in &batch.rebases {
            // What the hub acknowledged is kept for a restored hub, as a compaction keeps it.
            tx.execute(
                "INSERT OR IGNORE INTO sent_changes
                     (outbox_seq, fridge, bytes, epoch, chain_prev, chain_hash, hub_sig)
                 SELECT outbox_seq, fridge, bytes, epoch, chain_prev, chain_hash, hub_sig
                 FROM ledger_changes WHERE fridge = ?1 AND outbox_seq <= ?2",
                params![r.fridge.as_str(), acked],
            )?;
            tx.execute(
                "DELETE FROM ledger_changes WHERE fridge = ?1",
                [r.fridge.as_str()],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO ledger_snapshots (fridge, bytes) VALUES (?1, ?2)",
                params![r.fridge.as_str(), r.base],
            )?;
            projection::delete_fridge(&tx, &r.fridge)?;
        }
        {
            let mut rechain = tx.prepare_cached(
                "UPDATE ledger_changes SET chain_prev = ?2, chain_hash = ?3 WHERE outbox_seq = ?1",
            )?;
            for (seq, prev, hash) in &batch.rechain {
                rechain.execute(params![*seq as i64, &prev[..], &hash[..]])?;
            }
            let mut change = tx.prepare_cached(
                "INSERT INTO ledger_changes
                     (fridge, outbox_seq, bytes, epoch, chain_prev, chain_hash, hub_sig)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for c in &batch.changes {
                change.execute(params![
                    c.fridge.as_str(),
                    c.outbox_seq.map(|s| s as i64),
                    c.bytes,
                    c.epoch,
                    c.chain.map(|(p, _)| p.to_vec()),
                    c.chain.map(|(_, h)| h.to_vec()),
                    c.hub_sig,
                ])?;
            }
            given_back::keep(&tx, &batch.hub_changes)?;
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

    /// The audit-chain link `(seq, hash)` of the newest local change at or before `seq`,
    /// whether its row is still stored or was compacted away (then recorded in meta).
    pub(crate) fn chain_at_or_before(
        &self,
        seq: u64,
    ) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        // The newest link of either table of local changes (the log, and what was kept after
        // a compaction), or the one recorded in meta.
        let mut links = Vec::with_capacity(3);
        for table in ["ledger_changes", "sent_changes"] {
            let row: Option<(i64, Option<Vec<u8>>)> = self
                .conn
                .query_row(
                    &format!(
                        "SELECT outbox_seq, chain_hash FROM {table} WHERE outbox_seq <= ?1
                         ORDER BY outbox_seq DESC LIMIT 1"
                    ),
                    [seq.min(i64::MAX as u64) as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            links.push(row.and_then(|(s, h)| Some((s as u64, h?.try_into().ok()?))));
        }
        links.push(self.chain_acked()?.filter(|(s, _)| *s <= seq));
        // The log's row first: a change kept both before and after a rebase is the log's.
        Ok(links.into_iter().flatten().rev().max_by_key(|(s, _)| *s))
    }

    /// The audit-chain hash of the newest local change.
    pub(crate) fn chain_head(&self) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self.chain_at_or_before(u64::MAX)?.map(|(_, h)| h))
    }

    /// The link of the newest compacted-away local change, as recorded when it was removed.
    pub(crate) fn chain_acked(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        Ok(self.meta(META_CHAIN_ACKED)?.and_then(|v| {
            let (seq, hash) = v.split_once(':')?;
            Some((seq.parse().ok()?, hex::decode(hash).ok()?.try_into().ok()?))
        }))
    }

    /// Local changes of a ledger after `seq`, in order (what a rebase carries over). Changes
    /// of the hub's given back are not the device's to carry.
    pub(crate) fn local_changes_after(
        &self,
        fridge: &FridgeId,
        seq: u64,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT bytes FROM ledger_changes
             WHERE fridge = ?1 AND outbox_seq > ?2 AND hub_sig IS NULL ORDER BY outbox_seq",
        )?;
        let rows = stmt.query_map(params![fridge.as_str(), seq as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every local change after `seq` (the outbox beyond the hub's acknowledgement), in order.
    pub(crate) fn outbox_rows_after(&self, seq: u64) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT outbox_seq, fridge, epoch, bytes FROM ledger_changes WHERE outbox_seq > ?1
             ORDER BY outbox_seq",
        )?;
        let rows = stmt.query_map([seq as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, fridge, epoch, bytes) = row?;
            let fridge = FridgeId::new(fridge).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(OutboxRow {
                seq: seq as u64,
                fridge,
                epoch,
                bytes,
            });
        }
        Ok(out)
    }

    /// Deletes idempotency records created before `before_ms`.
    pub(crate) fn prune_idempotency(&mut self, before_ms: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM idempotency WHERE created_at_ms < ?1",
            [before_ms],
        )?)
    }

    /// Deletes archived records older than `before_ms` (the retention setting).
    pub(crate) fn prune_archive(&mut self, before_ms: i64) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM archive WHERE archived_at_ms < ?1", [before_ms])?)
    }

    /// Replaces a ledger's change log by a snapshot of the whole document, keeping the local
    /// changes the hub has not acknowledged (the outbox).
    pub(crate) fn compact_ledger(
        &mut self,
        fridge: &FridgeId,
        snapshot: &[u8],
        up_acked: u64,
    ) -> Result<(), StoreError> {
        // The chain link of the last acknowledged change outlives its row.
        let acked = self.chain_at_or_before(up_acked)?;
        let tx = self.conn.transaction()?;
        if let Some(link) = acked {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![META_CHAIN_ACKED, chain_link_text(link)],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO ledger_snapshots (fridge, bytes) VALUES (?1, ?2)",
            params![fridge.as_str(), snapshot],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO sent_changes
                 (outbox_seq, fridge, bytes, epoch, chain_prev, chain_hash, hub_sig)
             SELECT outbox_seq, fridge, bytes, epoch, chain_prev, chain_hash, hub_sig
             FROM ledger_changes WHERE fridge = ?1 AND outbox_seq <= ?2",
            params![fridge.as_str(), up_acked as i64],
        )?;
        tx.execute(
            "DELETE FROM ledger_changes
             WHERE fridge = ?1 AND (outbox_seq IS NULL OR outbox_seq <= ?2)",
            params![fridge.as_str(), up_acked as i64],
        )?;
        tx.execute(
            "DELETE FROM sent_changes
             WHERE outbox_seq <= (SELECT MAX(outbox_seq) FROM sent_changes) - ?1",
            [SENT_CHANGES_KEPT as i64],
        )?;
        given_back::prune(&tx)?;
        tx.commit()?;
        Ok(())
    }
}

/// The meta text of an audit-chain link.
pub(crate) fn chain_link_text((seq, hash): (u64, [u8; 32])) -> String {
    format!("{seq}:{}", hex::encode(hash))
}

/// Watches free space on the database's filesystem against the configured reserve.
#[derive(Debug, Clone)]
pub(crate) struct DiskGuard {
    dir: std::path::PathBuf,
    reserve_bytes: u64,
}

impl DiskGuard {
    pub(crate) fn new(dir: &Path, reserve_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            reserve_bytes,
        }
    }

    pub(crate) fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes
    }

    /// Bytes an unprivileged writer may still use there, or `None` if the filesystem cannot
    /// tell (then writes are not held back; SQLite's own disk-full error still refuses them).
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
}

/// Whether a store error means the disk is full.
pub(crate) fn is_disk_full(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
}

/// Read-only connections for the HTTP API and the sync task.
#[derive(Debug)]
pub(crate) struct ReadPool {
    readers: Readers,
}

impl ReadPool {
    /// Opens after [`Store::open`], which creates the archive file.
    pub(crate) fn open(path: &Path, size: usize) -> Result<Self, StoreError> {
        let readers = Readers::open_with(path, size, Some(READ_CACHE_KIB), |conn| {
            conn.execute(
                "ATTACH DATABASE ?1 AS arc",
                [archive_path(path).to_string_lossy().as_ref()],
            )?;
            conn.pragma_update(Some("arc"), "cache_size", -i64::from(ARCHIVE_CACHE_KIB))
        })?;
        Ok(Self { readers })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        self.readers.with(f)
    }

    /// Outbox entries after `after`, at most `limit`, in order, each with its audit-chain hash:
    /// the local changes still in their ledger's log and, when a restored hub lacks some it
    /// acknowledged before, those kept after a compaction (two ordered reads, merged).
    pub(crate) fn outbox_after(
        &self,
        after: u64,
        limit: u64,
    ) -> Result<Vec<(Entry, [u8; 32])>, StoreError> {
        let mut entries = self.changes_after("ledger_changes", after, limit)?;
        let sent = self.changes_after("sent_changes", after, limit)?;
        if !sent.is_empty() {
            entries.extend(sent);
            entries.sort_by_key(|(e, _)| e.seq);
            entries.dedup_by_key(|(e, _)| e.seq);
            entries.truncate(limit as usize);
        }
        Ok(entries)
    }

    fn changes_after(
        &self,
        table: &'static str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<(Entry, [u8; 32])>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT outbox_seq, fridge, bytes, epoch, chain_prev, chain_hash, hub_sig
                 FROM {table} WHERE outbox_seq > ?1 ORDER BY outbox_seq LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
                let seq: i64 = r.get(0)?;
                let fridge: String = r.get(1)?;
                let change: Vec<u8> = r.get(2)?;
                let epoch: u32 = r.get(3)?;
                let prev: Option<Vec<u8>> = r.get(4)?;
                let hash: Option<Vec<u8>> = r.get(5)?;
                let hub_sig: Option<Vec<u8>> = r.get(6)?;
                Ok((seq, fridge, change, epoch, prev, hash, hub_sig))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, fridge, change, epoch, prev, hash, hub_sig) = row?;
                // Ids were validated before they were stored.
                let (Ok(ledger), Some(prev), Some(hash)) = (
                    FridgeId::new(fridge),
                    prev.and_then(|p| <[u8; 32]>::try_from(p).ok()),
                    hash.and_then(|h| <[u8; 32]>::try_from(h).ok()),
                ) else {
                    continue;
                };
                out.push((
                    Entry {
                        seq: seq as u64,
                        ledger,
                        epoch,
                        kind: larder_shared::envelope::EntryKind::Change,
                        prev: Some(prev),
                        change,
                        hub_sig,
                    },
                    hash,
                ));
            }
            Ok(out)
        })
    }

    pub(crate) fn stock(
        &self,
        fridge: &FridgeId,
        now_ms: i64,
    ) -> Result<(Vec<SkuStock>, Vec<UnitView>), StoreError> {
        self.with(|c| projection::stock(c, fridge, now_ms))
    }

    pub(crate) fn order(&self, order: &OrderId) -> Result<Option<OrderView>, StoreError> {
        self.with(|c| {
            let json: Option<String> = c
                .query_row(
                    "SELECT view FROM orders WHERE order_id = ?1",
                    [order.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(view) = json.and_then(|j| serde_json::from_str(&j).ok()) {
                return Ok(Some(view));
            }
            // An order compacted out of the live ledger is still answered from the archive.
            let archived: Option<String> = c
                .query_row(
                    "SELECT record FROM archive WHERE kind = 'order' AND record_id = ?1
                     ORDER BY id DESC LIMIT 1",
                    [order.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(archived
                .and_then(|j| serde_json::from_str(&j).ok())
                .and_then(|record| {
                    larder_shared::ledger::compaction::order_view_from_archive(&record)
                }))
        })
    }

    pub(crate) fn orders(
        &self,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        self.with(|c| projection::orders(c, None, status, limit))
    }
}

/// Moves the WAL into the database file every [`CHECKPOINT_INTERVAL_MS`] on its own thread and
/// connection, so that checkpoints never run inside the writer's commits. Stops when the sender
/// of `stop` is dropped.
pub(crate) fn spawn_checkpointer(
    path: &Path,
    stop: std::sync::mpsc::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let conn = checkpoint_connection(path)?;
    // A checkpoint on this connection covers the archive's file too.
    attach_archive(&conn, path)?;
    run_checkpointer(conn, "checkpointer".into(), stop)
}

mod given_back;
pub(crate) use given_back::HubChange;

#[cfg(test)]
mod tests;
