//! The Secure Enclave key store (macOS): P-256 keys made by the Mac's Secure Enclave, kept as
//! files in an owner-only key directory.
//!
//! # How a key is kept without the keychain
//!
//! A PKCS#11 module runs inside someone else's process (ssh, Firefox, a browser), and the
//! data-protection keychain answers according to *that* process's entitlements: an unsigned host
//! gets `errSecMissingEntitlement` (-34018) for any permanent Secure Enclave key. So the default
//! route keeps no keychain item at all:
//!
//! 1. `SecKeyCreateRandomKey` with `kSecAttrTokenID = kSecAttrTokenIDSecureEnclave`, a P-256
//!    (`kSecAttrKeyTypeECSECPrimeRandom`, 256 bits) key, `kSecAttrIsPermanent = false` and an
//!    access control with `kSecAccessControlPrivateKeyUsage`. The key exists only in the enclave.
//! 2. `SecKeyCopyAttributes` on the new key: the attribute `kSecAttrTokenOID` (its name is
//!    `"toid"`; the SDK does not export the constant) holds the token-object blob, the private key
//!    wrapped by this Mac's enclave (what CryptoKit calls `dataRepresentation`). The store writes
//!    it to the key file. It is useless on any other device.
//! 3. Later, `SecKeyCreateWithData` with attributes `kSecAttrTokenID = kSecAttrTokenIDSecureEnclave`
//!    and `kSecAttrTokenOID = blob` hands the blob back to the enclave and returns a usable
//!    `SecKey`. Without a usable object ID that call asks the token to create (or update) an
//!    object from the attributes it was given, so it can hand back some other key; the store
//!    therefore checks that the rebuilt key's public point is the stored one before using it.
//!
//! Signing uses `SecKeyCreateSignature` with `kSecKeyAlgorithmECDSASignatureDigestX962SHA256` on
//! the caller's 32-byte digest and converts the DER signature to raw `r‖s`; the public point comes
//! from `SecKeyCopyExternalRepresentation` of `SecKeyCopyPublicKey`.
//!
//! Sources of this call sequence (read for the sequence only):
//! - Apple's Security sources (apple-open-source/macos): `Security/keychain/SecItemPriv.h`
//!   documents `kSecAttrTokenOID` as the ID of an object on a token, which for Secure Enclave keys
//!   is the key-store (AKS) blob of the encoded key; `SecKeyCreateWithData` in
//!   `Security/OSX/sec/Security/SecKey.m` hands any attribute dictionary with `kSecAttrTokenID`
//!   to `SecKeyCreateCTKKey` (`SecCTKKey.m`), which takes `kSecAttrTokenOID` as the token object's
//!   ID and passes it to `TKTokenCreateOrUpdateObject`; and the regression
//!   test `Security/keychain/securityd/Regressions/secd-33-keychain-ctk.m` reads
//!   `kSecAttrTokenOID` from `SecKeyCopyAttributes` of a token key and rebuilds the key with
//!   `SecKeyCreateWithData(…, {kSecAttrTokenID, kSecAttrTokenOID}, …)`.
//! - Published Rust code on `security-framework` 3 that keeps an
//!   ephemeral enclave key's `"toid"` blob and rebuilds it with `SecKeyCreateWithData`, and
//!   records that a rebuild without the attribute yields a different key, hence the public-point
//!   check above.
//! - Apple TN3137 "On Mac keychain APIs and implementations" (the data-protection keychain and
//!   its entitlements), and the `security-framework` crate's notes on `Location`.
//!
//! # Routes and classes
//!
//! `policy` chooses, once per store: the blob route above (default); the keychain route
//! (`keychain = true`, a permanent enclave key in the data-protection keychain, for entitled
//! hosts); or, only on a Mac without a Secure Enclave and only when the slot allows
//! `os_protected_nonextractable`, a non-extractable software key in the login keychain. Enclave
//! keys report `hardware_secure_enclave`; nothing else ever does.
//!
//! # What is proven where
//!
//! Everything but the Security-framework calls (`platform`, compiled on macOS only) is plain Rust
//! with unit tests that run on Linux: the file format, the store's file handling, the policy and
//! the OSStatus mapping. CI type-checks and lints the macOS build for aarch64 and x86_64; the
//! platform part has not yet run on a Mac in this project's CI (`scripts/macos-check.sh` is what
//! proves it on real hardware).

pub mod keyfile;
#[cfg(target_os = "macos")]
mod platform;
pub mod policy;
pub mod signature;
pub mod status;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

pub use policy::{Hardware, Policy, Route};

use crate::backend::{Backend, Result};

/// What a `secure_enclave` slot configures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecureEnclaveOptions {
    /// The key directory; [`default_dir`] when `None`.
    pub dir: Option<PathBuf>,
    /// Keep enclave keys in the data-protection keychain (the host needs entitlements).
    pub keychain: bool,
    /// Accept `os_protected_nonextractable` keys on a Mac without a Secure Enclave.
    pub allow_os_protected: bool,
}

/// The default key directory of the store: `secure-enclave` under the data directory.
pub fn default_dir() -> PathBuf {
    crate::config::default_data_dir().join("secure-enclave")
}

/// Opens the Secure Enclave store a slot describes.
#[cfg(target_os = "macos")]
pub fn open(label: &str, options: &SecureEnclaveOptions) -> Result<Arc<dyn Backend>> {
    let hardware = Hardware {
        secure_enclave: platform::has_secure_enclave(),
    };
    let route = policy::choose_route(
        hardware,
        Policy {
            keychain: options.keychain,
            allow_os_protected: options.allow_os_protected,
        },
    )
    .map_err(|e| with_slot(label, e))?;
    let dir = options.dir.clone().unwrap_or_else(default_dir);
    let dir = crate::backend::keydir::KeyDir::open(&dir)?;
    log::debug!(
        "secure_enclave store {label:?} opened in {} ({})",
        dir.path().display(),
        route.as_str()
    );
    Ok(Arc::new(store::EnclaveStore::new(
        label,
        route,
        dir,
        Arc::new(platform::MacEnclave),
    )))
}

/// Opens the Secure Enclave store a slot describes: never, on this operating system.
#[cfg(not(target_os = "macos"))]
pub fn open(label: &str, options: &SecureEnclaveOptions) -> Result<Arc<dyn Backend>> {
    let _ = options;
    Err(with_slot(
        label,
        crate::backend::BackendError::Unusable(
            "the Secure Enclave store needs macOS with a Secure Enclave".to_string(),
        ),
    ))
}

fn with_slot(label: &str, e: crate::backend::BackendError) -> crate::backend::BackendError {
    match e {
        crate::backend::BackendError::Unusable(m) => {
            crate::backend::BackendError::Unusable(format!("slot \"{label}\": {m}"))
        }
        other => other,
    }
}

/// Whether this machine has a Secure Enclave that can make keys (always false off macOS). On a
/// Mac it makes one ephemeral enclave key, once per process.
pub fn has_secure_enclave() -> bool {
    #[cfg(target_os = "macos")]
    {
        platform::has_secure_enclave()
    }
    #[cfg(not(target_os = "macos"))]
    {
        false
    }
}

/// What `devicekey doctor` shows for a `secure_enclave` slot.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// The class the slot's keys have (the class it would have when it cannot open).
    pub protection_class: crate::backend::ProtectionClass,
    /// True when the store opened and listed its keys.
    pub reachable: bool,
    /// What was found (route, directory, keys), or what went wrong and what to do.
    pub detail: String,
    /// What to do when not reachable, when the problem alone does not say it.
    pub fix: Option<String>,
}

/// Opens the slot's store and lists its keys, for `devicekey doctor`.
pub fn probe(label: &str, options: &SecureEnclaveOptions) -> ProbeReport {
    let opened = open(label, options).and_then(|store| {
        let keys = store.load_keys()?.len();
        Ok((store.info().protection_class, keys))
    });
    match opened {
        Ok((protection_class, keys)) => ProbeReport {
            protection_class,
            reachable: true,
            detail: format!(
                "{}, {keys} key(s) in {}",
                if protection_class.is_hardware() {
                    "this Mac's Secure Enclave"
                } else {
                    "no Secure Enclave: non-extractable login-keychain keys"
                },
                options.dir.clone().unwrap_or_else(default_dir).display()
            ),
            fix: None,
        },
        Err(e) => ProbeReport {
            protection_class: crate::backend::ProtectionClass::HardwareSecureEnclave,
            reachable: false,
            detail: e.to_string(),
            fix: (!cfg!(target_os = "macos")).then(|| {
                "remove this slot, or use backend = \"tpm\" or \"software\" on this machine"
                    .to_string()
            }),
        },
    }
}

/// The one place a `secure_enclave` slot meets the backend seam.
impl crate::backend::SlotStore for crate::config::SecureEnclaveSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        open(&self.label, &self.options())
    }

    fn diagnose(&self) -> crate::backend::Diagnosis {
        let report = probe(&self.label, &self.options());
        crate::backend::Diagnosis {
            protection_class: Some(report.protection_class),
            reachable: report.reachable,
            detail: report.detail,
            fix: report.fix,
        }
    }
}

impl crate::config::SecureEnclaveSlot {
    fn options(&self) -> SecureEnclaveOptions {
        SecureEnclaveOptions {
            dir: self.dir.clone(),
            keychain: self.keychain,
            allow_os_protected: self.allow_os_protected,
        }
    }
}

/// The key store a default configuration (no config file) uses on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultStore {
    /// One `secure_enclave` slot.
    SecureEnclave,
    /// The software slot.
    Software,
}

/// The default store for a machine, and the sentence `devicekey doctor` shows about it.
pub fn default_store(macos: bool, secure_enclave: bool) -> (DefaultStore, &'static str) {
    match (macos, secure_enclave) {
        (true, true) => (
            DefaultStore::SecureEnclave,
            "this Mac has a Secure Enclave: the default slot keeps its keys there \
             (hardware_secure_enclave)",
        ),
        (true, false) => (
            DefaultStore::Software,
            "this Mac has no Secure Enclave (an Intel Mac without a T2 chip, or a virtual \
             machine): the default slot is the software store (os_protected_nonextractable)",
        ),
        (false, _) => (
            DefaultStore::Software,
            "the Secure Enclave exists only on macOS: no secure_enclave slot by default",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn off_macos_a_slot_is_unusable_and_says_why() {
        match open("mac", &SecureEnclaveOptions::default()) {
            Err(BackendError::Unusable(m)) => {
                assert_eq!(
                    m,
                    "slot \"mac\": the Secure Enclave store needs macOS with a Secure Enclave"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a Secure Enclave store opened off macOS"),
        }
        assert!(!has_secure_enclave());
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn off_macos_the_doctor_sees_an_unreachable_slot_with_a_fix() {
        let r = probe("mac", &SecureEnclaveOptions::default());
        assert!(!r.reachable);
        assert!(
            r.detail.contains("needs macOS with a Secure Enclave"),
            "{}",
            r.detail
        );
        assert!(r.fix.unwrap().contains("software"));
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn off_macos_a_configured_slot_opens_to_the_reason() {
        let config = crate::config::Config::from_toml(
            "[[slot]]\nbackend = \"secure_enclave\"\nallow_os_protected = true\n",
        )
        .unwrap();
        let err = crate::backend::open(&config.slots[0])
            .err()
            .expect("no store off macOS");
        assert!(
            err.to_string()
                .contains("needs macOS with a Secure Enclave"),
            "{err}"
        );
        let d = crate::backend::diagnose(&config.slots[0]);
        assert!(!d.reachable);
        assert!(d.detail.contains("needs macOS"), "{}", d.detail);
        assert!(d.fix.is_some());
    }

    #[test]
    fn the_default_store_follows_the_hardware() {
        assert_eq!(default_store(true, true).0, DefaultStore::SecureEnclave);
        assert_eq!(default_store(true, false).0, DefaultStore::Software);
        assert_eq!(default_store(false, true).0, DefaultStore::Software);
        assert!(default_store(true, false).1.contains("no Secure Enclave"));
        assert!(default_store(true, true)
            .1
            .contains("hardware_secure_enclave"));
    }

    #[test]
    fn the_default_directory_is_its_own() {
        assert!(default_dir().ends_with("secure-enclave"));
    }
}
