//! The TPM store and the persistent SRK at 0x81000001, on a swtpm each test starts (and stops by
//! pid). Every step is a fresh process (`pkcs11-tool` loading the built module, or the
//! `devicekey` binary) whose debug log is counted for `TPM2_CreatePrimary` of the SRK:
//!
//! - without a persistent SRK, a process derives it (at least one CreatePrimary);
//! - after `devicekey tpm persist-srk`, or after tpm2-tools' `tpm2_createprimary` +
//!   `tpm2_evictcontrol` with the standard template, a process that finds a key and signs sends
//!   no CreatePrimary at all, and a key made before persisting still signs (verified with p256);
//! - an RSA primary persisted at 0x81000001 is not used: the log says why, the SRK is derived,
//!   and `persist-srk` refuses to replace it;
//! - on a TPM whose owner hierarchy has a password, `persist-srk` fails without it and succeeds
//!   with `owner_auth_file`, and the store then signs with no owner authorization at all.
#![cfg(all(feature = "tpm", target_os = "linux"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use testkit::swtpm::{have_swtpm, Swtpm};

const LABEL: &str = "devicekey-tpm";
const CREATE_PRIMARY: &str = "tpm: TPM2_CreatePrimary (owner hierarchy, the SRK)";

struct Fixture {
    tmp: tempfile::TempDir,
    swtpm: Swtpm,
    config: PathBuf,
    step: std::cell::Cell<u32>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let swtpm = Swtpm::start(&tmp.path().join("swtpm"));
        let config = tmp.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[[slot]]\nlabel = \"{LABEL}\"\nbackend = \"tpm\"\ntcti = \"{}\"\ndir = \"{}\"\nallow_simulator = true\n",
                swtpm.tcti(),
                tmp.path().join("keys").display()
            ),
        )
        .unwrap();
        Self {
            tmp,
            swtpm,
            config,
            step: std::cell::Cell::new(0),
        }
    }

    /// Runs `program` as a fresh process against the config, with its own debug log; returns
    /// the output and the log.
    fn run(&self, program: &Path, args: &[&str]) -> (Output, String) {
        let n = self.step.get() + 1;
        self.step.set(n);
        let log = self.tmp.path().join(format!("step{n}.log"));
        let out = Command::new(program)
            .args(args)
            .current_dir(self.tmp.path())
            .env("DEVICEKEY_CONFIG", &self.config)
            .env("DEVICEKEY_LOG", "debug")
            .env("DEVICEKEY_LOG_FILE", &log)
            .env_remove("DEVICEKEY_TPM_TCTI")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        (out, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// `pkcs11-tool --module <ours> ARGS`, which must succeed.
    fn p11(&self, args: &[&str]) -> String {
        let module = testkit::module_path();
        let mut all = vec!["--module", module.to_str().unwrap()];
        all.extend_from_slice(args);
        let (out, log) = self.run(Path::new("pkcs11-tool"), &all);
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        log
    }

    fn keygen(&self, id: &str) -> usize {
        create_primaries(&self.p11(&[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--id",
            id,
            "--label",
            id,
        ]))
    }

    /// Finds key `id`, signs a digest in a fresh process, verifies the signature with the key's
    /// public point; returns the log of the signing process.
    fn sign_and_verify(&self, id: &str) -> String {
        let dir = self.tmp.path();
        let digest: [u8; 32] = Sha256::digest(format!("message {id}")).into();
        std::fs::write(dir.join("digest"), digest).unwrap();
        let log = self.p11(&[
            "--sign", "-m", "ECDSA", "--id", id, "-i", "digest", "-o", "sig",
        ]);
        assert!(
            log.contains("tpm: TPM2_Sign"),
            "no TPM2_Sign logged:\n{log}"
        );
        self.p11(&[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            id,
            "-o",
            "pub.der",
        ]);
        let spki = std::fs::read(dir.join("pub.der")).unwrap();
        let point = &spki[spki.len() - 65..];
        let vk = VerifyingKey::from_sec1_bytes(point).expect("a P-256 point");
        let sig = Signature::from_slice(&std::fs::read(dir.join("sig")).unwrap()).expect("r‖s");
        vk.verify_prehash(&digest, &sig)
            .expect("the TPM signature verifies with the key's public point");
        log
    }

    fn devicekey(&self, args: &[&str]) -> (Output, String) {
        self.run(&testkit::bin_path(), args)
    }

    /// A tpm2-tools command against this swtpm, which must succeed.
    fn tpm2(&self, tool: &str, args: &[&str]) {
        let out = Command::new(tool)
            .args(["-T", &self.swtpm.tcti()])
            .args(args)
            .current_dir(self.tmp.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn doctor(&self) -> String {
        let (out, _) = self.devicekey(&["doctor"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn create_primaries(log: &str) -> usize {
    log.lines().filter(|l| l.contains(CREATE_PRIMARY)).count()
}

fn have_tools(tools: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = tools
        .iter()
        .all(|t| std::env::split_paths(&path).any(|d| d.join(t).is_file()));
    // These tools come with the swtpm test setup (scripts/setup.sh): required with swtpm.
    testkit::require::available_or_skip(
        "swtpm",
        found,
        &format!("{tools:?} not all installed (scripts/setup.sh installs opensc and tpm2-tools)"),
    )
}

#[test]
fn persist_srk_removes_create_primary_and_old_keys_still_sign() {
    if !have_swtpm() || !have_tools(&["pkcs11-tool"]) {
        return;
    }
    let f = Fixture::new();
    assert!(f.keygen("01") >= 1, "keygen derived no SRK");
    let before = create_primaries(&f.sign_and_verify("01"));
    assert!(before >= 1, "without a persistent SRK a process derives it");
    let doctor = f.doctor();
    assert!(
        doctor.contains("devicekey tpm persist-srk --slot devicekey-tpm"),
        "doctor does not say how to persist the SRK:\n{doctor}"
    );

    let (out, _) = f.devicekey(&["tpm", "persist-srk", "--slot", LABEL]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("now persistent at 0x81000001"),
        "persist-srk: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let log = f.sign_and_verify("01");
    let after = create_primaries(&log);
    eprintln!("CreatePrimary of the SRK in a signing process: {before} before, {after} after");
    assert_eq!(after, 0, "a CreatePrimary with a persistent SRK:\n{log}");
    assert!(
        log.contains("using the persistent SRK at 0x81000001"),
        "{log}"
    );
    assert_eq!(f.keygen("02"), 0, "keygen with a persistent SRK");
    assert_eq!(create_primaries(&f.sign_and_verify("02")), 0);

    let (out, _) = f.devicekey(&["tpm", "persist-srk", "--slot", LABEL]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("already"),
        "a second persist-srk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doctor = f.doctor();
    assert!(
        doctor.contains("persistent SRK at 0x81000001 in use"),
        "doctor:\n{doctor}"
    );
}

#[test]
fn srk_persisted_by_tpm2_tools_is_used() {
    if !have_swtpm() || !have_tools(&["pkcs11-tool", "tpm2_createprimary", "tpm2_evictcontrol"]) {
        return;
    }
    let f = Fixture::new();
    f.keygen("01");
    f.tpm2(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256:aes128cfb",
            "-a",
            "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
            "-c",
            "srk.ctx",
        ],
    );
    f.tpm2(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", "srk.ctx", "0x81000001"],
    );
    let log = f.sign_and_verify("01");
    assert_eq!(create_primaries(&log), 0, "{log}");
    assert!(
        log.contains("using the persistent SRK at 0x81000001"),
        "{log}"
    );
}

#[test]
fn another_object_at_the_srk_handle_is_not_used() {
    if !have_swtpm() || !have_tools(&["pkcs11-tool", "tpm2_createprimary", "tpm2_evictcontrol"]) {
        return;
    }
    let f = Fixture::new();
    f.tpm2(
        "tpm2_createprimary",
        &["-C", "o", "-G", "rsa2048", "-c", "rsa.ctx"],
    );
    f.tpm2(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", "rsa.ctx", "0x81000001"],
    );
    assert!(f.keygen("01") >= 1);
    let log = f.sign_and_verify("01");
    assert!(create_primaries(&log) >= 1, "{log}");
    assert!(
        log.contains(
            "the object at 0x81000001 is not the standard ECC P-256 SRK: it is not an ECC key"
        ),
        "the log does not say why the persistent object is not used:\n{log}"
    );
    let (out, _) = f.devicekey(&["tpm", "persist-srk", "--slot", LABEL]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not the standard ECC P-256 SRK"),
        "persist-srk over another object: {err}"
    );
    let doctor = f.doctor();
    assert!(
        doctor.contains("persistent SRK not used"),
        "doctor:\n{doctor}"
    );
}

#[test]
fn persist_srk_takes_the_owner_authorization_from_the_config() {
    if !have_swtpm() || !have_tools(&["pkcs11-tool", "tpm2_changeauth"]) {
        return;
    }
    let f = Fixture::new();
    f.keygen("01");
    f.tpm2("tpm2_changeauth", &["-c", "o", "owner-secret"]);
    let (out, _) = f.devicekey(&["tpm", "persist-srk", "--slot", LABEL]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("owner authorization"),
        "persist-srk without the owner password: {err}"
    );
    let auth = f.tmp.path().join("owner-auth");
    std::fs::write(&auth, "owner-secret\n").unwrap();
    std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut config = std::fs::read_to_string(&f.config).unwrap();
    config.push_str(&format!("owner_auth_file = \"{}\"\n", auth.display()));
    std::fs::write(&f.config, config).unwrap();
    let (out, _) = f.devicekey(&["tpm", "persist-srk", "--slot", LABEL]);
    assert!(
        out.status.success(),
        "persist-srk with owner_auth_file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = f.sign_and_verify("01");
    assert_eq!(create_primaries(&log), 0, "{log}");
}
