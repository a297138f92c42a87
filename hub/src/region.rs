//! A region's single writer: verifies device envelopes, merges ledger changes, commits, and only
//! then answers with the acknowledgement to publish.
//!
//! Data flow: the MQTT task hands each `up` publish to the region's verifier thread
//! (`verifier`), which batch-checks signatures ahead of the writer and passes it on as
//! [`RegionCommand::Uplink`] → the writer thread takes every waiting command (group commit)
//! → checks each envelope by docs/PROTOCOL.md's
//! rules (size, decoding, region, topic, sender enrolled and not revoked, signature, replay,
//! ledgers served, change authors) → merges accepted changes into its ledgers → writes changes,
//! stream positions and projections in one transaction → answers (the ack to send, or the
//! rejection reason) → bumps the downlink head so the pump relays the new changes.
//! A rejected envelope changes nothing.
//!
//! Import batches take another path at the end: their transaction is committed by the
//! region's committer thread (`committer`) while the writer loads the next batch.

pub mod catalog;
mod committer;
pub mod import;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
pub mod verifier;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use larder_shared::admission::{self, Admitted, Rejection};
use larder_shared::catalog::Catalog;
use larder_shared::envelope::{self, Ack, Body, EntryKind, Party};
use larder_shared::ledger::{self, Checked, Ledger, Touched};
use larder_shared::reliable::Receipt;
use larder_shared::{DeviceId, FridgeId, RegionId};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::metrics::HubMetrics;
use crate::store::{DeviceRecord, Progress, RegionBatch, RegionStore, StoreError, StoredChange};

/// Device boxes a region writer or verifier keeps before starting over (a few per device at
/// most).
const BOXES_MAX: usize = 65_536;

/// The box of each device key seen, for opening its uplink bodies: the X25519 agreement is done
/// once per key.
#[derive(Debug, Default)]
struct Boxes(HashMap<larder_shared::PublicKey, envelope::BoxKey>);

impl Boxes {
    /// Makes room for `more` keys, starting over rather than growing past [`BOXES_MAX`]; done
    /// before a group, so no box of the group is dropped while it is checked.
    fn make_room(&mut self, more: usize) {
        if self.0.len().saturating_add(more) > BOXES_MAX {
            self.0.clear();
        }
    }

    fn get_or_make(
        &mut self,
        hub_key: &larder_shared::SecretKey,
        key: larder_shared::PublicKey,
    ) -> &envelope::BoxKey {
        self.0
            .entry(key)
            .or_insert_with(|| envelope::BoxKey::new(hub_key, &key))
    }

    fn get(&self, key: &larder_shared::PublicKey) -> Option<&envelope::BoxKey> {
        self.0.get(key)
    }
}

/// What a batch check found of one uplink (see the writer's `precheck` and [`verifier`]): its
/// envelope, verified and opened, the key that signed it, and the audit head (last entry's
/// sequence number and chain hash) whose signature verified under that key. Opaque outside
/// the region.
#[derive(Debug)]
pub struct Prechecked {
    envelope: envelope::Envelope,
    signer: larder_shared::PublicKey,
    head: Option<(u64, [u8; 32])>,
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
    #[error("the region writer is busy; retry shortly")]
    Overloaded,
    #[error("this Idempotency-Key was used with another request")]
    IdempotencyKeyReused,
}

type Reply<T> = oneshot::Sender<Result<T, RegionError>>;

/// Makes a subscription's occurrence into an order: `None` if it was made before. An order
/// of something else holding its id (placed before app order ids in `sub-…` were refused) does
/// not skip it: the occurrence takes the next of `{id}.1`, `{id}.2`, … that is free, ids no
/// client can choose, and says so. An id is held if any of the region's ledgers holds it.
fn schedule_occurrence(
    ledgers: &mut BTreeMap<FridgeId, Ledger>,
    fridge: &FridgeId,
    mut order: larder_shared::domain::AppOrder,
    date: &jiff::civil::Date,
    catalog: &Catalog,
    now: i64,
) -> Result<Option<larder_shared::ledger::LocalChange>, larder_shared::ledger::LedgerError> {
    use larder_shared::ledger::LedgerError;
    let base = order.order_id.clone();
    for k in 1..=8u32 {
        let held = ledgers
            .iter()
            .find_map(|(f, l)| l.order(&order.order_id).map(|v| (f, v)));
        match held {
            Some((f, v)) if f == fridge && v.record.subscription_id == order.subscription_id => {
                return Ok(None);
            }
            Some((_, v)) => {
                let next = larder_shared::OrderId::new(format!("{base}.{k}"))
                    .map_err(|e| LedgerError::Invalid(e.to_string()))?;
                warn!(order = %order.order_id, held_by = ?v.record.customer_id, next = %next,
                    "a subscription occurrence's id is held by another order; it takes the next");
                order.order_id = next;
            }
            None => {
                let ledger = ledgers
                    .get_mut(fridge)
                    .ok_or_else(|| LedgerError::Invalid(format!("no fridge {fridge}")))?;
                return ledger
                    .schedule_order(&order, &date.to_string(), catalog, now)
                    .map(|(c, _)| Some(c));
            }
        }
    }
    Err(LedgerError::OrderExists(base))
}

/// Why a device cannot be enrolled under an id whose namespace an order already uses.
pub fn namespace_taken(device: &DeviceId, order: &str) -> String {
    format!(
        "order {order} already uses the ids {device}-…, where device {device} would number its \
         own sales: choose another device id"
    )
}

/// A compaction asked for: records finished before when, the request's Idempotency-Key and
/// request hash, and the reply.
type AskedCompaction = (i64, Option<(String, String)>, Reply<CompactionReport>);

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
        idem: Option<(String, String)>,
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
        idem: Option<(String, String)>,
        reply: Reply<CompactionReport>,
    },
    /// An app order placed, cancelled, paid, or a conflict resolved, through the API.
    Order {
        fridge: Option<FridgeId>,
        order: Option<larder_shared::OrderId>,
        action: OrderAction,
        /// The request's Idempotency-Key and the hash of its method, path and body.
        idem: Option<(String, String)>,
        reply: Reply<ApiAnswer>,
    },
    /// Create, end or skip an occurrence of a subscription.
    Subscription {
        op: SubscriptionOp,
        /// The request's Idempotency-Key and the hash of its method, path and body.
        idem: Option<(String, String)>,
        reply: Reply<ApiAnswer>,
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
        idem: Option<(String, String)>,
        reply: Reply<ApiAnswer>,
    },
    /// A customer's rating of a meal.
    Rate {
        rating: catalog::RatingRequest,
        idem: Option<(String, String)>,
        reply: Reply<ApiAnswer>,
    },
    /// Load a batch of unit rows (`larder-hub import units`).
    ImportUnits {
        rows: Vec<import::UnitRow>,
        /// The request's Idempotency-Key and request hash, if it had one.
        idem: Option<(String, String)>,
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
    End { id: String },
    Skip { id: String, date: jiff::civil::Date },
}

/// A fridge's escrow grants per sku as they stood once the change table reached a head.
type GrantSnapshot = (u64, BTreeMap<larder_shared::Sku, i64>);

const META_GENERATED_THROUGH: &str = "subscriptions_generated_through";

/// An HTTP status and JSON body: the API's answer, stored for idempotent retries.
pub type ApiAnswer = (u16, serde_json::Value);

fn error_answer(status: u16, code: &str, message: impl std::fmt::Display) -> ApiAnswer {
    (
        status,
        serde_json::json!({"error": {"code": code, "message": message.to_string()}}),
    )
}

/// The API's answer for a ledger error (nothing was changed).
fn ledger_error_answer(e: &larder_shared::ledger::LedgerError) -> ApiAnswer {
    let (status, code) = larder_runtime::http::ledger_error_status(e);
    error_answer(status.as_u16(), code, e)
}

/// The sealing box between the hub and a device key, made once and kept.
fn device_box<'a>(
    boxes: &'a mut Boxes,
    hub_key: &larder_shared::SecretKey,
    signer: larder_shared::PublicKey,
) -> &'a envelope::BoxKey {
    if boxes.get(&signer).is_none() {
        boxes.make_room(1);
    }
    boxes.get_or_make(hub_key, signer)
}

/// The region's state as uplink admission judges an envelope by it.
struct RegionState<'a> {
    ledgers: &'a BTreeMap<FridgeId, Ledger>,
    head: u64,
}

impl admission::Region for RegionState<'_> {
    fn epoch(&self, ledger: &FridgeId) -> Option<u32> {
        self.ledgers.get(ledger).map(Ledger::epoch)
    }

    fn down_head(&self) -> u64 {
        self.head
    }
}

/// What the stock view shows of a ledger beyond its projection.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LedgerSummary {
    pub state_digest: String,
    pub escrow: BTreeMap<String, i64>,
    pub incidents: Vec<larder_shared::domain::Incident>,
}

/// What one compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompactionReport {
    pub ledgers: Vec<LedgerCompaction>,
    /// Rows of retired epochs deleted.
    pub retired_rows: usize,
    pub pruned_archive: usize,
    pub pruned_audit: usize,
    /// Stored answers to idempotent requests past `compaction.idempotency_retention_hours`.
    pub pruned_answers: usize,
}

/// One ledger moved onto a new epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerCompaction {
    pub fridge_id: FridgeId,
    pub epoch: u32,
    pub archived: usize,
    pub live_units: usize,
    pub live_orders: usize,
    pub base_bytes: usize,
}

enum Pending {
    Answer(Reply<ApiAnswer>, ApiAnswer),
    Uplink(oneshot::Sender<UplinkOutcome>, UplinkOutcome),
    Enroll(Reply<DeviceRecord>, Box<DeviceRecord>),
    Unit(Reply<()>),
    Import(Reply<import::ImportReport>, import::ImportReport),
}

/// The writer of one region.
#[derive(Debug)]
pub struct RegionWriter {
    region: RegionId,
    store: RegionStore,
    fridges: Vec<FridgeId>,
    ledgers: BTreeMap<FridgeId, Ledger>,
    max_message_bytes: usize,
    group_commit_max: usize,
    /// `sync.key_overlap_seconds`, in milliseconds.
    key_overlap_ms: i64,
    /// The hub's key, which uplink bodies are sealed to.
    hub_key: larder_shared::SecretKey,
    /// The box of each device key seen (X25519 agreement done once per key).
    boxes: Boxes,
    metrics: Arc<HubMetrics>,
    head_tx: Arc<watch::Sender<u64>>,
    /// Commits import batches while the writer loads the next (started by the first one).
    committer: Option<committer::Committer>,
    changes_since_snapshot: HashMap<FridgeId, usize>,
    /// Changes a ledger's log grows by before a snapshot (`sync.snapshot_every_changes`).
    snapshot_every_changes: usize,
    compaction: crate::config::CompactionConfig,
    /// Compactions asked for in the current group, run once it is committed.
    compactions: Vec<AskedCompaction>,
    catalog: Catalog,
    orders: crate::config::OrdersConfig,
    clock: larder_runtime::Clock,
    provider: Box<dyn larder_shared::payments::PaymentProvider>,
    /// App orders whose capture the provider did not answer (they time out).
    unanswered: std::collections::HashSet<larder_shared::OrderId>,
    /// Captures to be reported failed later: when, the ledger, the order.
    fail_later: Vec<(i64, FridgeId, larder_shared::OrderId)>,
    calendar: crate::subscriptions::Calendar,
    /// The last date whose subscription occurrences are orders.
    generated_through: Option<jiff::civil::Date>,
    /// Per ledger, the fridge's escrow grants as they stood after the change table reached
    /// each head: a grant is usable for offline orders once every other walk-up seller of the
    /// fridge (its POS) has acknowledged its downlink past that head.
    grants: HashMap<FridgeId, Vec<GrantSnapshot>>,
    /// When time next makes something due in each ledger, and the ledgers changed since it was
    /// computed: the tick visits only ledgers with something due.
    due: HashMap<FridgeId, Option<i64>>,
    dirty: std::collections::HashSet<FridgeId>,
    /// Each ledger's stock counts for the refill plan, with the (minute, next delivery) they
    /// were counted for; recounted when the ledger changed (`stock_dirty`) or the key moved.
    stock_cache: HashMap<FridgeId, StockCache>,
    stock_dirty: std::collections::HashSet<FridgeId>,
    /// Every catalog version published and when, for `price_changed`.
    catalog_history: larder_shared::catalog::CatalogHistory,
    /// The current catalog, for the MQTT task (which announces it) and the API.
    catalog_tx: watch::Sender<Arc<Catalog>>,
    /// A catalog version staged in the group, announced once committed.
    published: Option<Catalog>,
    /// Per sku, the sum of stars and the number of ratings.
    ratings: HashMap<larder_shared::Sku, (i64, u64)>,
    /// The region's live event feed, and the events the current group makes, published once
    /// it is committed.
    events: crate::events::Events,
    after_commit: Vec<crate::events::EventKind>,
}

/// A ledger's counted stock and the (minute, next delivery) it was counted for.
type StockCache = (
    (i64, i64),
    Arc<std::collections::HashMap<String, crate::subscriptions::StockCount>>,
);

/// What a group knows of its senders: their device rows as committed before the group, read
/// once each, and their stream progress as the group has moved it.
#[derive(Debug, Default)]
struct GroupDevices {
    known: HashMap<DeviceId, (DeviceRecord, Progress)>,
    progress: HashMap<DeviceId, Progress>,
    /// The devices' changes the group took, per ledger, checked one envelope after another.
    checked: BTreeMap<FridgeId, Checked>,
}

/// Groups smaller than this are prechecked on the writer thread alone.
const PRECHECK_SPLIT_MIN: usize = 64;

/// An uplink for the batch check: its place in the group, the envelope, its bytes, the
/// sender's current key and the box its body is sealed with.
type PrecheckItem<'a> = (
    usize,
    envelope::Unverified,
    &'a [u8],
    larder_shared::PublicKey,
    &'a envelope::BoxKey,
);

/// Batch-checks uplinks (see [`RegionWriter::precheck`]): answers, by the command's place in
/// its group, those that verified and opened. Many are split in two halves checked on two
/// threads.
fn precheck_items(items: Vec<PrecheckItem<'_>>) -> HashMap<usize, Prechecked> {
    if items.len() < PRECHECK_SPLIT_MIN {
        return precheck_part(items).into_iter().collect();
    }
    let mut first = items;
    let second = first.split_off(first.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(move || precheck_part(second));
        let mut found: HashMap<usize, Prechecked> = precheck_part(first).into_iter().collect();
        match other.join() {
            Ok(more) => found.extend(more),
            Err(_) => error!("a precheck thread panicked; its envelopes are checked one by one"),
        }
        found
    })
}

/// Batch-checks some of a group's uplinks (see [`precheck_items`]).
fn precheck_part(items: Vec<PrecheckItem<'_>>) -> Vec<(usize, Prechecked)> {
    let mut rest = Vec::with_capacity(items.len());
    let mut batch = Vec::with_capacity(items.len());
    for (i, opened, payload, key, device_box) in items {
        rest.push((i, key, device_box));
        batch.push((opened, payload, key));
    }
    let mut opened = Vec::new();
    for ((i, signer, device_box), verified) in rest.into_iter().zip(envelope::verify_batch(batch)) {
        if let Some(envelope) = verified.and_then(|v| v.open_sealed(&[device_box]).ok()) {
            opened.push((i, envelope, signer));
        }
    }
    // The audit head each batch of changes claims: its last entry's chain hash, computed from
    // the links the entries carry (`uplink` checks the first link against the chain it holds).
    let heads: Vec<Option<(u64, [u8; 32])>> = opened
        .iter()
        .map(|(_, envelope, _)| {
            let Body::Changes(b) = &envelope.body else {
                return None;
            };
            let Party::Device(device) = &envelope.header.sender else {
                return None;
            };
            let links = chain_links(device, b.entries.first()?.prev?, &b.entries)?;
            Some((b.entries.last()?.seq, links.last()?.hash))
        })
        .collect();
    let checks: Vec<(usize, larder_shared::audit::Head<'_>)> = opened
        .iter()
        .zip(&heads)
        .enumerate()
        .filter_map(|(k, ((_, envelope, signer), head))| {
            let (seq, hash) = head.as_ref()?;
            let Body::Changes(b) = &envelope.body else {
                return None;
            };
            let Party::Device(device) = &envelope.header.sender else {
                return None;
            };
            Some((
                k,
                larder_shared::audit::Head {
                    key: signer,
                    device,
                    seq: *seq,
                    hash,
                    sig: b.head_sig.as_deref()?,
                },
            ))
        })
        .collect();
    let verdicts =
        larder_shared::audit::verify_heads(&checks.iter().map(|(_, h)| *h).collect::<Vec<_>>());
    let mut head_ok = vec![false; opened.len()];
    for ((k, _), ok) in checks.iter().zip(verdicts) {
        head_ok[*k] = ok;
    }
    drop(checks);
    opened
        .into_iter()
        .zip(heads)
        .zip(head_ok)
        .map(|(((i, envelope, signer), head), ok)| {
            (
                i,
                Prechecked {
                    envelope,
                    signer,
                    head: head.filter(|_| ok),
                },
            )
        })
        .collect()
}

/// One entry's link in a device's audit chain.
struct ChainLink {
    prev: [u8; 32],
    hash: [u8; 32],
    /// The SHA-256 of the entry's change.
    digest: [u8; 32],
}

/// The links of `entries` continuing the device's audit chain from `head`; `None` when an
/// entry's link does not follow the one before.
fn chain_links(
    device: &DeviceId,
    mut head: [u8; 32],
    entries: &[larder_shared::envelope::Entry],
) -> Option<Vec<ChainLink>> {
    use larder_shared::audit;
    entries
        .iter()
        .map(|e| {
            if e.prev != Some(head) {
                return None;
            }
            let digest = e.change_digest()?;
            let hash = audit::entry_hash(&head, device, e.seq, &e.ledger, e.epoch, &digest);
            let link = ChainLink {
                prev: head,
                hash,
                digest,
            };
            head = hash;
            Some(link)
        })
        .collect()
}

/// Checks that new entries continue the device's audit chain from `head` and that the batch's
/// signature covers their last link (unless the group's batch check already verified that
/// signature, `verified_head`); returns their audit rows.
fn audit_rows(
    device: &DeviceId,
    key: &larder_shared::PublicKey,
    head: [u8; 32],
    entries: &[larder_shared::envelope::Entry],
    head_sig: Option<Vec<u8>>,
    verified_head: Option<(u64, [u8; 32])>,
    now: i64,
) -> Result<Vec<crate::store::AuditRow>, &'static str> {
    use larder_shared::audit;
    let links = chain_links(device, head, entries).ok_or("chain_broken")?;
    let mut rows: Vec<crate::store::AuditRow> = entries
        .iter()
        .zip(links)
        .map(|(e, link)| crate::store::AuditRow {
            device: device.clone(),
            seq: e.seq,
            ledger: e.ledger.clone(),
            epoch: e.epoch,
            prev: link.prev,
            hash: link.hash,
            change_sha256: link.digest,
            head_sig: None,
            received_at_ms: now,
        })
        .collect();
    if let Some(last) = rows.last_mut() {
        let sig = head_sig.ok_or("bad_audit_signature")?;
        if verified_head != Some((last.seq, last.hash))
            && !audit::verify_head(key, device, last.seq, &last.hash, &sig)
        {
            return Err("bad_audit_signature");
        }
        last.head_sig = Some(sig);
    }
    Ok(rows)
}

/// What a group of commands builds: its transaction, the answers waiting for its commit, and
/// the answers stored under Idempotency-Keys within it.
type InGroup<'a> = (
    &'a mut RegionBatch,
    &'a mut Vec<Pending>,
    &'a mut HashMap<String, (String, ApiAnswer)>,
);

/// A request whose Idempotency-Key was seen before (see [`RegionWriter::replay`]).
enum Replay {
    /// The same request again: its first answer.
    First(ApiAnswer),
    /// The key was used with another request.
    KeyReused,
}

/// Stores a request's answer under its Idempotency-Key, in the group's transaction.
fn remember(
    idem: Option<(String, String)>,
    answer: &ApiAnswer,
    batch: &mut RegionBatch,
    in_group: &mut HashMap<String, (String, ApiAnswer)>,
) {
    if let Some((key, hash)) = idem {
        batch
            .idempotency
            .push((key.clone(), hash.clone(), answer.0, answer.1.to_string()));
        in_group.insert(key, (hash, answer.clone()));
    }
}

/// Sends each waiting request its answer: what it staged, once `result` says the group was
/// committed, or the group's error. Counts the group's envelopes in `metrics`: accepted once
/// committed, or rejected for `storage`.
fn answer(
    pending: Vec<Pending>,
    result: Result<(), RegionError>,
    metrics: &HubMetrics,
    region: &RegionId,
) {
    let uplinks = pending
        .iter()
        .filter(|p| matches!(p, Pending::Uplink(..)))
        .count() as u64;
    if uplinks > 0 {
        if result.is_ok() {
            metrics
                .envelopes_accepted
                .get_or_create(&vec![("region", region.to_string())])
                .inc_by(uplinks);
        } else {
            metrics.rejected_by(region.as_str(), "storage", uplinks);
        }
    }
    for p in pending {
        match (p, &result) {
            (Pending::Answer(reply, answer), Ok(())) => {
                let _ = reply.send(Ok(answer));
            }
            (Pending::Answer(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
            (Pending::Uplink(reply, outcome), Ok(())) => {
                let _ = reply.send(outcome);
            }
            (Pending::Uplink(reply, _), Err(_)) => {
                let _ = reply.send(UplinkOutcome::Rejected("storage"));
            }
            (Pending::Enroll(reply, record), Ok(())) => {
                let _ = reply.send(Ok(*record));
            }
            (Pending::Enroll(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
            (Pending::Unit(reply), r) => {
                let _ = reply.send(r.clone());
            }
            (Pending::Import(reply, report), Ok(())) => {
                let _ = reply.send(Ok(report));
            }
            (Pending::Import(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Moves the downlink head up to `head` (never down: the committer and the writer both raise it).
fn raise_head(head_tx: &watch::Sender<u64>, head: u64) {
    head_tx.send_if_modified(|h| {
        let higher = head > *h;
        if higher {
            *h = head;
        }
        higher
    });
}

/// The hub's own Automerge actor (for what the hub writes into ledgers in later versions).
pub fn hub_actor() -> automerge::ActorId {
    automerge::ActorId::from(&b"\x00hub"[..])
}

impl RegionWriter {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        region: RegionId,
        store: RegionStore,
        fridges: Vec<FridgeId>,
        max_message_bytes: usize,
        sync: &crate::config::SyncConfig,
        compaction: crate::config::CompactionConfig,
        orders: crate::config::OrdersConfig,
        calendar: crate::subscriptions::Calendar,
        clock: larder_runtime::Clock,
        metrics: Arc<HubMetrics>,
        events: crate::events::Events,
        hub_key: larder_shared::SecretKey,
    ) -> Result<(Self, watch::Receiver<u64>), StoreError> {
        let generated_through = store
            .meta(META_GENERATED_THROUGH)?
            .and_then(|d| d.parse().ok());
        let provider = Box::new(larder_shared::payments::SimulatedProvider::new(
            region
                .as_str()
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
            orders.simulated_payments,
        ));
        let (group_commit_max, snapshot_every_changes) =
            (sync.group_commit_max, sync.snapshot_every_changes);
        let (head_tx, head_rx) = watch::channel(store.head()?);
        let store = store.with_clock(clock.clone());
        let mut w = Self {
            region,
            store,
            fridges,
            ledgers: BTreeMap::new(),
            max_message_bytes,
            group_commit_max,
            key_overlap_ms: i64::try_from(sync.key_overlap_seconds.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            hub_key,
            boxes: Boxes::default(),
            metrics,
            head_tx: Arc::new(head_tx),
            committer: None,
            changes_since_snapshot: HashMap::new(),
            snapshot_every_changes,
            compaction,
            compactions: Vec::new(),
            catalog: Catalog::default(),
            orders,
            clock,
            provider,
            unanswered: std::collections::HashSet::new(),
            fail_later: Vec::new(),
            calendar,
            generated_through,
            grants: HashMap::new(),
            due: HashMap::new(),
            dirty: std::collections::HashSet::new(),
            stock_cache: HashMap::new(),
            stock_dirty: std::collections::HashSet::new(),
            catalog_history: Default::default(),
            catalog_tx: watch::channel(Arc::new(Catalog::default())).0,
            published: None,
            ratings: HashMap::new(),
            events,
            after_commit: Vec::new(),
        };
        w.reload()?;
        let head = w.store.head()?;
        for (fridge, ledger) in &w.ledgers {
            w.grants
                .insert(fridge.clone(), vec![(head, ledger.granted_all())]);
        }
        Ok((w, head_rx))
    }

    /// Snapshots ledgers whose change log grew past `snapshot_every_changes`, so a restart
    /// loads a snapshot plus a short tail: when idle, or regardless once four times past it.
    /// The change rows stay: they are the downlink streams.
    fn snapshot_due(&mut self, idle: bool) {
        let due = ledger::snapshots_due(
            &self.changes_since_snapshot,
            self.snapshot_every_changes,
            idle,
        );
        if !due.is_empty() {
            self.settle();
        }
        for fridge in due {
            let Some(ledger) = self.ledgers.get(&fridge) else {
                continue;
            };
            if ledger.waits_for_dependencies() {
                continue;
            }
            match self.store.snapshot_ledger(&fridge, &ledger.save()) {
                Ok(()) => {
                    self.changes_since_snapshot.insert(fridge, 0);
                }
                Err(e) => warn!(fridge = %fridge, error = %e, "ledger snapshot failed; will retry"),
            }
        }
    }

    /// [`Self::reload`] after a failed commit or merge, logging a failure to reload.
    fn reload_logged(&mut self) {
        if let Err(e) = self.reload() {
            error!(error = %e, "reloading ledgers failed");
        }
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        self.published = None;
        // A generation whose commit failed made no orders: the next tick makes them again.
        self.generated_through = self
            .store
            .meta(META_GENERATED_THROUGH)?
            .and_then(|d| d.parse().ok());
        self.after_commit.clear();
        self.catalog_history = Default::default();
        self.load_catalogs()?;
        if let Some(json) = self.store.meta(crate::store::META_CATALOG)? {
            self.catalog =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        self.ledgers.clear();
        self.dirty.extend(self.fridges.iter().cloned());
        self.stock_dirty.extend(self.fridges.iter().cloned());
        for fridge in self.fridges.clone() {
            let (snap, changes) = self.store.load_ledger(&fridge)?;
            self.changes_since_snapshot
                .insert(fridge.clone(), changes.len());
            let ledger = Ledger::load(fridge.clone(), hub_actor(), snap.as_deref(), &changes)
                .map_err(|e| StoreError::Corrupt(format!("ledger {fridge}: {e}")))?;
            self.ledgers.insert(fridge, ledger);
        }
        Ok(())
    }

    pub fn env_seq_reserved(&self) -> Result<u64, StoreError> {
        Ok(self
            .store
            .meta(crate::store::META_ENV_SEQ_RESERVED)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Runs until [`RegionCommand::Stop`] (which the region's verifier passes on at shutdown)
    /// or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<RegionCommand>) {
        let mut stopping = false;
        while !stopping && let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < self.group_commit_max {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            stopping = group.iter().any(|c| matches!(c, RegionCommand::Stop));
            self.process(group);
            for (archive_before_ms, idem, reply) in std::mem::take(&mut self.compactions) {
                self.settle();
                let _ = reply.send(self.compact_once(archive_before_ms, idem));
            }
            // Snapshots are maintenance: done when no command waits, or when overdue.
            let idle = rx.is_empty();
            self.snapshot_due(idle);
        }
        self.settle();
        self.committer = None;
        info!(region = %self.region, "region writer stopped");
    }

    /// Waits for the import batch in flight (see [`committer`]): `false` if its commit failed;
    /// its requests were answered with the error and the ledgers reloaded from the store.
    fn settle(&mut self) -> bool {
        let Some(c) = self.committer.as_mut() else {
            return true;
        };
        match c.settle() {
            Ok(()) => true,
            Err(e) => {
                error!(region = %self.region, error = %e, "an import batch failed to commit; ledgers reloaded");
                self.reload_logged();
                false
            }
        }
    }

    /// Hands an import-only group's batch to the committer, which answers its requests once it
    /// is committed; the writer goes on to the next group meanwhile.
    fn commit_behind(&mut self, batch: RegionBatch, pending: Vec<Pending>) {
        for c in &batch.changes {
            *self
                .changes_since_snapshot
                .entry(c.ledger.clone())
                .or_default() += 1;
        }
        let events = self.events_of(&batch);
        if self.committer.is_none() {
            let started = self.store.open_again().and_then(|store| {
                committer::Committer::start(
                    store,
                    committer::Outlets {
                        region: self.region.clone(),
                        head_tx: self.head_tx.clone(),
                        events: self.events.clone(),
                        metrics: self.metrics.clone(),
                    },
                )
            });
            match started {
                Ok(c) => self.committer = Some(c),
                Err(e) => {
                    error!(region = %self.region, error = %e, "cannot start the region's committer; import batch refused");
                    self.reload_logged();
                    self.answer(pending, Err(RegionError::Storage(e.to_string())));
                    return;
                }
            }
        }
        let job = committer::Job {
            batch,
            pending,
            events,
        };
        if let Some(c) = self.committer.as_mut()
            && let Err(e) = c.commit(job)
        {
            error!(region = %self.region, error = %e, "import batch refused; ledgers reloaded");
            // The next import batch starts a new committer.
            self.committer = None;
            self.reload_logged();
        }
    }

    fn process(&mut self, group: Vec<RegionCommand>) {
        // Import batches are committed behind the writer (see `committer`); anything else
        // may read the store, so it waits for the batch in flight first. So does an import with
        // an Idempotency-Key: its retry must find the first one's answer committed.
        let import_only = group
            .iter()
            .all(|c| matches!(c, RegionCommand::ImportUnits { idem: None, .. }));
        if !import_only {
            self.settle();
        }
        let now = self.clock.now_ms();
        let mut in_group: HashMap<String, (String, ApiAnswer)> = HashMap::new();
        let mut batch = RegionBatch::default();
        let mut pending = Vec::new();
        let mut devices = GroupDevices::default();
        let mut prechecked = self.precheck(&group, &mut devices.known);
        for (i, cmd) in group.into_iter().enumerate() {
            match cmd {
                RegionCommand::Uplink {
                    topic_device,
                    payload,
                    reply,
                    pre,
                } => {
                    let pre = pre.map(|p| *p).or_else(|| prechecked.remove(&i));
                    let outcome =
                        self.uplink(&topic_device, &payload, pre, &mut devices, &mut batch, now);
                    match outcome {
                        UplinkOutcome::Rejected(reason) => {
                            self.metrics.rejected(self.region.as_str(), reason);
                            warn!(region = %self.region, device = %topic_device, reason, "envelope rejected");
                            let _ = reply.send(outcome);
                        }
                        ok => pending.push(Pending::Uplink(reply, ok)),
                    }
                }
                RegionCommand::Enroll {
                    record,
                    idem,
                    reply,
                } => match self.replay(idem.as_ref(), &in_group) {
                    Some(Replay::KeyReused) => {
                        let _ = reply.send(Err(RegionError::IdempotencyKeyReused));
                    }
                    // A retry: the device is enrolled, and the route answers as it first did.
                    Some(Replay::First(_)) => {
                        let _ =
                            reply.send(Err(RegionError::DeviceExists(record.device_id.clone())));
                    }
                    None => match self.enroll_check(&record, &batch) {
                        Ok(()) => {
                            let answer =
                                (201, serde_json::json!({ "device_id": record.device_id }));
                            remember(idem, &answer, &mut batch, &mut in_group);
                            batch.enroll.push((*record).clone());
                            pending.push(Pending::Enroll(reply, record));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
                },
                RegionCommand::Revoke { device, reply } => match self.store.device(&device) {
                    Ok(Some(_)) => {
                        batch.revoke.push((device, now));
                        pending.push(Pending::Unit(reply));
                    }
                    Ok(None) => {
                        let _ = reply.send(Err(RegionError::UnknownDevice(device)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RegionError::Storage(e.to_string())));
                    }
                },
                RegionCommand::ReserveEnvSeq { up_to, reply } => {
                    batch
                        .meta
                        .push((crate::store::META_ENV_SEQ_RESERVED, up_to.to_string()));
                    pending.push(Pending::Unit(reply));
                }
                RegionCommand::Digest { fridge, reply } => {
                    let _ = reply.send(self.ledgers.get(&fridge).map(|l| {
                        let escrow = l
                            .escrow_skus()
                            .into_iter()
                            .map(|sku| {
                                let n = l.allowance(&sku);
                                (sku.to_string(), n)
                            })
                            .collect();
                        LedgerSummary {
                            state_digest: l.state_digest(),
                            escrow,
                            incidents: l.incidents(),
                        }
                    }));
                }
                RegionCommand::Compact {
                    archive_before_ms,
                    idem,
                    reply,
                } => self.compactions.push((archive_before_ms, idem, reply)),
                RegionCommand::Order {
                    fridge,
                    order,
                    action,
                    idem,
                    reply,
                } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.order_action(fridge, order, action, b, now),
                ),
                RegionCommand::Conflicts { reply } => {
                    let list = self.ledgers.values().flat_map(Ledger::conflicts).collect();
                    let _ = reply.send(list);
                }
                RegionCommand::PutCatalog {
                    currency,
                    items,
                    base,
                    idem,
                    reply,
                } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.put_catalog(currency, items, base, b, now),
                ),
                RegionCommand::Rate {
                    rating,
                    idem,
                    reply,
                } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.rate(rating, b, now),
                ),
                RegionCommand::ImportUnits { rows, idem, reply } => {
                    match self.replay(idem.as_ref(), &in_group) {
                        Some(Replay::KeyReused) => {
                            let _ = reply.send(Err(RegionError::IdempotencyKeyReused));
                        }
                        // A retry: the first answer again.
                        Some(Replay::First((_, first))) => {
                            let _ = reply.send(serde_json::from_value(first).map_err(|e| {
                                RegionError::Storage(format!("a stored answer is unreadable: {e}"))
                            }));
                        }
                        None => {
                            let report = self.import_units(rows, &mut batch, now);
                            if idem.is_some() {
                                let answer = (200, serde_json::json!(report));
                                remember(idem, &answer, &mut batch, &mut in_group);
                            }
                            pending.push(Pending::Import(reply, report));
                        }
                    }
                }
                RegionCommand::Tick => self.tick(&mut batch, now),
                RegionCommand::StockCounts {
                    now_ms,
                    before_ms,
                    reply,
                } => {
                    let _ = reply.send(self.stock_counts(now_ms, before_ms));
                }
                RegionCommand::Subscription { op, idem, reply } => self.answer_once(
                    idem,
                    reply,
                    (&mut batch, &mut pending, &mut in_group),
                    |w, b| w.subscription_op(op, b, now),
                ),
                RegionCommand::Stop => {}
            }
        }
        if import_only && !self.settle() {
            // Loaded on top of the batch that failed: the reload undid this group too.
            self.answer(
                pending,
                Err(RegionError::Storage(
                    "an earlier import batch failed to commit; nothing of this one was stored"
                        .into(),
                )),
            );
            return;
        }
        for (device, p) in devices.progress {
            batch.progress.push((device, p, now));
        }
        if let Err(e) = self.apply_staged(&mut batch, std::mem::take(&mut devices.checked)) {
            error!(region = %self.region, error = %e, "merging the group failed; group refused, ledgers reloaded");
            self.reload_logged();
            self.answer(pending, Err(RegionError::Storage(e)));
            return;
        }
        if batch.is_empty() {
            self.answer(pending, Ok(()));
            return;
        }
        if import_only {
            self.commit_behind(batch, pending);
            return;
        }
        let started = std::time::Instant::now();
        let result = self.store.commit(&batch);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                for c in &batch.changes {
                    *self
                        .changes_since_snapshot
                        .entry(c.ledger.clone())
                        .or_default() += 1;
                }
                if !batch.changes.is_empty() {
                    self.metrics
                        .changes_merged
                        .get_or_create(&vec![("region", self.region.to_string())])
                        .inc_by(batch.changes.len() as u64);
                    match self.store.head() {
                        Ok(head) => {
                            raise_head(&self.head_tx, head);
                            let hub = ledger::hub_device();
                            let merged: std::collections::BTreeSet<FridgeId> = batch
                                .changes
                                .iter()
                                .filter(|c| c.author != hub)
                                .map(|c| c.ledger.clone())
                                .collect();
                            for fridge in merged {
                                self.snapshot_grants(&fridge, head);
                            }
                        }
                        Err(e) => error!(error = %e, "reading the change head failed"),
                    }
                }
                self.publish_events(&batch);
                self.answer(pending, Ok(()));
            }
            Err(e) => {
                error!(region = %self.region, error = %e, "region commit failed; group refused, ledgers reloaded");
                self.metrics.commit_failures.inc();
                self.reload_logged();
                self.answer(pending, Err(RegionError::Storage(e.to_string())));
            }
        }
    }

    /// [`Self::compact`], once per Idempotency-Key: a retry gets the first report, the key with
    /// another request is refused. The report is stored after the compaction's own commits, so
    /// a retry after a crash between them compacts again (which finds little left to do).
    fn compact_once(
        &mut self,
        archive_before_ms: i64,
        idem: Option<(String, String)>,
    ) -> Result<CompactionReport, RegionError> {
        match self.replay(idem.as_ref(), &HashMap::new()) {
            Some(Replay::KeyReused) => return Err(RegionError::IdempotencyKeyReused),
            Some(Replay::First((_, first))) => {
                return serde_json::from_value(first).map_err(|e| {
                    RegionError::Storage(format!("a stored answer is unreadable: {e}"))
                });
            }
            None => {}
        }
        let report = self.compact(archive_before_ms)?;
        if let Some((key, hash)) = idem {
            let answer = RegionBatch {
                idempotency: vec![(key, hash, 200, serde_json::json!(report).to_string())],
                ..RegionBatch::default()
            };
            if let Err(e) = self.store.commit(&answer) {
                warn!(region = %self.region, error = %e, "storing a compaction's answer failed; a retry compacts again");
            }
        }
        Ok(report)
    }

    /// Moves every ledger with finished records from before `archive_before_ms` onto a new
    /// epoch, announced in each replica's downlink stream; retires old epochs every active
    /// replica has acknowledged; prunes the archive and the audit log past the retention.
    fn compact(&mut self, archive_before_ms: i64) -> Result<CompactionReport, RegionError> {
        let now = self.clock.now_ms();
        let storage = |e: StoreError| RegionError::Storage(e.to_string());
        let mut report = CompactionReport::default();
        let devices = self.store.devices().map_err(storage)?;
        for fridge in self.fridges.clone() {
            let Some(ledger) = self.ledgers.get(&fridge) else {
                continue;
            };
            if ledger.waits_for_dependencies() {
                continue;
            }
            let c = ledger
                .compact(archive_before_ms)
                .map_err(|e| RegionError::Storage(format!("compacting {fridge}: {e}")))?;
            if c.archived.is_empty() {
                continue;
            }
            let rebase = larder_shared::envelope::Rebase {
                included: devices
                    .iter()
                    .filter(|(d, _)| d.fridges.contains(&fridge))
                    .map(|(d, p)| (d.device_id.clone(), p.up_hwm))
                    .collect(),
                base: c.base.clone(),
            }
            .encode();
            // The epoch's start must go whole, in one batch of its own (a rebase is never
            // withheld): bounded as `build_batch` bounds an entry.
            if rebase.len() + larder_shared::limits::ENTRY_OVERHEAD_BYTES_MAX
                > self
                    .max_message_bytes
                    .saturating_sub(envelope::ENVELOPE_OVERHEAD_BYTES_MAX + 64)
            {
                warn!(fridge = %fridge, bytes = rebase.len(), limit = self.max_message_bytes,
                    "the live ledger is too large for one message; not compacted (raise mqtt.max_message_bytes)");
                continue;
            }
            self.store
                .start_epoch(&fridge, c.epoch, &rebase, &c.base, &c.archived, now)
                .map_err(storage)?;
            let next = Ledger::load(fridge.clone(), hub_actor(), Some(&c.base), &[])
                .map_err(|e| RegionError::Storage(format!("loading {fridge}'s new epoch: {e}")))?;
            self.ledgers.insert(fridge.clone(), next);
            self.dirty.insert(fridge.clone());
            self.stock_dirty.insert(fridge.clone());
            self.changes_since_snapshot.insert(fridge.clone(), 0);
            info!(region = %self.region, fridge = %fridge, epoch = c.epoch, archived = c.archived.len(),
                live_units = c.live_units, base_bytes = c.base.len(), "ledger compacted into a new epoch");
            report.ledgers.push(LedgerCompaction {
                fridge_id: fridge,
                epoch: c.epoch,
                archived: c.archived.len(),
                live_units: c.live_units,
                live_orders: c.live_orders,
                base_bytes: c.base.len(),
            });
        }
        if !report.ledgers.is_empty() {
            let head = self.store.head().map_err(storage)?;
            raise_head(&self.head_tx, head);
        }
        let active_since = now - (self.compaction.dormant_after_seconds as i64) * 1000;
        for fridge in &self.fridges {
            report.retired_rows += self
                .store
                .retire_epochs(fridge, active_since)
                .map_err(storage)?;
        }
        let keep_since = now - (self.compaction.retention_days as i64) * 86_400_000;
        // Stored answers are stamped with the store's clock, this writer's (`RegionStore::commit`).
        let answers_since = now - (self.compaction.idempotency_retention_hours as i64) * 3_600_000;
        let pruned = self
            .store
            .prune(keep_since, answers_since)
            .map_err(storage)?;
        (
            report.pruned_archive,
            report.pruned_audit,
            report.pruned_answers,
        ) = (pruned.archived, pruned.audit, pruned.answers);
        let labels = vec![("region", self.region.to_string())];
        self.metrics
            .ledgers_compacted
            .get_or_create(&labels)
            .inc_by(report.ledgers.len() as u64);
        self.metrics
            .records_archived
            .get_or_create(&labels)
            .inc_by(report.ledgers.iter().map(|l| l.archived as u64).sum());
        self.metrics
            .epoch_rows_retired
            .get_or_create(&labels)
            .inc_by(report.retired_rows as u64);
        Ok(report)
    }

    /// Answers an API request once: a retry (the same Idempotency-Key and request) gets the
    /// stored answer and changes nothing; a new request runs `act`, whose answer is stored with
    /// the group's transaction and sent once it is committed. `Err` answers change nothing and
    /// go at once.
    fn answer_once(
        &mut self,
        idem: Option<(String, String)>,
        reply: Reply<ApiAnswer>,
        (batch, pending, in_group): InGroup<'_>,
        act: impl FnOnce(&mut Self, &mut RegionBatch) -> Result<ApiAnswer, ApiAnswer>,
    ) {
        match self.replay(idem.as_ref(), in_group) {
            Some(Replay::First(answer)) => {
                let _ = reply.send(Ok(answer));
                return;
            }
            Some(Replay::KeyReused) => {
                let _ = reply.send(Ok(error_answer(
                    409,
                    "idempotency_key_reused",
                    RegionError::IdempotencyKeyReused,
                )));
                return;
            }
            None => {}
        }
        match act(self, batch) {
            Ok(answer) => {
                remember(idem, &answer, batch, in_group);
                pending.push(Pending::Answer(reply, answer));
            }
            Err(answer) => {
                let _ = reply.send(Ok(answer));
            }
        }
    }

    /// What a request with an Idempotency-Key (and request hash) was answered before: `None`
    /// for a new request.
    fn replay(
        &self,
        idem: Option<&(String, String)>,
        in_group: &HashMap<String, (String, ApiAnswer)>,
    ) -> Option<Replay> {
        let (key, hash) = idem?;
        let (h, status, body) = match in_group.get(key) {
            Some((h, a)) => (h.clone(), a.0, a.1.to_string()),
            None => self.store.idempotency(key).ok()??,
        };
        Some(if &h == hash {
            Replay::First((status, serde_json::from_str(&body).unwrap_or_default()))
        } else {
            Replay::KeyReused
        })
    }

    /// Publishes what a committed group changed on the region's event feed, and announces a
    /// catalog version it published.
    fn publish_events(&mut self, batch: &RegionBatch) {
        use crate::events::EventKind;
        if let Some(catalog) = self.published.take() {
            let version = catalog.version;
            self.catalog_tx.send_replace(Arc::new(catalog));
            self.after_commit.push(EventKind::Catalog { version });
        }
        for kind in self.events_of(batch) {
            self.events.publish(kind);
        }
    }

    /// The events a batch makes once committed: stock moves per fridge, orders, and what the
    /// group noted for after its commit.
    fn events_of(&mut self, batch: &RegionBatch) -> Vec<crate::events::EventKind> {
        use crate::events::{EventKind, StockMove};
        let mut stock: BTreeMap<&FridgeId, Vec<StockMove>> = BTreeMap::new();
        for (fridge, unit) in &batch.units {
            stock.entry(fridge).or_default().push(unit.into());
        }
        let mut events: Vec<EventKind> = stock
            .into_iter()
            .map(|(fridge, units)| EventKind::Stock {
                fridge_id: fridge.clone(),
                units,
            })
            .collect();
        events.extend(batch.orders.iter().map(EventKind::for_order));
        events.append(&mut self.after_commit);
        events
    }

    /// The current catalog, as it changes.
    pub fn catalog_watch(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog_tx.subscribe()
    }

    fn answer(&self, pending: Vec<Pending>, result: Result<(), RegionError>) {
        answer(pending, result, &self.metrics, &self.region);
    }

    fn enroll_check(&self, record: &DeviceRecord, batch: &RegionBatch) -> Result<(), RegionError> {
        if record.device_id == ledger::hub_device() {
            return Err(RegionError::Invalid(
                "the device id hub names the hub's own writes; choose another".into(),
            ));
        }
        record
            .device_id
            .check_enrollable()
            .map_err(|e| RegionError::Invalid(e.to_string()))?;
        for f in &record.fridges {
            if !self.fridges.contains(f) {
                return Err(RegionError::UnknownFridge(f.clone()));
            }
        }
        match (record.role, record.fridges.len()) {
            (larder_shared::domain::Role::Fridge, 1) | (larder_shared::domain::Role::Pos, 1..) => {}
            _ => {
                return Err(RegionError::Invalid(
                    "a fridge device serves exactly one fridge, a POS at least one".into(),
                ));
            }
        }
        let exists = self
            .store
            .device(&record.device_id)
            .map_err(|e| RegionError::Storage(e.to_string()))?
            .is_some()
            || batch.enroll.iter().any(|d| d.device_id == record.device_id);
        if exists {
            return Err(RegionError::DeviceExists(record.device_id.clone()));
        }
        // Checked after `exists`: an enrolled device's own sales are in its namespace.
        if let Some(order) = self
            .store
            .order_in_namespace(&record.device_id)
            .map_err(|e| RegionError::Storage(e.to_string()))?
        {
            return Err(RegionError::Invalid(namespace_taken(
                &record.device_id,
                &order,
            )));
        }
        Ok(())
    }

    /// The box for a device's key: what its uplink bodies are sealed with.
    /// Checks the signatures of a group's uplinks all at once, under each sender's current
    /// key: the envelopes' signatures in one Ed25519 batch, then the audit heads they carry in
    /// another (a third of the cost of checking each alone, see `keys::verify_batch`). A large
    /// group is split in two halves checked on two threads.
    ///
    /// Uplinks the region's [`verifier`] already checked are not checked again.
    ///
    /// This only saves [`RegionWriter::uplink`] its signature work: `uplink` still decides
    /// every envelope by every rule, and checks one by one whatever is not here (a retired
    /// key's envelope, a forgery, a broken chain). Answers, by the command's place in the
    /// group, the envelopes that verified and opened; `known` gets each sender's device row,
    /// read once for the group (the group's own enrollments and revocations are committed with
    /// it, so they cannot change what these reads answer).
    fn precheck(
        &mut self,
        group: &[RegionCommand],
        known: &mut HashMap<DeviceId, (DeviceRecord, Progress)>,
    ) -> HashMap<usize, Prechecked> {
        let mut candidates = Vec::new();
        for (i, cmd) in group.iter().enumerate() {
            let RegionCommand::Uplink {
                topic_device,
                payload,
                pre,
                ..
            } = cmd
            else {
                continue;
            };
            if !known.contains_key(topic_device) {
                let Ok(Some(row)) = self.store.device(topic_device) else {
                    continue;
                };
                known.insert(topic_device.clone(), row);
            }
            if pre.is_some() {
                continue;
            }
            let Ok(opened) = envelope::open(payload, self.max_message_bytes) else {
                continue;
            };
            if !matches!(&opened.header().sender, Party::Device(d) if d == topic_device) {
                continue;
            }
            let Some((record, _)) = known.get(topic_device) else {
                continue;
            };
            if record.revoked_at_ms.is_none() {
                candidates.push((i, opened, payload.as_ref(), record.public_key));
            }
        }
        self.boxes.make_room(candidates.len());
        for (_, _, _, key) in &candidates {
            self.boxes.get_or_make(&self.hub_key, *key);
        }
        let boxes = &self.boxes;
        let items: Vec<PrecheckItem<'_>> = candidates
            .into_iter()
            .filter_map(|(i, opened, payload, key)| {
                Some((i, opened, payload, key, boxes.get(&key)?))
            })
            .collect();
        precheck_items(items)
    }

    /// Checks and stages one envelope from a device's `up` topic; `pre` is what the group's
    /// batch check found of it.
    fn uplink(
        &mut self,
        topic_device: &DeviceId,
        payload: &[u8],
        pre: Option<Prechecked>,
        devices: &mut GroupDevices,
        batch: &mut RegionBatch,
        now: i64,
    ) -> UplinkOutcome {
        let reject = |r: Rejection| UplinkOutcome::Rejected(r.reason());
        let opened = match admission::check_header(
            payload,
            self.max_message_bytes,
            &self.region,
            topic_device,
        ) {
            Ok(o) => o,
            Err(r) => return reject(r),
        };
        let h = opened.header().clone();
        let sender = topic_device;
        let (record, stored) = match devices.known.get(sender) {
            Some(d) => d.clone(),
            None => match self.store.device(sender) {
                Ok(Some(d)) => d,
                Ok(None) => return reject(Rejection::UnknownDevice),
                Err(_) => return UplinkOutcome::Rejected("storage"),
            },
        };
        let device = admission::Device {
            id: sender,
            fridges: &record.fridges,
            revoked: record.revoked_at_ms.is_some(),
            key: record.public_key,
        };
        if let Err(r) = admission::check_device(Some(&device)) {
            return reject(r);
        }
        // The current key, then any key a rotation retired that is inside its overlap window:
        // those are read only when the batch check did not find the current key's signature.
        let mut keys = vec![record.public_key];
        if pre.as_ref().is_none_or(|p| p.signer != record.public_key)
            && let Ok(retired) = self.store.retired_keys(sender, now)
        {
            keys.extend(retired);
        }
        let (env, signer, verified_head) = match pre.filter(|p| keys.contains(&p.signer)) {
            Some(p) => (p.envelope, p.signer, p.head),
            None => match admission::verify_and_open(opened, payload, &keys, |k| {
                device_box(&mut self.boxes, &self.hub_key, *k)
            }) {
                Ok((env, signer)) => (env, signer, None),
                Err(r) => return reject(r),
            },
        };
        let mut p = *devices.progress.get(sender).unwrap_or(&stored);
        let state = RegionState {
            ledgers: &self.ledgers,
            head: *self.head_tx.borrow(),
        };
        let admitted = match admission::admit_body(
            env.body,
            h.seq,
            &device,
            &signer,
            &self.region,
            &state,
            &mut p,
        ) {
            Ok(a) => a,
            Err(r) => return reject(r),
        };
        let outcome = match admitted {
            Admitted::Changes {
                receipt,
                mut receiver,
                head_sig,
            } => {
                let gap = match receipt {
                    Receipt::Apply { entries, up_to } => {
                        let audit = match audit_rows(
                            sender,
                            &signer,
                            p.chain_head,
                            &entries,
                            head_sig,
                            verified_head,
                            now,
                        ) {
                            Ok(rows) => rows,
                            Err(reason) => return UplinkOutcome::Rejected(reason),
                        };
                        let (withheld, entries): (Vec<_>, Vec<_>) = entries
                            .into_iter()
                            .partition(|e| e.kind == EntryKind::Withheld);
                        for e in &withheld {
                            error!(region = %self.region, device = %sender, seq = e.seq, ledger = %e.ledger,
                                "the device withheld a change too large to send; its audit link is kept, the change is not merged");
                            self.metrics.withheld(self.region.as_str(), "up");
                        }
                        if let Err(reason) =
                            self.merge(sender, entries, &mut devices.checked, batch)
                        {
                            return UplinkOutcome::Rejected(reason);
                        }
                        if let Some(last) = audit.last() {
                            p.chain_head = last.hash;
                        }
                        batch.audit.extend(audit);
                        receiver.on_committed(up_to);
                        false
                    }
                    Receipt::Gap => true,
                    // A duplicate changes nothing (a malformed batch was refused above).
                    Receipt::Duplicate | Receipt::Malformed => false,
                };
                p.up_hwm = receiver.hwm();
                UplinkOutcome::Ack(receiver.ack(gap))
            }
            Admitted::DownAcked(up_to) => UplinkOutcome::DownAcked(up_to),
            Admitted::KeyRotation {
                new_key,
                again: true,
            } => UplinkOutcome::KeyRotated(new_key),
            Admitted::KeyRotation { new_key, .. } => {
                if batch.key_rotations.iter().any(|k| &k.device == sender) {
                    // One rotation per device per group: the next waits for this one's commit.
                    return UplinkOutcome::Rejected("rotation_in_progress");
                }
                info!(device = %sender, key = %new_key, "device key rotated");
                batch.key_rotations.push(crate::store::KeyRotationRow {
                    device: sender.clone(),
                    old: signer,
                    new: new_key,
                    at_ms: now,
                    old_until_ms: now.saturating_add(self.key_overlap_ms),
                });
                UplinkOutcome::KeyRotated(new_key)
            }
        };
        devices.progress.insert(sender.clone(), p);
        outcome
    }

    /// Stages accepted entries as change rows; they are merged into the ledgers once per
    /// group by [`RegionWriter::apply_staged`].
    fn merge(
        &mut self,
        author: &DeviceId,
        entries: Vec<larder_shared::envelope::Entry>,
        checked: &mut BTreeMap<FridgeId, Checked>,
        batch: &mut RegionBatch,
    ) -> Result<(), &'static str> {
        if entries
            .iter()
            .any(|e| !self.ledgers.contains_key(&e.ledger))
        {
            return Err("foreign_ledger");
        }
        // Each ledger's changes are checked on top of what the group took before them, so a
        // change Automerge or the ledger would refuse costs its own envelope, not the group.
        let mut by_ledger: BTreeMap<&FridgeId, Vec<Vec<u8>>> = BTreeMap::new();
        for e in &entries {
            by_ledger
                .entry(&e.ledger)
                .or_default()
                .push(e.change.clone());
        }
        let mut pieces = Vec::with_capacity(by_ledger.len());
        for (fridge, changes) in by_ledger {
            let before = checked.get(fridge);
            let piece = self
                .ledgers
                .get(fridge)
                .ok_or("foreign_ledger")?
                .check_changes(&changes, before.unwrap_or(&Checked::default()))
                .map_err(|e| {
                    warn!(region = %self.region, device = %author, ledger = %fridge, error = %e, "change refused");
                    "malformed"
                })?;
            pieces.push((fridge.clone(), piece));
        }
        for (fridge, piece) in pieces {
            checked.entry(fridge).or_default().extend(piece);
        }
        for e in entries {
            let hash: [u8; 32] = sha2::Sha256::digest(&e.change).into();
            batch.changes.push(StoredChange {
                ledger: e.ledger,
                author: author.clone(),
                epoch: e.epoch,
                hash,
                bytes: e.change,
            });
        }
        Ok(())
    }

    /// Merges every change staged in the group into its ledger with one Automerge apply per
    /// ledger (an apply walks the maps it touches, so one per group rather than one per
    /// envelope), and stages the projection rows.
    fn apply_staged(
        &mut self,
        batch: &mut RegionBatch,
        by_ledger: BTreeMap<FridgeId, Checked>,
    ) -> Result<(), String> {
        let hub = ledger::hub_device();
        let mut authors: BTreeMap<FridgeId, std::collections::BTreeSet<DeviceId>> = BTreeMap::new();
        for c in &batch.changes {
            // The hub's own changes are in its ledgers already.
            if c.author == hub {
                continue;
            }
            authors
                .entry(c.ledger.clone())
                .or_default()
                .insert(c.author.clone());
        }
        let now = self.clock.now_ms();
        self.dirty.extend(by_ledger.keys().cloned());
        self.stock_dirty.extend(by_ledger.keys().cloned());
        for (fridge, changes) in by_ledger {
            let ledger = self
                .ledgers
                .get_mut(&fridge)
                .ok_or_else(|| format!("no ledger {fridge}"))?;
            let touched: Touched = ledger.apply_checked(changes).map_err(|e| e.to_string())?;
            for unit in &touched.units {
                if let Some(v) = ledger.unit(unit, i64::MIN) {
                    batch.units.push((fridge.clone(), v));
                }
            }
            for order in &touched.orders {
                if let Some(v) = ledger.order(order) {
                    batch.orders.push(v);
                }
            }
            let fridge_online = authors.get(&fridge).is_some_and(|a| {
                a.iter().any(|d| {
                    matches!(self.store.device(d), Ok(Some((r, _))) if r.role == larder_shared::domain::Role::Fridge)
                })
            });
            self.after_merge(&fridge, &touched, fridge_online, batch, now)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// What the hub does after merging a ledger's changes from devices: moves reservations
    /// whose units left, records the conflicts the merge revealed (one record each), and
    /// hands back escrow above the target of a fridge that is online (it just sent).
    fn after_merge(
        &mut self,
        fridge: &FridgeId,
        touched: &Touched,
        fridge_online: bool,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<(), larder_shared::ledger::LedgerError> {
        let Some(ledger) = self.ledgers.get_mut(fridge) else {
            return Ok(());
        };
        let (changes, found) =
            ledger.hub_after_merge(touched, fridge_online, Some(&self.catalog_history), now)?;
        for c in &found {
            self.after_commit.push(crate::events::EventKind::Conflict {
                conflict: c.clone(),
            });
            self.metrics
                .conflicts
                .get_or_create(&vec![
                    ("region", self.region.to_string()),
                    ("kind", c.kind.as_str().to_owned()),
                ])
                .inc();
        }
        for c in changes {
            self.hub_change(fridge, c, batch);
        }
        Ok(())
    }

    /// Stages a change the hub made to a ledger: a row of the change table (so it reaches
    /// every replica through its downlink stream) and the projection rows it touched.
    fn hub_change(
        &mut self,
        fridge: &FridgeId,
        change: larder_shared::ledger::LocalChange,
        batch: &mut RegionBatch,
    ) {
        self.dirty.insert(fridge.clone());
        self.stock_dirty.insert(fridge.clone());
        let epoch = self.ledgers.get(fridge).map_or(0, Ledger::epoch);
        for bytes in change.changes {
            batch.changes.push(StoredChange {
                ledger: fridge.clone(),
                author: ledger::hub_device(),
                epoch,
                hash: sha2::Sha256::digest(&bytes).into(),
                bytes,
            });
        }
        batch
            .units
            .extend(change.units.into_iter().map(|u| (fridge.clone(), u)));
        batch.orders.extend(change.orders);
    }

    /// An order id is one order in the whole region: none of its ledgers, nor the projection
    /// (archived orders too), holds it.
    fn check_order_id_free(&self, id: &larder_shared::OrderId) -> Result<(), ApiAnswer> {
        let in_store = self.store.order_exists(id.as_str()).map_err(|e| {
            error!(region = %self.region, error = %e, "reading orders failed");
            error_answer(503, "storage_unavailable", e)
        })?;
        if in_store || self.ledgers.values().any(|l| l.has_order(id)) {
            return Err(error_answer(
                409,
                "order_exists",
                format!("order {id} already exists in region {}", self.region),
            ));
        }
        Ok(())
    }

    /// Carries out an order action; `Err` is an answer for a request that changed nothing.
    fn order_action(
        &mut self,
        fridge: Option<FridgeId>,
        order: Option<larder_shared::OrderId>,
        action: OrderAction,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<ApiAnswer, ApiAnswer> {
        let policy = self.orders.policy();
        let fridge = match (&action, fridge) {
            (OrderAction::Resolve { conflict_id, .. }, _) => self
                .ledgers
                .iter()
                .find(|(_, l)| l.conflict(conflict_id).is_some())
                .map(|(f, _)| f.clone())
                .ok_or_else(|| {
                    error_answer(
                        404,
                        "unknown_conflict",
                        format!("no conflict {conflict_id} in this region"),
                    )
                })?,
            (_, Some(f)) => f,
            (_, None) => return Err(error_answer(422, "invalid_request", "no fridge given")),
        };
        let usable = match &action {
            OrderAction::Place {
                fridge_online: false,
                ..
            } => Some(self.usable_grants(&fridge)),
            _ => None,
        };
        if let OrderAction::Place { order, .. } = &action {
            self.check_order_id_free(&order.order_id)?;
        }
        let ledger = self.ledgers.get_mut(&fridge).ok_or_else(|| {
            error_answer(404, "unknown_fridge", format!("no fridge {fridge} here"))
        })?;
        let no_order = || error_answer(404, "unknown_order", "no such order");
        let (change, answer) = match action {
            OrderAction::Place { order, .. } => {
                let (change, view) = ledger
                    .place_order(&order, &self.catalog, usable.as_ref(), &policy, now)
                    .map_err(|e| ledger_error_answer(&e))?;
                (Some(change), (201, serde_json::json!(view)))
            }
            OrderAction::Cancel => {
                let order = order.ok_or_else(no_order)?;
                let (change, outcome) = ledger
                    .cancel(&order, &ledger::hub_device(), &policy, now)
                    .map_err(|e| ledger_error_answer(&e))?;
                let answer = match outcome {
                    ledger::CancelOutcome::Done(_) => {
                        (200, serde_json::json!(ledger.order(&order)))
                    }
                    ledger::CancelOutcome::Rejected(code, why) => error_answer(409, code, why),
                };
                (change, answer)
            }
            OrderAction::Dispatch => {
                let order = order.ok_or_else(no_order)?;
                let change = ledger
                    .dispatch(&order, now)
                    .map_err(|e| ledger_error_answer(&e))?;
                (Some(change), (200, serde_json::json!(ledger.order(&order))))
            }
            OrderAction::Payment(outcome) => {
                let order = order.ok_or_else(no_order)?;
                let change = ledger
                    .record_payment(&order, outcome, &policy, now)
                    .map_err(|e| ledger_error_answer(&e))?;
                (Some(change), (200, serde_json::json!(ledger.order(&order))))
            }
            OrderAction::Resolve {
                conflict_id,
                mut resolution,
            } => {
                resolution.at_ms = now;
                let (change, view) = ledger
                    .resolve(&conflict_id, &resolution, now)
                    .map_err(|e| ledger_error_answer(&e))?;
                (Some(change), (200, serde_json::json!(view)))
            }
        };
        if let Some(change) = change {
            self.hub_change(&fridge, change, batch);
        }
        Ok(answer)
    }

    /// Every ledger's stock counts, recounting only ledgers that changed since they were last
    /// counted for this minute and this next delivery.
    fn stock_counts(
        &mut self,
        now_ms: i64,
        before_ms: i64,
    ) -> crate::subscriptions::PerFridge<crate::subscriptions::StockCount> {
        let key = (now_ms / 60_000, before_ms);
        let dirty = std::mem::take(&mut self.stock_dirty);
        let mut out = crate::subscriptions::PerFridge::new();
        for (f, l) in &self.ledgers {
            let fresh =
                !dirty.contains(f) && self.stock_cache.get(f).is_some_and(|(k, _)| *k == key);
            if !fresh {
                let counts = l
                    .stock_counts(key.0 * 60_000, before_ms)
                    .into_iter()
                    .map(|(sku, (on_hand, reserved, expiring))| {
                        let c = crate::subscriptions::StockCount {
                            on_hand,
                            reserved,
                            expiring,
                        };
                        (sku.to_string(), c)
                    })
                    .collect();
                self.stock_cache.insert(f.clone(), (key, Arc::new(counts)));
            }
            if let Some((_, counts)) = self.stock_cache.get(f) {
                out.insert(f.clone(), counts.clone());
            }
        }
        out
    }

    /// Records the fridge's grants as of `head`, if they changed.
    fn snapshot_grants(&mut self, fridge: &FridgeId, head: u64) {
        let Some(ledger) = self.ledgers.get(fridge) else {
            return;
        };
        let now = ledger.granted_all();
        let list = self.grants.entry(fridge.clone()).or_default();
        if list.last().is_none_or(|(_, g)| g != &now) {
            list.push((head, now));
        }
    }

    /// The grants of a fridge every other walk-up seller (its POS) has received: the newest
    /// snapshot at or below the lowest downlink acknowledgement among them.
    fn usable_grants(&mut self, fridge: &FridgeId) -> BTreeMap<larder_shared::Sku, i64> {
        let min_acked = match self.store.devices() {
            Ok(devices) => devices
                .iter()
                .filter(|(d, _)| {
                    d.revoked_at_ms.is_none()
                        && d.role != larder_shared::domain::Role::Fridge
                        && d.fridges.contains(fridge)
                })
                .map(|(_, p)| p.down_acked)
                .min()
                .unwrap_or(u64::MAX),
            Err(_) => 0,
        };
        let Some(list) = self.grants.get_mut(fridge) else {
            return BTreeMap::new();
        };
        let Some(i) = list.iter().rposition(|(head, _)| *head <= min_acked) else {
            return BTreeMap::new();
        };
        list.drain(..i);
        list.first().map(|(_, g)| g.clone()).unwrap_or_default()
    }

    /// Creates, ends or skips; `Err` is an answer for a request that changed nothing.
    fn subscription_op(
        &mut self,
        op: SubscriptionOp,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<ApiAnswer, ApiAnswer> {
        let storage = |e: StoreError| error_answer(503, "storage_unavailable", e);
        // As this group left it: created or ended earlier in the group, or as stored.
        let find = |store: &RegionStore,
                    staged: &[crate::subscriptions::Subscription],
                    id: &str|
         -> Result<crate::subscriptions::Subscription, ApiAnswer> {
            if let Some(s) = staged.iter().rev().find(|s| s.subscription_id == id) {
                return Ok(s.clone());
            }
            store
                .subscriptions()
                .map_err(storage)?
                .into_iter()
                .find(|s| s.subscription_id == id)
                .ok_or_else(|| {
                    error_answer(404, "unknown_subscription", format!("no subscription {id}"))
                })
        };
        match op {
            SubscriptionOp::Create(sub) => {
                if !self.ledgers.contains_key(&sub.fridge_id) {
                    return Err(error_answer(
                        404,
                        "unknown_fridge",
                        format!("no fridge {} here", sub.fridge_id),
                    ));
                }
                for l in &sub.lines {
                    if self.catalog.item(&l.sku).is_none() {
                        return Err(error_answer(
                            422,
                            "unknown_sku",
                            format!("sku {} is not in the catalog", l.sku),
                        ));
                    }
                }
                batch.subscriptions.push((*sub).clone());
                Ok((201, serde_json::json!(sub)))
            }
            SubscriptionOp::End { id } => {
                let mut sub = find(&self.store, &batch.subscriptions, &id)?;
                if sub.ended_at_ms.is_none() {
                    sub.ended_at_ms = Some(now);
                    batch.subscriptions.push(sub.clone());
                }
                Ok((200, serde_json::json!(sub)))
            }
            SubscriptionOp::Skip { id, date } => {
                let sub = find(&self.store, &batch.subscriptions, &id)?;
                if !sub.occurs_on(date) {
                    return Err(error_answer(
                        422,
                        "no_occurrence",
                        format!("subscription {id} has no meal on {date}"),
                    ));
                }
                if self.generated_through.is_some_and(|g| date <= g) {
                    return Err(error_answer(
                        409,
                        "past_cutoff",
                        format!("the cut-off for {date} has passed: the meal is already an order"),
                    ));
                }
                batch.skips.push((id.clone(), date.to_string()));
                Ok((
                    200,
                    serde_json::json!({"subscription_id": id, "date": date.to_string(), "cancelled": true}),
                ))
            }
        }
    }

    /// At the cut-off, the next day's subscription occurrences become orders (once each: the
    /// order id is the subscription's and the date's).
    fn generate_subscription_orders(&mut self, batch: &mut RegionBatch, now: i64) {
        let target = self.calendar.generated_through(now);
        if self.generated_through.is_some_and(|g| g >= target) {
            return;
        }
        let today = self.calendar.date(now);
        let mut date = match self.generated_through {
            Some(g) => g.tomorrow().unwrap_or(target).max(today),
            None => target,
        };
        let mut subs = match self.store.subscriptions() {
            Ok(s) => s,
            Err(e) => {
                warn!(region = %self.region, error = %e, "reading subscriptions failed; will retry");
                return;
            }
        };
        // Subscriptions created or ended, and meals skipped, earlier in this group are not in
        // the store yet: they count as if they were.
        for staged in &batch.subscriptions {
            match subs
                .iter_mut()
                .find(|s| s.subscription_id == staged.subscription_id)
            {
                Some(s) => *s = staged.clone(),
                None => subs.push(staged.clone()),
            }
        }
        let mut changes = Vec::new();
        while date <= target {
            let day = date.to_string();
            let mut skipped = self.store.skipped_on(&day).unwrap_or_default();
            skipped.extend(
                batch
                    .skips
                    .iter()
                    .filter(|(_, d)| *d == day)
                    .map(|(id, _)| id.clone()),
            );
            for sub in subs
                .iter()
                .filter(|s| s.ended_at_ms.is_none() && s.occurs_on(date))
            {
                if skipped.contains(&sub.subscription_id) {
                    continue;
                }
                let Ok(order_id) = larder_shared::OrderId::new(sub.order_id(date)) else {
                    continue;
                };
                let order = larder_shared::domain::AppOrder {
                    order_id,
                    customer_id: sub.customer_id.clone(),
                    channel: larder_shared::domain::Channel::Subscription,
                    lines: sub.lines.clone(),
                    subscription_id: Some(sub.subscription_id.clone()),
                };
                if !self.ledgers.contains_key(&sub.fridge_id) {
                    continue;
                }
                match schedule_occurrence(
                    &mut self.ledgers,
                    &sub.fridge_id,
                    order,
                    &date,
                    &self.catalog,
                    now,
                ) {
                    Ok(Some(c)) => changes.push((sub.fridge_id.clone(), c)),
                    Ok(None) => {}
                    Err(e) => {
                        warn!(subscription = %sub.subscription_id, error = %e, "scheduling an occurrence failed")
                    }
                }
            }
            let Ok(next) = date.tomorrow() else { break };
            date = next;
        }
        for (fridge, c) in changes {
            self.hub_change(&fridge, c, batch);
        }
        batch
            .meta
            .push((META_GENERATED_THROUGH, target.to_string()));
        self.generated_through = Some(target);
        info!(region = %self.region, through = %target, "subscription occurrences made into orders");
    }

    /// Applies what time has made due in every ledger.
    fn tick(&mut self, batch: &mut RegionBatch, now: i64) {
        self.generate_subscription_orders(batch, now);
        use larder_shared::payments::CaptureResult;
        let policy = self.orders.policy();
        let simulated =
            self.orders.payment_provider == crate::config::PaymentProviderMode::Simulated;
        let fail_after = (self.orders.fail_later_after_seconds * 1000) as i64;
        let mut changes = Vec::new();
        let mut transitions: Vec<&'static str> = Vec::new();
        let due_failures: Vec<(FridgeId, larder_shared::OrderId)> = {
            let (due, later): (Vec<_>, Vec<_>) =
                self.fail_later.drain(..).partition(|(at, _, _)| *at <= now);
            self.fail_later = later;
            due.into_iter().map(|(_, f, o)| (f, o)).collect()
        };
        for f in std::mem::take(&mut self.dirty) {
            if let Some(l) = self.ledgers.get(&f) {
                let unanswered = &self.unanswered;
                self.due.insert(
                    f,
                    l.next_due_with(&policy, simulated, &|o| unanswered.contains(o)),
                );
            }
        }
        let visit: std::collections::BTreeSet<FridgeId> = self
            .due
            .iter()
            .filter(|(_, d)| d.is_some_and(|d| d <= now))
            .map(|(f, _)| f.clone())
            .chain(due_failures.iter().map(|(f, _)| f.clone()))
            .collect();
        for (fridge, ledger) in self.ledgers.iter_mut().filter(|(f, _)| visit.contains(*f)) {
            let mut result: Result<(), larder_shared::ledger::LedgerError> = Ok(());
            if simulated {
                for (o, record, status, _) in ledger.holding_orders() {
                    if status != larder_shared::domain::OrderStatus::Reserved
                        || record.channel != larder_shared::domain::Channel::App
                        || now < ledger::grace_end(&record, &policy)
                        || self.unanswered.contains(&o)
                    {
                        continue;
                    }
                    let outcome = match self.provider.capture(
                        &o,
                        record.total_minor,
                        &record.payment.currency,
                    ) {
                        CaptureResult::Captured => ledger::PaymentOutcome::Captured,
                        CaptureResult::Refused => ledger::PaymentOutcome::Refused,
                        CaptureResult::NoAnswer => {
                            self.unanswered.insert(o);
                            continue;
                        }
                        CaptureResult::CapturedThenFails => {
                            self.fail_later
                                .push((now + fail_after, fridge.clone(), o.clone()));
                            ledger::PaymentOutcome::Captured
                        }
                    };
                    match ledger.record_payment(&o, outcome, &policy, now) {
                        Ok(c) => {
                            let status = match outcome {
                                ledger::PaymentOutcome::Captured => "available_for_picking",
                                ledger::PaymentOutcome::Refused => "payment_refused",
                            };
                            transitions.push(status);
                            changes.push((fridge.clone(), c));
                        }
                        Err(e) => result = Err(e),
                    }
                }
            }
            for (o, status, note) in ledger.due_transitions(&policy, now) {
                self.unanswered.remove(&o);
                match ledger.add_event(&o, status, Some(note), &ledger::hub_device(), now) {
                    Ok(c) => {
                        transitions.push(status.as_str());
                        changes.push((fridge.clone(), c));
                    }
                    Err(e) => result = Err(e),
                }
            }
            for (f, o) in due_failures.iter().filter(|(f, _)| f == fridge) {
                match ledger.add_event(
                    o,
                    larder_shared::domain::OrderStatus::PaymentFailedAfterSale,
                    Some("the payment provider reported the capture failed".into()),
                    &ledger::hub_device(),
                    now,
                ) {
                    Ok(c) => changes.push((f.clone(), c)),
                    Err(e) => result = Err(e),
                }
            }
            match ledger.repair_reservations(now) {
                Ok(Some(c)) => changes.push((fridge.clone(), c)),
                Ok(None) => {}
                Err(e) => result = Err(e),
            }
            if let Err(e) = result {
                warn!(region = %self.region, fridge = %fridge, error = %e, "applying due transitions failed");
            }
        }
        self.dirty.extend(visit);
        for status in transitions {
            if status != "available_for_picking" {
                info!(region = %self.region, status, "an app order was released");
            }
            self.metrics
                .order_transitions
                .get_or_create(&vec![
                    ("region", self.region.to_string()),
                    ("status", status.to_owned()),
                ])
                .inc();
        }
        for (fridge, c) in changes {
            self.hub_change(&fridge, c, batch);
        }
    }
}
