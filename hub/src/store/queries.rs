//! The queries the region's writer and its readers share, each written once over a connection.

use super::*;

pub(super) fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(DeviceRecord, Progress)> {
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
    let chain_head: Option<Vec<u8>> = r.get(11)?;
    let progress = Progress {
        last_env_seq: r.get::<_, i64>(7)? as u64,
        up_hwm: r.get::<_, i64>(8)? as u64,
        down_acked: r.get::<_, i64>(9)? as u64,
        chain_head: chain_head
            .and_then(|h| h.try_into().ok())
            .unwrap_or(larder_shared::audit::GENESIS),
    };
    Ok((record, progress))
}

/// The keys a rotation retired from `device`: those still accepted at `now_ms` (the overlap
/// window), or every one (`None`, for the audit chain's signatures).
pub(super) fn retired_keys(
    conn: &Connection,
    device: &DeviceId,
    now_ms: Option<i64>,
) -> rusqlite::Result<Vec<PublicKey>> {
    let mut stmt = conn.prepare_cached(
        "SELECT public_key FROM device_keys WHERE device_id = ?1 AND accepted_until_ms > ?2
         ORDER BY retired_at_ms DESC",
    )?;
    let keys = stmt
        .query_map(params![device.as_str(), now_ms.unwrap_or(i64::MIN)], |r| {
            r.get::<_, String>(0)
        })?
        .filter_map(|k| k.ok().and_then(|k| k.parse().ok()))
        .collect();
    Ok(keys)
}

pub(super) const DEVICE_COLUMNS: &str = "device_id, role, site, fridges, public_key, enrolled_at_ms, \
     revoked_at_ms, last_env_seq, up_hwm, down_acked, last_seen_ms, chain_head";

/// A downlink entry from a `changes` row read as `id, ledger, bytes, epoch, kind`; `None` for a
/// row whose ledger name no longer parses.
pub(super) fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Entry>> {
    let (id, ledger, change, epoch, kind, hub_sig) = (
        r.get::<_, i64>(0)?,
        r.get::<_, String>(1)?,
        r.get::<_, Vec<u8>>(2)?,
        r.get::<_, u32>(3)?,
        r.get::<_, i64>(4)?,
        r.get::<_, Option<Vec<u8>>>(5)?,
    );
    Ok(FridgeId::new(ledger).ok().map(|ledger| {
        let mut entry = Entry::change(id as u64, ledger, epoch, change);
        entry.hub_sig = hub_sig;
        if kind == KIND_REBASE {
            entry.kind = larder_shared::envelope::EntryKind::Rebase;
        }
        entry
    }))
}

pub(super) fn device(
    c: &Connection,
    id: &DeviceId,
) -> rusqlite::Result<Option<(DeviceRecord, Progress)>> {
    c.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?1"
    ))?
    .query_row([id.as_str()], device_from_row)
    .optional()
}

pub(super) fn devices(c: &Connection) -> rusqlite::Result<Vec<(DeviceRecord, Progress)>> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id"
    ))?;
    let rows = stmt.query_map([], device_from_row)?;
    rows.collect()
}

/// The id of the last stored change (the head of every downlink stream).
pub(super) fn head(c: &Connection) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM changes")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// Whether the region has held order `id`: in the projection, or archived.
pub(super) fn order_exists(c: &Connection, id: &str) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = ?1)
             OR EXISTS (SELECT 1 FROM archive WHERE kind = 'order' AND record_id = ?1)",
    )?
    .query_row([id], |r| r.get(0))
}

pub(super) fn subscriptions(
    c: &Connection,
) -> rusqlite::Result<Vec<crate::subscriptions::Subscription>> {
    let mut stmt = c.prepare_cached("SELECT record FROM subscriptions ORDER BY subscription_id")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows
        .filter_map(|r| r.ok().and_then(|json| serde_json::from_str(&json).ok()))
        .collect())
}

pub(super) fn skipped_on(
    c: &Connection,
    date: &str,
) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut stmt =
        c.prepare_cached("SELECT subscription_id FROM subscription_skips WHERE date = ?1")?;
    let rows = stmt.query_map([date], |r| r.get::<_, String>(0))?;
    rows.collect()
}

pub(super) fn rating_totals(
    c: &Connection,
) -> rusqlite::Result<std::collections::HashMap<larder_shared::Sku, (i64, u64)>> {
    let mut stmt = c.prepare_cached("SELECT sku, stars_sum, count FROM rating_totals")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = std::collections::HashMap::new();
    for row in rows {
        let (sku, sum, count) = row?;
        if let Ok(sku) = larder_shared::Sku::new(sku) {
            out.insert(sku, (sum, u64::try_from(count).unwrap_or(0)));
        }
    }
    Ok(out)
}
