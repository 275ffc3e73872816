//! How the PKCS#11 client layer's errors become [`BackendError`]s.
//!
//! Which CK_RV we recover from (reconnect, look up again) and how each is classified is
//! [`crate::p11::error`]'s one table; this store maps the kinds one to one: `Unusable`, `NotFound`,
//! `Auth`, `Unreachable`, `Full`, `Refused`.
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

use crate::backend::BackendError;
use crate::p11::{self, Kind};

pub(super) use crate::p11::describe;
pub(super) use crate::p11::error::{handle_stale, rv};

/// An error inside one attempt of an operation on the wrapped token.
pub(super) type OpError = p11::OpError<BackendError>;

impl From<p11::Error> for BackendError {
    fn from(e: p11::Error) -> Self {
        let message = e.to_string();
        match e.kind {
            Kind::Unusable => Self::Unusable(message),
            Kind::NotFound => Self::NotFound(message),
            Kind::Auth => Self::Auth(message),
            Kind::Unreachable => Self::Unreachable(message),
            Kind::Full => Self::Full(message),
            Kind::Refused => Self::Refused(message),
        }
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> Self {
        Self::Fail(e)
    }
}
