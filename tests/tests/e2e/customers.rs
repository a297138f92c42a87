//! Customers end to end: tokens from a stand-in OpenID Connect provider (keys made in the
//! test, its JWKS served over HTTP), verified by a real hub; each customer reaches only their
//! own orders, subscriptions and ratings (another's answer as if they did not exist); the shop
//! and the order history. Real hub, a real fridge agent, MQTT over TCP, HTTP, SQLite.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use larder_demo::REGION;
use larder_demo::idp::{AUDIENCE, Idp, KeyKind};
use larder_runtime::Clock;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

const SKU: &str = "salad-quinoa";
const WAIT: Duration = Duration::from_secs(20);

struct Scene {
    hub_http: String,
    idp: Idp,
    offset: Arc<AtomicI64>,
    _hub: larder_hub::HubHandle,
    _fridge: larder_agent::AgentHandle,
    _dir: tempfile::TempDir,
}

impl Scene {
    /// A provider with one key of `kind`, a hub taking its tokens (its config adjusted by
    /// `tweak`), and a synced fridge holding 10 units.
    async fn new(
        kind: KeyKind,
        tweak: impl Fn(&mut larder_hub::config::HubConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let idp = Idp::start(kind).await?;
        let customers = idp.customers_config();
        let offset = Arc::new(AtomicI64::new(0));
        let hub = start_hub_with_clock(
            &dir.path().join("hub"),
            1,
            |c| {
                c.customers = Some(customers.clone());
                tweak(c);
            },
            Clock::offset(offset.clone()),
        )
        .await?;
        let hub_http = format!("http://{}", hub.http_addr);
        let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
        let fridge_url = format!("http://{}", fridge.http_addr);
        synced(&fridge_url, WAIT).await?;
        refill(&fridge_url, "fridge-1", "u", SKU, 10).await?;
        synced(&fridge_url, WAIT).await?;
        eventually(WAIT, "the refill at the hub", || async {
            let stock = hub_stock(&hub_http, "fridge-1").await.ok()?;
            (available(&stock, SKU) == 10).then_some(())
        })
        .await?;
        Ok(Self {
            hub_http,
            idp,
            offset,
            _hub: hub,
            _fridge: fridge,
            _dir: dir,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/regions/{REGION}{path}", self.hub_http)
    }

    /// Sends a request with bearer `token` (and `key` as Idempotency-Key, if given).
    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        token: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = http().request(method, url).bearer_auth(token);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn get_as(&self, token: &str, url: &str) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::GET, url, token, None, None)
            .await
    }

    async fn post_as(
        &self,
        token: &str,
        url: &str,
        key: &str,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::POST, url, token, Some(key), Some(body))
            .await
    }

    /// Customer `token` orders one unit.
    async fn order(&self, token: &str, key: &str) -> anyhow::Result<(u16, Value)> {
        self.post_as(
            token,
            &self.url("/orders"),
            key,
            &json!({"fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}]}),
        )
        .await
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_tokens_are_verified_against_the_providers_keys() -> anyhow::Result<()> {
    let s = Scene::new(KeyKind::P256, |_| {}).await?;
    let regions = format!("{}/v1/regions", s.hub_http);
    let alice = s.idp.token("alice")?;
    let (status, body) = s.get_as(&alice, &regions).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["regions"][0]["region"], REGION);
    // The key set is fetched once and cached.
    for _ in 0..5 {
        assert_eq!(s.get_as(&alice, &regions).await?.0, 200);
    }
    assert_eq!(s.idp.fetches(), 1);

    let now = jiff::Timestamp::now().as_second();
    let claims = |iss: &str, aud: &str, exp: i64| json!({"iss": iss, "aud": aud, "sub": "mallory", "exp": exp});
    let refused = [
        ("expired", s.idp.token_for("alice", -120)?),
        (
            "another issuer",
            s.idp
                .sign(claims("https://elsewhere.example", AUDIENCE, now + 600))?,
        ),
        (
            "another audience",
            s.idp
                .sign(claims(&s.idp.issuer, "another-app", now + 600))?,
        ),
        (
            "no subject",
            s.idp
                .sign(json!({"iss": s.idp.issuer, "aud": AUDIENCE, "exp": now + 600}))?,
        ),
        (
            "not yet valid",
            s.idp.sign(
                json!({"iss": s.idp.issuer, "aud": AUDIENCE, "sub": "mallory",
                "exp": now + 7200, "nbf": now + 3600}),
            )?,
        ),
        (
            "signed by a key never published",
            s.idp
                .forge(KeyKind::P256, claims(&s.idp.issuer, AUDIENCE, now + 600))?,
        ),
        (
            "a shared secret's signature",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims(&s.idp.issuer, AUDIENCE, now + 600),
                &jsonwebtoken::EncodingKey::from_secret(b"guessed"),
            )?,
        ),
        ("garbage in a JWT's shape", "a.b.c".to_owned()),
    ];
    for (what, token) in &refused {
        let (status, body) = s.get_as(token, &regions).await?;
        assert_eq!(
            (status, code(&body)),
            (401, "unauthorized"),
            "{what}: {body}"
        );
        let (status, _) = s.order(token, &format!("refused-{what}")).await?;
        assert_eq!(status, 401, "{what}");
    }
    let (_, all) = s.get_as(ADMIN_TOKEN, &s.url("/orders")).await?;
    assert_eq!(all["orders"], json!([]), "a refused token placed nothing");

    // A customer's token reaches no staff route.
    for path in [
        "/fridges",
        "/devices",
        "/conflicts",
        "/orders",
        "/refill-plan",
    ] {
        let (status, body) = s.get_as(&alice, &s.url(path)).await?;
        assert_eq!((status, code(&body)), (403, "forbidden"), "{path}: {body}");
    }
    let (status, body) = s.get_as(&alice, &format!("{}/metrics", s.hub_http)).await?;
    assert_eq!(status, 403, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_keys_rotate_without_a_restart() -> anyhow::Result<()> {
    let s = Scene::new(KeyKind::Ed25519, |c| {
        if let Some(customers) = &mut c.customers {
            customers.jwks_refresh_seconds = 1;
        }
    })
    .await?;
    let regions = format!("{}/v1/regions", s.hub_http);
    let old = s.idp.token("alice")?;
    assert_eq!(s.get_as(&old, &regions).await?.0, 200);

    // A new key is published and tokens are signed with it: the hub fetches the set again
    // when a token names a key it lacks.
    let new_kid = s.idp.rotate(KeyKind::P256)?;
    let new = s.idp.token("alice")?;
    eventually(WAIT, "a token of the new key taken", || async {
        (s.get_as(&new, &regions).await.ok()?.0 == 200).then_some(())
    })
    .await?;
    assert_eq!(
        s.get_as(&old, &regions).await?.0,
        200,
        "the old key is still published"
    );

    // The old key is retired: once the hub's copy of the set is older than
    // `jwks_refresh_seconds`, its tokens are refused and the new key's still taken.
    s.idp.retire("key-1")?;
    eventually(WAIT, "the retired key's token refused", || async {
        (s.get_as(&old, &regions).await.ok()?.0 == 401).then_some(())
    })
    .await?;
    assert_eq!(
        s.get_as(&new, &regions).await?.0,
        200,
        "{new_kid} still taken"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_reaches_only_their_own_orders() -> anyhow::Result<()> {
    let s = Scene::new(KeyKind::Ed25519, |_| {}).await?;
    let (alice, bob) = (s.idp.token("alice")?, s.idp.token("bob")?);

    // The customer comes from the token; a body naming one is refused and places nothing.
    let (status, body) = s
        .post_as(
            &alice,
            &s.url("/orders"),
            "named",
            &json!({"customer_id": "bob", "fridge_id": "fridge-1",
                "lines": [{"sku": SKU, "quantity": 1}]}),
        )
        .await?;
    assert_eq!((status, code(&body)), (422, "invalid_request"), "{body}");
    let (status, first) = s.order(&alice, "alice-1").await?;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["customer_id"], "alice");
    let id = first["order_id"].as_str().unwrap_or_default().to_owned();
    let (_, second) = s.order(&alice, "alice-2").await?;
    let all = get(&s.url("/orders")).await?;
    assert_eq!(all["orders"].as_array().map(Vec::len), Some(2), "{all}");

    // Bob's same Idempotency-Key and body is his own order, never Alice's answer.
    let (status, bobs) = s.order(&bob, "alice-1").await?;
    assert_eq!(status, 201, "{bobs}");
    assert_eq!(bobs["customer_id"], "bob");
    assert_ne!(bobs["order_id"], first["order_id"]);

    // Alice's order is as unknown to Bob as an order that does not exist.
    let (status, body) = s.get_as(&bob, &s.url(&format!("/orders/{id}"))).await?;
    let (none_status, none) = s.get_as(&bob, &s.url("/orders/app-none")).await?;
    assert_eq!((status, code(&body)), (404, "unknown_order"), "{body}");
    assert_eq!((none_status, code(&none)), (404, "unknown_order"));
    assert_eq!(body, none, "the same answer: ids do not leak");
    let (status, body) = s
        .post_as(
            &bob,
            &s.url(&format!("/orders/{id}/cancel")),
            "bob-cancel",
            &json!({}),
        )
        .await?;
    assert_eq!((status, code(&body)), (404, "unknown_order"), "{body}");
    let (status, mine) = s.get_as(&alice, &s.url(&format!("/orders/{id}"))).await?;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(mine["status"], "reserved", "Bob's cancel changed nothing");
    let (status, cancelled) = s
        .post_as(
            &alice,
            &s.url(&format!("/orders/{id}/cancel")),
            "alice-cancel",
            &json!({}),
        )
        .await?;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");

    // Her history: only hers, newest first, a page at a time.
    let (status, page) = s.get_as(&alice, &s.url("/me/orders?limit=1")).await?;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["orders"][0]["order_id"], second["order_id"]);
    let next = page["next"].as_str().unwrap_or_default().to_owned();
    let (_, page) = s
        .get_as(&alice, &s.url(&format!("/me/orders?limit=1&after={next}")))
        .await?;
    assert_eq!(page["orders"][0]["order_id"], first["order_id"], "{page}");
    let (_, last) = s
        .get_as(
            &alice,
            &s.url(&format!(
                "/me/orders?limit=1&after={}",
                page["next"].as_str().unwrap_or_default()
            )),
        )
        .await?;
    assert_eq!(last["orders"].as_array().map(Vec::len), Some(0), "{last}");
    assert_eq!(last["next"], Value::Null);
    let (_, bobs_history) = s.get_as(&bob, &s.url("/me/orders")).await?;
    let ids: Vec<&Value> = bobs_history["orders"]
        .as_array()
        .map(|a| a.iter().map(|o| &o["order_id"]).collect())
        .unwrap_or_default();
    assert_eq!(ids, [&bobs["order_id"]]);
    let (status, body) = s.get_as(ADMIN_TOKEN, &s.url("/me/orders")).await?;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    let (status, _) = s.get_as(&alice, &s.url("/me/orders?after=garbage")).await?;
    assert_eq!(status, 422);

    // The history reaches back 31 days.
    s.offset.fetch_add(32 * 86_400_000, Ordering::SeqCst);
    let (_, old) = s
        .get_as(&s.idp.token("alice")?, &s.url("/me/orders"))
        .await?;
    assert_eq!(old["orders"].as_array().map(Vec::len), Some(0), "{old}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_reaches_only_their_own_subscriptions_and_ratings() -> anyhow::Result<()> {
    let s = Scene::new(KeyKind::Ed25519, |_| {}).await?;
    let (alice, bob) = (s.idp.token("alice")?, s.idp.token("bob")?);
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let body = json!({"fridge_id": "fridge-1", "lines": [{"sku": SKU, "quantity": 1}],
        "weekdays": ["mon", "wed"], "start_date": today.to_string()});
    let (status, sub) = s
        .post_as(&alice, &s.url("/subscriptions"), "sub-a", &body)
        .await?;
    assert_eq!(status, 201, "{sub}");
    assert_eq!(sub["customer_id"], "alice");
    let sub_id = sub["subscription_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut named = body.clone();
    named["customer_id"] = json!("bob");
    let (status, _) = s
        .post_as(&alice, &s.url("/subscriptions"), "sub-n", &named)
        .await?;
    assert_eq!(status, 422);

    let (_, listed) = s.get_as(&bob, &s.url("/subscriptions")).await?;
    assert_eq!(
        listed["subscriptions"],
        json!([]),
        "Bob sees none of Alice's"
    );
    // Bob can neither end Alice's subscription nor skip one of its days.
    let tomorrow = today.tomorrow()?;
    for query in [String::new(), format!("?date={tomorrow}")] {
        let url = s.url(&format!("/subscriptions/{sub_id}{query}"));
        let (status, body) = s
            .call(reqwest::Method::DELETE, &url, &bob, None, None)
            .await?;
        assert_eq!(
            (status, code(&body)),
            (404, "unknown_subscription"),
            "{query}: {body}"
        );
    }
    let (_, listed) = s.get_as(&alice, &s.url("/subscriptions")).await?;
    assert_eq!(
        listed["subscriptions"][0]["subscription_id"],
        sub_id.as_str()
    );
    assert_eq!(
        listed["subscriptions"][0].get("ended_at_ms"),
        None,
        "Bob ended nothing"
    );
    let staff = get(&s.url("/subscriptions")).await?;
    assert_eq!(staff["subscriptions"].as_array().map(Vec::len), Some(1));
    let (status, body) = s
        .call(
            reqwest::Method::DELETE,
            &s.url(&format!("/subscriptions/{sub_id}")),
            &alice,
            None,
            None,
        )
        .await?;
    assert_eq!(status, 200, "{body}");

    // Ratings: one per customer per sku, the customer from the token.
    let ratings = s.url(&format!("/catalog/{SKU}/ratings"));
    let (status, body) = s
        .post_as(&alice, &ratings, "r-1", &json!({"stars": 5}))
        .await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s
        .post_as(&alice, &ratings, "r-2", &json!({"stars": 1}))
        .await?;
    assert_eq!((status, code(&body)), (409, "already_rated"), "{body}");
    let named = json!({"stars": 1, "customer_id": "carol"});
    let (status, _) = s.post_as(&alice, &ratings, "r-3", &named).await?;
    assert_eq!(status, 422);
    let (status, body) = s
        .post_as(&bob, &ratings, "r-4", &json!({"stars": 3}))
        .await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["count"], 2, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_shows_what_fridges_hold_for_sale_and_nothing_more() -> anyhow::Result<()> {
    // Opening hours that exclude now, in the region's time zone (UTC).
    let now = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .time();
    let at = |h: i64| {
        now.wrapping_add(jiff::SignedDuration::from_hours(h))
            .strftime("%H:%M")
            .to_string()
    };
    let closed = format!("{}-{}", at(2), at(3));
    let s = Scene::new(KeyKind::Ed25519, |c| {
        c.regions[0].fridges[0].opening_hours = Some(closed.clone());
    })
    .await?;
    let alice = s.idp.token("alice")?;
    let (status, placed) = s.order(&alice, "alice-1").await?;
    assert_eq!(status, 201, "{placed}");
    let reserved = placed["reserved_units"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!reserved.is_empty(), "{placed}");

    let (status, shop) = s
        .get_as(&s.idp.token("bob")?, &s.url("/shop/fridges"))
        .await?;
    assert_eq!(status, 200, "{shop}");
    let fridge = &shop["fridges"][0];
    assert_eq!(fridge["fridge_id"], "fridge-1");
    assert_eq!(fridge["site"], "site-1");
    assert_eq!(fridge["location"], "Lobby, 1 Market Street");
    assert_eq!(fridge["opening_hours"], closed.as_str());
    assert_eq!(fridge["open"], false, "{fridge}");
    assert_eq!(fridge["skus"][0]["sku"], SKU);
    assert_eq!(
        fridge["skus"][0]["available"], 9,
        "Alice's unit is not for sale"
    );
    assert_eq!(fridge["skus"][0]["price_minor"], price(SKU));
    // No unit ids, no reservations, nothing of Alice's.
    let text = shop.to_string();
    for secret in [reserved.as_str(), "alice", "reserved", "unit_id"] {
        assert!(!text.contains(secret), "{secret:?} in {text}");
    }
    Ok(())
}
