//! The TPM key store against swtpm, through the `Backend` trait: key generation, signatures that
//! verify with p256, persistence across a reopen and a swtpm restart, reconnection, concurrent
//! signers, more keys than the TPM has object slots, and the honest protection class.
//!
//! Each test starts its own swtpm on a free loopback port with its own state directory and stops
//! it by pid. Run with `cargo test --features tpm --test store_tpm`.
#![cfg(all(feature = "tpm", target_os = "linux"))]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devicekey_pkcs11::backend::tpm::{probe, KeyBlob, TpmBackend, TpmConfig};
use devicekey_pkcs11::backend::{
    Backend, BackendError, KeyPurpose, KeyRecord, NewKey, ProtectionClass,
};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use testkit::swtpm::Swtpm;

/// A swtpm, a key directory and the config that joins them.
struct Fixture {
    tmp: tempfile::TempDir,
    swtpm: Swtpm,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let swtpm = Swtpm::start(&tmp.path().join("swtpm"));
        Self { tmp, swtpm }
    }

    fn config(&self, allow_simulator: bool) -> TpmConfig {
        TpmConfig {
            label: "devicekey-tpm".into(),
            dir: self.keys(),
            tcti: self.swtpm.tcti(),
            allow_simulator,
        }
    }

    fn keys(&self) -> PathBuf {
        self.tmp.path().join("keys")
    }

    fn open(&self) -> TpmBackend {
        TpmBackend::open(&self.config(true)).expect("open the TPM store")
    }
}

fn new_key(label: &str, purpose: KeyPurpose) -> NewKey {
    NewKey {
        id: label.as_bytes().to_vec(),
        label: label.into(),
        purpose,
        persistent: true,
    }
}

fn digest(msg: &str) -> [u8; 32] {
    Sha256::digest(msg.as_bytes()).into()
}

fn verify(key: &KeyRecord, digest: &[u8; 32], sig: &[u8; 64]) {
    let vk = VerifyingKey::from_sec1_bytes(&key.public_point).expect("a P-256 point");
    let sig = Signature::from_slice(sig).expect("r and s in range");
    vk.verify_prehash(digest, &sig)
        .expect("the TPM signature verifies");
}

fn sign_and_verify(key: &KeyRecord, msg: &str) {
    let d = digest(msg);
    let sig = key.signer.sign_digest(&d).expect("sign");
    verify(key, &d, &sig);
}

#[test]
fn keygen_sign_and_verify() {
    let f = Fixture::new();
    let store = f.open();
    assert_eq!(store.info().backend, "tpm");
    assert_eq!(store.info().serial.len(), 16);
    assert!(store.load_keys().unwrap().is_empty());

    let key = store
        .generate_key(&new_key("ssh", KeyPurpose::General))
        .unwrap();
    assert_eq!(key.public_point[0], 4);
    assert_eq!(key.label, "ssh");
    assert_eq!(key.id, b"ssh");
    assert!(key.persistent);

    let before = store.signatures_made();
    for i in 0..10 {
        sign_and_verify(&key, &format!("message {i}"));
    }
    assert_eq!(
        store.signatures_made() - before,
        10,
        "one TPM2_Sign per call"
    );

    // Signatures are randomized (the TPM's ECDSA nonce), and each one verifies.
    let d = digest("same");
    let a = key.signer.sign_digest(&d).unwrap();
    let b = key.signer.sign_digest(&d).unwrap();
    assert_ne!(a, b);
    verify(&key, &d, &a);
    verify(&key, &d, &b);
}

#[test]
fn key_files_are_tss2_pem_in_an_owner_only_dir() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let store = f.open();
    let key = store
        .generate_key(&new_key("files", KeyPurpose::Proof))
        .unwrap();
    let dir = f.keys();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let pem_path = dir.join(format!("{}.pem", key.name));
    let json_path = dir.join(format!("{}.json", key.name));
    for p in [&pem_path, &json_path] {
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            p.display()
        );
    }
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----\n"));
    let blob = KeyBlob::from_pem(&pem).unwrap();
    // The public area holds the same point the record reports.
    let x = &key.public_point[1..33];
    assert!(blob.public.windows(32).any(|w| w == x));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(meta["label"], "files");
    assert_eq!(meta["purpose"], "proof");
    assert_eq!(meta["id"], "66696c6573");
    // The key's blob and sidecar, besides the store's index, lock and lookup hints.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !devicekey_pkcs11::backend::index::is_bucket_file(n))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".lock".to_string(),
            format!("{}.json", key.name),
            format!("{}.pem", key.name),
            "store.index".to_string()
        ]
    );

    // OpenSSL's ASN.1 parser reads the DER inside (TCG loadable-key OID, parent 0x40000001).
    if let Ok(out) = Command::new("openssl")
        .args(["asn1parse", "-in"])
        .arg(&pem_path)
        .output()
    {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("2.23.133.10.1.3"), "{text}");
            assert!(text.contains("40000001"), "{text}");
        }
    }
}

#[test]
fn keys_persist_across_reopen_and_swtpm_restart() {
    let mut f = Fixture::new();
    let (name, point) = {
        let store = f.open();
        let key = store
            .generate_key(&new_key("persist", KeyPurpose::Proof))
            .unwrap();
        sign_and_verify(&key, "before");
        (key.name.clone(), key.public_point)
    };
    // The store and every signer are dropped: the connection is closed, swtpm free again.

    let check = |store: &TpmBackend, msg: &str| {
        let keys = store.load_keys().unwrap();
        assert_eq!(keys.len(), 1);
        let key = &keys[0];
        assert_eq!(key.name, name);
        assert_eq!(key.public_point, point);
        assert_eq!(key.label, "persist");
        assert_eq!(key.id, b"persist");
        assert_eq!(key.purpose, KeyPurpose::Proof);
        assert!(key.persistent);
        sign_and_verify(key, msg);
    };

    {
        let store = f.open();
        check(&store, "after reopen");
    }

    // Restart swtpm with the same state (on another port): the SRK is derived again from the
    // same owner seed, so the blob loads.
    let state = f.swtpm.state.clone();
    f.swtpm.stop();
    f.swtpm = Swtpm::start(&state);
    let store = f.open();
    check(&store, "after swtpm restart");
}

#[test]
fn reconnects_when_the_tpm_connection_drops() {
    let mut f = Fixture::new();
    let store = f.open();
    let key = store
        .generate_key(&new_key("reconnect", KeyPurpose::General))
        .unwrap();
    sign_and_verify(&key, "before");

    // Restart swtpm on the same port: our socket is dead, the next call must reconnect once.
    let (state, port) = (f.swtpm.state.clone(), f.swtpm.port);
    f.swtpm.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    f.swtpm = loop {
        if let Some(s) = Swtpm::start_on(&state, port) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "cannot restart swtpm on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    sign_and_verify(&key, "after restart");
    sign_and_verify(&key, "and again");

    // With the TPM gone, the error says so (and nothing panics).
    f.swtpm.stop();
    let err = key.signer.sign_digest(&digest("gone")).unwrap_err();
    assert!(matches!(err, BackendError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("not reachable"), "{err}");
}

#[test]
fn four_threads_sign_at_once() {
    let f = Fixture::new();
    let store = Arc::new(f.open());
    let keys: Vec<KeyRecord> = (0..2)
        .map(|i| {
            store
                .generate_key(&new_key(&format!("t{i}"), KeyPurpose::General))
                .unwrap()
        })
        .collect();
    let before = store.signatures_made();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let key = keys[t % keys.len()].clone();
            std::thread::spawn(move || {
                for i in 0..15 {
                    sign_and_verify(&key, &format!("thread {t} message {i}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a signing thread failed");
    }
    assert_eq!(store.signatures_made() - before, 60);
}

#[test]
fn more_keys_than_object_slots() {
    // swtpm without a resource manager has 3 object slots; the SRK takes one.
    let f = Fixture::new();
    let store = f.open();
    let keys: Vec<KeyRecord> = (0..6)
        .map(|i| {
            store
                .generate_key(&new_key(&format!("k{i}"), KeyPurpose::General))
                .unwrap()
        })
        .collect();
    for round in 0..3 {
        for (i, key) in keys.iter().enumerate() {
            sign_and_verify(key, &format!("round {round} key {i}"));
        }
    }
    // Back and forth between two keys (stays in the cache), then all in reverse.
    for i in 0..5 {
        sign_and_verify(&keys[0], &format!("a{i}"));
        sign_and_verify(&keys[5], &format!("b{i}"));
    }
    for key in keys.iter().rev() {
        sign_and_verify(key, "reverse");
    }
    // Reopened, the store still signs with all of them.
    drop(keys);
    drop(store);
    let store = f.open();
    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), 6);
    for key in &keys {
        sign_and_verify(key, "reopened");
    }
}

#[test]
fn class_is_hardware_only_with_allow_simulator() {
    let f = Fixture::new();
    {
        let store = TpmBackend::open(&f.config(false)).unwrap();
        assert_eq!(
            store.info().protection_class,
            ProtectionClass::OsProtectedNonextractable
        );
        let id = store.identity();
        assert_eq!(id.manufacturer, "IBM");
        assert_eq!(id.vendor, "SW TPM");
        assert!(id.simulator);
        assert!(store.info().manufacturer.starts_with("IBM"));
        let p = store.probe();
        assert!(p.reachable());
        assert_eq!(p.class, Some(ProtectionClass::OsProtectedNonextractable));
        let text = p.to_string();
        assert!(text.contains("IBM") && text.contains("os_protected_nonextractable"));
        assert!(text.contains("firmware"), "{text}");
    }
    {
        let store = TpmBackend::open(&f.config(true)).unwrap();
        assert_eq!(store.info().protection_class, ProtectionClass::HardwareTpm);
    }
    // The standalone probe (for `devicekey doctor`) needs no key directory.
    let p = probe(&f.swtpm.tcti(), true);
    assert_eq!(p.class, Some(ProtectionClass::HardwareTpm));
    let p = probe(&f.swtpm.tcti(), false);
    assert_eq!(p.class, Some(ProtectionClass::OsProtectedNonextractable));
}

#[test]
fn unreachable_tpm_is_a_readable_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = TpmConfig {
        label: "t".into(),
        dir: tmp.path().join("keys"),
        tcti: format!("swtpm:host=127.0.0.1,port={port}"),
        allow_simulator: true,
    };
    let err = TpmBackend::open(&cfg).unwrap_err();
    assert!(matches!(err, BackendError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("not reachable"), "{err}");
    let p = probe(&cfg.tcti, false);
    assert!(!p.reachable());
    assert!(p.to_string().contains("not reachable"));

    let cfg = TpmConfig {
        tcti: "device:/nonexistent/tpmrm0".into(),
        ..cfg
    };
    let err = TpmBackend::open(&cfg).unwrap_err();
    assert!(err.to_string().contains("fix:"), "{err}");
    let cfg = TpmConfig {
        tcti: "nonsense".into(),
        ..cfg
    };
    assert!(matches!(
        TpmBackend::open(&cfg).unwrap_err(),
        BackendError::Unusable(_)
    ));
}

#[test]
fn update_destroy_objects_and_session_keys() {
    let f = Fixture::new();
    let store = f.open();
    let a = store
        .generate_key(&new_key("a", KeyPurpose::General))
        .unwrap();
    let b = store
        .generate_key(&new_key("b", KeyPurpose::Proof))
        .unwrap();
    let marker = store.change_marker();
    assert!(marker.is_some());

    store.update_key(&a.name, "renamed", b"\x01\x02").unwrap();
    let keys = store.load_keys().unwrap();
    let a2 = keys.iter().find(|k| k.name == a.name).unwrap();
    assert_eq!(a2.label, "renamed");
    assert_eq!(a2.id, vec![1, 2]);
    assert_eq!(a2.purpose, KeyPurpose::General);

    sign_and_verify(&b, "before destroy");
    store.destroy_key(&b.name).unwrap();
    assert!(store.load_keys().unwrap().iter().all(|k| k.name != b.name));
    assert!(matches!(
        store.destroy_key(&b.name),
        Err(BackendError::NotFound(_))
    ));
    assert!(matches!(
        store.update_key("key-nonexistent", "x", b""),
        Err(BackendError::NotFound(_))
    ));

    // A session key (CKA_TOKEN=false) signs but is never written.
    let files_before = std::fs::read_dir(f.keys()).unwrap().count();
    let s = store
        .generate_key(&NewKey {
            id: b"s".to_vec(),
            label: "session".into(),
            purpose: KeyPurpose::General,
            persistent: false,
        })
        .unwrap();
    assert!(!s.persistent);
    sign_and_verify(&s, "session");
    assert_eq!(std::fs::read_dir(f.keys()).unwrap().count(), files_before);
    assert_eq!(store.load_keys().unwrap().len(), 1);
    store.destroy_key(&s.name).unwrap();

    // Non-key objects (certificates) round-trip.
    let attrs = vec![
        (0u64, vec![1, 0, 0, 0, 0, 0, 0, 0]),
        (0x11, b"DER".to_vec()),
    ];
    let name = store.store_object(&attrs).unwrap();
    assert_eq!(store.load_objects().unwrap()[0].attributes, attrs);
    let attrs2 = vec![(0x11u64, b"DER2".to_vec())];
    store.update_object(&name, &attrs2).unwrap();
    assert_eq!(store.load_objects().unwrap()[0].attributes, attrs2);
    store.destroy_object(&name).unwrap();
    assert!(store.load_objects().unwrap().is_empty());
    assert!(store.update_object(&name, &attrs2).is_err());
}

/// The transient objects swtpm holds, as tpm2-tools lists them (`None` without tpm2-tools).
fn transient_objects(tcti: &str) -> Option<usize> {
    let out = Command::new("tpm2_getcap")
        .args(["-T", tcti, "handles-transient"])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("0x80"))
            .count(),
    )
}

#[test]
fn every_transient_object_is_flushed() {
    let f = Fixture::new();
    let tcti = f.swtpm.tcti();
    {
        let store = f.open();
        let keys: Vec<KeyRecord> = (0..4)
            .map(|i| {
                store
                    .generate_key(&new_key(&format!("f{i}"), KeyPurpose::General))
                    .unwrap()
            })
            .collect();
        for key in &keys {
            sign_and_verify(key, "x");
        }
        // The SRK and at most the LRU's keys are loaded (swtpm's TCTI lets a second client in).
        if let Some(n) = transient_objects(&tcti) {
            assert!(
                n <= 1 + devicekey_pkcs11::backend::tpm::CACHE_SIZE,
                "{n} objects"
            );
        }
        store.destroy_key(&keys[3].name).unwrap();
        if let Some(n) = transient_objects(&tcti) {
            assert!(
                n <= devicekey_pkcs11::backend::tpm::CACHE_SIZE,
                "{n} objects"
            );
        }
    }
    // Store and signers dropped: nothing of ours is left in the TPM.
    if let Some(n) = transient_objects(&tcti) {
        assert_eq!(n, 0);
    }
}

#[test]
fn objects_of_a_dead_or_rival_client_do_not_block_us() {
    let f = Fixture::new();
    // A client that dies without flushing: its SRK and key stay loaded in swtpm.
    {
        let store = f.open();
        let key = store
            .generate_key(&new_key("leaked", KeyPurpose::General))
            .unwrap();
        sign_and_verify(&key, "x");
        std::mem::forget(key);
        std::mem::forget(store);
    }
    // A second client, alive, with its own SRK and key: the TPM's 3 slots are now full.
    let rival = f.open();
    let rival_key = rival
        .generate_key(&new_key("rival", KeyPurpose::General))
        .unwrap();
    sign_and_verify(&rival_key, "rival 0");

    // We still sign: out of object memory, we reconnect to an emptied TPM; the rival, whose
    // handles went stale, reconnects on its next call.
    let store = f.open();
    let key = store
        .generate_key(&new_key("ours", KeyPurpose::General))
        .unwrap();
    for i in 0..4 {
        sign_and_verify(&key, &format!("ours {i}"));
        sign_and_verify(&rival_key, &format!("rival {i}"));
    }
    if let Some(n) = transient_objects(&f.swtpm.tcti()) {
        assert!(n <= 3, "{n} objects");
    }
}

#[test]
fn tpm2_tools_load_and_sign_with_our_key_file() {
    // Interoperability: tpm2-tools reads the TSS2 PRIVATE KEY file, loads it under the standard
    // ECC SRK it derives itself, and signs; the signature verifies with our public point.
    let tools = ["tpm2_load", "tpm2_sign"];
    if tools
        .iter()
        .any(|t| Command::new(t).arg("--version").output().is_err())
    {
        eprintln!("tpm2-tools not installed; skipping the interoperability check");
        return;
    }
    let f = Fixture::new();
    // Our store and signers are gone before the tools run: swtpm has 3 object slots.
    let (name, point) = {
        let store = f.open();
        let key = store
            .generate_key(&new_key("interop", KeyPurpose::General))
            .unwrap();
        (key.name.clone(), key.public_point)
    };
    let work = f.tmp.path().join("tools");
    std::fs::create_dir_all(&work).unwrap();
    let pem = f.keys().join(format!("{name}.pem"));
    let data = work.join("data");
    std::fs::write(&data, b"signed by tpm2-tools").unwrap();
    let tcti = f.swtpm.tcti();
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(["-T", &tcti])
            .args(&args[1..])
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // With only -r, tpm2_load takes the parent from the file (0x40000001) and derives the SRK.
    run(&["tpm2_load", "-r", pem.to_str().unwrap(), "-c", "key.ctx"]);
    run(&[
        "tpm2_sign",
        "-c",
        "key.ctx",
        "-g",
        "sha256",
        "-s",
        "ecdsa",
        "-f",
        "plain",
        "-o",
        "sig.der",
        "data",
    ]);
    let der = std::fs::read(work.join("sig.der")).unwrap();
    let sig = Signature::from_der(&der).expect("a DER ECDSA signature");
    let vk = VerifyingKey::from_sec1_bytes(&point).unwrap();
    vk.verify_prehash(&digest("signed by tpm2-tools"), &sig)
        .expect("tpm2-tools signed with our key");
}

/// Runs `test` alone in a fresh single-threaded copy of this test binary (fork is only safe
/// without other threads); returns true in the copy itself, where the caller does the work.
fn run_isolated(test: &str) -> bool {
    if std::env::var_os("DEVICEKEY_TPM_TEST_ISOLATED").is_some() {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("DEVICEKEY_TPM_TEST_ISOLATED", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "isolated {test} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    false
}

/// Forks; the child runs `child` and exits with 0 when it returns true. Returns the child's
/// exit status.
fn in_child(child: impl FnOnce() -> bool) -> i32 {
    // SAFETY: the test runs alone in its process (run_isolated), so no other thread holds a
    // lock across fork; the child leaves with _exit and never returns into the harness.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(false);
            libc::_exit(if ok { 0 } else { 1 });
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        }
    }
}

#[test]
fn a_forked_child_never_touches_the_parents_connection() {
    if !run_isolated("a_forked_child_never_touches_the_parents_connection") {
        return;
    }
    let f = Fixture::new();
    let tcti = f.swtpm.tcti();
    let store = f.open();
    let key = store
        .generate_key(&new_key("fork", KeyPurpose::General))
        .unwrap();
    sign_and_verify(&key, "parent before");
    let loaded = transient_objects(&tcti);

    // A child that closes the connection it inherited must not flush the parent's SRK and key
    // (nor end the parent's session).
    let status = in_child(|| {
        store.disconnect();
        true
    });
    assert_eq!(status, 0);
    if let Some(n) = transient_objects(&tcti) {
        assert_eq!(Some(n), loaded, "the child flushed the parent's objects");
    }
    let before = store.signatures_made();
    sign_and_verify(&key, "parent after the first child");
    assert_eq!(store.signatures_made(), before + 1);

    // A child that signs opens its own connection, and the signature verifies.
    let child_key = key.clone();
    let status = in_child(move || {
        let d = digest("child");
        match child_key.signer.sign_digest(&d) {
            Ok(sig) => {
                let vk = VerifyingKey::from_sec1_bytes(&child_key.public_point).unwrap();
                let sig = Signature::from_slice(&sig).unwrap();
                vk.verify_prehash(&d, &sig).is_ok()
            }
            Err(_) => false,
        }
    });
    assert_eq!(status, 0, "the child could not sign");
    // The parent still signs (reconnecting if the child's connection took its TPM slots).
    sign_and_verify(&key, "parent after the second child");
}
