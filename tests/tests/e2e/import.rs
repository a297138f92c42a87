//! `larder-hub import` end to end: the real command line against a running hub (real HTTP,
//! SQLite), for units, the catalog and subscriptions. Valid rows are kept, every bad row is
//! reported with its line and reason (exit code 1), the loaded units reach the fridge's agent,
//! and importing the same file again changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use larder_demo::REGION;
use larder_shared::domain::Role;
use larder_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// Runs `larder-hub import`; returns whether it exited 0 and what it printed.
fn import(hub_http: &str, kind: &str, file: &Path) -> anyhow::Result<(bool, String)> {
    import_with(hub_http, kind, file, &[])
}

/// [`import`] with more arguments.
fn import_with(
    hub_http: &str,
    kind: &str,
    file: &Path,
    more: &[&str],
) -> anyhow::Result<(bool, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_hub-node"))
        .args(["import", kind])
        .arg(file)
        .args([
            "--region",
            REGION,
            "--hub",
            hub_http,
            "--token",
            ADMIN_TOKEN,
        ])
        .args(more)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), said))
}

/// The rejected-rows report next to `file`: (line, reason) pairs.
fn rejected(file: &Path) -> anyhow::Result<Vec<(u64, String)>> {
    let mut p = file.as_os_str().to_owned();
    p.push(".rejected.csv");
    let mut out = Vec::new();
    for r in csv_rows(&std::fs::read_to_string(p)?) {
        out.push((r[0].parse()?, r[1].clone()));
    }
    Ok(out)
}

/// A tiny CSV reader for the report: `line,reason` with the reason possibly quoted.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let (line, reason) = l.split_once(',')?;
            Some(vec![
                line.to_owned(),
                reason.trim_matches('"').replace("\"\"", "\""),
            ])
        })
        .collect()
}

/// Batches go out while earlier ones are loading: every row is still answered for, the last
/// batch too when the file ends exactly on a batch, and the report keeps the file's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_in_flight_account_for_every_row() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    for (name, good, bad_lines) in [("even", 6, vec![]), ("odd", 9, vec![3, 8])] {
        let mut text = String::from("unit_id,fridge_id,sku,expires_at\n");
        let mut line = 1;
        let mut written = 0;
        while written < good {
            line += 1;
            if bad_lines.contains(&line) {
                text.push_str(&format!("{name}-bad-{line},fridge-1,caviar,{soon}\n"));
            } else {
                text.push_str(&format!("{name}-{written},fridge-1,lasagna,{soon}\n"));
                written += 1;
            }
        }
        let file = dir.path().join(format!("{name}.csv"));
        std::fs::write(&file, text)?;
        let (ok, said) = import_with(&hub_http, "units", &file, &["--batch-rows", "2"])?;
        assert_eq!(ok, bad_lines.is_empty(), "{said}");
        let rows = good + bad_lines.len();
        assert!(
            said.contains(&format!("{rows} rows"))
                && said.contains(&format!("{good} accepted"))
                && said.contains(&format!("{} rejected", bad_lines.len())),
            "{name}: {said}"
        );
        let lines: Vec<u64> = rejected(&file)?.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, bad_lines, "{name}: in the file's order");
    }
    assert_eq!(
        available(&hub_stock(&hub_http, "fridge-1").await?, "lasagna"),
        15
    );
    Ok(())
}

/// Rows as long as they may be: the importer's batches stay under the hub's request limit
/// for imports (a request of as many such rows as it may carry would be over it), so every
/// row loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_rows_are_sent_in_batches_the_hub_takes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    let batch = "b".repeat(64);
    let mut text = String::from("unit_id,fridge_id,sku,expires_at,batch\n");
    let rows = 12_000;
    for i in 0..rows {
        let id = format!("{i:0>64}");
        text.push_str(&format!("{id},fridge-1,lasagna,{soon},{batch}\n"));
    }
    let file = dir.path().join("long.csv");
    std::fs::write(&file, &text)?;
    let row = serde_json::json!({"line": rows, "unit_id": format!("{rows:0>64}"),
        "fridge_id": "fridge-1", "sku": "lasagna", "expires_at": soon.to_string(), "batch": batch});
    use larder_hub::region::import::{IMPORT_BODY_BYTES_MAX, IMPORT_ROWS_MAX};
    assert!(
        IMPORT_ROWS_MAX * row.to_string().len() > IMPORT_BODY_BYTES_MAX,
        "a request of {IMPORT_ROWS_MAX} such rows is over the hub's limit"
    );
    let (ok, said) = import(&hub_http, "units", &file)?;
    assert!(ok, "{said}");
    assert!(said.contains(&format!("{rows} accepted")), "{said}");
    assert_eq!(
        available(&hub_stock(&hub_http, "fridge-1").await?, "lasagna"),
        rows
    );
    Ok(())
}

/// The most any file of the hub may grow to in
/// [`a_batch_that_cannot_be_committed_is_refused_whole_and_forgotten`]. Measured: the store's
/// write-ahead log is about 0.3 MB after start and a batch of 100 rows, and a batch of
/// [`IMPORT_ROWS_MAX`] rows adds about 3.7 MB to it.
const FILE_BYTES_MAX: u64 = 2 * 1024 * 1024;

/// Imports rows `prefix-from` to `prefix-(to-1)` for fridge-1, as one request.
async fn post_rows(
    hub_http: &str,
    prefix: &str,
    from: usize,
    to: usize,
) -> anyhow::Result<(u16, serde_json::Value)> {
    post_import(hub_http, &rows_body(prefix, from, to), None).await
}

/// The body of a request importing rows `prefix-from` to `prefix-(to-1)` for fridge-1.
fn rows_body(prefix: &str, from: usize, to: usize) -> serde_json::Value {
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    let rows: Vec<serde_json::Value> = (from..to)
        .map(|i| {
            serde_json::json!({"line": i + 2, "unit_id": format!("{prefix}-{i:05}"),
                "fridge_id": "fridge-1", "sku": "lasagna", "expires_at": soon.to_string()})
        })
        .collect();
    serde_json::json!({ "rows": rows })
}

/// POSTs an import request's `body`, with an Idempotency-Key if `key` is given.
async fn post_import(
    hub_http: &str,
    body: &serde_json::Value,
    key: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut request = http()
        .post(format!("{hub_http}/v1/regions/{REGION}/imports/units"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let resp = request.json(body).send().await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

/// A batch retried with its Idempotency-Key gets the first answer again (not a count of
/// unchanged rows), and the key used with other rows is 409 and loads none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_gets_its_first_answer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let url = format!("http://{}", hub.http_addr);
    let key = Some("import-batch-1");
    let batch = rows_body("k", 0, 10);
    let (status, first) = post_import(&url, &batch, key).await?;
    assert_eq!(
        (status, first["accepted"].as_u64()),
        (200, Some(10)),
        "{first}"
    );
    let (status, again) = post_import(&url, &batch, key).await?;
    assert_eq!((status, &again), (200, &first));
    let (status, other) = post_import(&url, &rows_body("other", 0, 5), key).await?;
    assert_eq!(
        (status, other["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    // Without a key, the same rows again are each found unchanged.
    let (status, unkeyed) = post_import(&url, &batch, None).await?;
    assert_eq!(
        (
            status,
            unkeyed["accepted"].as_u64(),
            unkeyed["unchanged"].as_u64()
        ),
        (200, Some(0), Some(10))
    );
    assert_eq!(
        stored_units(&url).await?.len(),
        10,
        "none of the other rows"
    );
    hub.shutdown().await;
    Ok(())
}

/// The unit ids the hub's store holds for fridge-1.
async fn stored_units(hub_http: &str) -> anyhow::Result<std::collections::BTreeSet<String>> {
    Ok(hub_stock(hub_http, "fridge-1").await?["units"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["unit_id"].as_str().map(str::to_owned))
        .collect())
}

/// `prefix-from` to `prefix-(to-1)`, as [`post_rows`] names them.
fn unit_ids(prefix: &str, from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// A batch whose commit fails is refused whole, and the hub forgets it. The hub runs as its
/// own process, which may not grow a file past [`FILE_BYTES_MAX`]: the write-ahead log of a
/// batch of [`IMPORT_ROWS_MAX`] rows does not fit, so its commit on the region's committer
/// fails the way a full disk fails it. That request gets 503. Smaller batches before and after
/// it are kept; rows of the refused batch sent again are loaded anew, so the writer's ledgers
/// were reloaded and do not hold rows the store never got; and a hub restarted on the same
/// store without the limit holds exactly the rows whose requests were answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_committed_is_refused_whole_and_forgotten() -> anyhow::Result<()> {
    use larder_hub::region::import::IMPORT_ROWS_MAX;
    let dir = tempfile::tempdir()?;
    let exe = env!("CARGO_BIN_EXE_hub-node");
    let hub_config = || -> anyhow::Result<String> {
        let (broker, http_port) = (
            larder_hub::mqtt::free_port()?,
            larder_hub::mqtt::free_port()?,
        );
        let path = write_hub_config(&dir.path().join("hub"), broker, http_port, 1)?;
        Ok(path.display().to_string())
    };
    let log = dir.path().join("hub.log");
    let config = hub_config()?;
    let mut hub = Process::spawn_with_file_limit(
        exe,
        &["run", "--config", &config],
        "hub ",
        FILE_BYTES_MAX,
        &log,
    )?;
    let url = hub.url.clone();

    let (status, body) = post_rows(&url, "a", 0, 100).await?;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (200, Some(100)),
        "{body}"
    );
    let (status, body) = post_rows(&url, "b", 0, IMPORT_ROWS_MAX).await?;
    assert_eq!(status, 503, "a batch too large for the file limit: {body}");
    assert!(body.to_string().contains("storage_unavailable"), "{body}");
    let said = std::fs::read_to_string(&log)?;
    // Committed by the region's committer; by the writer itself if a timer tick shared the
    // batch's group.
    assert!(
        said.contains("region commit failed"),
        "the commit failed: {said}"
    );

    // The writer hears of the committer's failure when it next waits for it, usually after it
    // has loaded the next batch on top of the refused one: then that batch is refused too, and
    // nothing of it kept. (A tick between them makes the writer wait, and hear, sooner.)
    let (mut status, mut body) = post_rows(&url, "c", 0, 100).await?;
    if status == 503 {
        assert!(
            body.to_string().contains("an earlier import batch failed"),
            "{body}"
        );
        (status, body) = post_rows(&url, "c", 0, 100).await?;
    }
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (200, Some(100)),
        "{body}"
    );
    let (status, body) = post_rows(&url, "b", 0, 100).await?;
    assert_eq!(
        (
            status,
            body["accepted"].as_u64(),
            body["unchanged"].as_u64()
        ),
        (200, Some(100), Some(0)),
        "rows of the refused batch are new to the hub: {body}"
    );
    let kept: std::collections::BTreeSet<String> = [
        unit_ids("a", 0, 100),
        unit_ids("c", 0, 100),
        unit_ids("b", 0, 100),
    ]
    .concat()
    .into_iter()
    .collect();
    assert_eq!(stored_units(&url).await?, kept);

    // Restarted on the same store without the limit: the same rows, and the whole batch now
    // loads once.
    hub.kill();
    let config = hub_config()?;
    let hub = Process::spawn(exe, &["run", "--config", &config], "hub ")?;
    assert_eq!(stored_units(&hub.url).await?, kept);
    let (status, body) = post_rows(&hub.url, "b", 0, IMPORT_ROWS_MAX).await?;
    assert_eq!(
        (
            status,
            body["accepted"].as_u64(),
            body["unchanged"].as_u64()
        ),
        (200, Some(IMPORT_ROWS_MAX as u64 - 100), Some(100)),
        "{body}"
    );
    let all = stored_units(&hub.url).await?;
    assert_eq!(all.len(), IMPORT_ROWS_MAX + 200);
    assert!(
        unit_ids("b", 0, IMPORT_ROWS_MAX)
            .iter()
            .all(|u| all.contains(u))
    );
    Ok(())
}

/// The hub commits import batches behind its region writer, which meanwhile loads the next
/// batch and handles devices: while many small batches load, a POS sells the fridge's units.
/// Every imported unit and every sale is at the hub once, and the units reach the fridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_while_the_fridge_sells_keeps_every_row_and_sale() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let agents = start_fridge_and_pos(dir.path(), &hub, WAIT).await?;
    let (fridge_url, pos_url) = (agents.fridge_url.clone(), agents.pos_url.clone());
    // A part of the refill is held in escrow for app orders: the POS sells a third.
    let (refilled, sold) = (30, 10);
    refill(&fridge_url, "fridge-1", "own", "soup-lentil", refilled).await?;
    eventually(WAIT, "the POS to see the refill", || async {
        let stock = agent_stock(&pos_url, "fridge-1").await.ok()?;
        (available(&stock, "soup-lentil") == refilled as u64).then_some(())
    })
    .await?;
    let before = available(&hub_stock(&hub_http, "fridge-1").await?, "soup-lentil");

    let rows = 3_000;
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    let mut text = String::from("unit_id,fridge_id,sku,expires_at\n");
    for i in 0..rows {
        text.push_str(&format!("imp-{i},fridge-1,lasagna,{soon}\n"));
    }
    let file = dir.path().join("units.csv");
    std::fs::write(&file, text)?;
    let importing = {
        let (hub_http, file) = (hub_http.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            import_with(&hub_http, "units", &file, &["--batch-rows", "50"])
        })
    };
    let client = http();
    for i in 0..sold {
        let (status, body) = sell_unit(
            &client,
            &pos_url,
            "fridge-1",
            &format!("own-{i}"),
            "soup-lentil",
            &format!("sale-{i}"),
        )
        .await?;
        assert_eq!(status, 201, "{body}");
    }
    let (ok, said) = importing.await??;
    assert!(ok, "{said}");
    assert!(said.contains(&format!("{rows} accepted")), "{said}");
    synced(&pos_url, WAIT).await?;

    let stock = hub_stock(&hub_http, "fridge-1").await?;
    assert_eq!(available(&stock, "lasagna"), rows as u64, "{stock}");
    assert_eq!(
        available(&stock, "soup-lentil"),
        before - sold as u64,
        "{stock}"
    );
    assert_eq!(
        hub_order_ids(&hub_http).await?.len(),
        sold,
        "every sale once"
    );
    eventually(WAIT, "the imported units at the fridge", || async {
        let stock = agent_stock(&fridge_url, "fridge-1").await.ok()?;
        (available(&stock, "lasagna") == rows as u64).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_catalog_and_subscriptions_import_once_with_a_report_of_bad_rows()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 2).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let fridge = start_agent(dir.path(), &hub, "fridge-1", Role::Fridge, &["fridge-1"]).await?;
    let fridge_url = format!("http://{}", fridge.http_addr);
    synced(&fridge_url, WAIT).await?;

    // Units: 6 good rows over two fridges, and one bad row of each kind.
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let mut text = String::from("unit_id,fridge_id,sku,expires_at,batch\n");
    for i in 0..4 {
        text.push_str(&format!("imp-{i},fridge-1,lasagna,{soon},b1\n"));
    }
    for i in 4..6 {
        text.push_str(&format!("imp-{i},fridge-2,soup-lentil,{soon},\n"));
    }
    text.push_str(&format!("imp-x1,fridge-9,lasagna,{soon},\n")); // line 8
    text.push_str(&format!("imp-x2,fridge-1,caviar,{soon},\n")); // line 9
    text.push_str("imp-x3,fridge-1,lasagna,next tuesday,\n"); // line 10
    text.push_str(&format!("imp-x4,fridge-1,lasagna,{past},\n")); // line 11
    text.push_str(&format!("bad id!,fridge-1,lasagna,{soon},\n")); // line 12
    text.push_str("imp-x5,fridge-1\n"); // line 13
    let units = dir.path().join("units.csv");
    std::fs::write(&units, text)?;
    let (ok, said) = import(&hub_http, "units", &units)?;
    assert!(!ok, "rows were rejected, so exit 1: {said}");
    assert!(
        said.contains("12 rows")
            && said.contains("6 accepted")
            && said.contains("0 unchanged")
            && said.contains("6 rejected"),
        "{said}"
    );
    let report = rejected(&units)?;
    let mut lines: Vec<u64> = report.iter().map(|(l, _)| *l).collect();
    lines.sort_unstable();
    assert_eq!(lines, vec![8, 9, 10, 11, 12, 13], "{report:?}");
    for (line, needle) in [
        (8, "fridge-9"),
        (9, "caviar"),
        (10, "expires_at"),
        (11, "expired"),
        (12, "unit_id"),
    ] {
        let reason = &report
            .iter()
            .find(|(l, _)| *l == line)
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        assert!(reason.contains(needle), "line {line}: {reason}");
    }
    // Loaded at the hub, and replicated to the fridge's own agent.
    assert_eq!(
        available(&hub_stock(&hub_http, "fridge-1").await?, "lasagna"),
        4
    );
    assert_eq!(
        available(&hub_stock(&hub_http, "fridge-2").await?, "soup-lentil"),
        2
    );
    eventually(WAIT, "the imported units at the fridge", || async {
        (available(&agent_stock(&fridge_url, "fridge-1").await.ok()?, "lasagna") == 4).then_some(())
    })
    .await?;
    // Again: nothing new.
    let (_, said) = import(&hub_http, "units", &units)?;
    assert!(
        said.contains("0 accepted") && said.contains("6 unchanged") && said.contains("6 rejected"),
        "{said}"
    );
    assert_eq!(
        available(&hub_stock(&hub_http, "fridge-1").await?, "lasagna"),
        4
    );

    // Catalog: a new meal, a new price, an unchanged row and two bad rows.
    let before = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    let v1 = before["version"].as_u64().unwrap_or(0);
    let catalog = dir.path().join("catalog.csv");
    std::fs::write(
        &catalog,
        "sku,name,price_minor,allergens,shelf_life_hours\n\
         pasta-pesto,Pasta pesto,780,gluten;nuts,48\n\
         lasagna,Lasagna al forno,910,,72\n\
         curry-veg,Vegetable curry,820,,72\n\
         cheap,Cheap,-5,,24\n\
         pasta-pesto,Pasta again,700,,48\n\
         short,row\n",
    )?;
    let (ok, said) = import(&hub_http, "catalog", &catalog)?;
    // A malformed row (line 7) is reported like any bad row, and the import goes on.
    assert!(
        !ok && said.contains("2 accepted")
            && said.contains("1 unchanged")
            && said.contains("3 rejected"),
        "{said}"
    );
    let mut lines: Vec<u64> = rejected(&catalog)?.iter().map(|(l, _)| *l).collect();
    lines.sort_unstable();
    assert_eq!(lines, vec![5, 6, 7]);
    let after = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    assert_eq!(after["version"].as_u64(), Some(v1 + 1));
    let item = |sku: &str| {
        after["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["sku"] == sku)
            .cloned()
    };
    assert_eq!(
        item("pasta-pesto").map(|i| i["allergens"].clone()),
        Some(serde_json::json!(["gluten", "nuts"]))
    );
    assert_eq!(
        item("lasagna").map(|i| i["price_minor"].clone()),
        Some(serde_json::json!(910))
    );
    assert!(item("salad-quinoa").is_some(), "skus not in the file stay");
    let (_, said) = import(&hub_http, "catalog", &catalog)?;
    assert!(
        said.contains("0 accepted") && said.contains("3 unchanged"),
        "{said}"
    );
    let again = get(&format!("{hub_http}/v1/regions/{REGION}/catalog")).await?;
    assert_eq!(again["version"].as_u64(), Some(v1 + 1), "no new version");

    // Subscriptions.
    let subs = dir.path().join("subscriptions.csv");
    std::fs::write(
        &subs,
        "customer_id,fridge_id,sku,quantity,weekdays,start_date,end_date\n\
         c-1,fridge-1,curry-veg,1,mon;wed;fri,2030-01-07,\n\
         c-2,fridge-2,lasagna,2,tue,2030-01-07,2030-03-01\n\
         c-3,fridge-1,lasagna,1,someday,2030-01-07,\n",
    )?;
    let (ok, said) = import(&hub_http, "subscriptions", &subs)?;
    assert!(
        !ok && said.contains("2 accepted") && said.contains("1 rejected"),
        "{said}"
    );
    assert_eq!(
        rejected(&subs)?.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        vec![4]
    );
    let (_, said) = import(&hub_http, "subscriptions", &subs)?;
    assert!(
        said.contains("0 accepted") && said.contains("2 unchanged"),
        "{said}"
    );
    let list = get(&format!("{hub_http}/v1/regions/{REGION}/subscriptions")).await?;
    assert_eq!(
        list["subscriptions"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    fridge.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
