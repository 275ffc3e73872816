//! Slots this build or this machine cannot serve: a slot whose options are wrong, the Secure
//! Enclave (no store yet; it needs macOS), and a TPM slot in a build without TPM support. Each
//! opens to a clear error, and the doctor shows the same error with its fix.

use std::sync::Arc;

use super::{Backend, BackendError, Diagnosis, ProtectionClass, Result, SlotStore};
use crate::config::{BrokenSlot, SecureEnclaveSlot};

impl SlotStore for BrokenSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Err(BackendError::Unusable(self.problem.clone()))
    }

    fn diagnose(&self) -> Diagnosis {
        Diagnosis::unreachable(None, self.problem.clone(), self.fix.clone())
    }
}

// When a Secure Enclave store exists, its module implements `SlotStore` for `SecureEnclaveSlot`
// on macOS, and the impl below stays for every other system.

/// Why a `secure_enclave` slot has no token here.
const NO_SECURE_ENCLAVE: &str = "the Secure Enclave store needs macOS with a Secure Enclave";

impl SlotStore for SecureEnclaveSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Err(BackendError::Unusable(format!(
            "slot \"{}\": {NO_SECURE_ENCLAVE}",
            self.label
        )))
    }

    fn diagnose(&self) -> Diagnosis {
        Diagnosis::unreachable(
            Some(ProtectionClass::HardwareSecureEnclave),
            NO_SECURE_ENCLAVE,
            "remove this slot, or use backend = \"tpm\" or \"software\" on this machine",
        )
    }
}

#[cfg(not(all(feature = "tpm", target_os = "linux")))]
impl SlotStore for crate::config::TpmSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Err(BackendError::Unusable(format!(
            "slot \"{}\": this build has no TPM support (build with --features tpm, on Linux)",
            self.label
        )))
    }

    fn diagnose(&self) -> Diagnosis {
        Diagnosis::unreachable(
            None,
            "this build has no TPM support",
            "build with `cargo build --release --features tpm` (Linux)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SlotConfig};

    #[test]
    fn a_secure_enclave_slot_is_unreachable_with_the_reason() {
        let config = Config::from_toml("[[slot]]\nbackend = \"secure_enclave\"\n").unwrap();
        let err = super::super::open(&config.slots[0])
            .err()
            .expect("no store");
        assert!(err.to_string().contains(NO_SECURE_ENCLAVE), "{err}");
        let d = super::super::diagnose(&config.slots[0]);
        assert!(!d.reachable);
        assert_eq!(d.detail, NO_SECURE_ENCLAVE);
        assert!(d.fix.is_some());
    }

    #[test]
    fn a_broken_slot_opens_to_its_problem() {
        let config = Config::from_toml("[[slot]]\nbackend = \"software\"\ntcti = \"x\"\n").unwrap();
        assert!(matches!(config.slots[0], SlotConfig::Broken(_)));
        let err = super::super::open(&config.slots[0])
            .err()
            .expect("no store");
        assert!(matches!(err, BackendError::Unusable(_)));
        assert!(err.to_string().contains("`tcti`"), "{err}");
        let d = super::super::diagnose(&config.slots[0]);
        assert!(!d.reachable);
        assert!(d.detail.contains("`tcti`"), "{}", d.detail);
        assert!(d.fix.unwrap().contains("remove `tcti`"));
    }
}
