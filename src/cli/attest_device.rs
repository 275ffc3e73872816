//! The device's side of `devicekey attest` (ATTESTATION.md): print the evidence for a key, and
//! answer a credential-activation challenge. Both go through the same service as
//! `devicekey serve` (the PKCS#11 client with the attestation extension), so the CLI and the
//! server give the same answers.

use serde_json::Value;

use crate::config::Config;
use crate::rpc::attest::{ActivateParams, AttestParams, WithAttestation};
use crate::rpc::{DeviceKeyError, TokenClient};

fn service(config: &Config) -> Result<WithAttestation<TokenClient>, DeviceKeyError> {
    Ok(WithAttestation::new(
        TokenClient::new(&config.server)?,
        config,
    ))
}

/// `devicekey attest --key-id ID --nonce B64URL`: the evidence JSON of `device/key/attest`.
pub fn show(config: &Config, key_id: &str, nonce: &str) -> Result<Value, DeviceKeyError> {
    service(config)?.attest(AttestParams {
        key_id: key_id.to_string(),
        nonce: nonce.to_string(),
    })
}

/// `devicekey attest activate --key-id ID`: `challenge` is
/// `{"credentialBlobBase64": ..., "encryptedSecretBase64": ...}`; the answer is
/// `{"secretBase64": ...}`.
pub fn activate(config: &Config, key_id: &str, challenge: &[u8]) -> Result<Value, DeviceKeyError> {
    let mut challenge: serde_json::Map<String, Value> =
        serde_json::from_slice(challenge).map_err(|e| {
            DeviceKeyError::InvalidRequest(format!("the challenge is not a JSON object: {e}"))
        })?;
    challenge.insert("keyId".into(), Value::String(key_id.to_string()));
    let params: ActivateParams = serde_json::from_value(Value::Object(challenge))
        .map_err(|e| DeviceKeyError::InvalidRequest(e.to_string()))?;
    service(config)?.activate(params)
}
