//! cargo-fuzz target: see `devicekey_fuzz::proof_payload`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devicekey_fuzz::proof_payload::run(data));
