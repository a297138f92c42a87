//! The envelope's encoding, signatures, sealing and strict decoding, in both versions.

use super::*;
use proptest::prelude::*;

fn sample() -> Envelope {
    Envelope {
        header: Header {
            region: RegionId::new("north").expect("id"),
            sender: Party::Device(DeviceId::new("pos-1").expect("id")),
            recipient: Party::Hub,
            seq: 42,
            sent_at_ms: 1_700_000_000_000,
        },
        body: Body::Changes(Batch {
            after: 3,
            up_to: 4,
            entries: vec![Entry {
                seq: 4,
                ledger: FridgeId::new("fridge-1").expect("id"),
                epoch: 2,
                kind: EntryKind::Change,
                prev: Some([7; 32]),
                change: vec![1, 2, 3, 4],
                hub_sig: None,
            }],
            head_sig: Some(vec![9; 64]),
        }),
    }
}

#[test]
fn a_batch_verifies_the_good_envelopes_and_hands_back_the_others() {
    let keys: Vec<SecretKey> = (0..12).map(|i| SecretKey::from_seed([i + 1; 32])).collect();
    let mut wires: Vec<Vec<u8>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut e = sample();
            e.header.seq = i as u64;
            e.seal(k)
        })
        .collect();
    // A flipped signature bit, and an envelope checked against another device's key.
    let last = wires[4].len() - 1;
    wires[4][last] ^= 1;
    let items: Vec<(Unverified, &[u8], PublicKey)> = wires
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let key = if i == 9 {
                keys[0].public()
            } else {
                keys[i].public()
            };
            (
                open(w, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes"),
                w.as_slice(),
                key,
            )
        })
        .collect();
    let results = verify_batch(items);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Some(v) => {
                assert!(i != 4 && i != 9, "envelope {i} must not verify");
                assert_eq!(v.plain().expect("plain").header.seq, i as u64);
            }
            None => assert!(i == 4 || i == 9, "envelope {i} must verify"),
        }
    }
}

#[test]
fn round_trip_verifies() {
    let key = SecretKey::from_seed([1; 32]);
    let bytes = sample().seal(&key);
    let opened = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes");
    assert_eq!(opened.header(), &sample().header);
    assert_eq!(
        opened
            .verify(&bytes, &key.public())
            .and_then(Verified::plain),
        Ok(sample())
    );
}

#[test]
fn a_sealed_body_opens_for_its_recipient_only() {
    let device = SecretKey::from_seed([1; 32]);
    let hub = SecretKey::from_seed([2; 32]);
    let other = SecretKey::from_seed([3; 32]);
    let bytes = sample()
        .seal_to(&device, &BoxKey::new(&device, &hub.public()))
        .expect("sealed");
    let change = [1u8, 2, 3, 4];
    assert!(
        !bytes.windows(change.len()).any(|w| w == change),
        "the change bytes travel in clear"
    );
    let open_with = |key: &BoxKey| {
        open(&bytes, MAX_MESSAGE_BYTES_DEFAULT)
            .and_then(|u| u.verify(&bytes, &device.public()))
            .and_then(|v| v.open_sealed(&[key]))
    };
    // The hub opens it with its key and the device's public key.
    assert_eq!(
        open_with(&BoxKey::new(&hub, &device.public())),
        Ok(sample())
    );
    // Another device of the region, reading the topic, cannot.
    assert_eq!(
        open_with(&BoxKey::new(&other, &device.public())),
        Err(EnvelopeError::Undecryptable)
    );
    assert_eq!(
        open_with(&BoxKey::new(&other, &hub.public())),
        Err(EnvelopeError::Undecryptable)
    );
    // A sealed body is not taken as a clear one, nor a clear one where sealing is required.
    let sealed = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT)
        .and_then(|u| u.verify(&bytes, &device.public()))
        .and_then(Verified::plain);
    assert_eq!(sealed, Err(EnvelopeError::UnexpectedSeal));
    let clear = sample().seal(&device);
    let verdict = open(&clear, MAX_MESSAGE_BYTES_DEFAULT)
        .and_then(|u| u.verify(&clear, &device.public()))
        .and_then(|v| v.open_sealed(&[&BoxKey::new(&hub, &device.public())]));
    assert_eq!(verdict, Err(EnvelopeError::NotSealed));
    // Two seals of the same envelope differ (fresh nonces).
    let again = sample()
        .seal_to(&device, &BoxKey::new(&device, &hub.public()))
        .expect("sealed");
    assert_ne!(bytes, again);
}

#[test]
fn every_bit_flip_of_a_sealed_envelope_is_refused() {
    let device = SecretKey::from_seed([1; 32]);
    let hub = SecretKey::from_seed([2; 32]);
    let bytes = sample()
        .seal_to(&device, &BoxKey::new(&device, &hub.public()))
        .expect("sealed");
    let hub_box = BoxKey::new(&hub, &device.public());
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let verdict = open(&flipped, MAX_MESSAGE_BYTES_DEFAULT)
            .and_then(|u| u.verify(&flipped, &device.public()))
            .and_then(|v| v.open_sealed(&[&hub_box]));
        assert!(verdict.is_err(), "bit {bit} flipped was accepted");
    }
}

#[test]
fn wrong_key_and_every_bit_flip_are_refused() {
    let key = SecretKey::from_seed([1; 32]);
    let other = SecretKey::from_seed([2; 32]);
    let bytes = sample().seal(&key);
    let opened = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes");
    assert_eq!(
        opened.verify(&bytes, &other.public()).map(|_| ()),
        Err(EnvelopeError::BadSignature)
    );
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let verdict = open(&flipped, MAX_MESSAGE_BYTES_DEFAULT)
            .and_then(|u| u.verify(&flipped, &key.public()))
            .and_then(Verified::plain);
        assert!(verdict.is_err(), "bit {bit} flipped was accepted");
    }
}

#[test]
fn limits_truncation_version_and_trailing_bytes() {
    let key = SecretKey::from_seed([1; 32]);
    let bytes = sample().seal(&key);
    assert!(matches!(
        open(&bytes, bytes.len() - 1),
        Err(EnvelopeError::Oversized { .. })
    ));
    for cut in 0..bytes.len() {
        let r = open(&bytes[..cut], MAX_MESSAGE_BYTES_DEFAULT)
            .and_then(|u| u.verify(&bytes[..cut], &key.public()))
            .and_then(Verified::plain);
        assert!(r.is_err(), "truncated at {cut} accepted");
    }
    for version in [0, 1, PROTOCOL_VERSION + 1, u8::MAX] {
        let mut other = bytes.clone();
        other[0] = version;
        assert_eq!(
            open(&other, MAX_MESSAGE_BYTES_DEFAULT).err(),
            Some(EnvelopeError::Version(version))
        );
    }
    // The previous version's signature covers its version byte: relabelled, it fails.
    let mut relabelled = bytes.clone();
    relabelled[0] = PROTOCOL_VERSION_MIN;
    let verdict = open(&relabelled, MAX_MESSAGE_BYTES_DEFAULT)
        .and_then(|u| u.verify(&relabelled, &key.public()));
    assert!(verdict.is_err());
    let mut trailing = bytes[..bytes.len() - SIGNATURE_LEN].to_vec();
    trailing.push(0);
    trailing.extend_from_slice(&bytes[bytes.len() - SIGNATURE_LEN..]);
    assert!(matches!(
        open(&trailing, MAX_MESSAGE_BYTES_DEFAULT),
        Err(EnvelopeError::Malformed(_))
    ));
}

/// Envelopes the release before this one (protocol version 2) wrote, byte for byte.
fn golden(name: &str) -> Vec<u8> {
    let line = include_str!("v2_golden.txt")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .expect("golden envelope");
    hex::decode(line).expect("hex")
}

fn hub_to_pos(seq: u64) -> Header {
    Header {
        region: RegionId::new("north").expect("id"),
        sender: Party::Hub,
        recipient: Party::Device(DeviceId::new("pos-1").expect("id")),
        seq,
        sent_at_ms: 1_700_000_000_000,
    }
}

#[test]
fn the_previous_version_is_read_and_written_byte_for_byte() {
    let device = SecretKey::from_seed([1; 32]);
    let hub = SecretKey::from_seed([2; 32]);
    let ack = Envelope {
        header: hub_to_pos(7),
        body: Body::Ack(Ack {
            up_to: 41,
            gap: true,
            generation: Some(Generation([5; 16])),
            origin: Some(Origin {
                generation: Generation([4; 16]),
                changes_up_to: 12,
            }),
        }),
    };
    // Written in version 2 the generation is left out, and the bytes are the old release's.
    assert_eq!(ack.seal_version(&hub, 2), golden("plain_ack"));
    let without = Envelope {
        body: Body::Ack(Ack::new(41, true)),
        ..ack.clone()
    };
    let read = |bytes: &[u8], signer: &SecretKey, boxed: Option<&BoxKey>| {
        let opened = open(bytes, MAX_MESSAGE_BYTES_DEFAULT)?;
        assert_eq!(opened.version(), 2);
        let verified = opened.verify(bytes, &signer.public())?;
        assert_eq!(verified.version(), 2);
        match boxed {
            Some(k) => verified.open_sealed(&[k]),
            None => verified.plain(),
        }
    };
    assert_eq!(read(&golden("plain_ack"), &hub, None), Ok(without.clone()));
    let device_box = BoxKey::new(&device, &hub.public());
    assert_eq!(
        read(&golden("sealed_ack"), &hub, Some(&device_box)),
        Ok(without)
    );
    // A device's changes, sealed to the hub by the old release, open at the hub.
    let hub_box = BoxKey::new(&hub, &device.public());
    let changes = read(&golden("sealed_changes"), &device, Some(&hub_box)).expect("opens");
    let Body::Changes(batch) = changes.body else {
        panic!("changes expected, got {:?}", changes.body);
    };
    assert_eq!((batch.after, batch.up_to), (3, 4));
    assert_eq!(batch.entries[0].change, vec![1, 2, 3, 4]);
    assert_eq!(batch.entries[0].prev, Some([7; 32]));
    // Sealed in version 2 by this build, it opens as the old release would (same body bytes).
    let again = ack
        .seal_to_version(&hub, &BoxKey::new(&hub, &device.public()), 2)
        .expect("sealed");
    assert_eq!(again[0], 2);
    let back = read(&again, &hub, Some(&device_box)).expect("opens");
    assert_eq!(back.body, Body::Ack(Ack::new(41, true)));
}

#[test]
fn the_hubs_signature_of_its_change_travels_in_this_version_only() {
    let hub = SecretKey::from_seed([2; 32]);
    let plain = sample();
    let mut signed = plain.clone();
    let Body::Changes(batch) = &mut signed.body else {
        panic!("the sample is a batch");
    };
    batch.entries[0].hub_sig = Some(vec![3; 64]);
    // Version 3 carries it and reads it back.
    let now = signed.seal(&hub);
    let back = open(&now, MAX_MESSAGE_BYTES_DEFAULT)
        .and_then(|u| u.verify(&now, &hub.public()))
        .and_then(Verified::plain);
    assert_eq!(back, Ok(signed.clone()));
    assert!(now.len() > plain.seal(&hub).len() + 64);
    // Version 2 leaves it out: the bytes are those of the entry without it.
    let old = signed.seal_version(&hub, 2);
    assert_eq!(old, plain.seal_version(&hub, 2));
    let back = open(&old, MAX_MESSAGE_BYTES_DEFAULT)
        .and_then(|u| u.verify(&old, &hub.public()))
        .and_then(Verified::plain);
    assert_eq!(back, Ok(plain));
}

#[test]
fn this_version_carries_the_generation_and_batches_verify_either_version() {
    let hub = SecretKey::from_seed([2; 32]);
    let ack = Envelope {
        header: hub_to_pos(8),
        body: Body::Ack(Ack {
            up_to: 9,
            gap: false,
            generation: Some(Generation([6; 16])),
            origin: Some(Origin {
                generation: Generation([3; 16]),
                changes_up_to: 7,
            }),
        }),
    };
    let now = ack.seal(&hub);
    assert_eq!(wire_version(&now), Some(PROTOCOL_VERSION));
    let back = open(&now, MAX_MESSAGE_BYTES_DEFAULT)
        .and_then(|u| u.verify(&now, &hub.public()))
        .and_then(Verified::plain);
    assert_eq!(back, Ok(ack.clone()));
    let old = ack.seal_version(&hub, 2);
    let items = vec![
        (
            open(&now, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes"),
            now.as_slice(),
            hub.public(),
        ),
        (
            open(&old, MAX_MESSAGE_BYTES_DEFAULT).expect("decodes"),
            old.as_slice(),
            hub.public(),
        ),
    ];
    let verdicts = verify_batch(items);
    assert!(verdicts.iter().all(Option::is_some), "{verdicts:?}");
    assert_eq!(
        Generation::parse(&Generation([6; 16]).to_string()),
        Some(Generation([6; 16]))
    );
    assert_eq!(read_notice(&notice(3, 4)), Some((3, 4)));
    assert_eq!(read_notice(&now), None);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let key = SecretKey::from_seed([1; 32]);
        if let Ok(u) = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT) {
            prop_assert!(u.verify(&bytes, &key.public()).is_err());
        }
    }

    #[test]
    fn round_trips_any_batch(after in 0u64..u64::MAX / 2, seqs in proptest::collection::vec((0u64..1000, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
        let key = SecretKey::from_seed([3; 32]);
        let mut env = sample();
        env.body = Body::Changes(Batch::new(
            after,
            after + 1000,
            seqs.into_iter().map(|(s, change)| Entry::change(
                after + s + 1,
                FridgeId::new("f").expect("id"),
                0,
                change,
            )).collect(),
        ));
        let bytes = env.seal(&key);
        let back = open(&bytes, MAX_MESSAGE_BYTES_DEFAULT).and_then(|u| u.verify(&bytes, &key.public())).and_then(Verified::plain);
        prop_assert_eq!(back, Ok(env));
    }
}
