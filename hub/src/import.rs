//! `larder-hub import {catalog,units,subscriptions} FILE.csv --region R`: bulk loading through
//! a running hub's API. The file is read row by row (constant memory for units and
//! subscriptions), valid rows are sent in batches, and every rejected row goes to a report with
//! its line number and reason. Importing the same file again changes nothing: units already
//! loaded come back `unchanged`, the catalog is only republished if it differs, and each
//! subscription row carries an Idempotency-Key derived from its content.
//!
//! Files (a header row names the columns; extra columns are refused):
//! - catalog: `sku,name,price_minor,allergens,shelf_life_hours` (`allergens` separated by `;`),
//!   merged into the region's current catalog (new skus added, listed ones replaced);
//! - units: `unit_id,fridge_id,sku,expires_at[,batch]` (`expires_at` RFC 3339);
//! - subscriptions: `customer_id,fridge_id,sku,quantity,weekdays,start_date[,end_date]`
//!   (`weekdays` such as `mon;wed;fri`).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use larder_shared::catalog::CatalogItem;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;

use crate::region::import::{ImportReport, Rejected, UnitRow};

/// Rows per unit request unless told otherwise: the most a request may carry
/// ([`IMPORT_ROWS_MAX`](crate::region::import::IMPORT_ROWS_MAX)). Each request loads its rows
/// into each fridge as one refill, so larger requests cost the hub less per row.
pub const BATCH_ROWS_DEFAULT: usize = crate::region::import::IMPORT_ROWS_MAX;

/// A unit request's body stays under this (the hub takes import requests of up to
/// [`IMPORT_BODY_BYTES_MAX`](crate::region::import::IMPORT_BODY_BYTES_MAX)): a batch is sent
/// early when its rows' JSON reaches it.
const BATCH_BYTES_MAX: usize = crate::region::import::IMPORT_BODY_BYTES_MAX - 100 * 1024;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Catalog,
    Units,
    Subscriptions,
}

/// Where and how to import.
#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    pub file: PathBuf,
    pub region: String,
    /// The hub's HTTP address, e.g. `http://127.0.0.1:8080`.
    pub hub: String,
    pub token: String,
    /// Where rejected rows are written (`FILE.rejected.csv` by default).
    pub report: Option<PathBuf>,
    /// Rows per request (units).
    pub batch_rows: usize,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

/// What an import came to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub accepted: u64,
    pub unchanged: u64,
    pub rejected: u64,
    pub report: PathBuf,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "{} rows in {:.1} s ({:.0} rows/s): {} accepted, {} unchanged, {} rejected",
            self.rows,
            secs,
            self.rows as f64 / secs,
            self.accepted,
            self.unchanged,
            self.rejected
        )?;
        if self.rejected > 0 {
            write!(f, " (reasons in {})", self.report.display())?;
        }
        Ok(())
    }
}

/// The rejected-rows report: `line,reason`.
struct Report {
    out: csv::Writer<Box<dyn std::io::Write + Send>>,
    rows: u64,
}

impl Report {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("creating the report {}", path.display()))?;
        Self::to(Box::new(file))
    }

    fn to(out: Box<dyn std::io::Write + Send>) -> anyhow::Result<Self> {
        let mut out = csv::Writer::from_writer(out);
        out.write_record(["line", "reason"])?;
        Ok(Self { out, rows: 0 })
    }

    fn reject(&mut self, line: u64, reason: &str) -> anyhow::Result<()> {
        self.rows += 1;
        self.out.write_record([line.to_string().as_str(), reason])?;
        Ok(())
    }
}

/// Runs an import; the summary says what happened to every row.
pub async fn run(o: &Options) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let report_path = o.report.clone().unwrap_or_else(|| {
        let mut p = o.file.clone().into_os_string();
        p.push(".rejected.csv");
        PathBuf::from(p)
    });
    let mut report = Report::create(&report_path)?;
    let file = File::open(&o.file).with_context(|| format!("opening {}", o.file.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = csv_reader(BufReader::with_capacity(1 << 16, file));
    let bar = if o.progress {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        // Below the hub's idle keep-alive limit (`http.header_read_timeout_ms`, 30 s default),
        // so a pooled connection is not reused as the hub closes it.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?;
    let api = Api {
        client,
        base: format!("{}/v1/regions/{}", o.hub.trim_end_matches('/'), o.region),
        token: o.token.clone(),
    };
    let mut summary = Summary {
        report: report_path,
        ..Summary::default()
    };
    match o.kind {
        Kind::Units => units(o, &api, &mut reader, &mut report, &mut summary, &bar).await?,
        Kind::Catalog => catalog(&api, &mut reader, &mut report, &mut summary).await?,
        Kind::Subscriptions => {
            subscriptions(o, &api, &mut reader, &mut report, &mut summary, &bar).await?
        }
    }
    bar.finish_and_clear();
    report.out.flush()?;
    summary.rejected = report.rows;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// Sends a request, retrying transport errors and 503 a few times: every import request
    /// is safe to repeat (units already loaded come back unchanged, the rest carry keys).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut attempt = 0;
        loop {
            let mut req = self
                .client
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&self.token);
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            match req.send().await {
                Ok(resp) if resp.status() != 503 || attempt >= 5 => {
                    let status = resp.status().as_u16();
                    let v = resp.json().await.unwrap_or(Value::Null);
                    // A bad token or region refuses every row alike: stop at the first.
                    if status == 401 || status == 403 {
                        bail!("the hub refused: {}", reason(status, &v));
                    }
                    return Ok((status, v));
                }
                Err(e) if attempt >= 5 => return Err(e.into()),
                _ => {}
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }
}

/// The reason an API error body gives.
fn reason(status: u16, v: &Value) -> String {
    match v["error"]["message"].as_str() {
        Some(m) => format!("{}: {m}", v["error"]["code"].as_str().unwrap_or("error")),
        None => format!("the hub answered {status}"),
    }
}

/// How every import reads its file: headers on the first line, fields trimmed.
fn csv_reader<R: std::io::Read>(input: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(input)
}

/// Reads a file of `kind` row by row as an import does, without sending anything: the number
/// of rows read and of rows rejected by the file's own checks (malformed CSV, missing or
/// unknown columns, values of the wrong type). The hub's checks of the values come on import.
pub fn read_only<R: std::io::Read>(kind: Kind, input: R) -> anyhow::Result<(u64, u64)> {
    let mut reader = csv_reader(input);
    let mut report = Report::to(Box::new(std::io::sink()))?;
    let mut summary = Summary::default();
    let mut file = Rows::new(&mut reader)?;
    loop {
        let more = match kind {
            Kind::Units => file.next::<UnitCsv>(&mut report, &mut summary)?.is_some(),
            Kind::Catalog => file
                .next::<CatalogCsv>(&mut report, &mut summary)?
                .is_some(),
            Kind::Subscriptions => file
                .next::<SubscriptionCsv>(&mut report, &mut summary)?
                .is_some(),
        };
        if !more {
            return Ok((summary.rows, report.rows));
        }
    }
}

fn line_of(record: &csv::StringRecord) -> u64 {
    record.position().map_or(0, csv::Position::line)
}

/// A file's rows one at a time, each rejected row (malformed, or not of the file's columns)
/// written to the report with its line, so one bad row never stops an import.
struct Rows<'a, R> {
    reader: &'a mut csv::Reader<R>,
    headers: csv::StringRecord,
    record: csv::StringRecord,
}

impl<'a, R: std::io::Read> Rows<'a, R> {
    fn new(reader: &'a mut csv::Reader<R>) -> anyhow::Result<Self> {
        let headers = reader.headers()?.clone();
        Ok(Self {
            reader,
            headers,
            record: csv::StringRecord::new(),
        })
    }

    /// `Ok(None)` at the end of the file; `Ok(Some(None))` for a row rejected and reported;
    /// otherwise the row and its line.
    fn next<T: serde::de::DeserializeOwned>(
        &mut self,
        report: &mut Report,
        summary: &mut Summary,
    ) -> anyhow::Result<Option<Option<(u64, T)>>> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) => Ok(None),
            Ok(true) => {
                summary.rows += 1;
                let line = line_of(&self.record);
                match self.record.deserialize(Some(&self.headers)) {
                    Ok(row) => Ok(Some(Some((line, row)))),
                    Err(e) => {
                        report.reject(line, &e.to_string())?;
                        Ok(Some(None))
                    }
                }
            }
            Err(e) if matches!(e.kind(), csv::ErrorKind::Io(_)) => Err(e.into()),
            Err(e) => {
                summary.rows += 1;
                report.reject(e.position().map_or(0, csv::Position::line), &e.to_string())?;
                Ok(Some(None))
            }
        }
    }

    /// How far into the file (bytes), for the progress bar.
    fn byte(&self) -> u64 {
        self.reader.position().byte()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnitCsv {
    unit_id: String,
    fridge_id: String,
    sku: String,
    expires_at: String,
    #[serde(default)]
    batch: Option<String>,
}

async fn units(
    o: &Options,
    api: &Api,
    reader: &mut csv::Reader<BufReader<File>>,
    report: &mut Report,
    summary: &mut Summary,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let mut file = Rows::new(reader)?;
    let mut rows = Vec::with_capacity(o.batch_rows);
    let mut bytes = 0;
    // The next batch is read and sent while the hub loads the one before: the file's parsing
    // and the hub's loading overlap. Answers are taken in order, so the report stays in order.
    let mut sent: std::collections::VecDeque<(u64, tokio::task::JoinHandle<_>)> =
        std::collections::VecDeque::new();
    loop {
        let next = file.next::<UnitCsv>(report, summary)?;
        let more = next.is_some();
        if let Some(Some((line, u))) = next {
            let row = UnitRow {
                line,
                unit_id: u.unit_id,
                fridge_id: u.fridge_id,
                sku: u.sku,
                expires_at: u.expires_at,
                batch: u.batch,
            };
            // The row's share of the request body: its JSON and a comma.
            bytes += serde_json::to_vec(&row).map_or(0, |v| v.len()) + 1;
            rows.push(row);
        }
        if rows.len()
            >= o.batch_rows
                .clamp(1, crate::region::import::IMPORT_ROWS_MAX)
            || bytes >= BATCH_BYTES_MAX
            || (!more && !rows.is_empty())
        {
            let body = json!({"rows": rows});
            let api = api.clone();
            let first = rows[0].line;
            sent.push_back((
                first,
                tokio::spawn(async move {
                    api.send(reqwest::Method::POST, "/imports/units", Some(&body), None)
                        .await
                }),
            ));
            rows.clear();
            bytes = 0;
        }
        while sent.len() >= UNIT_BATCHES_IN_FLIGHT || (!more && !sent.is_empty()) {
            if let Some((first, answer)) = sent.pop_front() {
                take_unit_answer(first, answer.await??, report, summary)?;
                bar.set_position(file.byte());
                bar.set_message(format!("{} rows", summary.rows));
            }
        }
        if !more {
            return Ok(());
        }
    }
}

/// Unit batches sent before the first one's answer is awaited: while the hub commits one batch
/// and loads the next, the third is on its way, so the hub's writer never waits for a request.
const UNIT_BATCHES_IN_FLIGHT: usize = 3;

/// Counts a unit batch's answer and reports its rejected rows.
fn take_unit_answer(
    first_line: u64,
    (status, v): (u16, Value),
    report: &mut Report,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    if status != 200 {
        bail!("importing rows {first_line}..: {}", reason(status, &v));
    }
    let r: ImportReport = serde_json::from_value(v)?;
    summary.accepted += r.accepted;
    summary.unchanged += r.unchanged;
    for Rejected { line, reason } in r.rejected {
        report.reject(line, &reason)?;
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogCsv {
    sku: String,
    name: String,
    price_minor: i64,
    #[serde(default)]
    allergens: String,
    #[serde(default)]
    shelf_life_hours: u32,
}

async fn catalog(
    api: &Api,
    reader: &mut csv::Reader<BufReader<File>>,
    report: &mut Report,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let (status, current) = api
        .send(reqwest::Method::GET, "/catalog", None, None)
        .await?;
    if status != 200 {
        bail!("reading the catalog: {}", reason(status, &current));
    }
    let mut items: Vec<CatalogItem> =
        serde_json::from_value(current["items"].clone()).context("the current catalog")?;
    let mut listed = std::collections::HashMap::new();
    let mut file = Rows::new(reader)?;
    while let Some(next) = file.next::<CatalogCsv>(report, summary)? {
        let Some((line, row)) = next else {
            continue;
        };
        let problem = if larder_shared::Sku::new(row.sku.as_str()).is_err() {
            Some(format!("sku {:?} is not a valid id", row.sku))
        } else if row.name.is_empty() {
            Some("name is empty".to_owned())
        } else if !(0..=larder_shared::limits::PRICE_MINOR_MAX).contains(&row.price_minor) {
            Some(format!(
                "price_minor {} is not from 0 to {}",
                row.price_minor,
                larder_shared::limits::PRICE_MINOR_MAX
            ))
        } else if let Some(first) = listed.get(&row.sku) {
            Some(format!("sku {} is already on line {first}", row.sku))
        } else {
            None
        };
        if let Some(p) = problem {
            report.reject(line, &p)?;
            continue;
        }
        listed.insert(row.sku.clone(), line);
        let item = CatalogItem {
            sku: larder_shared::Sku::new(row.sku.as_str())?,
            name: row.name,
            price_minor: row.price_minor,
            allergens: row
                .allergens
                .split(';')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
            shelf_life_hours: row.shelf_life_hours,
        };
        if let Err(e) = larder_shared::limits::catalog_item(&item) {
            report.reject(line, &e.to_string())?;
            continue;
        }
        match items.iter_mut().find(|i| i.sku == item.sku) {
            Some(existing) if *existing == item => summary.unchanged += 1,
            Some(existing) => {
                *existing = item;
                summary.accepted += 1;
            }
            None => {
                items.push(item);
                summary.accepted += 1;
            }
        }
    }
    if summary.accepted == 0 {
        return Ok(());
    }
    let body =
        json!({"version": current["version"], "currency": current["currency"], "items": items});
    let (status, v) = api
        .send(reqwest::Method::PUT, "/catalog", Some(&body), None)
        .await?;
    match status {
        200 | 201 => Ok(()),
        _ => bail!("publishing the catalog: {}", reason(status, &v)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionCsv {
    customer_id: String,
    fridge_id: String,
    sku: String,
    quantity: u32,
    weekdays: String,
    start_date: String,
    #[serde(default)]
    end_date: Option<String>,
}

async fn subscriptions(
    o: &Options,
    api: &Api,
    reader: &mut csv::Reader<BufReader<File>>,
    report: &mut Report,
    summary: &mut Summary,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    // Subscriptions already at the hub, by content: a row imported before is `unchanged`.
    let (status, v) = api
        .send(reqwest::Method::GET, "/subscriptions", None, None)
        .await?;
    if status != 200 {
        bail!("reading the subscriptions: {}", reason(status, &v));
    }
    let existing: std::collections::HashSet<String> = v["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["ended_at_ms"].is_null())
        .map(subscription_key)
        .collect();
    let mut file = Rows::new(reader)?;
    while let Some(next) = file.next::<SubscriptionCsv>(report, summary)? {
        let Some((line, row)) = next else {
            continue;
        };
        let mut body = json!({
            "customer_id": row.customer_id,
            "fridge_id": row.fridge_id,
            "lines": [{"sku": row.sku, "quantity": row.quantity}],
            "weekdays": row.weekdays.split(';').map(str::trim).filter(|w| !w.is_empty()).collect::<Vec<_>>(),
            "start_date": row.start_date,
        });
        if let Some(end) = row.end_date.filter(|e| !e.is_empty()) {
            body["end_date"] = json!(end);
        }
        if existing.contains(&subscription_key(&body)) {
            summary.unchanged += 1;
            continue;
        }
        // The same row sent twice (a retry) is the same request: the hub creates it once.
        let digest = sha2::Sha256::digest(format!("{}\n{body}", o.region));
        let key = format!("import-{}", hex::encode(&digest[..16]));
        let (status, v) = api
            .send(
                reqwest::Method::POST,
                "/subscriptions",
                Some(&body),
                Some(&key),
            )
            .await?;
        if status == 201 {
            summary.accepted += 1;
        } else {
            report.reject(line, &reason(status, &v))?;
        }
        if summary.rows.is_multiple_of(100) {
            bar.set_position(file.byte());
        }
    }
    Ok(())
}

/// What identifies a subscription's content: customer, fridge, lines, weekdays and dates.
fn subscription_key(v: &Value) -> String {
    json!([
        v["customer_id"],
        v["fridge_id"],
        v["lines"],
        v["weekdays"],
        v["start_date"],
        v.get("end_date").cloned().unwrap_or(Value::Null),
    ])
    .to_string()
}
