//! A private SoftHSM for tests: a directory per test process under cargo's tmp dir, a
//! `softhsm2.conf` with its own token directory, and throwaway tokens made with softhsm2-util.
//!
//! SoftHSM reads SOFTHSM2_CONF and its token directory once, at C_Initialize: a test process that
//! loads SoftHSM makes every token it needs up front.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// SoftHSM's module where Debian and Ubuntu install it.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The variable naming SoftHSM's module elsewhere.
pub const MODULE_ENV: &str = "DEVICEKEY_TEST_SOFTHSM_MODULE";

/// SoftHSM's module: `$DEVICEKEY_TEST_SOFTHSM_MODULE` when set, else [`DEFAULT_MODULE`].
pub fn module() -> &'static str {
    static MODULE: OnceLock<String> = OnceLock::new();
    MODULE.get_or_init(|| {
        std::env::var(MODULE_ENV)
            .ok()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| DEFAULT_MODULE.to_string())
    })
}
/// The user PIN of every test token.
pub const PIN: &str = "1234";
/// The SO PIN of every test token.
pub const SO_PIN: &str = "5678";

/// What of SoftHSM is missing (its module, softhsm2-util), or None when both are there.
fn missing() -> Option<String> {
    let module = module();
    if !Path::new(module).exists() {
        return Some(format!(
            "SoftHSM is not installed: no module at {module} (scripts/setup.sh installs it; {MODULE_ENV} names another place)"
        ));
    }
    if Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some(
            "SoftHSM is not installed: softhsm2-util cannot run (scripts/setup.sh installs it)"
                .into(),
        );
    }
    None
}

/// True when SoftHSM's module and softhsm2-util are installed.
pub fn installed() -> bool {
    missing().is_none()
}

/// True when SoftHSM is installed; else says on stderr that the test is skipped (the caller
/// returns), or panics when `DEVICEKEY_TEST_REQUIRE` names softhsm.
pub fn have_softhsm() -> bool {
    match missing() {
        None => true,
        Some(m) => crate::require::available_or_skip("softhsm", false, &m),
    }
}

/// This process's directory `target/tmp/<name>/<pid>`, created. Statics are never dropped,
/// so the directories of finished runs (whose process is gone) are removed here.
pub fn process_dir(name: &str) -> PathBuf {
    let target = crate::profile_dir();
    let base = target
        .parent()
        .expect("target/<profile> has a parent")
        .join("tmp")
        .join(name);
    std::fs::create_dir_all(&base).expect("tmp dir");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let alive = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("process dir");
    dir
}

/// Writes `dir/softhsm2.conf` naming the token directory `dir/tokens` (created); returns the
/// config's path, for SOFTHSM2_CONF.
pub fn write_conf(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
    conf
}

/// The label `<prefix><pid>-<tag>` (unique per test process), cut to the 32 characters a token
/// label may have.
pub fn token_label(prefix: &str, tag: &str) -> String {
    let mut label = format!("{prefix}{}-{tag}", std::process::id());
    label.truncate(32);
    label
}

/// Makes a token labelled `label` (user PIN [`PIN`], SO PIN [`SO_PIN`]) in the SoftHSM that
/// `conf` configures.
pub fn init_token(conf: &Path, label: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", PIN, "--so-pin", SO_PIN])
        .output()
        .expect("softhsm2-util runs");
    assert!(
        out.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
