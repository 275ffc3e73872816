//! `devicekey doctor` as a user runs it: the built binary, a config with good and broken slots,
//! a private SoftHSM token for the pkcs11 slot. Checks what it prints for each slot (label,
//! backend, protection class, reachable or not, the fix) and its exit code (0 all reachable,
//! 1 otherwise).

use std::path::{Path, PathBuf};
use std::process::Output;

use testkit::doctor::{assert_has, doctor_command, run, slot_block};
use testkit::softhsm::{self, have_softhsm, PIN};

const PIN_ENV: &str = "DEVICEKEY_DOCTOR_TEST_PIN";

/// A private SoftHSM config under `root` and one token in it; returns (conf, label).
fn softhsm_token(root: &Path, tag: &str) -> (PathBuf, String) {
    let conf = softhsm::write_conf(root);
    let label = softhsm::token_label("dkdoc", tag);
    softhsm::init_token(&conf, &label);
    (conf, label)
}

fn software_slot(label: &str, dir: &Path) -> String {
    format!(
        "[[slot]]\nlabel = \"{label}\"\nbackend = \"software\"\ndir = \"{}\"\n\n",
        dir.display()
    )
}

fn pkcs11_slot(label: &str, module: &str, token: &str) -> String {
    format!(
        "[[slot]]\nlabel = \"{label}\"\nbackend = \"pkcs11\"\nmodule = \"{module}\"\ntoken = \"{token}\"\npin_env = \"{PIN_ENV}\"\nprotection_class = \"hardware_tpm\"\n\n"
    )
}

/// Runs `devicekey doctor` with `config` named by DEVICEKEY_CONFIG (or `args` instead).
fn doctor(
    root: &Path,
    config: Option<&Path>,
    softhsm_conf: Option<&Path>,
    args: &[&str],
) -> Output {
    let mut cmd = doctor_command(root);
    cmd.args(args).env(PIN_ENV, PIN);
    if let Some(c) = config {
        cmd.env("DEVICEKEY_CONFIG", c);
    }
    if let Some(c) = softhsm_conf {
        cmd.env("SOFTHSM2_CONF", c);
    }
    run(cmd)
}

#[test]
fn all_slots_reachable_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut text = software_slot("devicekey", &root.join("keys"));
    let softhsm = have_softhsm().then(|| softhsm_token(root, "good"));
    if let Some((_, token)) = &softhsm {
        text.push_str(&pkcs11_slot("devicekey-hsm", softhsm::module(), token));
    }
    let config = root.join("config.toml");
    std::fs::write(&config, text).expect("config");
    let out = doctor(
        root,
        Some(&config),
        softhsm.as_ref().map(|(c, _)| c.as_path()),
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "exit code");
    assert_has(
        &stdout,
        &[&format!(
            "config: {} (chosen by DEVICEKEY_CONFIG)",
            config.display()
        )],
    );
    let sw = slot_block(&stdout, "devicekey");
    assert_has(
        &sw,
        &[
            "slot 0: devicekey",
            "backend:          software",
            "protection class: os_protected_nonextractable",
            "reachable:        yes",
            "0 key(s)",
        ],
    );
    if let Some((_, token)) = &softhsm {
        let hsm = slot_block(&stdout, "devicekey-hsm");
        assert_has(
            &hsm,
            &[
                "slot 1: devicekey-hsm",
                "backend:          pkcs11",
                "protection class: hardware_tpm",
                "reachable:        yes",
                &format!("token '{token}'"),
            ],
        );
        assert!(!hsm.contains(PIN), "the PIN is printed:\n{hsm}");
        assert_has(&stdout, &["2 slot(s): 2 reachable, 0 not reachable"]);
    }
}

#[test]
fn broken_slots_are_named_with_their_fix_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // A group-writable key directory: refused by the software store.
    let open_dir = root.join("open-keys");
    std::fs::create_dir(&open_dir).expect("dir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let missing_module = root.join("no-such-module.so");
    let mut text = software_slot("good-sw", &root.join("keys"));
    text.push_str(&software_slot("open-sw", &open_dir));
    text.push_str(&pkcs11_slot(
        "no-module",
        missing_module.to_str().expect("utf-8"),
        "whatever",
    ));
    let softhsm = have_softhsm().then(|| softhsm_token(root, "broken"));
    if softhsm.is_some() {
        text.push_str(&pkcs11_slot(
            "wrong-label",
            softhsm::module(),
            "dk-doctor-no-such-token",
        ));
    }
    // Given with --config this time (DEVICEKEY_CONFIG names a file that does not exist).
    let config = root.join("broken.toml");
    std::fs::write(&config, text).expect("config");
    let out = doctor(
        root,
        Some(&root.join("not-this-one.toml")),
        softhsm.as_ref().map(|(c, _)| c.as_path()),
        &["--config", config.to_str().expect("utf-8")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "exit code");
    assert_has(
        &stdout,
        &[&format!(
            "config: {} (chosen by --config)",
            config.display()
        )],
    );
    assert_has(
        &slot_block(&stdout, "good-sw"),
        &["slot 0: good-sw", "reachable:        yes"],
    );
    assert_has(
        &slot_block(&stdout, "open-sw"),
        &[
            "slot 1: open-sw",
            "backend:          software",
            "protection class: os_protected_nonextractable",
            "reachable:        NO",
            "writable by group or others",
            "fix:              `chmod 700",
        ],
    );
    assert_has(
        &slot_block(&stdout, "no-module"),
        &[
            "slot 2: no-module",
            "backend:          pkcs11",
            "protection class: hardware_tpm",
            "reachable:        NO",
            "no-such-module.so cannot be found",
            "fix:              install the module",
        ],
    );
    let mut summary = "4 slot(s): 1 reachable, 3 not reachable";
    if softhsm.is_some() {
        assert_has(
            &slot_block(&stdout, "wrong-label"),
            &[
                "slot 3: wrong-label",
                "reachable:        NO",
                "no token labelled 'dk-doctor-no-such-token'",
                "fix:              correct `token` in the slot",
            ],
        );
    } else {
        summary = "3 slot(s): 1 reachable, 2 not reachable";
    }
    assert_has(&stdout, &[summary]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not reachable"), "stderr: {stderr}");
}

#[test]
fn unusable_config_exits_1_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let missing = root.join("missing.toml");
    let out = doctor(root, Some(&missing), None, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_has(
        &stdout,
        &[
            "config: NOT usable",
            "missing.toml",
            "fix:     create the file",
        ],
    );
    let bad = root.join("bad.toml");
    std::fs::write(&bad, "[[slot]]\nbackend = \"floppy\"\n").expect("config");
    let out = doctor(root, Some(&bad), None, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_has(
        &stdout,
        &["config: NOT usable", "bad.toml", "fix:     correct"],
    );
}

#[test]
fn no_config_uses_the_default_software_slot() {
    if Path::new("/etc/devicekey/config.toml").exists() {
        eprintln!("/etc/devicekey/config.toml exists on this machine: test skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let out = doctor(root, None, None, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert_has(
        &stdout,
        &[
            "config: none found",
            "built-in default",
            "slot 0: devicekey",
            "reachable:        yes",
        ],
    );
    // The default store lives under XDG_DATA_HOME.
    assert_has(
        &stdout,
        &[&root.join("xdg-data/devicekey").display().to_string()],
    );
}
