//! Runs the seeded week-long region simulation (`larder_tests::sim`) for many seeds and prints
//! what each did; exits 1 if any seed broke an invariant.
//!
//! `cargo run --release -p larder-tests --bin larder-sim -- --seeds 1000 --first 1`

use std::time::Instant;

use clap::Parser;
use larder_tests::sim::{SimConfig, SimReport, run};

#[derive(Debug, Parser)]
#[command(about = "Simulate a region for a week, for many seeds, and check every invariant")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Fridges in the region.
    #[arg(long, default_value_t = 20)]
    fridges: usize,
    /// POS terminals (each serves two fridges).
    #[arg(long, default_value_t = 10)]
    pos: usize,
    /// Simulated days.
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Print one line per seed.
    #[arg(long)]
    verbose: bool,
    /// Seeds run at once (default: the machine's cores).
    #[arg(long)]
    jobs: Option<u64>,
}

fn main() {
    let args = Args::parse();
    let started = Instant::now();
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
        .max(1);
    let seeds: Vec<u64> = (args.first..args.first + args.seeds).collect();
    let results: Vec<(u64, Result<SimReport, String>)> = std::thread::scope(|s| {
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
                            let cfg = SimConfig {
                                seed: *seed,
                                fridges: args.fridges,
                                pos: args.pos,
                                days: args.days,
                            };
                            (*seed, run(cfg))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        all.sort_by_key(|(seed, _)| *seed);
        all
    });
    let mut failed = 0u64;
    let mut totals = SimReport::default();
    for (seed, result) in results {
        match result {
            Ok(r) => {
                if args.verbose {
                    println!(
                        "seed {seed}: {} walk-up sales ({} refused), {} app orders ({} within escrow, {} of those lost), {} refused, {} subscription orders, {} pickups, {} offline periods, conflicts {:?}",
                        r.walk_up_sales,
                        r.walk_up_refused,
                        r.app_orders,
                        r.escrow_orders,
                        r.escrow_orders_lost,
                        r.app_refused,
                        r.subscription_orders,
                        r.pickups,
                        r.offline_periods,
                        r.conflicts
                    );
                }
                totals.walk_up_sales += r.walk_up_sales;
                totals.app_orders += r.app_orders;
                totals.escrow_orders += r.escrow_orders;
                totals.escrow_orders_lost += r.escrow_orders_lost;
                totals.subscription_orders += r.subscription_orders;
                totals.pickups += r.pickups;
                for (k, v) in r.conflicts {
                    *totals.conflicts.entry(k).or_default() += v;
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAILED {e}");
            }
        }
    }
    println!(
        "{} seeds in {:.1} s: {failed} failed; {} walk-up sales, {} app orders ({} within escrow, {} of those later lost), {} subscription orders, {} pickups, conflicts {:?}",
        args.seeds,
        started.elapsed().as_secs_f64(),
        totals.walk_up_sales,
        totals.app_orders,
        totals.escrow_orders,
        totals.escrow_orders_lost,
        totals.subscription_orders,
        totals.pickups,
        totals.conflicts
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
