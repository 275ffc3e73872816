//! Slots this build cannot serve: a slot whose options are wrong, and a TPM slot in a build
//! without TPM support. Each opens to a clear error, and the doctor shows the same error with its
//! fix.

use std::sync::Arc;

use super::{Backend, BackendError, Diagnosis, Result, SlotStore};
use crate::config::BrokenSlot;

impl SlotStore for BrokenSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Err(BackendError::Unusable(self.problem.clone()))
    }

    fn diagnose(&self) -> Diagnosis {
        Diagnosis::unreachable(None, self.problem.clone(), self.fix.clone())
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
