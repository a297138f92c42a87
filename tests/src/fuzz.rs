//! Fuzz harnesses: one function per decoder that reads from the network or a file, each taking
//! arbitrary bytes. The cargo-fuzz targets in `fuzz/` call them, and the e2e test
//! `fuzz_corpus` replays the seeds and every past crash through them on each `cargo test`.
//!
//! A harness panics only when the code under it breaks a promise: a panic inside the code, a
//! 5xx answer from an API, an error body not in the contract's shape.

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::body::Body as HttpBody;
use http_body_util::BodyExt;
use larder_shared::domain::Role;
use larder_shared::envelope::{self, Body};
use larder_shared::ledger::{Ledger, actor_for};
use larder_shared::{DeviceId, FridgeId, PublicKey};
use tower::ServiceExt;

/// A harness: arbitrary bytes in, a panic only for a broken promise.
pub type Harness = fn(&[u8]);

/// The targets, by the name their corpus folder and cargo-fuzz binary carry.
pub const TARGETS: &[(&str, Harness)] = &[
    ("envelope", envelope),
    ("body", body),
    ("ledger_change", ledger_change),
    ("connect_token", connect_token),
    ("agent_request", agent_request),
    ("hub_request", hub_request),
    ("import_rows", import_rows),
    ("config", config),
];

/// The fuzz crate: `fuzz/corpus/<target>/` holds the seeds `larder-fuzz-seeds` writes (not
/// committed), `fuzz/regressions/<target>/` the inputs that once crashed a target.
pub fn fuzz_dir() -> PathBuf {
    repo().join("fuzz")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn device() -> DeviceId {
    DeviceId::new("fuzz-pos").unwrap_or_else(|_| unreachable!("a valid id"))
}

fn fridge() -> FridgeId {
    FridgeId::new("fridge-1").unwrap_or_else(|_| unreachable!("a valid id"))
}

fn a_key() -> PublicKey {
    larder_demo::seeded_key(7, "fuzz-pos").public()
}

/// An envelope as it arrives on an MQTT topic: decoded strictly, then checked against a key.
pub fn envelope(data: &[u8]) {
    let Ok(unverified) = envelope::open(data, 256 * 1024) else {
        return;
    };
    let _ = unverified.header();
    assert_eq!(unverified.encoded_len(), data.len());
    // The seed is signed by this key, so the fuzzer starts inside the signature: past it, the
    // hub opens the sealed body with its box key.
    static HUB_BOX: OnceLock<envelope::BoxKey> = OnceLock::new();
    let hub_box =
        HUB_BOX.get_or_init(|| envelope::BoxKey::new(&larder_demo::seeded_key(7, "hub"), &a_key()));
    if let Ok(verified) = unverified.verify(data, &a_key()) {
        let _ = verified.open_sealed(&[hub_box]);
    }
}

/// An opened envelope body (a sync message, an ack, a catalog, a key rotation), and what the
/// receiver then does with it: change batches are checked for authorship and merged into a
/// ledger; a rebase is decoded.
pub fn body(data: &[u8]) {
    let Ok(body) = Body::decode(data) else {
        return;
    };
    let _ = body.kind();
    if let Body::Changes(batch) = body {
        let changes: Vec<Vec<u8>> = batch.entries.iter().map(|e| e.change.clone()).collect();
        let _ = Ledger::check_authors(&changes, &actor_for(&device()));
        if let Ok(mut ledger) = Ledger::new(fridge(), actor_for(&device())) {
            let _ = ledger.apply_changes(&changes);
        }
        for e in &batch.entries {
            let _ = envelope::Rebase::decode(&e.change);
        }
    }
}

/// One ledger change as a peer sends it, merged into a ledger and projected; and the same
/// bytes as a saved document, as the store loads one.
pub fn ledger_change(data: &[u8]) {
    if let Ok(mut ledger) = Ledger::new(fridge(), actor_for(&device())) {
        let change = vec![data.to_vec()];
        if ledger.apply_changes(&change).is_ok() {
            let _ = ledger.units(0);
            let _ = ledger.detect_conflicts(None);
            let _ = ledger.state_digest();
        }
    }
    if let Ok(ledger) = Ledger::load(fridge(), actor_for(&device()), Some(data), &[]) {
        let _ = ledger.units(0);
        let _ = ledger.order_ids();
    }
}

/// The MQTT password a device connects with (a token signed with its key).
pub fn connect_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    // A hub's clock in 2027 and its default token age (the seed is a valid token then).
    let _ = larder_shared::auth::verify_connect_token(
        token,
        &a_key(),
        &device(),
        1_800_000_000_000,
        300_000,
    );
}

/// A running hub with one fridge agent and one POS agent syncing through it, all in-process,
/// built once per process; the harnesses call their routers without sockets.
struct World {
    runtime: tokio::runtime::Runtime,
    hub: axum::Router,
    pos: axum::Router,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a runtime: {e}"));
        // The folder lives as long as the process: the stores are in it.
        let dir = tempfile::tempdir()
            .unwrap_or_else(|e| panic!("a temporary folder: {e}"))
            .keep();
        let (hub, pos) = runtime.block_on(async {
            let hub = crate::start_hub(&dir, 2)
                .await
                .unwrap_or_else(|e| panic!("the hub starts: {e:#}"));
            let fridge = crate::start_agent(&dir, &hub, "fridge-1", Role::Fridge, &["fridge-1"])
                .await
                .unwrap_or_else(|e| panic!("the fridge agent starts: {e:#}"));
            crate::refill(
                &format!("http://{}", fridge.http_addr),
                "fridge-1",
                "fz",
                "salad-quinoa",
                20,
            )
            .await
            .unwrap_or_else(|e| panic!("the fridge is stocked: {e:#}"));
            let pos = crate::start_agent(&dir, &hub, "fuzz-pos", Role::Pos, &["fridge-1"])
                .await
                .unwrap_or_else(|e| panic!("the POS agent starts: {e:#}"));
            let routers = (hub.api.clone(), pos.api.clone());
            // Both keep running for the life of the process.
            std::mem::forget(fridge);
            std::mem::forget(pos);
            std::mem::forget(hub);
            routers
        });
        World { runtime, hub, pos }
    })
}

/// Splits a request input: a route selector, a flags byte, then a path segment (up to the
/// first newline) and the body.
fn split(data: &[u8]) -> Option<(u8, u8, String, Vec<u8>)> {
    let (&route, rest) = data.split_first()?;
    let (&flags, rest) = rest.split_first()?;
    let cut = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let segment = String::from_utf8_lossy(&rest[..cut]).into_owned();
    let body = rest.get(cut + 1..).unwrap_or_default().to_vec();
    Some((route, flags, segment, body))
}

/// Sends one request to `router` and checks the answer: never a 5xx, and every error in the
/// contract's shape (`{"error": {"code", "message"}}`).
fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    flags: u8,
    token: Option<&str>,
    body: Vec<u8>,
) {
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if flags & 1 == 1 {
        request = request.header("idempotency-key", format!("fuzz-{}", flags >> 1));
    }
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    // A path the fuzzer made that is not a valid URI never reaches a server.
    let Ok(request) = request.body(HttpBody::from(body)) else {
        return;
    };
    world().runtime.block_on(async {
        let response = router
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        assert!(
            !status.is_server_error(),
            "{method} {uri} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        if status.is_client_error() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{method} {uri} answered {status} with a body that is not JSON: {e}")
            });
            assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "{method} {uri} answered {status} with {v}"
            );
        }
    });
}

/// A request to a POS agent's local API: each body-taking route, and the routes that read a
/// path segment or a query string.
pub fn agent_request(data: &[u8]) {
    let Some((route, flags, segment, body)) = split(data) else {
        return;
    };
    let pos = &world().pos;
    match route % 10 {
        0 => call(pos, "POST", "/v1/refills", flags, None, body),
        1 => call(pos, "POST", "/v1/sales", flags, None, body),
        2 => call(pos, "POST", "/v1/door-sessions", flags, None, body),
        3 => call(pos, "POST", "/v1/removals", flags, None, body),
        4 => call(pos, "POST", "/v1/temperature", flags, None, body),
        5 => call(
            pos,
            "POST",
            &format!("/v1/orders/{segment}/cancel"),
            flags,
            None,
            body,
        ),
        6 => call(
            pos,
            "GET",
            &format!("/v1/stock?{segment}"),
            flags,
            None,
            body,
        ),
        7 => call(
            pos,
            "GET",
            &format!("/v1/orders?{segment}"),
            flags,
            None,
            body,
        ),
        8 => call(
            pos,
            "GET",
            &format!("/v1/orders/{segment}"),
            flags,
            None,
            body,
        ),
        _ => call(
            pos,
            "GET",
            &format!("/v1/conflicts?{segment}"),
            flags,
            None,
            body,
        ),
    }
}

/// A request to the hub's API with the admin token: each body-taking route, and the routes
/// that read a path segment or a query string.
pub fn hub_request(data: &[u8]) {
    let Some((route, flags, segment, body)) = split(data) else {
        return;
    };
    let hub = &world().hub;
    let r = format!("/v1/regions/{}", larder_demo::REGION);
    let token = Some(crate::ADMIN_TOKEN);
    let (method, uri) = match route % 16 {
        0 => ("PUT", format!("{r}/catalog")),
        1 => ("POST", format!("{r}/catalog/{segment}/ratings")),
        2 => ("POST", format!("{r}/imports/units")),
        3 => ("POST", format!("{r}/subscriptions")),
        4 => ("POST", format!("{r}/orders")),
        5 => ("POST", format!("{r}/orders/{segment}/cancel")),
        6 => ("POST", format!("{r}/orders/{segment}/dispatch")),
        7 => ("POST", "/v1/payments/webhook".to_owned()),
        8 => ("POST", format!("{r}/conflicts/{segment}/resolve")),
        9 => ("POST", format!("{r}/devices")),
        10 => ("GET", format!("{r}/refill-plan?{segment}")),
        11 => ("GET", format!("{r}/prepare-report?{segment}")),
        12 => ("GET", format!("{r}/orders?{segment}")),
        13 => ("GET", format!("{r}/fridges/{segment}/stock")),
        14 => ("GET", format!("{r}/conflicts?{segment}")),
        _ => ("GET", format!("{r}/orders/{segment}")),
    };
    call(hub, method, &uri, flags, token, body);
}

/// A CSV file of each kind `larder-hub import` reads, row by row.
pub fn import_rows(data: &[u8]) {
    use larder_hub::import::{Kind, read_only};
    for kind in [Kind::Units, Kind::Catalog, Kind::Subscriptions] {
        if let Ok((rows, rejected)) = read_only(kind, data) {
            assert!(rejected <= rows, "{rejected} rejected of {rows} rows");
        }
    }
}

/// A config file of the agent and of the hub: parsed, then checked.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = larder_agent::config::AgentConfig::parse(text) {
        let _ = c.problems();
    }
    let path = std::path::Path::new("/etc/larder/hub.toml");
    let _ = larder_hub::config::HubConfig::parse(text, path);
}

/// Valid inputs of every target, made by the real code: the fuzzers start from them, and the
/// corpus test checks each harness takes them without complaint.
pub fn seeds() -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    use larder_shared::domain::{Refill, RefillUnit};
    use larder_shared::envelope::{Batch, BoxKey, Entry, Envelope, Header, Party};
    use larder_shared::ids::{RegionId, Sku, UnitId};

    let device_key = larder_demo::seeded_key(7, "fuzz-pos");
    let hub_key = larder_demo::seeded_key(7, "hub");
    let mut ledger = Ledger::new(fridge(), actor_for(&device()))?;
    let change = ledger.refill(
        &Refill {
            units: vec![RefillUnit {
                unit_id: UnitId::new("u-1")?,
                sku: Sku::new("salad-quinoa")?,
                expires_at_ms: 1_900_000_000_000,
                batch: Some("b-1".into()),
            }],
            order_id: None,
        },
        &device(),
        1_800_000_000_000,
    )?;
    let entry = Entry::change(1, fridge(), 0, change.changes[0].clone());
    let body = Body::Changes(Batch::new(0, 1, vec![entry]));
    let envelope = Envelope {
        header: Header {
            region: RegionId::new(larder_demo::REGION)?,
            sender: envelope::Party::Device(device()),
            recipient: Party::Hub,
            seq: 1,
            sent_at_ms: 1_800_000_000_000,
        },
        body: body.clone(),
    };
    let sealed = envelope
        .seal_to(&device_key, &BoxKey::new(&device_key, &hub_key.public()))
        .ok_or_else(|| anyhow::anyhow!("no randomness for a nonce"))?;
    let body_bytes = postcard::to_stdvec(&body)?;
    let token =
        larder_shared::auth::connect_token(&device_key, &device(), 1_800_000_000_000, [5; 16]);

    let request = |route: u8, segment: &str, body: serde_json::Value| {
        let mut v = vec![route, 1];
        v.extend_from_slice(segment.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(body.to_string().as_bytes());
        v
    };
    let sale = serde_json::json!({
        "fridge_id": "fridge-1",
        "lines": [{"sku": "salad-quinoa", "quantity": 1}],
        "payment": {"method": "card", "amount_minor": 650, "currency": "EUR"},
    });
    let refill = serde_json::json!({
        "fridge_id": "fridge-1",
        "units": [{"unit_id": "u-9", "sku": "salad-quinoa", "expires_at": "2027-01-01T00:00:00Z"}],
    });
    let units = serde_json::json!({"rows": [{
        "line": 2, "unit_id": "u-7", "fridge_id": "fridge-1", "sku": "salad-quinoa",
        "expires_at": "2027-01-01T00:00:00Z"
    }]});
    let config_dir = repo().join("firmware-config");
    let hub_example = std::fs::read(repo().join("hub/hub.example.toml"))?;
    Ok(vec![
        ("envelope", sealed),
        ("body", body_bytes),
        ("ledger_change", change.changes[0].clone()),
        ("ledger_change", ledger.save()),
        ("connect_token", token.into_bytes()),
        ("agent_request", request(0, "", refill)),
        ("agent_request", request(1, "", sale)),
        ("agent_request", request(6, "fridge_id=fridge-1", serde_json::json!({}))),
        ("hub_request", request(2, "", units)),
        ("hub_request", request(1, "salad-quinoa", serde_json::json!({"stars": 5, "customer_id": "c-1"}))),
        ("hub_request", request(12, "status=open", serde_json::json!({}))),
        (
            "import_rows",
            b"unit_id,fridge_id,sku,expires_at,batch\nu-1,fridge-1,salad-quinoa,2027-01-01T00:00:00Z,b\n"
                .to_vec(),
        ),
        (
            "import_rows",
            b"sku,name,price_minor,allergens,shelf_life_hours\nsku-soup,Soup,450,celery,48\n"
                .to_vec(),
        ),
        ("config", std::fs::read(config_dir.join("fridge.example.toml"))?),
        ("config", std::fs::read(config_dir.join("pos.example.toml"))?),
        ("config", hub_example),
    ])
}
