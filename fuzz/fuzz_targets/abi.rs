//! cargo-fuzz target: see `devicekey_fuzz::abi`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devicekey_fuzz::abi::run(data));
