//! Payments through a provider, end to end: the hub asks the provider's API to capture each app
//! order after its grace window (once, by Idempotency-Key), and takes the outcome only from the
//! provider's signed webhook: a forged, altered or stale one is refused and changes nothing, a
//! replayed one changes nothing, and no token can set a payment any more. The provider is a
//! server the test starts (`larder_demo::provider`); hub, fridge agent, MQTT, HTTP and SQLite
//! are real.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use larder_demo::REGION;
use larder_demo::provider::Provider;
use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const SKU: &str = "salad-quinoa";
const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "whsec-test-0123456789abcdef";
const API_KEY: &str = "sk-test-0123456789abcdef";

struct Scene {
    hub_http: String,
    fridge_url: String,
    provider: Provider,
    offset: Arc<AtomicI64>,
    _hub: larder_hub::HubHandle,
    _fridge: larder_agent::AgentHandle,
    _dir: tempfile::TempDir,
}

impl Scene {
    async fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let provider = Provider::start(SECRET, API_KEY).await?;
        let (secret_file, key_file) = (
            dir.path().join("webhook.secret"),
            dir.path().join("api.key"),
        );
        std::fs::write(&secret_file, format!("{SECRET}\n"))?;
        std::fs::write(&key_file, API_KEY)?;
        let offset = Arc::new(AtomicI64::new(0));
        let url = provider.url.clone();
        let hub = start_hub_with_clock(
            &dir.path().join("hub"),
            1,
            |c| {
                c.orders.tick_interval_ms = 20;
                c.orders.grace_window_seconds = 10;
                c.orders.payment_timeout_seconds = 30;
                c.orders.payment_provider = larder_hub::config::PaymentProviderMode::External;
                c.payments = Some(larder_hub::payments::PaymentsConfig {
                    url: Some(url.clone()),
                    api_key_file: Some(key_file.clone()),
                    webhook_secret_file: secret_file.clone(),
                    webhook_tolerance_seconds: 300,
                });
            },
            Clock::offset(offset.clone()),
        )
        .await?;
        let hub_http = format!("http://{}", hub.http_addr);
        provider.report_to(&format!("{hub_http}/v1/payments/webhook"));
        let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
        let fridge_url = format!("http://{}", fridge.http_addr);
        synced(&fridge_url, WAIT).await?;
        refill(&fridge_url, "fridge-1", "u", SKU, 10).await?;
        synced(&fridge_url, WAIT).await?;
        Ok(Self {
            hub_http,
            fridge_url,
            provider,
            offset,
            _hub: hub,
            _fridge: fridge,
            _dir: dir,
        })
    }

    async fn place(&self, id: &str) -> anyhow::Result<()> {
        let (status, body) = post(
            &format!("{}/v1/regions/{REGION}/orders", self.hub_http),
            &format!("place-{id}"),
            &json!({"customer_id": "c-1", "fridge_id": "fridge-1", "order_id": id,
                "lines": [{"sku": SKU, "quantity": 1}]}),
        )
        .await?;
        anyhow::ensure!(status == 201, "{body}");
        Ok(())
    }

    async fn order(&self, id: &str) -> anyhow::Result<Value> {
        hub_order(&self.hub_http, id).await
    }

    /// Posts a webhook body with a signature header as a provider (or a forger) would.
    async fn webhook(&self, body: &[u8], signature: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut req = http()
            .post(format!("{}/v1/payments/webhook", self.hub_http))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("Larder-Signature", s);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_come_only_from_the_providers_signed_webhook() -> anyhow::Result<()> {
    let s = Scene::new().await?;
    s.place("p-1").await?;
    s.place("p-2-refuse").await?;
    s.place("p-3").await?;

    // Before the grace window ends, no capture is asked, and an authentic event for the order
    // is answered 409 (the provider sends it again later).
    let now = jiff::Timestamp::now().as_second();
    let event = |id: &str, kind: &str, region: &str, order: &str, amount: i64| {
        json!({"id": id, "type": kind, "extra": "ignored",
            "data": {"region": region, "order_id": order, "amount_minor": amount, "currency": "EUR"}})
        .to_string()
    };
    let scene = &s;
    let send = |body: String| async move {
        let signature = scene.provider.signature(now, body.as_bytes());
        scene.webhook(body.as_bytes(), Some(&signature)).await
    };
    let early = event("evt-early", "payment.captured", REGION, "p-3", price(SKU));
    let (status, body) = send(early).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("payment_too_early")),
        "{body}"
    );
    assert!(s.provider.captures().is_empty());
    // An event for another hub's region is taken and not applied; one for an order the region
    // does not have (yet) is 404, for the provider to send again; a capture of another amount
    // is not applied.
    let (status, body) = send(event("evt-x", "payment.captured", "elsewhere", "p-3", 1)).await?;
    assert_eq!((status, &body["applied"]), (200, &json!(false)), "{body}");
    let (status, _) = send(event("evt-y", "payment.captured", REGION, "p-none", 1)).await?;
    assert_eq!(status, 404);

    // Past the grace window the hub asks the provider, once per order, with its key; the
    // provider's signed webhooks move the orders on, at the hub and at the fridge.
    s.offset.fetch_add(11_000, Ordering::SeqCst);
    eventually(WAIT, "p-1 paid and p-2 refused", || async {
        let (a, b) = (
            s.order("p-1").await.ok()?,
            s.order("p-2-refuse").await.ok()?,
        );
        (a["status"] == "available_for_picking" && b["status"] == "payment_refused").then_some(())
    })
    .await?;
    eventually(WAIT, "p-1 paid at the fridge", || async {
        (agent_order(&s.fridge_url, "p-1").await?["status"] == "available_for_picking")
            .then_some(())
    })
    .await?;
    let captures = s.provider.captures();
    let key = format!("capture:{REGION}:p-1");
    assert_eq!(captures.get(&key).map(|c| c.0), Some(1), "{captures:?}");
    assert_eq!(captures[&key].1["amount_minor"], price(SKU));
    assert_eq!(captures[&key].1["currency"], "EUR");

    let (status, body) = send(event("evt-z", "payment.captured", REGION, "p-3", 1)).await?;
    assert_eq!((status, &body["applied"]), (200, &json!(false)), "{body}");

    // A replay of a delivered event is answered and changes nothing.
    let delivered = s
        .provider
        .deliveries()
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains("\"p-1\""))
        .ok_or_else(|| anyhow::anyhow!("no delivery for p-1"))?;
    assert_eq!(delivered.status, 200);
    let before = s.order("p-1").await?;
    let (status, body) = s
        .webhook(&delivered.body, Some(&delivered.signature))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.order("p-1").await?, before, "the replay changed nothing");
    // The same event id with another body is refused.
    let mut other: Value = serde_json::from_slice(&delivered.body)?;
    other["type"] = json!("payment.refused");
    let other = other.to_string();
    let (status, body) = s
        .webhook(
            other.as_bytes(),
            Some(&s.provider.signature(now, other.as_bytes())),
        )
        .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused")),
        "{body}"
    );

    // p-3 (its capture asked too) gets forged, altered, stale and unsigned outcomes first:
    // each is refused and the order is as it was.
    let forged = json!({"id": "evt-forged", "type": "payment.refused",
        "data": {"region": REGION, "order_id": "p-3"}})
    .to_string();
    let now = jiff::Timestamp::now().as_second() + 11;
    let wrong_secret = format!(
        "t={now},v1={}",
        larder_hub::payments::sign_webhook(b"a-guessed-secret-0000", now, forged.as_bytes())
    );
    let altered = forged.replace("payment.refused", "payment.captured");
    let attempts = [
        ("another secret", forged.clone(), Some(wrong_secret)),
        (
            "an altered body",
            altered,
            Some(s.provider.signature(now, forged.as_bytes())),
        ),
        (
            "a stale signature",
            forged.clone(),
            Some(s.provider.signature(now - 600, forged.as_bytes())),
        ),
        ("no signature", forged.clone(), None),
    ];
    for (what, body, signature) in attempts {
        let (status, answer) = s.webhook(body.as_bytes(), signature.as_deref()).await?;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (401, Some("bad_signature")),
            "{what}: {answer}"
        );
    }
    eventually(WAIT, "p-3 paid by the provider's own event", || async {
        (s.order("p-3").await.ok()?["status"] == "available_for_picking").then_some(())
    })
    .await?;

    // No token sets a payment: the old route is gone.
    let (status, _) = post(
        &format!("{}/v1/regions/{REGION}/orders/p-3/payment", s.hub_http),
        "pay",
        &json!({"outcome": "refused"}),
    )
    .await?;
    assert_eq!(status, 404);
    assert_eq!(s.order("p-3").await?["status"], "available_for_picking");
    Ok(())
}
