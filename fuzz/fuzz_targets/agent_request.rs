//! Fuzz target `agent_request`: arbitrary bytes into `larder_tests::fuzz::agent_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::agent_request(data));
