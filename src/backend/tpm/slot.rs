//! The TPM store as a `[[slot]] backend = "tpm"` selects it: opened from its slot struct, and
//! diagnosed for `devicekey doctor` (the TPM is asked who it is; nothing is created in it).

use std::sync::Arc;

use super::{probe, TpmBackend, TpmConfig};
use crate::backend::{split_fix, Backend, Diagnosis, Result, SlotStore};
use crate::config::TpmSlot;

impl SlotStore for TpmSlot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(TpmBackend::from_slot(self)?))
    }

    fn diagnose(&self) -> Diagnosis {
        let config = TpmConfig::from_slot(self);
        let probe = probe(&config.tcti, config.allow_simulator);
        match (&probe.identity, probe.class) {
            (Some(id), Some(class)) => Diagnosis::reachable(
                class,
                format!(
                    "TPM at {} ({}, {}, firmware {}{}), keys in {}",
                    probe.tcti,
                    id.manufacturer,
                    id.vendor,
                    id.firmware,
                    if id.simulator { ", a simulator" } else { "" },
                    config.dir.display()
                ),
            ),
            _ => {
                let msg = probe.error.clone().unwrap_or_else(|| "no answer".into());
                let (problem, fix) = split_fix(&msg);
                Diagnosis::unreachable(
                    None,
                    format!("TPM at {}: {problem}", probe.tcti),
                    fix.unwrap_or_else(|| {
                        "check that the TPM (or swtpm) is running and that `tcti` names it \
                         (e.g. device:/dev/tpmrm0); you need access to the device"
                            .into()
                    }),
                )
            }
        }
    }
}
