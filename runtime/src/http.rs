//! HTTP for the agent's and the hub's APIs: the server loop ([`serve`]), the contract's error
//! shape ([`ApiError`]) with the one mapping of ledger errors to statuses, extractors that
//! answer in that shape, request bodies, idempotency keys and request counting.

mod config;
mod server;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use larder_shared::ledger::LedgerError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::warn;

pub use config::{HttpConfig, HttpDefaults};
pub use server::{Place, Places, PlacesFull, ServerLimits, serve};

use crate::sqlite::StoreError;

/// The contract's answers to a route that does not exist (404 `not_found`) and to a method a
/// route does not take (405 `method_not_allowed`), for the agent's and the hub's routers; added
/// before their layers, so that these answers pass through the layers as the routes' do.
pub fn with_contract_fallbacks<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
) -> axum::Router<S> {
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
}

/// Binds the API's listener; answers it with the address it got (port 0 picks a free one).
async fn bind(
    addr: std::net::SocketAddr,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), crate::StartupError> {
    let err = |source| crate::StartupError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Serves `app` on `listener` in a task of its own until `shutdown` turns true.
fn spawn_server(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ServerLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        serve(listener, app, limits, stop).await;
    })
}

/// Metric labels: name and value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// An idempotency key with the hash of the request it came with (method, path and body).
#[derive(Debug, Clone)]
pub struct Idem {
    pub key: String,
    pub request_sha256: String,
}

/// Longest Idempotency-Key accepted, in bytes.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 200;
/// An error in the contract's shape (the hub's API uses it too).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl ApiError {
    /// 422 `invalid_request`: the request parsed, but a value in it is not one the API takes.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            warn!(code = self.code, message = %self.message, "request failed");
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// The status and error code of a refused ledger command: the one mapping, for the agent's API
/// and the hub's.
pub fn ledger_error_status(e: &LedgerError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        LedgerError::UnitNotAvailable { .. } => (S::CONFLICT, "unit_not_available"),
        LedgerError::UnitExists(_) => (S::CONFLICT, "unit_exists"),
        LedgerError::InsufficientStock { .. } => (S::CONFLICT, "insufficient_stock"),
        LedgerError::OrderExists(_) => (S::CONFLICT, "order_exists"),
        LedgerError::UnknownSku(_) => (S::UNPROCESSABLE_ENTITY, "unknown_sku"),
        LedgerError::AmountMismatch { .. } => (S::UNPROCESSABLE_ENTITY, "amount_mismatch"),
        LedgerError::Invalid(_) => (S::UNPROCESSABLE_ENTITY, "invalid_request"),
        LedgerError::UnknownOrder(_) => (S::NOT_FOUND, "unknown_order"),
        LedgerError::UnknownConflict(_) => (S::NOT_FOUND, "unknown_conflict"),
        LedgerError::WrongStatus(_) => (S::CONFLICT, "wrong_status"),
        LedgerError::TooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "too_large"),
        _ => (S::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.to_string(),
        )
    }
}

/// `Query`, with a query string that does not parse answered in the contract's shape
/// (422 `invalid_request`) rather than axum's plain-text rejection.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Self(q))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// `Path`, with a segment that does not decode answered in the contract's shape (400
/// `malformed`) rather than axum's plain-text rejection.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Self(p))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.body_text()))
    }
}

/// A request's body: 413 past the limit, 400 if it could not be read.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is too large",
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.body_text())
        }
    })
}

/// Parses a JSON body: 413 past the limit, 400 for broken JSON, 422 for wrong values.
pub fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<(T, Bytes), ApiError> {
    let bytes = body_bytes(body)?;
    let value = serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            ApiError::invalid(e.to_string())
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string())
        }
    })?;
    Ok((value, bytes))
}

pub fn idempotency(headers: &HeaderMap, path: &str, body: &[u8]) -> Result<Option<Idem>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_LEN_MAX)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_idempotency_key",
                format!("Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"),
            )
        })?;
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    Ok(Some(Idem {
        key: key.to_owned(),
        request_sha256: hex::encode(h.finalize()),
    }))
}

/// Runs the request and counts it by method, matched route and status (agent and hub).
pub async fn count_into(requests: &Family<Labels, Counter>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let response = next.run(req).await;
    requests
        .get_or_create(&vec![
            ("method", method.to_owned()),
            ("route", route),
            ("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

/// A request's method as a metrics label: the standard ones by name, any other as `other`, so
/// that requests with made-up methods cannot add label values without end.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
