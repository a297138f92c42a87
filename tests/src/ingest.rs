//! The hub ingest benchmark's device side: signed ledger-change envelopes built ahead of time
//! for simulated devices (each a real ledger making real changes, with a continuous audit
//! chain), and MQTT clients that connect with the devices' connect tokens.

use std::time::Duration;

use anyhow::{Result, bail};
use larder_shared::domain::{Refill, RefillUnit};
use larder_shared::envelope::{Batch, Body, BoxKey, Entry, Envelope, Header, Party};
use larder_shared::ledger::{Ledger, actor_for};
use larder_shared::{DeviceId, FridgeId, PublicKey, RegionId, SecretKey, Sku, UnitId};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet};

/// `count` envelopes from `device` to the hub whose key is `hub`, each carrying one change (a
/// unit loaded into `fridge`), numbered and chained from the device's first, sealed and signed.
pub fn envelopes(
    region: &RegionId,
    device: &DeviceId,
    fridge: &FridgeId,
    key: &SecretKey,
    hub: &PublicKey,
    count: u64,
) -> Result<Vec<Vec<u8>>> {
    let to_hub = BoxKey::new(key, hub);
    let mut ledger = Ledger::new(fridge.clone(), actor_for(device))?;
    let mut head = larder_shared::audit::GENESIS;
    let mut out = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        let change = ledger
            .refill(
                &Refill {
                    units: vec![RefillUnit {
                        unit_id: UnitId::new(format!("{device}-{seq}"))?,
                        sku: Sku::new("lasagna")?,
                        expires_at_ms: i64::MAX / 2,
                        batch: None,
                    }],
                    order_id: None,
                },
                device,
                1_800_000_000_000 + seq as i64,
            )?
            .changes
            .remove(0);
        let prev = head;
        head = larder_shared::audit::entry_hash(
            &prev,
            device,
            seq,
            fridge,
            0,
            &larder_shared::audit::change_digest(&change),
        );
        let entry = Entry {
            prev: Some(prev),
            ..Entry::change(seq, fridge.clone(), 0, change)
        };
        let head_sig = larder_shared::audit::sign_head(key, device, seq, &head);
        out.push(
            Envelope {
                header: Header {
                    region: region.clone(),
                    sender: Party::Device(device.clone()),
                    recipient: Party::Hub,
                    seq,
                    sent_at_ms: 0,
                },
                body: Body::Changes(Batch {
                    after: seq - 1,
                    up_to: seq,
                    entries: vec![entry],
                    head_sig: Some(head_sig),
                }),
            }
            .seal_to(key, &to_hub)
            .ok_or_else(|| anyhow::anyhow!("no randomness for a nonce"))?,
        );
    }
    Ok(out)
}

/// A fresh connect token for `device`; nonces are remembered hub-wide, so each
/// (device, attempt) gets its own.
pub fn connect_token(device: &DeviceId, key: &SecretKey, attempt: u64) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{device}/{attempt}"));
    let mut n = [0u8; 16];
    n.copy_from_slice(&digest[..16]);
    larder_shared::auth::connect_token(key, device, larder_runtime::Clock::system().now_ms(), n)
}

/// An MQTT client connected to the hub's broker as `device` (a fresh connect token).
pub async fn connect(
    broker: &str,
    device: &DeviceId,
    key: &SecretKey,
    nonce: u64,
    max_packet: usize,
) -> Result<(AsyncClient, EventLoop)> {
    connect_session(broker, device, key, nonce, max_packet, true).await
}

/// [`connect`], with a persistent session (the broker keeps its subscriptions and what they
/// route to it while it is away) unless `clean`.
pub async fn connect_session(
    broker: &str,
    device: &DeviceId,
    key: &SecretKey,
    nonce: u64,
    max_packet: usize,
    clean: bool,
) -> Result<(AsyncClient, EventLoop)> {
    let token = connect_token(device, key, nonce);
    connect_with_token(broker, device, &token, max_packet, clean).await
}

/// The device's signed `online` presence for the session `token` opens, as an agent publishes
/// it once connected.
pub fn online_presence(
    region: &larder_shared::RegionId,
    device: &DeviceId,
    key: &SecretKey,
    token: &str,
) -> Result<Vec<u8>> {
    let session = larder_shared::auth::token_session(token)
        .ok_or_else(|| anyhow::anyhow!("a token without a session"))?;
    Ok(larder_shared::presence::Presence {
        online: true,
        session,
    }
    .seal(key, region, device))
}

/// An MQTT client connected to the hub's broker as `device` with `token`.
pub async fn connect_with_token(
    broker: &str,
    device: &DeviceId,
    token: &str,
    max_packet: usize,
    clean: bool,
) -> Result<(AsyncClient, EventLoop)> {
    let (host, port) = broker
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("broker address {broker}"))?;
    let mut o = MqttOptions::new(device.as_str(), host, port.parse()?);
    o.set_credentials(device.as_str(), token);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(max_packet, max_packet);
    o.set_inflight(100);
    o.set_clean_session(clean);
    let (client, mut events) = AsyncClient::new(o, 256);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => bail!("{device}: no CONNACK"),
            Ok(Err(e)) => bail!("{device}: {e}"),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, events)),
            Ok(Ok(_)) => {}
        }
    }
}
