//! A region's live event feed (`GET /v1/regions/{r}/events`, Server-Sent Events): sales,
//! refills and other stock moves, order transitions, conflicts, devices going online and
//! offline, catalog versions and ratings.
//!
//! The region writer publishes what a group changed only once the group is committed, so the
//! feed never shows what a crash could take back. The feed is live, not a log: a subscriber
//! sees what happens while it is connected, and one that falls behind by more than the channel
//! holds is told how many events it missed (a `lagged` event) and reads the state from the API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use larder_shared::domain::{Channel, ConflictRecord, OrderStatus, OrderView, UnitState, UnitView};
use larder_shared::ids::{DeviceId, FridgeId, OrderId, Sku, UnitId};
use serde::Serialize;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it is told it lagged.
const CAPACITY: usize = 4096;

/// One event of the feed.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Increases by one per event of the region within this hub process.
    pub id: u64,
    /// When the hub published it (RFC 3339).
    pub at: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Serialized with `type` naming the variant; the SSE event name is the same.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A walk-up sale at a fridge or POS, or a later transition of one (a payment captured).
    Sale {
        fridge_id: FridgeId,
        order_id: OrderId,
        channel: Channel,
        status: OrderStatus,
        total_minor: i64,
    },
    /// An app or subscription order was placed or moved on (paid, refused, timed out, picked
    /// up, cancelled, ...).
    Order {
        fridge_id: FridgeId,
        order_id: OrderId,
        channel: Channel,
        status: OrderStatus,
        total_minor: i64,
    },
    /// Units of a fridge changed state: loaded by a refill, sold, taken, reserved, removed.
    Stock {
        fridge_id: FridgeId,
        units: Vec<StockMove>,
    },
    /// A conflict was recorded.
    Conflict { conflict: ConflictRecord },
    /// A device connected or went away.
    Device { device_id: DeviceId, online: bool },
    /// A new catalog version was published.
    Catalog { version: u64 },
    /// A customer rated a meal.
    Rating { sku: Sku, average: f64, count: u64 },
}

impl EventKind {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Sale { .. } => "sale",
            EventKind::Order { .. } => "order",
            EventKind::Stock { .. } => "stock",
            EventKind::Conflict { .. } => "conflict",
            EventKind::Device { .. } => "device",
            EventKind::Catalog { .. } => "catalog",
            EventKind::Rating { .. } => "rating",
        }
    }

    /// The event an order's new state makes.
    pub fn for_order(o: &OrderView) -> Self {
        let r = &o.record;
        let (fridge_id, order_id, channel, status, total_minor) = (
            r.fridge_id.clone(),
            r.order_id.clone(),
            r.channel,
            o.status,
            r.total_minor,
        );
        if matches!(channel, Channel::Pos | Channel::Fridge) {
            EventKind::Sale {
                fridge_id,
                order_id,
                channel,
                status,
                total_minor,
            }
        } else {
            EventKind::Order {
                fridge_id,
                order_id,
                channel,
                status,
                total_minor,
            }
        }
    }
}

/// A unit's new state, in a [`EventKind::Stock`] event.
#[derive(Debug, Clone, Serialize)]
pub struct StockMove {
    pub unit_id: UnitId,
    pub sku: Sku,
    pub state: UnitState,
}

impl From<&UnitView> for StockMove {
    fn from(u: &UnitView) -> Self {
        StockMove {
            unit_id: u.unit_id.clone(),
            sku: u.facts.sku.clone(),
            state: u.state,
        }
    }
}

/// A region's feed: cheap to clone, shared by the writer, the MQTT task and the HTTP API.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<Event>>,
    next: Arc<AtomicU64>,
    /// Stamps each event (the region's clock).
    clock: larder_runtime::Clock,
}

impl Events {
    /// A feed whose events are stamped by `clock`.
    pub fn new(clock: larder_runtime::Clock) -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
            next: Arc::new(AtomicU64::new(1)),
            clock,
        }
    }
}

impl Events {
    /// Publishes to whoever is subscribed; nothing is kept when no one is.
    pub fn publish(&self, kind: EventKind) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let at = jiff::Timestamp::from_millisecond(self.clock.now_ms())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_string();
        let _ = self.tx.send(Arc::new(Event { id, at, kind }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
