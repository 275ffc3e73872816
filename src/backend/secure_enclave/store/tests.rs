//! The store's file handling, driven by an in-process stand-in for the enclave (software P-256
//! keys behind opaque handles): what the store writes, reads back, skips and deletes. The
//! Security-framework side is not exercised here; it runs only on a Mac.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

use super::*;
use crate::backend::assert_not_found;
use crate::backend::file_store::SESSION_PREFIX;
use crate::backend::index::is_bucket_file;
use crate::backend::{KeyPurpose, ProtectionClass};

#[derive(Default)]
struct TestEnclave {
    keys: Mutex<HashMap<Vec<u8>, SigningKey>>,
    deleted: Mutex<Vec<Vec<u8>>>,
    opens: Mutex<usize>,
}

struct TestSigner(SigningKey);

impl Signer for TestSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let sig: Signature = self
            .0
            .sign_prehash(digest)
            .map_err(|e| BackendError::Crypto(e.to_string()))?;
        Ok(sig.to_bytes().into())
    }
}

fn point_of(key: &SigningKey) -> [u8; POINT_LEN] {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .unwrap()
}

impl Enclave for TestEnclave {
    fn create(&self, _route: Route, _label: &str, _permanent: bool) -> Result<CreatedKey> {
        let key = loop {
            let mut scalar = [0u8; 32];
            getrandom::getrandom(&mut scalar).unwrap();
            if let Ok(k) = SigningKey::from_slice(&scalar) {
                break k;
            }
        };
        let mut handle = vec![0u8; 24];
        getrandom::getrandom(&mut handle).unwrap();
        self.keys
            .lock()
            .unwrap()
            .insert(handle.clone(), key.clone());
        Ok(CreatedKey {
            handle,
            public_point: point_of(&key),
            signer: Arc::new(TestSigner(key)),
        })
    }

    fn open(&self, _route: Route, handle: &[u8]) -> Result<OpenedKey> {
        *self.opens.lock().unwrap() += 1;
        let key = self
            .keys
            .lock()
            .unwrap()
            .get(handle)
            .cloned()
            .ok_or_else(|| BackendError::NotFound("no such handle".into()))?;
        Ok(OpenedKey {
            public_point: point_of(&key),
            signer: Arc::new(TestSigner(key)),
        })
    }

    fn delete(&self, _route: Route, handle: &[u8]) -> Result<()> {
        self.deleted.lock().unwrap().push(handle.to_vec());
        Ok(())
    }
}

fn store(route: Route) -> (tempfile::TempDir, Arc<TestEnclave>, EnclaveStore) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = KeyDir::open(&tmp.path().join("se")).unwrap();
    let enclave = Arc::new(TestEnclave::default());
    let store = EnclaveStore::new("mac", route, dir, enclave.clone());
    (tmp, enclave, store)
}

fn new_key(label: &str, persistent: bool) -> NewKey {
    NewKey {
        id: vec![0xab, 0xcd],
        label: label.into(),
        purpose: KeyPurpose::General,
        persistent,
    }
}

fn verifies(point: &[u8; POINT_LEN], digest: &[u8; 32], sig: &[u8; 64]) -> bool {
    let vk = VerifyingKey::from_sec1_bytes(point).unwrap();
    let sig = Signature::from_slice(sig).unwrap();
    vk.verify_prehash(digest, &sig).is_ok()
}

#[test]
fn the_class_follows_the_route() {
    let (_t, _e, s) = store(Route::EnclaveBlob);
    assert_eq!(
        s.info().protection_class,
        ProtectionClass::HardwareSecureEnclave
    );
    assert_eq!(s.info().backend, "secure_enclave");
    let (_t, _e, s) = store(Route::OsKeychain);
    assert_eq!(
        s.info().protection_class,
        ProtectionClass::OsProtectedNonextractable
    );
}

#[test]
fn a_key_survives_a_reopen_and_signs_after_a_lazy_rebuild() {
    let (tmp, enclave, s) = store(Route::EnclaveBlob);
    let made = s.generate_key(&new_key("ssh", true)).unwrap();
    let mut files = s.dir().list().unwrap();
    let hints = files.iter().filter(|f| is_bucket_file(f)).count();
    // The hints of its label and CKA_ID (in one bucket or two).
    assert!((1..=2).contains(&hints), "{files:?}");
    files.retain(|f| !is_bucket_file(f));
    assert_eq!(
        files,
        vec![format!("{}.sekey", made.name), "store.index".to_string()]
    );

    // A second store on the same directory (another process) sees the key.
    let dir = KeyDir::open(&tmp.path().join("se")).unwrap();
    let again = EnclaveStore::new("mac", Route::EnclaveBlob, dir, enclave.clone());
    let keys = again.load_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, made.name);
    assert_eq!(keys[0].public_point, made.public_point);
    assert_eq!(keys[0].id, vec![0xab, 0xcd]);
    assert_eq!(
        *enclave.opens.lock().unwrap(),
        0,
        "loading must not open keys"
    );

    let digest = [0x42u8; 32];
    let sig = keys[0].signer.sign_digest(&digest).unwrap();
    assert!(verifies(&made.public_point, &digest, &sig));
    keys[0].signer.sign_digest(&digest).unwrap();
    assert_eq!(*enclave.opens.lock().unwrap(), 1, "the rebuilt key is kept");
}

#[test]
fn a_key_whose_handle_is_gone_fails_its_own_signatures_only() {
    let (_t, enclave, s) = store(Route::EnclaveBlob);
    let a = s.generate_key(&new_key("a", true)).unwrap();
    let b = s.generate_key(&new_key("b", true)).unwrap();
    enclave.keys.lock().unwrap().clear();
    let keys = s.load_keys().unwrap();
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert!(k.name == a.name || k.name == b.name);
        assert!(matches!(
            k.signer.sign_digest(&[1; 32]),
            Err(BackendError::NotFound(_))
        ));
    }
}

#[test]
fn a_handle_that_rebuilds_another_key_is_refused() {
    let (_t, enclave, s) = store(Route::EnclaveBlob);
    let a = s.generate_key(&new_key("a", true)).unwrap();
    let b = s.generate_key(&new_key("b", true)).unwrap();
    // Key a's handle now rebuilds key b: its stored public point no longer matches.
    let handle_of = |name: &str| {
        KeyFile::decode(&s.dir().read(&format!("{name}.sekey")).unwrap().unwrap())
            .unwrap()
            .handle
    };
    let key_b = enclave.keys.lock().unwrap()[&handle_of(&b.name)].clone();
    enclave
        .keys
        .lock()
        .unwrap()
        .insert(handle_of(&a.name), key_b);
    let keys = s.load_keys().unwrap();
    let signed = |name: &str| {
        let k = keys.iter().find(|k| k.name == name).unwrap();
        k.signer.sign_digest(&[5; 32])
    };
    match signed(&a.name) {
        Err(BackendError::Refused(m)) => assert!(m.contains("not the stored key"), "{m}"),
        other => panic!("a rebuilt other key must be refused: {other:?}"),
    }
    assert!(signed(&b.name).is_ok());
}

#[test]
fn damaged_and_foreign_files_are_skipped() {
    let (_t, _e, s) = store(Route::EnclaveBlob);
    let good = s.generate_key(&new_key("good", true)).unwrap();
    s.dir()
        .write_atomic("0123456789abcdef0123456789abcdef.sekey", b"{not json")
        .unwrap();
    // A keychain software key never shows up in an enclave store.
    let mut foreign = KeyFile::decode(
        &s.dir()
            .read(&format!("{}.sekey", good.name))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    foreign.route = Route::OsKeychain;
    s.files
        .write_key("fedcba9876543210fedcba9876543210", &foreign)
        .unwrap();
    s.dir().write_atomic("notes.txt", b"hello").unwrap();
    let keys = s.load_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, good.name);
}

#[test]
fn session_keys_are_never_written() {
    let (_t, _e, s) = store(Route::EnclaveBlob);
    let k = s.generate_key(&new_key("tmp", false)).unwrap();
    assert!(!k.persistent);
    assert!(k.name.starts_with(SESSION_PREFIX));
    assert!(s
        .dir()
        .list()
        .unwrap()
        .iter()
        .all(|f| !f.ends_with(".sekey")));
    assert!(s.load_keys().unwrap().is_empty());
    s.update_key(&k.name, "renamed", b"x").unwrap();
    s.destroy_key(&k.name).unwrap();
    assert_not_found(s.destroy_key(&k.name));
}

#[test]
fn update_and_destroy_change_the_file_and_the_keychain() {
    let (_t, enclave, s) = store(Route::EnclaveKeychain);
    let k = s.generate_key(&new_key("old", true)).unwrap();
    s.update_key(&k.name, "new", &[9, 9]).unwrap();
    let keys = s.load_keys().unwrap();
    assert_eq!(keys[0].label, "new");
    assert_eq!(keys[0].id, vec![9, 9]);
    let handle = KeyFile::decode(&s.dir().read(&format!("{}.sekey", k.name)).unwrap().unwrap())
        .unwrap()
        .handle;
    s.destroy_key(&k.name).unwrap();
    assert!(s.load_keys().unwrap().is_empty());
    assert_eq!(*enclave.deleted.lock().unwrap(), vec![handle]);
    assert_not_found(s.destroy_key(&k.name));
    assert_not_found(s.update_key("../etc", "x", b""));
}

#[test]
fn blob_keys_need_no_keychain_deletion() {
    let (_t, enclave, s) = store(Route::EnclaveBlob);
    let k = s.generate_key(&new_key("k", true)).unwrap();
    s.destroy_key(&k.name).unwrap();
    assert!(enclave.deleted.lock().unwrap().is_empty());
}

#[test]
fn objects_round_trip() {
    let (_t, _e, s) = store(Route::EnclaveBlob);
    let attrs = vec![(0u64, vec![1u8]), (0x11, b"cert".to_vec())];
    let name = s.store_object(&attrs).unwrap();
    let objects = s.load_objects().unwrap();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].attributes, attrs);
    s.update_object(&name, &attrs[..1]).unwrap();
    assert_eq!(s.load_objects().unwrap()[0].attributes, attrs[..1]);
    let before = s.change_marker();
    s.destroy_object(&name).unwrap();
    assert!(s.load_objects().unwrap().is_empty());
    assert!(before.is_some());
}
