//! The software store with a PIN, through the library: a key file holds no scalar in the clear
//! once a PIN is set (the file bytes are searched for the scalar, as `robust_zeroize_software_store`
//! searches memory), keys sign only after login and with the same public key as before, a sealed
//! key does not open in another store, and new PIN files use the strong Argon2id default.
//!
//! This file never sets `DEVICEKEY_TEST_CHEAP_PIN_KDF`: every PIN here costs the real 64 MiB and
//! 3 passes.

use std::path::Path;

use devicekey_pkcs11::backend::pin::PinGuard;
use devicekey_pkcs11::backend::software::{PinOptions, SoftwareStore};
use devicekey_pkcs11::backend::{Backend, BackendError, KeyPurpose, NewKey};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};

const PIN: &[u8] = b"correct horse";

fn new_key(label: &str) -> NewKey {
    NewKey {
        id: label.as_bytes().to_vec(),
        label: label.into(),
        purpose: KeyPurpose::General,
        persistent: true,
    }
}

fn open_pin(dir: &Path) -> SoftwareStore {
    SoftwareStore::open_with("pin", Some(dir), Some(PinOptions::default())).expect("open")
}

fn guard(store: &SoftwareStore) -> &dyn PinGuard {
    store.pin().expect("a store with a PIN has a guard")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

fn key_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect();
    v.sort();
    v
}

/// The scalar of a clear key file (version 1), big-endian.
fn clear_scalar(path: &Path) -> [u8; 32] {
    let v = json(path);
    let hex = v["private_scalar"].as_str().expect("a clear scalar");
    hex::decode(hex).expect("hex").try_into().expect("32 bytes")
}

/// The places in `bytes` where a piece of the scalar shows: big-endian, little-endian, and as
/// hex in either case, each form cut in four pieces of 64 bits or more (a partial copy counts).
fn scalar_pieces_in(bytes: &[u8], scalar: &[u8; 32]) -> Vec<String> {
    let mut le = *scalar;
    le.reverse();
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("big-endian", scalar.to_vec()),
        ("little-endian", le.to_vec()),
        ("hex", hex::encode(scalar).into_bytes()),
        ("HEX", hex::encode_upper(scalar).into_bytes()),
    ];
    let mut hits = Vec::new();
    for (name, form) in forms {
        let n = form.len() / 4;
        for (i, piece) in form.chunks(n).enumerate() {
            if bytes.windows(piece.len()).any(|w| w == piece) {
                hits.push(format!("{name} piece {i}"));
            }
        }
    }
    hits
}

fn every_file(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).expect("read");
            (p, b)
        })
        .collect()
}

fn sign_and_verify(store: &SoftwareStore) -> usize {
    let keys = store.load_keys().expect("load keys");
    for k in &keys {
        let digest = [0x5a; 32];
        let sig = k.signer.sign_digest(&digest).expect("sign");
        let vk = VerifyingKey::from_sec1_bytes(&k.public_point).expect("point");
        vk.verify_prehash(&digest, &Signature::from_slice(&sig).expect("sig"))
            .expect("signature verifies");
    }
    keys.len()
}

#[test]
fn a_key_file_of_a_pin_store_holds_no_scalar_in_the_clear() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("keys");
    let points: Vec<[u8; 65]> = {
        let plain = SoftwareStore::open("plain", Some(&dir)).expect("open");
        (0..3)
            .map(|i| {
                plain
                    .generate_key(&new_key(&format!("k{i}")))
                    .expect("generate")
                    .public_point
            })
            .collect()
    };
    let scalars: Vec<[u8; 32]> = key_files(&dir).iter().map(|p| clear_scalar(p)).collect();
    assert_eq!(scalars.len(), 3);
    // Control: the search finds a clear scalar.
    for (path, bytes) in every_file(&dir) {
        if path.extension().is_some_and(|e| e == "key") {
            assert!(
                scalars
                    .iter()
                    .any(|s| scalar_pieces_in(&bytes, s).len() >= 4),
                "the search does not see the clear scalar in {}",
                path.display()
            );
        }
    }

    let store = open_pin(&dir);
    guard(&store).set_pin(None, PIN).expect("set the first PIN");
    let pin_file = json(&dir.join("pin"));
    assert_eq!(pin_file["kdf"]["algorithm"], "argon2id");
    assert_eq!(pin_file["kdf"]["memory_kib"], 65536, "64 MiB by default");
    assert_eq!(pin_file["kdf"]["passes"], 3, "3 passes by default");
    for path in key_files(&dir) {
        let v = json(&path);
        assert_eq!(v["version"], 2, "{}", path.display());
        assert!(v.get("private_scalar").is_none(), "{}", path.display());
        assert!(v["sealed_scalar"]["ciphertext"].is_string());
    }
    for (path, bytes) in every_file(&dir) {
        for s in &scalars {
            let hits = scalar_pieces_in(&bytes, s);
            assert!(hits.is_empty(), "{}: {hits:?}", path.display());
        }
    }

    // Locked away until login; then the same keys sign.
    let keys = store.load_keys().expect("load keys");
    assert_eq!(keys.len(), 3);
    assert!(matches!(
        keys[0].signer.sign_digest(&[1; 32]),
        Err(BackendError::NotLoggedIn(_))
    ));
    guard(&store).login(PIN).expect("login");
    assert_eq!(sign_and_verify(&store), 3);
    let mut got: Vec<_> = keys.iter().map(|k| k.public_point).collect();
    let mut want = points.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the same key pairs after sealing");

    // A key generated behind the PIN is sealed from the start.
    let fresh = store.generate_key(&new_key("fresh")).expect("generate");
    let v = json(&dir.join(format!("{}.key", fresh.name)));
    assert!(v.get("private_scalar").is_none() && v["version"] == 2);
    guard(&store).logout();
    assert!(matches!(
        fresh.signer.sign_digest(&[1; 32]),
        Err(BackendError::NotLoggedIn(_))
    ));
    assert!(
        SoftwareStore::open("plain", Some(&dir)).is_err(),
        "the store opened without its PIN"
    );

    // A sealed key file copied into another store with a PIN of its own does not sign there.
    let other_dir = tmp.path().join("other");
    let other = open_pin(&other_dir);
    guard(&other).set_pin(None, PIN).expect("set the PIN");
    let name = format!("{}.key", fresh.name);
    std::fs::copy(dir.join(&name), other_dir.join(&name)).expect("copy");
    guard(&other).login(PIN).expect("login");
    let copied = other.load_keys().expect("load keys");
    assert_eq!(copied.len(), 1);
    assert!(matches!(
        copied[0].signer.sign_digest(&[1; 32]),
        Err(BackendError::Crypto(_))
    ));
}
