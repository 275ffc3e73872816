//! `devicekey pin`: the user PIN of a `[[slot]]` with `login = "pin"`.
//!
//! `set` gives a slot its first PIN (and re-protects the keys it already holds); `change` replaces
//! it; `status` prints what the token flags say. PINs come from a file (`--pin-file`,
//! `--old-pin-file`, `--new-pin-file`, mode 0600) or are typed on the terminal (twice for a new
//! PIN), never from an argument. The store enforces the PIN (see `crate::backend::pin`); this
//! command opens the store directly, as the module would, so no other process needs to run.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::{secret, slot_by_label, Result, ToolError};
use crate::backend::pin::{PinGuard, MAX_PIN_LEN, MIN_PIN_LEN};
use crate::backend::Backend;
use crate::config::Config;

/// `devicekey pin ...`.
#[derive(Args, Debug)]
pub struct PinArgs {
    #[command(subcommand)]
    command: PinCommand,
}

#[derive(Subcommand, Debug)]
enum PinCommand {
    /// Give a slot its first user PIN (the slot's `login = "pin"`); its keys are re-protected.
    Set(SetArgs),
    /// Change the user PIN of a slot.
    Change(ChangeArgs),
    /// Print whether a PIN is set, the tries left and whether it is locked.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
struct SetArgs {
    /// The label of the slot.
    #[arg(long)]
    slot: String,
    /// A file (mode 0600) holding the new PIN; without it, the PIN is asked on the terminal.
    #[arg(long)]
    pin_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ChangeArgs {
    /// The label of the slot.
    #[arg(long)]
    slot: String,
    /// A file (mode 0600) holding the current PIN; without it, it is asked on the terminal.
    #[arg(long)]
    old_pin_file: Option<PathBuf>,
    /// A file (mode 0600) holding the new PIN; without it, it is asked on the terminal.
    #[arg(long)]
    new_pin_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// The label of the slot.
    #[arg(long)]
    slot: String,
}

impl PinArgs {
    /// Runs the subcommand; returns what to print.
    pub fn run(&self, config: &Config) -> Result<String> {
        match &self.command {
            PinCommand::Set(a) => {
                let store = open(config, &a.slot)?;
                let guard = guard(&*store, &a.slot)?;
                if status(guard)?.initialized {
                    return Err(ToolError::Usage(format!(
                        "slot {:?} already has a PIN; use `devicekey pin change`",
                        a.slot
                    )));
                }
                let new = new_pin(a.pin_file.as_deref(), "--pin-file")?;
                guard.set_pin(None, &new).map_err(token)?;
                Ok(format!("slot {:?} now has a user PIN", a.slot))
            }
            PinCommand::Change(a) => {
                let store = open(config, &a.slot)?;
                let guard = guard(&*store, &a.slot)?;
                if !status(guard)?.initialized {
                    return Err(ToolError::Usage(format!(
                        "slot {:?} has no PIN yet; use `devicekey pin set`",
                        a.slot
                    )));
                }
                let old = match &a.old_pin_file {
                    Some(path) => secret::from_file("the PIN file", path)?,
                    None => secret::prompt("Current PIN", false, "--old-pin-file")?,
                };
                let new = new_pin(a.new_pin_file.as_deref(), "--new-pin-file")?;
                guard.set_pin(Some(&old), &new).map_err(token)?;
                Ok(format!("the user PIN of slot {:?} is changed", a.slot))
            }
            PinCommand::Status(a) => {
                let store = open(config, &a.slot)?;
                let s = status(guard(&*store, &a.slot)?)?;
                let tries = s
                    .tries_left
                    .map_or("unknown".to_string(), |t| format!("{t} of {}", s.max_tries));
                Ok(format!(
                    "slot {:?}: PIN {}, tries left {tries}{}",
                    a.slot,
                    if s.initialized { "set" } else { "not set" },
                    if s.locked { ", LOCKED" } else { "" }
                ))
            }
        }
    }
}

fn open(config: &Config, label: &str) -> Result<std::sync::Arc<dyn Backend>> {
    crate::backend::open(slot_by_label(config, label)?).map_err(token)
}

fn guard<'a>(store: &'a dyn Backend, label: &str) -> Result<&'a dyn PinGuard> {
    store.pin().ok_or_else(|| {
        ToolError::Usage(format!(
            "slot {label:?} has no user PIN: add login = \"pin\" to its [[slot]] first"
        ))
    })
}

fn status(guard: &dyn PinGuard) -> Result<crate::backend::pin::PinStatus> {
    guard.status().map_err(token)
}

fn token(e: crate::backend::BackendError) -> ToolError {
    ToolError::Token(e.to_string())
}

/// A new PIN from `file`, else typed twice; its length checked.
fn new_pin(file: Option<&std::path::Path>, option: &str) -> Result<Zeroizing<Vec<u8>>> {
    let pin = match file {
        Some(path) => secret::from_file("the PIN file", path)?,
        None => secret::prompt("New PIN", true, option)?,
    };
    if !(MIN_PIN_LEN..=MAX_PIN_LEN).contains(&pin.len()) {
        return Err(ToolError::Usage(format!(
            "a PIN has {MIN_PIN_LEN} to {MAX_PIN_LEN} bytes; this one has {}",
            pin.len()
        )));
    }
    Ok(pin)
}
