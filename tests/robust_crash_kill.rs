//! Crash consistency of the software store: a child process creates (and relabels) keys in a
//! loop, printing each one after the store call returned ("reported"); the parent SIGKILLs it at
//! random moments, again and again, in the same store. After every kill the store opens, every
//! reported key is present with its reported label (or a later one), every key file on disk
//! loads (no half-written file is taken for a key, none is left behind as a damaged key), and
//! every key signs with its own public point.
//!
//! `STRESS_SCALE` sets the number of kills: 200 at full scale, 20 in CI.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, KeyPurpose, NewKey};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use testkit::stress::{scaled, Rng};

const DIR_ENV: &str = "DEVICEKEY_CRASH_DIR";
const FIRST_ENV: &str = "DEVICEKEY_CRASH_FIRST";

fn label(iteration: u64) -> String {
    format!("L{iteration:010}")
}

fn iteration_of(label: &str) -> u64 {
    label
        .strip_prefix('L')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected label {label:?}"))
}

/// Child: creates keys for ever; every third step relabels an earlier key instead. Prints
/// `CREATED <name> <label>` / `UPDATED <name> <label>` once the call returned.
#[test]
#[ignore = "child process of sigkill_during_key_creation_loses_nothing"]
fn crash_child_create_keys_forever() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let mut iteration: u64 = std::env::var(FIRST_ENV).unwrap().parse().unwrap();
    let store = SoftwareStore::open("crash", Some(Path::new(&dir))).expect("open the store");
    let mut names: Vec<String> = Vec::new();
    let mut out = std::io::stdout().lock();
    loop {
        iteration += 1;
        if iteration % 3 == 0 && !names.is_empty() {
            let name = &names[iteration as usize % names.len()];
            store
                .update_key(name, &label(iteration), &iteration.to_be_bytes())
                .expect("update");
            writeln!(out, "UPDATED {name} {}", label(iteration)).unwrap();
        } else {
            let key = store
                .generate_key(&NewKey {
                    id: iteration.to_be_bytes().to_vec(),
                    label: label(iteration),
                    purpose: KeyPurpose::General,
                    persistent: true,
                })
                .expect("generate");
            writeln!(out, "CREATED {} {}", key.name, label(iteration)).unwrap();
            names.push(key.name);
        }
        out.flush().unwrap();
    }
}

struct Outcome {
    created: usize,
    updated: usize,
    temp_files_left: usize,
}

fn files_with(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| pred(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect()
}

/// One child run: start, kill after `delay`, collect what it reported.
fn run_and_kill(
    dir: &Path,
    first: u64,
    delay: Duration,
    reported: &mut BTreeMap<String, u64>,
) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "crash_child_create_keys_forever",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir)
        .env(FIRST_ENV, first.to_string())
        .env("DEVICEKEY_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    std::thread::sleep(delay);
    // SIGKILL.
    child.kill().expect("kill");
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the child must be killed, not exit: {status}"
    );
    let lines = reader.join().unwrap();
    let mut outcome = Outcome {
        created: 0,
        updated: 0,
        temp_files_left: files_with(dir, |n| n.ends_with(".tmp")).len(),
    };
    for line in lines {
        // libtest's "test ... " prefix shares the first line.
        let start = ["CREATED ", "UPDATED "]
            .iter()
            .filter_map(|w| line.find(w))
            .min()
            .unwrap_or(0);
        let mut parts = line[start..].split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some("CREATED"), Some(name), Some(l)) => {
                outcome.created += 1;
                reported.insert(name.to_string(), iteration_of(l));
            }
            (Some("UPDATED"), Some(name), Some(l)) => {
                outcome.updated += 1;
                reported.insert(name.to_string(), iteration_of(l));
            }
            _ => {}
        }
    }
    outcome
}

fn check_signs(key: &devicekey_pkcs11::backend::KeyRecord) {
    let digest = [0x42u8; 32];
    let sig = key
        .signer
        .sign_digest(&digest)
        .unwrap_or_else(|e| panic!("key {} does not sign: {e}", key.name));
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.public_point).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
    assert!(
        vk.verify_prehash(&digest, &sig).is_ok(),
        "key {} signs with a scalar that is not its point's",
        key.name
    );
}

#[test]
fn sigkill_during_key_creation_loses_nothing() {
    let kills = scaled(200, 20);
    let (mut rng, seed) = Rng::from_env_or_clock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    SoftwareStore::open("crash", Some(&dir)).expect("create the store");
    let mut reported: BTreeMap<String, u64> = BTreeMap::new();
    let mut checked_signing: std::collections::BTreeSet<String> = Default::default();
    let (mut created, mut updated, mut torn, mut unreported) = (0, 0, 0, 0);
    let started = Instant::now();
    for k in 0..kills {
        // Children start in about 10-50 ms; the kill lands anywhere from start-up to a few
        // hundred key operations in.
        let delay = Duration::from_millis(5 + rng.below(250) as u64);
        let outcome = run_and_kill(&dir, (k as u64 + 1) * 1_000_000, delay, &mut reported);
        created += outcome.created;
        updated += outcome.updated;
        if outcome.temp_files_left > 0 {
            torn += 1;
        }

        let store = SoftwareStore::open("crash", Some(&dir))
            .unwrap_or_else(|e| panic!("seed {seed} kill {k}: the store does not open: {e}"));
        assert!(
            files_with(&dir, |n| n.ends_with(".tmp")).is_empty(),
            "opening removes stale temporary files"
        );
        let keys = store
            .load_keys()
            .unwrap_or_else(|e| panic!("seed {seed} kill {k}: the store does not load: {e}"));
        let on_disk = files_with(&dir, |n| n.ends_with(".key")).len();
        assert_eq!(
            keys.len(),
            on_disk,
            "seed {seed} kill {k}: every key file loads (a damaged one was left behind)"
        );
        let loaded: BTreeMap<&str, &devicekey_pkcs11::backend::KeyRecord> =
            keys.iter().map(|key| (key.name.as_str(), key)).collect();
        for (name, &at_least) in &reported {
            let key = loaded
                .get(name.as_str())
                .unwrap_or_else(|| panic!("seed {seed} kill {k}: reported key {name} is missing"));
            assert!(
                iteration_of(&key.label) >= at_least,
                "seed {seed} kill {k}: key {name} has label {} but {} was reported",
                key.label,
                label(at_least)
            );
        }
        for key in &keys {
            if checked_signing.insert(key.name.clone()) {
                check_signs(key);
            }
        }
        unreported = keys.len() - reported.len();
    }
    // Once more at the end: every key signs (fresh signers, scalars parsed from the files).
    let store = SoftwareStore::open("crash", Some(&dir)).unwrap();
    let keys = store.load_keys().unwrap();
    for key in &keys {
        check_signs(key);
    }
    eprintln!(
        "CRASH kill: {kills} SIGKILLs in {:?} (seed {seed}): {created} creations and {updated} \
         relabels reported, {} keys in the store, 0 reported keys lost, {unreported} created but \
         killed before reporting, {torn} kills left a temporary file (removed at open, never \
         loaded), 0 damaged key files",
        started.elapsed(),
        keys.len(),
    );
    assert!(created > 0, "the children created keys before being killed");
}
