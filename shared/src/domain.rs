//! Domain types shared by agent and hub: roles, units, orders, payments and the commands a
//! device applies to a fridge's ledger. Times are Unix milliseconds (`*_ms`), money is in
//! minor units (`*_minor`) with an ISO 4217 currency.

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, FridgeId, OrderId, Sku, UnitId};

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Fridge,
    Pos,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Fridge => "fridge",
            Role::Pos => "pos",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fridge" => Ok(Role::Fridge),
            "pos" => Ok(Role::Pos),
            other => Err(format!("unknown role {other:?} (expected fridge or pos)")),
        }
    }
}

/// How a sale was paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentMethod {
    Card,
    Cash,
    FridgeCard,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub method: PaymentMethod,
    pub amount_minor: i64,
    pub currency: String,
}

/// Where an order came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Pos,
    Fridge,
    App,
    Subscription,
}

/// An order's status: the highest-ranked event of its history (see [`OrderStatus::rank`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// A walk-up sale, paid, units handed over or to be taken from the fridge.
    Completed,
    /// An app or subscription order holding units, payment not yet captured.
    Reserved,
    /// A subscription's occurrence, made into an order at the cut-off: to be cooked.
    Scheduled,
    /// A subscription order whose units left the kitchen.
    Dispatched,
    /// A subscription order whose units a refill placed in the fridge.
    PlacedInFridge,
    /// Paid (or a placed subscription meal): the customer may take it.
    AvailableForPicking,
    /// Units taken out of the fridge by their buyer.
    PickedUp,
    /// Cancelled before payment was captured.
    Cancelled,
    /// Cancelled after payment was captured and before pickup: money to return.
    RefundPending,
    PaymentRefused,
    PaymentTimeout,
    /// Not picked up within the hold window; units released.
    ExpiredNoShow,
    /// A cancel that came too late (recorded; does not change the status).
    CancelRejected,
    /// A card payment taken offline whose capture failed after the sale (a flag; the sale
    /// stands).
    PaymentFailedAfterSale,
    /// An offline card payment captured once online (a flag).
    PaymentCaptured,
    /// Money returned after a conflict was resolved with a refund (a flag; the sale stands in
    /// the books as it happened).
    Refunded,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Completed => "completed",
            OrderStatus::Reserved => "reserved",
            OrderStatus::Scheduled => "scheduled",
            OrderStatus::Dispatched => "dispatched",
            OrderStatus::PlacedInFridge => "placed_in_fridge",
            OrderStatus::AvailableForPicking => "available_for_picking",
            OrderStatus::PickedUp => "picked_up",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::RefundPending => "refund_pending",
            OrderStatus::PaymentRefused => "payment_refused",
            OrderStatus::PaymentTimeout => "payment_timeout",
            OrderStatus::ExpiredNoShow => "expired_no_show",
            OrderStatus::CancelRejected => "cancel_rejected",
            OrderStatus::PaymentFailedAfterSale => "payment_failed_after_sale",
            OrderStatus::PaymentCaptured => "payment_captured",
            OrderStatus::Refunded => "refunded",
        }
    }

    /// How an event ranks when events meet: the order's status is its highest-ranked event,
    /// so concurrent events settle the same way on every replica (a pickup beats a cancel).
    /// Flags rank `None`: they are in the history but never the status.
    pub fn rank(self) -> Option<u8> {
        Some(match self {
            OrderStatus::Completed | OrderStatus::Reserved | OrderStatus::Scheduled => 0,
            OrderStatus::Dispatched => 1,
            OrderStatus::PlacedInFridge => 2,
            OrderStatus::AvailableForPicking => 3,
            OrderStatus::Cancelled
            | OrderStatus::RefundPending
            | OrderStatus::PaymentRefused
            | OrderStatus::PaymentTimeout
            | OrderStatus::ExpiredNoShow => 4,
            OrderStatus::PickedUp => 5,
            OrderStatus::CancelRejected
            | OrderStatus::PaymentFailedAfterSale
            | OrderStatus::PaymentCaptured
            | OrderStatus::Refunded => return None,
        })
    }

    /// Whether an order in this status holds its reserved units.
    pub fn holds_units(self) -> bool {
        matches!(
            self,
            OrderStatus::Reserved
                | OrderStatus::Dispatched
                | OrderStatus::PlacedInFridge
                | OrderStatus::AvailableForPicking
        )
    }

    pub const ALL: [OrderStatus; 16] = [
        OrderStatus::Completed,
        OrderStatus::Reserved,
        OrderStatus::Scheduled,
        OrderStatus::Dispatched,
        OrderStatus::PlacedInFridge,
        OrderStatus::AvailableForPicking,
        OrderStatus::PickedUp,
        OrderStatus::Cancelled,
        OrderStatus::RefundPending,
        OrderStatus::PaymentRefused,
        OrderStatus::PaymentTimeout,
        OrderStatus::ExpiredNoShow,
        OrderStatus::CancelRejected,
        OrderStatus::PaymentFailedAfterSale,
        OrderStatus::PaymentCaptured,
        OrderStatus::Refunded,
    ];
}

impl std::str::FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        OrderStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown order status {s:?}"))
    }
}

/// Why a unit left the fridge without being sold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    Expired,
    Damaged,
    Recall,
    Temperature,
}

/// A unit's state as derived from its transitions and the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitState {
    Available,
    Sold,
    Taken,
    Removed,
    Expired,
    /// Held for an app or subscription order.
    Reserved,
}

impl UnitState {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitState::Available => "available",
            UnitState::Sold => "sold",
            UnitState::Taken => "taken",
            UnitState::Removed => "removed",
            UnitState::Expired => "expired",
            UnitState::Reserved => "reserved",
        }
    }
}

/// The immutable facts of a unit, written once by the refill that loaded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitFacts {
    pub sku: Sku,
    pub expires_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    pub loaded_at_ms: i64,
    pub loaded_by: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<OrderId>,
}

/// A unit as a stock view shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitView {
    pub unit_id: UnitId,
    #[serde(flatten)]
    pub facts: UnitFacts,
    pub state: UnitState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sold_in: Option<OrderId>,
    /// The order holding this unit, while it holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_for: Option<OrderId>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: u32,
    pub unit_price_minor: i64,
    /// The units this line sold, one per quantity.
    pub unit_ids: Vec<UnitId>,
    /// Whether the units were picked by the device (a sale by count) rather than scanned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub picked: bool,
}

/// The immutable part of an order, written once by the device that took it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub order_id: OrderId,
    pub fridge_id: FridgeId,
    pub channel: Channel,
    pub lines: Vec<OrderLine>,
    pub payment: Payment,
    pub total_minor: i64,
    pub catalog_version: u64,
    pub created_at_ms: i64,
    pub created_by: DeviceId,
    /// The app customer or subscriber, for app and subscription orders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Whether the hub confirmed this order against the fridge's escrow allowance (the fridge
    /// was offline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escrow: bool,
    /// The subscription this order is an occurrence of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// Until when the order may be cancelled free (app orders); payment is captured after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until_ms: Option<i64>,
    /// A card payment taken offline, to be captured once the device is online.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payment_pending: bool,
    /// The day a subscription order is for (`YYYY-MM-DD`, the region's local date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_date: Option<String>,
}

/// One entry of an order's status history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub status: OrderStatus,
    pub at_ms: i64,
    pub by: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An order with its history, as views show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    #[serde(flatten)]
    pub record: OrderRecord,
    pub status: OrderStatus,
    pub history: Vec<StatusEvent>,
    /// The units the order holds now (a reservation may have moved to another unit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved_units: Vec<UnitId>,
    /// Conflict records naming this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

/// A unit loaded by a refill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefillUnit {
    pub unit_id: UnitId,
    pub sku: Sku,
    pub expires_at_ms: i64,
    pub batch: Option<String>,
}

/// A courier loaded units into a fridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refill {
    pub units: Vec<RefillUnit>,
    pub order_id: Option<OrderId>,
}

/// One line of a sale as the POS or fridge reader asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLine {
    pub sku: Sku,
    pub unit_id: Option<UnitId>,
    pub quantity: u32,
}

/// A walk-up sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    pub order_id: OrderId,
    pub channel: Channel,
    pub lines: Vec<SaleLine>,
    pub payment: Payment,
    /// A card payment taken offline: stored uncaptured, captured once online.
    #[serde(default)]
    pub payment_pending: bool,
}

/// A door session at a fridge: the units taken out (and perhaps put in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorSession {
    pub session_id: String,
    pub units_taken: Vec<UnitId>,
    pub units_added: Vec<RefillUnit>,
    /// The app or subscription order the door was opened for, if any.
    pub order_id: Option<OrderId>,
    /// The order id for units charged to the fridge's card reader in this session, if a card
    /// was presented; units matched to nothing else are sold in it.
    pub card_order_id: Option<OrderId>,
}

/// How a unit taken in a door session was matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "matched")]
pub enum TakenMatch {
    /// A sale had paid for it.
    Sale { order_id: OrderId },
    /// It was held for this app or subscription order, now picked up.
    Reservation { order_id: OrderId },
    /// Charged to the session's fridge card, in this order.
    FridgeCard { order_id: OrderId },
    /// Nobody paid for it: recorded for follow-up.
    Unpaid,
}

/// The kinds of conflict (docs/DESIGN.md, "Orders, reservations, escrow and conflicts").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictKind {
    /// One unit sold twice by devices that were offline: the later order is to be refunded.
    DoubleSale,
    /// Sales by count took more units of a sku than the fridge had.
    Oversold,
    /// A reserved unit was taken by someone else and no other unit of its sku was left.
    ReservationLost,
    /// A cancel and a pickup of one order met: the pickup won.
    CancelPickupRace,
    /// A sale priced from an older catalog version than the hub's.
    PriceChanged,
}

impl ConflictKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::DoubleSale => "double_sale",
            ConflictKind::Oversold => "oversold",
            ConflictKind::ReservationLost => "reservation_lost",
            ConflictKind::CancelPickupRace => "cancel_pickup_race",
            ConflictKind::PriceChanged => "price_changed",
        }
    }
}

/// A conflict record: what met, and which orders and units. Its id is a function of the
/// conflict itself, so every replica that notices it writes the same record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub conflict_id: String,
    pub kind: ConflictKind,
    pub fridge_id: crate::ids::FridgeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<Sku>,
    pub orders: Vec<OrderId>,
    pub units: Vec<UnitId>,
    /// The order to refund or make good, if the rule names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flagged_order: Option<OrderId>,
    pub detail: String,
}

/// How a person resolved a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionAction {
    Refund,
    Substitute,
    Dismiss,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub action: ResolutionAction,
    pub by: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The unit given instead, for `substitute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<UnitId>,
}

/// A conflict as views show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictView {
    #[serde(flatten)]
    pub record: ConflictRecord,
    /// `open` or `resolved`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
}

/// One line of an app order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppOrderLine {
    pub sku: Sku,
    pub quantity: u32,
}

/// An order placed at the hub for pickup at a fridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppOrder {
    pub order_id: OrderId,
    pub customer_id: String,
    pub channel: Channel,
    pub lines: Vec<AppOrderLine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
}

/// Something that happened to a fridge as a whole: a temperature excursion and the units it
/// quarantined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub kind: String,
    pub fridge_id: crate::ids::FridgeId,
    pub since_ms: i64,
    pub at_ms: i64,
    pub max_celsius: f64,
    pub peak_celsius: f64,
    /// The units quarantined, up to [`Incident::UNITS_LISTED_MAX`]; every one of them is in
    /// the ledger's `removed` map with reason `temperature`.
    pub units: Vec<UnitId>,
    /// How many units were quarantined (absent in incidents recorded before it: `units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units_total: Option<u64>,
    pub by: DeviceId,
}

impl Incident {
    /// Units an incident lists by id, so its record fits one ledger change.
    pub const UNITS_LISTED_MAX: usize = 100;
}
