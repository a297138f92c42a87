//! Clients that hold connections without finishing requests: the agent and the hub close a
//! connection whose request headers do not arrive within `http.header_read_timeout_ms` (an
//! idle keep-alive connection too), answer 408 a request not answered within
//! `http.request_timeout_ms`, and serve at most `http.connections_max` connections at once,
//! the others waiting their turn rather than being refused. One address holds at most
//! `http.connections_per_address_max` of them, and live event streams are capped per token and
//! in all.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use larder_shared::domain::Role;
use larder_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far longer than any limit under test: only a server that keeps the connection open for good
/// reaches it.
const GUARD: Duration = Duration::from_secs(30);

/// Reads until the server closes the connection; what it sent before.
async fn read_until_closed(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, stream.read_to_end(&mut out))
        .await
        .context("the server kept the connection open")??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A whole `GET path` on a connection of its own, answered and closed.
async fn get_once(stream: &mut TcpStream, path: &str) -> anyhow::Result<String> {
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    read_until_closed(stream).await
}

/// `post` (method and path) with the admin token, a body of 100 bytes announced and 13 sent;
/// what the server answers before it closes the connection.
async fn stalled_body(addr: SocketAddr, post: &str) -> anyhow::Result<String> {
    let mut stalled = TcpStream::connect(addr).await?;
    stalled
        .write_all(
            format!(
                "{post} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"fridge_id\""
            )
            .as_bytes(),
        )
        .await?;
    read_until_closed(&mut stalled).await
}

/// A request's headers cut off half-way, then a connection that sends nothing: both closed
/// by the server at `addr`, which goes on answering whole requests for `path`.
async fn cuts_off_slow_clients(addr: SocketAddr, path: &str, post: &str) -> anyhow::Result<()> {
    let mut slow = TcpStream::connect(addr).await?;
    slow.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n").as_bytes())
        .await?;
    let answer = read_until_closed(&mut slow).await?;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "unfinished headers at {addr}: {answer:?}"
    );

    let mut idle = TcpStream::connect(addr).await?;
    let answer = read_until_closed(&mut idle).await?;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "a connection that sent nothing at {addr}: {answer:?}"
    );

    // A body that stops half-way: the request is refused in the contract's shape, not held
    // open.
    let answer = stalled_body(addr, post).await?;
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains(r#"{"error":{"code":"malformed""#),
        "a stalled body at {addr}: {answer:?}"
    );

    let answer = get_once(&mut TcpStream::connect(addr).await?, path).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{addr}: {answer:?}");
    Ok(())
}

/// A POS agent (`pos-1`, selling from `fridge-1`) with its HTTP config adjusted by `http`.
async fn start_pos(
    dir: &std::path::Path,
    hub: &larder_hub::HubHandle,
    http: impl Fn(&mut larder_agent::config::AgentConfig),
) -> anyhow::Result<larder_agent::AgentHandle> {
    start_agent_with(
        &dir.join("pos"),
        hub,
        "pos-1",
        Role::Pos,
        &["fridge-1"],
        http,
        larder_runtime::Clock::system(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_and_idle_connections_are_closed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(dir.path(), 1, |c| c.http.header_read_timeout_ms = 300).await?;
    let agent = start_pos(dir.path(), &hub, |c| c.http.header_read_timeout_ms = 300).await?;
    cuts_off_slow_clients(hub.http_addr, "/healthz", "PUT /v1/regions/demo/catalog").await?;
    cuts_off_slow_clients(agent.http_addr, "/v1/health", "POST /v1/sales").await?;
    Ok(())
}

/// A body that keeps its connection busy without ever finishing (here: stalled, with no body
/// timeout to cut it) is answered 408 once `http.request_timeout_ms` has passed; the hub's
/// live event feed, a streamed answer, is not cut by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_answered_in_time_gets_408() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(dir.path(), 1, |c| {
        c.http.header_read_timeout_ms = 600_000;
        c.http.request_timeout_ms = 500;
    })
    .await?;
    let agent = start_pos(dir.path(), &hub, |c| {
        c.http.header_read_timeout_ms = 600_000;
        c.http.request_timeout_ms = 500;
    })
    .await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let mut feed = EventFeed::open(&hub_http, "demo").await?;
    for (addr, post) in [
        (hub.http_addr, "PUT /v1/regions/demo/catalog"),
        (agent.http_addr, "POST /v1/sales"),
    ] {
        let answer = stalled_body(addr, post).await?;
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains(r#"{"error":{"code":"timeout""#),
            "{addr}: {answer:?}"
        );
    }
    // The live event feed, open for longer than the deadline now (the 408s took it), still
    // streams: its answer started at once.
    let (status, body) = post(
        &format!("{hub_http}/v1/regions/demo/catalog/lasagna/ratings"),
        "rate-after-the-deadline",
        &serde_json::json!({"stars": 4, "customer_id": "c-late"}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    feed.until(Duration::from_secs(20), "rating", |v| v["sku"] == "lasagna")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path(), 1).await?;
    let agent = start_pos(dir.path(), &hub, |c| {
        c.http.connections_max = 2;
        c.http.header_read_timeout_ms = 600_000;
    })
    .await?;
    let addr = agent.http_addr;
    // Two connections that send nothing take both places; the server accepts in the order
    // the connections were made, so the third waits in the listen backlog.
    let first = TcpStream::connect(addr).await?;
    let _second = TcpStream::connect(addr).await?;
    let mut third = TcpStream::connect(addr).await?;
    third
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a third connection was served past connections_max = 2: {early:?}"
    );

    // One place frees: the waiting request is answered, not refused.
    drop(first);
    let answer = read_until_closed(&mut third).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    Ok(())
}

/// One address cannot take every place: past `http.connections_per_address_max` its new
/// connections are closed at once, while another address (127.0.0.2) is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_only_its_share_of_the_places() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(dir.path(), 1, |c| {
        c.http.connections_max = 8;
        c.http.connections_per_address_max = Some(3);
        c.http.header_read_timeout_ms = 600_000;
    })
    .await?;
    let addr = hub.http_addr;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(addr).await?);
    }
    let mut fourth = TcpStream::connect(addr).await?;
    // Closed unanswered (or reset), well before the guard.
    let said = read_until_closed(&mut fourth).await.unwrap_or_default();
    assert_eq!(said, "", "a fourth connection from 127.0.0.1 was served");
    let other = tokio::net::TcpSocket::new_v4()?;
    other.bind("127.0.0.2:0".parse()?)?;
    let mut other = other.connect(addr).await?;
    let answer = get_once(&mut other, "/healthz").await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // A place given back (once the server has seen the connection close) is a place to take
    // again.
    drop(idle.pop());
    eventually(GUARD, "a place given back", || async {
        let mut again = TcpStream::connect(addr).await.ok()?;
        let answer = get_once(&mut again, "/healthz").await.ok()?;
        answer.starts_with("HTTP/1.1 200").then_some(())
    })
    .await?;
    Ok(())
}

/// Live event streams are capped per token and in all (429 `too_many_streams` past either),
/// and a stream's place is given back when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_event_streams_are_capped_per_token_and_in_all() -> anyhow::Result<()> {
    const WATCHER: &str = "watcher-token";
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(dir.path(), 1, |c| {
        c.http.event_streams_max = Some(3);
        c.http.event_streams_per_token_max = Some(2);
        c.tokens.push(larder_hub::config::TokenConfig {
            sha256: larder_hub::http::token_sha256(WATCHER),
            role: larder_hub::config::TokenRole::Kitchen,
            regions: vec!["*".into()],
        });
    })
    .await?;
    let url = format!(
        "http://{}/v1/regions/{}/events",
        hub.http_addr,
        larder_demo::REGION
    );
    let open = |token: &'static str| {
        let url = url.clone();
        async move {
            let resp = http().get(url).bearer_auth(token).send().await?;
            anyhow::Ok(resp)
        }
    };
    let a1 = open(ADMIN_TOKEN).await?;
    let a2 = open(ADMIN_TOKEN).await?;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    let a3 = open(ADMIN_TOKEN).await?;
    assert_eq!(a3.status().as_u16(), 429, "a third stream for one token");
    let w1 = open(WATCHER).await?;
    assert_eq!(w1.status().as_u16(), 200);
    let w2 = open(WATCHER).await?;
    assert_eq!(w2.status().as_u16(), 429, "a fourth stream in all");
    let body: serde_json::Value = w2.json().await?;
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    drop(a1);
    let w3 = eventually(GUARD, "a place given back", || async {
        let r = open(WATCHER).await.ok()?;
        (r.status().as_u16() == 200).then_some(r)
    })
    .await?;
    drop((a2, w1, w3));
    Ok(())
}
