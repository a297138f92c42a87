//! The catalog, ratings and live event routes: `GET`/`PUT /v1/regions/{r}/catalog`,
//! `POST /v1/regions/{r}/catalog/{sku}/ratings` and `GET /v1/regions/{r}/events` (SSE).

use std::convert::Infallible;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use larder_runtime::http::{ApiError, parse_body};
use larder_shared::Sku;
use larder_shared::catalog::CatalogItem;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::openapi::{AnyObject, Errors};
use super::{ApiPath, HubState, ask_writer, authorize, internal, region};
use crate::config::TokenRole;
use crate::region::catalog::{RatingRequest, average};
use crate::region::{RegionCommand, RegionError};

const READERS: [TokenRole; 3] = [TokenRole::Admin, TokenRole::Kitchen, TokenRole::App];
const RATERS: [TokenRole; 2] = [TokenRole::Admin, TokenRole::App];
const WATCHERS: [TokenRole; 2] = [TokenRole::Admin, TokenRole::Kitchen];

/// `GET /v1/regions/{r}/catalog`: the current version, each item with its rating.
#[utoipa::path(
    get,
    path = "/v1/regions/{r}/catalog",
    tag = "catalog",
    summary = "The current catalog version, each item with its rating (customers too)",
    params(("r" = String, Path, description = "Region id")),
    responses((status = 200, description = "The catalog", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn get_catalog(
    State(s): State<HubState>,
    ApiPath(r): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    super::caller(&s, &headers, Some(&r), &READERS).await?;
    let h = region(&s, &r)?;
    let catalog = h.catalog.borrow().clone();
    let reads = h.reads.clone();
    let ratings = tokio::task::spawn_blocking(move || reads.rating_totals())
        .await
        .map_err(internal)?
        .map_err(|e| ApiError::from(RegionError::Storage(e.to_string())))?;
    let items: Vec<serde_json::Value> = catalog
        .items
        .iter()
        .map(|item| {
            let (sum, count) = ratings.get(&item.sku).copied().unwrap_or((0, 0));
            let mut v = serde_json::to_value(item).unwrap_or_default();
            v["rating"] = json!({"average": average(sum, count), "count": count});
            v
        })
        .collect();
    Ok(Json(json!({
        "version": catalog.version,
        "currency": catalog.currency,
        "items": items,
    }))
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CatalogBody {
    /// The version this catalog was edited from (as `GET` gave it): a PUT made to an older
    /// version than the current one is refused (409), so two editors cannot undo each other.
    #[serde(default)]
    version: Option<u64>,
    currency: String,
    /// Items as `GET` gives them; their `rating` is not part of a version and is ignored. Any
    /// other key that is not an item's is refused.
    #[schema(value_type = Vec<AnyObject>)]
    #[serde(deserialize_with = "edited_items")]
    items: Vec<CatalogItem>,
}

/// Items as `GET` gives them, edited: each a [`larder_shared::catalog::WrittenItem`] that may
/// also carry the `rating` `GET` added.
fn edited_items<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<CatalogItem>, D::Error> {
    let items = Vec::<serde_json::Value>::deserialize(d)?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if let Some(fields) = item.as_object_mut() {
                fields.remove("rating");
            }
            serde_json::from_value::<larder_shared::catalog::WrittenItem>(item)
                .map(CatalogItem::from)
                .map_err(|e| serde::de::Error::custom(format!("items[{i}]: {e}")))
        })
        .collect()
}

/// `PUT /v1/regions/{r}/catalog`: publishes a new version (201), or answers the current one
/// (200) when nothing changed. Takes what `GET` answers, edited.
#[utoipa::path(
    put,
    path = "/v1/regions/{r}/catalog",
    tag = "catalog",
    summary = "Publishes a new catalog version (201), or answers the current one (200) when nothing changed; 409 `catalog_version_conflict` for an edit of an older version",
    params(("r" = String, Path, description = "Region id")),
    request_body(content = CatalogBody, content_type = "application/json"),
    responses((status = 201, description = "A new version", body = AnyObject), (status = 200, description = "Unchanged", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn put_catalog(
    State(s): State<HubState>,
    ApiPath(r): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Some(&r), &[TokenRole::Admin])?;
    let h = region(&s, &r)?;
    let (b, bytes): (CatalogBody, _) = parse_body(body)?;
    let idem = larder_runtime::http::idempotency(
        &headers,
        &format!("PUT /v1/regions/{r}/catalog"),
        &bytes,
    )?;
    ask_writer(&h.tx, |reply| RegionCommand::PutCatalog {
        currency: b.currency,
        items: b.items,
        base: b.version,
        idem,
        reply,
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RatingBody {
    #[schema(minimum = 1, maximum = 5)]
    stars: u8,
    /// Who rates: required with an app or admin token; left out with a customer's token,
    /// whose subject is the customer (422 if given). A customer rates a sku once (409
    /// `already_rated` after).
    #[serde(default)]
    customer_id: Option<String>,
}

/// `POST /v1/regions/{r}/catalog/{sku}/ratings`: 201 with the sku's new average and count.
#[utoipa::path(
    post,
    path = "/v1/regions/{r}/catalog/{sku}/ratings",
    tag = "catalog",
    summary = "Rates a meal 1 to 5 (a customer's token rates as that customer); answers the sku's new average and count; honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id"), ("sku" = String, Path, description = "Sku")),
    request_body(content = RatingBody, content_type = "application/json"),
    responses((status = 201, description = "Counted; a retry with the same Idempotency-Key gets this first answer again", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn rate(
    State(s): State<HubState>,
    ApiPath((r, sku)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = super::caller(&s, &headers, Some(&r), &RATERS).await?;
    let h = region(&s, &r)?;
    let sku = Sku::new(sku.as_str()).map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_sku",
            format!("sku {sku:?}: {e}"),
        )
    })?;
    let (b, bytes): (RatingBody, _) = parse_body(body)?;
    let customer_id = super::orders::customer_of(&who, b.customer_id)?;
    let idem = who.idempotency(
        &headers,
        &format!("POST /v1/regions/{r}/catalog/{sku}/ratings"),
        &bytes,
    )?;
    ask_writer(&h.tx, |reply| RegionCommand::Rate {
        rating: RatingRequest {
            sku,
            stars: b.stars,
            customer_id: Some(customer_id),
        },
        idem,
        reply,
    })
    .await
}

/// `GET /v1/regions/{r}/events`: the region's live feed as Server-Sent Events. Each event's
/// name is its `type`, its data the event as JSON, its id the feed's sequence number. Ends when
/// the hub shuts down.
#[utoipa::path(
    get,
    path = "/v1/regions/{r}/events",
    tag = "events",
    summary = "The region's live feed as Server-Sent Events (sale, order, stock, conflict, device, catalog, rating, lagged)",
    params(("r" = String, Path, description = "Region id")),
    responses((status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String), Errors),
    security(("bearer" = []))
)]
pub(super) async fn events(
    State(s): State<HubState>,
    ApiPath(r): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let token = authorize(&s, &headers, Some(&r), &WATCHERS)?;
    let h = region(&s, &r)?;
    // A place for the stream, given back when the stream ends (the client went away, or it
    // stopped reading and the server dropped it).
    let slot = s.streams.take(token.sha256.clone()).map_err(|full| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "{} live event streams are open ({} with this token); at most \
                 http.event_streams_max in all and http.event_streams_per_token_max per token",
                full.all, full.of_key
            ),
        )
    })?;
    let mut stop = s.shutdown.clone();
    let stream = BroadcastStream::new(h.events.subscribe())
        .map(move |m| {
            let _held = &slot;
            Ok::<_, Infallible>(match m {
                Ok(ev) => SseEvent::default()
                    .event(ev.kind.name())
                    .id(ev.id.to_string())
                    .json_data(&*ev)
                    .unwrap_or_else(|_| SseEvent::default().comment("unencodable event")),
                Err(BroadcastStreamRecvError::Lagged(n)) => SseEvent::default()
                    .event("lagged")
                    .data(json!({"type": "lagged", "missed": n}).to_string()),
            })
        })
        .take_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

use crate::region::import::IMPORT_ROWS_MAX;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    #[schema(value_type = Vec<AnyObject>)]
    rows: Vec<crate::region::import::UnitRow>,
}

/// `POST /v1/regions/{r}/imports/units`: loads a batch of unit rows (what `larder-hub import
/// units` sends); 200 with `{accepted, unchanged, rejected: [{line, reason}]}`. A retry with
/// the same Idempotency-Key gets the first answer again.
#[utoipa::path(
    post,
    path = "/v1/regions/{r}/imports/units",
    tag = "admin",
    summary = "Loads a batch of unit rows (what `larder-hub import units` sends); honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id")),
    request_body(content = ImportBody, content_type = "application/json"),
    responses((status = 200, description = "Accepted, unchanged and rejected rows", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn import_units(
    State(s): State<HubState>,
    ApiPath(r): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Some(&r), &[TokenRole::Admin])?;
    let h = region(&s, &r)?;
    let (b, bytes): (ImportBody, _) = parse_body(body)?;
    let idem = larder_runtime::http::idempotency(
        &headers,
        &format!("POST /v1/regions/{r}/imports/units"),
        &bytes,
    )?;
    if b.rows.len() > IMPORT_ROWS_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_rows",
            format!("at most {IMPORT_ROWS_MAX} rows per request"),
        ));
    }
    let (reply, rx) = oneshot::channel();
    h.tx.send(RegionCommand::ImportUnits {
        rows: b.rows,
        idem,
        reply,
    })
    .await
    .map_err(internal)?;
    let report = rx.await.map_err(internal)??;
    Ok(Json(report).into_response())
}
