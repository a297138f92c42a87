//! A region's SQLite store: enrolled devices with their stream positions, every ledger change
//! received (the source of each device's downlink stream), ledger snapshots, and the stock and
//! order projections the kitchen API reads.
//!
//! The region writer owns the one writing [`RegionStore`]; HTTP handlers and the downlink pump
//! read through [`RegionReads`] (WAL readers).

use std::path::Path;

use larder_runtime::Clock;
use larder_runtime::projection::{self, SkuStock};
use larder_runtime::sqlite::migrate::Plan;
use larder_runtime::sqlite::{Readers, open_connection};
use larder_shared::domain::{OrderView, Role, UnitView};
use larder_shared::envelope::Entry;
use larder_shared::{DeviceId, FridgeId, PublicKey, SiteId};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub mod generation;
mod queries;
mod reads;
mod schema;

use queries::{rating_totals, retired_keys, skipped_on, subscriptions};
pub use reads::{RegionReads, read_copy};
pub use schema::REGION_SCHEMA;

pub use larder_runtime::sqlite::StoreError;

pub(crate) const META_ENV_SEQ_RESERVED: &str = "env_seq_reserved";
/// `changes.kind` of a new epoch's start.
pub const KIND_REBASE: i64 = 1;
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
#[derive(Debug, Clone, Default)]
pub struct LoadedLedger {
    pub snapshot: Option<Vec<u8>>,
    /// Change bytes stored after the snapshot, in order.
    pub changes: Vec<Vec<u8>>,
}

/// A device's stream positions (the same the uplink admission rules judge by).
pub use larder_shared::admission::Progress;

/// A stored answer to a request with an Idempotency-Key: a retry gets it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRow {
    pub key: String,
    /// SHA-256 of the request's method, path and body: the same key with another request is
    /// refused.
    pub request_sha256: String,
    /// The HTTP status and JSON body answered.
    pub status: u16,
    pub response: String,
}

/// A change the hub accepted.
#[derive(Debug, Clone)]
pub struct StoredChange {
    pub ledger: FridgeId,
    pub author: DeviceId,
    pub epoch: u32,
    pub hash: [u8; 32],
    pub bytes: Vec<u8>,
    /// A change the hub made: its signature (`larder_shared::audit::sign_hub_change`).
    pub hub_sig: Option<Vec<u8>>,
}

/// One entry of a device's audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub device: DeviceId,
    pub seq: u64,
    pub ledger: FridgeId,
    pub epoch: u32,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
    pub change_sha256: [u8; 32],
    pub head_sig: Option<Vec<u8>>,
    pub received_at_ms: i64,
}

/// A device's stored audit chain.
#[derive(Debug, Clone)]
pub struct AuditChain {
    /// The last entry pruned (0 and [`larder_shared::audit::GENESIS`] if none was).
    pub base_seq: u64,
    pub base_hash: [u8; 32],
    /// The head the hub recorded when it stored the device's last entry.
    pub head: Option<[u8; 32]>,
    pub entries: Vec<AuditRow>,
}

/// One transaction of the region writer.
#[derive(Debug, Default)]
pub struct RegionBatch {
    pub changes: Vec<StoredChange>,
    pub audit: Vec<AuditRow>,
    pub progress: Vec<(DeviceId, Progress, i64)>,
    pub units: Vec<(FridgeId, UnitView)>,
    pub orders: Vec<OrderView>,
    pub enroll: Vec<DeviceRecord>,
    pub revoke: Vec<(DeviceId, i64)>,
    pub meta: Vec<(&'static str, String)>,
    pub idempotency: Vec<IdempotencyRow>,
    pub subscriptions: Vec<crate::subscriptions::Subscription>,
    /// Occurrences cancelled: subscription id and date.
    pub skips: Vec<(String, String)>,
    /// Catalog versions published, with when.
    pub catalogs: Vec<(larder_shared::catalog::Catalog, i64)>,
    /// Ratings: sku, stars, customer, when.
    pub ratings: Vec<(larder_shared::Sku, u8, Option<String>, i64)>,
    pub key_rotations: Vec<KeyRotationRow>,
}

/// A device's key replaced by a rotation.
#[derive(Debug, Clone)]
pub struct KeyRotationRow {
    pub device: DeviceId,
    pub old: PublicKey,
    pub new: PublicKey,
    pub at_ms: i64,
    /// Until when `old` is still accepted.
    pub old_until_ms: i64,
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
            && self.idempotency.is_empty()
            && self.subscriptions.is_empty()
            && self.skips.is_empty()
            && self.catalogs.is_empty()
            && self.ratings.is_empty()
            && self.key_rotations.is_empty()
    }
}

/// Statements the region writer's connection keeps prepared.
const STATEMENTS_CACHED: usize = 64;

/// Rows [`RegionStore::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub archived: usize,
    pub audit: usize,
    /// Stored answers to idempotent requests.
    pub answers: usize,
}

/// The region writer's connection.
#[derive(Debug)]
pub struct RegionStore {
    conn: Connection,
    /// Stamps stored answers (`commit`): the region writer's clock once it holds the store.
    clock: Clock,
}

impl RegionStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let (conn, _) = Self::open_migrated(path)?;
        // Checkpoints run on the region's checkpointer (`spawn_checkpointer`), not inside the
        // writer's commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // Room for every statement of a group's commit, its projections and its reads: with
        // rusqlite's default of 16 they pushed each other out and were parsed again each time.
        conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
        Ok(Self {
            conn,
            clock: Clock::system(),
        })
    }

    /// A connection to the store at `path`, brought to this program's version, and what that
    /// ran.
    pub fn open_migrated(path: &Path) -> Result<(Connection, Plan), StoreError> {
        let mut conn = open_connection(path)?;
        let ran = REGION_SCHEMA.migrate(&mut conn)?;
        Ok((conn, ran))
    }

    /// The store, stamping what it commits by `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Another connection to this store's file (the region's committer writes through one).
    pub fn open_again(&self) -> Result<Self, StoreError> {
        match self.conn.path() {
            Some(path) if !path.is_empty() => {
                Ok(Self::open(Path::new(path))?.with_clock(self.clock.clone()))
            }
            _ => Err(StoreError::Corrupt("the region store has no file".into())),
        }
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// Keys a rotation retired from `device` that are still accepted at `now_ms`.
    pub fn retired_keys(
        &self,
        device: &DeviceId,
        now_ms: i64,
    ) -> Result<Vec<PublicKey>, StoreError> {
        Ok(retired_keys(&self.conn, device, Some(now_ms))?)
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<(DeviceRecord, Progress)>, StoreError> {
        Ok(queries::device(&self.conn, id)?)
    }

    /// An order of the region whose id is in `device`'s namespace (`{device}-…`), where the
    /// device would number its own sales.
    pub fn order_in_namespace(&self, device: &DeviceId) -> Result<Option<String>, StoreError> {
        // Ids of `{device}-…` sort from `{device}-` up to `{device}.` ('.' follows '-').
        Ok(self
            .conn
            .prepare_cached(
                "SELECT order_id FROM orders WHERE order_id > ?1 AND order_id < ?2 LIMIT 1",
            )?
            .query_row([format!("{device}-"), format!("{device}.")], |r| r.get(0))
            .optional()?)
    }

    /// Whether `customer` has rated `sku`.
    pub fn rated(&self, sku: &str, customer: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM ratings WHERE customer_id = ?1 AND sku = ?2)",
            )?
            .query_row([customer, sku], |r| r.get(0))?)
    }

    /// Whether the region has held order `id`: in the projection, or archived.
    pub fn order_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(queries::order_exists(&self.conn, id)?)
    }

    pub fn devices(&self) -> Result<Vec<(DeviceRecord, Progress)>, StoreError> {
        Ok(queries::devices(&self.conn)?)
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
        let mut stmt = self.conn.prepare(
            "SELECT bytes FROM changes WHERE ledger = ?1 AND id > ?2 AND kind = 0 ORDER BY id",
        )?;
        let changes = stmt
            .query_map(params![fridge.as_str(), after], |r| r.get(0))?
            .collect::<Result<Vec<Vec<u8>>, _>>()?;
        Ok(LoadedLedger {
            snapshot: snap.map(|s| s.0),
            changes,
        })
    }

    /// The id of the last stored change (the head of every downlink stream).
    pub fn head(&self) -> Result<u64, StoreError> {
        Ok(queries::head(&self.conn)?)
    }

    pub fn snapshot_ledger(&mut self, fridge: &FridgeId, bytes: &[u8]) -> Result<(), StoreError> {
        let head = self.head()?;
        self.conn.execute(
            "INSERT OR REPLACE INTO ledger_snapshots (fridge, bytes, up_to_change) VALUES (?1, ?2, ?3)",
            params![fridge.as_str(), bytes, head as i64],
        )?;
        Ok(())
    }

    /// Starts a ledger's new epoch in one transaction: the epoch's start row (every replica's
    /// downlink stream carries it), the new snapshot, the archived records, and the unit rows
    /// of archived units leave the projection (orders stay queryable). Returns the start's id.
    pub fn start_epoch(
        &mut self,
        fridge: &FridgeId,
        epoch: u32,
        rebase: &[u8],
        base: &[u8],
        archived: &[larder_shared::ledger::compaction::Archived],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        use larder_shared::ledger::compaction::ArchivedKind;
        let tx = self.conn.transaction()?;
        let hash: [u8; 32] = sha2::Sha256::digest(rebase).into();
        tx.execute(
            "INSERT INTO changes (ledger, author, hash, bytes, epoch, kind) VALUES (?1, '', ?2, ?3, ?4, ?5)",
            params![fridge.as_str(), &hash[..], rebase, epoch, KIND_REBASE],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT OR REPLACE INTO ledger_snapshots (fridge, bytes, up_to_change) VALUES (?1, ?2, ?3)",
            params![fridge.as_str(), base, id],
        )?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO archive (fridge, epoch, kind, record_id, record, archived_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for a in archived {
                stmt.execute(params![
                    fridge.as_str(),
                    epoch - 1,
                    a.kind.as_str(),
                    a.id,
                    a.record.to_string(),
                    now_ms
                ])?;
            }
            let units: Vec<&str> = archived
                .iter()
                .filter(|a| a.kind == ArchivedKind::Unit)
                .map(|a| a.id.as_str())
                .collect();
            projection::delete_units(&tx, fridge, &units)?;
        }
        tx.commit()?;
        Ok(id as u64)
    }

    /// Retires a ledger's old epochs once every replica that is not dormant (heard from since
    /// `active_since_ms`) and not revoked has acknowledged the newest epoch's start: their rows
    /// are deleted. Returns the rows deleted.
    pub fn retire_epochs(
        &mut self,
        fridge: &FridgeId,
        active_since_ms: i64,
    ) -> Result<usize, StoreError> {
        let start: Option<i64> = self.conn.query_row(
            "SELECT MAX(id) FROM changes WHERE ledger = ?1 AND kind = ?2",
            params![fridge.as_str(), KIND_REBASE],
            |r| r.get(0),
        )?;
        let Some(start) = start else {
            return Ok(0);
        };
        let behind: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM devices
             WHERE revoked_at_ms IS NULL AND down_acked < ?2
               AND EXISTS (SELECT 1 FROM json_each(devices.fridges) WHERE value = ?1)
               AND COALESCE(last_seen_ms, enrolled_at_ms) >= ?3",
            params![fridge.as_str(), start, active_since_ms],
            |r| r.get(0),
        )?;
        if behind > 0 {
            return Ok(0);
        }
        Ok(self.conn.execute(
            "DELETE FROM changes WHERE ledger = ?1 AND id < ?2",
            params![fridge.as_str(), start],
        )?)
    }

    /// Deletes archived records and audit entries older than `before_ms` (each device's audit
    /// chain then starts at the newest entry deleted, recorded as its base), and stored answers
    /// to idempotent requests from before `answers_before_ms`: the rows deleted of each.
    pub fn prune(&mut self, before_ms: i64, answers_before_ms: i64) -> Result<Pruned, StoreError> {
        let tx = self.conn.transaction()?;
        let archived = tx.execute("DELETE FROM archive WHERE archived_at_ms < ?1", [before_ms])?;
        tx.execute(
            "UPDATE devices SET
               audit_base_seq = (SELECT seq FROM audit a WHERE a.device = devices.device_id
                                 AND a.received_at_ms < ?1 ORDER BY seq DESC LIMIT 1),
               audit_base_hash = (SELECT hash FROM audit a WHERE a.device = devices.device_id
                                  AND a.received_at_ms < ?1 ORDER BY seq DESC LIMIT 1)
             WHERE EXISTS (SELECT 1 FROM audit a WHERE a.device = devices.device_id
                           AND a.received_at_ms < ?1)",
            [before_ms],
        )?;
        let audit = tx.execute(
            "DELETE FROM audit WHERE seq <= (SELECT audit_base_seq FROM devices d
                                             WHERE d.device_id = audit.device)
               AND received_at_ms < ?1",
            [before_ms],
        )?;
        let answers = tx.execute(
            "DELETE FROM idempotency WHERE created_at_ms < ?1",
            [answers_before_ms],
        )?;
        tx.commit()?;
        Ok(Pruned {
            archived,
            audit,
            answers,
        })
    }

    /// A device's audit chain as stored: where it starts (after pruning) and its entries.
    pub fn audit_chain(&self, device: &DeviceId) -> Result<AuditChain, StoreError> {
        let (base_seq, base_hash, head): (i64, Option<Vec<u8>>, Option<Vec<u8>>) =
            self.conn.query_row(
                "SELECT audit_base_seq, audit_base_hash, chain_head FROM devices WHERE device_id = ?1",
                [device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
        let mut stmt = self.conn.prepare(
            "SELECT seq, ledger, epoch, prev, hash, change_sha256, head_sig, received_at_ms
             FROM audit WHERE device = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([device.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, Option<Vec<u8>>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        let bad = |what: &str| StoreError::Corrupt(format!("audit row of {device}: {what}"));
        let mut entries = Vec::new();
        for row in rows {
            let (seq, ledger, epoch, prev, hash, digest, head_sig, at) = row?;
            entries.push(AuditRow {
                device: device.clone(),
                seq: seq as u64,
                ledger: FridgeId::new(ledger).map_err(|_| bad("ledger id"))?,
                epoch,
                prev: prev.try_into().map_err(|_| bad("prev is not 32 bytes"))?,
                hash: hash.try_into().map_err(|_| bad("hash is not 32 bytes"))?,
                change_sha256: digest
                    .try_into()
                    .map_err(|_| bad("digest is not 32 bytes"))?,
                head_sig,
                received_at_ms: at,
            });
        }
        Ok(AuditChain {
            base_seq: base_seq as u64,
            base_hash: base_hash
                .and_then(|h| h.try_into().ok())
                .unwrap_or(larder_shared::audit::GENESIS),
            head: head.and_then(|h| h.try_into().ok()),
            entries,
        })
    }

    /// The stored bytes of a change by its SHA-256, while its epoch has not retired.
    pub fn change_bytes(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT bytes FROM changes WHERE hash = ?1 AND kind = 0",
                [&sha256[..]],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The stored answer to an idempotent request: request hash, status and body.
    /// Every catalog version published, oldest first, with when.
    pub fn catalog_versions(
        &self,
    ) -> Result<Vec<(larder_shared::catalog::Catalog, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT catalog, published_at_ms FROM catalog_versions ORDER BY version")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (json, at) = row?;
            out.push((
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                at,
            ));
        }
        Ok(out)
    }

    pub fn subscriptions(&self) -> Result<Vec<crate::subscriptions::Subscription>, StoreError> {
        subscriptions(&self.conn).map_err(Into::into)
    }

    pub fn skipped_on(&self, date: &str) -> Result<std::collections::BTreeSet<String>, StoreError> {
        skipped_on(&self.conn, date).map_err(Into::into)
    }

    /// Each rated sku's sum of stars and count.
    pub fn rating_totals(
        &self,
    ) -> Result<std::collections::HashMap<larder_shared::Sku, (i64, u64)>, StoreError> {
        Ok(rating_totals(&self.conn)?)
    }

    pub fn idempotency(&self, key: &str) -> Result<Option<(String, u16, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT request_sha256, status, response FROM idempotency WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
    }

    /// One piece: one transaction; every table a group writes, in an order that keeps foreign
    /// rows before the rows that name them.
    pub fn commit(&mut self, b: &RegionBatch) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut idem = tx.prepare_cached(
                "INSERT OR IGNORE INTO idempotency (key, request_sha256, status, response, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let now = self.clock.now_ms();
            for IdempotencyRow {
                key: k,
                request_sha256: h,
                status,
                response: body,
            } in &b.idempotency
            {
                idem.execute(params![k, h, status, body, now])?;
            }
            let mut sub = tx.prepare_cached(
                "INSERT OR REPLACE INTO subscriptions (subscription_id, record) VALUES (?1, ?2)",
            )?;
            for x in &b.subscriptions {
                sub.execute(params![
                    x.subscription_id,
                    serde_json::to_string(x).unwrap_or_default()
                ])?;
            }
            let mut skip = tx.prepare_cached(
                "INSERT OR IGNORE INTO subscription_skips (subscription_id, date) VALUES (?1, ?2)",
            )?;
            for (id, date) in &b.skips {
                skip.execute(params![id, date])?;
            }
            let mut catalog = tx.prepare_cached(
                "INSERT OR IGNORE INTO catalog_versions (version, published_at_ms, catalog)
                 VALUES (?1, ?2, ?3)",
            )?;
            for (c, at) in &b.catalogs {
                catalog.execute(params![
                    c.version as i64,
                    at,
                    serde_json::to_string(c).unwrap_or_default()
                ])?;
            }
            let mut rating = tx.prepare_cached(
                "INSERT INTO ratings (sku, stars, customer_id, rated_at_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut total = tx.prepare_cached(
                "INSERT INTO rating_totals (sku, stars_sum, count) VALUES (?1, ?2, 1)
                 ON CONFLICT (sku) DO UPDATE SET stars_sum = stars_sum + ?2, count = count + 1",
            )?;
            for (sku, stars, customer, at) in &b.ratings {
                rating.execute(params![sku.as_str(), stars, customer, at])?;
                total.execute(params![sku.as_str(), stars])?;
            }
            let mut change = tx.prepare_cached(
                "INSERT OR IGNORE INTO changes (ledger, author, hash, bytes, epoch, hub_sig)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for c in &b.changes {
                change.execute(params![
                    c.ledger.as_str(),
                    c.author.as_str(),
                    &c.hash[..],
                    c.bytes,
                    c.epoch,
                    c.hub_sig
                ])?;
            }
            let mut audit = tx.prepare_cached(
                "INSERT OR IGNORE INTO audit (device, seq, ledger, epoch, prev, hash, change_sha256,
                 head_sig, received_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for a in &b.audit {
                audit.execute(params![
                    a.device.as_str(),
                    a.seq as i64,
                    a.ledger.as_str(),
                    a.epoch,
                    &a.prev[..],
                    &a.hash[..],
                    &a.change_sha256[..],
                    a.head_sig,
                    a.received_at_ms
                ])?;
            }
            let mut progress = tx.prepare_cached(
                "UPDATE devices SET last_env_seq = ?2, up_hwm = ?3, down_acked = ?4, last_seen_ms = ?5,
                 chain_head = ?6 WHERE device_id = ?1",
            )?;
            for (d, p, seen) in &b.progress {
                progress.execute(params![
                    d.as_str(),
                    p.last_env_seq as i64,
                    p.up_hwm as i64,
                    p.down_acked as i64,
                    seen,
                    &p.chain_head[..]
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
            let mut rotate = tx.prepare_cached(
                "UPDATE devices SET public_key = ?3 WHERE device_id = ?1 AND public_key = ?2",
            )?;
            let mut retire = tx.prepare_cached(
                "INSERT OR REPLACE INTO device_keys (device_id, public_key, retired_at_ms,
                 accepted_until_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in &b.key_rotations {
                let (old, new) = (r.old.to_string(), r.new.to_string());
                if rotate.execute(params![r.device.as_str(), old, new])? == 1 {
                    retire.execute(params![r.device.as_str(), old, r.at_ms, r.old_until_ms])?;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A customer's order history is read through its index, not a scan of every order.
    #[test]
    fn customer_orders_are_read_through_their_index() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RegionStore::open(&dir.path().join("region.db")).expect("store");
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", reads::CUSTOMER_ORDERS))
            .and_then(|mut q| {
                q.query_map(rusqlite::params!["alice", 0, i64::MAX, "", 20], |r| {
                    r.get(3)
                })?
                .collect()
            })
            .expect("plan");
        assert!(
            plan.iter()
                .any(|p| p.contains("USING INDEX orders_customer")),
            "{plan:?}"
        );
    }

    /// Stored answers to idempotent requests go once older than the cut given, not before.
    #[test]
    fn prune_deletes_answers_past_their_retention() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = RegionStore::open(&dir.path().join("region.db")).expect("store");
        let batch = RegionBatch {
            idempotency: vec![IdempotencyRow {
                key: "k-1".into(),
                request_sha256: "hash".into(),
                status: 201,
                response: "{}".into(),
            }],
            ..RegionBatch::default()
        };
        let before = Clock::system().now_ms();
        store.commit(&batch).expect("commit");
        let kept = store.prune(i64::MIN, before - 1).expect("prune");
        assert_eq!(kept.answers, 0);
        assert!(store.idempotency("k-1").expect("read").is_some());
        let later = Clock::system().now_ms() + 1;
        let pruned = store.prune(i64::MIN, later).expect("prune");
        assert_eq!(
            pruned,
            Pruned {
                archived: 0,
                audit: 0,
                answers: 1
            }
        );
        assert!(store.idempotency("k-1").expect("read").is_none());
    }
}
