//! The hub's HTTP API for kitchens, apps and admins (`GET /openapi.json`, docs/PROTOCOL.md): bearer tokens with a role and
//! regions, errors as `{"error": {"code", "message"}}`, reads from the region stores' WAL
//! readers, admin writes through the region writer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use jiff::Timestamp;
use larder_shared::domain::Role;
use larder_shared::{DeviceId, FridgeId, PublicKey, RegionId, SiteId};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use larder_runtime::http::{ApiError, Idem, parse_body, with_contract_fallbacks};
pub(crate) use larder_runtime::http::{ApiPath, ApiQuery};
use openapi::{AnyObject, Errors};

use crate::RegionHandle;
use crate::config::{TokenConfig, TokenRole};
use crate::metrics::HubMetrics;
use crate::region::{Outcome, RegionCommand, RegionError, Reply};
use crate::store::DeviceRecord;

mod caller;
mod catalog;
mod kitchen;
mod openapi;
mod orders;
mod payments;
mod shop;

pub(crate) use caller::{Caller, caller};

#[derive(Debug, Clone)]
pub struct HubState {
    pub regions: Arc<BTreeMap<RegionId, RegionHandle>>,
    pub tokens: Arc<Vec<TokenConfig>>,
    /// The hub's clock (the webhook's tolerance window is judged by it).
    pub clock: larder_runtime::Clock,
    /// The external payment provider's webhook secret (`[payments]`); `None` with the
    /// simulated provider.
    pub payments: Option<Arc<crate::payments::Payments>>,
    /// Verifies customers' tokens (`[customers]`); `None` takes none.
    pub customers: Option<Arc<crate::identity::Customers>>,
    pub metrics: Arc<HubMetrics>,
    /// `compaction.archive_after_hours`, the default age of a compaction asked for by API.
    pub archive_after: std::time::Duration,
    /// Turns true when the hub shuts down: ends the event streams, which would otherwise hold
    /// the server's graceful shutdown open.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The live event streams open, per token and in all.
    pub streams: Arc<larder_runtime::http::Places<String>>,
}

impl From<RegionError> for ApiError {
    fn from(e: RegionError) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            RegionError::DeviceExists(_) => (S::CONFLICT, "device_exists"),
            RegionError::UnknownDevice(_) => (S::NOT_FOUND, "unknown_device"),
            RegionError::UnknownFridge(_) => (S::UNPROCESSABLE_ENTITY, "unknown_fridge"),
            RegionError::Invalid(_) => (S::UNPROCESSABLE_ENTITY, "invalid_request"),
            RegionError::Storage(_) | RegionError::StoreRead(_) => {
                (S::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            RegionError::Overloaded => (S::SERVICE_UNAVAILABLE, "overloaded"),
            RegionError::IdempotencyKeyReused => (S::CONFLICT, "idempotency_key_reused"),
            RegionError::NoSuchFridge(_) => (S::NOT_FOUND, "unknown_fridge"),
            RegionError::UnknownOrder => (S::NOT_FOUND, "unknown_order"),
            RegionError::UnknownConflict(_) => (S::NOT_FOUND, "unknown_conflict"),
            RegionError::UnknownSubscription(_) => (S::NOT_FOUND, "unknown_subscription"),
            RegionError::UnknownSku(_) => (S::UNPROCESSABLE_ENTITY, "unknown_sku"),
            RegionError::NoSuchMeal(_) => (S::NOT_FOUND, "unknown_sku"),
            RegionError::OrderExists { .. } => (S::CONFLICT, "order_exists"),
            RegionError::NoOccurrence { .. } => (S::UNPROCESSABLE_ENTITY, "no_occurrence"),
            RegionError::PastCutoff(_) => (S::CONFLICT, "past_cutoff"),
            RegionError::CatalogVersionConflict { .. } => (S::CONFLICT, "catalog_version_conflict"),
            RegionError::CatalogTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "catalog_too_large"),
            RegionError::AlreadyRated { .. } => (S::CONFLICT, "already_rated"),
            RegionError::Ledger(l) => larder_runtime::http::ledger_error_status(l),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Hands the region writer a command and answers with what it did: its outcome's status and
/// body, or its error in the contract's shape.
async fn ask_writer(
    tx: &tokio::sync::mpsc::Sender<RegionCommand>,
    cmd: impl FnOnce(Reply<Outcome>) -> RegionCommand,
) -> Result<Response, ApiError> {
    let (reply, rx) = oneshot::channel();
    tx.try_send(cmd(reply))
        .map_err(|_| ApiError::from(RegionError::Overloaded))?;
    let outcome = rx.await.map_err(internal)??;
    let status =
        StatusCode::from_u16(outcome.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, Json(outcome.body())).into_response())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// SHA-256 of a bearer token, as the config stores it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The configured token `token` is, if it is one.
fn staff_token<'a>(s: &'a HubState, token: &str) -> Option<&'a TokenConfig> {
    let hash = token_sha256(token.trim());
    s.tokens
        .iter()
        .find(|t| t.sha256.eq_ignore_ascii_case(&hash))
}

/// The bearer token of a request: 401 without one.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a bearer token is required",
            )
        })
}

/// The caller's token, checked for role and region: 401 without a valid token, 403 otherwise.
fn authorize<'a>(
    s: &'a HubState,
    headers: &HeaderMap,
    region: Option<&str>,
    roles: &[TokenRole],
) -> Result<&'a TokenConfig, ApiError> {
    let token = bearer(headers)?;
    let t = staff_token(s, token).ok_or_else(|| {
        if s.customers.is_some() && caller::jwt_shaped(token) {
            caller::customer_forbidden()
        } else {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")
        }
    })?;
    permit(t, region, roles)
}

/// A configured token checked for role and region: 403 when it may not.
fn permit<'a>(
    t: &'a TokenConfig,
    region: Option<&str>,
    roles: &[TokenRole],
) -> Result<&'a TokenConfig, ApiError> {
    if !roles.contains(&t.role) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token's role may not do that",
        ));
    }
    if let Some(r) = region
        && !t.regions.iter().any(|x| x == "*" || x == r)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token may not touch region {r}"),
        ));
    }
    Ok(t)
}

fn region<'a>(s: &'a HubState, r: &str) -> Result<&'a RegionHandle, ApiError> {
    RegionId::new(r)
        .ok()
        .and_then(|id| s.regions.get(&id))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_region",
                format!("this hub does not own region {r}"),
            )
        })
}

pub fn router(state: HubState, body_bytes_max: usize) -> Router {
    let (routes, doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(dashboard))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(regions))
        .routes(routes!(fridges))
        .routes(routes!(stock))
        .routes(routes!(list_orders, orders::place))
        .routes(routes!(orders::get_order))
        .routes(routes!(orders::cancel))
        .routes(routes!(payments::webhook))
        .routes(routes!(orders::dispatch))
        .routes(routes!(
            kitchen::list_subscriptions,
            kitchen::create_subscription
        ))
        .routes(routes!(kitchen::delete_subscription))
        .routes(routes!(kitchen::refill_plan))
        .routes(routes!(kitchen::prepare_report))
        .routes(routes!(shop::fridges))
        .routes(routes!(shop::my_orders))
        .routes(routes!(orders::conflicts))
        .routes(routes!(orders::resolve))
        .routes(routes!(catalog::get_catalog, catalog::put_catalog))
        .routes(routes!(catalog::rate))
        .routes(routes!(catalog::events))
        .merge(
            // Import batches may be larger than other requests (`IMPORT_BODY_BYTES_MAX`).
            OpenApiRouter::new()
                .routes(routes!(catalog::import_units))
                .layer(axum::extract::DefaultBodyLimit::max(
                    body_bytes_max.max(crate::region::import::IMPORT_BODY_BYTES_MAX),
                )),
        )
        .routes(routes!(devices, enroll))
        .routes(routes!(revoke))
        .routes(routes!(compaction))
        .split_for_parts();
    let doc = Bytes::from(doc.to_json().unwrap_or_default());
    let routes = routes.route(
        "/openapi.json",
        get(move || async move { ([("content-type", "application/json")], doc) }),
    );
    with_contract_fallbacks(routes)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body_bytes_max))
        .with_state(state)
}

async fn count_requests(State(s): State<HubState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = larder_runtime::http::method_label(req.method());
    let started = std::time::Instant::now();
    let response = larder_runtime::http::count_into(&s.metrics.http_requests, req, next).await;
    // For the event feed this is the time to its first byte, not the stream's life.
    s.metrics
        .http_seconds
        .get_or_create(&vec![("method", method.to_owned()), ("route", route)])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn rfc3339(ms: i64) -> Option<String> {
    Timestamp::from_millisecond(ms).ok().map(|t| t.to_string())
}

/// The kitchen dashboard: one page, embedded in the binary, that calls this API with the
/// token the user gives it.
#[utoipa::path(
    get,
    path = "/",
    summary = "The kitchen dashboard (one HTML page; the token goes in the URL fragment)",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String))
)]
async fn dashboard() -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-cache"),
            (
                "content-security-policy",
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("dashboard/index.html"),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    summary = "Liveness: the hub answers and which regions it owns",
    responses((status = 200, description = "The hub is up", body = AnyObject))
)]
async fn healthz(State(s): State<HubState>) -> Json<serde_json::Value> {
    Json(json!({"status": "ok", "regions": s.regions.keys().collect::<Vec<_>>()}))
}

#[utoipa::path(
    get,
    path = "/metrics",
    summary = "Prometheus / OpenMetrics text (admin token: it names devices and their sync lag)",
    responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String), Errors),
    security(("bearer" = []))
)]
async fn metrics(State(s): State<HubState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&s, &headers, None, &[TokenRole::Admin])?;
    Ok((
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/regions",
    tag = "regions",
    summary = "The regions this hub owns that the token may touch (a customer's: those customers may use)",
    responses((status = 200, description = "Regions", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn regions(
    State(s): State<HubState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = caller(
        &s,
        &headers,
        None,
        &[TokenRole::Admin, TokenRole::Kitchen, TokenRole::App],
    )
    .await?;
    let may = |r: &str| match &who {
        Caller::Staff(t) => t.regions.iter().any(|x| x == "*" || x == r),
        Caller::Customer(_) => s.customers.as_ref().is_some_and(|c| c.config().serves(r)),
    };
    let list: Vec<_> = s
        .regions
        .iter()
        .filter(|(id, _)| may(id.as_str()))
        .map(|(id, h)| json!({"region": id, "fridges": h.config.fridges.len(), "catalog_version": h.catalog.borrow().version}))
        .collect();
    Ok(Json(json!({"regions": list})))
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/fridges",
    tag = "fridges",
    summary = "Each fridge of the region: online, last seen, units, expiring within 24 h, low stock",
    params(("r" = String, Path, description = "Region id")),
    responses((status = 200, description = "Fridges", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn fridges(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(
        &s,
        &headers,
        Some(&r),
        &[TokenRole::Admin, TokenRole::Kitchen],
    )?;
    let h = region(&s, &r)?.clone();
    let now = h.clock.now_ms();
    let reads = h.reads.clone();
    let config = h.config.clone();
    let (devices, stocks) =
        tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
            let devices = reads.devices()?;
            let mut stocks = Vec::new();
            for f in &config.fridges {
                stocks.push(reads.stock(&f.id, now)?.0);
            }
            Ok((devices, stocks))
        })
        .await
        .map_err(internal)??;
    let presence = h.presence.read().map(|p| p.clone()).unwrap_or_default();
    let list: Vec<_> = h
        .config
        .fridges
        .iter()
        .zip(stocks)
        .map(|(f, skus)| {
            let device = devices.iter().find(|(d, _)| d.role == Role::Fridge && d.fridges.contains(&f.id));
            let online = device.is_some_and(|(d, _)| presence.get(&d.device_id).copied().unwrap_or(false));
            let last_seen = device.and_then(|(d, _)| d.last_seen_ms).and_then(rfc3339);
            let units: u64 = skus.iter().map(|k| k.available).sum();
            let expiring: u64 = skus.iter().map(|k| k.expiring_24h).sum();
            let low: Vec<&str> = skus.iter().filter(|k| k.available < u64::from(f.low_stock_units)).map(|k| k.sku.as_str()).collect();
            json!({
                "fridge_id": f.id, "site": f.site, "device_id": device.map(|(d, _)| &d.device_id),
                "online": online, "last_seen_at": last_seen, "units_in_stock": units, "expiring_24h": expiring, "low_stock_skus": low,
            })
        })
        .collect();
    Ok(Json(json!({"fridges": list})))
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/fridges/{f}/stock",
    tag = "fridges",
    summary = "One fridge's stock by sku and unit, as the hub's replica holds it",
    params(("r" = String, Path, description = "Region id"), ("f" = String, Path, description = "Fridge id")),
    responses((status = 200, description = "Stock", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn stock(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath((r, f)): ApiPath<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(
        &s,
        &headers,
        Some(&r),
        &[TokenRole::Admin, TokenRole::Kitchen],
    )?;
    let h = region(&s, &r)?;
    let fridge = FridgeId::new(f.as_str())
        .ok()
        .filter(|id| h.config.fridges.iter().any(|c| &c.id == id))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_fridge",
                format!("no fridge {f} in region {r}"),
            )
        })?;
    let (reply, rx) = oneshot::channel();
    h.tx.send(RegionCommand::Digest {
        fridge: fridge.clone(),
        reply,
    })
    .await
    .map_err(internal)?;
    let summary = rx.await.map_err(internal)?;
    let reads = h.reads.clone();
    let now = h.clock.now_ms();
    let fid = fridge.clone();
    let (skus, units) = tokio::task::spawn_blocking(move || reads.stock(&fid, now))
        .await
        .map_err(internal)??;
    Ok(Json(
        json!({"fridge_id": fridge, "skus": skus, "units": units,
            "state_digest": summary.as_ref().map(|s| &s.state_digest),
            "escrow": summary.as_ref().map(|s| &s.escrow),
            "incidents": summary.as_ref().map(|s| &s.incidents)}),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct OrdersQuery {
    /// Only this fridge's orders.
    fridge_id: Option<String>,
    /// Only orders with this status.
    status: Option<String>,
    /// At most this many (1 to 10,000; default 100).
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/orders",
    tag = "orders",
    summary = "Orders of the region, newest first",
    params(("r" = String, Path, description = "Region id"), OrdersQuery),
    responses((status = 200, description = "Orders", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn list_orders(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<OrdersQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(
        &s,
        &headers,
        Some(&r),
        &[TokenRole::Admin, TokenRole::Kitchen],
    )?;
    let h = region(&s, &r)?;
    let fridge = q
        .fridge_id
        .map(FridgeId::new)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(status) = &q.status {
        status
            .parse::<larder_shared::domain::OrderStatus>()
            .map_err(ApiError::invalid)?;
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let reads = h.reads.clone();
    let status = q.status;
    let list = tokio::task::spawn_blocking(move || {
        reads.orders_with_status(fridge.as_ref(), status.as_deref(), limit)
    })
    .await
    .map_err(internal)??;
    Ok(Json(json!({"orders": list})))
}

fn device_json(d: &DeviceRecord, online: bool) -> serde_json::Value {
    json!({
        "device_id": d.device_id, "role": d.role, "site": d.site, "fridges": d.fridges,
        "public_key": d.public_key, "enrolled_at": rfc3339(d.enrolled_at_ms),
        "revoked_at": d.revoked_at_ms.and_then(rfc3339), "last_seen_at": d.last_seen_ms.and_then(rfc3339),
        "online": online,
    })
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/devices",
    tag = "devices",
    summary = "Enrolled devices (revoked ones included)",
    params(("r" = String, Path, description = "Region id")),
    responses((status = 200, description = "Devices", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn devices(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, Some(&r), &[TokenRole::Admin])?;
    let h = region(&s, &r)?;
    let reads = h.reads.clone();
    let list = tokio::task::spawn_blocking(move || reads.devices())
        .await
        .map_err(internal)??;
    let presence = h.presence.read().map(|p| p.clone()).unwrap_or_default();
    let list: Vec<_> = list
        .iter()
        .map(|(d, _)| device_json(d, presence.get(&d.device_id).copied().unwrap_or(false)))
        .collect();
    Ok(Json(json!({"devices": list})))
}

/// The body of `POST /v1/regions/{r}/devices`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    #[schema(value_type = String)]
    pub device_id: DeviceId,
    #[schema(schema_with = openapi::device_role)]
    pub role: Role,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub site: Option<SiteId>,
    #[schema(value_type = Vec<String>)]
    pub fridges: Vec<FridgeId>,
    /// The device's Ed25519 public key, hex.
    #[schema(value_type = String)]
    pub public_key: PublicKey,
}

/// Enrolls a device through the region's writer (used by the API, the CLI and the demo);
/// `idem` is the request's Idempotency-Key and request hash, if it had one.
pub async fn enroll_device(
    h: &RegionHandle,
    body: EnrollBody,
    idem: Option<Idem>,
) -> Result<DeviceRecord, RegionError> {
    let record = DeviceRecord {
        device_id: body.device_id,
        role: body.role,
        site: body.site,
        fridges: body.fridges,
        public_key: body.public_key,
        enrolled_at_ms: h.clock.now_ms(),
        revoked_at_ms: None,
        last_seen_ms: None,
    };
    let (reply, rx) = oneshot::channel();
    h.tx.try_send(RegionCommand::Enroll {
        record: Box::new(record),
        idem,
        reply,
    })
    .map_err(|_| RegionError::Overloaded)?;
    rx.await.map_err(|_| RegionError::Overloaded)?
}

/// The body of `POST /v1/regions/{r}/compaction`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CompactionBody {
    /// Finished records older than this leave the live ledgers (default: the config's
    /// `compaction.archive_after_hours`).
    #[serde(default)]
    archive_after_seconds: Option<u64>,
}

/// Runs a compaction of the region now (it also runs every `compaction.interval_seconds`).
/// Compacts a region now (see [`RegionCommand::Compact`]); `idem` is the request's
/// Idempotency-Key and request hash, if it had one.
pub async fn compact_region(
    h: &RegionHandle,
    archive_after: std::time::Duration,
    idem: Option<Idem>,
) -> Result<crate::region::CompactionReport, RegionError> {
    let (reply, rx) = oneshot::channel();
    let archive_before_ms =
        h.clock.now_ms() - i64::try_from(archive_after.as_millis()).unwrap_or(i64::MAX);
    h.tx.try_send(RegionCommand::Compact {
        archive_before_ms,
        idem,
        reply,
    })
    .map_err(|_| RegionError::Overloaded)?;
    rx.await.map_err(|_| RegionError::Overloaded)?
}

#[utoipa::path(
    post,
    path = "/v1/regions/{r}/compaction",
    tag = "admin",
    summary = "Compacts the region now: finished records leave the live ledgers for the archive; honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id")),
    request_body(content = Option<CompactionBody>, content_type = "application/json"),
    responses((status = 200, description = "What was compacted", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn compaction(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<crate::region::CompactionReport>, ApiError> {
    authorize(&s, &headers, Some(&r), &[TokenRole::Admin])?;
    let h = region(&s, &r)?;
    let (body, bytes): (CompactionBody, Bytes) = match body {
        Ok(b) if b.is_empty() => (CompactionBody::default(), b),
        other => parse_body(other)?,
    };
    let idem = larder_runtime::http::idempotency(
        &headers,
        &format!("POST /v1/regions/{r}/compaction"),
        &bytes,
    )?;
    let after = body
        .archive_after_seconds
        .map_or(s.archive_after, std::time::Duration::from_secs);
    Ok(Json(compact_region(h, after, idem).await?))
}

/// Revokes a device through the region writer.
pub async fn revoke_device(h: &RegionHandle, device: DeviceId) -> Result<(), RegionError> {
    let (reply, rx) = oneshot::channel();
    h.tx.try_send(RegionCommand::Revoke { device, reply })
        .map_err(|_| RegionError::Overloaded)?;
    rx.await.map_err(|_| RegionError::Overloaded)?
}

#[utoipa::path(
    post,
    path = "/v1/regions/{r}/devices",
    tag = "devices",
    summary = "Enrolls a device; the same enrollment again answers as the first did, and an Idempotency-Key used with another request is 409",
    params(("r" = String, Path, description = "Region id")),
    request_body(content = EnrollBody, content_type = "application/json"),
    responses((status = 201, description = "Enrolled", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn enroll(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Some(&r), &[TokenRole::Admin])?;
    let h = region(&s, &r)?;
    let (body, bytes): (EnrollBody, _) = parse_body(body)?;
    let idem = larder_runtime::http::idempotency(
        &headers,
        &format!("POST /v1/regions/{r}/devices"),
        &bytes,
    )?;
    match enroll_device(h, body.clone(), idem).await {
        Ok(d) => Ok((StatusCode::CREATED, Json(device_json(&d, false))).into_response()),
        Err(RegionError::DeviceExists(id)) => {
            // A retry of the same enrollment answers as the first did; another body is a conflict.
            let reads = h.reads.clone();
            let list = tokio::task::spawn_blocking(move || reads.devices())
                .await
                .map_err(internal)??;
            match list.into_iter().find(|(d, _)| d.device_id == id) {
                Some((d, _))
                    if d.public_key == body.public_key
                        && d.role == body.role
                        && d.fridges == body.fridges
                        && d.site == body.site =>
                {
                    Ok((StatusCode::CREATED, Json(device_json(&d, false))).into_response())
                }
                _ => Err(RegionError::DeviceExists(id).into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(
    delete,
    path = "/v1/regions/{r}/devices/{d}",
    tag = "devices",
    summary = "Revokes a device: its next envelope is rejected and it cannot connect again",
    params(("r" = String, Path, description = "Region id"), ("d" = String, Path, description = "Device id")),
    responses((status = 200, description = "Revoked", body = AnyObject), Errors),
    security(("bearer" = []))
)]
async fn revoke(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath((r, d)): ApiPath<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers, Some(&r), &[TokenRole::Admin])?;
    let h = region(&s, &r)?;
    let id = DeviceId::new(d.as_str()).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            format!("no device {d}"),
        )
    })?;
    revoke_device(h, id.clone()).await?;
    Ok(Json(json!({"device_id": id, "revoked": true})))
}
