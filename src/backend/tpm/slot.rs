//! The TPM store as a `[[slot]] backend = "tpm"` selects it: opened from its slot struct, and
//! diagnosed for `devicekey doctor` (the TPM is asked who it is; nothing is created in it).

use std::sync::Arc;

use super::{probe, SrkSource, TpmBackend, TpmConfig, PERSISTENT_SRK};
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
                    "TPM at {} ({}, {}, firmware {}{}), keys in {}; {}",
                    probe.tcti,
                    id.manufacturer,
                    id.vendor,
                    id.firmware,
                    if id.simulator { ", a simulator" } else { "" },
                    config.dir.display(),
                    srk_note(&id.srk, &self.label)
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

/// What doctor says about the SRK: the persistent one in use, or how to persist it.
fn srk_note(srk: &SrkSource, label: &str) -> String {
    match srk {
        SrkSource::Persistent => format!("persistent SRK at {PERSISTENT_SRK:#x} in use"),
        SrkSource::Derived(why) if why.starts_with("no persistent object") => format!(
            "no persistent SRK: each process derives it (TPM2_CreatePrimary); persist it with \
             `devicekey tpm persist-srk --slot {label}` (owner authorization from the slot's \
             owner_auth_env or owner_auth_file)"
        ),
        SrkSource::Derived(why) => {
            format!("persistent SRK not used ({why}); each process derives it (TPM2_CreatePrimary)")
        }
    }
}
