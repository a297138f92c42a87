//! The region store's schema: the tables as they stood before stores had versions, and the
//! migrations since, in order.

use larder_runtime::projection;
use larder_runtime::sqlite::migrate::{Migration, Schema, add_column};

/// The schema as it stood before stores had versions: the first migration, never changed.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, role TEXT NOT NULL, site TEXT, fridges TEXT NOT NULL,
    public_key TEXT NOT NULL, enrolled_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER,
    last_env_seq INTEGER NOT NULL DEFAULT 0, up_hwm INTEGER NOT NULL DEFAULT 0,
    down_acked INTEGER NOT NULL DEFAULT 0, last_seen_ms INTEGER, chain_head BLOB,
    audit_base_seq INTEGER NOT NULL DEFAULT 0, audit_base_hash BLOB);
-- Every ledger change received (kind 0), and every new epoch's start (kind 1, author ''):
-- the source of each device's downlink stream. An old epoch's rows are deleted when it retires.
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ledger TEXT NOT NULL, author TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE, bytes BLOB NOT NULL, epoch INTEGER NOT NULL DEFAULT 0,
    kind INTEGER NOT NULL DEFAULT 0);
-- Each device's audit chain: one row per change it sent, linked by hash, with the device's
-- signature of the head of each batch. Survives compaction; pruned after the retention period.
CREATE TABLE IF NOT EXISTS audit (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ledger TEXT NOT NULL, epoch INTEGER NOT NULL,
    prev BLOB NOT NULL, hash BLOB NOT NULL, change_sha256 BLOB NOT NULL, head_sig BLOB,
    received_at_ms INTEGER NOT NULL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS audit_age ON audit (received_at_ms);
-- Finished records that left the live ledgers (append-only; pruned after the retention period).
CREATE TABLE IF NOT EXISTS archive (
    id INTEGER PRIMARY KEY, fridge TEXT NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL,
    record_id TEXT NOT NULL, record TEXT NOT NULL, archived_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS archive_record ON archive (kind, record_id);
CREATE INDEX IF NOT EXISTS archive_age ON archive (archived_at_ms);
CREATE INDEX IF NOT EXISTS changes_ledger ON changes (ledger, id);
-- Answers to API requests that carried an Idempotency-Key, stored with what they did.
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, request_sha256 TEXT NOT NULL, status INTEGER NOT NULL,
    response TEXT NOT NULL, created_at_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (created_at_ms);
-- Subscriber schedules (JSON records) and the occurrences cancelled before their cut-off.
CREATE TABLE IF NOT EXISTS subscriptions (
    subscription_id TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscription_skips (
    subscription_id TEXT NOT NULL, date TEXT NOT NULL,
    PRIMARY KEY (subscription_id, date)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_snapshots (
    fridge TEXT PRIMARY KEY, bytes BLOB NOT NULL, up_to_change INTEGER NOT NULL);
-- Every catalog version published and when (what `price_changed` is judged by).
CREATE TABLE IF NOT EXISTS catalog_versions (
    version INTEGER PRIMARY KEY, published_at_ms INTEGER NOT NULL, catalog TEXT NOT NULL);
-- Customers' ratings, and each sku's running total, updated in the same transaction.
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY, sku TEXT NOT NULL, stars INTEGER NOT NULL, customer_id TEXT,
    rated_at_ms INTEGER NOT NULL);
-- A customer rates a sku once (looked up before each rating).
CREATE INDEX IF NOT EXISTS ratings_customer ON ratings (customer_id, sku);
-- Keys a rotation replaced: each verifies its device's envelopes and connect tokens until
-- `accepted_until_ms` (the overlap window), and its audit signatures for good.
CREATE TABLE IF NOT EXISTS device_keys (
    device_id TEXT NOT NULL, public_key TEXT NOT NULL, retired_at_ms INTEGER NOT NULL,
    accepted_until_ms INTEGER NOT NULL, PRIMARY KEY (device_id, public_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rating_totals (
    sku TEXT PRIMARY KEY, stars_sum INTEGER NOT NULL, count INTEGER NOT NULL) WITHOUT ROWID;
";

/// Each customer's orders, newest first: an index on the customer the order's view names (the
/// projection's `orders` table is the agent's too, which has no customers to look up).
/// `RegionReads::customer_orders` queries by this very expression.
const CUSTOMER_ORDERS_INDEX: &str = "
CREATE INDEX IF NOT EXISTS orders_customer
    ON orders (json_extract(view, '$.customer_id'), created_at_ms, order_id)
    WHERE json_extract(view, '$.customer_id') IS NOT NULL;
";

/// A region store's schema: one migration per change, appended only (see
/// `larder_runtime::sqlite::migrate`).
pub const REGION_SCHEMA: Schema = Schema {
    store: "region store",
    migrations: &[
        Migration {
            name: "devices, changes, audit, archive, idempotency, subscriptions, snapshots, \
                   catalog versions, ratings, device keys and projections (the schema before \
                   stores had versions)",
            apply: |tx| {
                tx.execute_batch(projection::SCHEMA)?;
                tx.execute_batch(SCHEMA)
            },
        },
        Migration {
            name: "the store's generation, named in every acknowledgement",
            apply: |tx| super::generation::ensure(tx),
        },
        Migration {
            name: "the hub's signature of each change it makes, for devices to give back to a \
                   restored store",
            apply: |tx| add_column(tx, "changes", "hub_sig", "BLOB"),
        },
        Migration {
            name: "each customer's orders by time, for their order history",
            apply: |tx| tx.execute_batch(CUSTOMER_ORDERS_INDEX),
        },
    ],
};
