//! Fuzz target `envelope`: arbitrary bytes into `larder_tests::fuzz::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::envelope(data));
