//! Scale: key stores of 10 to 100,000 keys, made once with the store's own API and reused
//! across runs, and FindObjects by CKA_ID and by label against them. Software stores by default;
//! the TPM part makes TPM stores the same way (`tpm::open_store`).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use cryptoki::object::{Attribute, ObjectClass};
use devicekey_pkcs11::backend::software::SoftwareStore;
use devicekey_pkcs11::backend::{Backend, BackendError, KeyPurpose, NewKey};
use sha2::{Digest, Sha256};

use crate::p11::{Module, Target};
use crate::sign::{latency_figures, Plan};
use crate::stats::Record;
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

/// Opens the store being prepared in a directory (software or TPM).
pub type OpenStore<'a> = &'a (dyn Fn(&Path) -> Result<Box<dyn Backend>> + Sync);

/// Opens a software store in `dir`.
pub fn open_software(dir: &Path) -> Result<Box<dyn Backend>> {
    Ok(Box::new(
        SoftwareStore::open("bench", Some(dir)).map_err(store_err)?,
    ))
}

/// The stem of a store file (`<name>` of `<name>.key`, `<name>.json`...); `None` for hidden
/// files (the lock, temporary files).
fn stem(file: &str) -> Option<&str> {
    file.split_once('.')
        .map(|(stem, _)| stem)
        .filter(|s| !s.is_empty())
}

/// How many keys `dir` holds: software key files (`<name>.key`) and TPM key metadata files
/// (`key-<hex>.json`, which commit a TPM key).
fn key_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.ends_with(".key") || (name.starts_with("key-") && name.ends_with(".json"))
                })
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

/// A store error as the harness's.
pub fn store_err(e: BackendError) -> BenchError {
    BenchError::Other(format!("key store: {e}"))
}

/// Copies the files of the keys with index below `count` from `from` into a fresh `to`.
fn copy_keys(open: OpenStore, from: &Path, to: &Path, count: usize) -> Result<()> {
    let wanted: std::collections::HashSet<String> = open(from)?
        .load_keys()
        .map_err(store_err)?
        .into_iter()
        .filter(|key| index_of(&key.label).is_some_and(|i| i < count))
        .map(|key| key.name)
        .collect();
    if wanted.len() != count {
        return Err(BenchError::Other(format!(
            "{} holds {} bench keys below {count}",
            from.display(),
            wanted.len()
        )));
    }
    fresh_dir(to)?;
    for entry in fs::read_dir(from)? {
        let file = entry?.file_name();
        if stem(&file.to_string_lossy()).is_some_and(|s| wanted.contains(s)) {
            fs::copy(from.join(&file), to.join(&file))?;
        }
    }
    Ok(())
}

/// Generates bench keys `0..count` in `dir` with the store's `generate_key`, on one thread per
/// CPU.
fn generate(open: OpenStore, dir: &Path, count: usize) -> Result<()> {
    let store = open(dir)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let store = &store;
                scope.spawn(move || -> Result<()> {
                    for i in (w..count).step_by(workers) {
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
    })
}

/// `scale-prepare`: makes `<base>/keys-<N>` for every count unless it already holds N keys.
/// Keys are generated through the store's `generate_key` (in `staging`, a RAM disk when given,
/// because the stores fsync every file and directory), then copied; the time the biggest store
/// took is emitted as `store_generation` for `subject`.
pub fn prepare(
    base: &Path,
    counts: &[usize],
    staging: Option<&Path>,
    subject: &str,
    open: OpenStore,
) -> Result<()> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let biggest = base.join(format!("keys-{max}"));
    if key_files(&biggest) != max {
        let gen_dir = match staging {
            Some(s) => s.join(format!("devicekey-bench-{}", std::process::id())),
            None => biggest.with_extension("tmp"),
        };
        fresh_dir(&gen_dir)?;
        eprintln!("  generating {max} keys (once; reused by later runs)");
        let start = Instant::now();
        generate(open, &gen_dir, max)?;
        let generated = start.elapsed().as_secs_f64();
        copy_keys(open, &gen_dir, &biggest, max)?;
        fs::remove_dir_all(&gen_dir)?;
        let total = start.elapsed().as_secs_f64();
        Record::new(
            "store_generation",
            subject,
            &format!("{max} keys"),
            "s",
            vec![total],
        )
        .with_detail(serde_json::json!({
            "generate_key_s": generated,
            "copy_s": total - generated,
            "staging": staging.map(|s| s.display().to_string()),
        }))
        .emit();
    }
    for &count in counts {
        let dir = base.join(format!("keys-{count}"));
        if count != max && key_files(&dir) != count {
            copy_keys(open, &biggest, &dir, count)?;
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
