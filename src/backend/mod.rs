//! Key stores behind the token: one trait, several implementations.
//!
//! The token (`crate::token`) knows nothing about files, TPMs or other PKCS#11 modules. It asks a
//! [`Backend`] for the keys and objects it holds, to generate a key pair, and for a [`Signer`] that
//! signs a 32-byte digest. Every backend keeps private keys inside itself: nothing in this trait
//! ever returns a private scalar.
//!
//! **The seam.** A `[[slot]]` is one [`SlotConfig`] variant holding its store's own struct
//! (`crate::config`). Each store implements [`SlotStore`] on that struct: `open` (what the token
//! uses) and `diagnose` (what `devicekey doctor` prints, in one shape for every store).
//! [`store_of`] is the only place that matches on the variants. A new store is one module here
//! plus one variant there.

mod file_store;
pub mod index;
pub mod keydir;
pub mod pin;
pub mod pkcs11;
pub mod secure_enclave;
pub mod software;
#[cfg(all(feature = "tpm", target_os = "linux"))]
pub mod tpm;
mod unavailable;
pub mod verify;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::config::BackendKind;
use crate::config::SlotConfig;

/// How well a key store protects its keys. Reported honestly on the token and on every key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtectionClass {
    /// A TPM 2.0 (a simulator only when the config allows it).
    HardwareTpm,
    /// The Apple Secure Enclave.
    HardwareSecureEnclave,
    /// A key store protected by the operating system; the key is never exported, but it is software.
    OsProtectedNonextractable,
}

impl ProtectionClass {
    /// The protocol's name of the class (`hardware_tpm`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HardwareTpm => "hardware_tpm",
            Self::HardwareSecureEnclave => "hardware_secure_enclave",
            Self::OsProtectedNonextractable => "os_protected_nonextractable",
        }
    }

    /// Parses the protocol's name of a class.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hardware_tpm" => Some(Self::HardwareTpm),
            "hardware_secure_enclave" => Some(Self::HardwareSecureEnclave),
            "os_protected_nonextractable" => Some(Self::OsProtectedNonextractable),
            _ => None,
        }
    }

    /// True for the classes that `hardware_only` accepts.
    pub fn is_hardware(self) -> bool {
        !matches!(self, Self::OsProtectedNonextractable)
    }

    /// The value of the vendor attribute `CKA_DEVICEKEY_PROTECTION_CLASS`.
    pub fn vendor_value(self) -> u64 {
        match self {
            Self::HardwareTpm => crate::vendor::DEVICEKEY_CLASS_HARDWARE_TPM,
            Self::HardwareSecureEnclave => crate::vendor::DEVICEKEY_CLASS_HARDWARE_SECURE_ENCLAVE,
            Self::OsProtectedNonextractable => {
                crate::vendor::DEVICEKEY_CLASS_OS_PROTECTED_NONEXTRACTABLE
            }
        }
    }

    /// The inverse of [`Self::vendor_value`].
    pub fn from_vendor_value(v: u64) -> Option<Self> {
        [
            Self::HardwareTpm,
            Self::HardwareSecureEnclave,
            Self::OsProtectedNonextractable,
        ]
        .into_iter()
        .find(|c| c.vendor_value() == v)
    }

    /// The token model string (16 characters at most) that names this class in C_GetTokenInfo.
    pub fn token_model(self) -> &'static str {
        match self {
            Self::HardwareTpm => crate::vendor::DEVICEKEY_MODEL_HARDWARE_TPM,
            Self::HardwareSecureEnclave => crate::vendor::DEVICEKEY_MODEL_HARDWARE_SECURE_ENCLAVE,
            Self::OsProtectedNonextractable => {
                crate::vendor::DEVICEKEY_MODEL_OS_PROTECTED_NONEXTRACTABLE
            }
        }
    }

    /// The inverse of [`Self::token_model`] (trailing blanks ignored).
    pub fn from_token_model(model: &str) -> Option<Self> {
        let model = model.trim_end();
        [
            Self::HardwareTpm,
            Self::HardwareSecureEnclave,
            Self::OsProtectedNonextractable,
        ]
        .into_iter()
        .find(|c| c.token_model() == model)
    }
}

/// What a key may be used for. Fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyPurpose {
    /// Signs anything: SSH, TLS, code signing.
    #[default]
    General,
    /// Signs only canonical device-key proof payloads (CKM_ECDSA_SHA256 over validated bytes).
    Proof,
}

impl KeyPurpose {
    /// The value of the vendor attribute `CKA_DEVICEKEY_PURPOSE`.
    pub fn vendor_value(self) -> u64 {
        match self {
            Self::General => crate::vendor::DEVICEKEY_PURPOSE_GENERAL,
            Self::Proof => crate::vendor::DEVICEKEY_PURPOSE_PROOF,
        }
    }

    /// The inverse of [`Self::vendor_value`].
    pub fn from_vendor_value(v: u64) -> Option<Self> {
        match v {
            crate::vendor::DEVICEKEY_PURPOSE_GENERAL => Some(Self::General),
            crate::vendor::DEVICEKEY_PURPOSE_PROOF => Some(Self::Proof),
            _ => None,
        }
    }
}

/// Errors of the key stores. Each maps to one CK_RV in the token layer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store is misconfigured or unusable (bad directory, wrong owner, module missing...).
    #[error("key store unusable: {0}")]
    Unusable(String),
    /// The device or wrapped token cannot be reached right now.
    #[error("device not reachable: {0}")]
    Unreachable(String),
    /// Reading or writing the store failed.
    #[error("key store I/O error: {0}")]
    Io(String),
    /// The store has no room left (disk full, TPM out of memory...).
    #[error("key store full: {0}")]
    Full(String),
    /// The key or object is not (or no longer) in the store.
    #[error("not found: {0}")]
    NotFound(String),
    /// A PIN was wrong or missing.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The user PIN of a `login = "pin"` slot is wrong (CKR_PIN_INCORRECT).
    #[error("PIN incorrect: {0}")]
    PinIncorrect(String),
    /// The user PIN is locked after too many wrong tries (CKR_PIN_LOCKED).
    #[error("PIN locked: {0}")]
    PinLocked(String),
    /// The store needs the user PIN first (CKR_USER_NOT_LOGGED_IN).
    #[error("not logged in: {0}")]
    NotLoggedIn(String),
    /// The device refused the operation.
    #[error("refused by device: {0}")]
    Refused(String),
    /// A cryptographic failure (bad key material, failed signature).
    #[error("cryptography error: {0}")]
    Crypto(String),
}

/// The result type of every backend call.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Test helper: asserts that a store call failed with `NotFound`.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_not_found<T: std::fmt::Debug>(r: Result<T>) {
    assert!(matches!(r, Err(BackendError::NotFound(_))), "{r:?}");
}

/// The identity of a key store, shown in the slot and token info.
#[derive(Clone, Debug)]
pub struct StoreInfo {
    /// Token label (32 characters at most; also the p11-kit URI's `token=`).
    pub label: String,
    /// Which backend this is.
    pub backend: BackendKind,
    /// Manufacturer of the device behind the store (32 characters at most).
    pub manufacturer: String,
    /// Serial number of the token (16 characters at most), stable across restarts.
    pub serial: String,
    /// The class every key of this store has.
    pub protection_class: ProtectionClass,
}

/// A request for a new P-256 key pair.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// CKA_ID shared by the private key, the public key and any certificate.
    pub id: Vec<u8>,
    /// CKA_LABEL of both halves.
    pub label: String,
    /// What the key may be used for.
    pub purpose: KeyPurpose,
    /// CKA_TOKEN: true keeps the key across restarts, false makes a session key.
    pub persistent: bool,
}

/// Signs digests with one private key that never leaves its store.
pub trait Signer: Send + Sync {
    /// Signs a 32-byte digest with ECDSA P-256; returns raw `r‖s`, each half left-padded to 32 bytes.
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]>;

    /// The key's TPM public area (marshalled TPMT_PUBLIC), for keys that live in a TPM.
    fn tpm_public_area(&self) -> Option<Vec<u8>> {
        None
    }
}

/// A key pair as its store reports it.
#[derive(Clone)]
pub struct KeyRecord {
    /// The store's own stable name for the key (a file stem, a TPM blob name...).
    pub name: String,
    /// CKA_ID.
    pub id: Vec<u8>,
    /// CKA_LABEL.
    pub label: String,
    /// The public point, SEC1 uncompressed (`04‖X‖Y`, 65 bytes).
    pub public_point: [u8; 65],
    /// What the key may be used for.
    pub purpose: KeyPurpose,
    /// CKA_TOKEN.
    pub persistent: bool,
    /// Signs with the private half.
    pub signer: Arc<dyn Signer>,
}

crate::redact::debug_shows!(KeyRecord: name, label, purpose, persistent);

/// One attribute as the token encodes it: the type and the bytes a C caller would receive.
pub type RawAttribute = (u64, Vec<u8>);

/// A persistent object that is not a key (a certificate or a data object). The store keeps its
/// attributes as opaque bytes; the token interprets them.
#[derive(Clone, Debug)]
pub struct ObjectRecord {
    /// The store's own stable name for the object.
    pub name: String,
    /// The object's attributes.
    pub attributes: Vec<RawAttribute>,
}

/// An attribute a store can look its keys and objects up by without reading all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LookupAttribute {
    /// CKA_LABEL.
    Label,
    /// CKA_ID.
    Id,
}

impl LookupAttribute {
    /// The lookup attribute of a PKCS#11 attribute type, if it is one.
    pub fn of_type(t: cryptoki_sys::CK_ATTRIBUTE_TYPE) -> Option<Self> {
        match t {
            cryptoki_sys::CKA_LABEL => Some(Self::Label),
            cryptoki_sys::CKA_ID => Some(Self::Id),
            _ => None,
        }
    }
}

/// What a lookup found: the persistent keys and objects that hold the value now.
#[derive(Debug, Default)]
pub struct Found {
    /// The key pairs.
    pub keys: Vec<KeyRecord>,
    /// The stored objects.
    pub objects: Vec<ObjectRecord>,
}

impl LookupAttribute {
    /// The PKCS#11 attribute type.
    pub fn attribute_type(self) -> cryptoki_sys::CK_ATTRIBUTE_TYPE {
        match self {
            Self::Label => cryptoki_sys::CKA_LABEL,
            Self::Id => cryptoki_sys::CKA_ID,
        }
    }
}

/// A key store.
pub trait Backend: Send + Sync {
    /// Who the store is.
    fn info(&self) -> &StoreInfo;

    /// Every persistent key pair in the store.
    fn load_keys(&self) -> Result<Vec<KeyRecord>>;

    /// Creates a P-256 key pair; persistent keys are durable when this returns.
    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord>;

    /// Changes the label and CKA_ID of a key (C_SetAttributeValue).
    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()>;

    /// Deletes a key pair.
    fn destroy_key(&self, name: &str) -> Result<()>;

    /// Every persistent non-key object in the store.
    fn load_objects(&self) -> Result<Vec<ObjectRecord>>;

    /// The persistent keys and objects whose CKA_LABEL (or CKA_ID) is `value`, found without
    /// reading the whole store. `None` when the store cannot do better than
    /// [`Backend::load_keys`] and [`Backend::load_objects`].
    fn lookup(&self, attribute: LookupAttribute, value: &[u8]) -> Result<Option<Found>> {
        let _ = (attribute, value);
        Ok(None)
    }

    /// Stores a new persistent object; returns its name.
    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String>;

    /// Replaces the attributes of a stored object.
    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()>;

    /// Deletes a stored object.
    fn destroy_object(&self, name: &str) -> Result<()>;

    /// A cheap check whether another process changed the store: a value (a directory mtime, a
    /// counter...) that differs from the one returned before the change. `None` when the store
    /// cannot tell.
    fn change_marker(&self) -> Option<u128> {
        None
    }

    /// The store's user PIN, for a slot with `login = "pin"`; `None` for a slot without one.
    fn pin(&self) -> Option<&dyn pin::PinGuard> {
        None
    }
}

/// What `devicekey doctor` shows for one slot, in the same shape for every store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// The class its keys get (`None` when it cannot be told).
    pub protection_class: Option<ProtectionClass>,
    /// True when the key store opened.
    pub reachable: bool,
    /// What was found (device, where the keys are, how many), or what is wrong.
    pub detail: String,
    /// What to do when not reachable.
    pub fix: Option<String>,
}

impl Diagnosis {
    /// A store that opened.
    pub fn reachable(class: ProtectionClass, detail: impl Into<String>) -> Self {
        Self {
            protection_class: Some(class),
            reachable: true,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A store that did not open, with the fix.
    pub fn unreachable(
        class: Option<ProtectionClass>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            protection_class: class,
            reachable: false,
            detail: problem.into(),
            fix: Some(fix.into()),
        }
    }
}

/// A key store as a `[[slot]]` selects it; implemented by each store on its own slot struct.
pub trait SlotStore {
    /// Opens the store (the token calls this on first use of the slot). A failure names the
    /// slot and what is wrong.
    fn open(&self) -> Result<Arc<dyn Backend>>;

    /// Opens the store as [`SlotStore::open`] would, changing nothing (except creating a missing
    /// key directory, as the module would), and says what is there or what is wrong and the fix.
    fn diagnose(&self) -> Diagnosis;
}

/// The store a slot selects: the one match over the [`SlotConfig`] variants.
pub fn store_of(slot: &SlotConfig) -> &dyn SlotStore {
    match slot {
        SlotConfig::Software(s) => s,
        SlotConfig::Tpm(s) => s,
        SlotConfig::Pkcs11(s) => s,
        SlotConfig::SecureEnclave(s) => s,
        SlotConfig::Broken(s) => s,
    }
}

/// Opens the key store a `[[slot]]` entry describes.
pub fn open(slot: &SlotConfig) -> Result<Arc<dyn Backend>> {
    store_of(slot).open()
}

/// What `devicekey doctor` prints for a `[[slot]]` entry.
pub fn diagnose(slot: &SlotConfig) -> Diagnosis {
    store_of(slot).diagnose()
}

/// Splits a message that carries its own fix (`...; fix: ...` or `... Fix: ...`).
pub(crate) fn split_fix(msg: &str) -> (String, Option<String>) {
    for sep in ["; fix: ", ". Fix: ", " Fix: "] {
        if let Some((problem, fix)) = msg.split_once(sep) {
            return (problem.to_string(), Some(fix.to_string()));
        }
    }
    (msg.to_string(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_is_split_from_messages_that_carry_one() {
        assert_eq!(
            split_fix("no token; fix: create it"),
            ("no token".to_string(), Some("create it".to_string()))
        );
        assert_eq!(
            split_fix("mode 0777; refusing it. Fix: `chmod 700 d`"),
            (
                "mode 0777; refusing it".to_string(),
                Some("`chmod 700 d`".to_string())
            )
        );
        assert_eq!(split_fix("plain"), ("plain".to_string(), None));
    }
}
