//! The software store as a `[[slot]] backend = "software"` selects it: opened from its slot
//! struct, and diagnosed for `devicekey doctor`.

use std::sync::Arc;

use super::{PinOptions, SoftwareStore};
use crate::backend::{
    split_fix, Backend, BackendError, Diagnosis, ProtectionClass, Result, SlotStore,
};
use crate::config::{LoginMode, SoftwareSlot};

impl SoftwareStore {
    /// Opens the store of a `[[slot]] backend = "software"`.
    pub fn from_slot(slot: &SoftwareSlot) -> Result<SoftwareStore> {
        let pin = match slot.login {
            LoginMode::None => None,
            LoginMode::Pin => Some(PinOptions {
                max_tries: slot.pin_tries.unwrap_or(super::pin::DEFAULT_MAX_TRIES),
            }),
        };
        SoftwareStore::open_with(&slot.label, slot.dir.as_deref(), pin)
    }
}

impl SlotStore for SoftwareSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(SoftwareStore::from_slot(self)?))
    }

    fn diagnose(&self) -> Diagnosis {
        let class = ProtectionClass::OsProtectedNonextractable;
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(crate::config::default_data_dir);
        match SoftwareStore::from_slot(self) {
            Ok(store) => Diagnosis::reachable(
                class,
                match store.load_keys() {
                    Ok(keys) => format!("keys in {}, {} key(s)", dir.display(), keys.len()),
                    Err(e) => format!("keys in {} (not listed: {e})", dir.display()),
                },
            ),
            Err(e) => {
                let (problem, fix) = match &e {
                    BackendError::Unusable(m) | BackendError::Io(m) | BackendError::Full(m) => {
                        split_fix(m)
                    }
                    other => (other.to_string(), None),
                };
                let fix = fix.unwrap_or_else(|| match e {
                    BackendError::Full(_) => {
                        "free space on the file system of the key directory".into()
                    }
                    _ => format!(
                        "make {} a directory you own with mode 0700, or set the slot's `dir` elsewhere",
                        dir.display()
                    ),
                });
                Diagnosis::unreachable(Some(class), problem, fix)
            }
        }
    }
}
