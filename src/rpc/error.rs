//! Errors of the device-key service and their JSON-RPC codes and messages (PROTOCOL.md).

use std::borrow::Cow;

use crate::backend::ProtectionClass;
use crate::proof::ProofError;

/// JSON-RPC: the line is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request (also: params that do not deserialize, protocol rule broken).
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: no such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC: the server failed.
pub const INTERNAL_ERROR: i64 = -32603;
/// Too many requests in flight.
pub const SERVER_OVERLOADED: i64 = -32001;

/// Errors of `device/key/*` (the service layer). `Display` is the protocol's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceKeyError {
    /// The params do not deserialize.
    #[error("Invalid request: {0}")]
    InvalidRequest(String),
    /// A protocol rule is broken.
    #[error("invalid device key payload: {0}")]
    InvalidPayload(Cow<'static, str>),
    /// No such key (or no binding for it).
    #[error("device key not found")]
    KeyNotFound,
    /// No store of any class.
    #[error("hardware-backed device keys are not available on this platform")]
    HardwareUnavailable,
    /// Only a degraded store, and the policy wants hardware.
    #[error(
        "hardware-backed device keys are not available; set protectionPolicy to allow_os_protected_nonextractable to allow key protection class {}",
        .0.as_str()
    )]
    DegradedNotAllowed(ProtectionClass),
    /// The PKCS#11 module or the OS failed.
    #[error("device key platform error: {0}")]
    Platform(String),
    /// A cryptographic failure (bad signature length, bad public point...).
    #[error("device key cryptography error: {0}")]
    Crypto(String),
}

impl DeviceKeyError {
    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        match self {
            Self::Platform(_) | Self::Crypto(_) => INTERNAL_ERROR,
            _ => INVALID_REQUEST,
        }
    }
}

impl From<ProofError> for DeviceKeyError {
    fn from(e: ProofError) -> Self {
        match e {
            ProofError::InvalidPayload(reason) => Self::InvalidPayload(reason),
            ProofError::Encoding(m) => Self::Crypto(m),
            ProofError::Platform(m) => Self::Platform(m),
        }
    }
}

impl From<cryptoki::error::Error> for DeviceKeyError {
    fn from(e: cryptoki::error::Error) -> Self {
        Self::Platform(crate::p11::describe(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_the_protocols() {
        assert_eq!(
            DeviceKeyError::DegradedNotAllowed(ProtectionClass::OsProtectedNonextractable)
                .to_string(),
            "hardware-backed device keys are not available; set protectionPolicy to allow_os_protected_nonextractable to allow key protection class os_protected_nonextractable"
        );
        assert_eq!(DeviceKeyError::KeyNotFound.code(), INVALID_REQUEST);
        assert_eq!(DeviceKeyError::Platform("x".into()).code(), INTERNAL_ERROR);
    }
}
