//! Fuzz target `body`: arbitrary bytes into `larder_tests::fuzz::body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::body(data));
