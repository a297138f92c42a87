//! What the region writer is asked to do ([`RegionCommand`]) and what it answers: uplink outcomes,
//! errors, and the API's answers.

use super::*;

/// What a batch check found of one uplink (see the writer's `precheck` and [`verifier`]): its
/// envelope, verified and opened, the key that signed it, and the audit head (last entry's
/// sequence number and chain hash) whose signature verified under that key. Opaque outside
/// the region.
#[derive(Debug)]
pub struct Prechecked {
    pub(super) envelope: envelope::Envelope,
    pub(super) signer: larder_shared::PublicKey,
    pub(super) head: Option<(u64, [u8; 32])>,
}

/// What became of an uplink envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkOutcome {
    /// Refused for this reason (a metrics label); nothing changed.
    Rejected(&'static str),
    /// Changes handled and committed: publish this ack to the device.
    Ack(Ack),
    /// The device acknowledged its downlink stream up to here (committed).
    DownAcked(u64),
    /// The device's new key is in force (committed): confirm it to the device.
    KeyRotated(larder_shared::PublicKey),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    #[error("device {0} is already enrolled")]
    DeviceExists(DeviceId),
    #[error("device {0} is not enrolled")]
    UnknownDevice(DeviceId),
    #[error("fridge {0} is not a fridge of this region")]
    UnknownFridge(FridgeId),
    #[error("{0}")]
    Invalid(String),
    #[error("storage unavailable: {0}")]
    Storage(String),
    /// A read of the store the request needed failed: the store's own words.
    #[error("{0}")]
    StoreRead(String),
    #[error("the region writer is busy; retry shortly")]
    Overloaded,
    #[error("this Idempotency-Key was used with another request")]
    IdempotencyKeyReused,
    /// A fridge a request names is not one of the region's ledgers.
    #[error("no fridge {0} here")]
    NoSuchFridge(FridgeId),
    #[error("no such order")]
    UnknownOrder,
    #[error("no conflict {0} in this region")]
    UnknownConflict(String),
    #[error("no subscription {0}")]
    UnknownSubscription(String),
    /// A sku a request's body names is not in the catalog.
    #[error("sku {0} is not in the catalog")]
    UnknownSku(larder_shared::Sku),
    /// The meal a request's path names is not in the catalog.
    #[error("sku {0} is not in the catalog")]
    NoSuchMeal(larder_shared::Sku),
    #[error("order {order} already exists in region {region}")]
    OrderExists {
        order: larder_shared::OrderId,
        region: RegionId,
    },
    #[error("subscription {id} has no meal on {date}")]
    NoOccurrence { id: String, date: jiff::civil::Date },
    #[error("the cut-off for {0} has passed: the meal is already an order")]
    PastCutoff(jiff::civil::Date),
    #[error(
        "the change was made to version {base}, but the catalog is at version {current} now; \
         fetch it and make the change again"
    )]
    CatalogVersionConflict { base: u64, current: u64 },
    #[error(
        "the catalog takes {size} bytes, more than an envelope may carry \
         (mqtt.max_message_bytes = {max})"
    )]
    CatalogTooLarge { size: usize, max: usize },
    #[error("customer {customer} has rated {sku} already")]
    AlreadyRated {
        customer: String,
        sku: larder_shared::Sku,
    },
    #[error(transparent)]
    Ledger(#[from] larder_shared::ledger::LedgerError),
}

pub type Reply<T> = oneshot::Sender<Result<T, RegionError>>;

/// A compaction asked for: records finished before when, the request's Idempotency-Key and
/// request hash, and the reply.
pub(super) type AskedCompaction = (i64, Option<Idem>, Reply<CompactionReport>);

#[derive(Debug)]
pub enum RegionCommand {
    Uplink {
        topic_device: DeviceId,
        payload: bytes::Bytes,
        reply: oneshot::Sender<UplinkOutcome>,
        /// What the region's verifier found of it, if it checked it (see [`verifier`]).
        pre: Option<Box<Prechecked>>,
    },
    Enroll {
        record: Box<DeviceRecord>,
        /// The request's Idempotency-Key and request hash, if it had one.
        idem: Option<Idem>,
        reply: Reply<DeviceRecord>,
    },
    Revoke {
        device: DeviceId,
        reply: Reply<()>,
    },
    ReserveEnvSeq {
        up_to: u64,
        reply: Reply<()>,
    },
    /// A ledger's state digest, the escrow allowance per sku the hub may spend, and the
    /// fridge's incidents.
    Digest {
        fridge: FridgeId,
        reply: oneshot::Sender<Option<LedgerSummary>>,
    },
    /// Compact every ledger: finished records from before `archive_before_ms` leave the live
    /// documents for the archive; then retire old epochs and prune past the retention.
    Compact {
        archive_before_ms: i64,
        /// The request's Idempotency-Key and request hash, if it had one.
        idem: Option<Idem>,
        reply: Reply<CompactionReport>,
    },
    /// An app order placed, cancelled, paid, or a conflict resolved, through the API.
    Order {
        fridge: Option<FridgeId>,
        order: Option<larder_shared::OrderId>,
        action: OrderAction,
        /// The request's Idempotency-Key and the hash of its method, path and body.
        idem: Option<Idem>,
        reply: Reply<Outcome>,
    },
    /// Create, end or skip an occurrence of a subscription.
    Subscription {
        op: SubscriptionOp,
        /// The request's Idempotency-Key and the hash of its method, path and body.
        idem: Option<Idem>,
        reply: Reply<Outcome>,
    },
    /// Every conflict record of the region's ledgers.
    Conflicts {
        reply: oneshot::Sender<Vec<larder_shared::domain::ConflictView>>,
    },
    /// Units in stock per fridge and sku (on hand, held, expiring before `before_ms`), from the
    /// ledgers: for the refill plan.
    StockCounts {
        now_ms: i64,
        before_ms: i64,
        reply: oneshot::Sender<crate::subscriptions::PerFridge<crate::subscriptions::StockCount>>,
    },
    /// Publish a new catalog version (`PUT /v1/regions/{r}/catalog`).
    PutCatalog {
        currency: String,
        items: Vec<larder_shared::catalog::CatalogItem>,
        /// The version the change was made to, if the caller named one.
        base: Option<u64>,
        idem: Option<Idem>,
        reply: Reply<Outcome>,
    },
    /// A customer's rating of a meal.
    Rate {
        rating: catalog::RatingRequest,
        idem: Option<Idem>,
        reply: Reply<Outcome>,
    },
    /// Load a batch of unit rows (`larder-hub import units`).
    ImportUnits {
        rows: Vec<import::UnitRow>,
        /// The request's Idempotency-Key and request hash, if it had one.
        idem: Option<Idem>,
        reply: Reply<import::ImportReport>,
    },
    /// Apply what time has made due: payment captures after grace windows, payment timeouts,
    /// no-shows, reservations on expired units.
    Tick,
    /// Finish the commands taken so far and stop, even if handles to the writer remain.
    Stop,
}

/// What the API asked of an order.
#[derive(Debug)]
pub enum OrderAction {
    Place {
        order: larder_shared::domain::AppOrder,
        fridge_online: bool,
    },
    Cancel,
    /// The kitchen sent a scheduled order's meals.
    Dispatch,
    Payment(larder_shared::ledger::PaymentOutcome),
    Resolve {
        conflict_id: String,
        resolution: larder_shared::domain::Resolution,
    },
}

/// What the API asked of a subscription.
#[derive(Debug)]
pub enum SubscriptionOp {
    Create(Box<crate::subscriptions::Subscription>),
    /// Ends subscription `id`; with `customer`, only if it is that customer's.
    End {
        id: String,
        customer: Option<String>,
    },
    /// Cancels one occurrence; with `customer`, only of that customer's subscription.
    Skip {
        id: String,
        date: jiff::civil::Date,
        customer: Option<String>,
    },
}
