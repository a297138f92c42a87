//! Replays every kept fuzz input through its harness: the seeds the real code makes (the same
//! ones `larder-fuzz-seeds` writes for the fuzzers) and every input that once crashed a target
//! (`fuzz/regressions/<target>/`), so a fixed crash stays fixed on each `cargo test`.

use larder_tests::fuzz::{TARGETS, fuzz_dir, seeds};

fn harness(name: &str) -> larder_tests::fuzz::Harness {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

#[test]
fn seeds_and_past_crashes_pass_their_harnesses() {
    let seeds = seeds().expect("the seeds are made");
    for (target, input) in &seeds {
        harness(target)(input);
    }
    for (target, _) in TARGETS {
        assert!(
            seeds.iter().any(|(t, _)| t == target),
            "{target} has no seed"
        );
    }
    let mut replayed = 0;
    for (target, run) in TARGETS {
        let dir = fuzz_dir().join("regressions").join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a regression entry").path();
            let input = std::fs::read(&path).expect("a regression file");
            eprintln!("replaying {}", path.display());
            run(&input);
            replayed += 1;
        }
    }
    // The kept crashes are there (a moved folder would make this part vacuous).
    assert!(replayed >= 2, "only {replayed} past crashes replayed");
}
