//! `devicekey doctor`: which config file the module uses, the proof policy it enforces (allowed
//! origin hosts, longest proof lifetime), and for each configured slot its label, backend,
//! protection class, whether its key store is reachable, and the fix when it is not.
//!
//! Each slot is diagnosed by its own store (`crate::backend::diagnose`: the software store
//! opened, the TPM asked who it is, the wrapped PKCS#11 token found by label and logged in) and
//! printed in one shape. Nothing is signed or changed, except that a missing software key
//! directory is created (0700), as the module would. Nothing here prints:
//! [`DoctorReport`] implements `Display` and the binary writes it; the exit code follows
//! [`DoctorReport::problem_summary`]. A PIN is never shown.

use std::fmt;
use std::path::PathBuf;

use crate::backend::{BackendKind, ProtectionClass};
use crate::config::{Config, ConfigError, SlotConfig};
use crate::proof::ProofPolicy;

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
                    policy: ProofPolicy::from_config(&config.server),
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
        /// The proof policy the token enforces under this config (its `[server]` table).
        policy: ProofPolicy,
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
    /// The backend the slot names.
    pub backend: BackendKind,
    /// The class its keys get (`None` when it cannot be told).
    pub protection_class: Option<ProtectionClass>,
    /// True when the key store opened.
    pub reachable: bool,
    /// What was found, or what went wrong.
    pub detail: String,
    /// What to do when not reachable.
    pub fix: Option<String>,
    /// The user PIN's state, for a slot with `login = "pin"` whose store opened.
    pub pin: Option<String>,
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
    /// A one-line summary of what is wrong; `None` when the config was read and every slot is
    /// reachable (the exit code is 0 then, 1 otherwise).
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
        let (path, policy) = match &self.config {
            ConfigStatus::Loaded {
                path: Some(path),
                from,
                policy,
            } => {
                writeln!(f, "config: {} (chosen by {from})", path.display())?;
                (Some(path), policy)
            }
            ConfigStatus::Loaded {
                path: None, policy, ..
            } => {
                writeln!(
                    f,
                    "config: none found ($DEVICEKEY_CONFIG, $XDG_CONFIG_HOME/devicekey/config.toml, \
                     /etc/devicekey/config.toml); using the built-in default"
                )?;
                let (_, why) = crate::backend::secure_enclave::default_store(
                    cfg!(target_os = "macos"),
                    crate::backend::secure_enclave::has_secure_enclave(),
                );
                writeln!(f, "  default key store: {why}")?;
                (None, policy)
            }
            ConfigStatus::Broken { problem, fix } => {
                writeln!(f, "config: NOT usable")?;
                writeln!(f, "  problem: {problem}")?;
                write!(f, "  fix:     {fix}")?;
                return Ok(());
            }
        };
        writeln!(f)?;
        writeln!(
            f,
            "proof policy (from {}; enforced by every process that reads this config):",
            path.map_or("the built-in default".to_string(), |p| p
                .display()
                .to_string())
        )?;
        writeln!(
            f,
            "  allowed origin hosts: {} (https, and their subdomains; plus localhost and loopback IPs)",
            if policy.allowed_origin_hosts.is_empty() {
                "none".to_string()
            } else {
                policy.allowed_origin_hosts.join(", ")
            }
        )?;
        writeln!(f, "  max proof TTL:        {} s", policy.max_ttl_seconds)?;
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
                if let Some(pin) = &s.pin {
                    writeln!(f, "  user PIN:         {pin}")?;
                }
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
        ConfigError::Unsafe { path, .. } => format!(
            "make {} and its directory yours (or root's) and not writable by group or others: \
             `chmod go-w {}`",
            path.display(),
            path.display()
        ),
        ConfigError::Invalid { path, .. } => format!(
            "correct {} (see the README's Configuration section: each [[slot]] names its \
             `backend`, one of {})",
            path.display(),
            BackendKind::ALL.map(BackendKind::as_str).join(", ")
        ),
    }
}

fn check_slot(index: usize, slot: &SlotConfig) -> SlotReport {
    let d = crate::backend::diagnose(slot);
    let pin =
        (d.reachable && slot.login() == crate::config::LoginMode::Pin).then(|| pin_state(slot));
    SlotReport {
        pin,
        index,
        label: slot.label().to_string(),
        backend: slot.kind(),
        protection_class: d.protection_class,
        reachable: d.reachable,
        detail: d.detail,
        fix: d.fix,
    }
}

/// What the store says of its user PIN, in one line (never the PIN).
fn pin_state(slot: &SlotConfig) -> String {
    let status = crate::backend::open(slot).and_then(|store| match store.pin() {
        Some(guard) => guard.status().map(Some),
        None => Ok(None),
    });
    match status {
        Ok(Some(s)) if !s.initialized => format!(
            "not set yet; set it with `devicekey pin set --slot {}`",
            slot.label()
        ),
        Ok(Some(s)) => {
            let tries = s
                .tries_left
                .map_or("unknown".to_string(), |t| format!("{t} of {}", s.max_tries));
            let locked = if s.locked { "; LOCKED" } else { "" };
            format!("set; wrong tries left: {tries}{locked}")
        }
        Ok(None) => "the store has no PIN support".to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_enclave_slot_is_not_reachable_here() {
        let config = Config::from_toml("[[slot]]\nbackend = \"secure_enclave\"\n").unwrap();
        let r = check_slot(0, &config.slots[0]);
        assert!(!r.reachable);
        assert!(r.fix.is_some());
        assert_eq!(r.backend, "secure_enclave");
        assert!(r.detail.contains("needs macOS"), "{}", r.detail);
    }

    #[test]
    fn the_policy_in_force_is_printed() {
        let mut config = Config::from_toml(
            "[[slot]]\nbackend = \"secure_enclave\"\n[server]\nallowed_origin_hosts = [\"a.example\", \"b.example\"]\nmax_proof_ttl_seconds = 42\n",
        )
        .unwrap();
        config.source = Some("/etc/dk.toml".into());
        let report = DoctorReport {
            config: ConfigStatus::Loaded {
                path: config.source.clone(),
                from: "--config",
                policy: ProofPolicy::from_config(&config.server),
            },
            slots: vec![check_slot(0, &config.slots[0])],
        };
        let text = report.to_string();
        assert!(text.contains("proof policy (from /etc/dk.toml;"), "{text}");
        assert!(
            text.contains("allowed origin hosts: a.example, b.example"),
            "{text}"
        );
        assert!(text.contains("max proof TTL:        42 s"), "{text}");
    }
}
