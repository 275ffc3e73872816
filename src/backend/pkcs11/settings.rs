//! The options of a pkcs11 key store, read from its `[[slot]]` struct ([`Pkcs11Slot`]), checked
//! (each missing or wrong option is reported with its fix) and resolved (PIN read from its source
//! by [`crate::p11::pin`]).

use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::backend::ProtectionClass;
use crate::config::Pkcs11Slot;
use crate::p11::{Error, Kind};

/// What a pkcs11 slot needs, checked.
pub(super) struct Settings {
    /// Our token label (the slot's `label`).
    pub slot_label: String,
    /// The wrapped module as configured.
    pub module: PathBuf,
    /// The wrapped token's label.
    pub token: String,
    /// The wrapped token's user PIN, when the slot names a source.
    pub pin: Option<Zeroizing<String>>,
    /// Where the PIN comes from, for messages ("environment variable X", "file F").
    pub pin_source: String,
    /// The class the operator declares.
    pub class: ProtectionClass,
}

const CLASSES: &str = "hardware_tpm, hardware_secure_enclave or os_protected_nonextractable";

impl Settings {
    /// Checks a `[[slot]]` with `backend = "pkcs11"`. Never logs or returns the PIN.
    pub(super) fn from_config(config: &Pkcs11Slot) -> Result<Self, Error> {
        let slot_label = config.label.clone();
        let class = match config.protection_class.as_deref() {
            None => {
                return Err(Error::new(
                    Kind::Unusable,
                    format!("slot '{slot_label}': a pkcs11 slot must declare its protection_class"),
                    format!("add `protection_class = \"...\"` ({CLASSES}) to the slot"),
                ))
            }
            Some(s) => ProtectionClass::parse(s).ok_or_else(|| {
                Error::new(
                    Kind::Unusable,
                    format!("slot '{slot_label}': unknown protection_class \"{s}\""),
                    format!("use one of {CLASSES}"),
                )
            })?,
        };
        let module = config.module.clone().ok_or_else(|| {
            Error::new(
                Kind::Unusable,
                format!("slot '{slot_label}': a pkcs11 slot needs the wrapped module's path"),
                "add `module = \"/path/to/module.so\"` (e.g. /usr/lib/softhsm/libsofthsm2.so) to the slot",
            )
        })?;
        let token = config
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::new(
                    Kind::Unusable,
                    format!("slot '{slot_label}': a pkcs11 slot needs the wrapped token's label"),
                    "add `token = \"<label of the token>\"` to the slot (tokens are chosen by label, never by slot id)",
                )
            })?;
        let pin = crate::p11::pin::read(
            &format!("slot '{slot_label}'"),
            config.pin_env.as_deref(),
            config.pin_file.as_deref(),
        )?;
        let pin_source = pin
            .as_ref()
            .map_or_else(|| "no PIN source".to_string(), |p| p.source.clone());
        let pin = pin.map(|p| p.secret);
        Ok(Self {
            slot_label,
            module,
            token,
            pin,
            pin_source,
            class,
        })
    }
}
