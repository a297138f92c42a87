//! Measures what checking Ed25519 signatures costs on this machine, alone and in the batches
//! the hub's region writer uses, and the ingest rate the hub could not pass even if checking
//! the two signatures of each envelope (the envelope's and its audit head's) were all it did,
//! on every core.
//!
//! `cargo run --release -p larder-shared --example signature_cost -- [signatures]`

use std::time::Instant;

use larder_shared::SecretKey;
use larder_shared::keys::{Signed, verify_batch};

/// Signatures per batch: what the region writer checks together for a full group.
const BATCH: usize = 256;
/// Signatures each envelope costs the hub.
const PER_ENVELOPE: f64 = 2.0;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_480)
        .max(BATCH);
    let domain = b"larder/example/v1";
    let keys: Vec<SecretKey> = (0..64)
        .map(|_| SecretKey::generate().expect("a key from the OS random source"))
        .collect();
    // The size of the ingest benchmark's envelopes.
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut m = format!("envelope {i}").into_bytes();
            m.resize(473, b'.');
            m
        })
        .collect();
    let sigs: Vec<_> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| keys[i % keys.len()].sign(domain, m))
        .collect();
    let publics: Vec<_> = keys.iter().map(SecretKey::public).collect();

    let start = Instant::now();
    let mut ok = 0;
    for (i, m) in messages.iter().enumerate() {
        ok += usize::from(publics[i % keys.len()].verify(domain, m, &sigs[i]).is_ok());
    }
    let single_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert_eq!(ok, n, "every signature checks");

    let items: Vec<Signed<'_>> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| Signed {
            key: &publics[i % keys.len()],
            domain,
            message: m,
            sig: &sigs[i],
        })
        .collect();
    let start = Instant::now();
    let mut ok = 0;
    for chunk in items.chunks(BATCH) {
        ok += verify_batch(chunk).into_iter().filter(|v| *v).count();
    }
    let batch_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert_eq!(ok, n, "every signature checks in a batch");

    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let ceiling = cores as f64 * 1e6 / (PER_ENVELOPE * batch_us);
    println!("{n} signatures, {cores} cores");
    println!("one by one (verify_strict): {single_us:.1} µs each");
    println!("in batches of {BATCH}: {batch_us:.1} µs each");
    println!(
        "ceiling on hub ingest from signatures alone ({PER_ENVELOPE} per envelope, every core \
         checking and nothing else): {ceiling:.0} envelopes/s"
    );
}
