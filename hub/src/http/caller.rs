//! Who calls a route that customers reach too: a configured token (admin, kitchen, app), or a
//! customer with a token of the identity provider's (`[customers]`, `crate::identity`).
//! Customers reach only their own things; what is not theirs answers as if it did not exist.

use axum::http::{HeaderMap, StatusCode};
use larder_runtime::http::{ApiError, Idem};

use super::{HubState, bearer, permit, staff_token};
use crate::config::{TokenConfig, TokenRole};
use crate::identity::TokenError;

/// The caller of a route customers reach too.
#[derive(Debug, Clone)]
pub(crate) enum Caller<'a> {
    Staff(&'a TokenConfig),
    /// A customer: the provider's `sub`.
    Customer(String),
}

impl Caller<'_> {
    /// The customer, for a customer's token.
    pub(crate) fn customer(&self) -> Option<&str> {
        match self {
            Caller::Customer(c) => Some(c),
            Caller::Staff(_) => None,
        }
    }

    /// Whether the caller may see a record of customer `owner`: staff may, a customer only
    /// their own.
    pub(crate) fn owns(&self, owner: Option<&str>) -> bool {
        match self {
            Caller::Staff(_) => true,
            Caller::Customer(c) => owner == Some(c.as_str()),
        }
    }

    /// The request's Idempotency-Key, kept apart per customer: one customer's key never
    /// answers another's request with the first one's answer.
    pub(crate) fn idempotency(
        &self,
        headers: &HeaderMap,
        what: &str,
        body: &[u8],
    ) -> Result<Option<Idem>, ApiError> {
        let idem = larder_runtime::http::idempotency(headers, what, body)?;
        Ok(match self {
            Caller::Staff(_) => idem,
            Caller::Customer(c) => idem.map(|i| Idem {
                // A separator no Idempotency-Key header can carry: no other caller's key is
                // a customer's.
                key: format!("customer\u{1f}{}\u{1f}{}", super::token_sha256(c), i.key),
                request_sha256: i.request_sha256,
            }),
        })
    }
}

/// Whether a bearer token has a JWT's shape (three dot-separated parts), as customers' tokens
/// do and configured tokens (hex) do not.
pub(crate) fn jwt_shaped(token: &str) -> bool {
    token.split('.').count() == 3
}

pub(crate) fn customer_forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "a customer's token may not do that",
    )
}

/// The caller of a route customers reach too: a configured token with one of `staff` roles
/// and region `region`, or a customer of a region customers may use. 401 for a token neither
/// configured nor a valid customer token, 403 for one that may not, 503 when the provider's
/// keys cannot be had.
pub(crate) async fn caller<'a>(
    s: &'a HubState,
    headers: &HeaderMap,
    region: Option<&str>,
    staff: &[TokenRole],
) -> Result<Caller<'a>, ApiError> {
    let token = bearer(headers)?.trim();
    if let Some(t) = staff_token(s, token) {
        return permit(t, region, staff).map(Caller::Staff);
    }
    let customers = match &s.customers {
        Some(c) if jwt_shaped(token) => c,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown token",
            ));
        }
    };
    let customer = customers.verify(token).await.map_err(|e| match e {
        TokenError::Refused(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
        }
        TokenError::KeysUnavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "identity_unavailable",
            e.to_string(),
        ),
    })?;
    if let Some(r) = region
        && !customers.config().serves(r)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("customers may not use region {r} on this hub"),
        ));
    }
    Ok(Caller::Customer(customer))
}
