//! The read model both the agent and the hub keep of every ledger they hold: the `units` and
//! `orders` tables, their upserts and the stock query. Rebuildable from the ledger documents.

use larder_shared::FridgeId;
use larder_shared::domain::{OrderView, UnitState, UnitView};
use rusqlite::{Connection, params};

/// The projection tables.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS units (
    fridge TEXT NOT NULL, unit_id TEXT NOT NULL, sku TEXT NOT NULL, expires_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL, view TEXT NOT NULL, PRIMARY KEY (fridge, unit_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS units_stock ON units (fridge, sku, state, expires_at_ms);
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, fridge TEXT NOT NULL, status TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, view TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS orders_status ON orders (status, created_at_ms);
";

const DAY_MS: i64 = 86_400_000;

/// Stock of one sku at one fridge.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkuStock {
    pub sku: String,
    pub available: u64,
    pub reserved: u64,
    pub expiring_24h: u64,
}

/// Writes a unit's row (expiry is applied when reading).
pub fn upsert_unit(c: &Connection, fridge: &FridgeId, v: &UnitView) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO units (fridge, unit_id, sku, expires_at_ms, state, view)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        fridge.as_str(),
        v.unit_id.as_str(),
        v.facts.sku.as_str(),
        v.facts.expires_at_ms,
        v.state.as_str(),
        serde_json::to_string(v).unwrap_or_default(),
    ])?;
    Ok(())
}

/// Deletes a fridge's unit and order rows (before a ledger's projection is rebuilt).
pub fn delete_fridge(c: &Connection, fridge: &FridgeId) -> rusqlite::Result<()> {
    c.execute("DELETE FROM units WHERE fridge = ?1", [fridge.as_str()])?;
    c.execute("DELETE FROM orders WHERE fridge = ?1", [fridge.as_str()])?;
    Ok(())
}

/// Deletes the unit rows of units that left a ledger's live document (the hub keeps orders).
pub fn delete_units(c: &Connection, fridge: &FridgeId, units: &[&str]) -> rusqlite::Result<()> {
    let mut stmt = c.prepare_cached("DELETE FROM units WHERE fridge = ?1 AND unit_id = ?2")?;
    for u in units {
        stmt.execute(params![fridge.as_str(), u])?;
    }
    Ok(())
}

/// Writes an order's row.
pub fn upsert_order(c: &Connection, v: &OrderView) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO orders (order_id, fridge, status, created_at_ms, view)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        v.record.order_id.as_str(),
        v.record.fridge_id.as_str(),
        v.status.as_str(),
        v.record.created_at_ms,
        serde_json::to_string(v).unwrap_or_default(),
    ])?;
    Ok(())
}

/// Per-sku counts and every unit of a fridge, with expiry applied at `now_ms`.
pub fn stock(
    c: &Connection,
    fridge: &FridgeId,
    now_ms: i64,
) -> rusqlite::Result<(Vec<SkuStock>, Vec<UnitView>)> {
    let mut stmt = c.prepare_cached(
        "SELECT sku,
            SUM(state = 'available' AND expires_at_ms > ?2),
            SUM(state = 'reserved' AND expires_at_ms > ?2),
            SUM(state IN ('available', 'reserved') AND expires_at_ms > ?2 AND expires_at_ms <= ?3)
         FROM units WHERE fridge = ?1 GROUP BY sku ORDER BY sku",
    )?;
    let skus = stmt
        .query_map(params![fridge.as_str(), now_ms, now_ms + DAY_MS], |r| {
            Ok(SkuStock {
                sku: r.get(0)?,
                available: r.get::<_, i64>(1)? as u64,
                reserved: r.get::<_, i64>(2)? as u64,
                expiring_24h: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = c.prepare_cached(
        "SELECT view FROM units WHERE fridge = ?1 ORDER BY expires_at_ms, unit_id",
    )?;
    let units = stmt
        .query_map([fridge.as_str()], |r| r.get::<_, String>(0))?
        .filter_map(|v| {
            v.ok()
                .and_then(|json| serde_json::from_str::<UnitView>(&json).ok())
        })
        .map(|mut u| {
            if matches!(u.state, UnitState::Available | UnitState::Reserved)
                && u.facts.expires_at_ms <= now_ms
            {
                u.state = UnitState::Expired;
            }
            u
        })
        .collect();
    Ok((skus, units))
}

/// Orders, newest first, optionally of one fridge and one status.
pub fn orders(
    c: &Connection,
    fridge: Option<&FridgeId>,
    status: Option<&str>,
    limit: u32,
) -> rusqlite::Result<Vec<OrderView>> {
    let mut stmt = c.prepare_cached(
        "SELECT view FROM orders WHERE (?1 IS NULL OR fridge = ?1) AND (?2 IS NULL OR status = ?2)
         ORDER BY created_at_ms DESC, order_id LIMIT ?3",
    )?;
    let views = stmt
        .query_map(params![fridge.map(|f| f.as_str()), status, limit], |r| {
            r.get::<_, String>(0)
        })?
        .filter_map(|v| v.ok().and_then(|json| serde_json::from_str(&json).ok()))
        .collect();
    Ok(views)
}
