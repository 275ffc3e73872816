//! `devicekey serve`: the device-key v2 JSON-RPC server (PROTOCOL.md) over any PKCS#11 module.
//!
//! - [`framing`]: bounded newline-delimited reading.
//! - [`strict_json`]: request lines as JSON values, refusing a repeated object key.
//! - [`log_text`]: client-supplied text escaped for a log line.
//! - [`server`]: handshake, dispatch, concurrency bound, the [`server::KeyService`] trait.
//! - [`client`]: the three methods (and `list`/`delete` for the CLI) as a PKCS#11 client.
//! - [`types`]: params and results; [`error`]: codes and messages.
//! - [`attest`]: the attestation extension (`device/key/attest`, `device/key/activateCredential`).
//! - `socket` (Linux): the same protocol on an owner-only Unix socket; `activation` (Linux): that
//!   socket passed by systemd instead.

#[cfg(target_os = "linux")]
pub mod activation;
pub mod attest;
pub mod client;
pub mod error;
pub mod framing;
pub mod log_text;
pub mod server;
#[cfg(target_os = "linux")]
pub mod socket;
pub mod strict_json;
pub mod types;

pub use client::TokenClient;
pub use error::DeviceKeyError;
pub use server::{serve, KeyService, ServeOptions};

/// Serves stdin/stdout with the config found as the module finds it. Returns at end of input.
pub fn serve_stdio(config: &crate::config::Config) -> Result<(), DeviceKeyError> {
    let client = attest::WithAttestation::new(TokenClient::for_server(&config.server)?, config);
    let options = ServeOptions::from_config(&config.server);
    serve(
        std::io::stdin().lock(),
        std::io::stdout(),
        std::sync::Arc::new(client),
        &options,
    )
    .map_err(|e| DeviceKeyError::Platform(format!("reading stdin: {e}")))
}
