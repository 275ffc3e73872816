//! A private SoftHSM for tests: a directory per test process under cargo's tmp dir, a
//! `softhsm2.conf` with its own token directory, and throwaway tokens made with softhsm2-util.
//!
//! SoftHSM reads SOFTHSM2_CONF and its token directory once, at C_Initialize: a test process that
//! loads SoftHSM makes every token it needs up front.

use std::path::{Path, PathBuf};
use std::process::Command;

/// SoftHSM's module.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token.
pub const PIN: &str = "1234";
/// The SO PIN of every test token.
pub const SO_PIN: &str = "5678";

/// True when SoftHSM's module and softhsm2-util are installed.
pub fn installed() -> bool {
    Path::new(SOFTHSM).exists()
        && Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_ok()
}

/// True when SoftHSM is installed; else says on stderr that the test is skipped (the caller
/// returns).
pub fn have_softhsm() -> bool {
    let ok = installed();
    if !ok {
        eprintln!("SoftHSM not installed ({SOFTHSM}, softhsm2-util): test skipped");
    }
    ok
}

/// This process's directory `<cargo tmp dir>/<name>/<pid>`, created. Statics are never dropped,
/// so the directories of finished runs (whose process is gone) are removed here.
pub fn process_dir(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
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
