//! Running `devicekey doctor` (the built binary) in a test and reading what it prints per slot.

use std::path::Path;
use std::process::{Command, Output};

/// `devicekey doctor` with HOME and the XDG directories under `root`, the module's log off and
/// no DEVICEKEY_CONFIG; the caller adds its arguments and environment, then calls [`run`].
pub fn doctor_command(root: &Path) -> Command {
    let mut cmd = Command::new(crate::bin_path());
    cmd.arg("doctor")
        .env_remove("DEVICEKEY_CONFIG")
        .env("XDG_CONFIG_HOME", root.join("xdg-config"))
        .env("XDG_DATA_HOME", root.join("xdg-data"))
        .env("HOME", root.join("home"))
        .env("DEVICEKEY_LOG", "off");
    cmd
}

/// Runs `cmd` and prints its stdout and stderr (shown when the test fails).
pub fn run(mut cmd: Command) -> Output {
    let out = cmd.output().expect("run devicekey doctor");
    eprintln!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The block of lines `doctor` printed for the slot labelled `label`.
pub fn slot_block(stdout: &str, label: &str) -> String {
    let mut lines = stdout
        .lines()
        .skip_while(|l| !(l.starts_with("slot ") && l.ends_with(&format!(": {label}"))));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no slot {label} in:\n{stdout}"));
    let mut block = vec![head.to_string()];
    block.extend(
        lines
            .take_while(|l| l.starts_with("  "))
            .map(str::to_string),
    );
    block.join("\n")
}

/// Asserts `block` contains every one of `needles`.
pub fn assert_has(block: &str, needles: &[&str]) {
    for n in needles {
        assert!(block.contains(n), "expected {n:?} in:\n{block}");
    }
}
