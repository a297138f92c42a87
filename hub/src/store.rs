//! A region's SQLite store: enrolled devices with their stream positions, every ledger change
//! received (the source of each device's downlink stream), ledger snapshots, and the stock and
//! order projections the kitchen API reads.
//!
//! The region writer owns the one writing [`RegionStore`]; HTTP handlers and the downlink pump
//! read through [`RegionReads`] (WAL readers).

use std::path::Path;

use larder_agent::store::projection::{self, SkuStock};
use larder_agent::store::{Readers, open_connection};
use larder_shared::domain::{OrderView, Role, UnitView};
use larder_shared::envelope::Entry;
use larder_shared::{DeviceId, FridgeId, PublicKey, SiteId};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use larder_agent::store::StoreError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, role TEXT NOT NULL, site TEXT, fridges TEXT NOT NULL,
    public_key TEXT NOT NULL, enrolled_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER,
    last_env_seq INTEGER NOT NULL DEFAULT 0, up_hwm INTEGER NOT NULL DEFAULT 0,
    down_acked INTEGER NOT NULL DEFAULT 0, last_seen_ms INTEGER);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ledger TEXT NOT NULL, author TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE, bytes BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS changes_ledger ON changes (ledger, id);
CREATE TABLE IF NOT EXISTS ledger_snapshots (
    fridge TEXT PRIMARY KEY, bytes BLOB NOT NULL, up_to_change INTEGER NOT NULL);
";

pub(crate) const META_ENV_SEQ_RESERVED: &str = "env_seq_reserved";
pub(crate) const META_CATALOG: &str = "catalog";

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub role: Role,
    pub site: Option<SiteId>,
    pub fridges: Vec<FridgeId>,
    pub public_key: PublicKey,
    pub enrolled_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
}

/// A ledger's snapshot (if any) and the change bytes stored after it.
pub type LoadedLedger = (Option<Vec<u8>>, Vec<Vec<u8>>);

/// A device's stream positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub last_env_seq: u64,
    pub up_hwm: u64,
    pub down_acked: u64,
}

/// A change the hub accepted.
#[derive(Debug, Clone)]
pub struct StoredChange {
    pub ledger: FridgeId,
    pub author: DeviceId,
    pub hash: [u8; 32],
    pub bytes: Vec<u8>,
}

/// One transaction of the region writer.
#[derive(Debug, Default)]
pub struct RegionBatch {
    pub changes: Vec<StoredChange>,
    pub progress: Vec<(DeviceId, Progress, i64)>,
    pub units: Vec<(FridgeId, UnitView)>,
    pub orders: Vec<OrderView>,
    pub enroll: Vec<DeviceRecord>,
    pub revoke: Vec<(DeviceId, i64)>,
    pub meta: Vec<(&'static str, String)>,
}

impl RegionBatch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.progress.is_empty()
            && self.units.is_empty()
            && self.orders.is_empty()
            && self.enroll.is_empty()
            && self.revoke.is_empty()
            && self.meta.is_empty()
    }
}

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(DeviceRecord, Progress)> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let id: String = r.get(0)?;
    let role: String = r.get(1)?;
    let site: Option<String> = r.get(2)?;
    let fridges: String = r.get(3)?;
    let key: String = r.get(4)?;
    let record = DeviceRecord {
        device_id: DeviceId::new(id).map_err(|e| bad(0, e.to_string()))?,
        role: role.parse().map_err(|e: String| bad(1, e))?,
        site: site
            .map(SiteId::new)
            .transpose()
            .map_err(|e| bad(2, e.to_string()))?,
        fridges: serde_json::from_str(&fridges).map_err(|e| bad(3, e.to_string()))?,
        public_key: key
            .parse()
            .map_err(|e: larder_shared::keys::KeyError| bad(4, e.to_string()))?,
        enrolled_at_ms: r.get(5)?,
        revoked_at_ms: r.get(6)?,
        last_seen_ms: r.get(10)?,
    };
    let progress = Progress {
        last_env_seq: r.get::<_, i64>(7)? as u64,
        up_hwm: r.get::<_, i64>(8)? as u64,
        down_acked: r.get::<_, i64>(9)? as u64,
    };
    Ok((record, progress))
}

const DEVICE_COLUMNS: &str = "device_id, role, site, fridges, public_key, enrolled_at_ms, \
     revoked_at_ms, last_env_seq, up_hwm, down_acked, last_seen_ms";

/// The region writer's connection.
#[derive(Debug)]
pub struct RegionStore {
    conn: Connection,
}

impl RegionStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_connection(path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(projection::SCHEMA)?;
        Ok(Self { conn })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<(DeviceRecord, Progress)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?1"),
                [id.as_str()],
                device_from_row,
            )
            .optional()?)
    }

    pub fn devices(&self) -> Result<Vec<(DeviceRecord, Progress)>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id"
        ))?;
        let rows = stmt.query_map([], device_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A ledger's snapshot and the changes stored after it.
    pub fn load_ledger(&self, fridge: &FridgeId) -> Result<LoadedLedger, StoreError> {
        let snap: Option<(Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT bytes, up_to_change FROM ledger_snapshots WHERE fridge = ?1",
                [fridge.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let after = snap.as_ref().map_or(0, |s| s.1);
        let mut stmt = self
            .conn
            .prepare("SELECT bytes FROM changes WHERE ledger = ?1 AND id > ?2 ORDER BY id")?;
        let changes = stmt
            .query_map(params![fridge.as_str(), after], |r| r.get(0))?
            .collect::<Result<Vec<Vec<u8>>, _>>()?;
        Ok((snap.map(|s| s.0), changes))
    }

    /// The id of the last stored change (the head of every downlink stream).
    pub fn head(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM changes", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    pub fn snapshot_ledger(&mut self, fridge: &FridgeId, bytes: &[u8]) -> Result<(), StoreError> {
        let head = self.head()?;
        self.conn.execute(
            "INSERT OR REPLACE INTO ledger_snapshots (fridge, bytes, up_to_change) VALUES (?1, ?2, ?3)",
            params![fridge.as_str(), bytes, head as i64],
        )?;
        Ok(())
    }

    pub fn commit(&mut self, b: &RegionBatch) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut change = tx.prepare_cached(
                "INSERT OR IGNORE INTO changes (ledger, author, hash, bytes) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for c in &b.changes {
                change.execute(params![
                    c.ledger.as_str(),
                    c.author.as_str(),
                    &c.hash[..],
                    c.bytes
                ])?;
            }
            let mut progress = tx.prepare_cached(
                "UPDATE devices SET last_env_seq = ?2, up_hwm = ?3, down_acked = ?4, last_seen_ms = ?5
                 WHERE device_id = ?1",
            )?;
            for (d, p, seen) in &b.progress {
                progress.execute(params![
                    d.as_str(),
                    p.last_env_seq as i64,
                    p.up_hwm as i64,
                    p.down_acked as i64,
                    seen
                ])?;
            }
            for (fridge, v) in &b.units {
                projection::upsert_unit(&tx, fridge, v)?;
            }
            for v in &b.orders {
                projection::upsert_order(&tx, v)?;
            }
            let mut enroll = tx.prepare_cached(
                "INSERT INTO devices (device_id, role, site, fridges, public_key, enrolled_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for d in &b.enroll {
                enroll.execute(params![
                    d.device_id.as_str(),
                    d.role.as_str(),
                    d.site.as_ref().map(|s| s.as_str()),
                    serde_json::to_string(&d.fridges).unwrap_or_default(),
                    d.public_key.to_string(),
                    d.enrolled_at_ms
                ])?;
            }
            let mut revoke = tx.prepare_cached(
                "UPDATE devices SET revoked_at_ms = ?2 WHERE device_id = ?1 AND revoked_at_ms IS NULL",
            )?;
            for (d, at) in &b.revoke {
                revoke.execute(params![d.as_str(), at])?;
            }
            let mut meta =
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
            for (k, v) in &b.meta {
                meta.execute(params![k, v])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Read connections of one region.
#[derive(Debug)]
pub struct RegionReads {
    readers: Readers,
}

impl RegionReads {
    pub fn open(path: &Path, size: usize) -> Result<Self, StoreError> {
        Ok(Self {
            readers: Readers::open(path, size)?,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        self.readers.with(f)
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?1"),
                [id.as_str()],
                device_from_row,
            )
            .optional()
            .map(|r| r.map(|(d, _)| d))
        })
    }

    pub fn devices(&self) -> Result<Vec<(DeviceRecord, Progress)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id"
            ))?;
            let rows = stmt.query_map([], device_from_row)?;
            rows.collect()
        })
    }

    /// The downlink stream of a device: changes to its ledgers by other authors after `after`.
    pub fn downlink_after(
        &self,
        device: &DeviceId,
        fridges: &[FridgeId],
        after: u64,
        limit: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        let ledgers = serde_json::to_string(fridges).unwrap_or_default();
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, ledger, bytes FROM changes
                 WHERE id > ?1 AND author != ?2 AND ledger IN (SELECT value FROM json_each(?3))
                 ORDER BY id LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![after as i64, device.as_str(), ledgers, limit as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                },
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (id, ledger, change) = row?;
                if let Ok(ledger) = FridgeId::new(ledger) {
                    out.push(Entry {
                        seq: id as u64,
                        ledger,
                        change,
                    });
                }
            }
            Ok(out)
        })
    }

    pub fn head(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM changes", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| n as u64)
    }

    pub fn stock(
        &self,
        fridge: &FridgeId,
        now_ms: i64,
    ) -> Result<(Vec<SkuStock>, Vec<UnitView>), StoreError> {
        self.with(|c| projection::stock(c, fridge, now_ms))
    }

    /// Orders of one fridge or all, newest first.
    pub fn orders(
        &self,
        fridge: Option<&FridgeId>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        self.with(|c| projection::orders(c, fridge, None, limit))
    }

    pub fn order_exists(&self, order: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM orders WHERE order_id = ?1", [order], |_| {
                Ok(())
            })
            .optional()
            .map(|r| r.is_some())
        })
    }
}
