//! The user PIN of a slot with `login = "pin"`: what the token asks of a key store that guards
//! its private keys with one.
//!
//! A store without a PIN returns `None` from [`crate::backend::Backend::pin`] and behaves as it
//! always did. A store with one returns a [`PinGuard`]: the token calls it for C_Login, C_Logout
//! and C_SetPIN, and reads its [`PinStatus`] for the token flags. Which boundary enforces the PIN
//! is the store's to say: the software store encrypts each scalar under a key derived from it
//! (and counts wrong tries in a file); the TPM store makes it each key's authValue, so the TPM
//! refuses to sign without it and counts wrong tries itself.

use crate::backend::Result;

/// The shortest PIN the token accepts (CK_TOKEN_INFO.ulMinPinLen).
pub const MIN_PIN_LEN: usize = 4;

/// The longest PIN the token accepts (CK_TOKEN_INFO.ulMaxPinLen).
pub const MAX_PIN_LEN: usize = 256;

/// The PIN state a store reports; the token turns it into C_GetTokenInfo flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinStatus {
    /// A PIN has been set (CKF_USER_PIN_INITIALIZED). A `login = "pin"` slot without one
    /// refuses C_Login with CKR_USER_PIN_NOT_INITIALIZED until `devicekey pin set`.
    pub initialized: bool,
    /// Wrong tries left before the PIN locks, when the store knows.
    pub tries_left: Option<u32>,
    /// Wrong tries allowed in a row.
    pub max_tries: u32,
    /// No try is accepted now (CKF_USER_PIN_LOCKED).
    pub locked: bool,
}

/// The PIN of one key store. Every method is safe to call from several threads.
pub trait PinGuard: Send + Sync {
    /// The current state (read fresh: another process may have tried a PIN meanwhile).
    fn status(&self) -> Result<PinStatus>;

    /// C_Login(CKU_USER): checks `pin` and makes the private keys usable in this process until
    /// [`PinGuard::logout`]. A wrong PIN is `BackendError::PinIncorrect` (and costs one try); a
    /// locked PIN is `BackendError::PinLocked`, whatever `pin` is.
    fn login(&self, pin: &[u8]) -> Result<()>;

    /// C_Logout, the last session closed, or C_Finalize: forgets whatever the PIN unlocked
    /// (derived keys zeroized, decrypted scalars dropped).
    fn logout(&self);

    /// Sets the PIN (`old` is `None` only when none is set yet) or changes it (`old` must be the
    /// current PIN). Re-protects every key of the store. Crash-safe: a failure or a kill half-way
    /// leaves every key usable with exactly one of the two PINs, never neither.
    fn set_pin(&self, old: Option<&[u8]>, new: &[u8]) -> Result<()>;
}
