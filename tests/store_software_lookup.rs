//! Lookups by CKA_LABEL and CKA_ID in the software store (`Backend::lookup`): while the
//! directory's stamp is valid a lookup reads one hint bucket and parses only its candidates' key
//! files (one key of 1,200: one file); the hints are a superset that never hides a key another
//! instance relabelled or deleted; a key file copied in by hand, a bucket deleted, damaged,
//! truncated or loosened by hand are all answered right (a full check repairs them); the store's
//! own changes carry the stamp over, a file added by hand between them does not.
//!
//! "Parsed" is counted by `index::key_files_parsed()`, a process-wide counter, so the tests of
//! this file take turns (`SERIAL`). A full check stamps the directory only when its mtime is at
//! least 100 ms old, so the tests that need a stamp set the mtime a second into the past first
//! (`stamped`).

use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use cryptoki_sys::{CKA_CLASS, CKA_ID, CKA_LABEL, CKO_DATA};
use devicekey_pkcs11::backend::index::key_files_parsed;
use devicekey_pkcs11::backend::keydir::KeyDir;
use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, Found, KeyPurpose, LookupAttribute, NewKey};
use sha2::{Digest, Sha256};

use LookupAttribute::{Id, Label};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The CKA_ID the keys of these tests get: the label's bytes behind a prefix.
fn id_for(label: &str) -> Vec<u8> {
    [b"id:".as_slice(), label.as_bytes()].concat()
}

/// A persistent key request labelled `label`, with [`id_for`] as its CKA_ID.
fn request(label: &str) -> NewKey {
    NewKey {
        label: label.to_string(),
        id: id_for(label),
        persistent: true,
        purpose: KeyPurpose::General,
    }
}

/// A temporary directory and the path of a store in it (made by the first open).
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    (tmp, dir)
}

fn open(dir: &Path) -> SoftwareStore {
    SoftwareStore::open("lookup", Some(dir)).expect("the store opens")
}

/// True when the stamp in the directory's `.lock` matches the directory.
fn stamp_valid(dir: &Path) -> bool {
    KeyDir::open(dir).expect("the key dir opens").stamp_valid()
}

/// A lookup through a fresh instance of the store (another process's first lookup), with the
/// number of key files it parsed.
fn look_up(dir: &Path, attribute: LookupAttribute, value: &[u8]) -> (Found, u64) {
    let store = open(dir);
    let before = key_files_parsed();
    let found = store
        .lookup(attribute, value)
        .expect("the lookup succeeds")
        .expect("the software store answers lookups");
    (found, key_files_parsed() - before)
}

/// The names of the keys a lookup found.
fn key_names(found: &Found) -> Vec<&str> {
    found.keys.iter().map(|k| k.name.as_str()).collect()
}

/// Sets the directory's mtime a second into the past, so the next full check may stamp it (a
/// check refuses an mtime less than 100 ms old).
fn backdate(dir: &Path) {
    let past = SystemTime::now() - Duration::from_secs(1);
    fs::File::open(dir)
        .and_then(|d| d.set_modified(past))
        .expect("set the directory's mtime");
}

/// Makes the stamp valid: a backdated directory, then a lookup (its full check stamps).
fn stamped(dir: &Path) {
    backdate(dir);
    look_up(dir, Label, b"no key has this label");
    assert!(stamp_valid(dir), "a full check stamps a settled directory");
}

/// A name the store could have given (32 hex digits), derived from `i`.
fn file_stem(i: u32) -> String {
    hex::encode(&Sha256::digest(format!("stem {i}"))[..16])
}

/// Writes `bytes` to `path` with mode 0600, as the store's files are.
fn write_owner_only(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A store of `n` keys labelled `key-0` .. `key-<n-1>`: the first generated, the others its key
/// file with another label and CKA_ID, written under new names behind the store's back (fast;
/// they share one key pair). The store has not checked them yet.
fn store_of(n: u32) -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = scratch();
    let first = open(&dir).generate_key(&request("key-0")).unwrap();
    let text = fs::read(dir.join(format!("{}.key", first.name))).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&text).unwrap();
    for i in 1..n {
        let label = format!("key-{i}");
        json["label"] = label.clone().into();
        json["id"] = hex::encode(id_for(&label)).into();
        let bytes = serde_json::to_vec(&json).unwrap();
        write_owner_only(&dir.join(format!("{}.key", file_stem(i))), &bytes);
    }
    (tmp, dir)
}

/// The hash a hint keeps of an attribute's value (the documented bucket format).
fn hint_hash(attribute: LookupAttribute, value: &[u8]) -> [u8; 8] {
    let tag: &[u8] = match attribute {
        Label => b"devicekey-hint label\0",
        Id => b"devicekey-hint id\0",
    };
    let digest = Sha256::new()
        .chain_update(tag)
        .chain_update(value)
        .finalize();
    digest[..8].try_into().unwrap()
}

/// The bucket file that holds the hints of `attribute` = `value`.
fn bucket_of(dir: &Path, attribute: LookupAttribute, value: &[u8]) -> PathBuf {
    dir.join(format!("store.hint.{:02x}", hint_hash(attribute, value)[0]))
}

/// The line of a text with its check: `<text> <8 hex digits of its SHA-256>`.
fn checked_line(text: &str) -> String {
    format!("{text} {}\n", hex::encode(&Sha256::digest(text)[..4]))
}

/// The hint line that says key `name` may hold `attribute` = `value`.
fn key_hint(attribute: LookupAttribute, value: &[u8], name: &str) -> String {
    checked_line(&format!(
        "{} k {name}",
        hex::encode(hint_hash(attribute, value))
    ))
}

/// True when every line of a bucket file is whole and its check holds.
fn bucket_whole(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    text.ends_with('\n')
        && text.lines().all(|line| {
            line.rsplit_once(' ')
                .is_some_and(|(body, _)| checked_line(body) == format!("{line}\n"))
        })
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_lookup_in_a_stamped_store_of_1200_keys_parses_only_the_key_it_finds() {
    let _serial = serial();
    let (_tmp, dir) = store_of(1_200);
    backdate(&dir);
    let keys = open(&dir).load_keys().unwrap();
    assert_eq!(keys.len(), 1_200);
    assert!(stamp_valid(&dir), "the full check stamped the directory");
    let buckets = fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("store.hint.")
        })
        .count();
    assert!(
        buckets > 200,
        "2,400 hints fill most of 256 buckets: {buckets}"
    );

    let before = key_files_parsed();
    let store = open(&dir);
    assert_eq!(
        key_files_parsed(),
        before,
        "opening the store parses nothing"
    );

    let (found, parsed) = look_up(&dir, Label, b"key-777");
    assert_eq!(key_names(&found), [file_stem(777).as_str()]);
    assert_eq!(found.keys[0].label, "key-777");
    assert_eq!(found.keys[0].id, id_for("key-777"));
    assert!(found.objects.is_empty());
    assert_eq!(
        parsed, 1,
        "a lookup by label parses the one key file it finds"
    );

    let (found, parsed) = look_up(&dir, Id, &id_for("key-1100"));
    assert_eq!(key_names(&found), [file_stem(1100).as_str()]);
    assert_eq!(found.keys[0].label, "key-1100");
    assert_eq!(
        parsed, 1,
        "a lookup by CKA_ID parses the one key file it finds"
    );

    let (found, parsed) = look_up(&dir, Label, b"key-1200");
    assert!(found.keys.is_empty() && found.objects.is_empty());
    assert_eq!(parsed, 0, "a label nobody holds parses no key file");
    let (found, parsed) = look_up(&dir, Id, b"key-5");
    assert!(found.keys.is_empty(), "a label is not a CKA_ID");
    assert_eq!(parsed, 0);

    // The key found signs (its file was written behind the store's back, with key-0's pair).
    let found = store.lookup(Label, b"key-42").unwrap().unwrap();
    let digest = [0x42; 32];
    let sig = found.keys[0].signer.sign_digest(&digest).unwrap();
    assert!(testkit::verify_prehash(
        &found.keys[0].public_point,
        &digest,
        &sig
    ));
    assert!(stamp_valid(&dir), "lookups leave the stamp alone");
}

#[test]
fn another_instances_relabel_and_delete_are_seen_and_objects_are_found() {
    let _serial = serial();
    let (_tmp, dir) = scratch();
    let other = open(&dir);
    let alpha = other.generate_key(&request("alpha")).unwrap();
    let beta = other.generate_key(&request("beta")).unwrap();
    stamped(&dir);
    let mine = open(&dir);
    let found = mine.lookup(Label, b"alpha").unwrap().unwrap();
    assert_eq!(key_names(&found), [alpha.name.as_str()]);

    // Relabelled (and given a new CKA_ID) by the other instance.
    other.update_key(&alpha.name, "alpha2", b"new-id").unwrap();
    assert!(stamp_valid(&dir), "the relabel carried the stamp");
    let (found, parsed) = look_up(&dir, Label, b"alpha");
    assert!(found.keys.is_empty(), "the old label finds nothing");
    assert_eq!(parsed, 1, "its stale hint was checked against the key file");
    let found = mine.lookup(Label, b"alpha").unwrap().unwrap();
    assert!(
        found.keys.is_empty(),
        "nor through an instance that found it"
    );
    assert!(mine
        .lookup(Id, &id_for("alpha"))
        .unwrap()
        .unwrap()
        .keys
        .is_empty());
    let found = mine.lookup(Label, b"alpha2").unwrap().unwrap();
    assert_eq!(key_names(&found), [alpha.name.as_str()]);
    assert_eq!(found.keys[0].id, b"new-id");
    let found = mine.lookup(Id, b"new-id").unwrap().unwrap();
    assert_eq!(key_names(&found), [alpha.name.as_str()]);

    // Deleted by the other instance.
    assert_eq!(
        key_names(&mine.lookup(Label, b"beta").unwrap().unwrap()),
        [beta.name.as_str()]
    );
    other.destroy_key(&beta.name).unwrap();
    assert!(stamp_valid(&dir), "the delete carried the stamp");
    for (attribute, value) in [(Label, b"beta".to_vec()), (Id, id_for("beta"))] {
        let found = mine.lookup(attribute, &value).unwrap().unwrap();
        assert!(
            found.keys.is_empty(),
            "{attribute:?}: a deleted key is gone"
        );
    }

    // Objects, by each of their attributes.
    let class = (CKA_CLASS, CKO_DATA.to_ne_bytes().to_vec());
    let object = other
        .store_object(&[
            class,
            (CKA_LABEL, b"an object".to_vec()),
            (CKA_ID, b"object-id".to_vec()),
        ])
        .unwrap();
    assert!(stamp_valid(&dir), "storing an object carried the stamp");
    for (attribute, value) in [(Label, b"an object".as_slice()), (Id, b"object-id")] {
        let (found, parsed) = look_up(&dir, attribute, value);
        assert!(found.keys.is_empty(), "{attribute:?}");
        let names: Vec<_> = found.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, [object.as_str()], "{attribute:?}");
        assert!(found.objects[0]
            .attributes
            .contains(&(CKA_LABEL, b"an object".to_vec())));
        assert_eq!(parsed, 0, "an object is not a key file");
    }
    other.destroy_object(&object).unwrap();
    assert!(look_up(&dir, Label, b"an object").0.objects.is_empty());
}

#[test]
fn a_key_file_copied_in_by_hand_is_found_and_the_store_is_stamped_again() {
    let _serial = serial();
    let (tmp, dir) = scratch();
    open(&dir).generate_key(&request("resident")).unwrap();
    stamped(&dir);
    // A key made in another directory, its file copied in by hand.
    let elsewhere = tmp.path().join("elsewhere");
    let made = open(&elsewhere).generate_key(&request("copied")).unwrap();
    let file = format!("{}.key", made.name);
    fs::copy(elsewhere.join(&file), dir.join(&file)).unwrap();
    fs::set_permissions(dir.join(&file), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!stamp_valid(&dir), "the copy changed the directory");

    let (found, parsed) = look_up(&dir, Label, b"copied");
    assert_eq!(key_names(&found), [made.name.as_str()]);
    assert_eq!(found.keys[0].public_point, made.public_point);
    assert_eq!(
        parsed, 1,
        "the full check parsed the one file it did not know"
    );
    let found = open(&dir).lookup(Id, &id_for("copied")).unwrap().unwrap();
    assert_eq!(key_names(&found), [made.name.as_str()]);

    // Once the directory has settled, the next check stamps it and lookups use the hints.
    std::thread::sleep(Duration::from_millis(150));
    look_up(&dir, Label, b"resident");
    assert!(stamp_valid(&dir), "stamped again after the settle time");
    let (found, parsed) = look_up(&dir, Label, b"copied");
    assert_eq!(key_names(&found), [made.name.as_str()]);
    assert_eq!(parsed, 1, "found from its hint");
}

/// How a test damages a bucket file by hand.
#[derive(Clone, Copy, Debug)]
enum Damage {
    Deleted,
    FlippedByte,
    TruncatedMidLine,
    Mode0644,
}

/// Makes key `label` the last hint of its label bucket under a valid stamp, damages that bucket,
/// and checks that a lookup still finds the key. Returns the bucket's path and the hint line.
fn damaged_bucket_still_finds(dir: &Path, label: &str, damage: Damage) -> (PathBuf, String) {
    stamped(dir);
    let key = open(dir).generate_key(&request(label)).unwrap();
    assert!(
        stamp_valid(dir),
        "{damage:?}: the store's change carried the stamp"
    );
    let bucket = bucket_of(dir, Label, label.as_bytes());
    let line = key_hint(Label, label.as_bytes(), &key.name);
    let bytes = fs::read(&bucket).unwrap();
    assert!(
        bytes.ends_with(line.as_bytes()),
        "{damage:?}: the new key's hint is the bucket's last line"
    );
    let in_place = || fs::OpenOptions::new().write(true).open(&bucket).unwrap();
    match damage {
        Damage::Deleted => fs::remove_file(&bucket).unwrap(),
        Damage::FlippedByte => {
            let at = (bytes.len() - line.len() / 2) as u64;
            in_place().write_at(b"#", at).unwrap();
        }
        Damage::TruncatedMidLine => in_place().set_len((bytes.len() - 10) as u64).unwrap(),
        Damage::Mode0644 => {
            fs::set_permissions(&bucket, fs::Permissions::from_mode(0o644)).unwrap()
        }
    }
    // A settled directory, so the repair's check may stamp it.
    std::thread::sleep(Duration::from_millis(150));
    if !matches!(damage, Damage::Deleted) {
        assert!(
            stamp_valid(dir),
            "{damage:?}: a change in place leaves the stamp valid"
        );
    }
    let (found, _) = look_up(dir, Label, label.as_bytes());
    assert_eq!(
        key_names(&found),
        [key.name.as_str()],
        "{damage:?}: the key is still found"
    );
    (bucket, line)
}

#[test]
fn a_bucket_deleted_damaged_or_loosened_by_hand_still_finds_its_keys() {
    let _serial = serial();
    let (_tmp, dir) = scratch();
    let store = open(&dir);
    for i in 0..8 {
        store
            .generate_key(&request(&format!("resident-{i}")))
            .unwrap();
    }
    for (label, damage) in [
        ("deleted", Damage::Deleted),
        ("flipped", Damage::FlippedByte),
        ("loosened", Damage::Mode0644),
    ] {
        let (bucket, line) = damaged_bucket_still_finds(&dir, label, damage);
        // The full check rewrote the bucket whole, with the key's hint, owner-only again.
        let bytes = fs::read(&bucket).unwrap();
        assert!(bucket_whole(&bytes), "{damage:?}: the bucket parses again");
        assert!(
            String::from_utf8_lossy(&bytes).contains(&line),
            "{damage:?}: the bucket holds the key's hint again"
        );
        assert_eq!(mode_of(&bucket), 0o600, "{damage:?}");
        assert!(
            stamp_valid(&dir),
            "{damage:?}: the repair stamped the store"
        );
        let (found, parsed) = look_up(&dir, Label, label.as_bytes());
        assert_eq!(found.keys.len(), 1, "{damage:?}");
        assert_eq!(parsed, 1, "{damage:?}: found from the repaired hints");
    }
}

#[test]
fn a_bucket_truncated_mid_line_by_hand_still_finds_its_key() {
    let _serial = serial();
    let (_tmp, dir) = scratch();
    open(&dir).generate_key(&request("resident")).unwrap();
    damaged_bucket_still_finds(&dir, "truncated", Damage::TruncatedMidLine);
}

#[test]
fn the_stores_own_changes_carry_the_stamp_and_a_file_added_by_hand_breaks_it() {
    let _serial = serial();
    let (_tmp, dir) = scratch();
    let store = open(&dir);
    store.generate_key(&request("first")).unwrap();
    stamped(&dir);

    for label in ["c1", "c2", "c3"] {
        let key = store.generate_key(&request(label)).unwrap();
        assert!(stamp_valid(&dir), "{label}: creating a key keeps the stamp");
        let (found, parsed) = look_up(&dir, Label, label.as_bytes());
        assert_eq!(key_names(&found), [key.name.as_str()], "{label}");
        assert_eq!(parsed, 1, "{label}: found from its hint, no full check");
        assert!(stamp_valid(&dir), "{label}");
    }

    // A file added by hand between two of the store's own changes.
    let d1 = store.generate_key(&request("d1")).unwrap();
    assert!(stamp_valid(&dir));
    std::thread::sleep(Duration::from_millis(20));
    write_owner_only(&dir.join("x.key"), b"junk");
    std::thread::sleep(Duration::from_millis(20));
    let d2 = store.generate_key(&request("d2")).unwrap();
    assert!(
        !stamp_valid(&dir),
        "a change not made by the store leaves the stamp invalid"
    );
    for (label, key) in [("d1", &d1), ("d2", &d2)] {
        let (found, _) = look_up(&dir, Label, label.as_bytes());
        assert_eq!(key_names(&found), [key.name.as_str()], "{label}");
    }
}

/// A store instance that already read the whole store (its contents are cached for the current
/// change marker) still rebuilds a bucket damaged in place at its next lookup: the damage moves
/// no marker, so the repair must not answer from that cache alone.
#[test]
fn a_long_lived_store_repairs_a_damaged_bucket_at_once() {
    let _serial = serial();
    let (_tmp, dir) = scratch();
    let store = open(&dir);
    let key = store.generate_key(&request("long-lived")).unwrap();
    stamped(&dir);
    assert_eq!(
        store.load_keys().unwrap().len(),
        1,
        "the whole store, cached"
    );
    let bucket = bucket_of(&dir, Label, b"long-lived");
    let line = key_hint(Label, b"long-lived", &key.name);
    let bytes = fs::read(&bucket).unwrap();
    let at = (bytes.len() - line.len() / 2) as u64;
    let in_place = fs::OpenOptions::new().write(true).open(&bucket).unwrap();
    in_place.write_at(b"#", at).unwrap();
    assert!(!bucket_whole(&fs::read(&bucket).unwrap()));
    let found = store
        .lookup(Label, b"long-lived")
        .unwrap()
        .expect("a lookup");
    assert_eq!(key_names(&found), [key.name.as_str()]);
    let repaired = fs::read(&bucket).unwrap();
    assert!(
        bucket_whole(&repaired),
        "the same lookup rebuilt the bucket"
    );
    assert!(String::from_utf8_lossy(&repaired).contains(&line));
}

/// A relabel forgets the key's name in the index before it rewrites the key file. From then
/// until the new entry is recorded no valid stamp may be on disk (a crash would leave a stamp
/// vouching for an index that lacks a key whose file is there), and a change that never
/// completes (its file write failed, say on a full disk) leaves no stamp when the lock is
/// released, so the next listing makes a full check and lists the key again.
#[test]
fn an_index_change_in_flight_leaves_no_valid_stamp() {
    use devicekey_pkcs11::backend::index::StoreIndex;
    let _serial = serial();
    let (_tmp, dir) = scratch();
    let key = open(&dir).generate_key(&request("in-flight")).unwrap();
    stamped(&dir);
    let kd = KeyDir::open(&dir).unwrap();
    let lock = kd.lock().unwrap();
    StoreIndex::default().forget(&kd, &lock, &key.name).unwrap();
    assert!(
        !stamp_valid(&dir),
        "a crash here must not leave a stamp for an index that lacks the key"
    );
    drop(lock);
    assert!(!stamp_valid(&dir), "an unfinished change leaves no stamp");
    let keys = open(&dir).load_keys().unwrap();
    assert_eq!(keys.len(), 1, "the full check lists the key again");
    assert_eq!(keys[0].name, key.name);
}
