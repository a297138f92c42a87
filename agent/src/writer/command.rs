//! What the writer is asked ([`Command`], [`Action`]) and what it answers ([`Outcome`],
//! [`CommandError`]), and [`submit`], how the HTTP handlers ask.

use super::*;

/// What a successful POST did; stored with its idempotency key and replayed on retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Outcome {
    Refilled {
        fridge_id: FridgeId,
        units: usize,
    },
    Sold(Box<larder_shared::domain::OrderView>),
    DoorSession {
        fridge_id: FridgeId,
        session_id: String,
        matches: Vec<UnitMatch>,
    },
    Removed {
        fridge_id: FridgeId,
        units: usize,
    },
    /// A temperature reading: the excursion it is part of, if any, and the units it
    /// quarantined.
    Temperature {
        fridge_id: FridgeId,
        excursion_since_ms: Option<i64>,
        quarantined: Vec<UnitId>,
    },
    /// A cancel: done, or refused with the contract's code and why (the refusal is recorded in
    /// the order's history).
    Cancel {
        order: Box<larder_shared::domain::OrderView>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<(String, String)>,
    },
}

/// How one unit taken in a door session was matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UnitMatch {
    pub unit_id: UnitId,
    #[serde(flatten)]
    pub matched: TakenMatch,
}

/// Why a command was not carried out. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    #[error("fridge {0} is not served by this device")]
    UnknownFridge(FridgeId),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyConflict,
    #[error("storage unavailable: {0}")]
    Storage(String),
    #[error("the writer queue is full; retry shortly")]
    Overloaded,
    #[error(
        "only {free_bytes} bytes free on the database's disk, below the reserve of \
         {reserve_bytes}: writes are refused until space is freed (reads still work)"
    )]
    InsufficientStorage { free_bytes: u64, reserve_bytes: u64 },
    #[error(
        "{pending} local changes wait for the hub's acknowledgement, the outbox cap: writes \
         are refused until the hub is reachable again"
    )]
    OutboxFull { pending: u64 },
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(
        "{count} card payments for {total_minor} (minor units) wait to be captured, at this \
         device's offline limit: take cash, or wait until the device is online"
    )]
    OfflineLimitReached { count: u64, total_minor: i64 },
    #[error(
        "a card payment taken offline has waited {age_hours} h for its capture (negative: \
         the clock is behind it), outside this device's limit of {hours_max} h \
         (payments.offline_hours_max): take cash, or wait until the device is online and has \
         captured it"
    )]
    OfflinePaymentTooOld { age_hours: i64, hours_max: u64 },
}

pub(super) type Reply = oneshot::Sender<Result<Outcome, CommandError>>;

/// What a local command asks for.
#[derive(Debug)]
pub(crate) enum Action {
    Refill(Refill),
    Sale {
        lines: Vec<SaleLine>,
        payment: Payment,
    },
    /// A door session; `fridge_card` charges the units matched to nothing else to the card
    /// presented at the fridge.
    DoorSession {
        session: DoorSession,
        fridge_card: bool,
    },
    Removal {
        units: Vec<UnitId>,
        reason: larder_shared::domain::RemovalReason,
    },
    Cancel {
        order: OrderId,
    },
    /// A temperature reading from the fridge's controller.
    Temperature {
        celsius: f64,
        at_ms: i64,
    },
}

/// A request to the writer.
#[derive(Debug)]
pub(crate) enum Command {
    /// A local action from the HTTP API.
    Local {
        fridge: FridgeId,
        action: Action,
        idem: Option<Idem>,
        reply: Reply,
    },
    /// A batch of other replicas' changes from the hub; answered with the ack to send.
    Downlink {
        batch: Batch,
        reply: oneshot::Sender<Result<Ack, CommandError>>,
    },
    /// The hub acknowledged the outbox up to here.
    UpAcked { up_to: u64 },
    /// An acknowledgement named a store generation of the hub's other than the last one seen:
    /// the hub's store was restored or rebuilt (from `origin`) and holds this device's stream
    /// up to `up_to` only. Answered with the position the device sends from again, or `None`
    /// if the generation was not taken (the next acknowledgement asks again).
    HubGeneration {
        generation: larder_shared::envelope::Generation,
        up_to: u64,
        origin: Option<larder_shared::envelope::Origin>,
        reply: oneshot::Sender<Option<u64>>,
    },
    /// A newer catalog from the hub.
    Catalog(Catalog),
    /// Persist an envelope sequence reservation before it is used.
    ReserveEnvSeq {
        up_to: u64,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Answered as soon as the writer gets to it: proves the writer thread is alive and
    /// taking commands (the systemd watchdog asks).
    Ping { reply: oneshot::Sender<()> },
    /// Size and epoch of every ledger document, for benchmarks and diagnostics.
    Stats {
        reply: oneshot::Sender<Vec<crate::LedgerStats>>,
    },
    /// The state digest of every ledger, for convergence checks.
    Digests {
        reply: oneshot::Sender<Vec<crate::LedgerDigest>>,
    },
    /// Card payments taken offline by this device and not yet captured.
    PendingCaptures {
        reply: oneshot::Sender<Vec<PendingCapture>>,
    },
    /// What the payment provider answered for an offline card payment.
    Captured { capture: PendingCapture, ok: bool },
    /// Every conflict record of the ledgers held here, and those noticed here and not yet
    /// recorded by the hub.
    Conflicts {
        reply: oneshot::Sender<Vec<ConflictEntry>>,
    },
}

/// An offline card payment waiting to be captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingCapture {
    pub fridge: FridgeId,
    pub order: OrderId,
    pub amount_minor: i64,
    pub currency: String,
    /// When the payment was taken (the sale's time).
    pub taken_at_ms: i64,
}

/// A conflict as the agent lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ConflictEntry {
    #[serde(flatten)]
    pub view: larder_shared::domain::ConflictView,
    /// False for a conflict this replica sees that the hub has not recorded yet.
    pub recorded: bool,
}

/// Sends a command and waits for its answer; maps a full queue to `Overloaded`.
pub(crate) async fn submit(
    tx: &mpsc::Sender<Command>,
    fridge: FridgeId,
    action: Action,
    idem: Option<Idem>,
) -> Result<Outcome, CommandError> {
    let (reply, rx) = oneshot::channel();
    tx.try_send(Command::Local {
        fridge,
        action,
        idem,
        reply,
    })
    .map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => CommandError::Overloaded,
        mpsc::error::TrySendError::Closed(_) => CommandError::ShuttingDown,
    })?;
    rx.await.map_err(|_| CommandError::ShuttingDown)?
}
