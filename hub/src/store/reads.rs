//! The region's read side: read-only connections for the API, the MQTT task's downlink and
//! the broker's admission, beside the one writer.

use super::queries::entry_from_row;
use super::*;

/// A customer's orders since a time, before a page position, newest first. The customer
/// expression is the one the `orders_customer` index is on.
pub(super) const CUSTOMER_ORDERS: &str = "SELECT view FROM orders
    WHERE json_extract(view, '$.customer_id') = ?1 AND created_at_ms >= ?2
      AND (created_at_ms < ?3 OR (created_at_ms = ?3 AND ?4 <> '' AND order_id < ?4))
    ORDER BY created_at_ms DESC, order_id DESC LIMIT ?5";

/// Read connections of one region.
#[derive(Debug)]
pub struct RegionReads {
    readers: Readers,
}

/// What a copy of a region store (a backup) holds that its manifest records: its schema version
/// and every device with its stream positions. Read through a read-only connection, so the copy
/// is not changed by being read.
pub fn read_copy(path: &Path) -> Result<(u32, Vec<(DeviceRecord, Progress)>), StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let version = larder_runtime::sqlite::migrate::stored_version(&conn)?;
    Ok((version, queries::devices(&conn)?))
}

impl RegionReads {
    pub fn open(path: &Path, size: usize) -> Result<Self, StoreError> {
        Ok(Self {
            readers: Readers::open(path, size, None)?,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        self.readers.with(f)
    }

    /// Each rated sku's sum of stars and count.
    pub fn rating_totals(
        &self,
    ) -> Result<std::collections::HashMap<larder_shared::Sku, (i64, u64)>, StoreError> {
        self.with(rating_totals)
    }

    /// Keys a rotation retired from `device`: those still accepted at `now_ms`, or all of them.
    pub fn retired_keys(
        &self,
        device: &DeviceId,
        now_ms: Option<i64>,
    ) -> Result<Vec<PublicKey>, StoreError> {
        self.with(|c| retired_keys(c, device, now_ms))
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self.device_progress(id)?.map(|(d, _)| d))
    }

    /// A device with its sync progress (one indexed row).
    pub fn device_progress(
        &self,
        id: &DeviceId,
    ) -> Result<Option<(DeviceRecord, Progress)>, StoreError> {
        self.with(|c| queries::device(c, id))
    }

    pub fn devices(&self) -> Result<Vec<(DeviceRecord, Progress)>, StoreError> {
        self.with(queries::devices)
    }

    /// The unrevoked devices that hold `fridge`'s ledger, with their roles (no key parsing).
    pub fn devices_of(&self, fridge: &FridgeId) -> Result<Vec<(DeviceId, Role)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT device_id, role FROM devices, json_each(devices.fridges)
                 WHERE json_each.value = ?1 AND revoked_at_ms IS NULL",
            )?;
            let rows = stmt.query_map([fridge.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (d, role) = row?;
                if let (Ok(d), Ok(role)) = (DeviceId::new(d), role.parse::<Role>()) {
                    out.push((d, role));
                }
            }
            Ok(out)
        })
    }

    /// Every change with a sequence number in `(after, up_to]`, with its author, in order, at
    /// most `limit` of them: one read the downlink pump shares among all devices that are
    /// caught up to `after`, instead of one [`Self::downlink_after`] each.
    pub fn changes_between(
        &self,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<(String, Entry)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, ledger, bytes, epoch, kind, hub_sig, author FROM changes
                 WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![after as i64, up_to as i64, limit as i64], |r| {
                Ok((r.get::<_, String>(6)?, entry_from_row(r)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                if let (author, Some(entry)) = row? {
                    out.push((author, entry));
                }
            }
            Ok(out)
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
                "SELECT id, ledger, bytes, epoch, kind, hub_sig FROM changes
                 WHERE id > ?1 AND author != ?2 AND ledger IN (SELECT value FROM json_each(?3))
                 ORDER BY id LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![after as i64, device.as_str(), ledgers, limit as i64],
                entry_from_row,
            )?;
            let mut out = Vec::new();
            for row in rows {
                out.extend(row?);
            }
            Ok(out)
        })
    }

    pub fn head(&self) -> Result<u64, StoreError> {
        self.with(queries::head)
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

    pub fn subscriptions(&self) -> Result<Vec<crate::subscriptions::Subscription>, StoreError> {
        self.with(subscriptions)
    }

    pub fn skipped_on(&self, date: &str) -> Result<std::collections::BTreeSet<String>, StoreError> {
        self.with(|c| skipped_on(c, date))
    }

    /// Orders, newest first, optionally of one fridge and one status.
    pub fn orders_with_status(
        &self,
        fridge: Option<&FridgeId>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        self.with(|c| projection::orders(c, fridge, status, limit))
    }

    /// One order as the hub's projection holds it.
    pub fn order(&self, order: &str) -> Result<Option<OrderView>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT view FROM orders WHERE order_id = ?1",
                [order],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(|v| v.and_then(|json| serde_json::from_str(&json).ok()))
        })
    }

    /// Customer `customer`'s orders created at or after `since_ms`, newest first, after the
    /// position `before` (`created_at_ms`, `order_id`) of the last one a page ended with.
    pub fn customer_orders(
        &self,
        customer: &str,
        since_ms: i64,
        before: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        let (before_ms, before_id) = before.unwrap_or((i64::MAX, ""));
        self.with(|c| {
            let mut stmt = c.prepare_cached(CUSTOMER_ORDERS)?;
            let rows = stmt.query_map(
                rusqlite::params![customer, since_ms, before_ms, before_id, limit],
                |r| r.get::<_, String>(0),
            )?;
            let mut out = Vec::new();
            for json in rows {
                if let Ok(v) = serde_json::from_str(&json?) {
                    out.push(v);
                }
            }
            Ok(out)
        })
    }

    /// Whether the region has held order `order`: in the projection, or archived.
    pub fn order_exists(&self, order: &str) -> Result<bool, StoreError> {
        self.with(|c| queries::order_exists(c, order))
    }
}
