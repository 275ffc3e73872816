//! Security-framework errors turned into [`BackendError`]s that tell the user what to do.
//!
//! The framework reports failures as an `OSStatus` or as a `CFError` whose domain is
//! `NSOSStatusErrorDomain` (the code is then an `OSStatus`), `com.apple.LocalAuthentication`
//! (Touch ID and password prompts) or `CryptoTokenKit` (the Secure Enclave token). The same code
//! means different things in different operations: `errSecItemNotFound` while creating a Secure
//! Enclave key means there is no enclave (what Intel Macs answer), while looking a key up it means
//! the key is gone. So the mapping takes the operation and the route too.

use super::policy::Route;
use crate::backend::BackendError;

/// `errSecUnimplemented`.
pub const ERR_SEC_UNIMPLEMENTED: i64 = -4;
/// `errSecParam`.
pub const ERR_SEC_PARAM: i64 = -50;
/// `errSecAllocate`.
pub const ERR_SEC_ALLOCATE: i64 = -108;
/// `errSecUserCanceled`.
pub const ERR_SEC_USER_CANCELED: i64 = -128;
/// `errSecNotAvailable`: no keychain is available.
pub const ERR_SEC_NOT_AVAILABLE: i64 = -25291;
/// `errSecAuthFailed`.
pub const ERR_SEC_AUTH_FAILED: i64 = -25293;
/// `errSecNoSuchKeychain`.
pub const ERR_SEC_NO_SUCH_KEYCHAIN: i64 = -25294;
/// `errSecDuplicateItem`.
pub const ERR_SEC_DUPLICATE_ITEM: i64 = -25299;
/// `errSecItemNotFound`.
pub const ERR_SEC_ITEM_NOT_FOUND: i64 = -25300;
/// `errSecInteractionNotAllowed`.
pub const ERR_SEC_INTERACTION_NOT_ALLOWED: i64 = -25308;
/// `errSecDecode`.
pub const ERR_SEC_DECODE: i64 = -26275;
/// `errSecMissingEntitlement`.
pub const ERR_SEC_MISSING_ENTITLEMENT: i64 = -34018;

/// `LAErrorAuthenticationFailed`.
pub const LA_AUTHENTICATION_FAILED: i64 = -1;
/// `LAErrorUserCancel`.
pub const LA_USER_CANCEL: i64 = -2;
/// `LAErrorSystemCancel`.
pub const LA_SYSTEM_CANCEL: i64 = -4;
/// `LAErrorAppCancel`.
pub const LA_APP_CANCEL: i64 = -9;
/// `LAErrorNotInteractive`.
pub const LA_NOT_INTERACTIVE: i64 = -1004;

/// `TKErrorCodeCanceledByUser`.
pub const TK_CANCELED_BY_USER: i64 = -4;
/// `TKErrorCodeAuthenticationFailed`.
pub const TK_AUTHENTICATION_FAILED: i64 = -5;
/// `TKErrorCodeObjectNotFound`.
pub const TK_OBJECT_NOT_FOUND: i64 = -6;
/// `TKErrorCodeTokenNotFound`.
pub const TK_TOKEN_NOT_FOUND: i64 = -7;

/// The `CFError` domain of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// `NSOSStatusErrorDomain`, or a bare `OSStatus`.
    OsStatus,
    /// `com.apple.LocalAuthentication`.
    LocalAuthentication,
    /// `CryptoTokenKit`.
    CryptoTokenKit,
    /// Any other domain.
    Other,
}

impl Domain {
    /// The domain a `CFError` names.
    pub fn parse(domain: &str) -> Self {
        match domain {
            "NSOSStatusErrorDomain" => Self::OsStatus,
            "com.apple.LocalAuthentication" => Self::LocalAuthentication,
            "CryptoTokenKit" | "com.apple.CryptoTokenKit" => Self::CryptoTokenKit,
            _ => Self::Other,
        }
    }
}

/// What the store was doing when the framework failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Checking whether the Mac has a Secure Enclave.
    Probe,
    /// Creating a key.
    Create,
    /// Rebuilding a key from its blob or finding it in the keychain.
    Open,
    /// Reading a public key.
    PublicKey,
    /// Signing a digest.
    Sign,
    /// Deleting a keychain key.
    Delete,
}

impl Operation {
    fn doing(self) -> &'static str {
        match self {
            Self::Probe => "checking for a Secure Enclave",
            Self::Create => "creating a key",
            Self::Open => "opening a key",
            Self::PublicKey => "reading a public key",
            Self::Sign => "signing",
            Self::Delete => "deleting a key",
        }
    }
}

/// One framework failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameworkError {
    /// Its domain.
    pub domain: Domain,
    /// Its code.
    pub code: i64,
    /// The framework's own description (may be empty).
    pub description: String,
}

impl FrameworkError {
    /// A bare `OSStatus`.
    pub fn status(code: i32) -> Self {
        Self {
            domain: Domain::OsStatus,
            code: i64::from(code),
            description: String::new(),
        }
    }
}

fn cancelled(e: &FrameworkError) -> bool {
    match e.domain {
        Domain::OsStatus => e.code == ERR_SEC_USER_CANCELED,
        Domain::LocalAuthentication => {
            matches!(e.code, LA_USER_CANCEL | LA_SYSTEM_CANCEL | LA_APP_CANCEL)
        }
        Domain::CryptoTokenKit => e.code == TK_CANCELED_BY_USER,
        Domain::Other => false,
    }
}

fn no_interaction(e: &FrameworkError) -> bool {
    (e.domain == Domain::OsStatus && e.code == ERR_SEC_INTERACTION_NOT_ALLOWED)
        || (e.domain == Domain::LocalAuthentication && e.code == LA_NOT_INTERACTIVE)
}

fn auth_failed(e: &FrameworkError) -> bool {
    (e.domain == Domain::OsStatus && e.code == ERR_SEC_AUTH_FAILED)
        || (e.domain == Domain::LocalAuthentication && e.code == LA_AUTHENTICATION_FAILED)
        || (e.domain == Domain::CryptoTokenKit && e.code == TK_AUTHENTICATION_FAILED)
}

fn not_found(e: &FrameworkError) -> bool {
    (e.domain == Domain::OsStatus && e.code == ERR_SEC_ITEM_NOT_FOUND)
        || (e.domain == Domain::CryptoTokenKit
            && matches!(e.code, TK_OBJECT_NOT_FOUND | TK_TOKEN_NOT_FOUND))
}

/// The error the store reports for `e`, met while doing `op` on a store of `route`.
pub fn backend_error(e: &FrameworkError, op: Operation, route: Route) -> BackendError {
    let code = match e.domain {
        Domain::OsStatus => format!("OSStatus {}", e.code),
        Domain::LocalAuthentication => format!("LocalAuthentication error {}", e.code),
        Domain::CryptoTokenKit => format!("CryptoTokenKit error {}", e.code),
        Domain::Other => format!("error {}", e.code),
    };
    let detail = if e.description.is_empty() {
        code
    } else {
        format!("{code}: {}", e.description)
    };
    let doing = op.doing();
    let enclave = route != Route::OsKeychain;

    if e.domain == Domain::OsStatus && e.code == ERR_SEC_MISSING_ENTITLEMENT {
        let fix = if route == Route::EnclaveKeychain {
            "remove `keychain = true` from the secure_enclave slot: the default keeps Secure \
             Enclave keys as blobs in the key directory and needs no entitlement"
        } else {
            "run devicekey from a code-signed host with a keychain-access-groups entitlement"
        };
        return BackendError::Unusable(format!(
            "entitlements required: the process that loaded devicekey may not use the keychain \
             while {doing} (errSecMissingEntitlement, {detail}); {fix}"
        ));
    }
    if cancelled(e) {
        return BackendError::Refused(format!(
            "the user cancelled the prompt while {doing} ({detail}); try again and approve it"
        ));
    }
    if no_interaction(e) {
        return BackendError::Refused(format!(
            "the key needs user interaction that is not possible now while {doing} ({detail}); \
             unlock the Mac and run devicekey from a logged-in session"
        ));
    }
    if enclave
        && matches!(op, Operation::Probe | Operation::Create)
        && e.domain == Domain::OsStatus
        && matches!(
            e.code,
            ERR_SEC_AUTH_FAILED | ERR_SEC_ITEM_NOT_FOUND | ERR_SEC_UNIMPLEMENTED
        )
    {
        return BackendError::Unusable(format!(
            "no Secure Enclave on this Mac ({detail} while {doing}): Intel Macs without a T2 \
             chip and virtual machines have none. Use a software slot, or set \
             allow_os_protected = true to accept os_protected_nonextractable keys"
        ));
    }
    if not_found(e) {
        return BackendError::NotFound(format!(
            "the key is no longer in the {} ({detail} while {doing}); it was deleted outside \
             devicekey: destroy this key and create a new one",
            if route.uses_keychain() {
                "keychain"
            } else {
                "Secure Enclave"
            }
        ));
    }
    if auth_failed(e) {
        if op == Operation::Open && route == Route::EnclaveBlob {
            return BackendError::Refused(format!(
                "the Secure Enclave refused the key blob ({detail}): it was made on another Mac \
                 or before this Mac's Secure Enclave was reset. It cannot be used here: destroy \
                 this key and create a new one"
            ));
        }
        return BackendError::Auth(format!(
            "authentication failed while {doing} ({detail}); unlock the Mac or the keychain and \
             try again"
        ));
    }
    if e.domain == Domain::OsStatus {
        match e.code {
            ERR_SEC_NOT_AVAILABLE | ERR_SEC_NO_SUCH_KEYCHAIN => {
                return BackendError::Unreachable(format!(
                    "no keychain is available while {doing} ({detail}); log in to the Mac's \
                     desktop session so the login keychain is unlocked"
                ));
            }
            ERR_SEC_DUPLICATE_ITEM => {
                return BackendError::Io(format!(
                    "the keychain already holds this key while {doing} ({detail}); retry"
                ));
            }
            ERR_SEC_ALLOCATE => {
                return BackendError::Full(format!("out of memory while {doing} ({detail})"));
            }
            ERR_SEC_DECODE if op == Operation::Open => {
                return BackendError::Refused(format!(
                    "the key blob is damaged ({detail}); destroy this key and create a new one"
                ));
            }
            ERR_SEC_UNIMPLEMENTED => {
                return BackendError::Unusable(format!(
                    "this macOS does not support {doing} this way ({detail}); update macOS"
                ));
            }
            ERR_SEC_PARAM => {
                return BackendError::Crypto(format!(
                    "the Security framework rejected a parameter while {doing} ({detail}); \
                     this is a devicekey bug, please report it"
                ));
            }
            _ => {}
        }
    }
    BackendError::Io(format!("Security framework error while {doing} ({detail})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(domain: Domain, code: i64) -> FrameworkError {
        FrameworkError {
            domain,
            code,
            description: String::new(),
        }
    }

    fn os(code: i64) -> FrameworkError {
        err(Domain::OsStatus, code)
    }

    #[test]
    fn missing_entitlement_says_entitlements_and_how_to_avoid_them() {
        match backend_error(&os(-34018), Operation::Create, Route::EnclaveKeychain) {
            BackendError::Unusable(m) => {
                assert!(m.starts_with("entitlements required"), "{m}");
                assert!(m.contains("-34018"), "{m}");
                assert!(m.contains("keychain = true"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        match backend_error(&os(-34018), Operation::Create, Route::OsKeychain) {
            BackendError::Unusable(m) => assert!(m.contains("keychain-access-groups"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn creation_failures_on_intel_mean_no_secure_enclave() {
        for code in [-25293, -25300] {
            for op in [Operation::Probe, Operation::Create] {
                for route in [Route::EnclaveBlob, Route::EnclaveKeychain] {
                    match backend_error(&os(code), op, route) {
                        BackendError::Unusable(m) => {
                            assert!(m.starts_with("no Secure Enclave on this Mac"), "{m}");
                            assert!(m.contains(&code.to_string()), "{m}");
                        }
                        other => panic!("{code} {op:?}: {other:?}"),
                    }
                }
            }
        }
    }

    /// An OSStatus, the operation and route it comes from, the error kind it must become, and
    /// what its message must contain.
    type StatusCase = (
        i64,
        Operation,
        Route,
        fn(String) -> BackendError,
        &'static str,
    );

    /// Checks each case: the error has the kind `want` makes, and its message contains `text`.
    fn check_statuses(cases: &[StatusCase]) {
        for (code, op, route, want, text) in cases {
            let got = backend_error(&os(*code), *op, *route).to_string();
            let kind = want(String::new()).to_string();
            assert!(got.starts_with(&kind), "{code} {op:?}: {got}");
            assert!(got[kind.len()..].contains(text), "{code} {op:?}: {got}");
        }
    }

    #[test]
    fn each_status_has_its_own_kind_and_advice() {
        use BackendError::{Auth, Crypto, Full, NotFound, Refused, Unreachable};
        use Operation::{Create, Open, Sign};
        use Route::{EnclaveBlob, EnclaveKeychain, OsKeychain};
        check_statuses(&[
            // The codes that mean "no enclave" at creation mean, later, a missing key or a
            // failed authentication.
            (-25300, Sign, EnclaveKeychain, NotFound, "keychain"),
            (-25300, Create, OsKeychain, NotFound, ""),
            (-25293, Sign, EnclaveBlob, Auth, ""),
            (-25293, Open, EnclaveBlob, Refused, "another Mac"),
            // Other statuses.
            (-25308, Sign, EnclaveBlob, Refused, "unlock"),
            (-25291, Create, OsKeychain, Unreachable, ""),
            (-108, Sign, EnclaveBlob, Full, ""),
            (-26275, Open, EnclaveBlob, Refused, "damaged"),
            (-50, Sign, EnclaveBlob, Crypto, ""),
        ]);
        match backend_error(&os(-99999), Operation::Sign, Route::EnclaveBlob) {
            BackendError::Io(m) => assert!(m.contains("-99999") && m.contains("signing"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_kind_of_cancel_is_a_refusal_that_says_cancelled() {
        for e in [
            os(-128),
            err(Domain::LocalAuthentication, -2),
            err(Domain::LocalAuthentication, -4),
            err(Domain::LocalAuthentication, -9),
            err(Domain::CryptoTokenKit, -4),
        ] {
            match backend_error(&e, Operation::Sign, Route::EnclaveBlob) {
                BackendError::Refused(m) => assert!(m.contains("cancelled"), "{m}"),
                other => panic!("{e:?}: {other:?}"),
            }
        }
        // The same number in another domain is not a cancel.
        assert!(!matches!(
            backend_error(&os(-4), Operation::Sign, Route::EnclaveBlob),
            BackendError::Refused(_)
        ));
    }

    #[test]
    fn the_framework_description_is_kept() {
        let e = FrameworkError {
            domain: Domain::OsStatus,
            code: -99999,
            description: "something odd".into(),
        };
        let m = backend_error(&e, Operation::Delete, Route::OsKeychain).to_string();
        assert!(m.contains("something odd"), "{m}");
    }

    #[test]
    fn domains_parse() {
        assert_eq!(Domain::parse("NSOSStatusErrorDomain"), Domain::OsStatus);
        assert_eq!(
            Domain::parse("com.apple.LocalAuthentication"),
            Domain::LocalAuthentication
        );
        assert_eq!(Domain::parse("CryptoTokenKit"), Domain::CryptoTokenKit);
        assert_eq!(Domain::parse("NSCocoaErrorDomain"), Domain::Other);
        assert_eq!(FrameworkError::status(-128).code, -128);
    }
}
