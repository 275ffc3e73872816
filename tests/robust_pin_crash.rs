//! A process killed (SIGKILL) while it sets a first PIN or changes the PIN of a software store
//! leaves every key usable with exactly one of the two PINs, never neither.
//!
//! Setting a first PIN on a store with clear keys writes the PIN file, then seals the key files
//! one by one: the kill is timed (adapting from round to round) until it lands between the first
//! and the last key, and then every key must sign after a login with the new PIN (which also
//! seals what the killed process left in the clear). Changing the PIN rewrites the PIN file
//! alone: killed at times spread over the whole change, the store must open with the old PIN or
//! the new one (and not the other), and every key must sign.
//!
//! The child is this test binary again, running the ignored `child_sets_the_pin`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devicekey_pkcs11::backend::pin::PinGuard;
use devicekey_pkcs11::backend::software::pin::CHEAP_KDF_ENV;
use devicekey_pkcs11::backend::software::{PinOptions, SoftwareStore};
use devicekey_pkcs11::backend::{Backend, BackendError, KeyPurpose, NewKey};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};

const OLD: &str = "1111";
const NEW: &str = "2222";
const DIR_ENV: &str = "DEVICEKEY_PIN_CRASH_DIR";
const MODE_ENV: &str = "DEVICEKEY_PIN_CRASH_MODE";

fn open_pin(dir: &Path) -> SoftwareStore {
    SoftwareStore::open_with("crash", Some(dir), Some(PinOptions::default())).expect("open")
}

fn guard(store: &SoftwareStore) -> &dyn PinGuard {
    store.pin().expect("PIN guard")
}

/// The child: sets (`set`) or changes (`change`) the PIN of the store in `$DEVICEKEY_PIN_CRASH_DIR`.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn child_sets_the_pin() {
    let (Some(dir), Some(mode)) = (std::env::var_os(DIR_ENV), std::env::var_os(MODE_ENV)) else {
        return;
    };
    let store = open_pin(Path::new(&dir));
    let old = (mode == "change").then_some(OLD.as_bytes());
    guard(&store)
        .set_pin(old, NEW.as_bytes())
        .expect("set the PIN");
}

/// A store in `dir` with `n` clear keys; with `pin`, set (and so sealed) under it.
fn make_store(dir: &Path, n: usize, pin: Option<&str>) {
    let plain = SoftwareStore::open("crash", Some(dir)).expect("open");
    for i in 0..n {
        plain
            .generate_key(&NewKey {
                id: vec![i as u8],
                label: format!("k{i}"),
                purpose: KeyPurpose::General,
                persistent: true,
            })
            .expect("generate");
    }
    drop(plain);
    if let Some(pin) = pin {
        guard(&open_pin(dir))
            .set_pin(None, pin.as_bytes())
            .expect("set PIN");
    }
}

/// A copy of the store `from` (files 0600, directory 0700).
fn copy_store(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(to).expect("mkdir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for e in std::fs::read_dir(from).expect("list") {
        let p = e.expect("entry").path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
        }
    }
}

fn run_child(dir: &Path, mode: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("current_exe");
    std::process::Command::new(exe)
        .args([
            "child_sets_the_pin",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir)
        .env(MODE_ENV, mode)
        .env(CHEAP_KDF_ENV, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child")
}

fn key_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect()
}

/// How many key files are sealed.
fn sealed_count(dir: &Path) -> usize {
    key_files(dir)
        .iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .expect("read")
                .contains("sealed_scalar")
        })
        .count()
}

/// Every key of the (logged-in) store signs, and there are `n`.
fn all_sign(store: &SoftwareStore, n: usize) {
    let keys = store.load_keys().expect("load keys");
    assert_eq!(keys.len(), n, "keys lost");
    for k in keys {
        let digest = [3u8; 32];
        let sig = k.signer.sign_digest(&digest).expect("sign");
        VerifyingKey::from_sec1_bytes(&k.public_point)
            .expect("point")
            .verify_prehash(&digest, &Signature::from_slice(&sig).expect("sig"))
            .expect("verify");
    }
}

fn tries(store: &SoftwareStore, pin: &str) -> Result<(), BackendError> {
    guard(store).login(pin.as_bytes())
}

#[test]
fn a_kill_while_setting_a_first_pin_leaves_every_key_usable() {
    std::env::set_var(CHEAP_KDF_ENV, "1");
    const N: usize = 300;
    let tmp = tempfile::tempdir().expect("tempdir");
    let template = tmp.path().join("template");
    make_store(&template, N, None);
    let mut delay = Duration::from_millis(2);
    let mut seen = Vec::new();
    for round in 0..16 {
        let dir = tmp.path().join(format!("round{round}"));
        copy_store(&template, &dir);
        let mut child = run_child(&dir, "set");
        let start = Instant::now();
        while !dir.join("pin").exists() && start.elapsed() < Duration::from_secs(60) {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().expect("wait");
        let sealed = sealed_count(&dir);
        seen.push((delay, sealed));

        let store = open_pin(&dir);
        assert!(guard(&store).status().expect("status").initialized);
        tries(&store, NEW).expect("the new PIN opens the store");
        all_sign(&store, N);
        assert_eq!(
            sealed_count(&dir),
            N,
            "the login sealed what was left in the clear"
        );
        if sealed > 0 && sealed < N {
            return;
        }
        delay = if sealed == N {
            delay / 2
        } else {
            delay * 2 + Duration::from_micros(500)
        };
    }
    panic!("no kill landed between the first and the last key (delay, sealed): {seen:?}");
}

#[test]
fn a_kill_while_changing_the_pin_leaves_one_pin_that_works() {
    std::env::set_var(CHEAP_KDF_ENV, "1");
    const N: usize = 5;
    let tmp = tempfile::tempdir().expect("tempdir");
    let template = tmp.path().join("template");
    make_store(&template, N, Some(OLD));
    // One uninterrupted change, timed.
    let full = tmp.path().join("full");
    copy_store(&template, &full);
    let start = Instant::now();
    let status = run_child(&full, "change").wait().expect("wait");
    let whole = start.elapsed();
    assert!(status.success(), "the change failed: {status}");
    let store = open_pin(&full);
    assert!(matches!(
        tries(&store, OLD),
        Err(BackendError::PinIncorrect(_))
    ));
    tries(&store, NEW).expect("the new PIN");
    all_sign(&store, N);

    let mut outcomes = Vec::new();
    for round in 0..12u32 {
        let dir = tmp.path().join(format!("round{round}"));
        copy_store(&template, &dir);
        let mut child = run_child(&dir, "change");
        std::thread::sleep(whole * (round + 4) / 14);
        let _ = child.kill();
        child.wait().expect("wait");
        let store = open_pin(&dir);
        let (works, fails) = match tries(&store, OLD) {
            Ok(()) => (OLD, NEW),
            Err(BackendError::PinIncorrect(_)) => (NEW, OLD),
            Err(e) => panic!("round {round}: the old PIN: {e}"),
        };
        if works == NEW {
            tries(&store, NEW).unwrap_or_else(|e| panic!("round {round}: neither PIN works: {e}"));
        }
        all_sign(&store, N);
        guard(&store).logout();
        assert!(
            matches!(tries(&store, fails), Err(BackendError::PinIncorrect(_))),
            "round {round}: both PINs work"
        );
        outcomes.push(works);
    }
    eprintln!("PIN after each killed change: {outcomes:?}");
}
