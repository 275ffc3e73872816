//! How the wrapped module's answers become [`BackendError`]s, and which ones we recover from.
//!
//! | CK_RV from the wrapped module | what we do | BackendError |
//! |---|---|---|
//! | SESSION_HANDLE_INVALID, SESSION_CLOSED, DEVICE_REMOVED, TOKEN_NOT_PRESENT, SLOT_ID_INVALID, CRYPTOKI_NOT_INITIALIZED, USER_NOT_LOGGED_IN | re-initialize / re-find the token / re-open a session / log in again, then retry once | `Unreachable` (or `Auth`) if the retry fails too |
//! | OBJECT_HANDLE_INVALID, KEY_HANDLE_INVALID | look the object up again by CKA_ID (keys) or content (objects), retry once | `NotFound` |
//! | PIN_INCORRECT, PIN_INVALID, PIN_LEN_RANGE, PIN_EXPIRED, PIN_LOCKED, USER_PIN_NOT_INITIALIZED, USER_ANOTHER_ALREADY_LOGGED_IN | fail; after PIN_INCORRECT no further login is tried | `Auth` |
//! | DEVICE_ERROR, TOKEN_NOT_RECOGNIZED | fail | `Unreachable` |
//! | HOST_MEMORY, DEVICE_MEMORY, SESSION_COUNT (after waiting for a free session) | fail | `Full` |
//! | anything else (ATTRIBUTE_*, TEMPLATE_*, MECHANISM_*, KEY_FUNCTION_NOT_PERMITTED, GENERAL_ERROR, ...) | fail closed | `Refused` |
//! | module file missing or not loadable, C_Initialize fails | fail | `Unusable` |
//!
//! What we ask the token layer to answer its callers (C_Login excepted, nothing here is about *our*
//! PIN; an application must never be asked for a PIN because the wrapped token rejected ours):
//! `Unusable` / `NotFound` / `Auth` while opening the slot: the slot has no token
//! (`CKR_TOKEN_NOT_PRESENT`, flags without CKF_TOKEN_PRESENT), the other slots keep working.
//! At run time: `Unreachable` → `CKR_DEVICE_ERROR` (`CKR_DEVICE_REMOVED` where allowed), `Auth` →
//! `CKR_DEVICE_ERROR` (never `CKR_USER_NOT_LOGGED_IN`, which makes applications prompt for a PIN
//! our token does not need), `NotFound` → `CKR_KEY_HANDLE_INVALID` / `CKR_OBJECT_HANDLE_INVALID`,
//! `Full` → `CKR_DEVICE_MEMORY`, `Refused` / `Crypto` → `CKR_FUNCTION_FAILED`, `Unusable` →
//! `CKR_GENERAL_ERROR`.

use cryptoki::error::{Error as CkError, RvError};

use crate::backend::BackendError;

/// The return value inside a `cryptoki` error, if the error came from the module.
pub(super) fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A short description of a module error: `C_Sign answered PinIncorrect` (cryptoki's own text
/// quotes the whole specification paragraph).
pub(super) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?} answered {rv:?}"),
        other => other.to_string(),
    }
}

/// True when the session or the token went away and re-establishing it may help.
pub(super) fn needs_reconnect(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
        )
    )
}

/// True when the session itself is gone (close it rather than pooling it again).
pub(super) fn session_dead(e: &CkError) -> bool {
    needs_reconnect(e) && rv(e) != Some(RvError::UserNotLoggedIn)
}

/// True when a cached object handle is no longer valid.
pub(super) fn handle_stale(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
    )
}

/// The backend error for a failed call of the wrapped module.
pub(super) fn map(e: &CkError, context: &str) -> BackendError {
    let msg = format!("{context}: {}", describe(e));
    let Some(rv) = rv(e) else {
        return match e {
            CkError::LibraryLoading(_)
            | CkError::MissingSymbol(_)
            | CkError::NullFunctionPointer => BackendError::Unusable(msg),
            _ => {
                BackendError::Refused(format!("{msg} (unexpected answer from the wrapped module)"))
            }
        };
    };
    match rv {
        RvError::PinIncorrect
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::PinExpired
        | RvError::PinLocked
        | RvError::UserPinNotInitialized
        | RvError::UserNotLoggedIn
        | RvError::UserAnotherAlreadyLoggedIn
        | RvError::UserTypeInvalid
        | RvError::UserTooManyTypes => BackendError::Auth(msg),
        RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::DeviceError
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::SlotIdInvalid
        | RvError::CryptokiNotInitialized
        | RvError::TokenNotRecognized => BackendError::Unreachable(msg),
        RvError::HostMemory | RvError::DeviceMemory | RvError::SessionCount => {
            BackendError::Full(msg)
        }
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => BackendError::NotFound(msg),
        _ => BackendError::Refused(msg),
    }
}

/// An error inside one attempt of an operation: either straight from the module (and perhaps
/// recoverable) or already decided.
#[derive(Debug)]
pub(super) enum OpError {
    /// The wrapped module said no.
    Ck(CkError),
    /// Final: no retry.
    Backend(BackendError),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        Self::Ck(e)
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> Self {
        Self::Backend(e)
    }
}

impl OpError {
    /// The final backend error.
    pub(super) fn into_backend(self, context: &str) -> BackendError {
        match self {
            Self::Ck(e) => map(&e, context),
            Self::Backend(e) => e,
        }
    }

    /// Makes a module error final (no retry), e.g. after a step that must not be repeated.
    pub(super) fn finalize(self, context: &str) -> Self {
        match self {
            Self::Ck(e) => Self::Backend(map(&e, context)),
            other => other,
        }
    }
}

/// A failure to open the slot: the error and the fix an operator should apply.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What went wrong, as the trait reports it (its message includes the fix).
    pub error: BackendError,
    /// What went wrong, for people.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl Failure {
    /// A failure of the given kind.
    pub(super) fn new(
        kind: fn(String) -> BackendError,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        let problem = problem.into();
        let fix = fix.into();
        Self {
            error: kind(format!("{problem}; fix: {fix}")),
            problem,
            fix,
        }
    }

    /// A failure from an error met while talking to the module.
    pub(super) fn from_error(error: BackendError, fix: impl Into<String>) -> Self {
        let problem = error.to_string();
        Self {
            error,
            problem,
            fix: fix.into(),
        }
    }
}
