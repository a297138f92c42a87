//! Payments through a provider: the hub asks the provider's API to capture each app order
//! once its grace window is over, and takes every outcome only from the provider's signed
//! webhook (`POST /v1/payments/webhook`): HMAC-SHA256 over a timestamp and the raw body, in a
//! tolerance window, each event once. The simulated provider (`orders.payment_provider =
//! "simulated"`) stays for the demo and tests; it answers at once, in the region writer.

use std::path::PathBuf;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use larder_shared::payments::{PaymentProvider, SimulatedProvider};
use larder_shared::{OrderId, RegionId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::mpsc;

/// The header a webhook's signature travels in: `t=UNIX_SECONDS,v1=HEX[,v1=HEX…]`.
pub const SIGNATURE_HEADER: &str = "larder-signature";
/// `v1` signatures a header may carry (one per secret while secrets rotate).
const SIGNATURES_MAX: usize = 4;
/// Capture requests sent to the provider at once.
const CAPTURES_IN_FLIGHT: usize = 16;
/// Capture requests waiting for the provider's API, per hub.
pub const CAPTURE_QUEUE_MAX: usize = 4096;
/// Tries of one capture request before the order is left to its payment timeout.
const CAPTURE_TRIES: u32 = 5;
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[payments]` in the hub config: the provider behind `orders.payment_provider = "external"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentsConfig {
    /// The provider's API: the hub posts each capture to `{url}/captures`. Without it, the
    /// provider captures on its own (an app's checkout) and only reports outcomes.
    #[serde(default)]
    pub url: Option<String>,
    /// A file holding the bearer token the hub sends the provider's API.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// A file holding the secret the provider signs its webhooks with (required).
    pub webhook_secret_file: PathBuf,
    /// A webhook signed longer ago than this, or this far ahead, is refused (default 300).
    #[serde(default = "default_tolerance")]
    pub webhook_tolerance_seconds: u64,
}

fn default_tolerance() -> u64 {
    300
}

impl PaymentsConfig {
    /// What is wrong with this section, for `check-config` and start-up.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(url) = &self.url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "https" | "http") => {}
                Ok(u) => p.push(format!("payments.url: {} is not http(s)", u.scheme())),
                Err(e) => p.push(format!("payments.url: {e}")),
            }
            if self.api_key_file.is_none() {
                p.push("payments.api_key_file: the provider's API needs a key".into());
            }
        }
        if !(10..=3600).contains(&self.webhook_tolerance_seconds) {
            p.push("payments.webhook_tolerance_seconds: 10 to 3600".into());
        }
        p
    }
}

/// Reads a secret file: its text, trimmed; an error names the file.
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.len() < 16 {
        return Err(format!(
            "{}: a secret of at least 16 characters is required",
            path.display()
        ));
    }
    Ok(secret.to_owned())
}

/// The hub's side of an external provider: its webhook's secret and tolerance, and the queue
/// of capture requests to its API (when `[payments] url` is set).
pub struct Payments {
    pub secret: Vec<u8>,
    pub tolerance_seconds: u64,
    pub captures: Option<mpsc::Sender<CaptureRequest>>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("tolerance_seconds", &self.tolerance_seconds)
            .field("captures", &self.captures.is_some())
            .finish_non_exhaustive()
    }
}

impl Payments {
    /// The provider of `orders.payment_provider = "external"`, its secrets read and its
    /// capture task started; `None` for the simulated provider.
    pub fn start(
        config: &crate::config::HubConfig,
        clock: larder_runtime::Clock,
    ) -> Result<Option<Self>, String> {
        if config.orders.payment_provider != crate::config::PaymentProviderMode::External {
            return Ok(None);
        }
        let p = config
            .payments
            .as_ref()
            .ok_or("orders.payment_provider = \"external\" needs a [payments] section")?;
        let secret = read_secret(&p.webhook_secret_file)?.into_bytes();
        let captures = match (&p.url, &p.api_key_file) {
            (Some(url), Some(key)) => Some(spawn_captures(url.clone(), read_secret(key)?, clock)),
            _ => None,
        };
        Ok(Some(Self {
            secret,
            tolerance_seconds: p.webhook_tolerance_seconds,
            captures,
        }))
    }
}

/// A capture the region writer asks of the provider's API.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureRequest {
    pub region: RegionId,
    pub order_id: OrderId,
    pub amount_minor: i64,
    pub currency: String,
    /// The order's payment timeout (Unix ms): a request not sent by then is dropped, since
    /// the order is released then and a capture after it would take money for nothing.
    #[serde(skip)]
    pub deadline_ms: i64,
}

/// How a region writer captures an app order once its grace window is over.
#[derive(Debug)]
pub enum Capturer {
    /// The simulated provider answers at once.
    Simulated(SimulatedProvider),
    /// Requests go to the provider's API; outcomes come back by webhook.
    Provider(mpsc::Sender<CaptureRequest>),
    /// The provider captures on its own and reports by webhook.
    None,
}

impl Capturer {
    /// The simulated provider of region `region`, seeded by its name.
    pub fn simulated(region: &RegionId, rates: larder_shared::payments::SimulatedRates) -> Self {
        let seed = region
            .as_str()
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        Self::Simulated(SimulatedProvider::new(seed, rates))
    }

    /// Whether the writer starts captures (and so wakes at each grace window's end).
    pub fn captures(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// The simulated provider, if this is it.
    pub fn simulated_provider(&self) -> Option<&dyn PaymentProvider> {
        match self {
            Self::Simulated(p) => Some(p),
            _ => None,
        }
    }
}

/// Starts the task that posts capture requests to the provider's API, each with an
/// Idempotency-Key of its region and order (a request sent twice, after a restart too, is
/// one capture), up to [`CAPTURES_IN_FLIGHT`] at once. A request is tried again with backoff
/// while the provider fails (5xx, 429, no answer), never past the order's payment timeout; a
/// request the provider refuses (4xx) is not tried again. Either way the order then times out
/// as one the provider never answered.
pub fn spawn_captures(
    url: String,
    api_key: String,
    clock: larder_runtime::Clock,
) -> mpsc::Sender<CaptureRequest> {
    let (tx, mut rx) = mpsc::channel::<CaptureRequest>(CAPTURE_QUEUE_MAX);
    let client: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(CAPTURE_TIMEOUT))
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into();
    let endpoint = std::sync::Arc::new(format!("{}/captures", url.trim_end_matches('/')));
    let api_key = std::sync::Arc::new(api_key);
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(CAPTURES_IN_FLIGHT));
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let (client, endpoint, api_key, clock) = (
                client.clone(),
                endpoint.clone(),
                api_key.clone(),
                clock.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                capture(&client, &endpoint, &api_key, &clock, req).await;
            });
        }
    });
    tx
}

/// Sends one capture request, trying again while the provider fails, until its deadline.
async fn capture(
    client: &ureq::Agent,
    endpoint: &str,
    api_key: &str,
    clock: &larder_runtime::Clock,
    req: CaptureRequest,
) {
    let key = format!("capture:{}:{}", req.region, req.order_id);
    let body = serde_json::to_vec(&req).unwrap_or_default();
    let mut wait = Duration::from_millis(500);
    for attempt in 1..=CAPTURE_TRIES {
        if clock.now_ms() >= req.deadline_ms {
            tracing::warn!(region = %req.region, order = %req.order_id, "a capture request reached its order's payment timeout unsent; dropped");
            return;
        }
        let (client, endpoint, auth, key, body) = (
            client.clone(),
            endpoint.to_owned(),
            format!("Bearer {api_key}"),
            key.clone(),
            body.clone(),
        );
        let sent = tokio::task::spawn_blocking(move || {
            client
                .post(&endpoint)
                .header("authorization", &auth)
                .header("idempotency-key", &key)
                .header("content-type", "application/json")
                .send(body.as_slice())
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let retry = match sent {
            Ok(s) if (200..300).contains(&s) => return,
            Ok(s) if s == 429 || s >= 500 => format!("HTTP {s}"),
            Ok(s) => {
                tracing::warn!(region = %req.region, order = %req.order_id, status = s, "the payment provider refused a capture; the order will time out");
                return;
            }
            Err(e) => e,
        };
        if attempt == CAPTURE_TRIES {
            tracing::warn!(region = %req.region, order = %req.order_id, error = %retry, "the payment provider did not take a capture; the order will time out");
            return;
        }
        tracing::info!(region = %req.region, order = %req.order_id, error = %retry, attempt, "capture request failed; trying again");
        // Backing off between tries of a request the provider did not take: the wait is the
        // point.
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}

/// Why a webhook was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("no Larder-Signature header")]
    Missing,
    #[error("the Larder-Signature header is not t=SECONDS,v1=HEX")]
    Malformed,
    #[error("the signature is {0} s away from the hub's clock, past the tolerance")]
    Stale(i64),
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// The `v1` signature of `body` sent at `t` (Unix seconds) with `secret`: hex HMAC-SHA256 of
/// `"{t}.{body}"`.
pub fn sign_webhook(secret: &[u8], t: i64, body: &[u8]) -> String {
    hex::encode(mac(secret, t, body).finalize().into_bytes())
}

fn mac(secret: &[u8], t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// Checks a webhook's signature header against its raw body, at `now_s` (Unix seconds).
pub fn verify_webhook(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_s: i64,
    tolerance_s: u64,
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::Missing)?;
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| WebhookError::Malformed)?),
            Some(("v1", _)) if sigs.len() == SIGNATURES_MAX => {
                return Err(WebhookError::Malformed);
            }
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| WebhookError::Malformed)?),
            Some(_) => {}
            None => return Err(WebhookError::Malformed),
        }
    }
    let t = t.ok_or(WebhookError::Malformed)?;
    if sigs.is_empty() {
        return Err(WebhookError::Malformed);
    }
    let skew = now_s.saturating_sub(t);
    if skew.unsigned_abs() > tolerance_s {
        return Err(WebhookError::Stale(skew));
    }
    // The body is hashed once; each signature is checked (in constant time) against a copy of
    // that state.
    let hashed = mac(secret, t, body);
    sigs.iter()
        .any(|s| hashed.clone().verify_slice(s).is_ok())
        .then_some(())
        .ok_or(WebhookError::Mismatch)
}

/// A webhook event as the provider sends it.
/// Fields the hub does not read are ignored: providers add to their events.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct WebhookEvent {
    /// The provider's id of the event: each is taken once.
    pub id: String,
    /// `payment.captured` or `payment.refused`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the provider made it (Unix seconds).
    #[serde(default)]
    pub created: Option<i64>,
    pub data: WebhookData,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct WebhookData {
    pub region: String,
    pub order_id: String,
    #[serde(default)]
    pub amount_minor: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-0123456789abcdef";

    #[test]
    fn an_external_provider_needs_its_section_and_a_url_needs_a_key() {
        let problems = |text: &str| {
            toml::from_str::<crate::config::HubConfig>(text)
                .expect("parses")
                .problems()
                .into_iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let base = "[[regions]]\nid = \"north\"\n[orders]\npayment_provider = \"external\"\n";
        assert!(problems(base).contains("needs a [payments] section"));
        let keyless = format!(
            "{base}[payments]\nurl = \"https://pay.example.com\"\nwebhook_secret_file = \"s\"\n"
        );
        assert!(problems(&keyless).contains("payments.api_key_file"));
        let ok = format!("{base}[payments]\nwebhook_secret_file = \"s\"\n");
        assert_eq!(problems(&ok), "");
    }

    #[test]
    fn a_short_or_missing_secret_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").expect("write");
        assert!(read_secret(&short).is_err_and(|e| e.contains("at least 16")));
        assert!(read_secret(&dir.path().join("none")).is_err());
        let good = dir.path().join("good");
        std::fs::write(&good, "  whsec-0123456789abcdef\n").expect("write");
        assert_eq!(read_secret(&good).as_deref(), Ok("whsec-0123456789abcdef"));
    }

    #[test]
    fn a_signed_body_verifies_in_its_window_and_nothing_else_does() {
        let body = br#"{"id":"evt-1"}"#;
        let good = format!("t=1000,v1={}", sign_webhook(SECRET, 1000, body));
        assert_eq!(verify_webhook(SECRET, Some(&good), body, 1200, 300), Ok(()));
        // A rotated secret: either signature may match.
        let two = format!(
            "t=1000,v1={},v1={}",
            "00".repeat(32),
            sign_webhook(SECRET, 1000, body)
        );
        assert_eq!(verify_webhook(SECRET, Some(&two), body, 1000, 300), Ok(()));
        // At most four signatures: a header of many is refused unread.
        let many = format!("t=1000{}", ",v1=00".repeat(5));
        assert_eq!(
            verify_webhook(SECRET, Some(&many), body, 1000, 300),
            Err(WebhookError::Malformed)
        );
        assert_eq!(
            verify_webhook(SECRET, Some(&good), body, 1301, 300),
            Err(WebhookError::Stale(301))
        );
        assert_eq!(
            verify_webhook(SECRET, Some(&good), br#"{"id":"evt-2"}"#, 1000, 300),
            Err(WebhookError::Mismatch)
        );
        assert_eq!(
            verify_webhook(b"another-secret-000", Some(&good), body, 1000, 300),
            Err(WebhookError::Mismatch)
        );
        // The timestamp is signed too: moving it breaks the signature.
        let moved = good.replace("t=1000", "t=1100");
        assert_eq!(
            verify_webhook(SECRET, Some(&moved), body, 1100, 300),
            Err(WebhookError::Mismatch)
        );
        for bad in [
            "",
            "t=x,v1=00",
            "v1=00",
            "t=1000",
            "t=1000,v1=zz",
            "garbage",
        ] {
            assert_eq!(
                verify_webhook(SECRET, Some(bad), body, 1000, 300),
                Err(WebhookError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            verify_webhook(SECRET, None, body, 1000, 300),
            Err(WebhookError::Missing)
        );
    }
}
