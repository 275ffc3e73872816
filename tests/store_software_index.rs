//! The software store's index (`store.index`): opening a store of 1,200 keys parses no key file,
//! a reload after another instance's change parses none either, and the index is only a cache:
//! a missing, damaged, torn or stale index is repaired from the key files, a key file added or
//! removed behind its back is found or reported gone, and a key whose file went missing fails its
//! first signature with an error instead of a panic.
//!
//! "Parsed" is counted by `index::key_files_parsed()`, a process-wide counter, so the tests of
//! this file take turns (`SERIAL`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use devicekey_pkcs11::backend::index::{key_files_parsed, INDEX_FILE};
use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, KeyPurpose, KeyRecord, NewKey};
use sha2::{Digest, Sha256};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A persistent general key labelled `label`, its CKA_ID 8 bytes of the label's SHA-256.
fn new_key(label: &str) -> NewKey {
    NewKey {
        id: Sha256::digest(label.as_bytes())[..8].to_vec(),
        label: label.to_string(),
        purpose: KeyPurpose::General,
        persistent: true,
    }
}

fn open(dir: &Path) -> SoftwareStore {
    SoftwareStore::open("index", Some(dir)).expect("the store opens")
}

/// Signs with `key` and checks the signature with p256 against its listed point.
fn signs(key: &KeyRecord) {
    let digest: [u8; 32] = Sha256::digest(key.name.as_bytes()).into();
    let sig = key.signer.sign_digest(&digest).expect("the key signs");
    assert!(testkit::verify_prehash(&key.public_point, &digest, &sig));
}

/// A name the store could have given (32 hex digits), derived from `i`.
fn name_of(i: u32) -> String {
    Sha256::digest(i.to_le_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A store with `n` keys: one generated, the other files copies of its file under new names
/// (written behind the index's back, as another program would). Returns the directory.
fn store_with_copies(n: u32) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let store = open(&dir);
    let k = store.generate_key(&new_key("first")).unwrap();
    let original = dir.join(format!("{}.key", k.name));
    for i in 1..n {
        fs::copy(&original, dir.join(format!("{}.key", name_of(i)))).unwrap();
    }
    (tmp, dir)
}

/// Runs `f` and returns its result with the number of key files it parsed.
fn parses<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = key_files_parsed();
    let out = f();
    (out, key_files_parsed() - before)
}

#[test]
fn an_indexed_store_of_1200_keys_opens_without_parsing_a_key_file() {
    let _serial = serial();
    let (_tmp, dir) = store_with_copies(1_200);
    // The first load finds 1,199 files the index does not list: it parses them (and only them)
    // and writes them to the index.
    let (keys, parsed) = parses(|| open(&dir).load_keys().unwrap());
    assert_eq!(keys.len(), 1_200);
    assert_eq!(parsed, 1_199, "only the files the index lacked are parsed");
    // Every later open reads the index only.
    let store = open(&dir);
    let (keys, parsed) = parses(|| store.load_keys().unwrap());
    assert_eq!(keys.len(), 1_200);
    assert_eq!(parsed, 0, "opening an indexed store parses no key file");
    // The first signature of a key reads its file; the second reads nothing.
    let (_, parsed) = parses(|| signs(&keys[600]));
    assert_eq!(parsed, 1);
    let (_, parsed) = parses(|| signs(&keys[600]));
    assert_eq!(parsed, 0);
    // A reload keeps the signer: its file is not read again.
    let again = store.load_keys().unwrap();
    let (_, parsed) = parses(|| signs(&again[600]));
    assert_eq!(parsed, 0, "a reload keeps the parsed key");
}

#[test]
fn another_instances_changes_are_seen_from_the_index_alone() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (a, b) = (open(&dir), open(&dir));
    let k1 = a.generate_key(&new_key("one")).unwrap();
    let k2 = a.generate_key(&new_key("two")).unwrap();
    assert_eq!(b.load_keys().unwrap().len(), 2);
    // Another instance (another process, for all the store knows) creates, relabels, deletes.
    let k3 = a.generate_key(&new_key("three")).unwrap();
    a.update_key(&k1.name, "renamed", b"new-id").unwrap();
    a.destroy_key(&k2.name).unwrap();
    let obj = a
        .store_object(&[(0, vec![1, 0, 0, 0, 0, 0, 0, 0])])
        .unwrap();
    let ((keys, objects), parsed) = parses(|| (b.load_keys().unwrap(), b.load_objects().unwrap()));
    assert_eq!(parsed, 0, "a reload reads the index, not the key files");
    // Oldest first; keys made in the same second are ordered by name.
    let mut names: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
    names.sort();
    let mut want = [k1.name.as_str(), k3.name.as_str()];
    want.sort();
    assert_eq!(names, want);
    let renamed = keys.iter().find(|k| k.name == k1.name).unwrap();
    assert_eq!(renamed.label, "renamed");
    assert_eq!(renamed.id, b"new-id");
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].name, obj);
    for key in &keys {
        signs(key);
    }
}

#[test]
fn a_missing_damaged_or_torn_index_is_rebuilt_from_the_key_files() {
    let _serial = serial();
    let (_tmp, dir) = store_with_copies(50);
    let index = dir.join(INDEX_FILE);
    open(&dir).load_keys().unwrap();
    let whole = fs::read(&index).unwrap();
    type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let damage: [Damage; 5] = [
        ("missing", Box::new(|| fs::remove_file(&index).unwrap())),
        (
            "garbage",
            Box::new(|| fs::write(&index, b"{{{ not json\n").unwrap()),
        ),
        (
            "a bad line in the middle",
            Box::new(|| {
                let mut text = whole.clone();
                let at = text.len() / 2;
                text[at] = b'}';
                fs::write(&index, text).unwrap()
            }),
        ),
        (
            "a hex digit of a public point changed",
            Box::new(|| {
                let mut text = whole.clone();
                let at = text.windows(6).position(|w| w == b"\"q\":\"0").unwrap() + 10;
                text[at] = if text[at] == b'0' { b'1' } else { b'0' };
                fs::write(&index, text).unwrap()
            }),
        ),
        (
            "another format",
            Box::new(|| fs::write(&index, b"{\"format\":\"other\",\"version\":1}\n").unwrap()),
        ),
    ];
    for (what, damage) in damage {
        damage();
        let (keys, parsed) = parses(|| open(&dir).load_keys().unwrap());
        assert_eq!(keys.len(), 50, "{what}: every key is listed");
        assert_eq!(parsed, 50, "{what}: rebuilt from the key files");
        let (keys, parsed) = parses(|| open(&dir).load_keys().unwrap());
        assert_eq!(
            (keys.len(), parsed),
            (50, 0),
            "{what}: the rebuilt index is used"
        );
        signs(&keys[49]);
    }
    // A torn last line (a writer killed mid-append): the record is ignored, its key file parsed;
    // an append never glues a record to the torn line.
    let store = open(&dir);
    store.generate_key(&new_key("last")).unwrap();
    let text = fs::read(&index).unwrap();
    fs::write(&index, &text[..text.len() - 10]).unwrap();
    let (keys, parsed) = parses(|| open(&dir).load_keys().unwrap());
    assert_eq!(
        (keys.len(), parsed),
        (51, 1),
        "only the torn record's file is parsed"
    );
    let text = fs::read(&index).unwrap();
    fs::write(&index, &text[..text.len() - 10]).unwrap();
    let k = store.generate_key(&new_key("after a torn line")).unwrap();
    let (keys, _) = parses(|| open(&dir).load_keys().unwrap());
    assert_eq!(keys.len(), 52);
    assert!(keys.iter().any(|key| key.name == k.name));
    let (_, parsed) = parses(|| open(&dir).load_keys().unwrap());
    assert_eq!(parsed, 0, "the index is whole again");
}

#[test]
fn key_files_added_or_removed_behind_the_index_are_found_or_reported_gone() {
    let _serial = serial();
    let (_tmp, dir) = store_with_copies(20);
    let store = open(&dir);
    let keys = store.load_keys().unwrap();
    assert_eq!(keys.len(), 20);
    // A key file another program wrote without the index.
    let added = name_of(1_000);
    fs::copy(
        dir.join(format!("{}.key", keys[0].name)),
        dir.join(format!("{added}.key")),
    )
    .unwrap();
    // A key file removed behind the index's back, after its key was listed.
    let removed = &keys[5];
    fs::remove_file(dir.join(format!("{}.key", removed.name))).unwrap();
    let (now, parsed) = parses(|| open(&dir).load_keys().unwrap());
    assert_eq!(parsed, 1, "only the new file is parsed");
    assert_eq!(now.len(), 20);
    assert!(now.iter().any(|k| k.name == added), "the new file is found");
    assert!(
        now.iter().all(|k| k.name != removed.name),
        "the removed file is reported gone"
    );
    // The key listed before its file went: its first signature fails cleanly.
    let err = removed
        .signer
        .sign_digest(&[7; 32])
        .expect_err("no file, no signature");
    assert!(err.to_string().contains("missing"), "{err}");
    // Through the store that listed it, the next load drops it too.
    assert!(store
        .load_keys()
        .unwrap()
        .iter()
        .all(|k| k.name != removed.name));
}

#[test]
fn a_key_file_replaced_by_another_key_fails_its_first_signature() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let store = open(&dir);
    let a = store.generate_key(&new_key("a")).unwrap();
    let b = store.generate_key(&new_key("b")).unwrap();
    let listed = open(&dir).load_keys().unwrap();
    let a_listed = listed.iter().find(|k| k.name == a.name).unwrap();
    // A's file now holds B's key (changed in place, not through devicekey).
    fs::copy(
        dir.join(format!("{}.key", b.name)),
        dir.join(format!("{}.key", a.name)),
    )
    .unwrap();
    let err = a_listed.signer.sign_digest(&[7; 32]).unwrap_err();
    assert!(err.to_string().contains("another key"), "{err}");
}
