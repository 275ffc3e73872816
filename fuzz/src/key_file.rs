//! Fuzz harness (d): the software store's key and object files, fed damaged and arbitrary
//! contents through the real read path (`SoftwareStore::open` + `load_keys`/`load_objects`).
//!
//! Properties: loading never fails or panics because of a file's contents (a damaged file is
//! skipped); a key that loads has a 65-byte uncompressed point, and if it signs, the signature
//! verifies against that point (a damaged file is never taken for a key that signs with some
//! other scalar); a valid key file next to a damaged one still loads. The store index
//! (`store.index`) is fuzzed too: a valid key file next to a damaged or arbitrary index is listed
//! with the point its file holds, and signs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use devicekey_pkcs11::backend::index::INDEX_FILE;
use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, KeyPurpose, NewKey};
use p256::ecdsa::signature::hazmat::PrehashVerifier;

use crate::input::Input;

const NAME: &str = "0123456789abcdef0123456789abcdef";
const OTHER: &str = "fedcba9876543210fedcba9876543210";

struct Fixture {
    _dir: tempfile::TempDir,
    store_dir: PathBuf,
    /// A valid key file written by the store itself.
    valid: Vec<u8>,
    /// The store index of a store holding only `valid`, named `OTHER`.
    valid_index: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("devicekey-fuzz-")
            .tempdir()
            .expect("tempdir");
        let template = dir.path().join("template");
        let store = SoftwareStore::open("fuzz", Some(&template)).expect("open template store");
        let key = store
            .generate_key(&NewKey {
                id: b"fuzz-id".to_vec(),
                label: "fuzz label \u{e9}".into(),
                purpose: KeyPurpose::General,
                persistent: true,
            })
            .expect("generate");
        let valid = std::fs::read(template.join(format!("{}.key", key.name))).expect("read");
        let indexed = dir.path().join("indexed");
        std::fs::create_dir(&indexed).expect("mkdir");
        std::fs::set_permissions(
            &indexed,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod 700");
        write_600(&indexed.join(format!("{OTHER}.key")), &valid);
        SoftwareStore::open("fuzz", Some(&indexed)).expect("open the indexed store");
        let valid_index = std::fs::read(indexed.join(INDEX_FILE)).expect("read the index");
        let store_dir = dir.path().join("store");
        Fixture {
            _dir: dir,
            store_dir,
            valid,
            valid_index,
        }
    })
}

impl Fixture {
    /// The public point of the valid key, as its file holds it.
    fn valid_point(&self) -> [u8; 65] {
        let v: serde_json::Value = serde_json::from_slice(&self.valid).expect("valid JSON");
        let hex = v["public_point"].as_str().expect("a public point");
        let bytes = devicekey_pkcs11::encoding::hex_decode(hex).expect("hex");
        bytes.try_into().expect("65 bytes")
    }
}

/// Applies byte-level damage chosen by `input` to `file`.
fn damage(file: &mut Vec<u8>, input: &mut Input<'_>) {
    for _ in 0..1 + input.below(8) {
        if file.is_empty() {
            file.push(input.u8());
            continue;
        }
        let pos = input.below(file.len());
        match input.below(6) {
            0 => file[pos] ^= 1 << input.below(8),
            1 => file[pos] = input.u8(),
            2 => file.insert(pos, input.u8()),
            3 => {
                file.remove(pos);
            }
            // A torn write: the file ends early.
            4 => file.truncate(pos),
            _ => {
                // A hex digit of the scalar or point changes into another hex digit.
                if file[pos].is_ascii_hexdigit() {
                    file[pos] = b"0123456789abcdef"[input.below(16)];
                }
            }
        }
    }
}

/// Writes a store file as the store itself would: owner-only (the store refuses anything else).
fn write_600(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write");
}

fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let f = fixture();
    let mut input = Input::new(data);
    let mode = input.below(6);
    clear(&f.store_dir);
    if std::fs::create_dir(&f.store_dir).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f.store_dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod 700");
    }
    let key_path = f.store_dir.join(format!("{NAME}.key"));
    let mut expect_other = false;
    match mode {
        0 => write_600(&key_path, input.rest()),
        1 | 2 => {
            let mut file = f.valid.clone();
            damage(&mut file, &mut input);
            write_600(&key_path, &file);
            if mode == 2 {
                write_600(&f.store_dir.join(format!("{OTHER}.key")), &f.valid);
                expect_other = true;
            }
        }
        3 => write_600(&f.store_dir.join(format!("{NAME}.obj")), input.rest()),
        // A valid key next to a damaged index, or an arbitrary one.
        _ => {
            let index = if mode == 4 {
                let mut index = f.valid_index.clone();
                damage(&mut index, &mut input);
                index
            } else {
                input.rest().to_vec()
            };
            write_600(&f.store_dir.join(format!("{OTHER}.key")), &f.valid);
            write_600(&f.store_dir.join(INDEX_FILE), &index);
            expect_other = true;
        }
    }

    let store = SoftwareStore::open("fuzz", Some(&f.store_dir)).expect("the store opens");
    let keys = store
        .load_keys()
        .expect("damaged files never fail the load");
    assert!(keys.len() <= 2);
    if expect_other {
        let other = keys.iter().find(|k| k.name == OTHER);
        let other = other.expect("a valid key file next to a damaged one still loads");
        let point = &f.valid_point();
        assert_eq!(&other.public_point, point, "listed with its file's point");
        assert!(
            other.signer.sign_digest(&[1; 32]).is_ok(),
            "the valid key signs"
        );
    }
    let digest = [0x5a; 32];
    for key in &keys {
        assert_eq!(key.public_point[0], 4);
        if let Ok(sig) = key.signer.sign_digest(&digest) {
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.public_point)
                .expect("a key that signs has a valid point");
            let sig = p256::ecdsa::Signature::from_slice(&sig).expect("64-byte signature");
            assert!(
                vk.verify_prehash(&digest, &sig).is_ok(),
                "key {} signs with a scalar that does not match its point",
                key.name
            );
        }
    }
    let _ = store
        .load_objects()
        .expect("damaged objects never fail the load");
}
