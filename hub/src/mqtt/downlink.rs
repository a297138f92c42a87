//! The downlink: each device's stream of the region's changes, read from the region store in
//! shared reads, sent in windows, resent until acknowledged; and the region writer's answers to
//! uplinks published as acks.

use super::*;

pub(super) struct Downlink {
    pub(super) sender: StreamSender,
    pub(super) fridges: Vec<FridgeId>,
    /// `(after, head)` of the last read that found nothing for this device, so the pump does
    /// not read the same empty range again.
    pub(super) idle: Option<(u64, u64)>,
    /// When the last time beacon went to this device (hub clock, ms).
    pub(super) beacon_sent_ms: i64,
    /// Batches sent and not yet acknowledged: `(up_to, changes)`, in order.
    pub(super) in_flight: std::collections::VecDeque<(u64, usize)>,
    /// Since when the device has lacked changes of its ledgers (`None` while it has them all).
    pub(super) behind_since_ms: Option<i64>,
}

impl Downlink {
    fn unacked(&self) -> usize {
        self.in_flight.iter().map(|(_, n)| n).sum()
    }

    fn on_acked(&mut self, acked: u64) {
        while self
            .in_flight
            .front()
            .is_some_and(|(up_to, _)| *up_to <= acked)
        {
            self.in_flight.pop_front();
        }
    }

    /// Whether the device holds every change of its ledgers up to `head`, as far as the hub
    /// knows; keeps `behind_since_ms` up to date.
    fn note_progress(&mut self, head: u64, now_ms: i64) {
        let caught_up = self.in_flight.is_empty()
            && (self.sender.acked() >= head || self.idle.is_some_and(|(_, h)| h == head));
        if caught_up {
            self.behind_since_ms = None;
        } else if self.behind_since_ms.is_none() {
            self.behind_since_ms = Some(now_ms);
        }
    }
}

/// Most uplink outcomes handled in one go (see `HubLink::on_outcomes`).
pub(super) const OUTCOMES_AT_ONCE_MAX: usize = 1_024;

/// The shortest time between two relays of new heads to every device (see `run`).
pub(super) const RELAY_COALESCE: Duration = Duration::from_millis(20);

/// Most changes one shared downlink read holds; a longer range is read per device.
pub(super) const SHARED_READ_MAX: u64 = 16_384;

/// One pump pass's read of a region's changes in `(after, head]`, made when the first device
/// needs it.
pub(super) enum SharedRead {
    Unread {
        after: u64,
        head: u64,
    },
    Read {
        after: u64,
        head: u64,
        rows: Arc<Vec<(String, Entry)>>,
    },
    /// The range was too long or the read failed: devices read their own.
    Unusable,
}

impl SharedRead {
    /// The rows, when they hold everything a device that lacks nothing up to `known` can be
    /// sent up to `head`.
    async fn covering(
        &mut self,
        known: u64,
        head: u64,
        reads: &Arc<crate::store::RegionReads>,
    ) -> Option<Arc<Vec<(String, Entry)>>> {
        if let SharedRead::Unread { after, head: upto } = *self {
            let reads = Arc::clone(reads);
            let read = tokio::task::spawn_blocking(move || {
                reads.changes_between(after, upto, SHARED_READ_MAX)
            })
            .await;
            *self = match read {
                Ok(Ok(rows)) if (rows.len() as u64) < SHARED_READ_MAX => SharedRead::Read {
                    after,
                    head: upto,
                    rows: Arc::new(rows),
                },
                _ => SharedRead::Unusable,
            };
        }
        match self {
            SharedRead::Read {
                after,
                head: read_head,
                rows,
            } if known >= *after && head == *read_head => Some(rows.clone()),
            _ => None,
        }
    }
}

/// Folds `ack` into `into`: acks are cumulative, so the furthest wins, and a gap flagged at
/// the same point is kept.
pub(super) fn merge_ack(
    into: &mut larder_shared::envelope::Ack,
    ack: larder_shared::envelope::Ack,
) {
    if ack.up_to > into.up_to {
        *into = ack;
    } else if ack.up_to == into.up_to {
        into.gap |= ack.gap;
    }
}

impl HubLink {
    pub(super) async fn load_downlink(
        &self,
        region: &RegionId,
        device: &DeviceId,
    ) -> Option<Downlink> {
        let reads = self.ctx.regions.get(region)?.reads.clone();
        let id = device.clone();
        let (record, progress) = tokio::task::spawn_blocking(move || reads.device_progress(&id))
            .await
            .ok()?
            .ok()??;
        if record.revoked_at_ms.is_some() {
            return None;
        }
        Some(Downlink {
            sender: StreamSender::new(progress.down_acked, self.limits),
            fridges: record.fridges,
            idle: None,
            beacon_sent_ms: 0,
            in_flight: std::collections::VecDeque::new(),
            behind_since_ms: None,
        })
    }

    /// Handles uplink outcomes that arrived together. Acks are cumulative, so a device with
    /// several accepted uplinks among them gets one signed ack, the furthest (a gap flag at
    /// that point kept): one signature per device per group commit, not per envelope.
    pub(super) async fn on_outcomes(
        &mut self,
        client: &AsyncClient,
        outcomes: Vec<(RegionId, DeviceId, u8, UplinkOutcome)>,
    ) -> Scope {
        let mut acks: Vec<((RegionId, DeviceId), larder_shared::envelope::Ack)> = Vec::new();
        let mut held: HashMap<(RegionId, DeviceId), usize> = HashMap::new();
        let mut pumps = Vec::new();
        for (region, device, version, outcome) in outcomes {
            if !matches!(outcome, UplinkOutcome::Rejected(_)) {
                self.note_version(&region, &device, version);
            }
            if let UplinkOutcome::Ack(ack) = outcome {
                let key = (region, device);
                match held.get(&key) {
                    Some(&i) => merge_ack(&mut acks[i].1, ack),
                    None => {
                        held.insert(key.clone(), acks.len());
                        acks.push((key, ack));
                    }
                }
                continue;
            }
            if let Scope::Device(key) = self.on_outcome(client, region, device, outcome).await {
                pumps.push(key);
            }
        }
        for ((region, device), ack) in acks {
            if let Scope::Device(key) = self
                .on_outcome(client, region, device, UplinkOutcome::Ack(ack))
                .await
            {
                pumps.push(key);
            }
        }
        let mut seen = std::collections::HashSet::new();
        pumps.retain(|k| seen.insert(k.clone()));
        Scope::Devices(pumps)
    }

    /// Publishes what an uplink's outcome calls for; answers the device when its downlink may
    /// have work (it came online, acknowledged, or changed keys). The changes an accepted
    /// uplink adds reach the other devices through the head it moves.
    pub(super) async fn on_outcome(
        &mut self,
        client: &AsyncClient,
        region: RegionId,
        device: DeviceId,
        outcome: UplinkOutcome,
    ) -> Scope {
        let key = (region.clone(), device.clone());
        let mut scope = match outcome {
            UplinkOutcome::DownAcked(_) | UplinkOutcome::KeyRotated(_) => {
                Scope::Device(key.clone())
            }
            UplinkOutcome::Ack(_) | UplinkOutcome::Rejected(_) => Scope::None,
        };
        if !matches!(outcome, UplinkOutcome::Rejected(_))
            && !self
                .devices
                .get(&key)
                .is_some_and(|d| d.sender.is_connected())
        {
            // Accepted traffic means the device is online even if its presence was missed.
            self.set_presence(&region, &device, true).await;
            scope = Scope::Device(key.clone());
        }
        match outcome {
            UplinkOutcome::Ack(ack) => self.send_ack(client, key, ack).await,
            UplinkOutcome::KeyRotated(key) => {
                let to = Party::Device(device.clone());
                let body = Body::KeyRotated(larder_shared::rotation::KeyRotated { key });
                let sealed = self.seal(&region, to, body).await;
                // Sealed to the key the device held until now; what follows goes to the new one.
                self.boxes.remove(&(region.clone(), device.clone()));
                if let Some(bytes) = sealed
                    && !self.publish_down(client, &region, &device, bytes)
                {
                    debug!(device = %device, "rotation confirmation not queued; the device will resend");
                }
            }
            UplinkOutcome::DownAcked(up_to) => {
                if let Some(d) = self.devices.get_mut(&key) {
                    let ack = larder_shared::envelope::Ack::new(up_to, false);
                    d.sender.on_ack(ack, self.ctx.clock.network_ms());
                    d.on_acked(d.sender.acked());
                }
            }
            UplinkOutcome::Rejected(_) => {}
        }
        scope
    }

    /// Queues a downlink envelope for `device`; false, and the link marked jammed, when the
    /// client's request queue is full.
    pub(super) fn publish_down(
        &mut self,
        client: &AsyncClient,
        region: &RegionId,
        device: &DeviceId,
        bytes: Vec<u8>,
    ) -> bool {
        let topic = topics::device(region, device, DeviceTopic::Down);
        let queued = client
            .try_publish(topic, QoS::AtLeastOnce, false, bytes)
            .is_ok();
        self.jammed |= !queued;
        queued
    }

    /// Acknowledges a device's uplinks, or holds the ack while the request queue is full.
    pub(super) async fn send_ack(
        &mut self,
        client: &AsyncClient,
        key: (RegionId, DeviceId),
        ack: larder_shared::envelope::Ack,
    ) {
        if !self.jammed {
            let to = Party::Device(key.1.clone());
            let generation = self.ctx.regions.get(&key.0).map(|r| r.generation);
            let ack = larder_shared::envelope::Ack {
                generation: generation.map(|(g, _)| g),
                origin: generation.and_then(|(_, origin)| origin),
                ..ack
            };
            let Some(bytes) = self.seal(&key.0, to, Body::Ack(ack)).await else {
                return;
            };
            if self.publish_down(client, &key.0, &key.1, bytes) {
                self.answered.insert(key);
                return;
            }
        }
        match self.held_acks.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut held) => merge_ack(held.get_mut(), ack),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(ack);
            }
        }
    }

    /// Sends the acks held while the request queue was full, until it fills again.
    pub(super) async fn send_held_acks(&mut self, client: &AsyncClient) {
        let held: Vec<_> = self.held_acks.drain().collect();
        for (key, ack) in held {
            self.send_ack(client, key, ack).await;
        }
    }

    /// Sends every online device the changes it lacks, within its window.
    ///
    /// One piece: one pass over the devices with work, sharing the region reads and the sealing
    /// between them.
    pub(super) async fn pump(&mut self, client: &AsyncClient, scope: Scope) {
        if !self.connected || self.jammed {
            return;
        }
        let all = matches!(scope, Scope::All);
        let keys: Vec<(RegionId, DeviceId)> = match scope {
            Scope::None => return,
            Scope::Device(key) => vec![key],
            Scope::Devices(keys) => keys,
            Scope::All => self.devices.keys().cloned().collect(),
        };
        // A pass over every device shares one read of what each region committed since the
        // last such pass among the devices caught up to it: one read per region, not per device.
        let mut shared: HashMap<RegionId, SharedRead> = HashMap::new();
        if all {
            for (region, handle) in &self.ctx.regions {
                let head = *handle.head.borrow();
                if let Some(after) = self.pumped.insert(region.clone(), head)
                    && after < head
                {
                    shared.insert(region.clone(), SharedRead::Unread { after, head });
                }
            }
        }
        let now = self.ctx.clock.network_ms();
        let beacon_every = (self.ctx.sync.time_beacon_interval_seconds * 1000) as i64;
        for key in keys {
            if self.jammed {
                // The rest wait for room: the next pass serves them.
                break;
            }
            // Soon after the start, nothing goes to a device before this process has
            // acknowledged something of it: its envelope says its version, and the
            // acknowledgement names this store's generation before any downlink batch (a device
            // that held a restored store's downlink positions would take its new changes as
            // ones it had). A downlink acknowledgement left queued for the store before (a
            // persistent session on an external broker) is not enough. A device of this release
            // says its position at once, or within the agent's 30 s when it never lost its
            // broker; one of the release before never does, and is served in its version once
            // the wait is over.
            if !self.answered.contains(&key) && now - self.started_ms < VERSION_WAIT_MS {
                continue;
            }
            if self
                .devices
                .get(&key)
                .is_some_and(|d| now - d.beacon_sent_ms >= beacon_every)
            {
                let beacon = Body::Time(larder_shared::envelope::TimeBeacon { hub_ms: now });
                if let Some(bytes) = self
                    .seal(&key.0, Party::Device(key.1.clone()), beacon)
                    .await
                    && self.publish_down(client, &key.0, &key.1, bytes)
                    && let Some(d) = self.devices.get_mut(&key)
                {
                    d.beacon_sent_ms = now;
                }
            }
            let Some(handle) = self.ctx.regions.get(&key.0) else {
                continue;
            };
            let head = *handle.head.borrow();
            let reads_pool = handle.reads.clone();
            while let Some(d) = self.devices.get(&key) {
                let Some(window) = d.sender.poll_send(head) else {
                    break;
                };
                if d.idle == Some((window.after, head)) {
                    break;
                }
                // How far the device is known to lack nothing: its window, or further when
                // its last read found nothing for it up to a later head.
                let known = match d.idle {
                    Some((after, h)) if after == window.after => h,
                    _ => window.after,
                };
                let (device, fridges) = (key.1.clone(), d.fridges.clone());
                let rows = match shared.get_mut(&key.0) {
                    Some(read) => read.covering(known, head, &reads_pool).await,
                    None => None,
                };
                let entries = if let Some(rows) = rows {
                    rows.iter()
                        .filter(|(author, e)| {
                            e.seq > window.after
                                && author.as_str() != device.as_str()
                                && fridges.contains(&e.ledger)
                        })
                        .take(window.entries_max as usize)
                        .map(|(_, e)| e.clone())
                        .collect()
                } else {
                    let reads = reads_pool.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        reads.downlink_after(&device, &fridges, window.after, window.entries_max)
                    })
                    .await;
                    let Ok(Ok(entries)) = read else {
                        warn!(device = %key.1, "reading the downlink failed");
                        break;
                    };
                    entries
                };
                let Some(batch) = build_batch(window, entries, head) else {
                    break;
                };
                let (up_to, changes) = (batch.up_to, batch.entries.len());
                for e in batch
                    .entries
                    .iter()
                    .filter(|e| e.kind == EntryKind::Withheld)
                {
                    error!(device = %key.1, seq = e.seq, ledger = %e.ledger,
                        "a change too large for a message was withheld from the device's downlink");
                    self.ctx.metrics.withheld(key.0.as_str(), "down");
                }
                if batch.entries.is_empty() {
                    // Nothing for this device yet; the range is covered by its next batch.
                    if let Some(d) = self.devices.get_mut(&key) {
                        d.idle = Some((window.after, head));
                    }
                    break;
                }
                let Some(bytes) = self
                    .seal(&key.0, Party::Device(key.1.clone()), Body::Changes(batch))
                    .await
                else {
                    break;
                };
                let len = bytes.len();
                if !self.publish_down(client, &key.0, &key.1, bytes) {
                    break;
                }
                if let Some(d) = self.devices.get_mut(&key) {
                    d.sender.on_sent(up_to, len);
                    // A resend after a timeout covers batches already counted.
                    if d.in_flight.back().is_none_or(|(last, _)| *last < up_to) {
                        d.in_flight.push_back((up_to, changes));
                    }
                }
            }
        }
    }

    /// Sets each device's unacknowledged-changes and sync-lag gauges.
    pub(super) fn update_sync_gauges(&mut self, now_ms: i64) {
        for ((region, device), d) in &mut self.devices {
            let Some(handle) = self.ctx.regions.get(region) else {
                continue;
            };
            d.note_progress(*handle.head.borrow(), now_ms);
            let labels = vec![
                ("region", region.to_string()),
                ("device", device.to_string()),
            ];
            self.ctx
                .metrics
                .device_unacked
                .get_or_create(&labels)
                .set(d.unacked() as i64);
            let lag = d
                .behind_since_ms
                .map_or(0.0, |since| (now_ms - since) as f64 / 1000.0);
            self.ctx
                .metrics
                .device_sync_lag
                .get_or_create(&labels)
                .set(lag);
        }
    }
}
