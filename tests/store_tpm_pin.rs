//! The TPM store's user PIN (`login = "pin"`) against swtpm, through the `Backend` and
//! `PinGuard` traits: the PIN is each key's authValue, so the TPM itself refuses to sign without
//! it and counts wrong PINs in its dictionary-attack counter (read back with
//! `tpm2_getcap properties-variable`); after the limit the PIN is locked; a change re-protects
//! every key; tpm2-tools cannot sign with a key blob without the PIN-derived authValue; and a
//! change killed half-way leaves every key usable with exactly one of the two PINs.
//!
//! Each test starts its own swtpm on a free loopback port and sets its dictionary-attack
//! parameters with `tpm2_dictionarylockout`.
#![cfg(all(feature = "tpm", target_os = "linux"))]

use std::path::{Path, PathBuf};
use std::process::Command;

use devicekey_pkcs11::backend::tpm::{derive_auth, TpmBackend, TpmConfig, ABORT_AFTER_ENV};
use devicekey_pkcs11::backend::{Backend, BackendError, KeyPurpose, KeyRecord, NewKey};
use devicekey_pkcs11::config::LoginMode;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use testkit::swtpm::Swtpm;

const TOOLS: &[&str] = &[
    "tpm2_getcap",
    "tpm2_dictionarylockout",
    "tpm2_load",
    "tpm2_sign",
    "tpm2_flushcontext",
];

/// The environment of the child process that runs a PIN change and is killed in it.
const CHILD_DIR: &str = "DEVICEKEY_TEST_PIN_DIR";
const CHILD_TCTI: &str = "DEVICEKEY_TEST_PIN_TCTI";

struct Fixture {
    tmp: tempfile::TempDir,
    swtpm: Swtpm,
}

impl Fixture {
    /// A swtpm allowing `max_tries` wrong authorizations (forgiving one per 1000 s); `None`
    /// (the test is skipped) without swtpm and tpm2-tools.
    fn new(max_tries: u32) -> Option<Self> {
        Self::with(max_tries, Swtpm::start)
    }

    /// [`Fixture::new`], on a TPM manufactured with EK certificates (attestation).
    fn with_ek_certificates(max_tries: u32) -> Option<Self> {
        if !testkit::swtpm::have_swtpm_and(&["swtpm_setup"]) {
            return None;
        }
        Self::with(max_tries, |state| {
            testkit::swtpm::provision_with_ek_certificates(state);
            Swtpm::start(state)
        })
    }

    /// [`Fixture::new`], with swtpm logging every command and response in hex.
    fn recording_the_bus(max_tries: u32) -> Option<Self> {
        Self::with(max_tries, Swtpm::start_recording_the_bus)
    }

    fn with(max_tries: u32, start: fn(&Path) -> Swtpm) -> Option<Self> {
        if !testkit::swtpm::have_swtpm_and(TOOLS) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let swtpm = start(&tmp.path().join("swtpm"));
        let f = Self { tmp, swtpm };
        f.tool(&[
            "tpm2_dictionarylockout",
            "-s",
            "-n",
            &max_tries.to_string(),
            "-t",
            "1000",
            "-l",
            "1000",
        ]);
        f.tool(&["tpm2_dictionarylockout", "-c"]);
        assert_eq!(f.da(), (0, max_tries));
        Some(f)
    }

    fn keys(&self) -> PathBuf {
        self.tmp.path().join("keys")
    }

    fn open(&self) -> TpmBackend {
        open_store(&self.keys(), &self.swtpm.tcti())
    }

    /// Runs a tpm2-tools command against this swtpm; its output, or its stderr as the error.
    fn try_tool(&self, args: &[&str]) -> Result<String, String> {
        let work = self.tmp.path().join("tools");
        std::fs::create_dir_all(&work).unwrap();
        let out = Command::new(args[0])
            .args(["-T", &self.swtpm.tcti()])
            .args(&args[1..])
            .current_dir(&work)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn tool(&self, args: &[&str]) -> String {
        self.try_tool(args)
            .unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
    }

    /// Every byte swtpm received or sent so far, as its log shows them.
    fn bus(&self) -> Vec<u8> {
        let log = std::fs::read_to_string(self.swtpm.log_path()).unwrap();
        log.lines()
            .filter_map(|line| {
                line.split_whitespace()
                    .map(|t| {
                        (t.len() == 2)
                            .then(|| u8::from_str_radix(t, 16).ok())
                            .flatten()
                    })
                    .collect::<Option<Vec<u8>>>()
            })
            .flatten()
            .collect()
    }

    /// The authValue of `pin` under the salt now in `pin.json`.
    fn auth_of(&self, pin: &[u8]) -> Vec<u8> {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.keys().join("pin.json")).unwrap()).unwrap();
        let salt = hex::decode(file["salt"].as_str().unwrap()).unwrap();
        derive_auth(&salt, pin).to_vec()
    }

    /// The TPM's lockout counter and maximum, as `tpm2_getcap properties-variable` prints them.
    fn da(&self) -> (u32, u32) {
        let text = self.tool(&["tpm2_getcap", "properties-variable"]);
        let value = |name: &str| {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
            let hex = line.rsplit("0x").next().unwrap().trim();
            u32::from_str_radix(hex, 16).unwrap()
        };
        (
            value("TPM2_PT_LOCKOUT_COUNTER:"),
            value("TPM2_PT_MAX_AUTH_FAIL:"),
        )
    }
}

fn open_store(dir: &Path, tcti: &str) -> TpmBackend {
    let config = TpmConfig {
        label: "devicekey-tpm".into(),
        dir: dir.to_path_buf(),
        tcti: tcti.to_string(),
        allow_simulator: true,
    };
    TpmBackend::open_with_login(&config, LoginMode::Pin).expect("open the TPM store")
}

fn new_key(store: &TpmBackend, label: &str) -> KeyRecord {
    store
        .generate_key(&NewKey {
            id: label.as_bytes().to_vec(),
            label: label.into(),
            purpose: KeyPurpose::General,
            persistent: true,
        })
        .unwrap_or_else(|e| panic!("generate {label}: {e}"))
}

fn digest(msg: &str) -> [u8; 32] {
    Sha256::digest(msg.as_bytes()).into()
}

fn verify(point: &[u8], digest: &[u8; 32], sig: &[u8]) -> bool {
    let vk = VerifyingKey::from_sec1_bytes(point).expect("a P-256 point");
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    vk.verify_prehash(digest, &sig).is_ok()
}

fn sign_and_verify(key: &KeyRecord, msg: &str) {
    let d = digest(msg);
    let sig = key
        .signer
        .sign_digest(&d)
        .unwrap_or_else(|e| panic!("sign with {}: {e}", key.label));
    assert!(verify(&key.public_point, &d, &sig), "{}", key.label);
}

fn pin(store: &TpmBackend) -> &dyn devicekey_pkcs11::backend::pin::PinGuard {
    store.pin().expect("a login = \"pin\" store has a PIN")
}

#[track_caller]
fn assert_not_logged_in(key: &KeyRecord) {
    let r = key.signer.sign_digest(&digest("no login"));
    assert!(
        matches!(r, Err(BackendError::NotLoggedIn(_))),
        "{}: {r:?}",
        key.label
    );
}

/// Files in the key directory whose name contains `part`.
fn files_with(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

fn pin_generation(dir: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pin.json")).unwrap()).unwrap();
    v["generation"].as_u64().unwrap()
}

#[test]
fn wrong_pins_are_counted_by_the_tpm_and_lock_it() {
    let Some(f) = Fixture::new(3) else {
        return;
    };
    let store = f.open();
    let status = pin(&store).status().unwrap();
    assert!(!status.initialized);
    assert!(matches!(
        pin(&store).login(b"1234"),
        Err(BackendError::Refused(_))
    ));

    // A key made before the PIN is set is re-protected by it.
    let early = new_key(&store, "early");
    assert_not_logged_in(&early);
    pin(&store).set_pin(None, b"1234").unwrap();
    let status = pin(&store).status().unwrap();
    assert!(status.initialized && !status.locked);
    assert_eq!((status.tries_left, status.max_tries), (Some(3), 3));
    assert_not_logged_in(&early);
    assert!(matches!(
        store.generate_key(&NewKey {
            id: b"x".to_vec(),
            label: "x".into(),
            purpose: KeyPurpose::General,
            persistent: true,
        }),
        Err(BackendError::NotLoggedIn(_))
    ));

    // A wrong PIN: the TPM refuses it and its lockout counter moves.
    let r = pin(&store).login(b"0000");
    assert!(matches!(r, Err(BackendError::PinIncorrect(_))), "{r:?}");
    assert_eq!(f.da(), (1, 3));
    assert_eq!(pin(&store).status().unwrap().tries_left, Some(2));
    assert_not_logged_in(&early);

    // The right PIN signs, with the old key and a new one.
    pin(&store).login(b"1234").unwrap();
    sign_and_verify(&early, "early");
    let late = new_key(&store, "late");
    sign_and_verify(&late, "late");
    assert_eq!(f.da().0, 1, "a right PIN costs nothing");

    // Logged out, nothing signs, and the TPM was not asked (the counter stays).
    pin(&store).logout();
    assert_not_logged_in(&early);
    assert_not_logged_in(&late);
    assert_eq!(f.da().0, 1);

    // Two more wrong PINs: the TPM locks out, and then refuses the right PIN too.
    for _ in 0..2 {
        let r = pin(&store).login(b"9999");
        assert!(matches!(r, Err(BackendError::PinIncorrect(_))), "{r:?}");
    }
    assert_eq!(f.da(), (3, 3));
    let status = pin(&store).status().unwrap();
    assert!(status.locked);
    assert_eq!(status.tries_left, Some(0));
    let r = pin(&store).login(b"1234");
    assert!(matches!(r, Err(BackendError::PinLocked(_))), "{r:?}");
    assert!(matches!(
        pin(&store).login(b"9999"),
        Err(BackendError::PinLocked(_))
    ));

    // The lockout reset (lockout hierarchy) lets the right PIN in again.
    f.tool(&["tpm2_dictionarylockout", "-c"]);
    assert!(!pin(&store).status().unwrap().locked);
    pin(&store).login(b"1234").unwrap();
    sign_and_verify(&early, "after the reset");
}

#[test]
fn a_changed_pin_replaces_the_old_one_for_every_key() {
    let Some(f) = Fixture::new(10) else {
        return;
    };
    let store = f.open();
    pin(&store).set_pin(None, b"1234").unwrap();
    pin(&store).login(b"1234").unwrap();
    let keys: Vec<KeyRecord> = (0..3).map(|i| new_key(&store, &format!("k{i}"))).collect();

    // The current PIN is needed, and a wrong one is counted.
    assert!(matches!(
        pin(&store).set_pin(None, b"5678"),
        Err(BackendError::PinIncorrect(_))
    ));
    assert!(matches!(
        pin(&store).set_pin(Some(b"0000"), b"5678"),
        Err(BackendError::PinIncorrect(_))
    ));
    assert_eq!(f.da().0, 1);

    pin(&store).set_pin(Some(b"1234"), b"5678").unwrap();
    // Still logged in (under the new PIN): the records loaded before the change sign.
    for key in &keys {
        sign_and_verify(key, "after the change");
    }
    assert_eq!(pin_generation(&f.keys()), 2);
    assert!(
        files_with(&f.keys(), ".pin").is_empty(),
        "no side file left"
    );

    // A new process: the old PIN fails, the new one signs with every key.
    drop(keys);
    drop(store);
    let store = f.open();
    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), 3);
    let r = pin(&store).login(b"1234");
    assert!(matches!(r, Err(BackendError::PinIncorrect(_))), "{r:?}");
    assert_eq!(f.da().0, 2);
    pin(&store).login(b"5678").unwrap();
    for key in &keys {
        sign_and_verify(key, "new process");
    }
}

#[test]
fn tpm2_tools_cannot_sign_with_a_key_blob_without_the_pin() {
    let Some(f) = Fixture::new(10) else {
        return;
    };
    let Made { name, point, .. } = keys_under_1234(&f, &["stolen"]).remove(0);
    let pem = f.keys().join(format!("{name}.pem"));
    std::fs::create_dir_all(f.tmp.path().join("tools")).unwrap();
    std::fs::write(f.tmp.path().join("tools/data"), b"signed by tpm2-tools").unwrap();
    // The blob loads (its parent, the SRK, needs no authorization)...
    f.tool(&["tpm2_load", "-r", pem.to_str().unwrap(), "-c", "key.ctx"]);
    let sign = |auth: Option<&str>| {
        let mut args: Vec<&str> = "tpm2_sign -c key.ctx -g sha256 -s ecdsa -f plain -o sig.der"
            .split(' ')
            .collect();
        if let Some(auth) = auth {
            args.extend(["-p", auth]);
        }
        args.push("data");
        let _ = std::fs::remove_file(f.tmp.path().join("tools/sig.der"));
        // Without a resource manager a failed tool leaves its objects loaded.
        f.tool(&["tpm2_flushcontext", "-t"]);
        f.try_tool(&args)
    };
    // ...but without the PIN-derived authValue the TPM refuses to sign, and counts it.
    let refused = sign(None).expect_err("tpm2_sign without the authValue must fail");
    // TPM_RC_AUTH_FAIL for session 1.
    assert!(refused.to_ascii_lowercase().contains("0x98e"), "{refused}");
    assert_eq!(f.da().0, 1);
    // The PIN itself is not the authValue either.
    sign(Some("1234")).expect_err("the PIN is not the authValue");
    assert_eq!(f.da().0, 2);

    // With the authValue (HMAC-SHA256 of the PIN keyed by the store's salt) it signs: the
    // refusals above were about the authorization, nothing else.
    let auth = format!("hex:{}", hex::encode(f.auth_of(b"1234")));
    sign(Some(&auth)).expect("tpm2_sign with the derived authValue");
    let der = std::fs::read(f.tmp.path().join("tools/sig.der")).unwrap();
    let sig = Signature::from_der(&der).expect("a DER ECDSA signature");
    assert!(verify(
        &point,
        &digest("signed by tpm2-tools"),
        &sig.to_bytes()
    ));
}

/// The child half of the kill tests: opens the store and changes the PIN 1234 -> 5678, with the
/// abort hook set by the parent.
#[test]
#[ignore = "run by a_pin_change_killed_half_way_* as a child process"]
fn child_changes_the_pin() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("run by the parent test"));
    let store = open_store(&dir, &std::env::var(CHILD_TCTI).unwrap());
    pin(&store).set_pin(Some(b"1234"), b"5678").unwrap();
    panic!("the abort hook did not fire");
}

/// Runs a PIN change 1234 -> 5678 in a child process that aborts at `stage`.
fn kill_a_change_at(f: &Fixture, stage: &str) {
    let out = testkit::spawn_self(
        "child_changes_the_pin",
        &[
            (CHILD_DIR, f.keys().display().to_string()),
            (CHILD_TCTI, f.swtpm.tcti()),
            (ABORT_AFTER_ENV, stage.to_string()),
        ],
    )
    .wait_with_output()
    .unwrap();
    assert!(
        !out.status.success()
            && std::os::unix::process::ExitStatusExt::signal(&out.status).is_some(),
        "the child must be killed by the abort hook: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key made by [`keys_under_1234`] (its store closed again).
struct Made {
    name: String,
    id: Vec<u8>,
    point: [u8; 65],
}

/// Sets the PIN 1234 on the store, logs in and makes the keys `labels`; closes the store (swtpm
/// has 3 object slots, and tools may want them).
fn keys_under_1234(f: &Fixture, labels: &[&str]) -> Vec<Made> {
    let store = f.open();
    pin(&store).set_pin(None, b"1234").unwrap();
    pin(&store).login(b"1234").unwrap();
    labels
        .iter()
        .map(|label| {
            let key = new_key(&store, label);
            Made {
                name: key.name.clone(),
                id: key.id.clone(),
                point: key.public_point,
            }
        })
        .collect()
}

/// Logs in with `pin` in a new store and signs with every key.
fn every_key_signs_with(f: &Fixture, pin_value: &[u8], expected: &[Made]) {
    let store = f.open();
    pin(&store).login(pin_value).unwrap();
    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), expected.len());
    for key in &keys {
        assert!(expected
            .iter()
            .any(|m| m.name == key.name && m.point == key.public_point));
        sign_and_verify(key, "after the kill");
    }
}

#[track_caller]
fn login_fails(f: &Fixture, pin_value: &[u8]) {
    let store = f.open();
    let r = pin(&store).login(pin_value);
    assert!(matches!(r, Err(BackendError::PinIncorrect(_))), "{r:?}");
}

/// Kills a change 1234 -> 5678 at `stage` in a store with three keys. Then `side_files`
/// re-protected blobs are left and `pin.json` is at `generation`; `works` signs with every key
/// and `fails` is refused; the next change, `next`, finishes the job and leaves nothing behind.
fn kill_and_recover(
    stage: &str,
    side_files: usize,
    generation: u64,
    works: &[u8],
    fails: &[u8],
    next: (&[u8], &[u8]),
) {
    let Some(f) = Fixture::new(10) else {
        return;
    };
    let keys = keys_under_1234(&f, &["k0", "k1", "k2"]);
    kill_a_change_at(&f, stage);
    assert_eq!(files_with(&f.keys(), ".pin2.pem").len(), side_files);
    assert_eq!(pin_generation(&f.keys()), generation);
    // Exactly one PIN works, for every key.
    login_fails(&f, fails);
    every_key_signs_with(&f, works, &keys);
    f.open()
        .pin()
        .unwrap()
        .set_pin(Some(next.0), next.1)
        .unwrap();
    assert!(
        files_with(&f.keys(), ".pin").is_empty(),
        "no side file left"
    );
    assert_eq!(pin_generation(&f.keys()), generation + 1);
    login_fails(&f, next.0);
    every_key_signs_with(&f, next.1, &keys);
    assert_eq!(f.da().0, 2, "only the two wrong logins were counted");
}

#[test]
fn a_pin_change_killed_half_way_leaves_every_key_under_the_old_pin() {
    // Two keys were re-protected beside their blobs, nothing was committed: the old PIN holds,
    // and running the change again redoes it.
    kill_and_recover("2", 2, 1, b"1234", b"5678", (b"1234", b"5678"));
}

#[test]
fn a_pin_change_killed_after_its_commit_leaves_every_key_under_the_new_pin() {
    // Committed, not tidied: every key's new blob is still a side file, the new PIN holds, and
    // the next change finishes the old one first.
    kill_and_recover("commit", 3, 2, b"5678", b"1234", (b"5678", b"2468"));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn neither_the_pin_nor_its_auth_value_crosses_the_bus_in_the_clear() {
    let Some(f) = Fixture::recording_the_bus(10) else {
        return;
    };
    let (first, second) = (&b"correct horse"[..], &b"battery staple"[..]);
    let (point, first_auth) = {
        let store = f.open();
        // TPM2_Create of the check object and of a key, TPM2_Unseal, TPM2_Sign,
        // TPM2_ObjectChangeAuth: every command that carries or proves an authValue.
        pin(&store).set_pin(None, first).unwrap();
        pin(&store).login(first).unwrap();
        let key = new_key(&store, "k");
        sign_and_verify(&key, "before the change");
        let first_auth = f.auth_of(first);
        pin(&store).set_pin(Some(first), second).unwrap();
        assert!(pin(&store).login(first).is_err());
        pin(&store).login(second).unwrap();
        sign_and_verify(&key, "after the change");
        (key.public_point, first_auth)
    };
    let second_auth = f.auth_of(second);
    let bus = f.bus();
    // The recording works: the key's public point came back from TPM2_Create, and the digest
    // went to TPM2_Sign (in the clear: it is no secret).
    assert!(
        contains(&bus, &point[1..33]),
        "swtpm recorded the responses"
    );
    assert!(
        contains(&bus, &digest("before the change")),
        "swtpm recorded the commands"
    );
    for (what, secret) in [
        ("the first PIN", first),
        ("the second PIN", second),
        ("the first authValue", &first_auth[..]),
        ("the second authValue", &second_auth[..]),
    ] {
        assert!(!contains(&bus, secret), "{what} crossed the bus");
    }
}

#[test]
fn a_pin_key_is_attested_only_after_login() {
    use devicekey_pkcs11::attest::certify::parse_certify_info;
    use devicekey_pkcs11::attest::PublicArea;
    let Some(f) = Fixture::with_ek_certificates(10) else {
        return;
    };
    let Made { id, point, .. } = keys_under_1234(&f, &["attested"]).remove(0);
    let qualifying = digest("the relying party's nonce");

    // Without login, TPM2_Certify is not even tried: it would cost a try.
    let store = f.open();
    let r = store.attest(&id, &point, &qualifying);
    assert!(matches!(r, Err(BackendError::NotLoggedIn(_))), "{r:?}");
    assert_eq!(f.da().0, 0);

    pin(&store).login(b"1234").unwrap();
    let evidence = store
        .attest(&id, &point, &qualifying)
        .unwrap()
        .expect("the store holds the key");
    let info = parse_certify_info(&evidence.certify_info).unwrap();
    assert_eq!(info.extra_data, qualifying);
    let key_area = PublicArea::parse(&evidence.key_public_area).unwrap();
    assert_eq!(info.name, key_area.name());
    assert_eq!(key_area.p256_point().unwrap(), point);
    let ak = PublicArea::parse(&evidence.ak_public_area).unwrap();
    assert!(verify(
        &ak.p256_point().unwrap(),
        &Sha256::digest(&evidence.certify_info).into(),
        &evidence.signature
    ));
    assert_eq!(f.da().0, 0, "no authorization failed");
}

#[test]
fn sessions_left_by_killed_processes_do_not_block_the_pin() {
    let Some(f) = Fixture::new(10) else {
        return;
    };
    let keys = keys_under_1234(&f, &["k0", "k1"]);
    // Each killed change leaves its salted session loaded in the TPM (no resource manager):
    // more than the TPM has room for.
    for _ in 0..4 {
        kill_a_change_at(&f, "1");
    }
    every_key_signs_with(&f, b"1234", &keys);
}

#[test]
fn a_slot_without_login_refuses_pin_keys_without_asking_the_tpm() {
    let Some(f) = Fixture::new(10) else {
        return;
    };
    keys_under_1234(&f, &["guarded"]);
    // The same directory opened as a slot with login = "none".
    let config = TpmConfig {
        label: "devicekey-tpm".into(),
        dir: f.keys(),
        tcti: f.swtpm.tcti(),
        allow_simulator: true,
    };
    let store = TpmBackend::open(&config).unwrap();
    assert!(store.pin().is_none());
    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), 1, "the key is listed");
    let r = keys[0].signer.sign_digest(&digest("no PIN slot"));
    assert!(
        matches!(&r, Err(BackendError::Refused(why)) if why.contains("login = \"pin\"")),
        "{r:?}"
    );
    assert_eq!(f.da().0, 0, "the TPM was not asked");
}
