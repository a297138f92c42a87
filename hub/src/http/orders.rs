//! The hub's order and conflict routes: app orders (place, read, cancel, payment outcome) and
//! the conflict queue. Writes go through the region writer, which answers only after its
//! commit; reads come from the projection.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use larder_runtime::http::{ApiError, parse_body};
use larder_shared::domain::{
    AppOrder, AppOrderLine, Channel, ConflictView, Resolution, ResolutionAction, Role,
};
use larder_shared::{DeviceId, FridgeId, OrderId, Sku};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::openapi::{AnyObject, Errors};
use super::{ApiPath, ApiQuery, Caller, HubState, ask_writer, authorize, caller, internal, region};
use crate::RegionHandle;
use crate::config::TokenRole;
use crate::region::{OrderAction, RegionCommand};

const ANYONE: [TokenRole; 3] = [TokenRole::Admin, TokenRole::Kitchen, TokenRole::App];

/// Sends an order action to the region writer and turns its answer into a response.
async fn submit(
    h: &RegionHandle,
    fridge: Option<FridgeId>,
    order: Option<OrderId>,
    action: OrderAction,
    idem: Option<larder_runtime::http::Idem>,
) -> Result<Response, ApiError> {
    ask_writer(&h.tx, |reply| RegionCommand::Order {
        fridge,
        order,
        action,
        idem,
        reply,
    })
    .await
}

fn unknown_fridge(f: &str, r: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_fridge",
        format!("no fridge {f} in region {r}"),
    )
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PlaceBody {
    /// Who orders: required with an app or admin token; left out with a customer's token,
    /// whose subject is the customer (422 if given).
    #[serde(default)]
    customer_id: Option<String>,
    fridge_id: String,
    lines: Vec<LineBody>,
    /// The client's own id for the order (generated when absent; a customer's token may not
    /// choose one, 422). It may not begin with an enrolled device's id and `-`, where devices
    /// number their own sales (422).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    order_id: Option<OrderId>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OrderLineBody)]
struct LineBody {
    #[schema(value_type = String)]
    sku: Sku,
    quantity: u32,
}

/// The customer a request acts for: a customer's token's subject (a body naming anyone is
/// 422), or the body's `customer_id` for staff (required, 1 to 128 bytes).
pub(super) fn customer_of(who: &Caller<'_>, named: Option<String>) -> Result<String, ApiError> {
    match (who.customer(), named) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "customer_id comes from a customer's token: leave it out",
        )),
        (Some(c), None) => Ok(c.to_owned()),
        (None, None) => Err(ApiError::invalid("customer_id is required")),
        (None, Some(c)) => {
            larder_shared::limits::customer_id(&c).map_err(|e| ApiError::invalid(e.to_string()))?;
            Ok(c)
        }
    }
}

fn unknown_order() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_order",
        "no such order in this region",
    )
}

/// A fresh order id: `app-` and 16 random hex digits.
fn new_order_id() -> Result<OrderId, ApiError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(internal)?;
    OrderId::new(format!("app-{}", hex::encode(bytes))).map_err(internal)
}

/// The enrolled device (revoked or not) whose namespace a client-chosen order id is in: one
/// whose id followed by `-` begins it. Devices number their own sales `{device}-{n}`; an app
/// order there would take the id of one of that device's sales to come, which the device would
/// then refuse to sell, or (placed while the device sells offline) share one order's record.
fn device_namespace(h: &RegionHandle, id: &OrderId) -> Result<Option<DeviceId>, ApiError> {
    for (at, _) in id.as_str().match_indices('-') {
        let Ok(device) = DeviceId::new(&id.as_str()[..at]) else {
            continue;
        };
        if h.reads.device(&device)?.is_some() {
            return Ok(Some(device));
        }
    }
    Ok(None)
}

/// Whether every device selling from the fridge (its own and each POS serving it) is online,
/// by their presence as the MQTT task last heard. Only then may the hub promise beyond the
/// fridge's escrow.
fn fridge_online(h: &RegionHandle, fridge: &FridgeId) -> Result<bool, ApiError> {
    let devices = h.reads.devices_of(fridge)?;
    let Ok(presence) = h.presence.read() else {
        return Ok(false);
    };
    Ok(devices.iter().any(|(_, role)| *role == Role::Fridge)
        && devices
            .iter()
            .all(|(d, _)| presence.get(d).copied().unwrap_or(false)))
}

#[utoipa::path(
    post,
    path = "/v1/regions/{r}/orders",
    tag = "orders",
    summary = "Places an app order (a customer's token orders as that customer); honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id")),
    request_body(content = PlaceBody, content_type = "application/json"),
    responses((status = 201, description = "Placed (or refused: see its status); a retry with the same Idempotency-Key gets this first answer again", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn place(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&s, &headers, Some(&r), &[TokenRole::Admin, TokenRole::App]).await?;
    let h = region(&s, &r)?.clone();
    let (req, bytes): (PlaceBody, _) = parse_body(body)?;
    let customer_id = customer_of(&who, req.customer_id)?;
    let fridge = FridgeId::new(req.fridge_id.as_str())
        .ok()
        .filter(|f| h.config.fridges.iter().any(|c| &c.id == f))
        .ok_or_else(|| unknown_fridge(&req.fridge_id, &r))?;
    let idem = who.idempotency(&headers, &format!("POST /v1/regions/{r}/orders"), &bytes)?;
    if who.customer().is_some() && req.order_id.is_some() {
        return Err(ApiError::invalid(
            "order_id is the hub's to choose for a customer's order: leave it out",
        ));
    }
    if let Some(id) = &req.order_id {
        larder_shared::limits::client_order_id(id).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let chosen = req.order_id.is_some();
    let order_id = match req.order_id {
        Some(id) => id,
        None => new_order_id()?,
    };
    let (online, owner) = {
        let h = h.clone();
        let f = fridge.clone();
        let id = order_id.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            let owner = if chosen {
                device_namespace(&h, &id)?
            } else {
                None
            };
            Ok((fridge_online(&h, &f)?, owner))
        })
        .await
        .map_err(internal)??
    };
    if let Some(device) = owner {
        return Err(ApiError::invalid(format!(
            "order_id {order_id} is in device {device}'s namespace ({device}-…), where it \
                 numbers its own sales: choose another id, or leave order_id out"
        )));
    }
    let order = AppOrder {
        order_id,
        customer_id,
        channel: Channel::App,
        lines: req
            .lines
            .into_iter()
            .map(|l| AppOrderLine {
                sku: l.sku,
                quantity: l.quantity,
            })
            .collect(),
        subscription_id: None,
    };
    submit(
        &h,
        Some(fridge),
        None,
        OrderAction::Place {
            order,
            fridge_online: online,
        },
        idem,
    )
    .await
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/orders/{id}",
    tag = "orders",
    summary = "One order, from the live ledger or the archive (a customer, only their own: another's is 404)",
    params(("r" = String, Path, description = "Region id"), ("id" = String, Path, description = "Order id")),
    responses((status = 200, description = "The order", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn get_order(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath((r, id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let who = caller(&s, &headers, Some(&r), &ANYONE).await?;
    let h = region(&s, &r)?;
    Ok(Json(order_of(h, &id, &who).await?).into_response())
}

/// An order the caller may see, from the projection: 404 if the region has no such order, or
/// it is another customer's.
async fn order_of(
    h: &RegionHandle,
    id: &str,
    who: &Caller<'_>,
) -> Result<larder_shared::domain::OrderView, ApiError> {
    let reads = h.reads.clone();
    let key = id.to_owned();
    let found = tokio::task::spawn_blocking(move || reads.order(&key))
        .await
        .map_err(internal)??;
    found
        .filter(|v| who.owns(v.record.customer_id.as_deref()))
        .ok_or_else(unknown_order)
}

/// A bodiless action on one order (`cancel`, `dispatch`): authorized for `roles` (and the
/// order's own customer when `customers_may`), idempotent by key, carried out by the region
/// writer.
async fn order_route(
    s: &HubState,
    headers: &HeaderMap,
    (r, id): (String, String),
    body: Result<Bytes, BytesRejection>,
    (roles, customers_may): (&[TokenRole], bool),
    (name, action): (&str, OrderAction),
) -> Result<Response, ApiError> {
    let who = caller(s, headers, Some(&r), roles).await?;
    if who.customer().is_some() && !customers_may {
        return Err(super::caller::customer_forbidden());
    }
    let h = region(s, &r)?.clone();
    let bytes = larder_runtime::http::body_bytes(body)?;
    let idem = who.idempotency(
        headers,
        &format!("POST /v1/regions/{r}/orders/{id}/{name}"),
        &bytes,
    )?;
    let view = order_of(&h, &id, &who).await?;
    submit(
        &h,
        Some(view.record.fridge_id),
        Some(view.record.order_id),
        action,
        idem,
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/regions/{r}/orders/{id}/cancel",
    tag = "orders",
    summary = "Cancels an app order (a customer, only their own: another's is 404); honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id"), ("id" = String, Path, description = "Order id")),
    responses((status = 200, description = "The order after the cancel", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn cancel(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(path): ApiPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let roles = [TokenRole::Admin, TokenRole::App];
    order_route(
        &s,
        &headers,
        path,
        body,
        (&roles, true),
        ("cancel", OrderAction::Cancel),
    )
    .await
}

/// The kitchen sent a scheduled subscription order's meals.
#[utoipa::path(
    post,
    path = "/v1/regions/{r}/orders/{id}/dispatch",
    tag = "orders",
    summary = "The kitchen sent a scheduled subscription order's meals; honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id"), ("id" = String, Path, description = "Order id")),
    responses((status = 200, description = "The order after dispatch", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn dispatch(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(path): ApiPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let roles = [TokenRole::Admin, TokenRole::Kitchen];
    order_route(
        &s,
        &headers,
        path,
        body,
        (&roles, false),
        ("dispatch", OrderAction::Dispatch),
    )
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ConflictsQuery {
    /// `open` (default), `resolved` or `all`.
    status: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/regions/{r}/conflicts",
    tag = "conflicts",
    summary = "Conflict records of the region",
    params(("r" = String, Path, description = "Region id"), ConflictsQuery),
    responses((status = 200, description = "Conflicts", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn conflicts(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath(r): ApiPath<String>,
    ApiQuery(q): ApiQuery<ConflictsQuery>,
) -> Result<Response, ApiError> {
    authorize(
        &s,
        &headers,
        Some(&r),
        &[TokenRole::Admin, TokenRole::Kitchen],
    )?;
    let h = region(&s, &r)?;
    let wanted = q.status.unwrap_or_else(|| "open".into());
    if !matches!(wanted.as_str(), "open" | "resolved" | "all") {
        return Err(ApiError::invalid("status is open, resolved or all"));
    }
    let (reply, rx) = oneshot::channel();
    h.tx.send(RegionCommand::Conflicts { reply })
        .await
        .map_err(internal)?;
    let list: Vec<ConflictView> = rx.await.map_err(internal)?;
    let list: Vec<ConflictView> = list
        .into_iter()
        .filter(|c| wanted == "all" || c.status == wanted)
        .collect();
    Ok(Json(json!({ "conflicts": list })).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    #[schema(schema_with = super::openapi::resolution_action)]
    action: ResolutionAction,
    #[serde(default)]
    note: Option<String>,
    /// For `substitute`: the unit given instead.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    unit_id: Option<larder_shared::UnitId>,
}

#[utoipa::path(
    post,
    path = "/v1/regions/{r}/conflicts/{id}/resolve",
    tag = "conflicts",
    summary = "Resolves a conflict (refund, substitute or dismiss); honours Idempotency-Key",
    params(("r" = String, Path, description = "Region id"), ("id" = String, Path, description = "Conflict id")),
    request_body(content = ResolveBody, content_type = "application/json"),
    responses((status = 200, description = "The resolved conflict", body = AnyObject), Errors),
    security(("bearer" = []))
)]
pub(super) async fn resolve(
    State(s): State<HubState>,
    headers: HeaderMap,
    ApiPath((r, id)): ApiPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let token = authorize(
        &s,
        &headers,
        Some(&r),
        &[TokenRole::Admin, TokenRole::Kitchen],
    )?;
    let by = match token.role {
        TokenRole::Admin => "admin",
        TokenRole::Kitchen => "kitchen",
        TokenRole::App => "app",
    };
    let h = region(&s, &r)?.clone();
    let (req, bytes): (ResolveBody, _) = parse_body(body)?;
    if req.note.as_ref().is_some_and(|n| n.len() > 1000) {
        return Err(ApiError::invalid("note is at most 1000 bytes"));
    }
    let idem = larder_runtime::http::idempotency(
        &headers,
        &format!("POST /v1/regions/{r}/conflicts/{id}/resolve"),
        &bytes,
    )?;
    let resolution = Resolution {
        action: req.action,
        by: by.into(),
        at_ms: 0,
        note: req.note,
        unit_id: req.unit_id,
    };
    submit(
        &h,
        None,
        None,
        OrderAction::Resolve {
            conflict_id: id,
            resolution,
        },
        idem,
    )
    .await
}
