//! More than one hub on one external broker: a real Mosquitto (Debian's `mosquitto`), started
//! on a free port with the files `larder-hub broker-config` wrote, and two hub processes
//! owning different regions. Agents of both regions sync through it; a stranger with a stock
//! client is refused; an admitted device reads nothing of another device's topics. And Debian's
//! stock `mosquitto_sub`/`mosquitto_pub` against the hub's embedded broker: refused without a
//! fresh token signed by an enrolled device's key, and on a replayed one. Run by CI
//! (`--features broker-e2e`); needs `mosquitto` and `mosquitto-clients`.

use std::path::Path;
use std::process::Command;

use larder_tests::mosquitto::{Mosquitto, add_device, run, write_external_hub_config};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use larder_shared::domain::Role;
use larder_tests::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(30);

/// Writes a hub config owning `region` (one fridge, `fridge-{region}`) on the external broker.
fn hub_config(dir: &Path, region: &str, broker_port: u16) -> anyhow::Result<String> {
    let mut c = larder_demo::hub_config(
        &dir.join("data"),
        broker_port,
        1,
        larder_hub::http::token_sha256(ADMIN_TOKEN),
    )?;
    c.regions[0].id = region.parse()?;
    c.regions[0].fridges[0].id = format!("fridge-{region}").parse()?;
    write_external_hub_config(dir, &c, broker_port, &format!("hub-{region}"))
}

/// A connected client as `user`.
async fn connect(
    port: u16,
    user: &str,
    password: &str,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut o = MqttOptions::new(user, "127.0.0.1", port);
    o.set_credentials(user, password);
    let (client, mut events) = AsyncClient::new(o, 64);
    next(&mut events, |p| {
        matches!(p, Packet::ConnAck(_)).then_some(())
    })
    .await?;
    Ok((client, events))
}

/// Polls until a packet `pick` takes; `Err` on a connection error or after [`WAIT`].
async fn next<T>(
    events: &mut EventLoop,
    mut pick: impl FnMut(&Packet) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => bail!("timed out"),
            Ok(Err(e)) => bail!("{e}"),
            Ok(Ok(Event::Incoming(p))) => {
                if let Some(v) = pick(&p) {
                    return Ok(v);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// One piece: the scenario in the order it happens (enroll, broker files, broker, hubs, agents,
/// what each hub holds, strangers, snooping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_a_mosquitto_that_keeps_each_device_to_its_topics() -> anyhow::Result<()> {
    let hub_exe = env!("CARGO_BIN_EXE_hub-node");
    let dir = tempfile::tempdir()?;
    let port = larder_hub::mqtt::free_port()?;
    let regions = ["north", "south"];
    let mut configs = Vec::new();
    for region in regions {
        let config = hub_config(&dir.path().join(region), region, port)?;
        let fridge = format!("fridge-{region}");
        for (device, role) in [(fridge.clone(), "fridge"), (format!("pos-{region}"), "pos")] {
            add_device(hub_exe, &config, region, (&device, role, &fridge))?;
        }
        configs.push(config);
    }

    // Each hub writes its part; one broker gets both.
    let (mut passwords, mut acl) = (String::new(), String::new());
    for (region, config) in regions.iter().zip(&configs) {
        let out = dir.path().join(format!("broker-{region}"));
        let said = run(
            hub_exe,
            &[
                "broker-config",
                "--config",
                config,
                "--out",
                out.to_str().context("path")?,
            ],
        )?;
        ensure!(said.contains("2 device(s)"), "{said}");
        let emqx = std::fs::read_to_string(out.join("emqx-acl.conf"))?;
        ensure!(
            emqx.contains(&format!("{{allow, {{user, \"pos-{region}\"}}, subscribe, [\"larder/v1/{region}/d/pos-{region}/down\""))
                && emqx.trim_end().ends_with("{deny, all}."),
            "{emqx}"
        );
        passwords.push_str(&std::fs::read_to_string(out.join("passwords"))?);
        acl.push_str(&std::fs::read_to_string(out.join("acl"))?);
    }
    // The test's own publisher, standing in for any traffic on other devices' topics.
    passwords.push_str("test-publisher:test-publisher-password\n");
    acl.push_str("\nuser test-publisher\ntopic write larder/#\n");
    let broker = Mosquitto::start(&dir.path().join("broker"), port, &passwords, &acl).await?;

    let mut hubs = Vec::new();
    for config in &configs {
        hubs.push(Process::spawn(
            hub_exe,
            &["run", "--config", config],
            "hub ",
        )?);
    }

    // An agent per region, each knowing only its broker password.
    let mut agents = Vec::new();
    for region in regions {
        let device = format!("fridge-{region}");
        let mut config = larder_demo::agent_config(
            &dir.path().join(&device),
            &device,
            Role::Fridge,
            &fridge_ids(&[&device]),
            hub_public_key(),
            &format!("127.0.0.1:{port}"),
        )?;
        config.region = region.parse()?;
        config.mqtt.password = Some(broker.password(&device)?);
        let agent = larder_agent::start(config, larder_demo::seeded_key(7, &device)).await?;
        let url = format!("http://{}", agent.http_addr);
        synced(&url, WAIT).await?;
        refill(&url, &device, &format!("{region}-u"), "lasagna", 2).await?;
        let (status, body) = sell_unit(
            &http(),
            &url,
            &device,
            &format!("{region}-u-0"),
            "lasagna",
            "s1",
        )
        .await?;
        ensure!(status == 201, "sale in {region}: {body}");
        synced(&url, WAIT).await?;
        agents.push((
            agent,
            body["order_id"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    // Each hub holds its own region's sale, and knows nothing of the other region.
    for ((region, hub), (_, order)) in regions.iter().zip(&hubs).zip(&agents) {
        let o = get(&format!("{}/v1/regions/{region}/orders/{order}", hub.url)).await?;
        assert_eq!(o["status"], "completed", "{region}: {o}");
        let other = if *region == "north" { "south" } else { "north" };
        let resp = http()
            .get(format!("{}/v1/regions/{other}/fridges", hub.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        assert_eq!(resp.status(), 404, "{region}'s hub does not own {other}");
        // Watching the whole broker, it saw the other region's uplinks, ignored and counted them.
        let line = format!(
            "larder_hub_envelopes_rejected_total{{region=\"{other}\",reason=\"unknown_region\"}} "
        );
        let counted = eventually(
            WAIT,
            &format!("{region}'s hub to count {other}'s envelopes"),
            || async {
                let text = metrics_text(&hub.url).await.ok()?;
                let n: u64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix(line.as_str()))?
                    .trim()
                    .parse()
                    .ok()?;
                (n > 0).then_some(n)
            },
        )
        .await?;
        eprintln!("{region}'s hub ignored {counted} envelope(s) of {other}");
    }

    // A stranger with a stock client is refused, with or without a guessed password.
    for extra in [&[][..], &["-u", "fridge-north", "-P", "guess"][..]] {
        let mut args = vec!["-h", "127.0.0.1", "-t", "larder/#", "-C", "1", "-W", "5"];
        let port_s = port.to_string();
        args.extend(["-p", &port_s]);
        args.extend(extra);
        let out = Command::new("mosquitto_sub").args(&args).output()?;
        let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            !out.status.success() && said.contains("not authori"),
            "mosquitto_sub {args:?}: {said}"
        );
    }
    // An admitted device reads its own topics and nothing of another device's, in any region:
    // the publisher sends to other devices' topics, then to the device's own; MQTT keeps one
    // publisher's messages in order, so had any other been delivered it would come first.
    let own = broker.password("pos-north")?;
    let (snoop, mut snoop_events) = connect(port, "pos-north", &own).await?;
    let mine = "larder/v1/north/d/pos-north/down";
    let others = [
        "larder/v1/north/d/fridge-north/down",
        "larder/v1/north/d/fridge-north/up",
        "larder/v1/south/d/fridge-south/down",
        "larder/v1/+/d/+/down",
    ];
    for topic in others.iter().chain([&mine]) {
        snoop.subscribe(*topic, QoS::AtLeastOnce).await?;
        next(&mut snoop_events, |p| {
            matches!(p, Packet::SubAck(_)).then_some(())
        })
        .await?;
    }
    let (publisher, mut pub_events) =
        connect(port, "test-publisher", "test-publisher-password").await?;
    for topic in [
        "larder/v1/north/d/fridge-north/down",
        "larder/v1/north/d/fridge-north/up",
        "larder/v1/south/d/fridge-south/down",
        mine,
    ] {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, topic.as_bytes().to_vec())
            .await?;
        next(&mut pub_events, |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await?;
    }
    let first = next(&mut snoop_events, |p| match p {
        Packet::Publish(m) => Some(m.topic.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(first, mine, "pos-north read another device's topic");
    let _ = snoop.disconnect().await;
    let _ = publisher.disconnect().await;

    for (agent, _) in agents {
        agent.shutdown().await;
    }
    drop(hubs);
    Ok(())
}

/// Runs a Mosquitto client tool; returns whether it succeeded and what it printed.
fn stock_client(tool: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool} (install Debian's mosquitto-clients)"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), said.to_lowercase()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_stock_clients_without_a_fresh_device_token()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(&dir.path().join("hub"), 1).await?;
    let hub_http = format!("http://{}", hub.http_addr);
    let key = larder_demo::seeded_key(7, "pos-1");
    enroll(&hub_http, "pos-1", Role::Pos, &["fridge-1"], &key.public()).await?;
    let (host, port) = hub.broker.rsplit_once(':').context("broker address")?;
    let base = ["-h", host, "-p", port];
    let token = |k: &larder_shared::SecretKey, nonce: u8| {
        larder_shared::auth::connect_token(
            k,
            &device("pos-1"),
            larder_runtime::Clock::system().now_ms(),
            [nonce; 16],
        )
    };
    // `-d` prints the broker's CONNACK when there is one; rumqttd refuses a client by closing
    // the connection without one.
    let refused =
        |said: &str| said.contains("sending connect") && !said.contains("received connack");
    let sub = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend(["-d", "-t", "larder/#", "-C", "1", "-W", "3"]);
        args.extend(extra);
        stock_client("mosquitto_sub", &args)
    };
    let publish = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend([
            "-d",
            "-t",
            "larder/v1/demo/d/pos-1/up",
            "-m",
            "x",
            "-q",
            "1",
        ]);
        args.extend(extra);
        stock_client("mosquitto_pub", &args)
    };
    // No credentials, a made-up password, a token signed by another key: refused.
    let stranger = larder_demo::seeded_key(9, "stranger");
    let forged = token(&stranger, 1);
    for (what, extra) in [
        ("no credentials", vec![]),
        (
            "a guessed password",
            vec!["-i", "pos-1", "-u", "pos-1", "-P", "guess"],
        ),
        (
            "another key's token",
            vec!["-i", "pos-1", "-u", "pos-1", "-P", forged.as_str()],
        ),
    ] {
        let (ok, said) = sub(&extra)?;
        assert!(!ok && refused(&said), "mosquitto_sub with {what}: {said}");
        let (ok, said) = publish(&extra)?;
        assert!(!ok && refused(&said), "mosquitto_pub with {what}: {said}");
    }
    // The device's own fresh token gets in once; the same token again is a replay.
    let fresh = token(&key, 2);
    let (ok, said) = publish(&["-i", "pos-1", "-u", "pos-1", "-P", fresh.as_str()])?;
    assert!(
        ok && said.contains("received connack (0)"),
        "mosquitto_pub with a fresh token: {said}"
    );
    let (ok, said) = publish(&["-i", "pos-1", "-u", "pos-1", "-P", fresh.as_str()])?;
    assert!(!ok && refused(&said), "a replayed token: {said}");
    // The hub counted what it refused.
    let metrics = metrics_text(&hub_http).await?;
    assert!(
        metrics.contains("larder_hub_connections_refused_total"),
        "{metrics}"
    );
    hub.shutdown().await;
    Ok(())
}
