//! The seeded week-long simulation of a region (see `larder_tests::sim`): 20 fridges, 10 POS,
//! app orders, subscriptions, random offline periods, payment failures and clocks up to a day
//! off. Runs `LARDER_SIM_SEEDS` seeds (16 by default: this is a debug build) from
//! `LARDER_SIM_FIRST_SEED` (1), and replays one to check that a run is a function of its seed.
//! CI runs 300 more seeds in a release build with `larder-sim` (`.ci/run`).

use larder_tests::sim::{SimConfig, run};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_simulated_week_holds_every_invariant_for_every_seed() {
    let seeds = env("LARDER_SIM_SEEDS", 16);
    let first = env("LARDER_SIM_FIRST_SEED", 1);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    let mut failed = Vec::new();
                    let mut seed = first + w;
                    while seed < first + seeds {
                        if let Err(e) = run(SimConfig::week(seed)) {
                            failed.push(e);
                        }
                        seed += workers;
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["a worker panicked".into()])
            })
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_run_is_a_function_of_its_seed_and_exercises_every_path() {
    let a = run(SimConfig::week(4242)).expect("runs");
    let b = run(SimConfig::week(4242)).expect("runs");
    assert_eq!(a, b);
    assert_ne!(a.digests, run(SimConfig::week(4243)).expect("runs").digests);
    assert!(a.walk_up_sales > 500, "{a:?}");
    assert!(a.app_orders > 50 && a.escrow_orders > 0, "{a:?}");
    assert!(
        a.subscription_orders > 0 && a.pickups > 0 && a.offline_periods > 10,
        "{a:?}"
    );
}
