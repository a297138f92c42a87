//! The payment provider's webhook: the only way a payment outcome reaches the hub. Its
//! signature (`Larder-Signature`, HMAC-SHA256 over the timestamp and the raw body, within the
//! tolerance) is checked before anything else; each event id is taken once (its answer is kept
//! as an idempotent request's, so a replay changes nothing).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use larder_runtime::http::{ApiError, Idem, parse_body};
use larder_shared::ledger::PaymentOutcome;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::openapi::{AnyObject, Errors};
use super::{HubState, internal, region};
use crate::payments::{SIGNATURE_HEADER, WebhookEvent, verify_webhook};
use crate::region::{OrderAction, RegionCommand, RegionError};

#[utoipa::path(
    post,
    path = "/v1/payments/webhook",
    tag = "payments",
    summary = "The payment provider's events (payment.captured, payment.refused), signed in Larder-Signature (t=SECONDS,v1=HMAC-SHA256 hex of \"{t}.{body}\"); an event id is taken once, a replay answers as the first",
    params(("larder-signature" = String, Header, description = "t=UNIX_SECONDS,v1=HEX (more v1 while a secret rotates)")),
    request_body(content = WebhookEvent, content_type = "application/json"),
    responses((status = 200, description = "Taken: `applied` says whether the order took it (an order past taking a payment does not)", body = AnyObject), Errors),
    security(("provider_signature" = []))
)]
pub(super) async fn webhook(
    State(s): State<HubState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let p = s.payments.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_payment_provider",
            "this hub takes no provider's webhooks (orders.payment_provider is not external)",
        )
    })?;
    let bytes = larder_runtime::http::body_bytes(body)?;
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let now_s = s.clock.now_ms().div_euclid(1000);
    verify_webhook(&p.secret, signature, &bytes, now_s, p.tolerance_seconds).map_err(|e| {
        tracing::warn!(error = %e, "a payment webhook was refused");
        ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", e.to_string())
    })?;
    let (event, bytes): (WebhookEvent, _) = parse_body(Ok(bytes))?;
    if event.id.is_empty() || event.id.len() > 200 {
        return Err(ApiError::invalid("id is 1 to 200 bytes"));
    }
    let outcome = match event.kind.as_str() {
        "payment.captured" => PaymentOutcome::Captured,
        "payment.refused" => PaymentOutcome::Refused,
        // Providers send many kinds of event; one the hub has no use for is taken and ignored.
        _ => {
            return Ok(not_applied(
                &event,
                "an event of a kind the hub does not use",
            ));
        }
    };
    let Ok(h) = region(&s, &event.data.region).cloned() else {
        // Retrying would not help: the provider sends this hub another hub's event.
        tracing::warn!(event = %event.id, region = %event.data.region, "a payment event names a region this hub does not own");
        return Ok(not_applied(&event, "this hub does not own the region"));
    };
    let reads = h.reads.clone();
    let id = event.data.order_id.clone();
    // No such order (yet: the provider may be ahead of the hub's store) is 404, which the
    // provider retries.
    let view = tokio::task::spawn_blocking(move || reads.order(&id))
        .await
        .map_err(internal)??
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_order",
                "no such order in this region",
            )
        })?;
    let r = &view.record;
    if outcome == PaymentOutcome::Captured
        && (event.data.amount_minor != Some(r.total_minor)
            || event.data.currency.as_deref() != Some(r.payment.currency.as_str()))
    {
        tracing::warn!(event = %event.id, order = %r.order_id, "a capture's amount is not the order's: not applied (refund it)");
        return Ok(not_applied(
            &event,
            "the captured amount or currency is not the order's",
        ));
    }
    if view.status == larder_shared::domain::OrderStatus::Reserved
        && r.grace_until_ms.is_some_and(|g| s.clock.now_ms() < g)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "payment_too_early",
            "the order is in its grace window (free to cancel) and takes its payment after it: \
             send the event again later",
        ));
    }
    let idem = Idem {
        // A separator no Idempotency-Key header can carry: no client's key is an event's.
        key: format!("payment-event\u{1f}{}", event.id),
        request_sha256: hex::encode(Sha256::digest(&bytes)),
    };
    let (reply, rx) = oneshot::channel();
    h.tx.try_send(RegionCommand::Order {
        fridge: Some(view.record.fridge_id),
        order: Some(view.record.order_id),
        action: OrderAction::Payment(outcome),
        idem: Some(idem),
        reply,
    })
    .map_err(|_| ApiError::from(RegionError::Overloaded))?;
    match rx.await.map_err(internal)? {
        Ok(done) => Ok((
            StatusCode::OK,
            Json(json!({"event_id": event.id, "applied": true, "order": done.body()})),
        )
            .into_response()),
        // The order no longer takes a payment (timed out, cancelled, paid): taken, not applied.
        Err(RegionError::Ledger(e)) => {
            if outcome == PaymentOutcome::Captured {
                tracing::warn!(event = %event.id, order = %event.data.order_id, error = %e, "a capture came for an order that no longer takes one: not applied (refund it)");
            }
            Ok(not_applied(&event, &e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

fn not_applied(event: &WebhookEvent, why: &str) -> Response {
    (
        StatusCode::OK,
        Json(json!({"event_id": event.id, "applied": false, "reason": why})),
    )
        .into_response()
}
