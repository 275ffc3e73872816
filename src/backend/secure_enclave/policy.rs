//! Which route a Secure Enclave slot takes, and which protection class that route may report.
//!
//! Three routes make a P-256 key on a Mac:
//! - [`Route::EnclaveBlob`] (the default): an ephemeral Secure Enclave key whose token-object blob
//!   the store keeps in its key directory. No keychain, so no entitlement is needed.
//! - [`Route::EnclaveKeychain`] (`keychain = true`): a Secure Enclave key made permanent in the
//!   data-protection keychain; the host process needs `keychain-access-groups`.
//! - [`Route::OsKeychain`]: a non-extractable software key in the login keychain, for Macs without
//!   a Secure Enclave, and only when the slot's policy accepts `os_protected_nonextractable`.
//!
//! The decision is made once, when the store opens, from the hardware and the slot's policy: every
//! key of a store has the store's class, so a store never mixes enclave keys with keychain
//! software keys, and a key that did not come from the enclave never reports
//! `hardware_secure_enclave`.

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, ProtectionClass};

/// How a key of this store is made and found again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// An ephemeral Secure Enclave key; the store keeps its token-object blob.
    EnclaveBlob,
    /// A Secure Enclave key kept in the data-protection keychain.
    EnclaveKeychain,
    /// A non-extractable software key kept in the login keychain.
    OsKeychain,
}

impl Route {
    /// The protection class of every key made by this route.
    pub fn protection_class(self) -> ProtectionClass {
        match self {
            Self::EnclaveBlob | Self::EnclaveKeychain => ProtectionClass::HardwareSecureEnclave,
            Self::OsKeychain => ProtectionClass::OsProtectedNonextractable,
        }
    }

    /// True when the key lives in a keychain (and the file holds its keychain reference).
    pub fn uses_keychain(self) -> bool {
        !matches!(self, Self::EnclaveBlob)
    }

    /// The route's name in key files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnclaveBlob => "enclave_blob",
            Self::EnclaveKeychain => "enclave_keychain",
            Self::OsKeychain => "os_keychain",
        }
    }
}

/// What the slot's configuration and the server's policy allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep Secure Enclave keys in the data-protection keychain (`keychain = true`).
    pub keychain: bool,
    /// Accept `os_protected_nonextractable` keys when the Mac has no Secure Enclave.
    pub allow_os_protected: bool,
}

/// What the machine has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hardware {
    /// A Secure Enclave answered a key-creation probe.
    pub secure_enclave: bool,
}

/// Chooses the route of a store: the Secure Enclave when there is one; the OS-protected keychain
/// only when there is none and the policy accepts it; otherwise an error that says what to do.
pub fn choose_route(hardware: Hardware, policy: Policy) -> Result<Route, BackendError> {
    match (
        hardware.secure_enclave,
        policy.keychain,
        policy.allow_os_protected,
    ) {
        (true, false, _) => Ok(Route::EnclaveBlob),
        (true, true, _) => Ok(Route::EnclaveKeychain),
        (false, _, true) => Ok(Route::OsKeychain),
        (false, _, false) => Err(BackendError::Unusable(
            "this Mac has no Secure Enclave (an Intel Mac without a T2 chip, or a virtual \
             machine). Use a software slot, or set allow_os_protected = true on the \
             secure_enclave slot to accept os_protected_nonextractable keys in the login keychain"
                .to_string(),
        )),
    }
}

/// True when a key file made by `route` belongs in a store whose route is `store`: its class must
/// be the store's class (a keychain software key never shows up in an enclave store, nor the
/// reverse). Enclave keys made by either enclave route stay usable when `keychain` is toggled.
pub fn key_belongs(store: Route, key: Route) -> bool {
    store.protection_class() == key.protection_class()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SE: Hardware = Hardware {
        secure_enclave: true,
    };
    const NO_SE: Hardware = Hardware {
        secure_enclave: false,
    };

    fn policy(keychain: bool, allow_os_protected: bool) -> Policy {
        Policy {
            keychain,
            allow_os_protected,
        }
    }

    #[test]
    fn a_secure_enclave_is_always_preferred() {
        for (keychain, allow_os, route) in [
            (false, false, Route::EnclaveBlob),
            (false, true, Route::EnclaveBlob),
            (true, false, Route::EnclaveKeychain),
            (true, true, Route::EnclaveKeychain),
        ] {
            assert_eq!(choose_route(SE, policy(keychain, allow_os)).unwrap(), route);
        }
    }

    #[test]
    fn without_an_enclave_only_an_allowing_policy_gets_the_os_keychain() {
        for keychain in [false, true] {
            assert_eq!(
                choose_route(NO_SE, policy(keychain, true)).unwrap(),
                Route::OsKeychain
            );
            match choose_route(NO_SE, policy(keychain, false)) {
                Err(BackendError::Unusable(m)) => {
                    assert!(m.contains("no Secure Enclave"), "{m}");
                    assert!(m.contains("allow_os_protected"), "{m}");
                }
                other => panic!("expected Unusable, got {other:?}"),
            }
        }
    }

    #[test]
    fn only_enclave_routes_report_hardware() {
        assert_eq!(
            Route::EnclaveBlob.protection_class(),
            ProtectionClass::HardwareSecureEnclave
        );
        assert_eq!(
            Route::EnclaveKeychain.protection_class(),
            ProtectionClass::HardwareSecureEnclave
        );
        assert_eq!(
            Route::OsKeychain.protection_class(),
            ProtectionClass::OsProtectedNonextractable
        );
        assert!(!Route::OsKeychain.protection_class().is_hardware());
    }

    #[test]
    fn a_store_never_takes_a_key_of_another_class() {
        assert!(key_belongs(Route::EnclaveBlob, Route::EnclaveKeychain));
        assert!(key_belongs(Route::EnclaveKeychain, Route::EnclaveBlob));
        assert!(!key_belongs(Route::EnclaveBlob, Route::OsKeychain));
        assert!(!key_belongs(Route::OsKeychain, Route::EnclaveBlob));
        assert!(key_belongs(Route::OsKeychain, Route::OsKeychain));
    }

    #[test]
    fn route_names_match_their_serde_form() {
        for r in [
            Route::EnclaveBlob,
            Route::EnclaveKeychain,
            Route::OsKeychain,
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }
}
