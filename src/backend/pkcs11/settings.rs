//! The options of a pkcs11 key store, read from its `[[slot]]` struct ([`Pkcs11Slot`]), checked
//! (each missing or wrong option is reported with its fix) and resolved (PIN read from its
//! source).

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::errors::Failure;
use crate::backend::{BackendError, ProtectionClass};
use crate::config::Pkcs11Slot;

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
    pub(super) fn from_config(config: &Pkcs11Slot) -> Result<Self, Failure> {
        let slot_label = config.label.clone();
        let class = match config.protection_class.as_deref() {
            None => {
                return Err(Failure::new(
                    BackendError::Unusable,
                    format!("slot '{slot_label}': a pkcs11 slot must declare its protection_class"),
                    format!("add `protection_class = \"...\"` ({CLASSES}) to the slot"),
                ))
            }
            Some(s) => ProtectionClass::parse(s).ok_or_else(|| {
                Failure::new(
                    BackendError::Unusable,
                    format!("slot '{slot_label}': unknown protection_class \"{s}\""),
                    format!("use one of {CLASSES}"),
                )
            })?,
        };
        let module = config.module.clone().ok_or_else(|| {
            Failure::new(
                BackendError::Unusable,
                format!("slot '{slot_label}': a pkcs11 slot needs the wrapped module's path"),
                "add `module = \"/path/to/module.so\"` (e.g. /usr/lib/softhsm/libsofthsm2.so) to the slot",
            )
        })?;
        let token = config
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure::new(
                    BackendError::Unusable,
                    format!("slot '{slot_label}': a pkcs11 slot needs the wrapped token's label"),
                    "add `token = \"<label of the token>\"` to the slot (tokens are chosen by label, never by slot id)",
                )
            })?;
        let (pin, pin_source) = match (&config.pin_env, &config.pin_file) {
            (Some(_), Some(_)) => {
                return Err(Failure::new(
                    BackendError::Unusable,
                    format!("slot '{slot_label}': both pin_env and pin_file are set"),
                    "keep only one of pin_env and pin_file",
                ))
            }
            (Some(var), None) => (
                Some(pin_from_env(&slot_label, var)?),
                format!("environment variable {var}"),
            ),
            (None, Some(path)) => (
                Some(pin_from_file(&slot_label, path)?),
                format!("file {}", path.display()),
            ),
            (None, None) => (None, "no PIN source".to_string()),
        };
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

fn pin_from_env(slot: &str, var: &str) -> Result<Zeroizing<String>, Failure> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Zeroizing::new(v)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Err(Failure::new(
            BackendError::Auth,
            format!("slot '{slot}': the PIN variable {var} (pin_env) is not set"),
            format!(
                "export {var}=<PIN of the wrapped token> in the environment of the application"
            ),
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err(Failure::new(
            BackendError::Auth,
            format!("slot '{slot}': the PIN variable {var} (pin_env) is not valid UTF-8"),
            format!("set {var} to the PIN as text"),
        )),
    }
}

fn pin_from_file(slot: &str, path: &std::path::Path) -> Result<Zeroizing<String>, Failure> {
    let text = std::fs::read(path).map(Zeroizing::new).map_err(|e| {
        Failure::new(
            BackendError::Auth,
            format!(
                "slot '{slot}': cannot read the PIN file {} (pin_file): {e}",
                path.display()
            ),
            format!(
                "create {} (mode 0600) holding the wrapped token's PIN",
                path.display()
            ),
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "slot '{slot}': the PIN file {} is readable by others; chmod 600 it",
                    path.display()
                );
            }
        }
    }
    let mut end = text.len();
    while end > 0 && matches!(text[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    let pin = std::str::from_utf8(&text[..end]).map_err(|_| {
        Failure::new(
            BackendError::Auth,
            format!(
                "slot '{slot}': the PIN file {} is not UTF-8 text",
                path.display()
            ),
            "write the PIN as text (one line)",
        )
    })?;
    if pin.is_empty() {
        return Err(Failure::new(
            BackendError::Auth,
            format!("slot '{slot}': the PIN file {} is empty", path.display()),
            "write the wrapped token's PIN into it",
        ));
    }
    Ok(Zeroizing::new(pin.to_string()))
}
