//! Runs the seeded simulation of the sync protocol (`larder_tests::protocol_sim`) for many
//! seeds and prints what the faults did; exits 1 if any seed broke an invariant.
//!
//! `cargo run --release -p larder-tests --bin larder-protocol-sim -- --seeds 10000`
//! Replay one seed: `... -- --first SEED --seeds 1 --verbose`.

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use larder_tests::protocol_sim::{ProtoConfig, ProtoReport, run};

#[derive(Debug, Parser)]
#[command(
    about = "Simulate agents and a hub syncing through drops, duplicates, reordering, partitions, crashes, clock steps, revocations and attacks, for many seeds, and check every invariant"
)]
struct Args {
    /// How many seeds to run (CI runs 500; the long run is 10,000).
    #[arg(long, default_value_t = 500)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Fridges in the region (each with its fridge device).
    #[arg(long, default_value_t = 2)]
    fridges: usize,
    /// POS terminals, each serving every fridge.
    #[arg(long, default_value_t = 2)]
    pos: usize,
    /// Simulated hours of faults before the drain.
    #[arg(long, default_value_t = 48)]
    hours: u32,
    /// Print one line per seed.
    #[arg(long)]
    verbose: bool,
    /// Seeds run at once (default: the machine's cores).
    #[arg(long)]
    jobs: Option<u64>,
}

/// One piece: the command line's run over seeds and its report.
fn main() {
    let args = Args::parse();
    if args.fridges == 0 {
        eprintln!("error: --fridges must be at least 1");
        std::process::exit(2);
    }
    let started = Instant::now();
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
        .max(1);
    let seeds: Vec<u64> = (args.first..args.first.saturating_add(args.seeds)).collect();
    let results: Vec<(u64, Result<ProtoReport, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs)
            .map(|j| {
                let seeds = &seeds;
                let args = &args;
                s.spawn(move || {
                    seeds
                        .iter()
                        .skip(j as usize)
                        .step_by(jobs as usize)
                        .map(|seed| {
                            let cfg = ProtoConfig {
                                seed: *seed,
                                fridges: args.fridges,
                                pos: args.pos,
                                hours: args.hours,
                            };
                            // A panic is a failure of its seed, not a lost worker.
                            let result =
                                std::panic::catch_unwind(|| run(cfg)).unwrap_or_else(|_| {
                                    Err(format!("seed {seed}: panicked (see above)"))
                                });
                            (*seed, result)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![(0, Err("a worker thread died".to_owned()))])
            })
            .collect();
        all.sort_by_key(|(seed, _)| *seed);
        all
    });
    let results_len = results.len();
    let mut failed = 0u64;
    let mut t = ProtoReport::default();
    let mut refused: BTreeMap<&str, u64> = BTreeMap::new();
    for (seed, result) in results {
        match result {
            Ok(r) => {
                if args.verbose {
                    println!(
                        "seed {seed}: {} local changes, {} envelopes ({} dropped, {} duplicated, {} corrupted), {} partitions, {} agent and {} hub crashes ({} uncommitted changes lost and resent), {} clock steps back, {} revoked, {} attacks, hub refused {:?}, devices refused {:?}, longest wait {} s, drained in {} s",
                        r.local_changes,
                        r.envelopes_sent,
                        r.dropped,
                        r.duplicated,
                        r.corrupted,
                        r.partitions,
                        r.agent_crashes,
                        r.hub_crashes,
                        r.uncommitted_lost,
                        r.clock_steps,
                        r.revoked,
                        r.attacks,
                        r.refused,
                        r.device_refused,
                        r.longest_stall_ms / 1000,
                        r.drain_ms / 1000
                    );
                }
                t.local_changes += r.local_changes;
                t.envelopes_sent += r.envelopes_sent;
                t.dropped += r.dropped;
                t.duplicated += r.duplicated;
                t.corrupted += r.corrupted;
                t.partitions += r.partitions;
                t.agent_crashes += r.agent_crashes;
                t.hub_crashes += r.hub_crashes;
                t.uncommitted_lost += r.uncommitted_lost;
                t.clock_steps += r.clock_steps;
                t.revoked += r.revoked;
                t.attacks += r.attacks;
                let (a, b) = (&mut t.adversary, r.adversary);
                a.oversized_refills += b.oversized_refills;
                a.oversized_changes += b.oversized_changes;
                a.foreign_sales_refused += b.foreign_sales_refused;
                a.tagged_refills_refused += b.tagged_refills_refused;
                t.longest_stall_ms = t.longest_stall_ms.max(r.longest_stall_ms);
                for (k, v) in r.refused {
                    *refused.entry(k).or_default() += v;
                }
            }
            Err(e) => {
                failed += 1;
                println!(
                    "FAILED {e} (replay: --first {seed} --seeds 1 --fridges {} --pos {} --hours {} --verbose)",
                    args.fridges, args.pos, args.hours
                );
            }
        }
    }
    let ran = results_len;
    println!(
        "{ran} seeds in {:.1} s: {failed} failed; {} local changes, {} envelopes ({} dropped, {} duplicated, {} corrupted), {} partitions, {} agent and {} hub crashes ({} uncommitted changes lost and resent), {} clock steps back, {} devices revoked, {} attacks; the adversary's {} oversized refills went as {} changes, each within a message, {} sales of another fridge's unit and {} refills tagged with a walk-up sale were refused; the hub refused {:?}; longest wait with work pending {:.1} s",
        started.elapsed().as_secs_f64(),
        t.local_changes,
        t.envelopes_sent,
        t.dropped,
        t.duplicated,
        t.corrupted,
        t.partitions,
        t.agent_crashes,
        t.hub_crashes,
        t.uncommitted_lost,
        t.clock_steps,
        t.revoked,
        t.attacks,
        t.adversary.oversized_refills,
        t.adversary.oversized_changes,
        t.adversary.foreign_sales_refused,
        t.adversary.tagged_refills_refused,
        refused,
        t.longest_stall_ms as f64 / 1000.0
    );
    if failed > 0 || ran as u64 != args.seeds {
        std::process::exit(1);
    }
}
