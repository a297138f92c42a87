//! Fuzz target `connect_token`: arbitrary bytes into `larder_tests::fuzz::connect_token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::connect_token(data));
