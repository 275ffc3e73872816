//! `devicekey tpm`: TPM housekeeping for a `[[slot]] backend = "tpm"`.
//!
//! `devicekey tpm persist-srk --slot LABEL` derives the storage root key from the standard ECC
//! P-256 template and makes it persistent at `0x81000001` (TPM2_EvictControl), so that no process
//! has to run TPM2_CreatePrimary any more. It needs the owner hierarchy's authorization, read
//! from the slot's `owner_auth_env` or `owner_auth_file` (never from the command line; empty
//! when neither is set). It refuses when another object holds `0x81000001`.

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::{Result, ToolError};
use crate::backend::tpm::{persist_srk, PersistOutcome, TpmConfig, PERSISTENT_SRK};
use crate::config::{Config, SlotConfig, TpmSlot};

/// `devicekey tpm ...`.
#[derive(Args, Debug)]
pub struct TpmArgs {
    #[command(subcommand)]
    command: TpmCommand,
}

#[derive(Subcommand, Debug)]
enum TpmCommand {
    /// Make the standard SRK persistent at 0x81000001 (owner authorization from the slot's
    /// owner_auth_env or owner_auth_file).
    PersistSrk(PersistSrkArgs),
}

#[derive(Args, Debug)]
struct PersistSrkArgs {
    /// The label of the TPM slot.
    #[arg(long)]
    slot: String,
}

impl TpmArgs {
    /// Runs the subcommand; returns what to print.
    pub fn run(&self, config: &Config) -> Result<String> {
        match &self.command {
            TpmCommand::PersistSrk(a) => a.run(config),
        }
    }
}

impl PersistSrkArgs {
    fn run(&self, config: &Config) -> Result<String> {
        let slot = tpm_slot(config, &self.slot)?;
        let auth = owner_auth(slot)?;
        let tcti = TpmConfig::from_slot(slot).tcti;
        match persist_srk(&tcti, &auth).map_err(|e| ToolError::Token(e.to_string()))? {
            PersistOutcome::Persisted => Ok(format!(
                "the SRK is now persistent at {PERSISTENT_SRK:#x} on the TPM at {tcti}"
            )),
            PersistOutcome::AlreadyThere => Ok(format!(
                "the standard SRK is already persistent at {PERSISTENT_SRK:#x} on the TPM at {tcti}"
            )),
        }
    }
}

/// The TPM slot labelled `label`.
fn tpm_slot<'a>(config: &'a Config, label: &str) -> Result<&'a TpmSlot> {
    match super::slot_by_label(config, label)? {
        SlotConfig::Tpm(slot) => Ok(slot),
        _ => Err(ToolError::Usage(format!(
            "slot {label:?} is not a TPM slot (backend = \"tpm\")"
        ))),
    }
}

/// The owner authorization the slot names (empty when it names none).
fn owner_auth(slot: &TpmSlot) -> Result<Zeroizing<Vec<u8>>> {
    let who = format!("slot {:?}", slot.label);
    match (&slot.owner_auth_env, &slot.owner_auth_file) {
        (Some(_), Some(_)) => Err(ToolError::Usage(format!(
            "{who}: both owner_auth_env and owner_auth_file are set; keep one"
        ))),
        (Some(var), None) => match std::env::var_os(var) {
            Some(v) if !v.is_empty() => {
                use std::os::unix::ffi::OsStringExt;
                Ok(Zeroizing::new(v.into_vec()))
            }
            _ => Err(ToolError::Usage(format!(
                "{who}: the owner authorization variable {var} (owner_auth_env) is not set"
            ))),
        },
        (None, Some(path)) => {
            super::secret::from_file(&format!("{who}: the owner authorization file"), path)
        }
        (None, None) => Ok(Zeroizing::new(Vec::new())),
    }
}
