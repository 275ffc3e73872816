//! The payload types of `device/key/sign`, with exactly the protocol's names and tags.

use serde::{Deserialize, Serialize};

/// The domain separator wrapped around every payload before it is signed.
pub const SIGN_DOMAIN: &str = "codex-device-key-sign-payload/v1";

/// The only scope a connection proof may carry.
pub const CONTROLLER_WEBSOCKET_SCOPE: &str = "remote_control_controller_websocket";

/// Target paths of a connection proof.
pub const CONNECTION_PATHS: &[&str] = &[
    "/api/codex/remote/control/client",
    "/wham/remote/control/client",
];

/// Target paths of an enrollment proof.
pub const ENROLLMENT_PATHS: &[&str] = &[
    "/api/codex/remote/control/client/enroll",
    "/wham/remote/control/client/enroll",
];

/// The `type` of a connection proof.
pub const CONNECTION_TYPE: &str = "remoteControlClientConnection";

/// The `type` of an enrollment proof.
pub const ENROLLMENT_TYPE: &str = "remoteControlClientEnrollment";

/// `DeviceKeySignPayload`: what `device/key/sign` signs, tagged by `type`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum SignPayload {
    /// Proof for opening a remote-control client connection.
    RemoteControlClientConnection(ConnectionPayload),
    /// Proof for enrolling a remote-control client.
    RemoteControlClientEnrollment(EnrollmentPayload),
}

/// The only audience of a connection proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionAudience {
    /// `remote_control_client_websocket`.
    RemoteControlClientWebsocket,
}

/// The only audience of an enrollment proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentAudience {
    /// `remote_control_client_enrollment`.
    RemoteControlClientEnrollment,
}

/// `type = "remoteControlClientConnection"`. The fields are declared in the byte order of their
/// JSON names, so that serializing them in order is canonical (see `signing_bytes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPayload {
    /// The account the key is bound to.
    pub account_user_id: String,
    /// Always `remote_control_client_websocket`.
    pub audience: ConnectionAudience,
    /// The client the key is bound to.
    pub client_id: String,
    /// Server challenge: unpadded base64url of at least 32 bytes.
    pub nonce: String,
    /// Exactly `["remote_control_controller_websocket"]`.
    pub scopes: Vec<String>,
    /// The websocket session.
    pub session_id: String,
    /// The backend origin the proof is for.
    pub target_origin: String,
    /// The endpoint the proof is for.
    pub target_path: String,
    /// When the token expires (Unix seconds).
    pub token_expires_at: i64,
    /// SHA-256 of the remote-control token, unpadded base64url.
    pub token_sha256_base64url: String,
}

/// `type = "remoteControlClientEnrollment"`. The fields are declared in the byte order of their
/// JSON names, so that serializing them in order is canonical (see `signing_bytes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentPayload {
    /// The account the key is bound to.
    pub account_user_id: String,
    /// Always `remote_control_client_enrollment`.
    pub audience: EnrollmentAudience,
    /// When the challenge expires (Unix seconds).
    pub challenge_expires_at: i64,
    /// The enrollment challenge.
    pub challenge_id: String,
    /// The client the key is bound to.
    pub client_id: String,
    /// SHA-256 of the device identity, unpadded base64url.
    pub device_identity_sha256_base64url: String,
    /// Server challenge: unpadded base64url of at least 32 bytes.
    pub nonce: String,
    /// The backend origin the proof is for.
    pub target_origin: String,
    /// The endpoint the proof is for.
    pub target_path: String,
}

impl SignPayload {
    /// The `type` tag of the payload (what `#[serde(tag = "type")]` writes).
    pub fn type_tag(&self) -> &'static str {
        match self {
            Self::RemoteControlClientConnection(_) => CONNECTION_TYPE,
            Self::RemoteControlClientEnrollment(_) => ENROLLMENT_TYPE,
        }
    }

    /// The `(accountUserId, clientId)` the payload claims.
    pub fn binding(&self) -> (&str, &str) {
        match self {
            Self::RemoteControlClientConnection(p) => (&p.account_user_id, &p.client_id),
            Self::RemoteControlClientEnrollment(p) => (&p.account_user_id, &p.client_id),
        }
    }
}

/// `{"domain": ..., "payload": ...}`: the object whose canonical form is signed.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SignedEnvelope<P> {
    pub(crate) domain: String,
    pub(crate) payload: P,
}
