//! What an API request did to the region ([`Outcome`]), and its one rendering as the HTTP
//! status and JSON body the API answers with and the store keeps under an Idempotency-Key.

use larder_shared::Sku;
use larder_shared::catalog::Catalog;
use larder_shared::domain::{ConflictView, OrderView};
use serde_json::{Value, json};

use crate::subscriptions::Subscription;

/// What a request to the region writer did, answered once its group committed. A request that
/// changed nothing is a [`super::RegionError`] instead.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An app order placed.
    OrderPlaced(Box<OrderView>),
    /// An order cancelled, dispatched or paid: the order as it stands now.
    Order(Option<Box<OrderView>>),
    /// A cancel the order's rules refused: recorded in its history as `cancel_rejected`, and
    /// answered as the contract's error with the rule's code.
    CancelRefused {
        code: &'static str,
        why: String,
    },
    /// A conflict resolved.
    Resolved(Box<ConflictView>),
    SubscriptionCreated(Box<Subscription>),
    /// A subscription ended (or already ended): as it stands now.
    SubscriptionEnded(Box<Subscription>),
    /// One day's meal of a subscription skipped.
    Skipped {
        subscription_id: String,
        date: jiff::civil::Date,
    },
    /// A new catalog version, published to the agents once committed.
    CatalogPublished(Box<Catalog>),
    /// The same items and currency again: the current version, nothing changed.
    CatalogUnchanged(Box<Catalog>),
    /// A rating counted into its meal's average.
    Rated {
        sku: Sku,
        stars: u8,
        average: f64,
        count: u64,
    },
    /// The same request made before under this Idempotency-Key: the answer stored then.
    Replayed {
        status: u16,
        body: Value,
    },
}

impl Outcome {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Outcome::OrderPlaced(_)
            | Outcome::SubscriptionCreated(_)
            | Outcome::CatalogPublished(_)
            | Outcome::Rated { .. } => 201,
            Outcome::Order(_)
            | Outcome::Resolved(_)
            | Outcome::SubscriptionEnded(_)
            | Outcome::Skipped { .. }
            | Outcome::CatalogUnchanged(_) => 200,
            Outcome::CancelRefused { .. } => 409,
            Outcome::Replayed { status, .. } => *status,
        }
    }

    /// The JSON body the API answers with (and the store keeps for a retry).
    pub fn body(&self) -> Value {
        match self {
            Outcome::OrderPlaced(order) => json!(order),
            Outcome::Order(order) => json!(order),
            Outcome::CancelRefused { code, why } => {
                json!({"error": {"code": code, "message": why}})
            }
            Outcome::Resolved(conflict) => json!(conflict),
            Outcome::SubscriptionCreated(sub) | Outcome::SubscriptionEnded(sub) => json!(sub),
            Outcome::Skipped {
                subscription_id,
                date,
            } => json!({
                "subscription_id": subscription_id,
                "date": date.to_string(),
                "cancelled": true,
            }),
            Outcome::CatalogPublished(catalog) | Outcome::CatalogUnchanged(catalog) => {
                json!(catalog)
            }
            Outcome::Rated {
                sku,
                stars,
                average,
                count,
            } => json!({"sku": sku, "stars": stars, "average": average, "count": count}),
            Outcome::Replayed { body, .. } => body.clone(),
        }
    }
}
