//! The token layer's one error type: a PKCS#11 return value, plus the length a caller needs
//! when its buffer was too small.

use cryptoki_sys::*;

use crate::backend::BackendError;

/// A failed token call. `rv` is what the C ABI returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    /// The PKCS#11 return value.
    pub rv: CK_RV,
    /// For `CKR_BUFFER_TOO_SMALL`: the length the caller needs.
    pub needed: Option<usize>,
}

impl Error {
    /// An error with this return value.
    pub const fn rv(rv: CK_RV) -> Self {
        Self { rv, needed: None }
    }

    /// `CKR_BUFFER_TOO_SMALL`, with the length the caller needs.
    pub const fn buffer_too_small(needed: usize) -> Self {
        Self {
            rv: CKR_BUFFER_TOO_SMALL,
            needed: Some(needed),
        }
    }
}

impl From<CK_RV> for Error {
    fn from(rv: CK_RV) -> Self {
        Self::rv(rv)
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        log::error!("{e}");
        Self::rv(backend_rv(&e))
    }
}

/// The CK_RV each backend failure maps to (documented in docs/FEATURES.md).
pub fn backend_rv(e: &BackendError) -> CK_RV {
    match e {
        BackendError::Unusable(_) => CKR_GENERAL_ERROR,
        BackendError::Unreachable(_) => CKR_DEVICE_REMOVED,
        BackendError::Io(_) => CKR_DEVICE_ERROR,
        BackendError::Full(_) => CKR_DEVICE_MEMORY,
        BackendError::NotFound(_) => CKR_OBJECT_HANDLE_INVALID,
        // A wrapped token's or a device's own authorization failure must not make callers
        // prompt for our PIN: only the PIN* variants speak of the user PIN.
        BackendError::Auth(_) => CKR_DEVICE_ERROR,
        BackendError::PinIncorrect(_) => CKR_PIN_INCORRECT,
        BackendError::PinLocked(_) => CKR_PIN_LOCKED,
        BackendError::NotLoggedIn(_) => CKR_USER_NOT_LOGGED_IN,
        BackendError::Refused(_) => CKR_FUNCTION_REJECTED,
        BackendError::Crypto(_) => CKR_FUNCTION_FAILED,
    }
}

/// The result type of every token call.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for `Err(Error::rv(rv))`.
pub fn fail<T>(rv: CK_RV) -> Result<T> {
    Err(Error::rv(rv))
}
