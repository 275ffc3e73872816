//! One TOML config file for the module and the server.
//!
//! Found at `$DEVICEKEY_CONFIG`, else `$XDG_CONFIG_HOME/devicekey/config.toml` (or
//! `~/.config/devicekey/config.toml`), else `/etc/devicekey/config.toml`. With no file (or no
//! `[[slot]]`), the module serves a software slot in `$XDG_DATA_HOME/devicekey`, plus a TPM slot
//! when `/dev/tpmrm0` exists. Unknown names are errors, so a typo is reported instead of ignored:
//! a wrong top-level name makes the file unusable; a wrong option in a `[[slot]]` makes that slot
//! unusable, with an error naming the option and the backend it belongs to.

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
    /// The file, or the directory holding it, can be changed by another user: it names the
    /// modules this process loads, so it is refused.
    #[error("config {path} is refused: {why} (it names the modules this process loads)")]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
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

/// Which kind of key store a slot is: the `backend = "..."` of a `[[slot]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

impl BackendKind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Software,
        BackendKind::Tpm,
        BackendKind::Pkcs11,
        BackendKind::SecureEnclave,
    ];

    /// The one spelling of the kind: what `backend = "..."` says and every message shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Software => "software",
            Self::Tpm => "tpm",
            Self::Pkcs11 => "pkcs11",
            Self::SecureEnclave => "secure_enclave",
        }
    }

    /// The inverse of [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The names a `[[slot]]` of this kind accepts (besides `backend`).
    fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Software => SoftwareSlot::FIELDS,
            Self::Tpm => TpmSlot::FIELDS,
            Self::Pkcs11 => Pkcs11Slot::FIELDS,
            Self::SecureEnclave => SecureEnclaveSlot::FIELDS,
        }
    }
}

/// So that `info.backend == "tpm"` reads naturally.
impl PartialEq<&str> for BackendKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `login = "..."` of a `[[slot]]`: whether the token asks for a user PIN.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LoginMode {
    /// No PIN: every process of the user signs with every key (the default).
    #[default]
    None,
    /// A user PIN: private keys are CKA_PRIVATE and usable only after C_Login(CKU_USER).
    Pin,
}

/// `backend = "software"`: keys in an owner-only directory.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SoftwareSlot {
    /// Token label (resolved: the config's, else the default for the slot's position).
    pub label: String,
    /// The key directory; default `$XDG_DATA_HOME/devicekey`.
    pub dir: Option<PathBuf>,
    /// Whether the token asks for a user PIN.
    #[serde(default)]
    pub login: LoginMode,
    /// With `login = "pin"`: wrong PINs allowed in a row before the PIN locks (default 10).
    pub pin_tries: Option<u32>,
}

impl SoftwareSlot {
    const FIELDS: &'static [&'static str] = &["label", "dir", "login", "pin_tries"];
}

/// `backend = "tpm"`: keys in a TPM 2.0.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TpmSlot {
    /// Token label (resolved).
    pub label: String,
    /// The key directory (blobs and their metadata); default `<data dir>/tpm`.
    pub dir: Option<PathBuf>,
    /// The TCTI string (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`); default
    /// `$DEVICEKEY_TPM_TCTI`, else `device:/dev/tpmrm0`.
    pub tcti: Option<String>,
    /// Let a simulator report `hardware_tpm` (tests only).
    #[serde(default)]
    pub allow_simulator: bool,
    /// The environment variable holding the owner hierarchy's authorization, for
    /// `devicekey tpm persist-srk` only (never on the command line).
    pub owner_auth_env: Option<String>,
    /// A file (mode 0600) holding the owner hierarchy's authorization, for
    /// `devicekey tpm persist-srk` only. Neither set: the owner authorization is empty.
    pub owner_auth_file: Option<PathBuf>,
    /// Whether the token asks for a user PIN (it becomes each key's authValue).
    #[serde(default)]
    pub login: LoginMode,
}

impl TpmSlot {
    const FIELDS: &'static [&'static str] = &[
        "label",
        "dir",
        "tcti",
        "allow_simulator",
        "owner_auth_env",
        "owner_auth_file",
        "login",
    ];
}

/// `backend = "pkcs11"`: keys in another PKCS#11 token. What is missing is reported (with its
/// fix) when the slot opens, by the store itself.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Slot {
    /// Token label (resolved).
    pub label: String,
    /// The wrapped module's path.
    pub module: Option<PathBuf>,
    /// The wrapped token's label.
    pub token: Option<String>,
    /// The environment variable holding the wrapped token's PIN.
    pub pin_env: Option<String>,
    /// A file holding the wrapped token's PIN.
    pub pin_file: Option<PathBuf>,
    /// The class the operator declares for the wrapped device.
    pub protection_class: Option<String>,
    /// Whether our token asks for a user PIN of its own (the wrapped token keeps its PIN).
    #[serde(default)]
    pub login: LoginMode,
}

impl Pkcs11Slot {
    const FIELDS: &'static [&'static str] = &[
        "label",
        "module",
        "token",
        "pin_env",
        "pin_file",
        "protection_class",
        "login",
    ];
}

/// `backend = "secure_enclave"`: keys in the Apple Secure Enclave (macOS).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecureEnclaveSlot {
    /// Token label (resolved).
    pub label: String,
    /// Where the store keeps its metadata.
    pub dir: Option<PathBuf>,
    /// Keep enclave keys in the data-protection keychain (the host needs entitlements).
    #[serde(default)]
    pub keychain: bool,
    /// On a Mac without a Secure Enclave, accept non-extractable login-keychain keys
    /// (`os_protected_nonextractable`).
    #[serde(default)]
    pub allow_os_protected: bool,
}

impl SecureEnclaveSlot {
    const FIELDS: &'static [&'static str] = &["label", "dir", "keychain", "allow_os_protected"];
}

/// A `[[slot]]` whose backend is known but whose options are wrong. The rest of the config
/// stays usable; this slot has no token, and opening it fails with `problem`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenSlot {
    /// Token label (resolved).
    pub label: String,
    /// The backend the slot names.
    pub backend: BackendKind,
    /// What is wrong, naming the option.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

/// One `[[slot]]`: `backend = "..."` selects the store and the options it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotConfig {
    /// `backend = "software"`.
    Software(SoftwareSlot),
    /// `backend = "tpm"`.
    Tpm(TpmSlot),
    /// `backend = "pkcs11"`.
    Pkcs11(Pkcs11Slot),
    /// `backend = "secure_enclave"`.
    SecureEnclave(SecureEnclaveSlot),
    /// A slot whose options are wrong (see [`BrokenSlot`]).
    Broken(BrokenSlot),
}

impl SlotConfig {
    /// The token label, resolved when the config was read.
    pub fn label(&self) -> &str {
        match self {
            Self::Software(s) => &s.label,
            Self::Tpm(s) => &s.label,
            Self::Pkcs11(s) => &s.label,
            Self::SecureEnclave(s) => &s.label,
            Self::Broken(s) => &s.label,
        }
    }

    /// Whether the slot asks for a user PIN (`login`; stores without the option have none).
    pub fn login(&self) -> LoginMode {
        match self {
            Self::Software(s) => s.login,
            Self::Tpm(s) => s.login,
            Self::Pkcs11(s) => s.login,
            Self::SecureEnclave(_) | Self::Broken(_) => LoginMode::None,
        }
    }

    /// The backend the slot names.
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Software(_) => BackendKind::Software,
            Self::Tpm(_) => BackendKind::Tpm,
            Self::Pkcs11(_) => BackendKind::Pkcs11,
            Self::SecureEnclave(_) => BackendKind::SecureEnclave,
            Self::Broken(s) => s.backend,
        }
    }

    /// Reads one `[[slot]]` table in two steps: `backend` picks the struct, then the struct is
    /// read with its own names only, so a wrong name is reported with the backend it belongs to
    /// (serde cannot combine an internally tagged enum with `deny_unknown_fields`).
    /// `default_label` is used when the table has no `label`.
    ///
    /// Errors (the whole config is unusable): no `backend`, or one that is not a key store.
    /// A wrong option of a known backend gives [`SlotConfig::Broken`].
    fn from_table(
        index: usize,
        mut table: toml::Table,
        default_label: String,
    ) -> Result<Self, String> {
        let kinds = BackendKind::ALL.map(BackendKind::as_str).join(", ");
        let kind = match table.remove("backend") {
            None => return Err(format!("slot {index}: missing `backend` (one of {kinds})")),
            Some(toml::Value::String(s)) => BackendKind::parse(&s).ok_or_else(|| {
                format!("slot {index}: backend = \"{s}\" is not a key store (one of {kinds})")
            })?,
            Some(other) => {
                return Err(format!(
                    "slot {index}: `backend` must be a string (one of {kinds}), not {other}"
                ))
            }
        };
        let label = match table.get("label") {
            Some(toml::Value::String(l)) => l.clone(),
            _ => default_label,
        };
        let broken = |problem: String, fix: String| {
            Self::Broken(BrokenSlot {
                label: label.clone(),
                backend: kind,
                problem: format!("slot {index} (\"{label}\", backend = \"{kind}\"): {problem}"),
                fix,
            })
        };
        for name in table.keys() {
            if kind.fields().contains(&name.as_str()) {
                continue;
            }
            let owners: Vec<String> = BackendKind::ALL
                .into_iter()
                .filter(|k| k.fields().contains(&name.as_str()))
                .map(|k| format!("backend = \"{k}\""))
                .collect();
            let problem = if owners.is_empty() {
                format!("unknown option `{name}`")
            } else {
                format!(
                    "option `{name}` belongs to {}, not to backend = \"{kind}\"",
                    owners.join(" or ")
                )
            };
            return Ok(broken(
                problem,
                format!(
                    "remove `{name}` from the slot (a {kind} slot takes {})",
                    kind.fields().join(", ")
                ),
            ));
        }
        table
            .entry("label")
            .or_insert_with(|| toml::Value::String(label.clone()));
        let value = toml::Value::Table(table);
        let parsed = match kind {
            BackendKind::Software => value.try_into().map(Self::Software),
            BackendKind::Tpm => value.try_into().map(Self::Tpm),
            BackendKind::Pkcs11 => value.try_into().map(Self::Pkcs11),
            BackendKind::SecureEnclave => value.try_into().map(Self::SecureEnclave),
        };
        Ok(parsed.unwrap_or_else(|e| {
            broken(
                e.to_string().trim().to_string(),
                "correct the slot (see the README's Configuration section)".into(),
            )
        }))
    }
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
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The slots, in order (the PKCS#11 slot ids). Never empty once read: see
    /// [`Config::from_toml`] for the default.
    pub slots: Vec<SlotConfig>,
    /// The server, and the proof policy the token enforces.
    pub server: ServerConfig,
    /// Where the config came from (`None` for the built-in default).
    pub source: Option<PathBuf>,
}

/// The file as written: slots still raw tables, read one by one by [`SlotConfig::from_table`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    slot: Vec<toml::Table>,
    #[serde(default)]
    server: ServerConfig,
}

/// Refuses a config file (as opened) or its directory that another user could change: the owner
/// must be this user or root, and neither may be writable by group or others (a sticky directory,
/// such as `/tmp`, may be).
fn check_not_writable_by_others(path: &Path, file: &std::fs::File) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_because = |why: String| ConfigError::Unsafe {
        path: path.to_owned(),
        why,
    };
    let me = rustix::process::geteuid().as_raw();
    let trusted = |uid: u32| uid == me || uid == 0;
    let meta = file.metadata().map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(unsafe_because("not a regular file".into()));
    }
    if !trusted(meta.uid()) {
        return Err(unsafe_because(format!("owned by uid {}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_because(format!(
            "mode {:04o} lets group or others write it",
            meta.mode() & 0o7777
        )));
    }
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned));
    if let Some(dir_meta) = dir.as_deref().and_then(|d| std::fs::metadata(d).ok()) {
        let sticky = dir_meta.mode() & 0o1000 != 0;
        if !trusted(dir_meta.uid()) || (dir_meta.mode() & 0o022 != 0 && !sticky) {
            return Err(unsafe_because(format!(
                "its directory (uid {}, mode {:04o}) lets another user replace it",
                dir_meta.uid(),
                dir_meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
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
        Self::from_toml("").map_err(|message| ConfigError::Invalid {
            path: PathBuf::new(),
            message,
        })
    }

    /// Reads one config file; refuses one that another user could change.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_error)?;
        check_not_writable_by_others(path, &file)?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(read_error)?;
        let mut config = Self::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses config text. With no `[[slot]]`, the default: a software slot, plus a TPM slot
    /// (`devicekey-tpm`) when the kernel's TPM resource manager exists and this build has TPM
    /// support. A slot without a `label` gets `devicekey` (first slot) or `devicekey-N` (the
    /// N-th), made unique among the labels of the file.
    ///
    /// Errors: bad TOML, an unknown top-level or `[server]` name, a slot without a known
    /// `backend`. A wrong option inside a slot does not fail the config: that slot becomes
    /// [`SlotConfig::Broken`].
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        let mut tables = file.slot;
        if tables.is_empty() {
            let table = |pairs: &[(&str, &str)]| -> toml::Table {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string())))
                    .collect()
            };
            let (store, _) = crate::backend::secure_enclave::default_store(
                cfg!(target_os = "macos"),
                crate::backend::secure_enclave::has_secure_enclave(),
            );
            tables.push(table(&[(
                "backend",
                match store {
                    crate::backend::secure_enclave::DefaultStore::SecureEnclave => "secure_enclave",
                    crate::backend::secure_enclave::DefaultStore::Software => "software",
                },
            )]));
            if cfg!(all(feature = "tpm", target_os = "linux"))
                && Path::new(DEFAULT_TPM_DEVICE).exists()
            {
                tables.push(table(&[("backend", "tpm"), ("label", "devicekey-tpm")]));
            }
        }
        let mut used: std::collections::HashSet<String> = tables
            .iter()
            .filter_map(|t| t.get("label").and_then(toml::Value::as_str))
            .map(str::to_string)
            .collect();
        let mut slots = Vec::with_capacity(tables.len());
        for (index, table) in tables.into_iter().enumerate() {
            let mut label = if index == 0 {
                "devicekey".to_string()
            } else {
                format!("devicekey-{}", index + 1)
            };
            if !table.contains_key("label") {
                while used.contains(&label) {
                    label.push('_');
                }
                used.insert(label.clone());
            }
            slots.push(SlotConfig::from_table(index, table, label)?);
        }
        Ok(Self {
            slots,
            server: file.server,
            source: None,
        })
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

    fn one_slot(body: &str) -> SlotConfig {
        let mut c = Config::from_toml(&format!("[[slot]]\n{body}\n")).unwrap();
        assert_eq!(c.slots.len(), 1);
        c.slots.remove(0)
    }

    #[test]
    fn a_config_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Config::from_file(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("mode 0666"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("its directory"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(
            Config::from_file(&path).is_ok(),
            "a sticky directory is fine"
        );
    }

    #[test]
    fn empty_config_gives_the_default_slots() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(
            c.slots[0],
            SlotConfig::Software(SoftwareSlot {
                label: "devicekey".into(),
                dir: None,
                login: LoginMode::None,
                pin_tries: None,
            })
        );
        let tpm = cfg!(all(feature = "tpm", target_os = "linux"))
            && Path::new(DEFAULT_TPM_DEVICE).exists();
        assert_eq!(c.slots.len(), if tpm { 2 } else { 1 });
        if tpm {
            assert_eq!(c.slots[1].kind(), BackendKind::Tpm);
            assert_eq!(c.slots[1].label(), "devicekey-tpm");
        }
        assert_eq!(c.server.max_proof_ttl_seconds, 900);
    }

    #[test]
    fn full_config_parses_into_one_struct_per_store() {
        let c = Config::from_toml(
            r#"
            [[slot]]
            label = "devicekey"
            backend = "software"
            dir = "/tmp/x"
            [[slot]]
            backend = "tpm"
            tcti = "swtpm:host=127.0.0.1,port=2321"
            allow_simulator = true
            [[slot]]
            label = "hsm"
            backend = "pkcs11"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token = "t"
            pin_env = "HSM_PIN"
            protection_class = "hardware_tpm"
            [[slot]]
            backend = "secure_enclave"
            keychain = true
            [server]
            allowed_origin_hosts = ["example.com"]
            max_proof_ttl_seconds = 60
            "#,
        )
        .unwrap();
        assert_eq!(
            c.slots[0],
            SlotConfig::Software(SoftwareSlot {
                label: "devicekey".into(),
                dir: Some("/tmp/x".into()),
                login: LoginMode::None,
                pin_tries: None,
            })
        );
        assert_eq!(
            c.slots[1],
            SlotConfig::Tpm(TpmSlot {
                label: "devicekey-2".into(),
                dir: None,
                tcti: Some("swtpm:host=127.0.0.1,port=2321".into()),
                allow_simulator: true,
                owner_auth_env: None,
                owner_auth_file: None,
                login: LoginMode::None,
            })
        );
        let SlotConfig::Pkcs11(p) = &c.slots[2] else {
            panic!("{:?}", c.slots[2]);
        };
        assert_eq!(p.label, "hsm");
        assert_eq!(p.token.as_deref(), Some("t"));
        assert_eq!(p.protection_class.as_deref(), Some("hardware_tpm"));
        assert_eq!(
            c.slots[3],
            SlotConfig::SecureEnclave(SecureEnclaveSlot {
                label: "devicekey-4".into(),
                dir: None,
                keychain: true,
                allow_os_protected: false,
            })
        );
        assert_eq!(c.server.allowed_origin_hosts, vec!["example.com"]);
        assert_eq!(c.server.max_proof_ttl_seconds, 60);
    }

    #[test]
    fn an_option_of_another_backend_breaks_the_slot_and_names_both() {
        let slot =
            one_slot("label = \"soft\"\nbackend = \"software\"\ntcti = \"device:/dev/tpm0\"");
        let SlotConfig::Broken(b) = &slot else {
            panic!("{slot:?}");
        };
        assert_eq!(b.label, "soft");
        assert_eq!(slot.kind(), BackendKind::Software);
        assert!(b.problem.contains("`tcti`"), "{}", b.problem);
        assert!(b.problem.contains("backend = \"tpm\""), "{}", b.problem);
        assert!(
            b.problem.contains("backend = \"software\""),
            "{}",
            b.problem
        );
        assert!(b.fix.contains("remove `tcti`"), "{}", b.fix);

        // `dir` belongs to several stores, but not to pkcs11.
        let slot = one_slot("backend = \"pkcs11\"\ndir = \"/tmp\"");
        let SlotConfig::Broken(b) = &slot else {
            panic!("{slot:?}");
        };
        assert!(b.problem.contains("`dir`"), "{}", b.problem);
        assert!(
            b.problem.contains("backend = \"software\" or"),
            "{}",
            b.problem
        );
    }

    #[test]
    fn a_typo_or_a_wrong_type_breaks_the_slot_naming_it() {
        let slot = one_slot("backend = \"software\"\ndirr = \"x\"");
        let SlotConfig::Broken(b) = &slot else {
            panic!("{slot:?}");
        };
        assert!(b.problem.contains("unknown option `dirr`"), "{}", b.problem);
        assert_eq!(b.label, "devicekey");

        let slot = one_slot("backend = \"tpm\"\nallow_simulator = \"yes\"");
        let SlotConfig::Broken(b) = &slot else {
            panic!("{slot:?}");
        };
        assert!(b.problem.contains("allow_simulator"), "{}", b.problem);
    }

    #[test]
    fn other_slots_survive_a_broken_one() {
        let c = Config::from_toml(
            "[[slot]]\nbackend = \"software\"\ntcti = \"x\"\n[[slot]]\nbackend = \"software\"\n",
        )
        .unwrap();
        assert!(matches!(c.slots[0], SlotConfig::Broken(_)));
        assert!(matches!(c.slots[1], SlotConfig::Software(_)));
        assert_eq!(c.slots[1].label(), "devicekey-2");
    }

    #[test]
    fn a_slot_without_a_known_backend_makes_the_config_unusable() {
        let e = Config::from_toml("[[slot]]\nbackend = \"floppy\"\n").unwrap_err();
        assert!(
            e.contains("\"floppy\"") && e.contains("secure_enclave"),
            "{e}"
        );
        let e = Config::from_toml("[[slot]]\nlabel = \"x\"\n").unwrap_err();
        assert!(e.contains("missing `backend`"), "{e}");
        let e = Config::from_toml("[[slot]]\nbackend = 3\n").unwrap_err();
        assert!(e.contains("must be a string"), "{e}");
        let e = Config::from_toml("[servr]\n").unwrap_err();
        assert!(e.contains("servr"), "{e}");
    }

    #[test]
    fn default_labels_avoid_the_labels_the_file_gives() {
        let c = Config::from_toml(
            "[[slot]]\nbackend = \"software\"\ndir = \"/a\"\n\
             [[slot]]\nbackend = \"software\"\ndir = \"/b\"\n\
             [[slot]]\nlabel = \"devicekey-2\"\nbackend = \"software\"\ndir = \"/c\"\n",
        )
        .unwrap();
        let labels: Vec<&str> = c.slots.iter().map(SlotConfig::label).collect();
        assert_eq!(labels, ["devicekey", "devicekey-2_", "devicekey-2"]);
    }

    #[test]
    fn the_field_lists_match_the_structs() {
        // serde lists a struct's names when it meets an unknown one: they must be FIELDS.
        for kind in BackendKind::ALL {
            let value: toml::Value = toml::from_str("label = \"l\"\nzz_unknown = 1\n").unwrap();
            let e = match kind {
                BackendKind::Software => value.try_into::<SoftwareSlot>().map(drop),
                BackendKind::Tpm => value.try_into::<TpmSlot>().map(drop),
                BackendKind::Pkcs11 => value.try_into::<Pkcs11Slot>().map(drop),
                BackendKind::SecureEnclave => value.try_into::<SecureEnclaveSlot>().map(drop),
            }
            .unwrap_err()
            .to_string();
            let expected: Vec<String> = kind.fields().iter().map(|f| format!("`{f}`")).collect();
            for f in &expected {
                assert!(e.contains(f.as_str()), "{kind}: {f} not in {e}");
            }
            assert_eq!(
                e.matches('`').count(),
                2 * (expected.len() + 1),
                "{kind}: {e}"
            );
        }
    }

    #[test]
    fn the_kind_has_one_spelling() {
        for kind in BackendKind::ALL {
            assert_eq!(BackendKind::parse(kind.as_str()), Some(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!(BackendKind::SecureEnclave.as_str(), "secure_enclave");
    }
}
