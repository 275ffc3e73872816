//! cargo-fuzz target: see `devicekey_fuzz::key_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devicekey_fuzz::key_file::run(data));
