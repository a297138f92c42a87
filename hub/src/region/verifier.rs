//! The region's verifier thread: checks uplinks' signatures ahead of the writer.
//!
//! Signature checks are most of an uplink's CPU work (two Ed25519 signatures each: the envelope
//! and its audit head), and they need nothing the writer owns but the sender's key. So the MQTT
//! task hands `up` publishes to this thread, which batch-checks each waiting run of them under
//! each sender's key as committed (read from the region's read pool), opens their sealed
//! bodies, and passes every uplink on to the writer, in the order received, with what it found.
//! The writer then merges and commits one group while the verifier checks the next.
//!
//! The verifier decides nothing. The writer still applies every rule to every envelope with
//! its own device rows, accepts a verifier's finding only if the key it verified under is one
//! the writer accepts at that moment (the key in force, or a retired one inside its overlap),
//! and checks alone whatever the verifier did not verify (a device enrolled or a key rotated
//! since, a forgery). So a stale read here can cost time, never a wrong answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use larder_shared::envelope::{self, Party};
use larder_shared::{DeviceId, PublicKey, SecretKey};
use tokio::sync::{mpsc, oneshot};

use super::{Boxes, PrecheckItem, Prechecked, RegionCommand, UplinkOutcome, precheck_part};
use crate::store::RegionReads;

/// An `up` publish for the region, as the MQTT task received it.
#[derive(Debug)]
pub struct Uplink {
    pub topic_device: DeviceId,
    pub payload: bytes::Bytes,
    pub reply: oneshot::Sender<UplinkOutcome>,
}

/// What the verifier takes.
#[derive(Debug)]
pub enum VerifierCommand {
    Uplink(Uplink),
    /// Passes on what came before, then stops the writer ([`RegionCommand::Stop`]) and itself.
    Stop,
}

/// What the verifier needs of its region.
#[derive(Debug)]
pub struct Verifier {
    /// Device rows as committed.
    pub reads: Arc<RegionReads>,
    /// The hub's key, which uplink bodies are sealed to.
    pub hub_key: SecretKey,
    pub max_message_bytes: usize,
    /// The most uplinks checked together.
    pub group_max: usize,
}

impl Verifier {
    /// Starts the thread: it takes uplinks from `rx` and passes them to the writer's `tx`. It
    /// ends on [`VerifierCommand::Stop`], once every sender of `rx` is gone, or when the writer
    /// has stopped.
    pub fn spawn(
        self,
        name: String,
        rx: mpsc::Receiver<VerifierCommand>,
        tx: mpsc::Sender<RegionCommand>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run(rx, tx))
    }

    fn run(self, mut rx: mpsc::Receiver<VerifierCommand>, tx: mpsc::Sender<RegionCommand>) {
        let mut boxes = Boxes::default();
        let mut stopping = false;
        while !stopping && let Some(first) = rx.blocking_recv() {
            let mut group = Vec::new();
            let mut next = Ok(first);
            while let Ok(cmd) = next {
                match cmd {
                    VerifierCommand::Uplink(u) => group.push(u),
                    VerifierCommand::Stop => {
                        stopping = true;
                        break;
                    }
                }
                if group.len() >= self.group_max {
                    break;
                }
                next = rx.try_recv();
            }
            let mut found = self.check(&group, &mut boxes);
            for (i, u) in group.into_iter().enumerate() {
                let cmd = RegionCommand::Uplink {
                    topic_device: u.topic_device,
                    payload: u.payload,
                    reply: u.reply,
                    pre: found.remove(&i).map(Box::new),
                };
                if tx.blocking_send(cmd).is_err() {
                    return; // the writer has stopped
                }
            }
        }
        if stopping {
            let _ = tx.blocking_send(RegionCommand::Stop);
        }
    }

    /// Batch-checks `group` under each sender's committed key; answers, by place in the group,
    /// the uplinks that verified and opened.
    fn check(&self, group: &[Uplink], boxes: &mut Boxes) -> HashMap<usize, Prechecked> {
        let mut keys: HashMap<&DeviceId, Option<PublicKey>> = HashMap::new();
        let mut candidates = Vec::with_capacity(group.len());
        for (i, u) in group.iter().enumerate() {
            let Ok(opened) = envelope::open(&u.payload, self.max_message_bytes) else {
                continue;
            };
            if !matches!(&opened.header().sender, Party::Device(d) if d == &u.topic_device) {
                continue;
            }
            let key = *keys.entry(&u.topic_device).or_insert_with(|| {
                match self.reads.device(&u.topic_device) {
                    Ok(Some(record)) if record.revoked_at_ms.is_none() => Some(record.public_key),
                    _ => None,
                }
            });
            if let Some(key) = key {
                candidates.push((i, opened, u.payload.as_ref(), key));
            }
        }
        boxes.make_room(candidates.len());
        for (_, _, _, key) in &candidates {
            boxes.get_or_make(&self.hub_key, *key);
        }
        let boxes = &*boxes;
        let items: Vec<PrecheckItem<'_>> = candidates
            .into_iter()
            .filter_map(|(i, opened, payload, key)| {
                Some((i, opened, payload, key, boxes.get(&key)?))
            })
            .collect();
        // On this thread alone: the writer is busy on another core meanwhile.
        precheck_part(items).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::testing::{Loader, Scene, ack, record, scene, writer};
    use crate::store::{RegionBatch, RegionStore};

    /// An audit head a check verified: the last entry's sequence number and chain hash.
    type AuditHead = (u64, [u8; 32]);

    /// The verifier passes every uplink on, in order, and vouches only for those signed by
    /// their sender's committed key: not a stranger's key, a tampered signature, a revoked or
    /// unknown device, or another device's envelope on this device's topic.
    #[test]
    fn only_envelopes_signed_by_their_senders_committed_key_are_vouched_for() {
        let Scene {
            dir: _dir,
            path,
            region,
            hub,
        } = scene();
        let [a, b, gone, unknown] = ["pos-a", "pos-b", "pos-gone", "pos-new"].map(|id| {
            (
                DeviceId::new(id).expect("id"),
                SecretKey::generate().expect("key"),
            )
        });
        let stranger = SecretKey::generate().expect("key");
        let mut store = RegionStore::open(&path).expect("store");
        let enroll = RegionBatch {
            enroll: [&a, &b, &gone].map(|(id, key)| record(id, key)).to_vec(),
            ..RegionBatch::default()
        };
        store.commit(&enroll).expect("commit");
        let revoke = RegionBatch {
            revoke: vec![(gone.0.clone(), 2)],
            ..RegionBatch::default()
        };
        store.commit(&revoke).expect("commit");

        let mut tampered = ack(&region, &a.0, &a.1, &hub);
        *tampered.last_mut().expect("a signature") ^= 1;
        let mut loader = Loader::new(b.0.as_str());
        loader.key = b.1.clone();
        let (change, head) = loader.load(&region, &hub, "u-1");
        let sent: Vec<(&DeviceId, Vec<u8>)> = vec![
            (&a.0, ack(&region, &a.0, &a.1, &hub)),
            (&a.0, ack(&region, &a.0, &stranger, &hub)),
            (&a.0, tampered),
            (&gone.0, ack(&region, &gone.0, &gone.1, &hub)),
            (&unknown.0, ack(&region, &unknown.0, &unknown.1, &hub)),
            (&b.0, ack(&region, &a.0, &a.1, &hub)),
            (&b.0, ack(&region, &b.0, &b.1, &hub)),
            (&b.0, change),
        ];
        let (uplinks, uplinks_rx) = mpsc::channel(16);
        let (writer_tx, mut writer_rx) = mpsc::channel(16);
        let verifier = Verifier {
            reads: Arc::new(RegionReads::open(&path, 1).expect("reads")),
            hub_key: hub,
            max_message_bytes: 64 * 1024,
            group_max: 256,
        };
        // Queued before the thread starts, so the verifier checks them as one group.
        for (device, payload) in &sent {
            let (reply, _) = oneshot::channel();
            uplinks
                .try_send(VerifierCommand::Uplink(Uplink {
                    topic_device: (*device).clone(),
                    payload: payload.clone().into(),
                    reply,
                }))
                .expect("room in the queue");
        }
        uplinks
            .try_send(VerifierCommand::Stop)
            .expect("room in the queue");
        let thread = verifier
            .spawn("verify-test".into(), uplinks_rx, writer_tx)
            .expect("thread");
        let mut passed = Vec::new();
        loop {
            match writer_rx.blocking_recv() {
                Some(RegionCommand::Uplink {
                    topic_device,
                    payload,
                    pre,
                    ..
                }) => passed.push((topic_device, payload, pre.map(|p| (p.signer, p.head)))),
                Some(RegionCommand::Stop) => break,
                other => panic!("the verifier passes on uplinks, then the stop: {other:?}"),
            }
        }
        // It stops on its own, though its queue still has a sender.
        thread.join().expect("the verifier ends");
        drop(uplinks);

        assert_eq!(passed.len(), sent.len(), "every uplink is passed on");
        for ((device, payload), (topic_device, passed_payload, _)) in sent.iter().zip(&passed) {
            assert_eq!(*device, topic_device);
            assert_eq!(payload.as_slice(), passed_payload.as_ref());
        }
        let vouched: Vec<Option<(PublicKey, Option<AuditHead>)>> =
            passed.into_iter().map(|(_, _, found)| found).collect();
        assert_eq!(
            vouched,
            vec![
                Some((a.1.public(), None)),
                None,
                None,
                None,
                None,
                None,
                Some((b.1.public(), None)),
                // A change's audit head is checked too: its chain hash, signed by the sender.
                Some((b.1.public(), Some((1, head)))),
            ]
        );
    }

    /// The writer takes a batch check's word only under a key it accepts itself: a check made
    /// under another key (as by a verifier that read a key since rotated out, or a stranger's)
    /// leaves the envelope to be verified alone, and it is refused.
    #[test]
    fn the_writer_takes_a_check_only_under_a_key_it_accepts() {
        let Scene {
            dir: _dir,
            path,
            region,
            hub,
        } = scene();
        let device = DeviceId::new("pos-a").expect("id");
        let key = SecretKey::generate().expect("key");
        let other = SecretKey::generate().expect("key");
        let mut store = RegionStore::open(&path).expect("store");
        let enroll = RegionBatch {
            enroll: vec![record(&device, &key)],
            ..RegionBatch::default()
        };
        store.commit(&enroll).expect("commit");
        let mut writer = writer(&region, store, &hub);
        // Sends `payload` as `device`'s uplink with what a batch check under `checked_under`
        // found of it, and answers the writer's verdict.
        let mut send = |payload: Vec<u8>, checked_under: &SecretKey| {
            let opened = envelope::open(&payload, 64 * 1024).expect("decodes");
            let device_box = envelope::BoxKey::new(&hub, &checked_under.public());
            let item = (
                0,
                opened,
                payload.as_slice(),
                checked_under.public(),
                &device_box,
            );
            let pre = precheck_part(vec![item]).pop().map(|(_, p)| Box::new(p));
            assert!(
                pre.is_some(),
                "the check verifies under the key it was given"
            );
            let (reply, answer) = oneshot::channel();
            writer.process(vec![RegionCommand::Uplink {
                topic_device: device.clone(),
                payload: payload.clone().into(),
                reply,
                pre,
            }]);
            answer.blocking_recv().expect("answered")
        };
        let forged = ack(&region, &device, &other, &hub);
        assert_eq!(
            send(forged, &other),
            UplinkOutcome::Rejected("bad_signature")
        );
        let genuine = ack(&region, &device, &key, &hub);
        assert_eq!(send(genuine, &key), UplinkOutcome::DownAcked(0));
    }
}
