//! Scale: software stores of 10, 1,000 and 10,000 keys, made once with the store's own API and
//! reused across runs, and FindObjects by CKA_ID and by label against them.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use cryptoki::object::{Attribute, ObjectClass};
use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, KeyPurpose, NewKey};
use sha2::{Digest, Sha256};

use crate::p11::{Module, Target};
use crate::sign::{latency_figures, Plan};
use crate::{BenchError, Ctx, Result};

/// The label of bench key `i`.
pub fn label_of(i: usize) -> String {
    format!("bench-key-{i:05}")
}

/// The CKA_ID of bench key `i`: 16 bytes derived from its index.
pub fn id_of(i: usize) -> Vec<u8> {
    Sha256::digest(format!("devicekey-bench-key-{i}").as_bytes())[..16].to_vec()
}

fn index_of(label: &str) -> Option<usize> {
    label.strip_prefix("bench-key-")?.parse().ok()
}

fn key_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".key"))
                .count()
        })
        .unwrap_or(0)
}

fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn store_err(e: devicekey_pkcs11::backend::BackendError) -> BenchError {
    BenchError::Other(format!("software store: {e}"))
}

/// Copies the key files of the keys with index below `count` from `from` into a fresh `to`.
fn copy_keys(from: &Path, to: &Path, count: usize) -> Result<()> {
    let store = SoftwareStore::open("bench", Some(from)).map_err(store_err)?;
    fresh_dir(to)?;
    let mut copied = 0;
    for key in store.load_keys().map_err(store_err)? {
        if index_of(&key.label).is_some_and(|i| i < count) {
            let file = format!("{}.key", key.name);
            fs::copy(from.join(&file), to.join(&file))?;
            copied += 1;
        }
    }
    if copied != count {
        return Err(BenchError::Other(format!(
            "{} holds {copied} bench keys below {count}",
            from.display()
        )));
    }
    Ok(())
}

/// `scale-prepare`: makes `<base>/keys-<N>` for every count unless it already holds N keys.
/// Keys are generated through `SoftwareStore::generate_key` (in `staging`, a RAM disk when
/// given, because the store fsyncs every file and directory), then copied.
pub fn prepare(base: &Path, counts: &[usize], staging: Option<&Path>) -> Result<()> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let biggest = base.join(format!("keys-{max}"));
    if key_files(&biggest) != max {
        let gen_dir = match staging {
            Some(s) => s.join(format!("devicekey-bench-{}", std::process::id())),
            None => biggest.with_extension("tmp"),
        };
        fresh_dir(&gen_dir)?;
        eprintln!("  generating {max} keys (once; reused by later runs)");
        let store = SoftwareStore::open("bench", Some(&gen_dir)).map_err(store_err)?;
        let workers = 2;
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let store = &store;
                    scope.spawn(move || -> Result<()> {
                        for i in (w..max).step_by(workers) {
                            store
                                .generate_key(&NewKey {
                                    id: id_of(i),
                                    label: label_of(i),
                                    purpose: KeyPurpose::General,
                                    persistent: true,
                                })
                                .map_err(store_err)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| BenchError::Other("a generator thread panicked".into()))??;
            }
            Ok(())
        })?;
        drop(store);
        copy_keys(&gen_dir, &biggest, max)?;
        fs::remove_dir_all(&gen_dir)?;
    }
    for &count in counts {
        let dir = base.join(format!("keys-{count}"));
        if count != max && key_files(&dir) != count {
            copy_keys(&biggest, &dir, count)?;
        }
    }
    Ok(())
}

/// `find`: C_FindObjectsInit + C_FindObjects + C_FindObjectsFinal for one private key, by
/// CKA_ID and by label, in a store the config names.
pub fn find(target: &Target, index: usize, variant: &str, plan: &Plan) -> Result<()> {
    let m = Module::open(target)?;
    let s = m.session()?;
    let by_id = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Id(id_of(index)),
    ];
    let by_label = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(label_of(index).into_bytes()),
    ];
    for (bench, template) in [("find_by_id", &by_id), ("find_by_label", &by_label)] {
        latency_figures(bench, &target.name, variant, plan, |_| {
            let n = s.find_objects(template).ctx("C_FindObjects")?.len();
            if n == 1 {
                Ok(())
            } else {
                Err(BenchError::Invalid(format!(
                    "{bench} found {n} objects, not 1"
                )))
            }
        })?;
    }
    Ok(())
}
