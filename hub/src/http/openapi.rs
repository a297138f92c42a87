//! The hub API's OpenAPI document (`GET /openapi.json`), built from the handlers' own
//! `#[utoipa::path]` annotations as the router registers them, so a route cannot exist without
//! its entry or the other way round.

use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Response, ResponseBuilder, ResponsesBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

/// Every error, in the contract's shape. Describes what `ApiError` answers; never built.
#[derive(Debug, ToSchema)]
#[expect(dead_code, reason = "a schema only: `ApiError` writes this shape")]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, ToSchema)]
#[expect(dead_code, reason = "a schema only: `ApiError` writes this shape")]
pub(crate) struct ErrorDetail {
    /// A stable, machine-readable code (`unauthorized`, `unknown_region`, `invalid_request`...).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A JSON object this document does not spell out field by field (the route's summary and
/// docs/PROTOCOL.md say what it holds).
#[derive(Debug)]
pub(crate) struct AnyObject;

impl PartialSchema for AnyObject {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A JSON object; the route's summary says what it holds",
            ))
            .into()
    }
}

impl ToSchema for AnyObject {}

/// A string that is one of `values`.
fn one_of(values: &[&str]) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
}

pub(crate) fn resolution_action() -> Object {
    one_of(&["refund", "substitute", "dismiss"])
}

pub(crate) fn device_role() -> Object {
    one_of(&["fridge", "pos"])
}

/// The errors every `/v1` route may answer, each in the contract's shape.
#[derive(Debug)]
pub(crate) struct Errors;

impl IntoResponses for Errors {
    fn responses() -> std::collections::BTreeMap<String, RefOr<Response>> {
        let answers = [
            ("400", "Malformed body, JSON, query or idempotency key"),
            (
                "401",
                "No bearer token, an unknown one, or a customer's token the identity provider's keys do not verify (expired, another issuer or audience)",
            ),
            ("403", "The token's role or regions do not allow this"),
            (
                "408",
                "Not answered within http.request_timeout_ms (a body sent too slowly)",
            ),
            (
                "404",
                "No such region, fridge, order, device, sku or subscription",
            ),
            (
                "409",
                "Conflicts with the current state, or an idempotency key reused",
            ),
            ("413", "Body too large"),
            ("415", "Body is not JSON"),
            ("422", "Well-formed but invalid request"),
            (
                "429",
                "Too many live event streams open (http.event_streams_max, per token or in all)",
            ),
            (
                "503",
                "The region's store is busy or unavailable, or the identity provider's keys cannot be fetched (`identity_unavailable`)",
            ),
        ];
        let mut responses = ResponsesBuilder::new();
        for (status, description) in answers {
            responses = responses.response(
                status,
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                            .build(),
                    )
                    .build(),
            );
        }
        responses.build().into()
    }
}

/// The bearer token scheme every `/v1` route requires.
#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "provider_signature",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "Larder-Signature",
                    "The payment provider's signature: t=UNIX_SECONDS,v1=hex HMAC-SHA256 of \"{t}.{raw body}\" with the webhook secret",
                ),
            )),
        );
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Larder hub API",
        description = "Regions, fridges, stock, orders, subscriptions, refill plans, conflicts, \
                       catalog, ratings, devices, the shop and the live event feed of a Larder \
                       hub. Every `/v1` route takes `Authorization: Bearer TOKEN`: a token of \
                       the hub's config (admin, kitchen, app), or on the routes that say so a \
                       customer's JWT from the identity provider (`[customers]`), which reaches \
                       only that customer's things. Errors are \
                       `{\"error\": {\"code\", \"message\"}}`. Writes that say so honour \
                       `Idempotency-Key`."
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth)
)]
pub(crate) struct ApiDoc;
