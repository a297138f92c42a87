//! The agent's local HTTP API for fridge firmware and the POS app (docs/PROTOCOL.md): JSON in and
//! out, errors as `{"error": {"code", "message"}}`, `Idempotency-Key` on every POST, and a 2xx
//! only after the change is durable on disk.

mod guard;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jiff::Timestamp;
use larder_shared::domain::{
    DoorSession, Payment, Refill, RefillUnit, RemovalReason, Role, SaleLine,
};
use larder_shared::{DeviceId, FridgeId, OrderId, RegionId, Sku, UnitId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use larder_runtime::http::{
    ApiError, ApiPath, ApiQuery, body_bytes, count_into, idempotency, parse_body,
    with_contract_fallbacks,
};

use crate::metrics::Shared;
use crate::store::ReadPool;
use crate::writer::{self, Action, Command, CommandError, Idem, Outcome};

/// Most orders one listing returns.
pub(crate) const ORDER_LIST_MAX: u32 = 500;

/// What every handler needs.
#[derive(Debug, Clone)]
pub(crate) struct ApiState {
    pub device_id: DeviceId,
    pub role: Role,
    pub region: RegionId,
    pub fridges: Vec<FridgeId>,
    pub writer: mpsc::Sender<Command>,
    pub reads: Arc<ReadPool>,
    pub shared: Arc<Shared>,
    pub clock: larder_runtime::Clock,
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let (status, code) = match &e {
            CommandError::UnknownFridge(_) => (S::NOT_FOUND, "unknown_fridge"),
            CommandError::IdempotencyConflict => (S::CONFLICT, "idempotency_key_reused"),
            CommandError::Storage(_) => (S::SERVICE_UNAVAILABLE, "storage_unavailable"),
            CommandError::Overloaded => (S::SERVICE_UNAVAILABLE, "overloaded"),
            CommandError::ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting_down"),
            CommandError::InsufficientStorage { .. } => {
                (S::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            CommandError::OutboxFull { .. } => (S::INSUFFICIENT_STORAGE, "outbox_full"),
            CommandError::OfflineLimitReached { .. } => (S::CONFLICT, "offline_limit_reached"),
            CommandError::OfflinePaymentTooOld { .. } => (S::CONFLICT, "offline_payment_too_old"),
            CommandError::Ledger(l) => larder_runtime::http::ledger_error_status(l),
        };
        ApiError::new(status, code, message)
    }
}

/// Builds the router.
pub(crate) fn router(state: ApiState, body_bytes_max: usize) -> Router {
    let routes = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/refills", post(refill))
        .route("/v1/sales", post(sale))
        .route("/v1/door-sessions", post(door_session))
        .route("/v1/removals", post(removal))
        .route("/v1/temperature", post(temperature))
        .route("/v1/stock", get(stock))
        .route("/v1/orders", get(orders))
        .route("/v1/orders/{order_id}", get(order))
        .route("/v1/orders/{order_id}/cancel", post(cancel))
        .route("/v1/conflicts", get(conflicts))
        .route("/metrics", get(metrics));
    with_contract_fallbacks(routes)
        .layer(middleware::from_fn(guard::local_only))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body_bytes_max))
        .with_state(state)
}

async fn count_requests(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    count_into(&state.shared.metrics.http_requests, req, next).await
}

fn rfc3339(ms: i64) -> Option<String> {
    Timestamp::from_millisecond(ms).ok().map(|t| t.to_string())
}

async fn health(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let head = s.shared.outbox_head.load(Ordering::Relaxed);
    let acked = s.shared.up_acked.load(Ordering::Relaxed);
    let last = s.shared.last_sync_at_ms.load(Ordering::Relaxed);
    Json(json!({
        "device_id": s.device_id,
        "role": s.role,
        "region": s.region,
        "fridges": s.fridges,
        "online": s.shared.online.load(Ordering::Relaxed),
        "last_sync_at": if last > 0 { rfc3339(last) } else { None },
        "pending_changes": head.saturating_sub(acked),
        "outbox_limit": s.shared.outbox_limit.load(Ordering::Relaxed),
        "outbox_full": head.saturating_sub(acked) >= s.shared.outbox_limit.load(Ordering::Relaxed),
        "disk_free_bytes": s.shared.disk_free_bytes.load(Ordering::Relaxed),
        "storage_low": s.shared.storage_low.load(Ordering::Relaxed),
        "catalog_version": s.shared.catalog_version.load(Ordering::Relaxed),
        "offline_payments": {
            "hours_max": s.shared.offline_hours_max.load(Ordering::Relaxed),
            "oldest_age_seconds": match s.shared.oldest_offline_payment_ms.load(Ordering::Relaxed) {
                0 => None,
                at => Some(s.clock.now_ms().saturating_sub(at).max(0) / 1000),
            },
        },
        "time": s.clock.trusted(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefillUnitBody {
    unit_id: UnitId,
    sku: Sku,
    expires_at: Timestamp,
    #[serde(default)]
    batch: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefillBody {
    fridge_id: FridgeId,
    units: Vec<RefillUnitBody>,
    #[serde(default)]
    order_id: Option<OrderId>,
}

fn refill_units(units: Vec<RefillUnitBody>) -> Vec<RefillUnit> {
    units
        .into_iter()
        .map(|u| RefillUnit {
            unit_id: u.unit_id,
            sku: u.sku,
            expires_at_ms: u.expires_at.as_millisecond(),
            batch: u.batch,
        })
        .collect()
}

async fn run(
    s: &ApiState,
    fridge: FridgeId,
    action: Action,
    idem: Option<Idem>,
) -> Result<Outcome, ApiError> {
    Ok(writer::submit(&s.writer, fridge, action, idem).await?)
}

async fn refill(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, bytes): (RefillBody, _) = parse_body(body)?;
    if req.units.is_empty() {
        return Err(ApiError::invalid("units is empty"));
    }
    let idem = idempotency(&headers, "/v1/refills", &bytes)?;
    let action = Action::Refill(Refill {
        units: refill_units(req.units),
        order_id: req.order_id,
    });
    let outcome = run(&s, req.fridge_id, action, idem).await?;
    Ok((StatusCode::CREATED, Json(outcome_json(&outcome))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaleLineBody {
    sku: Sku,
    #[serde(default)]
    unit_id: Option<UnitId>,
    #[serde(default = "one")]
    quantity: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaleBody {
    fridge_id: FridgeId,
    lines: Vec<SaleLineBody>,
    payment: Payment,
}

async fn sale(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, bytes): (SaleBody, _) = parse_body(body)?;
    let idem = idempotency(&headers, "/v1/sales", &bytes)?;
    let action = Action::Sale {
        lines: req
            .lines
            .into_iter()
            .map(|l| SaleLine {
                sku: l.sku,
                unit_id: l.unit_id,
                quantity: l.quantity,
            })
            .collect(),
        payment: req.payment,
    };
    let outcome = run(&s, req.fridge_id, action, idem).await?;
    Ok((StatusCode::CREATED, Json(outcome_json(&outcome))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DoorSessionBody {
    fridge_id: FridgeId,
    session_id: String,
    units_taken: Vec<UnitId>,
    #[serde(default)]
    units_added: Vec<RefillUnitBody>,
    /// The app or subscription order the door was opened for.
    #[serde(default)]
    order_id: Option<OrderId>,
    /// A card was presented at the fridge's reader: units matched to nothing else are
    /// charged to it.
    #[serde(default)]
    fridge_card: bool,
}

async fn door_session(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, bytes): (DoorSessionBody, _) = parse_body(body)?;
    if req.session_id.is_empty() || req.session_id.len() > 128 {
        return Err(ApiError::invalid("session_id must be 1 to 128 bytes"));
    }
    let idem = idempotency(&headers, "/v1/door-sessions", &bytes)?;
    let action = Action::DoorSession {
        session: DoorSession {
            session_id: req.session_id,
            units_taken: req.units_taken,
            units_added: refill_units(req.units_added),
            order_id: req.order_id,
            card_order_id: None,
        },
        fridge_card: req.fridge_card,
    };
    let outcome = run(&s, req.fridge_id, action, idem).await?;
    Ok((StatusCode::CREATED, Json(outcome_json(&outcome))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemovalBody {
    fridge_id: FridgeId,
    units: Vec<UnitId>,
    reason: RemovalReason,
}

async fn removal(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, bytes): (RemovalBody, _) = parse_body(body)?;
    let idem = idempotency(&headers, "/v1/removals", &bytes)?;
    let action = Action::Removal {
        units: req.units,
        reason: req.reason,
    };
    let outcome = run(&s, req.fridge_id, action, idem).await?;
    Ok((StatusCode::CREATED, Json(outcome_json(&outcome))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemperatureBody {
    fridge_id: FridgeId,
    celsius: f64,
    at: Timestamp,
}

async fn temperature(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, bytes): (TemperatureBody, _) = parse_body(body)?;
    if !req.celsius.is_finite() || !(-100.0..=200.0).contains(&req.celsius) {
        return Err(ApiError::invalid(
            "celsius must be a reading between -100 and 200",
        ));
    }
    let idem = idempotency(&headers, "/v1/temperature", &bytes)?;
    let action = Action::Temperature {
        celsius: req.celsius,
        at_ms: req.at.as_millisecond(),
    };
    let outcome = run(&s, req.fridge_id, action, idem).await?;
    outcome_response(&outcome, StatusCode::ACCEPTED)
}

/// The contract's code for a refused cancel: the ledger's rule, as the hub answers it.
pub(crate) fn cancel_refusal_code(code: &str) -> &'static str {
    match code {
        "already_picked_up" => "already_picked_up",
        "past_grace_window" => "past_grace_window",
        "past_cutoff" => "past_cutoff",
        _ => "not_cancellable",
    }
}

async fn cancel(
    State(s): State<ApiState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let id = OrderId::new(id)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "unknown_order", e.to_string()))?;
    let path = format!("/v1/orders/{id}/cancel");
    let idem = idempotency(&headers, &path, &bytes)?;
    let reads = s.reads.clone();
    let lookup = id.clone();
    let found = tokio::task::spawn_blocking(move || reads.order(&lookup))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    let Some(view) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_order",
            "no such order here",
        ));
    };
    let outcome = run(
        &s,
        view.record.fridge_id,
        Action::Cancel { order: id },
        idem,
    )
    .await?;
    outcome_response(&outcome, StatusCode::OK)
}

/// A POST's answer: the outcome's JSON with `created`, or the refusal a recorded outcome
/// carries (a cancel refused and recorded).
fn outcome_response(outcome: &Outcome, created: StatusCode) -> Result<Response, ApiError> {
    if let Outcome::Cancel {
        refused: Some((code, why)),
        ..
    } = outcome
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            cancel_refusal_code(code),
            why.clone(),
        ));
    }
    Ok((created, Json(outcome_json(outcome))).into_response())
}

async fn conflicts(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    s.writer
        .send(Command::Conflicts { reply })
        .await
        .map_err(|_| ApiError::from(CommandError::ShuttingDown))?;
    let list = rx
        .await
        .map_err(|_| ApiError::from(CommandError::ShuttingDown))?;
    let open: Vec<_> = list.iter().filter(|c| c.view.status == "open").collect();
    Ok(Json(json!({ "conflicts": open, "resolved": list.len() - open.len() })).into_response())
}

/// The answer a POST gives for an outcome; the same outcome always gives the same answer.
fn outcome_json(outcome: &Outcome) -> serde_json::Value {
    match outcome {
        Outcome::Sold(view) => json!({
            "order_id": view.record.order_id,
            "status": view.status,
            "total_minor": view.record.total_minor,
            "currency": view.record.payment.currency,
            "catalog_version": view.record.catalog_version,
            "lines": view.record.lines,
            "created_at": rfc3339(view.record.created_at_ms),
        }),
        Outcome::Refilled { fridge_id, units } => {
            json!({"fridge_id": fridge_id, "units_loaded": units})
        }
        Outcome::Removed { fridge_id, units } => {
            json!({"fridge_id": fridge_id, "units_removed": units})
        }
        Outcome::DoorSession {
            fridge_id,
            session_id,
            matches,
        } => json!({
            "fridge_id": fridge_id,
            "session_id": session_id,
            "units_taken": matches,
        }),
        Outcome::Cancel { order, .. } => json!(order),
        Outcome::Temperature {
            fridge_id,
            excursion_since_ms,
            quarantined,
        } => json!({
            "fridge_id": fridge_id,
            "excursion": excursion_since_ms.is_some(),
            "excursion_since": excursion_since_ms.and_then(rfc3339),
            "quarantined_units": quarantined,
        }),
    }
}

#[derive(Debug, Deserialize)]
struct StockQuery {
    fridge_id: Option<String>,
}

#[derive(Debug, Serialize)]
struct StockAnswer {
    fridge_id: FridgeId,
    skus: Vec<crate::store::SkuStock>,
    units: Vec<larder_shared::domain::UnitView>,
}

async fn stock(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<StockQuery>,
) -> Result<Json<StockAnswer>, ApiError> {
    let fridge = match q.fridge_id {
        Some(f) => FridgeId::new(f).map_err(|e| ApiError::invalid(e.to_string()))?,
        None if s.fridges.len() == 1 => s.fridges[0].clone(),
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_fridge_id",
                "fridge_id is required: this device serves several fridges",
            ));
        }
    };
    if !s.fridges.contains(&fridge) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_fridge",
            format!("fridge {fridge} is not served by this device"),
        ));
    }
    let reads = s.reads.clone();
    let f = fridge.clone();
    let now = s.clock.now_ms();
    let (skus, units) = tokio::task::spawn_blocking(move || reads.stock(&f, now))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    Ok(Json(StockAnswer {
        fridge_id: fridge,
        skus,
        units,
    }))
}

async fn order(
    State(s): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = OrderId::new(id)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "unknown_order", e.to_string()))?;
    let reads = s.reads.clone();
    let found = tokio::task::spawn_blocking(move || reads.order(&id))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    match found {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_order",
            "no such order here",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct OrdersQuery {
    status: Option<String>,
    limit: Option<u32>,
}

async fn orders(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<OrdersQuery>,
) -> Result<Response, ApiError> {
    if let Some(status) = &q.status {
        status
            .parse::<larder_shared::domain::OrderStatus>()
            .map_err(ApiError::invalid)?;
    }
    let limit = q.limit.unwrap_or(100).clamp(1, ORDER_LIST_MAX);
    let reads = s.reads.clone();
    let list = tokio::task::spawn_blocking(move || reads.orders(q.status.as_deref(), limit))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    Ok(Json(json!({ "orders": list })).into_response())
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.shared.metrics.encode(),
    )
        .into_response()
}
