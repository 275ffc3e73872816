//! The Security-framework calls of the Secure Enclave store (macOS only).
//!
//! - Create: `SecKeyCreateRandomKey` with `kSecAttrKeyTypeECSECPrimeRandom`, 256 bits, and, for
//!   the enclave routes, `kSecAttrTokenID = kSecAttrTokenIDSecureEnclave` and an access control
//!   with `kSecAccessControlPrivateKeyUsage`. The blob route sets `kSecAttrIsPermanent = false`
//!   and reads the key's token-object blob from `SecKeyCopyAttributes` under `kSecAttrTokenOID`
//!   (`"toid"`, a key the SDK does not export); the keychain routes make the key permanent and
//!   keep its `kSecAttrApplicationLabel`.
//! - Rebuild: `SecKeyCreateWithData` with `kSecAttrTokenID` and `kSecAttrTokenOID = blob` (blob
//!   route), or `SecItemCopyMatching` by application label (keychain routes). The rebuilt key's
//!   public point must equal the stored one, else the key is refused.
//! - Sign: `SecKeyCreateSignature` with `kSecKeyAlgorithmECDSASignatureDigestX962SHA256` over the
//!   32-byte digest, DER → raw `r‖s`. Public point: `SecKeyCopyPublicKey` then
//!   `SecKeyCopyExternalRepresentation` (65 bytes, `04‖X‖Y`).
//!
//! Every framework failure goes through `status::backend_error`.

use std::sync::{Arc, OnceLock};

use core_foundation::base::{CFType, TCFType};
use core_foundation::boolean::CFBoolean;
use core_foundation::data::CFData;
use core_foundation::dictionary::CFDictionary;
use core_foundation::error::CFError;
use core_foundation::number::CFNumber;
use core_foundation::string::{CFString, CFStringRef};
use security_framework::access_control::{ProtectionMode, SecAccessControl};
use security_framework::item::{ItemClass, ItemSearchOptions, KeyClass, Reference, SearchResult};
use security_framework::key::{Algorithm, SecKey};
use security_framework_sys::access_control::kSecAccessControlPrivateKeyUsage;
use security_framework_sys::base::SecKeyRef;
use security_framework_sys::item::{
    kSecAttrAccessControl, kSecAttrIsPermanent, kSecAttrKeyClass, kSecAttrKeyClassPrivate,
    kSecAttrKeySizeInBits, kSecAttrKeyType, kSecAttrKeyTypeECSECPrimeRandom, kSecAttrLabel,
    kSecAttrTokenID, kSecAttrTokenIDSecureEnclave, kSecPrivateKeyAttrs, kSecPublicKeyAttrs,
    kSecUseDataProtectionKeychain,
};
use security_framework_sys::key::{SecKeyCreateRandomKey, SecKeyCreateWithData};

use super::policy::Route;
use super::status::{backend_error, Domain, FrameworkError, Operation};
use super::store::{CreatedKey, Enclave, OpenedKey};
use crate::backend::{BackendError, Result, Signer};
use crate::encoding::{self, POINT_LEN};

/// `kSecAttrTokenOID`: the token-object blob of a token key (private in the SDK headers).
const TOKEN_OID: &str = "toid";

/// `kSecAttrIsExtractable`, by its value in the Security framework's item constants (`"extr"`):
/// security-framework-sys does not bind it, and this module declares no C symbols of its own.
const IS_EXTRACTABLE: &str = "extr";

/// A framework constant as a `CFString`.
///
/// # Safety
/// `constant` must be one of the Security framework's exported `CFStringRef` constants.
unsafe fn constant(constant: CFStringRef) -> CFString {
    // SAFETY: the framework's constants are valid CFStrings for the life of the process; the
    // get rule retains them for the wrapper.
    unsafe { CFString::wrap_under_get_rule(constant) }
}

fn cf_error(e: &CFError) -> FrameworkError {
    FrameworkError {
        domain: Domain::parse(&e.domain().to_string()),
        code: e.code() as i64,
        description: e.description().to_string(),
    }
}

fn os_error(e: security_framework::base::Error) -> FrameworkError {
    FrameworkError {
        domain: Domain::OsStatus,
        code: i64::from(e.code()),
        description: e.message().unwrap_or_default(),
    }
}

/// The Secure Enclave (and keychain) behind a store.
pub struct MacEnclave;

/// Signs with one Security-framework key.
struct MacSigner {
    key: SecKey,
    route: Route,
}

impl Signer for MacSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let der = self
            .key
            .create_signature(Algorithm::ECDSASignatureDigestX962SHA256, digest)
            .map_err(|e| backend_error(&cf_error(&e), Operation::Sign, self.route))?;
        super::signature::raw_signature(&der)
    }
}

/// The key-generation attributes of a route.
fn generation_attributes(
    route: Route,
    label: &str,
    permanent: bool,
) -> Result<CFDictionary<CFString, CFType>> {
    let permanent = permanent && route.uses_keychain();
    // SAFETY: every name below is an exported Security-framework constant.
    let (is_permanent, access_control_key) = unsafe {
        (
            constant(kSecAttrIsPermanent),
            constant(kSecAttrAccessControl),
        )
    };
    let is_extractable = CFString::from_static_string(IS_EXTRACTABLE);
    let mut private: Vec<(CFString, CFType)> =
        vec![(is_permanent.clone(), CFBoolean::from(permanent).as_CFType())];
    if route == Route::OsKeychain {
        private.push((is_extractable, CFBoolean::false_value().as_CFType()));
    } else {
        // Usable after the first unlock, so background consumers (ssh-agent, the server) can
        // sign while the screen is locked; never synchronized to another device.
        let access = SecAccessControl::create_with_protection(
            Some(ProtectionMode::AccessibleAfterFirstUnlockThisDeviceOnly),
            kSecAccessControlPrivateKeyUsage,
        )
        .map_err(|e| backend_error(&os_error(e), Operation::Create, route))?;
        private.push((access_control_key, access.as_CFType()));
    }
    let private = CFDictionary::from_CFType_pairs(&private);
    let public =
        CFDictionary::from_CFType_pairs(&[(is_permanent, CFBoolean::false_value().as_CFType())]);

    // SAFETY: every name and value below is an exported Security-framework constant.
    let mut pairs: Vec<(CFString, CFType)> = unsafe {
        vec![
            (
                constant(kSecAttrKeyType),
                constant(kSecAttrKeyTypeECSECPrimeRandom).as_CFType(),
            ),
            (
                constant(kSecAttrKeySizeInBits),
                CFNumber::from(256i32).as_CFType(),
            ),
            (constant(kSecAttrLabel), CFString::new(label).as_CFType()),
            (constant(kSecPrivateKeyAttrs), private.as_CFType()),
            (constant(kSecPublicKeyAttrs), public.as_CFType()),
        ]
    };
    if route != Route::OsKeychain {
        // SAFETY: exported Security-framework constants.
        pairs.push(unsafe {
            (
                constant(kSecAttrTokenID),
                constant(kSecAttrTokenIDSecureEnclave).as_CFType(),
            )
        });
    }
    if route == Route::EnclaveKeychain && permanent {
        // SAFETY: an exported Security-framework constant.
        pairs.push(unsafe {
            (
                constant(kSecUseDataProtectionKeychain),
                CFBoolean::true_value().as_CFType(),
            )
        });
    }
    Ok(CFDictionary::from_CFType_pairs(&pairs))
}

/// `SecKeyCreateRandomKey`.
fn create_key(route: Route, label: &str, permanent: bool, op: Operation) -> Result<SecKey> {
    let attributes = generation_attributes(route, label, permanent)?;
    let mut error = std::ptr::null_mut();
    // SAFETY: `attributes` is a valid dictionary that outlives the call; `error` is a valid
    // out-pointer, written only on failure.
    let key: SecKeyRef =
        unsafe { SecKeyCreateRandomKey(attributes.as_concrete_TypeRef(), &mut error) };
    if key.is_null() {
        if error.is_null() {
            return Err(BackendError::Io(
                "SecKeyCreateRandomKey failed without an error".to_string(),
            ));
        }
        // SAFETY: on failure `error` holds a CFError we own (create rule).
        let error = unsafe { CFError::wrap_under_create_rule(error) };
        return Err(backend_error(&cf_error(&error), op, route));
    }
    // SAFETY: a non-NULL result of a Create function is a SecKey we own.
    Ok(unsafe { SecKey::wrap_under_create_rule(key) })
}

/// The key's token-object blob (`kSecAttrTokenOID`).
fn token_blob(key: &SecKey) -> Result<Vec<u8>> {
    let attributes = key.attributes();
    let name = CFString::from_static_string(TOKEN_OID);
    let value = attributes
        .find(name.as_CFTypeRef())
        .map(|v| *v)
        .filter(|v| !v.is_null())
        .ok_or_else(|| {
            BackendError::Unusable(
                "the new Secure Enclave key has no token-object blob (kSecAttrTokenOID); this \
                 macOS does not support keys kept outside the keychain: set keychain = true"
                    .to_string(),
            )
        })?;
    // SAFETY: `value` is a live object owned by `attributes`, which is alive here; the get
    // rule retains it for the wrapper.
    let value = unsafe { CFType::wrap_under_get_rule(value) };
    let data = value.downcast::<CFData>().ok_or_else(|| {
        BackendError::Unusable("the key's kSecAttrTokenOID is not data".to_string())
    })?;
    Ok(data.bytes().to_vec())
}

fn public_point(key: &SecKey, route: Route) -> Result<[u8; POINT_LEN]> {
    let public = key.public_key().ok_or_else(|| {
        backend_error(
            &FrameworkError::status(super::status::ERR_SEC_PARAM as i32),
            Operation::PublicKey,
            route,
        )
    })?;
    let data = public.external_representation().ok_or_else(|| {
        BackendError::Crypto("the public key has no external representation".to_string())
    })?;
    encoding::p256_point(data.bytes())
        .map_err(|e| BackendError::Crypto(format!("the key is not a P-256 key: {e}")))
}

/// `SecKeyCreateWithData` on a token-object blob.
fn key_from_blob(blob: &[u8]) -> Result<SecKey> {
    let data = CFData::from_buffer(blob);
    // SAFETY: every name and value below is an exported Security-framework constant.
    let pairs: Vec<(CFString, CFType)> = unsafe {
        vec![
            (
                constant(kSecAttrKeyType),
                constant(kSecAttrKeyTypeECSECPrimeRandom).as_CFType(),
            ),
            (
                constant(kSecAttrKeyClass),
                constant(kSecAttrKeyClassPrivate).as_CFType(),
            ),
            (
                constant(kSecAttrTokenID),
                constant(kSecAttrTokenIDSecureEnclave).as_CFType(),
            ),
            (CFString::from_static_string(TOKEN_OID), data.as_CFType()),
        ]
    };
    let attributes = CFDictionary::from_CFType_pairs(&pairs);
    let mut error = std::ptr::null_mut();
    // SAFETY: `data` and `attributes` are valid and outlive the call; `error` is a valid
    // out-pointer, written only on failure.
    let key = unsafe {
        SecKeyCreateWithData(
            data.as_concrete_TypeRef(),
            attributes.as_concrete_TypeRef(),
            &mut error,
        )
    };
    if key.is_null() {
        if error.is_null() {
            return Err(BackendError::Io(
                "SecKeyCreateWithData failed without an error".to_string(),
            ));
        }
        // SAFETY: on failure `error` holds a CFError we own (create rule).
        let error = unsafe { CFError::wrap_under_create_rule(error) };
        return Err(backend_error(
            &cf_error(&error),
            Operation::Open,
            Route::EnclaveBlob,
        ));
    }
    // SAFETY: a non-NULL result of a Create function is a SecKey we own.
    Ok(unsafe { SecKey::wrap_under_create_rule(key) })
}

/// The private key with this application label, in the route's keychain. (No return or limit
/// keys: the same query serves `SecItemDelete`, which rejects them.)
fn keychain_query(route: Route, application_label: &[u8]) -> ItemSearchOptions {
    let mut query = ItemSearchOptions::new();
    query
        .class(ItemClass::key())
        .key_class(KeyClass::private())
        .application_label(application_label);
    if route == Route::EnclaveKeychain {
        query.ignore_legacy_keychains();
    }
    query
}

fn key_from_keychain(route: Route, application_label: &[u8]) -> Result<SecKey> {
    let found = keychain_query(route, application_label)
        .load_refs(true)
        .limit(1)
        .search()
        .map_err(|e| backend_error(&os_error(e), Operation::Open, route))?;
    found
        .into_iter()
        .find_map(|r| match r {
            SearchResult::Ref(Reference::Key(k)) => Some(k),
            _ => None,
        })
        .ok_or_else(|| {
            backend_error(
                &FrameworkError::status(super::status::ERR_SEC_ITEM_NOT_FOUND as i32),
                Operation::Open,
                route,
            )
        })
}

impl Enclave for MacEnclave {
    fn create(&self, route: Route, label: &str, permanent: bool) -> Result<CreatedKey> {
        let key = create_key(route, label, permanent, Operation::Create)?;
        let public_point = public_point(&key, route)?;
        let handle = if route.uses_keychain() {
            key.application_label().ok_or_else(|| {
                BackendError::Io("the new keychain key has no application label".to_string())
            })?
        } else {
            token_blob(&key)?
        };
        Ok(CreatedKey {
            handle,
            public_point,
            signer: Arc::new(MacSigner { key, route }),
        })
    }

    fn open(&self, route: Route, handle: &[u8]) -> Result<OpenedKey> {
        let key = if route.uses_keychain() {
            key_from_keychain(route, handle)?
        } else {
            key_from_blob(handle)?
        };
        // Without the token attributes SecKeyCreateWithData would make some other key: the
        // store compares this public point with the stored one before any signature.
        Ok(OpenedKey {
            public_point: public_point(&key, route)?,
            signer: Arc::new(MacSigner { key, route }),
        })
    }

    fn delete(&self, route: Route, handle: &[u8]) -> Result<()> {
        if !route.uses_keychain() {
            return Ok(());
        }
        keychain_query(route, handle)
            .delete()
            .map_err(|e| backend_error(&os_error(e), Operation::Delete, route))
    }
}

/// Whether this Mac has a Secure Enclave: an ephemeral enclave key can be made. The answer is
/// computed once per process; the probe key is never stored and disappears with its handle.
pub fn has_secure_enclave() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| {
        match create_key(
            Route::EnclaveBlob,
            "devicekey probe",
            false,
            Operation::Probe,
        ) {
            Ok(_) => true,
            Err(e) => {
                log::info!("no usable Secure Enclave: {e}");
                false
            }
        }
    })
}
