//! MQTT over TLS with the hub pinned: a CA made in the test issues the embedded broker's
//! certificate; an agent that trusts that CA syncs through it, one that trusts another CA
//! never connects, and a plain-TCP client gets nothing from the TLS port.

use std::path::Path;
use std::time::Duration;

use larder_demo::{agent_config, seeded_key};
use larder_hub::config::MqttTlsConfig;
use larder_shared::domain::Role;
use larder_tests::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const WAIT: Duration = Duration::from_secs(30);

/// A CA's certificate (PEM) and its issuer.
fn ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reach_the_hub_over_tls_only_when_they_trust_its_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca_pem, issuer) = ca("Larder test hub CA")?;
    let (other_ca_pem, _) = ca("Someone else's CA")?;
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
        .signed_by(&leaf_key, &issuer)?;
    let tls = MqttTlsConfig {
        cert_file: Some(write(dir.path(), "hub.pem", &leaf.pem())?),
        key_file: Some(write(dir.path(), "hub-key.pem", &leaf_key.serialize_pem())?),
        ca_file: Some(write(dir.path(), "ca.pem", &ca_pem)?),
    };
    let other_ca = write(dir.path(), "other-ca.pem", &other_ca_pem)?;

    let hub = start_hub_with(&dir.path().join("hub"), 1, |c| {
        c.mqtt.tls = Some(tls.clone());
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    })
    .await?;
    let hub_url = format!("http://{}", hub.http_addr);
    let key = seeded_key(7, "fridge-1");
    enroll(
        &hub_url,
        "fridge-1",
        Role::Fridge,
        &["fridge-1"],
        &key.public(),
    )
    .await?;
    let mut config = agent_config(
        &dir.path().join("agent"),
        "fridge-1",
        Role::Fridge,
        &fridge_ids(&["fridge-1"]),
        hub.public_key,
        &hub.broker,
    )?;

    // Trusting another CA, the agent never gets through: its sale waits on the device.
    config.mqtt.tls_ca_file = Some(other_ca);
    assert!(config.problems().is_empty(), "another CA is a valid file");
    let agent = larder_agent::start(config.clone(), key.clone()).await?;
    let url = format!("http://{}", agent.http_addr);
    refill(&url, "fridge-1", "t", "lasagna", 2).await?;
    eventually(
        WAIT,
        "the agent to fail the TLS handshake twice",
        || async { (agent.shared.metrics.mqtt_connect_failures.get() >= 2).then_some(()) },
    )
    .await?;
    assert_eq!(health(&url).await?["online"], false);
    let connects = agent.shared.metrics.mqtt_connects.get();
    agent.shutdown().await;
    assert_eq!(
        connects, 0,
        "connected to a broker whose CA it does not trust"
    );
    assert_eq!(
        hub_stock(&hub_url, "fridge-1").await?["units"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );

    // Plain TCP to the TLS port gets no MQTT session.
    let device = larder_shared::DeviceId::new("fridge-1")?;
    let plain = larder_tests::ingest::connect(&hub.broker, &device, &key, 99, 64 * 1024);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), plain)
            .await
            .map_or(true, |r| r.is_err()),
        "a plain MQTT client connected to the TLS listener"
    );

    // Trusting the hub's CA, the same store syncs.
    config.mqtt.tls_ca_file = tls.ca_file.clone();
    let agent = larder_agent::start(config, key).await?;
    let url = format!("http://{}", agent.http_addr);
    synced(&url, WAIT).await?;
    eventually(WAIT, "the refill at the hub", || async {
        let s = hub_stock(&hub_url, "fridge-1").await.ok()?;
        (s["units"].as_array()?.len() == 2).then_some(())
    })
    .await?;
    let (status, body) = sell_unit(&http(), &url, "fridge-1", "t-0", "lasagna", "k").await?;
    anyhow::ensure!(status == 201, "{body}");
    synced(&url, WAIT).await?;
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
