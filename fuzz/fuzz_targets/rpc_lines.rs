//! cargo-fuzz target: see `devicekey_fuzz::rpc_lines`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devicekey_fuzz::rpc_lines::run(data));
