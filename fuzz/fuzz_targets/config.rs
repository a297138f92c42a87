//! Fuzz target `config`: arbitrary bytes into `larder_tests::fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::config(data));
