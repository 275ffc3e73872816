//! `DEVICEKEY_LOG_FILE` hardening, through the built module: a log path that is a symlink is
//! refused (the lines go to stderr, after one line that says why) and the symlink's target is
//! left untouched; a new log file is created 0600 whatever the umask allows. The module sets its
//! logger up once per process, so each case runs in a child process of this test binary.

use testkit as common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::Token;

const CHILD_ENV: &str = "DEVICEKEY_TEST_LOG_CHILD";

/// Not a test on its own: the body of the child processes. Initializes the module once (which
/// sets the logger up) and makes a key, so the module has lines to log.
#[test]
#[ignore]
fn child_initializes_the_module() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // The usual umask: without the explicit mode, a new file would be 0644.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let token = Token::new();
    common::gen_p256(&token.session(), "log-me", true);
}

/// Runs the child with `DEVICEKEY_LOG_FILE=log`; returns its stderr.
fn run_child(log: &Path) -> String {
    let out = common::spawn_self(
        "child_initializes_the_module",
        &[
            (CHILD_ENV, "1".to_string()),
            ("DEVICEKEY_LOG", "debug".to_string()),
            ("DEVICEKEY_LOG_FILE", log.display().to_string()),
        ],
    )
    .wait_with_output()
    .expect("child runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "child failed: {stderr}");
    stderr
}

#[test]
fn a_symlinked_log_path_is_refused_and_its_target_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("victim.txt");
    std::fs::write(&target, b"precious\n").unwrap();
    let link = tmp.path().join("devicekey.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let stderr = run_child(&link);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"precious\n",
        "the symlink's target was written to"
    );
    assert!(
        stderr.contains("DEVICEKEY_LOG_FILE refused") && stderr.contains("symlink"),
        "no refusal line on stderr: {stderr}"
    );
    assert_eq!(
        stderr.matches("DEVICEKEY_LOG_FILE refused").count(),
        1,
        "the refusal is said once: {stderr}"
    );
    // The module's own lines went to stderr instead.
    assert!(stderr.contains("devicekey["), "{stderr}");
}

#[test]
fn a_new_log_file_is_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("devicekey.log");
    let stderr = run_child(&log);
    let meta = std::fs::metadata(&log).expect("the log file was created");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "mode of a new log"
    );
    assert!(meta.is_file());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("devicekey["), "the lines went to the file");
    assert!(!stderr.contains("DEVICEKEY_LOG_FILE refused"), "{stderr}");
}

#[test]
fn a_log_file_others_can_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("devicekey.log");
    std::fs::write(&log, b"").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stderr = run_child(&log);
    assert!(
        stderr.contains("DEVICEKEY_LOG_FILE refused") && stderr.contains("0666"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&log).unwrap().size(), 0);
}
