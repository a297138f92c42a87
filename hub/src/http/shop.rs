//! What a customer sees: the fridges of a region with what each has to sell (no unit ids, no
//! reservations, nothing of other customers), and their own order history. Staff tokens read
//! the shop too, as the app's back-end does.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use larder_runtime::http::ApiError;
use serde::Deserialize;
use serde_json::json;

use super::openapi::{AnyObject, Errors};
use super::{ApiPath, ApiQuery, HubState, caller, internal, region};
use crate::config::TokenRole;

const SHOPPERS: [TokenRole; 3] = [TokenRole::Admin, TokenRole::Kitchen, TokenRole::App];
/// How far back a customer's order history reaches.
const HISTORY_DAYS: i64 = 31;
const HISTORY_LIMIT_MAX: u32 = 100;

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/shop/fridges",
    tag = "shop",
    summary = "The region's fridges as customers see them: site, location, open now or not, and the units each has for sale per sku",
    params(("r" = String, Path, description = "Region id")),
    responses((status = 200, description = "Fridges and what they hold for sale", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn fridges(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller(&s, &headers, Some(&r), &SHOPPERS).await?;
    let h = region(&s, &r)?.clone();
    let now = h.clock.now_ms();
    let reads = h.reads.clone();
    let config = h.config.clone();
    let stocks = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
        let mut stocks = Vec::new();
        for f in &config.fridges {
            stocks.push(reads.stock(&f.id, now)?.0);
        }
        Ok(stocks)
    })
    .await
    .map_err(internal)??;
    let catalog = h.catalog.borrow().clone();
    let local = crate::subscriptions::Calendar::of(&h.config)
        .map(|cal| {
            jiff::Timestamp::from_millisecond(now)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
                .to_zoned(cal.tz)
                .time()
        })
        .map_err(internal)?;
    let list: Vec<_> = h
        .config
        .fridges
        .iter()
        .zip(stocks)
        .map(|(f, skus)| {
            let items: Vec<_> = skus
                .iter()
                .filter(|k| k.available > 0)
                .map(|k| {
                    let item = larder_shared::Sku::new(k.sku.as_str())
                        .ok()
                        .and_then(|sku| catalog.item(&sku).cloned());
                    json!({
                        "sku": k.sku, "available": k.available,
                        "name": item.as_ref().map(|i| &i.name),
                        "price_minor": item.as_ref().map(|i| i.price_minor),
                    })
                })
                .collect();
            json!({
                "fridge_id": f.id, "site": f.site, "location": f.location,
                "opening_hours": f.opening_hours, "open": f.open_at(local), "skus": items,
            })
        })
        .collect();
    Ok(Json(
        json!({"region": r, "currency": catalog.currency, "catalog_version": catalog.version, "fridges": list}),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct HistoryQuery {
    /// At most this many (1 to 100; default 20).
    limit: Option<u32>,
    /// The `next` of the page before, for the page after it.
    after: Option<String>,
}

/// A page's position: the last order's creation time and id, as `next` gives it.
fn cursor(text: &str) -> Result<(i64, &str), ApiError> {
    text.split_once(':')
        .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id)))
        .filter(|(_, id)| !id.is_empty())
        .ok_or_else(|| ApiError::invalid("after is the `next` of an earlier page"))
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/me/orders",
    tag = "shop",
    summary = "The calling customer's orders of the last 31 days, newest first, a page at a time (a customer's token only)",
    params(("r" = String, Path, description = "Region id"), HistoryQuery),
    responses((status = 200, description = "A page of the customer's orders; `next` is null on the last", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn my_orders(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = caller(&s, &headers, Some(&r), &[]).await?;
    let customer = who.customer().map(str::to_owned).ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an order history is a customer's: use a customer's token",
        )
    })?;
    let h = region(&s, &r)?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=HISTORY_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit is 1 to {HISTORY_LIMIT_MAX}"
        )));
    }
    let after = q.after.clone();
    let before = after.as_deref().map(cursor).transpose()?;
    let before = before.map(|(ms, id)| (ms, id.to_owned()));
    let since = h.clock.now_ms() - HISTORY_DAYS * 86_400_000;
    let reads = h.reads.clone();
    let orders = tokio::task::spawn_blocking(move || {
        let before = before.as_ref().map(|(ms, id)| (*ms, id.as_str()));
        reads.customer_orders(&customer, since, before, limit)
    })
    .await
    .map_err(internal)??;
    let next = (orders.len() == limit as usize)
        .then(|| orders.last())
        .flatten()
        .map(|o| format!("{}:{}", o.record.created_at_ms, o.record.order_id));
    Ok(Json(json!({"orders": orders, "next": next})))
}
