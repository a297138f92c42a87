//! The kitchen's routes: subscriber schedules, the refill plan, the prepare report and the
//! dispatch of scheduled orders. Plans read the projection (WAL readers); schedule changes go
//! through the region writer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::civil::Date;
use larder_runtime::http::{ApiError, parse_body};
use larder_shared::domain::AppOrderLine;
use larder_shared::{FridgeId, Sku};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::openapi::{AnyObject, Errors};
use super::{ApiPath, ApiQuery, HubState, ask_writer, authorize, caller, internal, region};
use crate::RegionHandle;
use crate::config::TokenRole;
use crate::region::{RegionCommand, SubscriptionOp};
use crate::subscriptions::{self, Calendar, Subscription};

const KITCHEN: [TokenRole; 2] = [TokenRole::Admin, TokenRole::Kitchen];
const SUBSCRIBERS: [TokenRole; 3] = [TokenRole::Admin, TokenRole::Kitchen, TokenRole::App];

async fn submit(
    h: &RegionHandle,
    op: SubscriptionOp,
    idem: Option<larder_runtime::http::Idem>,
) -> Result<Response, ApiError> {
    ask_writer(&h.tx, |reply| RegionCommand::Subscription {
        op,
        idem,
        reply,
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscriptionBody {
    /// Who subscribes: required with an app, kitchen or admin token; left out with a
    /// customer's token, whose subject is the customer (422 if given).
    #[serde(default)]
    customer_id: Option<String>,
    #[schema(value_type = String)]
    fridge_id: FridgeId,
    lines: Vec<LineBody>,
    /// `mon` to `sun`.
    weekdays: Vec<String>,
    #[schema(value_type = String, format = Date)]
    start_date: Date,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Date)]
    end_date: Option<Date>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SubscriptionLineBody)]
struct LineBody {
    #[schema(value_type = String)]
    sku: Sku,
    quantity: u32,
}

/// Days from 1970-01-01 (negative before it).
fn epoch_day(d: Date) -> i64 {
    d.since((jiff::Unit::Day, Date::constant(1970, 1, 1)))
        .map_or(i64::MIN / 2, |s| i64::from(s.get_days()))
}

#[utoipa::path(
    post,
    path = "/v1/regions/{r}/subscriptions",
    tag = "subscriptions",
    summary = "Creates a meal subscription; honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id")),
    request_body(content = SubscriptionBody, content_type = "application/json"),
    responses((status = 201, description = "Created; a retry with the same Idempotency-Key gets this first answer again", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn create_subscription(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&s, &headers, Some(&r), &SUBSCRIBERS).await?;
    let h = region(&s, &r)?.clone();
    let (req, bytes): (SubscriptionBody, _) = parse_body(body)?;
    let customer_id = super::orders::customer_of(&who, req.customer_id)?;
    // A retry with the same Idempotency-Key answers the first answer and creates nothing.
    let idem = who.idempotency(
        &headers,
        &format!("POST /v1/regions/{r}/subscriptions"),
        &bytes,
    )?;
    let lines: Vec<AppOrderLine> = req
        .lines
        .iter()
        .map(|l| AppOrderLine {
            sku: l.sku.clone(),
            quantity: l.quantity,
        })
        .collect();
    let today = jiff::Timestamp::from_millisecond(h.clock.now_ms())
        .map_err(internal)?
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    larder_shared::limits::subscription(&lines, &req.weekdays)
        .and_then(|()| {
            larder_shared::limits::subscription_dates(
                epoch_day(req.start_date),
                req.end_date.map(epoch_day),
                epoch_day(today),
            )
        })
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if !h.config.fridges.iter().any(|f| f.id == req.fridge_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_fridge",
            format!("no fridge {} in region {r}", req.fridge_id),
        ));
    }
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(internal)?;
    let sub = Subscription {
        subscription_id: format!(
            "{}{}",
            larder_shared::limits::SUBSCRIPTION_ID_PREFIX,
            hex::encode(id)
        ),
        customer_id,
        fridge_id: req.fridge_id,
        lines,
        weekdays: req.weekdays,
        start_date: req.start_date,
        end_date: req.end_date,
        created_at_ms: h.clock.now_ms(),
        ended_at_ms: None,
    };
    submit(&h, SubscriptionOp::Create(Box::new(sub)), idem).await
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/subscriptions",
    tag = "subscriptions",
    summary = "Subscriptions of the region (a customer's token: only theirs)",
    params(("r" = String, Path, description = "Region id")),
    responses((status = 200, description = "Subscriptions", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn list_subscriptions(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
) -> Result<Response, ApiError> {
    let who = caller(&s, &headers, Some(&r), &SUBSCRIBERS).await?;
    let h = region(&s, &r)?;
    let reads = h.reads.clone();
    let mut list = tokio::task::spawn_blocking(move || reads.subscriptions())
        .await
        .map_err(internal)??;
    list.retain(|sub| who.owns(Some(&sub.customer_id)));
    Ok(Json(json!({ "subscriptions": list })).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DateQuery {
    /// A date, `YYYY-MM-DD`.
    #[param(value_type = Option<String>, format = Date)]
    date: Option<Date>,
}

/// Ends a subscription, or with `?date=` cancels that one occurrence (free before its
/// cut-off, 409 `past_cutoff` after).
#[utoipa::path(
    delete,
    path = "/v1/regions/{r}/subscriptions/{id}",
    tag = "subscriptions",
    summary = "Ends a subscription, or with `date` cancels that one occurrence (409 `past_cutoff` after its cut-off); a customer's token, only their own (another's is 404)",
    params(("r" = String, Path, description = "Region id"), ("id" = String, Path, description = "Subscription id"), DateQuery),
    responses((status = 200, description = "Ended or skipped", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn delete_subscription(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath((r, id)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<DateQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&s, &headers, Some(&r), &SUBSCRIBERS).await?;
    let h = region(&s, &r)?.clone();
    let customer = who.customer().map(str::to_owned);
    let op = match q.date {
        Some(date) => SubscriptionOp::Skip { id, date, customer },
        None => SubscriptionOp::End { id, customer },
    };
    submit(&h, op, None).await
}

/// The plan's date: `?date=`, or today in the region's time zone.
fn plan_date(h: &RegionHandle, q: &DateQuery) -> Result<(Calendar, Date), ApiError> {
    let cal = Calendar::of(&h.config).map_err(internal)?;
    let date = q.date.unwrap_or_else(|| cal.date(h.clock.now_ms()));
    Ok((cal, date))
}

/// The refill plan of a region for a date.
async fn plan(
    h: &RegionHandle,
    q: &DateQuery,
) -> Result<(Date, Vec<subscriptions::PlanRow>), ApiError> {
    let (cal, date) = plan_date(h, q)?;
    let next_delivery = date.tomorrow().map(|d| cal.start_of(d)).map_err(|_| {
        ApiError::invalid(format!(
            "{date} is the last date there is: no plan follows it"
        ))
    })?;
    let now = h.clock.now_ms();
    // The counts come from the region writer's ledgers (a pass over the in-memory stock
    // indexes), the schedules from the store.
    let (reply, rx) = oneshot::channel();
    h.tx.send(RegionCommand::StockCounts {
        now_ms: now,
        before_ms: next_delivery,
        reply,
    })
    .await
    .map_err(internal)?;
    let stock = rx.await.map_err(internal)?;
    let reads = h.reads.clone();
    let region = h.config.clone();
    let skus: Vec<String> = h
        .catalog
        .borrow()
        .items
        .iter()
        .map(|i| i.sku.to_string())
        .collect();
    let rows = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
        let subs = reads.subscriptions()?;
        let skipped = reads.skipped_on(&date.to_string())?;
        let scheduled = subscriptions::scheduled_on(&subs, &skipped, date);
        Ok(subscriptions::refill_plan(
            &region, &skus, &stock, &scheduled,
        ))
    })
    .await
    .map_err(internal)??;
    Ok((date, rows))
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/refill-plan",
    tag = "kitchen",
    summary = "The refill plan for a date (default: today in the region's time zone)",
    params(("r" = String, Path, description = "Region id"), DateQuery),
    responses((status = 200, description = "The plan", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn refill_plan(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<DateQuery>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Some(&r), &KITCHEN)?;
    let h = region(&s, &r)?.clone();
    let (date, rows) = plan(&h, &q).await?;
    Ok(Json(json!({ "date": date.to_string(), "rows": rows })).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/prepare-report",
    tag = "kitchen",
    summary = "What to prepare for a date, by sku and fridge",
    params(("r" = String, Path, description = "Region id"), DateQuery),
    responses((status = 200, description = "The report", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn prepare_report(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<DateQuery>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Some(&r), &KITCHEN)?;
    let h = region(&s, &r)?.clone();
    let (date, rows) = plan(&h, &q).await?;
    Ok(Json(subscriptions::prepare_report(date, &rows)).into_response())
}
