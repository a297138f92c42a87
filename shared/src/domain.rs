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

/// An order's status; the last event of its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// A walk-up sale, paid, units handed over or to be taken from the fridge.
    Completed,
    /// A sale whose units a door session saw taken.
    PickedUp,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Completed => "completed",
            OrderStatus::PickedUp => "picked_up",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "completed" => Ok(Self::Completed),
            "picked_up" => Ok(Self::PickedUp),
            "cancelled" => Ok(Self::Cancelled),
            other => Err(format!("unknown order status {other:?}")),
        }
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
}

impl UnitState {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitState::Available => "available",
            UnitState::Sold => "sold",
            UnitState::Taken => "taken",
            UnitState::Removed => "removed",
            UnitState::Expired => "expired",
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
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: u32,
    pub unit_price_minor: i64,
    /// The units this line sold, one per quantity.
    pub unit_ids: Vec<UnitId>,
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
}

/// A door session at a fridge: the units taken out (and perhaps put in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorSession {
    pub session_id: String,
    pub units_taken: Vec<UnitId>,
    pub units_added: Vec<RefillUnit>,
}

/// How a unit taken in a door session was matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "matched")]
pub enum TakenMatch {
    /// A sale had paid for it.
    Sale { order_id: OrderId },
    /// Nobody paid for it: recorded for follow-up.
    Unpaid,
}
