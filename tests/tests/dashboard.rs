//! The kitchen dashboard in a real browser: Debian's `chromium`, headless, driven over the
//! DevTools protocol. The page loads from the hub, shows the region's fridges, and a sale made
//! through an agent appears on it without a reload. A screenshot is kept in
//! `target/test-artifacts/dashboard.png`. Run by CI (`--features browser-e2e`); needs
//! `chromium` on the PATH (or `LARDER_CHROMIUM`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use larder_demo::REGION;
use larder_shared::domain::Role;
use larder_tests::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// A headless Chromium, killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Chromium with remote debugging on a port of its choosing; returns it and the
/// browser's DevTools WebSocket URL.
fn launch() -> anyhow::Result<(Browser, String)> {
    let exe = std::env::var("LARDER_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = tempfile::tempdir()?;
    let mut child = Command::new(&exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {exe} (install Debian's chromium)"))?;
    let stderr = child.stderr.take().context("chromium's stderr")?;
    let browser = Browser {
        child,
        _profile: profile,
    };
    // Chromium announces its DevTools endpoint on stderr; read until it does (or exits).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("ws://")) {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(WAIT)
        .context("chromium did not announce its DevTools endpoint")?;
    Ok((browser, url))
}

/// A DevTools protocol connection attached to one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next_id: u64,
}

impl Page {
    /// Opens `url` in a new tab.
    async fn open(browser_ws: &str, url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(browser_ws).await?;
        let mut page = Page {
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = page
            .call(None, "Target.createTarget", json!({"url": url}))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = page
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await?;
        page.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        Ok(page)
    }

    /// Sends a command (to the page's session, or the browser) and waits for its result.
    async fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer"))?
                .context("DevTools connection closed")??;
            let Message::Text(text) = frame else {
                continue;
            };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] != id {
                continue; // an event, or another command's answer
            }
            if let Some(e) = v.get("error") {
                bail!("{method}: {e}");
            }
            return Ok(v["result"].clone());
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let session = self.session.clone();
        let r = self
            .call(
                Some(&session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expression` is true in the page.
    async fn until(&mut self, what: &str, expression: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if self.eval(expression).await? == json!(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let status = self
                    .eval("document.getElementById('status').textContent")
                    .await?;
                bail!("timed out waiting for {what} (page status: {status})");
            }
        }
    }

    async fn screenshot(&mut self) -> anyhow::Result<Vec<u8>> {
        let session = self.session.clone();
        let r = self
            .call(
                Some(&session),
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let data = r["data"].as_str().context("screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_shows_up_on_the_dashboard_without_a_reload() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 2).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;
    refill(&fridge_url, "fridge-1", "u", "lasagna", 3).await?;
    synced(&fridge_url, WAIT).await?;

    let (browser, browser_ws) = launch()?;
    let mut page = Page::open(
        &browser_ws,
        &format!("{hub_http}/#token={ADMIN_TOKEN}&region={REGION}"),
    )
    .await?;
    // Loaded: the region's fridges are listed and the live feed is connected.
    page.until(
        "the fridges table and the live feed",
        "document.querySelectorAll('#fridges tr').length === 2 \
         && document.getElementById('status').textContent.startsWith('live:')",
    )
    .await?;
    let fridge_row = page
        .eval("document.querySelector('#fridges tr[data-fridge=\"fridge-1\"]').innerText")
        .await?;
    assert!(
        fridge_row.as_str().is_some_and(|r| r.contains("online")),
        "{fridge_row}"
    );
    let loaded_at = page.eval("window.larderLoadedAt").await?;

    let (status, sale) =
        sell_unit(&http(), &fridge_url, "fridge-1", "u-0", "lasagna", "dash-1").await?;
    assert_eq!(status, 201, "{sale}");
    let order = sale["order_id"].as_str().context("order id")?.to_owned();
    page.until(
        "the sale in the live feed",
        &format!("document.getElementById('feed').innerText.includes('sale {order}')"),
    )
    .await?;
    // The fridges table follows: 2 of 3 units left.
    page.until(
        "the fridge's stock to drop",
        "document.querySelector('#fridges tr[data-fridge=\"fridge-1\"] td:nth-child(5)').textContent === '2'",
    )
    .await?;
    assert_eq!(
        page.eval("window.larderLoadedAt").await?,
        loaded_at,
        "the page was not reloaded"
    );

    let png = page.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    std::fs::write(artifacts.join("dashboard.png"), &png)?;

    drop(browser);
    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
