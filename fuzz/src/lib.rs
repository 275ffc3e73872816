//! Fuzz harnesses for devicekey. Each module has `run(&[u8])`; the cargo-fuzz targets in
//! `fuzz_targets/` call them, and `tests/robust_fuzz.rs` in the main package includes the same
//! files (`#[path]`) to replay the seeds and regressions and run a short random smoke on stable.

pub mod abi;
pub mod input;
pub mod key_file;
pub mod proof_payload;
pub mod rpc_lines;
