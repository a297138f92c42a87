//! Fuzz target `import_rows`: arbitrary bytes into `larder_tests::fuzz::import_rows`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_tests::fuzz::import_rows(data));
