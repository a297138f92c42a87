//! The local API's guard against web pages on the device: only its own apps may call it (no
//! DNS rebinding, no cross-origin requests, no form posts).

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use larder_runtime::http::ApiError;

/// Whether a `Host` (or an `Origin`'s host) names this device by address or as `localhost`,
/// never by a domain name: a page that rebinds its own name to 127.0.0.1 still sends that name.
fn local_host(host: &str) -> bool {
    use std::net::{IpAddr, SocketAddr};
    if host.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok())
        .map_or(host, |(name, _)| name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// The local API answers the firmware and the POS app on the device, never a web page the
/// device happens to show: a `Host` that is not an address or `localhost` (DNS rebinding) is
/// 421, a request from another origin (a browser's `Origin` naming another host) is 403, and
/// a body that is not `application/json` is 415, which a cross-site form cannot send.
pub(super) async fn local_only(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text("host");
    if let Some(h) = host
        && !local_host(h)
    {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            format!("Host {h:?} does not name this device: use its address or localhost"),
        )
        .into_response();
    }
    if let Some(origin) = text("origin") {
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if Some(origin_host) != host {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!("requests from {origin:?} are refused: the local API serves this device's own apps"),
            )
            .into_response();
        }
    }
    let has_body = text("content-length").is_some_and(|l| l != "0")
        || headers.contains_key("transfer-encoding");
    let json = text("content-type").is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if req.method() == axum::http::Method::POST
        && (has_body || headers.contains_key("content-type"))
        && !json
    {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies are JSON: send Content-Type: application/json",
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_this_device() {
        let cases = [
            ("127.0.0.1:7070", true),
            ("127.0.0.1", true),
            ("localhost:7070", true),
            ("LOCALHOST", true),
            ("[::1]:7071", true),
            ("[::1]", true),
            ("192.168.1.20:7070", true),
            ("evil.example:7070", false),
            ("localhost.evil.example", false),
            ("127.0.0.1.nip.io:7070", false),
            ("", false),
        ];
        for (host, want) in cases {
            assert_eq!(local_host(host), want, "{host}");
        }
    }
}
