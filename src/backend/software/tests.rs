//! Tests of the software key store: persistence, atomicity, permissions, several processes,
//! signatures checked with an independent implementation (p256).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use super::*;
use crate::backend::assert_not_found;
use crate::backend::file_store::valid_name;
use crate::backend::{KeyPurpose, Signer};

fn new_key(label: &str, persistent: bool) -> NewKey {
    NewKey {
        id: label.as_bytes().to_vec(),
        label: label.to_string(),
        purpose: KeyPurpose::General,
        persistent,
    }
}

fn verify(point: &[u8; 65], digest: &[u8; 32], sig: &[u8; 64]) {
    let vk = VerifyingKey::from_sec1_bytes(point).expect("valid public point");
    let sig = Signature::from_slice(sig).expect("64-byte signature");
    vk.verify_prehash(digest, &sig).expect("signature verifies");
}

fn sign_and_verify(key: &KeyRecord) {
    let digest: [u8; 32] = Sha256::digest(key.name.as_bytes()).into();
    let sig = key.signer.sign_digest(&digest).expect("signs");
    assert_eq!(sig.len(), 64);
    verify(&key.public_point, &digest, &sig);
}

fn store_dir() -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = crate::test_support::scratch("keys");
    (tmp, dir)
}

/// A new store labelled "t" in a fresh directory (kept while the `TempDir` lives).
fn new_store() -> (tempfile::TempDir, PathBuf, SoftwareStore) {
    let (tmp, dir) = store_dir();
    let store = SoftwareStore::open("t", Some(&dir)).unwrap();
    (tmp, dir, store)
}

#[test]
fn creates_dir_0700_and_reports_info() {
    let (_tmp, dir) = store_dir();
    let store = SoftwareStore::open("devicekey", Some(&dir)).unwrap();
    let meta = fs::metadata(&dir).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700);
    let info = store.info();
    assert_eq!(info.backend, "software");
    assert_eq!(info.manufacturer, "devicekey");
    assert_eq!(info.label, "devicekey");
    assert_eq!(info.serial.len(), 16);
    assert_eq!(
        info.protection_class,
        ProtectionClass::OsProtectedNonextractable
    );
    // Stable across instances.
    let again = SoftwareStore::open("devicekey", Some(&dir)).unwrap();
    assert_eq!(again.info().serial, info.serial);
}

#[test]
fn roundtrip_persist_and_reload() {
    let (_tmp, dir, store) = new_store();
    let a = store.generate_key(&new_key("a", true)).unwrap();
    let mut req = new_key("b", true);
    req.purpose = KeyPurpose::Proof;
    req.id = vec![0, 1, 2, 255];
    let b = store.generate_key(&req).unwrap();
    let s = store.generate_key(&new_key("session", false)).unwrap();
    assert!(!s.persistent);
    sign_and_verify(&a);
    sign_and_verify(&s);

    let key_path = dir.join(format!("{}.key", a.name));
    assert_eq!(fs::metadata(&key_path).unwrap().mode() & 0o777, 0o600);
    // Session keys are never written.
    let files: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(
        files
            .iter()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".key"))
            .count(),
        2
    );

    let reopened = SoftwareStore::open("t", Some(&dir)).unwrap();
    let keys = reopened.load_keys().unwrap();
    assert_eq!(keys.len(), 2);
    let la = keys.iter().find(|k| k.name == a.name).unwrap();
    let lb = keys.iter().find(|k| k.name == b.name).unwrap();
    assert_eq!(la.label, "a");
    assert_eq!(la.id, b"a");
    assert_eq!(la.public_point, a.public_point);
    assert_eq!(la.purpose, KeyPurpose::General);
    assert!(la.persistent);
    assert_eq!(lb.id, vec![0, 1, 2, 255]);
    assert_eq!(lb.purpose, KeyPurpose::Proof);
    assert_eq!(lb.public_point, b.public_point);
    sign_and_verify(la);
    sign_and_verify(lb);
    // The same loaded signer signs repeatedly (the parsed key is cached).
    sign_and_verify(la);
}

#[test]
fn signatures_are_padded_raw_r_s() {
    let (_tmp, _dir, store) = new_store();
    store.generate_key(&new_key("k", true)).unwrap();
    // A loaded key (deferred parse) and a fresh one.
    let key = store.load_keys().unwrap().remove(0);
    let mut padded = 0;
    let mut checked = 0;
    for i in 0u32..20_000 {
        let digest: [u8; 32] = Sha256::digest(i.to_le_bytes()).into();
        let sig = key.signer.sign_digest(&digest).unwrap();
        let short = sig[0] == 0 || sig[32] == 0;
        if short || i < 50 {
            verify(&key.public_point, &digest, &sig);
            checked += 1;
        }
        if short {
            padded += 1;
            if padded >= 5 {
                break;
            }
        }
    }
    assert!(
        padded >= 5,
        "saw only {padded} signatures with a leading zero byte"
    );
    assert!(checked >= 50);
}

#[test]
fn wrong_scalar_fails_to_sign_without_panic() {
    let g1 = SoftwareSigner::generate().unwrap();
    let g2 = SoftwareSigner::generate().unwrap();
    let mixed = SoftwareSigner::deferred(g1.public_point, g2.scalar);
    assert!(matches!(
        mixed.sign_digest(&[7u8; 32]),
        Err(BackendError::Crypto(_))
    ));
}

#[test]
fn temp_and_damaged_files_are_never_keys() {
    let (_tmp, dir, store) = new_store();
    let good = store.generate_key(&new_key("good", true)).unwrap();
    let text = fs::read(dir.join(format!("{}.key", good.name))).unwrap();

    // A leftover temporary file with a complete key inside.
    let tmp_name = format!(".{}.key.0123.tmp", "ab".repeat(16));
    fs::write(dir.join(&tmp_name), &text).unwrap();
    // Truncated, empty, garbage, wrong-version and wrongly named files.
    let v2 = String::from_utf8(text.clone())
        .unwrap()
        .replace("\"version\": 1", "\"version\": 2");
    let key_file = |digits: &str| format!("{}.key", digits.repeat(16));
    let junk: [(String, &[u8]); 7] = [
        (key_file("11"), &text[..text.len() / 2]),
        (key_file("22"), b""),
        (key_file("33"), b"\x00\xff garbage"),
        (key_file("44"), v2.as_bytes()),
        ("notakey.key".into(), &text),
        (format!("{}.key.bak", "55".repeat(16)), &text),
        (format!("{}.obj", "66".repeat(16)), b"{\"format\":"),
    ];
    for (name, bytes) in junk {
        fs::write(dir.join(name), bytes).unwrap();
    }

    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, good.name);
    assert!(store.load_objects().unwrap().is_empty());

    // Opening the store again removes the stale temporary file (nobody holds the lock).
    let _again = SoftwareStore::open("t", Some(&dir)).unwrap();
    assert!(!dir.join(&tmp_name).exists());
    assert!(dir.join(format!("{}.key", good.name)).exists());
}

#[test]
fn refuses_group_accessible_dir() {
    let (_tmp, dir) = store_dir();
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
    let err = SoftwareStore::open("t", Some(&dir)).unwrap_err();
    match err {
        BackendError::Unusable(msg) => {
            assert!(msg.contains("writable by group or others"), "{msg}");
            assert!(msg.contains("chmod 700"), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o707)).unwrap();
    assert!(SoftwareStore::open("t", Some(&dir)).is_err());
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(SoftwareStore::open("t", Some(&dir)).is_ok());
}

#[test]
fn refuses_dir_owned_by_someone_else() {
    // Handing the directory to another user needs root (CI runs as root).
    if rustix::process::geteuid().as_raw() != 0 {
        return;
    }
    let (_tmp, dir) = store_dir();
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    match SoftwareStore::open("t", Some(&dir)).unwrap_err() {
        BackendError::Unusable(msg) => {
            assert!(msg.contains("owned by uid 65534"), "{msg}");
            assert!(msg.contains("chown"), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn refuses_a_file_as_dir() {
    let (tmp, _) = store_dir();
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        SoftwareStore::open("t", Some(&file)),
        Err(BackendError::Unusable(_))
    ));
}

#[test]
fn update_and_destroy_keys() {
    let (_tmp, dir, store) = new_store();
    let k = store.generate_key(&new_key("old", true)).unwrap();
    store.update_key(&k.name, "new label", &[9, 9]).unwrap();
    let loaded = SoftwareStore::open("t", Some(&dir))
        .unwrap()
        .load_keys()
        .unwrap();
    assert_eq!(loaded[0].label, "new label");
    assert_eq!(loaded[0].id, vec![9, 9]);
    assert_eq!(loaded[0].public_point, k.public_point);
    sign_and_verify(&loaded[0]);
    assert_eq!(
        fs::metadata(dir.join(format!("{}.key", k.name)))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );

    store.destroy_key(&k.name).unwrap();
    assert!(store.load_keys().unwrap().is_empty());
    assert_not_found(store.destroy_key(&k.name));
    assert_not_found(store.update_key(&k.name, "x", b""));
    for bad in ["../x", "", ".lock", "session-nope", "ZZ"] {
        assert_not_found(store.destroy_key(bad));
    }

    // Session keys: update and destroy in memory.
    let s = store.generate_key(&new_key("s", false)).unwrap();
    store.update_key(&s.name, "s2", b"id").unwrap();
    store.destroy_key(&s.name).unwrap();
    assert_not_found(store.destroy_key(&s.name));
}

#[test]
fn store_update_destroy_objects() {
    let (_tmp, dir, store) = new_store();
    let attrs: Vec<RawAttribute> = vec![
        (0, vec![1, 0, 0, 0, 0, 0, 0, 0]),
        (3, b"cert".to_vec()),
        (0x11, vec![0u8; 3000]),
    ];
    let name = store.store_object(&attrs).unwrap();
    assert!(valid_name(&name));
    assert_eq!(
        fs::metadata(dir.join(format!("{name}.obj")))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    let other = SoftwareStore::open("t", Some(&dir)).unwrap();
    let objs = other.load_objects().unwrap();
    assert_eq!(objs.len(), 1);
    assert_eq!(objs[0].name, name);
    assert_eq!(objs[0].attributes, attrs);

    let new_attrs: Vec<RawAttribute> = vec![(3, b"renamed".to_vec()), (0x102, vec![])];
    store.update_object(&name, &new_attrs).unwrap();
    assert_eq!(other.load_objects().unwrap()[0].attributes, new_attrs);
    // Objects are not keys and keys are not objects.
    assert!(other.load_keys().unwrap().is_empty());

    store.destroy_object(&name).unwrap();
    assert!(other.load_objects().unwrap().is_empty());
    assert_not_found(store.destroy_object(&name));
    assert_not_found(store.update_object(&name, &new_attrs));
}

#[test]
fn change_marker_sees_other_instances() {
    let (_tmp, dir) = store_dir();
    let a = SoftwareStore::open("t", Some(&dir)).unwrap();
    let b = SoftwareStore::open("t", Some(&dir)).unwrap();
    let m0 = a.change_marker().unwrap();
    assert_eq!(a.change_marker(), Some(m0));
    // Opening the store (another process starting) is not a change.
    SoftwareStore::open("t", Some(&dir)).unwrap();
    assert_eq!(a.change_marker(), Some(m0));
    let k = b.generate_key(&new_key("k", true)).unwrap();
    let m1 = a.change_marker().unwrap();
    assert_ne!(m0, m1);
    b.update_key(&k.name, "x", b"x").unwrap();
    let m2 = a.change_marker().unwrap();
    assert_ne!(m1, m2);
    b.store_object(&[(0, vec![])]).unwrap();
    assert_ne!(a.change_marker().unwrap(), m2);
    // Session keys change nothing on disk.
    let m3 = a.change_marker().unwrap();
    b.generate_key(&new_key("s", false)).unwrap();
    assert_eq!(a.change_marker().unwrap(), m3);
}

#[test]
fn loads_ten_thousand_keys_quickly() {
    let (_tmp, dir, store) = new_store();
    let k = store.generate_key(&new_key("k", true)).unwrap();
    let text = fs::read(dir.join(format!("{}.key", k.name))).unwrap();
    for i in 0u32..9_999 {
        let name = crate::encoding::hex(&Sha256::digest(i.to_le_bytes())[..16]);
        let path = dir.join(format!("{name}.key"));
        fs::write(&path, &text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let start = Instant::now();
    let keys = store.load_keys().unwrap();
    let took = start.elapsed();
    assert_eq!(keys.len(), 10_000);
    // Release builds take a fraction of this; debug builds are slower.
    let limit = if cfg!(debug_assertions) { 3 } else { 1 };
    assert!(took < Duration::from_secs(limit), "{took:?}");
    sign_and_verify(&keys[5000]);
}

const CHILD_ENV: &str = "DEVICEKEY_TEST_SOFTWARE_CHILD_DIR";
const CHILD_KEYS: usize = 25;
const CHILDREN: usize = 4;

/// Not a test on its own: the body of each child process of `processes_create_keys_at_once`.
#[test]
fn child_creates_keys() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let go = dir.join("go");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Wait for the starting signal so the children really run at the same time.
    while !go.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let store = SoftwareStore::open("t", Some(&dir.join("keys"))).unwrap();
    for i in 0..CHILD_KEYS {
        let k = store
            .generate_key(&new_key(&format!("p{}-{i}", std::process::id()), true))
            .unwrap();
        sign_and_verify(&k);
    }
}

#[test]
fn processes_create_keys_at_once() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "backend::software::tests::child_creates_keys",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(CHILD_ENV, tmp.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    fs::write(tmp.path().join("go"), b"").unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let store = SoftwareStore::open("t", Some(&tmp.path().join("keys"))).unwrap();
    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), CHILDREN * CHILD_KEYS);
    let labels: std::collections::HashSet<_> = keys.iter().map(|k| k.label.clone()).collect();
    assert_eq!(labels.len(), CHILDREN * CHILD_KEYS);
    for k in &keys {
        sign_and_verify(k);
    }
    // No temporary file is left behind.
    for e in fs::read_dir(tmp.path().join("keys")).unwrap().flatten() {
        assert!(!e.file_name().to_string_lossy().ends_with(".tmp"));
    }
}

#[test]
fn key_file_format_is_pinned() {
    let (_tmp, dir, store) = new_store();
    let mut req = new_key("label \"quoted\" é", true);
    req.id = vec![0xde, 0xad];
    req.purpose = KeyPurpose::Proof;
    let k = store.generate_key(&req).unwrap();
    let text = fs::read_to_string(dir.join(format!("{}.key", k.name))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], "devicekey-software-key");
    assert_eq!(v["version"], 1);
    assert_eq!(v["id"], "dead");
    assert_eq!(v["label"], "label \"quoted\" é");
    assert_eq!(v["purpose"], "proof");
    assert_eq!(v["public_point"], crate::encoding::hex(&k.public_point));
    assert_eq!(v["private_scalar"].as_str().unwrap().len(), 64);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    // The key file buffer is sized so that it never reallocates (no unwiped copies).
    let file = KeyFile::parse(text.as_bytes()).unwrap();
    let bytes = file.to_bytes().unwrap();
    assert!(bytes.len() < 1024 + file.label.len() * 6);
    let long = KeyFile {
        label: "\u{1}".repeat(300),
        id: Hex(vec![1; 300]),
        ..KeyFile::parse(text.as_bytes()).unwrap()
    };
    let cap = 1024 + long.label.len() * 6 + long.id.0.len() * 2;
    assert_eq!(long.to_bytes().unwrap().capacity(), cap);
}

#[test]
fn one_signer_signs_from_many_threads() {
    let (_tmp, _dir, store) = new_store();
    store.generate_key(&new_key("k", true)).unwrap();
    // Loaded (deferred parse): the threads race to build the key.
    let key = store.load_keys().unwrap().remove(0);
    std::thread::scope(|s| {
        for t in 0u8..4 {
            let key = &key;
            s.spawn(move || {
                for i in 0u8..50 {
                    let digest = [t ^ i; 32];
                    let sig = key.signer.sign_digest(&digest).unwrap();
                    verify(&key.public_point, &digest, &sig);
                }
            });
        }
    });
}

#[test]
fn threads_with_separate_instances_create_keys() {
    let (_tmp, dir) = store_dir();
    SoftwareStore::open("t", Some(&dir)).unwrap();
    let shared = SoftwareStore::open("t", Some(&dir)).unwrap();
    std::thread::scope(|s| {
        for t in 0..3 {
            let dir = &dir;
            let shared = &shared;
            s.spawn(move || {
                let own = SoftwareStore::open("t", Some(dir)).unwrap();
                for i in 0..5 {
                    own.generate_key(&new_key(&format!("own{t}-{i}"), true))
                        .unwrap();
                    shared
                        .generate_key(&new_key(&format!("shared{t}-{i}"), true))
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(shared.load_keys().unwrap().len(), 30);
}
