//! A stand-in payment provider for the tests: an HTTP API that takes capture requests (bearer
//! key, Idempotency-Key: a request repeated is one capture) and reports each outcome to the
//! hub's webhook, signed as a provider signs it (`larder_hub::payments::sign_webhook`),
//! delivering again until the hub answers 2xx. Orders whose id ends in `-refuse` are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

/// One webhook delivery as the provider sent it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub signature: String,
    pub status: u16,
}

#[derive(Default)]
struct Book {
    /// Capture requests per Idempotency-Key, and the body of the first.
    captures: BTreeMap<String, (usize, Value)>,
    deliveries: Vec<Delivery>,
    events: usize,
}

#[derive(Clone)]
struct Shared {
    book: Arc<Mutex<Book>>,
    secret: Vec<u8>,
    api_key: String,
    webhook: Arc<Mutex<Option<String>>>,
    http: reqwest::Client,
}

/// The stand-in provider, serving until dropped.
pub struct Provider {
    /// Its API's base URL (`[payments] url`).
    pub url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Provider {
    /// Starts the provider on a loopback port; it signs webhooks with `secret` and takes API
    /// calls bearing `api_key`.
    pub async fn start(secret: &str, api_key: &str) -> anyhow::Result<Self> {
        let shared = Shared {
            book: Arc::default(),
            secret: secret.as_bytes().to_vec(),
            api_key: api_key.to_owned(),
            webhook: Arc::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        let app = axum::Router::new()
            .route("/v1/captures", axum::routing::post(capture))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            shared,
            server,
        })
    }

    /// Where outcomes are reported: the hub's `POST /v1/payments/webhook`.
    pub fn report_to(&self, webhook_url: &str) {
        if let Ok(mut w) = self.shared.webhook.lock() {
            *w = Some(webhook_url.to_owned());
        }
    }

    /// Capture requests received per Idempotency-Key: how many, and the first's body.
    pub fn captures(&self) -> BTreeMap<String, (usize, Value)> {
        self.shared
            .book
            .lock()
            .map(|b| b.captures.clone())
            .unwrap_or_default()
    }

    /// Every webhook delivery so far, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared
            .book
            .lock()
            .map(|b| b.deliveries.clone())
            .unwrap_or_default()
    }

    /// A `Larder-Signature` header for `body` at `t` (Unix seconds), with this provider's
    /// secret.
    pub fn signature(&self, t: i64, body: &[u8]) -> String {
        format!(
            "t={t},v1={}",
            larder_hub::payments::sign_webhook(&self.shared.secret, t, body)
        )
    }
}

async fn capture(
    State(s): State<Shared>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> (StatusCode, axum::Json<Value>) {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(s.api_key.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "bad key"})),
        );
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "no key"})),
        );
    };
    let first = {
        let Ok(mut book) = s.book.lock() else {
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({})));
        };
        let entry = book
            .captures
            .entry(key.clone())
            .or_insert((0, body.clone()));
        entry.0 += 1;
        let first = entry.0 == 1;
        if first {
            book.events += 1;
        }
        first.then_some(book.events)
    };
    if let Some(n) = first {
        let order = body["order_id"].as_str().unwrap_or_default();
        let kind = if order.ends_with("-refuse") {
            "payment.refused"
        } else {
            "payment.captured"
        };
        let event = json!({"id": format!("evt-{n}"), "type": kind,
            "created": jiff::Timestamp::now().as_second(), "data": body});
        tokio::spawn(deliver(s, event));
    }
    (StatusCode::CREATED, axum::Json(json!({"capture": key})))
}

/// Sends one event to the hub's webhook, signed, again with backoff until it answers 2xx.
async fn deliver(s: Shared, event: Value) {
    let body = event.to_string().into_bytes();
    let mut wait = Duration::from_millis(100);
    for _ in 0..50 {
        let url = s.webhook.lock().ok().and_then(|w| w.clone());
        if let Some(url) = url {
            let t = jiff::Timestamp::now().as_second();
            let signature = format!(
                "t={t},v1={}",
                larder_hub::payments::sign_webhook(&s.secret, t, &body)
            );
            let status = s
                .http
                .post(&url)
                .header("content-type", "application/json")
                .header("larder-signature", &signature)
                .body(body.clone())
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            if let Ok(mut book) = s.book.lock() {
                book.deliveries.push(Delivery {
                    body: body.clone(),
                    signature,
                    status,
                });
            }
            if (200..300).contains(&status) {
                return;
            }
        }
        // A provider's retry schedule: back off between deliveries the hub did not take.
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}
