//! The one error type of the PKCS#11 client layer, the one CK_RV formatter, and the one
//! classification of which answers a client recovers from.
//!
//! | CK_RV from a module | recovery | [`Kind`] |
//! |---|---|---|
//! | SESSION_HANDLE_INVALID, SESSION_CLOSED, DEVICE_REMOVED, TOKEN_NOT_PRESENT, SLOT_ID_INVALID, CRYPTOKI_NOT_INITIALIZED, USER_NOT_LOGGED_IN | [`Recovery::Reconnect`]: re-initialize / re-find the token / re-open a session / log in again, then retry once | `Unreachable` (`Auth` for USER_NOT_LOGGED_IN) |
//! | OBJECT_HANDLE_INVALID, KEY_HANDLE_INVALID | [`Recovery::LookUpAgain`]: find the object again, retry once | `NotFound` |
//! | PIN_INCORRECT, PIN_INVALID, PIN_LEN_RANGE, PIN_EXPIRED, PIN_LOCKED, USER_PIN_NOT_INITIALIZED, USER_ANOTHER_ALREADY_LOGGED_IN, USER_TYPE_INVALID, USER_TOO_MANY_TYPES | none | `Auth` |
//! | DEVICE_ERROR, TOKEN_NOT_RECOGNIZED | none | `Unreachable` |
//! | HOST_MEMORY, DEVICE_MEMORY, SESSION_COUNT | none | `Full` |
//! | anything else | none (fail closed) | `Refused` |
//! | module file missing or not loadable, C_Initialize fails | none | `Unusable` |

use cryptoki::error::{Error as CkError, RvError};

/// What kind of failure, so that each caller can map it to its own layer's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Misconfigured or unusable (module missing, not loadable, C_Initialize failed, lock poisoned).
    Unusable,
    /// The token (or an object) is not there.
    NotFound,
    /// A PIN is missing, wrong or locked.
    Auth,
    /// The device or token does not answer.
    Unreachable,
    /// Out of memory or sessions.
    Full,
    /// The module refused the call.
    Refused,
}

/// A failure of the PKCS#11 client layer: what went wrong and, when we know it, the fix.
#[derive(Clone, Debug)]
pub struct Error {
    /// The kind.
    pub kind: Kind,
    /// What went wrong, for people.
    pub problem: String,
    /// What to do about it.
    pub fix: Option<String>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.fix {
            Some(fix) => write!(f, "{}; fix: {fix}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// A failure with its fix.
    pub fn new(kind: Kind, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            kind,
            problem: problem.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure without a known fix.
    pub fn plain(kind: Kind, problem: impl Into<String>) -> Self {
        Self {
            kind,
            problem: problem.into(),
            fix: None,
        }
    }

    /// A failed call of a module, with what we were doing: `context: C_Sign returned CKR_...`.
    pub fn from_ck(e: &CkError, context: &str) -> Self {
        Self::plain(kind_of(e), format!("{context}: {}", describe(e)))
    }

    /// The same failure with `fix` (replacing any fix it had).
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// The same failure with `prefix: ` before its problem (e.g. which slot).
    pub fn context(mut self, prefix: &str) -> Self {
        self.problem = format!("{prefix}: {}", self.problem);
        self
    }
}

/// The return value inside a `cryptoki` error, if the error came from the module.
pub fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// `CKR_KEY_FUNCTION_NOT_PERMITTED` for `RvError::KeyFunctionNotPermitted`.
pub fn rv_name(rv: RvError) -> String {
    // RvError's Display is a paragraph of spec text; the C name is what people search for.
    let name = format!("{rv:?}");
    let mut out = String::from("CKR_");
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The one description of a module error: `C_Sign returned CKR_KEY_FUNCTION_NOT_PERMITTED`.
pub fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("C_{function:?} returned {}", rv_name(*rv)),
        other => other.to_string(),
    }
}

/// What a client can do about a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The session, the login or the token went away: re-establish, then retry once.
    Reconnect,
    /// A cached object handle is no longer valid: look the object up again, then retry once.
    LookUpAgain,
    /// Nothing: the answer is final.
    None,
}

/// The one stale-session / stale-handle classification.
pub fn recovery(e: &CkError) -> Recovery {
    match rv(e) {
        Some(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn,
        ) => Recovery::Reconnect,
        Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid) => Recovery::LookUpAgain,
        _ => Recovery::None,
    }
}

/// True when the session or the token went away and re-establishing it may help.
pub fn needs_reconnect(e: &CkError) -> bool {
    recovery(e) == Recovery::Reconnect
}

/// True when the session itself is gone (forget it rather than pooling it again).
pub fn session_dead(e: &CkError) -> bool {
    needs_reconnect(e) && rv(e) != Some(RvError::UserNotLoggedIn)
}

/// True when a cached object handle is no longer valid.
pub fn handle_stale(e: &CkError) -> bool {
    recovery(e) == Recovery::LookUpAgain
}

/// The kind of a failed call.
pub fn kind_of(e: &CkError) -> Kind {
    let Some(rv) = rv(e) else {
        return match e {
            CkError::LibraryLoading(_)
            | CkError::MissingSymbol(_)
            | CkError::NullFunctionPointer => Kind::Unusable,
            _ => Kind::Refused,
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
        | RvError::UserTooManyTypes => Kind::Auth,
        RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::DeviceError
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::SlotIdInvalid
        | RvError::CryptokiNotInitialized
        | RvError::TokenNotRecognized => Kind::Unreachable,
        RvError::HostMemory | RvError::DeviceMemory | RvError::SessionCount => Kind::Full,
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Kind::NotFound,
        _ => Kind::Refused,
    }
}

/// An error inside one attempt of an operation on a pooled session: straight from the module
/// (and perhaps recoverable), or already decided in the caller's own error type `E`.
#[derive(Debug)]
pub enum OpError<E> {
    /// The module said no.
    Ck(CkError),
    /// Final: no retry.
    Fail(E),
}

impl<E> From<CkError> for OpError<E> {
    fn from(e: CkError) -> Self {
        Self::Ck(e)
    }
}

impl<E: From<Error>> OpError<E> {
    /// The final error.
    pub fn into_final(self, context: &str) -> E {
        match self {
            Self::Ck(e) => E::from(Error::from_ck(&e, context)),
            Self::Fail(e) => e,
        }
    }

    /// Makes a module error final (no retry), e.g. after a step that must not be repeated.
    pub fn finalize(self, context: &str) -> Self {
        match self {
            Self::Ck(e) => Self::Fail(E::from(Error::from_ck(&e, context))),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn one_formatter_and_one_classification() {
        assert_eq!(
            rv_name(RvError::KeyFunctionNotPermitted),
            "CKR_KEY_FUNCTION_NOT_PERMITTED"
        );
        let e = CkError::Pkcs11(RvError::PinIncorrect, Function::Login);
        assert_eq!(describe(&e), "C_Login returned CKR_PIN_INCORRECT");
        assert_eq!(kind_of(&e), Kind::Auth);
        assert_eq!(recovery(&e), Recovery::None);
        let e = CkError::Pkcs11(RvError::SessionHandleInvalid, Function::Sign);
        assert!(session_dead(&e) && needs_reconnect(&e));
        let e = CkError::Pkcs11(RvError::UserNotLoggedIn, Function::Sign);
        assert!(needs_reconnect(&e) && !session_dead(&e));
        let e = CkError::Pkcs11(RvError::KeyHandleInvalid, Function::SignInit);
        assert!(handle_stale(&e));
        assert_eq!(
            Error::new(Kind::NotFound, "no token", "make one").to_string(),
            "no token; fix: make one"
        );
    }
}
