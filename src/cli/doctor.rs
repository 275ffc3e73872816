//! `devicekey doctor`: which config file the module uses, and for each configured slot its label,
//! backend, protection class, whether its key store is reachable, and the fix when it is not.
//!
//! The slots are opened the way the module opens them (software store, TPM probe, the wrapped
//! PKCS#11 token found by label and logged in), but nothing is signed or changed, except that a
//! missing software key directory is created (0700), as the module would. Nothing here prints:
//! [`DoctorReport`] implements `Display` and the binary writes it; the exit code follows
//! [`DoctorReport::healthy`]. A PIN is never shown.

use std::fmt;
use std::path::PathBuf;

use crate::backend::{Backend, BackendError, ProtectionClass};
use crate::config::{BackendKind, Config, ConfigError, SlotConfig};

/// `devicekey doctor`.
#[derive(clap::Args, Debug, Default)]
pub struct DoctorArgs {
    /// Check this config file instead of the one the module would use
    /// ($DEVICEKEY_CONFIG, else $XDG_CONFIG_HOME/devicekey/config.toml, else /etc/devicekey/config.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DoctorArgs {
    /// Loads the config and checks every slot.
    pub fn run(self) -> DoctorReport {
        let loaded = match &self.config {
            Some(path) => Config::from_file(path).map(|c| (c, "--config")),
            None => Config::load().map(|c| {
                let from = if std::env::var_os("DEVICEKEY_CONFIG").is_some_and(|v| !v.is_empty()) {
                    "DEVICEKEY_CONFIG"
                } else {
                    "the default search"
                };
                (c, from)
            }),
        };
        match loaded {
            Ok((config, from)) => DoctorReport {
                config: ConfigStatus::Loaded {
                    path: config.source.clone(),
                    from,
                },
                slots: config
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| check_slot(i, s))
                    .collect(),
            },
            Err(e) => DoctorReport {
                config: ConfigStatus::Broken {
                    fix: config_fix(&e),
                    problem: e.to_string(),
                },
                slots: Vec::new(),
            },
        }
    }
}

/// Which config was used, or why none could be.
#[derive(Clone, Debug)]
pub enum ConfigStatus {
    /// A config was read (`path` `None`: no file, the built-in default).
    Loaded {
        /// The file.
        path: Option<PathBuf>,
        /// How it was chosen.
        from: &'static str,
    },
    /// The config could not be read.
    Broken {
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
}

/// One slot, checked.
#[derive(Clone, Debug)]
pub struct SlotReport {
    /// The slot number (its position in the config; the PKCS#11 slot id).
    pub index: usize,
    /// The token label.
    pub label: String,
    /// `software`, `tpm`, `pkcs11` or `secure_enclave`.
    pub backend: &'static str,
    /// The class its keys get (`None` when it cannot be told).
    pub protection_class: Option<ProtectionClass>,
    /// True when the key store opened.
    pub reachable: bool,
    /// What was found, or what went wrong.
    pub detail: String,
    /// What to do when not reachable.
    pub fix: Option<String>,
}

/// What `devicekey doctor` found.
#[derive(Clone, Debug)]
pub struct DoctorReport {
    /// The config.
    pub config: ConfigStatus,
    /// Every configured slot, in order.
    pub slots: Vec<SlotReport>,
}

impl DoctorReport {
    /// True when the config was read and every slot is reachable.
    pub fn healthy(&self) -> bool {
        matches!(self.config, ConfigStatus::Loaded { .. }) && self.slots.iter().all(|s| s.reachable)
    }

    /// A one-line summary of what is wrong (`None` when healthy).
    pub fn problem_summary(&self) -> Option<String> {
        if let ConfigStatus::Broken { .. } = self.config {
            return Some("the config cannot be used".into());
        }
        let bad: Vec<&str> = self
            .slots
            .iter()
            .filter(|s| !s.reachable)
            .map(|s| s.label.as_str())
            .collect();
        (!bad.is_empty()).then(|| {
            format!(
                "{} of {} slot(s) not reachable: {}",
                bad.len(),
                self.slots.len(),
                bad.join(", ")
            )
        })
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.config {
            ConfigStatus::Loaded {
                path: Some(path),
                from,
            } => writeln!(f, "config: {} (chosen by {from})", path.display())?,
            ConfigStatus::Loaded { path: None, .. } => writeln!(
                f,
                "config: none found ($DEVICEKEY_CONFIG, $XDG_CONFIG_HOME/devicekey/config.toml, \
                 /etc/devicekey/config.toml); using the built-in default"
            )?,
            ConfigStatus::Broken { problem, fix } => {
                writeln!(f, "config: NOT usable")?;
                writeln!(f, "  problem: {problem}")?;
                write!(f, "  fix:     {fix}")?;
                return Ok(());
            }
        }
        for s in &self.slots {
            writeln!(f)?;
            writeln!(f, "slot {}: {}", s.index, s.label)?;
            writeln!(f, "  backend:          {}", s.backend)?;
            writeln!(
                f,
                "  protection class: {}",
                s.protection_class
                    .map_or("unknown", ProtectionClass::as_str)
            )?;
            if s.reachable {
                writeln!(f, "  reachable:        yes")?;
                writeln!(f, "  found:            {}", s.detail)?;
            } else {
                writeln!(f, "  reachable:        NO")?;
                writeln!(f, "  problem:          {}", s.detail)?;
                if let Some(fix) = &s.fix {
                    writeln!(f, "  fix:              {fix}")?;
                }
            }
        }
        writeln!(f)?;
        let ok = self.slots.iter().filter(|s| s.reachable).count();
        write!(
            f,
            "{} slot(s): {ok} reachable, {} not reachable",
            self.slots.len(),
            self.slots.len() - ok
        )
    }
}

fn config_fix(e: &ConfigError) -> String {
    match e {
        ConfigError::NotFound(_) => {
            "create the file, or unset DEVICEKEY_CONFIG to use the default search".into()
        }
        ConfigError::Read { path, .. } => {
            format!("make {} readable by this user", path.display())
        }
        ConfigError::Invalid { path, .. } => format!(
            "correct {} (see the README for the [[slot]] keys: label, backend, dir, tcti, \
             allow_simulator, module, token, pin_env, pin_file, protection_class)",
            path.display()
        ),
    }
}

/// Splits a message that carries its own fix (`...; fix: ...` or `... Fix: ...`).
fn split_fix(msg: &str) -> (String, Option<String>) {
    for sep in ["; fix: ", ". Fix: ", " Fix: "] {
        if let Some((problem, fix)) = msg.split_once(sep) {
            return (problem.to_string(), Some(fix.to_string()));
        }
    }
    (msg.to_string(), None)
}

fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Software => "software",
        BackendKind::Tpm => "tpm",
        BackendKind::Pkcs11 => "pkcs11",
        BackendKind::SecureEnclave => "secure_enclave",
    }
}

fn check_slot(index: usize, slot: &SlotConfig) -> SlotReport {
    let label = slot.label.clone().unwrap_or_else(|| "devicekey".into());
    let mut report = SlotReport {
        index,
        label: label.clone(),
        backend: backend_name(slot.backend),
        protection_class: None,
        reachable: false,
        detail: String::new(),
        fix: None,
    };
    match slot.backend {
        BackendKind::Software => check_software(&mut report, slot),
        BackendKind::Pkcs11 => {
            let probe = crate::backend::pkcs11::probe(slot);
            report.protection_class = probe.protection_class;
            report.reachable = probe.reachable;
            report.detail = probe.detail;
            report.fix = probe.fix;
        }
        BackendKind::Tpm => check_tpm(&mut report, slot),
        BackendKind::SecureEnclave => {
            report.protection_class = Some(ProtectionClass::HardwareSecureEnclave);
            report.detail = "the Secure Enclave exists only on macOS".into();
            report.fix = Some(
                "remove this slot, or use backend = \"tpm\" or \"software\" on this machine".into(),
            );
        }
    }
    report
}

fn check_software(report: &mut SlotReport, slot: &SlotConfig) {
    use crate::backend::software::SoftwareStore;
    report.protection_class = Some(ProtectionClass::OsProtectedNonextractable);
    let dir = slot
        .dir
        .clone()
        .unwrap_or_else(crate::config::default_data_dir);
    match SoftwareStore::open(&report.label, Some(&dir)) {
        Ok(store) => {
            report.reachable = true;
            report.detail = match store.load_keys() {
                Ok(keys) => format!("keys in {}, {} key(s)", dir.display(), keys.len()),
                Err(e) => format!("keys in {} (not listed: {e})", dir.display()),
            };
        }
        Err(e) => {
            let (problem, fix) = match &e {
                BackendError::Unusable(m) | BackendError::Io(m) | BackendError::Full(m) => {
                    split_fix(m)
                }
                other => (other.to_string(), None),
            };
            report.detail = problem;
            report.fix = Some(fix.unwrap_or_else(|| match e {
                BackendError::Full(_) => {
                    "free space on the file system of the key directory".into()
                }
                _ => format!(
                    "make {} a directory you own with mode 0700, or set the slot's `dir` elsewhere",
                    dir.display()
                ),
            }));
        }
    }
}

#[cfg(all(feature = "tpm", target_os = "linux"))]
fn check_tpm(report: &mut SlotReport, slot: &SlotConfig) {
    let config = crate::backend::tpm::TpmConfig::from_slot(slot);
    let probe = crate::backend::tpm::probe(&config.tcti, config.allow_simulator);
    report.protection_class = probe.class;
    report.reachable = probe.reachable();
    match (&probe.identity, &probe.error) {
        (Some(id), _) => {
            report.detail = format!(
                "TPM at {} ({}, {}, firmware {}{}), keys in {}",
                probe.tcti,
                id.manufacturer,
                id.vendor,
                id.firmware,
                if id.simulator { ", a simulator" } else { "" },
                config.dir.display()
            );
        }
        (None, error) => {
            let msg = error.clone().unwrap_or_else(|| "no answer".into());
            let (problem, fix) = split_fix(&msg);
            report.detail = format!("TPM at {}: {problem}", probe.tcti);
            report.fix = Some(fix.unwrap_or_else(|| {
                "check that the TPM (or swtpm) is running and that `tcti` names it \
                 (e.g. device:/dev/tpmrm0); you need access to the device"
                    .into()
            }));
        }
    }
}

#[cfg(not(all(feature = "tpm", target_os = "linux")))]
fn check_tpm(report: &mut SlotReport, _slot: &SlotConfig) {
    report.detail = "this build has no TPM support".into();
    report.fix = Some("build with `cargo build --release --features tpm`".into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_is_split_from_messages_that_carry_one() {
        assert_eq!(
            split_fix("no token; fix: create it"),
            ("no token".to_string(), Some("create it".to_string()))
        );
        assert_eq!(
            split_fix("mode 0777; refusing it. Fix: `chmod 700 d`"),
            (
                "mode 0777; refusing it".to_string(),
                Some("`chmod 700 d`".to_string())
            )
        );
        assert_eq!(split_fix("plain"), ("plain".to_string(), None));
    }

    #[test]
    fn secure_enclave_slot_is_not_reachable_here() {
        let config = Config::from_toml("[[slot]]\nbackend = \"secure_enclave\"\n").unwrap();
        let r = check_slot(0, &config.slots[0]);
        assert!(!r.reachable);
        assert!(r.fix.is_some());
        assert_eq!(r.backend, "secure_enclave");
    }
}
