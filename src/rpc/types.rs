//! Params and results of the JSON-RPC methods, with the protocol's names.

use serde::{Deserialize, Serialize};

use crate::backend::ProtectionClass;
use crate::proof::SignPayload;

/// The only algorithm: `ecdsa_p256_sha256`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// ECDSA over P-256 with SHA-256.
    EcdsaP256Sha256,
}

/// `protectionPolicy` of `device/key/create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProtectionPolicy {
    /// Only `hardware_secure_enclave` or `hardware_tpm`.
    #[default]
    HardwareOnly,
    /// Also `os_protected_nonextractable`.
    AllowOsProtectedNonextractable,
}

impl ProtectionPolicy {
    /// True when a key of `class` satisfies the policy.
    pub fn allows(self, class: ProtectionClass) -> bool {
        match self {
            Self::HardwareOnly => class.is_hardware(),
            Self::AllowOsProtectedNonextractable => true,
        }
    }
}

/// `initialize` params.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeParams {
    /// Who the client is.
    pub client_info: ClientInfo,
    /// Ignored.
    #[serde(default)]
    pub capabilities: Option<serde_json::Value>,
}

/// `initialize.clientInfo`.
#[derive(Clone, Debug, Deserialize)]
pub struct ClientInfo {
    /// Client name.
    pub name: String,
    /// Display title.
    #[serde(default)]
    pub title: Option<String>,
    /// Client version.
    pub version: String,
}

/// `initialize` result.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResult {
    /// `devicekey/<version> (<os>; <arch>) <client>/<version>`.
    pub user_agent: String,
    /// Where devicekey keeps its data.
    pub codex_home: String,
    /// `unix` or `windows`.
    pub platform_family: String,
    /// `linux`, `macos`, ...
    pub platform_os: String,
    /// The devicekey extension methods this server answers (ATTESTATION.md).
    pub extensions: Vec<&'static str>,
}

/// `device/key/create` params.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateParams {
    /// Account the key is bound to.
    pub account_user_id: String,
    /// Client the key is bound to.
    pub client_id: String,
    /// Omitted or null means `hardware_only`.
    #[serde(default)]
    pub protection_policy: Option<ProtectionPolicy>,
}

/// `device/key/public` params.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicParams {
    /// The key id.
    pub key_id: String,
}

/// `device/key/sign` params.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignParams {
    /// The key id.
    pub key_id: String,
    /// What to sign.
    pub payload: SignPayload,
}

/// Result of `device/key/create` and `device/key/public`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    /// The key id.
    pub key_id: String,
    /// SubjectPublicKeyInfo DER, standard base64 with padding.
    pub public_key_spki_der_base64: String,
    /// Always `ecdsa_p256_sha256`.
    pub algorithm: Algorithm,
    /// The class of the store that holds the key.
    pub protection_class: ProtectionClass,
}

/// Result of `device/key/sign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResult {
    /// ASN.1 DER ECDSA signature, standard base64.
    pub signature_der_base64: String,
    /// The exact signed bytes, standard base64.
    pub signed_payload_base64: String,
    /// Always `ecdsa_p256_sha256`.
    pub algorithm: Algorithm,
}

/// The binding stored with a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// Account.
    pub account_user_id: String,
    /// Client.
    pub client_id: String,
}

/// One key as `devicekey list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyListing {
    /// The key id (or the label of a key not made by `create`).
    pub key_id: String,
    /// The class of its store.
    pub protection_class: ProtectionClass,
    /// The token label.
    pub token: String,
    /// The binding, when the key has one.
    pub binding: Option<Binding>,
}
