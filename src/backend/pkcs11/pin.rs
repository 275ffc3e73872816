//! Our own user PIN in front of a pkcs11 slot with `login = "pin"`.
//!
//! The wrapped token keeps its own PIN (`pin_env` / `pin_file`), which this module uses to log in
//! below; the PIN asked by *our* token is checked against a PIN file in an owner-only key
//! directory named by the slot's `pin_dir`, written and read by the software store's PIN code
//! ([`PinVault`]): an Argon2id-derived key that must open the wrapped data key, and the
//! wrong-try count. The data key opens nothing here: it is the verifier. Until C_Login the
//! store's signers refuse to sign; this gate is software in our token, and does not bind a
//! program that uses the wrapped module directly with the wrapped token's PIN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::keydir::KeyDir;
use crate::backend::pin::{PinGuard, PinStatus};
use crate::backend::software::pin::{PinVault, DEFAULT_MAX_TRIES};
use crate::backend::{BackendError, Result};
use crate::config::{LoginMode, Pkcs11Slot};

/// Our PIN for one pkcs11 slot.
pub struct Pkcs11Pin {
    vault: PinVault,
    logged_in: AtomicBool,
}

impl Pkcs11Pin {
    /// The gate a slot asks for: `None` without `login = "pin"` (where a `pin_dir` holding a PIN
    /// file is refused, as the software store refuses it).
    pub fn of_slot(config: &Pkcs11Slot) -> Result<Option<Arc<Pkcs11Pin>>> {
        let label = &config.label;
        match (config.login, &config.pin_dir) {
            (LoginMode::Pin, None) => Err(BackendError::Unusable(format!(
                "slot {label:?}: login = \"pin\" on a pkcs11 slot needs a directory for its PIN \
                 file; fix: add `pin_dir = \"/path/to/an/owner-only/directory\"` to the slot"
            ))),
            (LoginMode::Pin, Some(dir)) => {
                let dir = Arc::new(KeyDir::open(dir)?);
                let tries = config.pin_tries.unwrap_or(DEFAULT_MAX_TRIES);
                Ok(Some(Arc::new(Pkcs11Pin {
                    vault: PinVault::new(dir, tries),
                    logged_in: AtomicBool::new(false),
                })))
            }
            (LoginMode::None, Some(dir)) if dir.exists() => {
                if PinVault::exists_in(&KeyDir::open(dir)?)? {
                    return Err(BackendError::Unusable(format!(
                        "slot {label:?}: {} holds a PIN file but the slot says login = \"none\"; \
                         fix: set login = \"pin\" on the slot",
                        dir.display()
                    )));
                }
                Ok(None)
            }
            (LoginMode::None, _) => Ok(None),
        }
    }

    /// `NotLoggedIn` unless our PIN was given since the last logout.
    pub fn require_login(&self) -> Result<()> {
        if self.logged_in.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(BackendError::NotLoggedIn(
                "the slot's PIN is needed first (C_Login)".into(),
            ))
        }
    }
}

impl PinGuard for Pkcs11Pin {
    fn status(&self) -> Result<PinStatus> {
        self.vault.status()
    }

    fn login(&self, pin: &[u8]) -> Result<()> {
        // The data key is only the proof that the PIN is right; it is wiped when dropped here.
        drop(self.vault.unlock(pin)?);
        self.logged_in.store(true, Ordering::Release);
        Ok(())
    }

    fn logout(&self) {
        self.logged_in.store(false, Ordering::Release);
    }

    fn set_pin(&self, old: Option<&[u8]>, new: &[u8]) -> Result<()> {
        match old {
            None => drop(self.vault.set_first(new)?),
            Some(old) => drop(self.vault.change(old, new)?),
        }
        Ok(())
    }
}
