//! devicekey: one device-bound ECDSA P-256 key behind a PKCS#11 module and a JSON-RPC server.
//!
//! Data flows one way: [`pkcs11`] (the C ABI) → [`token`] (plain Rust) → [`backend`] (key stores).
//! [`rpc`] is a PKCS#11 client of any module; [`proof`] is shared by `rpc` and `token`.

#[cfg(all(target_os = "linux", feature = "tpm"))]
pub mod attest;
pub mod backend;
pub mod cli;
pub mod config;
pub mod encoding;
pub mod logging;
pub mod p11;
pub mod pkcs11;
pub mod private_dir;
pub mod proof;
mod redact;
pub mod rpc;
pub mod token;
pub mod vendor;

#[cfg(test)]
mod test_support;
