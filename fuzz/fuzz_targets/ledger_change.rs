//! Fuzz target `ledger_change`: arbitrary bytes into `larder_tests::fuzz::ledger_change`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::ledger_change(data));
