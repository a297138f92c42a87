//! The admission rules one by one, on envelopes sealed as a device seals them.

use super::*;
use crate::SecretKey;
use crate::envelope::{Batch, Entry};

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("id")
}

fn fridge(s: &str) -> FridgeId {
    FridgeId::new(s).expect("id")
}

fn north() -> RegionId {
    RegionId::new("north").expect("id")
}

struct Fixture {
    device_key: SecretKey,
    hub_box: BoxKey,
    fridges: Vec<FridgeId>,
    device_id: DeviceId,
}

impl Fixture {
    fn new() -> Self {
        let device_key = SecretKey::from_seed([3; 32]);
        Self {
            hub_box: BoxKey::new(&hub_key(), &device_key.public()),
            device_key,
            fridges: vec![fridge("fridge-1")],
            device_id: id("pos-1"),
        }
    }

    fn device(&self, revoked: bool) -> Device<'_> {
        Device {
            id: &self.device_id,
            fridges: &self.fridges,
            revoked,
            key: self.device_key.public(),
        }
    }

    /// The envelope `body` from pos-1 to the hub of `region`, sealed to the hub.
    fn seal(&self, region: &str, seq: u64, body: Body) -> Vec<u8> {
        let device_box = BoxKey::new(&self.device_key, &SecretKey::from_seed([4; 32]).public());
        Envelope {
            header: Header {
                region: RegionId::new(region).expect("id"),
                sender: Party::Device(self.device_id.clone()),
                recipient: Party::Hub,
                seq,
                sent_at_ms: 0,
            },
            body,
        }
        .seal_to(&self.device_key, &device_box)
        .expect("randomness")
    }
}

/// A region whose ledgers are all in `epoch`, its downlink committed up to `head`.
struct At {
    epoch: u32,
    head: u64,
}

/// The hub's key of these tests (the one [`Fixture`] seals to).
fn hub_key() -> SecretKey {
    SecretKey::from_seed([4; 32])
}

impl Region for At {
    fn epoch(&self, _: &FridgeId) -> Option<u32> {
        Some(self.epoch)
    }

    fn down_head(&self) -> u64 {
        self.head
    }

    fn hub_key(&self) -> PublicKey {
        hub_key().public()
    }
}

/// A change to a ledger document authored by `device`'s actor.
fn change_by(device: &DeviceId) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new().with_actor(ledger::actor_for(device));
    doc.put(automerge::ROOT, "k", 1).expect("put");
    doc.get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec()
}

fn changes(ledger: &str, epoch: u32, change: Vec<u8>) -> Body {
    given_back(ledger, epoch, change, None)
}

/// A batch of one change, with the hub's signature `hub_sig` if given.
fn given_back(ledger: &str, epoch: u32, change: Vec<u8>, hub_sig: Option<Vec<u8>>) -> Body {
    Body::Changes(Batch {
        after: 0,
        up_to: 1,
        entries: vec![Entry {
            seq: 1,
            ledger: fridge(ledger),
            epoch,
            kind: EntryKind::Change,
            prev: Some([0; 32]),
            change,
            hub_sig,
        }],
        head_sig: None,
    })
}

#[test]
fn the_header_names_this_region_the_topics_device_and_the_hub() {
    let f = Fixture::new();
    let ack = Body::Ack(Ack::new(0, false));
    let bytes = f.seal("north", 1, ack.clone());
    assert!(check_header(&bytes, 64 * 1024, &north(), &f.device_id).is_ok());
    let south = RegionId::new("south").expect("id");
    let refused = |r: Result<Unverified, Rejection>| r.err().map(|e| e.reason());
    assert_eq!(
        refused(check_header(&bytes, 64 * 1024, &south, &f.device_id)),
        Some("wrong_region")
    );
    assert_eq!(
        refused(check_header(&bytes, 64 * 1024, &north(), &id("pos-2"))),
        Some("wrong_topic")
    );
    assert_eq!(
        refused(check_header(&bytes, 16, &north(), &f.device_id)),
        Some(
            EnvelopeError::Oversized {
                len: bytes.len(),
                max: 16
            }
            .reason()
        )
    );
    assert_eq!(
        refused(check_header(&bytes[..8], 64 * 1024, &north(), &f.device_id)),
        Some("malformed")
    );
}

#[test]
fn an_unknown_or_revoked_sender_is_refused() {
    let f = Fixture::new();
    assert_eq!(check_device(None).err(), Some(Rejection::UnknownDevice));
    assert_eq!(
        check_device(Some(&f.device(true))).err(),
        Some(Rejection::RevokedDevice)
    );
    let enrolled = f.device(false);
    assert!(check_device(Some(&enrolled)).is_ok_and(|d| d.id == &f.device_id));
}

#[test]
fn an_envelope_is_taken_once_and_an_ack_goes_no_further_than_the_region_committed() {
    let f = Fixture::new();
    let region = At { epoch: 0, head: 10 };
    let bytes = f.seal("north", 5, Body::Ack(Ack::new(99, false)));
    let mut progress = Progress::default();
    let admit_once = |progress: &mut Progress| {
        admit(
            &bytes,
            64 * 1024,
            &north(),
            &f.device_id,
            Some(&f.device(false)),
            &[f.device_key.public()],
            |_| &f.hub_box,
            &region,
            progress,
        )
    };
    match admit_once(&mut progress) {
        Ok((header, Admitted::DownAcked(10))) => assert_eq!(header.seq, 5),
        other => panic!("{other:?}"),
    }
    assert_eq!((progress.last_env_seq, progress.down_acked), (5, 10));
    let before = progress;
    assert_eq!(admit_once(&mut progress).err(), Some(Rejection::Replayed));
    assert_eq!(progress, before, "a rejection changes nothing");
}

#[test]
fn a_signature_by_another_key_is_refused() {
    let f = Fixture::new();
    let bytes = f.seal("north", 1, Body::Ack(Ack::new(0, false)));
    let other = SecretKey::from_seed([9; 32]).public();
    let opened = check_header(&bytes, 64 * 1024, &north(), &f.device_id).expect("opens");
    let refused = verify_and_open(opened, &bytes, &[other], |_| &f.hub_box).err();
    assert_eq!(refused.map(|r| r.reason()), Some("bad_signature"));
}

#[test]
fn changes_only_of_its_own_ledgers_in_the_current_epoch_by_its_own_actor() {
    let f = Fixture::new();
    let key = f.device_key.public();
    let judge = |body: Body, epoch: u32| {
        let mut progress = Progress::default();
        let r = admit_body(
            body,
            1,
            &f.device(false),
            &key,
            &north(),
            &At { epoch, head: 0 },
            &mut progress,
        );
        (r.map(|_| ()).map_err(|e| e.reason()), progress.last_env_seq)
    };
    let own = change_by(&f.device_id);
    assert_eq!(judge(changes("fridge-1", 2, own.clone()), 2), (Ok(()), 1));
    assert_eq!(
        judge(changes("fridge-9", 2, own.clone()), 2),
        (Err("foreign_ledger"), 0)
    );
    assert_eq!(
        judge(changes("fridge-1", 1, own.clone()), 2),
        (Err("stale_epoch"), 0)
    );
    assert_eq!(
        judge(changes("fridge-1", 3, own), 2),
        (Err("future_epoch"), 0)
    );
    assert_eq!(
        judge(changes("fridge-1", 2, change_by(&id("pos-2"))), 2),
        (Err("foreign_actor"), 0)
    );
    assert_eq!(
        judge(Body::Time(crate::envelope::TimeBeacon { hub_ms: 0 }), 2),
        (Err("unexpected_kind"), 0)
    );
    // The hub's change, given back by a device: taken with the hub's signature only.
    let hubs = change_by(&id("hub-of-a-generation"));
    let signed = |key: &SecretKey, change: &[u8], epoch: u32| {
        Some(crate::audit::sign_hub_change(
            key,
            &north(),
            &fridge("fridge-1"),
            epoch,
            change,
        ))
    };
    let sig = signed(&hub_key(), &hubs, 2);
    assert_eq!(
        judge(given_back("fridge-1", 2, hubs.clone(), sig.clone()), 2),
        (Ok(()), 1)
    );
    assert_eq!(
        judge(given_back("fridge-1", 2, hubs.clone(), None), 2),
        (Err("foreign_actor"), 0)
    );
    assert_eq!(
        judge(
            given_back("fridge-1", 2, hubs.clone(), signed(&f.device_key, &hubs, 2)),
            2
        ),
        (Err("bad_hub_signature"), 0)
    );
    // The signature is of another epoch's change: it does not vouch for this one.
    assert_eq!(
        judge(
            given_back("fridge-1", 2, hubs.clone(), signed(&hub_key(), &hubs, 1)),
            2
        ),
        (Err("bad_hub_signature"), 0)
    );
}

#[test]
fn only_the_key_in_force_hands_over_with_a_proof() {
    let f = Fixture::new();
    let next = SecretKey::from_seed([5; 32]);
    let old = f.device_key.public();
    let proof = crate::rotation::announce(&north(), &f.device_id, &old, &next);
    let judge = |signer: &PublicKey, r: crate::rotation::KeyRotation| {
        admit_body(
            Body::KeyRotation(r),
            1,
            &f.device(false),
            signer,
            &north(),
            &At { epoch: 0, head: 0 },
            &mut Progress::default(),
        )
        .map_err(|e| e.reason())
    };
    assert!(matches!(
        judge(&old, proof.clone()),
        Ok(Admitted::KeyRotation { again: false, .. })
    ));
    assert_eq!(
        judge(&next.public(), proof.clone()).err(),
        Some("retired_key")
    );
    let mut forged = proof;
    forged.new_key = SecretKey::from_seed([6; 32]).public();
    assert_eq!(judge(&old, forged).err(), Some("bad_rotation_proof"));
}
