//! The device-key proof: payload types, validation, key ids and the canonical signed bytes.
//!
//! This module is pure (no I/O besides the OS random source for new key ids) and is shared by the
//! JSON-RPC server (`crate::rpc`) and the token, which calls [`validate_signing_bytes`] from
//! C_Sign for proof-only keys. Error texts are the protocol's, word for word.

mod canonical;
mod keyid;
mod origin;
mod payload;

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

pub use canonical::{signing_bytes, to_canonical_vec, write_canonical};
pub use keyid::{
    key_id_for, key_id_prefix, parse_key_id, random_key_id_bytes, KeyId, INVALID_KEY_ID_REASON,
    KEY_ID_LEN, KEY_ID_RANDOM_BYTES,
};
pub use origin::is_allowed_origin;
pub use payload::{
    ConnectionAudience, ConnectionPayload, EnrollmentAudience, EnrollmentPayload, SignPayload,
    CONNECTION_PATHS, CONNECTION_TYPE, CONTROLLER_WEBSOCKET_SCOPE, ENROLLMENT_PATHS,
    ENROLLMENT_TYPE, SIGN_DOMAIN,
};

use payload::SignedEnvelope;

/// The largest signed payload [`validate_signing_bytes`] looks at; real ones are about 500 bytes.
pub const MAX_SIGNING_BYTES: usize = 16 * 1024;

/// Errors of the proof layer. `Display` gives the protocol's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// A rule of the protocol is broken (`-32600`).
    #[error("invalid device key payload: {0}")]
    InvalidPayload(Cow<'static, str>),
    /// The payload could not be encoded (`-32603`).
    #[error("device key cryptography error: {0}")]
    Encoding(String),
    /// The OS failed us (no clock, no randomness) (`-32603`).
    #[error("device key platform error: {0}")]
    Platform(String),
}

impl ProofError {
    pub(crate) fn invalid(reason: &'static str) -> Self {
        Self::InvalidPayload(Cow::Borrowed(reason))
    }
}

/// What a proof may name: the backend hosts for `https` origins and the longest lifetime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofPolicy {
    /// Hosts (and their subdomains) an `https` `targetOrigin` may name.
    pub allowed_origin_hosts: Vec<String>,
    /// The largest `expiresAt - now`, in seconds.
    pub max_ttl_seconds: u64,
}

impl Default for ProofPolicy {
    fn default() -> Self {
        Self {
            allowed_origin_hosts: vec!["chatgpt.com".into(), "chatgpt-staging.com".into()],
            max_ttl_seconds: 900,
        }
    }
}

impl ProofPolicy {
    /// The policy the `[server]` config names.
    pub fn from_config(config: &crate::config::ServerConfig) -> Self {
        Self {
            allowed_origin_hosts: config.allowed_origin_hosts.clone(),
            max_ttl_seconds: config.max_proof_ttl_seconds,
        }
    }
}

/// Seconds since the Unix epoch, by the local clock.
pub fn unix_now() -> Result<u64, ProofError> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| ProofError::Platform("system clock is before the Unix epoch".into()))
}

/// Checks the binding fields of `create` (and of a payload): both non-empty.
pub fn validate_binding_fields(account_user_id: &str, client_id: &str) -> Result<(), ProofError> {
    require(
        !account_user_id.is_empty(),
        "accountUserId must not be empty",
    )?;
    require(!client_id.is_empty(), "clientId must not be empty")
}

/// `Ok` when `ok`; otherwise the payload is invalid for `reason`.
fn require(ok: bool, reason: &'static str) -> Result<(), ProofError> {
    if ok {
        Ok(())
    } else {
        Err(ProofError::invalid(reason))
    }
}

/// Validates a payload in the protocol's order. `now` is Unix seconds.
pub fn validate_payload(
    payload: &SignPayload,
    policy: &ProofPolicy,
    now: u64,
) -> Result<(), ProofError> {
    match payload {
        SignPayload::RemoteControlClientConnection(p) => {
            validate_nonce(&p.nonce)?;
            validate_target(policy, &p.target_origin, &p.target_path, CONNECTION_PATHS)?;
            require(!p.session_id.is_empty(), "sessionId must not be empty")?;
            validate_binding_fields(&p.account_user_id, &p.client_id)?;
            require(
                is_sha256_base64url(&p.token_sha256_base64url),
                "tokenSha256Base64url must be a SHA-256 digest encoded as unpadded base64url",
            )?;
            require(
                p.scopes.len() == 1 && p.scopes[0] == CONTROLLER_WEBSOCKET_SCOPE,
                "scopes must contain exactly remote_control_controller_websocket",
            )?;
            validate_expiry(
                p.token_expires_at,
                policy,
                now,
                "remote-control token is expired",
                "remote-control token expires too far in the future",
            )
        }
        SignPayload::RemoteControlClientEnrollment(p) => {
            validate_nonce(&p.nonce)?;
            validate_target(policy, &p.target_origin, &p.target_path, ENROLLMENT_PATHS)?;
            require(!p.challenge_id.is_empty(), "challengeId must not be empty")?;
            validate_binding_fields(&p.account_user_id, &p.client_id)?;
            require(
                is_sha256_base64url(&p.device_identity_sha256_base64url),
                "deviceIdentitySha256Base64url must be a SHA-256 digest encoded as unpadded base64url",
            )?;
            validate_expiry(
                p.challenge_expires_at,
                policy,
                now,
                "enrollment challenge is expired",
                "enrollment challenge expires too far in the future",
            )
        }
    }
}

fn validate_nonce(nonce: &str) -> Result<(), ProofError> {
    match URL_SAFE_NO_PAD.decode(nonce) {
        Ok(bytes) if bytes.len() >= 32 => Ok(()),
        _ => Err(ProofError::invalid(
            "nonce must be at least 32 random bytes encoded as unpadded base64url",
        )),
    }
}

fn validate_target(
    policy: &ProofPolicy,
    origin: &str,
    path: &str,
    allowed_paths: &[&str],
) -> Result<(), ProofError> {
    if !is_allowed_origin(origin, &policy.allowed_origin_hosts) {
        return Err(ProofError::invalid(
            "targetOrigin must be an allowed remote-control backend origin",
        ));
    }
    if !allowed_paths.contains(&path) {
        return Err(ProofError::invalid(
            "targetPath must match the signed payload type's remote-control endpoint",
        ));
    }
    Ok(())
}

fn is_sha256_base64url(value: &str) -> bool {
    URL_SAFE_NO_PAD
        .decode(value)
        .is_ok_and(|digest| digest.len() == 32)
}

fn validate_expiry(
    expires_at: i64,
    policy: &ProofPolicy,
    now: u64,
    expired: &'static str,
    too_far: &'static str,
) -> Result<(), ProofError> {
    let expires_at = i128::from(expires_at);
    let now = i128::from(now);
    if expires_at <= now {
        return Err(ProofError::invalid(expired));
    }
    if expires_at > now + i128::from(policy.max_ttl_seconds) {
        return Err(ProofError::invalid(too_far));
    }
    Ok(())
}

/// Accepts `bytes` only when they are exactly the canonical signing bytes of a payload that
/// passes [`validate_payload`] under `policy` at `now`.
///
/// The token calls this from C_Sign for proof-only keys, on bytes the server has usually just
/// built, so it is kept cheap: it reads the one payload the bytes can be the signed form of (see
/// [`candidate`]), validates it, writes its signing bytes again and compares them byte for byte.
/// That comparison is what the guarantee rests on: whatever the bytes are, they get a signature
/// only if they equal [`signing_bytes`] of a payload that passed validation.
pub fn validate_signing_bytes(
    bytes: &[u8],
    policy: &ProofPolicy,
    now: u64,
) -> Result<(), ProofError> {
    if bytes.len() > MAX_SIGNING_BYTES {
        return Err(ProofError::invalid("signed bytes are too long"));
    }
    let payload = candidate(bytes)?;
    validate_payload(&payload, policy, now)?;
    if signing_bytes(&payload)? != bytes {
        return Err(ProofError::invalid(
            "signed bytes are not the canonical form of the payload",
        ));
    }
    Ok(())
}

/// The payload `bytes` can be the signing bytes of. In canonical form `type` is the payload's
/// last key (it sorts after all the others), so the bytes end with it and it names the struct
/// to read directly, without buffering the whole payload the way reading a tagged enum does.
/// This is only a way to find the candidate: [`validate_signing_bytes`] then requires the exact
/// bytes.
fn candidate(bytes: &[u8]) -> Result<SignPayload, ProofError> {
    fn read<P: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<P, ProofError> {
        let envelope: SignedEnvelope<P> = serde_json::from_slice(bytes)
            .map_err(|_| ProofError::invalid("signed bytes are not a device key sign payload"))?;
        if envelope.domain != SIGN_DOMAIN {
            return Err(ProofError::invalid(
                "signed bytes do not carry the device key sign payload domain",
            ));
        }
        Ok(envelope.payload)
    }
    let ends_with_type = |tag: &str| {
        bytes
            .strip_suffix(b"\"}}")
            .and_then(|b| b.strip_suffix(tag.as_bytes()))
            .is_some_and(|b| b.ends_with(b",\"type\":\""))
    };
    if ends_with_type(CONNECTION_TYPE) {
        read(bytes).map(SignPayload::RemoteControlClientConnection)
    } else if ends_with_type(ENROLLMENT_TYPE) {
        read(bytes).map(SignPayload::RemoteControlClientEnrollment)
    } else {
        Err(ProofError::invalid(
            "signed bytes are not a device key sign payload",
        ))
    }
}

#[cfg(test)]
mod tests;
