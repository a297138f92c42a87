//! The agent's and hub's HTTP error contract: `{"error": {"code", "message"}}` with a fitting
//! status for malformed, invalid, too large, unknown and unauthorized requests, and nothing
//! changed by a refused request.

use larder_demo::{agent_config, hub_config, seeded_key};
use larder_hub::config::{TokenConfig, TokenRole};
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};

async fn call(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_bad_requests_in_the_contract_shape() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(
        dir.path(),
        "pos-1",
        Role::Pos,
        &fridge_ids(&["fridge-1", "fridge-2"]),
        hub_public_key(),
        "127.0.0.1:9",
    )?;
    config.http.request_body_bytes_max = 4096;
    let agent = larder_agent::start(config, seeded_key(7, "pos-1")).await?;
    let url = format!("http://{}", agent.http_addr);
    let c = http();
    let sale = |fridge: &str| json!({"fridge_id": fridge, "lines": [{"sku": "lasagna", "quantity": 1}], "payment": {"method": "card", "amount_minor": 890, "currency": "EUR"}});
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("broken json", c.post(format!("{url}/v1/sales")).header("content-type", "application/json").body("{\"fridge_id\": "), 400, "malformed_json"),
        ("not json", c.post(format!("{url}/v1/sales")).header("content-type", "text/plain").body("{}"), 415, "unsupported_media_type"),
        ("another origin", c.post(format!("{url}/v1/sales")).header("origin", "http://evil.example").json(&sale("fridge-1")), 403, "cross_origin"),
        ("unknown field", c.post(format!("{url}/v1/sales")).json(&json!({"fridge_id": "fridge-1", "lines": [], "payment": {"method": "card", "amount_minor": 1, "currency": "EUR"}, "tip": 1})), 422, "invalid_request"),
        ("bad id", c.post(format!("{url}/v1/refills")).json(&json!({"fridge_id": "a/b", "units": []})), 422, "invalid_request"),
        ("bad method", c.post(format!("{url}/v1/sales")).json(&json!({"fridge_id": "fridge-1", "lines": [], "payment": {"method": "iou", "amount_minor": 1, "currency": "EUR"}})), 422, "invalid_request"),
        ("too large", c.post(format!("{url}/v1/sales")).header("content-type", "application/json").body(vec![b' '; 8192]), 413, "too_large"),
        ("a cancel too large", c.post(format!("{url}/v1/orders/o-1/cancel")).header("content-type", "application/json").body(vec![b' '; 8192]), 413, "too_large"),
        ("unknown fridge", c.post(format!("{url}/v1/sales")).json(&sale("fridge-9")), 404, "unknown_fridge"),
        ("no catalog yet", c.post(format!("{url}/v1/sales")).json(&sale("fridge-1")), 422, "unknown_sku"),
        ("empty refill", c.post(format!("{url}/v1/refills")).json(&json!({"fridge_id": "fridge-1", "units": []})), 422, "invalid_request"),
        ("long idempotency key", c.post(format!("{url}/v1/sales")).header("Idempotency-Key", "k".repeat(300)).json(&sale("fridge-1")), 400, "bad_idempotency_key"),
        ("unknown order", c.get(format!("{url}/v1/orders/nope")), 404, "unknown_order"),
        ("bad status filter", c.get(format!("{url}/v1/orders?status=lost")), 422, "invalid_request"),
        ("stock needs a fridge", c.get(format!("{url}/v1/stock")), 400, "missing_fridge_id"),
        ("stock of another fridge", c.get(format!("{url}/v1/stock?fridge_id=fridge-9")), 404, "unknown_fridge"),
        ("no such route", c.get(format!("{url}/v2/everything")), 404, "not_found"),
        ("a route without that method", c.delete(format!("{url}/v1/orders/o-1")), 405, "method_not_allowed"),
    ];
    for (name, req, status, code) in cases {
        let (s, body) = call(req).await;
        assert_eq!(s, status, "{name}: {body}");
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
    }
    let (s, h) = call(c.get(format!("{url}/v1/health"))).await;
    assert_eq!(s, 200);
    assert_eq!(
        h["pending_changes"], 0,
        "refused requests changed nothing: {h}"
    );
    for field in [
        "device_id",
        "role",
        "region",
        "online",
        "last_sync_at",
        "catalog_version",
    ] {
        assert!(h.get(field).is_some(), "health has {field}: {h}");
    }
    // Made-up methods are refused and counted under one label, not one label each.
    for method in ["BREW", "WHEN"] {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let (s, body) = call(c.request(method, format!("{url}/v1/health"))).await;
        assert_eq!(s, 405, "{body}");
    }
    let metrics = metrics_text(&url).await?;
    assert!(
        metrics.contains("larder_agent_http_requests_total"),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"413\""), "{metrics}");
    assert!(
        metrics.contains(
            r#"larder_agent_http_requests_total{method="other",route="/v1/health",status="405"} 2"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("BREW"), "{metrics}");
    agent.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_checks_tokens_roles_and_regions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = larder_hub::mqtt::free_port()?;
    let mut config = hub_config(
        dir.path(),
        port,
        1,
        larder_hub::http::token_sha256(ADMIN_TOKEN),
    )?;
    let sha = larder_hub::http::token_sha256;
    config.tokens.push(TokenConfig {
        sha256: sha("kitchen"),
        role: TokenRole::Kitchen,
        regions: vec!["demo".into()],
    });
    config.tokens.push(TokenConfig {
        sha256: sha("app"),
        role: TokenRole::App,
        regions: vec!["demo".into()],
    });
    config.tokens.push(TokenConfig {
        sha256: sha("elsewhere"),
        role: TokenRole::Admin,
        regions: vec!["south".into()],
    });
    let hub = larder_hub::start(config, seeded_key(7, "hub")).await?;
    let url = format!("http://{}", hub.http_addr);
    let c = http();
    // Every /v1 route of a region, with the roles that may call it.
    const ALL: &[&str] = &["admin", "kitchen", "app"];
    const KITCHEN: &[&str] = &["admin", "kitchen"];
    const APP: &[&str] = &["admin", "app"];
    const ADMIN: &[&str] = &["admin"];
    // A customer's own: no configured token's role may (customers' tokens: e2e `customers::`).
    const CUSTOMER: &[&str] = &[];
    let routes: [(&str, &str, &[&str]); 25] = [
        ("GET", "/v1/regions/{r}/fridges", KITCHEN),
        ("GET", "/v1/regions/{r}/fridges/{f}/stock", KITCHEN),
        ("GET", "/v1/regions/{r}/orders", KITCHEN),
        ("POST", "/v1/regions/{r}/orders", APP),
        ("GET", "/v1/regions/{r}/orders/{id}", ALL),
        ("POST", "/v1/regions/{r}/orders/{id}/cancel", APP),
        ("POST", "/v1/regions/{r}/orders/{id}/dispatch", KITCHEN),
        ("POST", "/v1/regions/{r}/subscriptions", ALL),
        ("GET", "/v1/regions/{r}/subscriptions", ALL),
        ("DELETE", "/v1/regions/{r}/subscriptions/{id}", ALL),
        ("GET", "/v1/regions/{r}/refill-plan", KITCHEN),
        ("GET", "/v1/regions/{r}/prepare-report", KITCHEN),
        ("GET", "/v1/regions/{r}/conflicts", KITCHEN),
        ("POST", "/v1/regions/{r}/conflicts/{id}/resolve", KITCHEN),
        ("GET", "/v1/regions/{r}/shop/fridges", ALL),
        ("GET", "/v1/regions/{r}/me/orders", CUSTOMER),
        ("GET", "/v1/regions/{r}/catalog", ALL),
        ("PUT", "/v1/regions/{r}/catalog", ADMIN),
        ("POST", "/v1/regions/{r}/catalog/{sku}/ratings", APP),
        ("GET", "/v1/regions/{r}/events", KITCHEN),
        ("POST", "/v1/regions/{r}/imports/units", ADMIN),
        ("GET", "/v1/regions/{r}/devices", ADMIN),
        ("POST", "/v1/regions/{r}/devices", ADMIN),
        ("DELETE", "/v1/regions/{r}/devices/{d}", ADMIN),
        ("POST", "/v1/regions/{r}/compaction", ADMIN),
    ];
    // The OpenAPI document lists exactly these routes and the four without a region, each
    // `/v1` route with the bearer scheme and its errors in the contract's shape.
    let (s, doc) = call(c.get(format!("{url}/openapi.json"))).await;
    assert_eq!(s, 200, "{doc}");
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            documented.insert((method.to_uppercase(), path.clone()));
            if path == "/v1/payments/webhook" {
                // The provider signs its webhook instead (e2e `payments::`).
                assert_eq!(op["security"][0]["provider_signature"], json!([]));
            } else if path.starts_with("/v1") {
                assert_eq!(op["security"][0]["bearer"], json!([]), "{method} {path}");
                assert_eq!(
                    op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path}"
                );
            }
        }
    }
    let mut expected: std::collections::BTreeSet<(String, String)> = routes
        .iter()
        .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    for path in ["/", "/healthz", "/metrics", "/v1/regions"] {
        expected.insert(("GET".into(), path.into()));
    }
    expected.insert(("POST".into(), "/v1/payments/webhook".into()));
    assert_eq!(documented, expected, "/openapi.json against the routes");
    // A query string that does not parse is an error in the contract's shape too.
    let (s, b) = call(
        c.get(format!("{url}/v1/regions/demo/orders?limit=many"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (422, Some("invalid_request")),
        "{b}"
    );
    // So is a date past which there is no next day to plan for.
    for path in ["refill-plan", "prepare-report"] {
        let (s, b) = call(
            c.get(format!("{url}/v1/regions/demo/{path}?date=9999-12-31"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (422, Some("invalid_request")),
            "{path}: {b}"
        );
    }
    // So is a method a route does not take.
    let (s, b) = call(
        c.delete(format!("{url}/v1/regions"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{b}"
    );
    for (method, template, allowed) in routes {
        let path = template
            .replace("{r}", "demo")
            .replace("{f}", "fridge-1")
            .replace("{id}", "x-1")
            .replace("{sku}", "lasagna")
            .replace("{d}", "pos-1");
        let req = |token: Option<&str>| {
            let r = match method {
                "GET" => c.get(format!("{url}{path}")),
                "POST" => c.post(format!("{url}{path}")).json(&json!({})),
                "PUT" => c.put(format!("{url}{path}")).json(&json!({})),
                _ => c.delete(format!("{url}{path}")),
            };
            match token {
                Some(t) => r.bearer_auth(t),
                None => r,
            }
        };
        let (s, b) = call(req(None)).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path} without a token"
        );
        let (s, _) = call(req(Some("not-a-token"))).await;
        assert_eq!(s, 401, "{method} {path} with an unknown token");
        let (s, b) = call(req(Some("elsewhere"))).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path} with another region's token"
        );
        for role in ["kitchen", "app"]
            .into_iter()
            .filter(|r| !allowed.contains(r))
        {
            let (s, b) = call(req(Some(role))).await;
            assert_eq!(
                (s, b["error"]["code"].as_str()),
                (403, Some("forbidden")),
                "{method} {path} as {role}"
            );
        }
        for role in allowed {
            let token = if *role == "admin" { ADMIN_TOKEN } else { role };
            // Only the status: the event feed's body is a stream that stays open.
            let s = req(Some(token)).send().await?.status().as_u16();
            assert!(s != 401 && s != 403, "{method} {path} as {role}: {s}");
        }
    }
    let (s, b) = call(c.get(format!("{url}/v1/regions")).bearer_auth("elsewhere")).await;
    assert_eq!(s, 200);
    assert_eq!(
        b["regions"].as_array().map(Vec::len),
        Some(0),
        "a token sees only its regions: {b}"
    );
    let (s, b) = call(
        c.get(format!("{url}/v1/regions/south/fridges"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_region"))
    );
    let (s, _) = call(c.get(format!("{url}/healthz"))).await;
    assert_eq!(s, 200, "healthz needs no token");
    // Enrollment: invalid values are 422, a repeat of the same enrollment answers the same.
    let key = seeded_key(7, "pos-9").public();
    let body =
        json!({"device_id": "pos-9", "role": "pos", "fridges": ["fridge-1"], "public_key": key});
    let (s1, first) = call(
        c.post(format!("{url}/v1/regions/demo/devices"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body),
    )
    .await;
    let (s2, again) = call(
        c.post(format!("{url}/v1/regions/demo/devices"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body),
    )
    .await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first["public_key"], again["public_key"]);
    let other = json!({"device_id": "pos-9", "role": "pos", "fridges": ["fridge-1"], "public_key": seeded_key(8, "x").public()});
    let (s, b) = call(
        c.post(format!("{url}/v1/regions/demo/devices"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&other),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("device_exists"))
    );
    let bad =
        json!({"device_id": "pos-8", "role": "pos", "fridges": ["fridge-7"], "public_key": key});
    let (s, b) = call(
        c.post(format!("{url}/v1/regions/demo/devices"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&bad),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (422, Some("unknown_fridge"))
    );
    // With an Idempotency-Key: a retry answers as the first did; the key used for another
    // enrollment is 409 and enrolls nothing.
    let enroll_with_key = |body: &serde_json::Value| {
        c.post(format!("{url}/v1/regions/demo/devices"))
            .bearer_auth(ADMIN_TOKEN)
            .header("Idempotency-Key", "enroll-pos-7")
            .json(body)
    };
    let pos7 = json!({"device_id": "pos-7", "role": "pos", "fridges": ["fridge-1"], "public_key": seeded_key(7, "pos-7").public()});
    let (s1, first) = call(enroll_with_key(&pos7)).await;
    let (s2, again) = call(enroll_with_key(&pos7)).await;
    assert_eq!((s1, s2), (201, 201), "{first} {again}");
    assert_eq!(first, again);
    let pos6 = json!({"device_id": "pos-6", "role": "pos", "fridges": ["fridge-1"], "public_key": seeded_key(7, "pos-6").public()});
    let (s, b) = call(enroll_with_key(&pos6)).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    let (_, devices) = call(
        c.get(format!("{url}/v1/regions/demo/devices"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    let enrolled: Vec<&str> = devices["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert!(enrolled.contains(&"pos-7"), "{devices}");
    assert!(!enrolled.contains(&"pos-6"), "nothing enrolled: {devices}");
    hub.shutdown().await;
    Ok(())
}

/// The HTTP reference committed in `docs/openapi.json` is what a running hub serves at
/// `/openapi.json`. After changing the API, `LARDER_WRITE_OPENAPI=1 cargo test -p larder-tests
/// --test e2e openapi` writes the served document there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_openapi_document_is_what_the_hub_serves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path(), 1).await?;
    let (s, served) = call(http().get(format!("http://{}/openapi.json", hub.http_addr))).await;
    hub.shutdown().await;
    assert_eq!(s, 200, "{served}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    if std::env::var_os("LARDER_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&served)? + "\n")?;
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert!(
        committed == served,
        "docs/openapi.json differs from the hub's /openapi.json; after an API change, write it \
         with LARDER_WRITE_OPENAPI=1 cargo test -p larder-tests --test e2e openapi"
    );
    Ok(())
}
