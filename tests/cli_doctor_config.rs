//! `devicekey doctor` on what the config says: a slot with an option of another backend is shown
//! unreachable with the option, the backend it belongs to and the fix (the other slots still
//! work); a Secure Enclave slot off macOS says why; the proof policy in force (allowed origin
//! hosts, longest proof lifetime) is printed with the file it came from.

use testkit::doctor;

use std::path::Path;
use std::process::Output;

use doctor::{assert_has, doctor_command, run, slot_block};

fn doctor_with(root: &Path, config: &str) -> (Output, String) {
    let path = root.join("config.toml");
    std::fs::write(&path, config).expect("config");
    let mut cmd = doctor_command(root);
    cmd.env("DEVICEKEY_CONFIG", &path);
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

#[test]
fn an_option_of_another_backend_is_named_with_its_backend_and_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = format!(
        "[[slot]]\nlabel = \"soft\"\nbackend = \"software\"\ndir = \"{0}/a\"\ntcti = \"device:/dev/tpmrm0\"\n\n\
         [[slot]]\nlabel = \"good\"\nbackend = \"software\"\ndir = \"{0}/b\"\n",
        root.display()
    );
    let (out, stdout) = doctor_with(root, &config);
    assert_eq!(out.status.code(), Some(1), "one slot is not reachable");
    assert_has(
        &slot_block(&stdout, "soft"),
        &[
            "backend:          software",
            "reachable:        NO",
            "option `tcti` belongs to backend = \"tpm\", not to backend = \"software\"",
            "fix:              remove `tcti` from the slot",
        ],
    );
    assert!(
        !root.join("a").exists(),
        "the broken slot's directory was created"
    );
    assert_has(
        &slot_block(&stdout, "good"),
        &[
            "reachable:        yes",
            "protection class: os_protected_nonextractable",
        ],
    );
}

#[test]
fn a_typo_in_a_slot_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = "[[slot]]\nlabel = \"tpm\"\nbackend = \"tpm\"\ntctii = \"device:/dev/tpmrm0\"\n";
    let (out, stdout) = doctor_with(root, config);
    assert_eq!(out.status.code(), Some(1));
    assert_has(
        &slot_block(&stdout, "tpm"),
        &[
            "backend:          tpm",
            "reachable:        NO",
            "unknown option `tctii`",
            "a tpm slot takes label, dir, tcti, allow_simulator",
        ],
    );
}

#[test]
fn a_secure_enclave_slot_says_it_needs_macos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, stdout) = doctor_with(
        dir.path(),
        "[[slot]]\nlabel = \"se\"\nbackend = \"secure_enclave\"\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_has(
        &slot_block(&stdout, "se"),
        &[
            "backend:          secure_enclave",
            "reachable:        NO",
            "the Secure Enclave store needs macOS with a Secure Enclave",
        ],
    );
}

#[test]
fn the_proof_policy_in_force_is_printed_with_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = format!(
        "[[slot]]\nbackend = \"software\"\ndir = \"{}/keys\"\n\n\
         [server]\nallowed_origin_hosts = [\"example.org\", \"login.example.net\"]\nmax_proof_ttl_seconds = 77\n",
        root.display()
    );
    let (out, stdout) = doctor_with(root, &config);
    assert_eq!(out.status.code(), Some(0));
    assert_has(
        &stdout,
        &[
            &format!("proof policy (from {};", root.join("config.toml").display()),
            "  allowed origin hosts: example.org, login.example.net (https",
            "  max proof TTL:        77 s",
        ],
    );
    assert!(!stdout.contains("chatgpt.com"), "{stdout}");
}

#[test]
fn the_built_in_policy_is_printed_without_a_config() {
    if Path::new("/etc/devicekey/config.toml").exists() {
        eprintln!("/etc/devicekey/config.toml exists on this machine: test skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(doctor_command(dir.path()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_has(
        &stdout,
        &[
            "proof policy (from the built-in default;",
            "  allowed origin hosts: chatgpt.com, chatgpt-staging.com (https",
            "  max proof TTL:        900 s",
        ],
    );
}

#[test]
fn a_config_others_can_write_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let path = root.join("config.toml");
    let config = format!(
        "[[slot]]\nlabel = \"soft\"\nbackend = \"software\"\ndir = \"{}/a\"\n",
        root.display()
    );
    std::fs::write(&path, config).expect("config");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut cmd = doctor_command(root);
    cmd.env("DEVICEKEY_CONFIG", &path);
    let out = run(cmd);
    assert_ne!(out.status.code(), Some(0), "a refused config is a failure");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_has(&all, &["is refused: mode 0666", "chmod go-w"]);
    assert!(
        !root.join("a").exists(),
        "no slot of a refused config opened"
    );
}
