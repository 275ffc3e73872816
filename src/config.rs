//! One TOML config file for the module and the server.
//!
//! Found at `$DEVICEKEY_CONFIG`, else `$XDG_CONFIG_HOME/devicekey/config.toml` (or
//! `~/.config/devicekey/config.toml`), else `/etc/devicekey/config.toml`. With no file, the
//! module serves one software slot in `$XDG_DATA_HOME/devicekey`. Unknown names are errors, so a
//! typo is reported instead of ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors while finding or reading the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `$DEVICEKEY_CONFIG` does not exist.
    #[error(
        "config not found at {0} (named by DEVICEKEY_CONFIG); create it or unset the variable"
    )]
    NotFound(PathBuf),
    /// The file exists but cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("config {path} is invalid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, from the parser.
        message: String,
    },
}

/// The kernel's TPM resource manager; its presence adds a TPM slot to the default config.
pub const DEFAULT_TPM_DEVICE: &str = "/dev/tpmrm0";

/// Which kind of key store a slot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Keys in an owner-only directory (`os_protected_nonextractable`).
    Software,
    /// Keys in a TPM 2.0.
    Tpm,
    /// Keys in another PKCS#11 token.
    Pkcs11,
    /// Keys in the Apple Secure Enclave.
    SecureEnclave,
}

/// One `[[slot]]`: one key store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// Token label; defaults to `devicekey` (then `devicekey-2`, ...).
    pub label: Option<String>,
    /// The backend.
    pub backend: BackendKind,
    /// Software and TPM stores: the key directory.
    pub dir: Option<PathBuf>,
    /// TPM: the TCTI string (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`).
    pub tcti: Option<String>,
    /// TPM: let a simulator report `hardware_tpm` (tests only).
    #[serde(default)]
    pub allow_simulator: bool,
    /// pkcs11: the wrapped module's path.
    pub module: Option<PathBuf>,
    /// pkcs11: the wrapped token's label.
    pub token: Option<String>,
    /// pkcs11: the environment variable holding the wrapped token's PIN.
    pub pin_env: Option<String>,
    /// pkcs11: a file holding the wrapped token's PIN.
    pub pin_file: Option<PathBuf>,
    /// pkcs11: the class the operator declares for the wrapped device.
    pub protection_class: Option<String>,
}

/// An extra module the server may use, with the class it declares.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerModuleConfig {
    /// The module's path.
    pub module: PathBuf,
    /// The token label within that module; any token when absent.
    pub token: Option<String>,
    /// The class the operator declares for that module's keys.
    pub protection_class: String,
    /// The environment variable holding the PIN.
    pub pin_env: Option<String>,
    /// A file holding the PIN.
    pub pin_file: Option<PathBuf>,
}

/// `[server]`: `devicekey serve`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The PKCS#11 module the server uses; default: our own.
    pub module: Option<PathBuf>,
    /// The class of a foreign module's keys (ours reports a class per slot).
    pub protection_class: Option<String>,
    /// The environment variable holding a foreign module's PIN.
    pub pin_env: Option<String>,
    /// A file holding a foreign module's PIN.
    pub pin_file: Option<PathBuf>,
    /// Extra modules, each with its declared class.
    #[serde(default)]
    pub modules: Vec<ServerModuleConfig>,
    /// Hosts (and their subdomains) that `https` target origins may name.
    #[serde(default = "default_origin_hosts")]
    pub allowed_origin_hosts: Vec<String>,
    /// The longest a proof may live, in seconds.
    #[serde(default = "default_max_ttl")]
    pub max_proof_ttl_seconds: u64,
    /// Requests handled at once; past it, `-32001`.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// The longest request line, in bytes.
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
}

fn default_origin_hosts() -> Vec<String> {
    vec!["chatgpt.com".into(), "chatgpt-staging.com".into()]
}
fn default_max_ttl() -> u64 {
    900
}
fn default_max_concurrent() -> usize {
    64
}
fn default_max_line() -> usize {
    1 << 20
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            module: None,
            protection_class: None,
            pin_env: None,
            pin_file: None,
            modules: Vec::new(),
            allowed_origin_hosts: default_origin_hosts(),
            max_proof_ttl_seconds: default_max_ttl(),
            max_concurrent_requests: default_max_concurrent(),
            max_line_bytes: default_max_line(),
        }
    }
}

/// The whole config.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The slots, in order. Empty means the default software slot.
    #[serde(default, rename = "slot")]
    pub slots: Vec<SlotConfig>,
    /// The server.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where the config came from (`None` for the built-in default).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Finds and reads the config as the module and the CLI do.
    pub fn load() -> Result<Self, ConfigError> {
        if let Some(path) = std::env::var_os("DEVICEKEY_CONFIG").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            if !path.exists() {
                return Err(ConfigError::NotFound(path));
            }
            return Self::from_file(&path);
        }
        for path in [
            user_config_path(),
            Some(PathBuf::from("/etc/devicekey/config.toml")),
        ]
        .into_iter()
        .flatten()
        {
            if path.exists() {
                return Self::from_file(&path);
            }
        }
        Ok(Self::default().with_defaults())
    }

    /// Reads one config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses config text; fills in defaults.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(config.with_defaults())
    }

    fn with_defaults(mut self) -> Self {
        if self.slots.is_empty() {
            let slot = |backend, label: Option<&str>| SlotConfig {
                label: label.map(str::to_string),
                backend,
                dir: None,
                tcti: None,
                allow_simulator: false,
                module: None,
                token: None,
                pin_env: None,
                pin_file: None,
                protection_class: None,
            };
            self.slots.push(slot(BackendKind::Software, None));
            // A machine with a TPM resource manager gets a TPM slot too.
            if cfg!(all(feature = "tpm", target_os = "linux"))
                && Path::new(DEFAULT_TPM_DEVICE).exists()
            {
                self.slots
                    .push(slot(BackendKind::Tpm, Some("devicekey-tpm")));
            }
        }
        let mut used = std::collections::HashSet::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.label.is_none() {
                let mut label = if i == 0 {
                    "devicekey".to_string()
                } else {
                    format!("devicekey-{}", i + 1)
                };
                while used.contains(&label) {
                    label.push('_');
                }
                slot.label = Some(label);
            }
            used.insert(slot.label.clone().unwrap_or_default());
        }
        self
    }
}

fn user_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("devicekey/config.toml"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/devicekey/config.toml"))
}

/// The default key directory: `$XDG_DATA_HOME/devicekey`, else `~/.local/share/devicekey`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("devicekey");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/devicekey"),
        None => PathBuf::from("/var/lib/devicekey"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_one_software_slot() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.slots.len(), 1);
        assert_eq!(c.slots[0].backend, BackendKind::Software);
        assert_eq!(c.slots[0].label.as_deref(), Some("devicekey"));
        assert_eq!(c.server.max_proof_ttl_seconds, 900);
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_toml(
            r#"
            [[slot]]
            label = "devicekey"
            backend = "software"
            dir = "/tmp/x"
            [[slot]]
            label = "hsm"
            backend = "pkcs11"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token = "t"
            pin_env = "HSM_PIN"
            protection_class = "hardware_tpm"
            [server]
            allowed_origin_hosts = ["example.com"]
            max_proof_ttl_seconds = 60
            "#,
        )
        .unwrap();
        assert_eq!(c.slots.len(), 2);
        assert_eq!(c.slots[1].backend, BackendKind::Pkcs11);
        assert_eq!(c.server.allowed_origin_hosts, vec!["example.com"]);
    }

    #[test]
    fn typo_is_an_error() {
        let e = Config::from_toml("[[slot]]\nbackend = \"software\"\ndirr = \"x\"\n").unwrap_err();
        assert!(e.contains("dirr"), "{e}");
    }
}
