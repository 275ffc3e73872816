//! `devicekey doctor` on TPM slots backed by a swtpm the test starts (and stops by pid, also on
//! panic): it shows the TPM's manufacturer and vendor strings, its firmware (checked against what
//! `tpm2_getcap` reads from the same TPM), that it is a simulator, and the class we will report
//! (`hardware_tpm` only with `allow_simulator = true`); a TPM that is gone is named with a fix
//! and exit code 1.
#![cfg(all(feature = "tpm", target_os = "linux"))]

use std::path::Path;
use std::process::{Command, Output};

use testkit::doctor::{assert_has, doctor_command, run, slot_block};
use testkit::swtpm::Swtpm;

fn tpm_slot(label: &str, tcti: &str, dir: &Path, allow_simulator: bool) -> String {
    format!(
        "[[slot]]\nlabel = \"{label}\"\nbackend = \"tpm\"\ntcti = \"{tcti}\"\ndir = \"{}\"\nallow_simulator = {allow_simulator}\n\n",
        dir.display()
    )
}

/// Runs `devicekey doctor` with DEVICEKEY_CONFIG naming `config`.
fn doctor(root: &Path, config: &Path) -> Output {
    let mut cmd = doctor_command(root);
    cmd.env("DEVICEKEY_CONFIG", config)
        .env_remove("DEVICEKEY_TPM_TCTI");
    run(cmd)
}

/// The firmware version as doctor prints it (`a.b.c.d`: the 16-bit halves of
/// TPM2_PT_FIRMWARE_VERSION_1 and _2), read independently with `tpm2_getcap`; `None` when
/// tpm2-tools is not installed.
fn firmware_from_tpm2_getcap(tcti: &str) -> Option<String> {
    let out = Command::new("tpm2_getcap")
        .args(["-T", tcti, "properties-fixed"])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "tpm2_getcap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let raw = |name: &str| -> u32 {
        let mut lines = text.lines().skip_while(|l| l.trim() != format!("{name}:"));
        lines.next();
        let value = lines
            .next()
            .and_then(|l| l.trim().strip_prefix("raw: 0x"))
            .unwrap_or_else(|| panic!("no {name} in tpm2_getcap output:\n{text}"));
        u32::from_str_radix(value, 16).expect("hex")
    };
    let (v1, v2) = (
        raw("TPM2_PT_FIRMWARE_VERSION_1"),
        raw("TPM2_PT_FIRMWARE_VERSION_2"),
    );
    Some(format!(
        "{}.{}.{}.{}",
        v1 >> 16,
        v1 & 0xffff,
        v2 >> 16,
        v2 & 0xffff
    ))
}

#[test]
fn doctor_shows_manufacturer_firmware_and_class_of_the_tpm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let tpm = Swtpm::start(&root.join("swtpm"));
    let tcti = tpm.tcti();
    let config = root.join("devicekey.toml");
    std::fs::write(
        &config,
        tpm_slot("tpm-allowed", &tcti, &root.join("keys-a"), true)
            + &tpm_slot("tpm-honest", &tcti, &root.join("keys-b"), false),
    )
    .expect("write config");

    let out = doctor(root, &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "both TPM slots are reachable");

    let common = [
        "backend:          tpm",
        "reachable:        yes",
        &format!("TPM at {tcti}"),
        // TPM2_PT_MANUFACTURER and the vendor strings of swtpm.
        "IBM",
        "SW TPM",
        "firmware ",
        "a simulator",
    ];
    let allowed = slot_block(&stdout, "tpm-allowed");
    assert_has(&allowed, &common);
    assert_has(&allowed, &["protection class: hardware_tpm"]);
    let honest = slot_block(&stdout, "tpm-honest");
    assert_has(&honest, &common);
    assert_has(&honest, &["protection class: os_protected_nonextractable"]);
    assert!(!honest.contains("hardware_tpm"), "{honest}");
    assert_has(&stdout, &["2 slot(s): 2 reachable, 0 not reachable"]);

    // The firmware shown is the TPM's own, as another tool reads it.
    match firmware_from_tpm2_getcap(&tcti) {
        Some(firmware) => assert_has(&allowed, &[&format!("firmware {firmware}")]),
        None => eprintln!("tpm2_getcap not installed: firmware cross-check skipped"),
    }
}

#[test]
fn doctor_names_a_tpm_that_is_gone_with_a_fix_and_exits_1() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let mut tpm = Swtpm::start(&root.join("swtpm"));
    let tcti = tpm.tcti();
    tpm.stop();
    let config = root.join("devicekey.toml");
    std::fs::write(
        &config,
        tpm_slot("tpm-gone", &tcti, &root.join("keys"), true),
    )
    .expect("write config");

    let out = doctor(root, &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "an unreachable slot exits 1");
    let block = slot_block(&stdout, "tpm-gone");
    assert_has(
        &block,
        &[
            "backend:          tpm",
            "protection class: unknown",
            "reachable:        NO",
            &format!("problem:          TPM at {tcti}"),
            "fix:              ",
        ],
    );
}
