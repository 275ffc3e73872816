//! The TPM store's owner-only key directory: key blobs (`key-<hex>.pem`, TSS2 PRIVATE KEY), their
//! metadata (`key-<hex>.json`) and non-key objects (`obj-<hex>.json`).
//!
//! The directory is 0700 and owned by the user (refused otherwise); files are 0600 and written
//! atomically: a temporary file, fsync, rename, fsync of the directory. Names are random, so
//! processes creating keys at the same time never collide and need no lock. A key is committed
//! when its metadata file exists: the blob is written first, and a crash in between leaves an
//! orphan blob that listings ignore.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, KeyPurpose, RawAttribute, Result};

/// Metadata of one key, next to its blob.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyMeta {
    /// Always `devicekey-tpm-key`.
    pub format: String,
    /// Format version, 1.
    pub version: u32,
    /// CKA_ID, hex.
    pub id: String,
    /// CKA_LABEL.
    pub label: String,
    /// What the key may be used for.
    pub purpose: KeyPurpose,
}

impl KeyMeta {
    pub const FORMAT: &'static str = "devicekey-tpm-key";

    /// New metadata.
    pub fn new(id: &[u8], label: &str, purpose: KeyPurpose) -> Self {
        Self {
            format: Self::FORMAT.into(),
            version: 1,
            id: hex(id),
            label: label.into(),
            purpose,
        }
    }

    /// CKA_ID as bytes.
    pub fn id_bytes(&self) -> Result<Vec<u8>> {
        unhex(&self.id).ok_or_else(|| BackendError::Io(format!("bad id {:?}", self.id)))
    }
}

#[derive(Serialize, Deserialize)]
struct ObjectFile {
    format: String,
    version: u32,
    attributes: Vec<(u64, String)>,
}

const OBJECT_FORMAT: &str = "devicekey-tpm-object";

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A random name with a prefix: `key-<32 hex>` or `obj-<32 hex>`.
pub fn random_name(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| BackendError::Io(format!("no randomness for a file name: {e}")))?;
    Ok(format!("{prefix}-{}", hex(&bytes)))
}

fn valid_name(name: &str, prefix: &str) -> bool {
    name.len() == prefix.len() + 33
        && name.starts_with(prefix)
        && name.as_bytes()[prefix.len()] == b'-'
        && name[prefix.len() + 1..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

fn io(what: &str, path: &Path, e: std::io::Error) -> BackendError {
    BackendError::Io(format!("{what} {}: {e}", path.display()))
}

/// The key directory.
#[derive(Debug)]
pub struct KeyDir {
    path: PathBuf,
}

impl KeyDir {
    /// Opens the directory, creating it (0700) when missing; refuses one that someone else owns
    /// or that the group or others can access.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| {
                    BackendError::Unusable(format!(
                        "cannot create the TPM key directory {}: {e}",
                        path.display()
                    ))
                })?;
        }
        let meta = fs::metadata(path).map_err(|e| {
            BackendError::Unusable(format!(
                "cannot read the TPM key directory {}: {e}",
                path.display()
            ))
        })?;
        if !meta.is_dir() {
            return Err(BackendError::Unusable(format!(
                "the TPM key directory {} is not a directory",
                path.display()
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(BackendError::Unusable(format!(
                "the TPM key directory {} is accessible to the group or others (mode {:o}); fix: chmod 700 {}",
                path.display(),
                meta.permissions().mode() & 0o7777,
                path.display()
            )));
        }
        let dir = Self {
            path: path.to_owned(),
        };
        // Who we are, without unsafe code: the owner of a file we just created.
        let probe = dir.path.join(format!(".probe-{}", random_name("p")?));
        let me = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .and_then(|f| f.metadata())
            .map(|m| m.uid());
        let _ = fs::remove_file(&probe);
        let me = me.map_err(|e| {
            BackendError::Unusable(format!(
                "the TPM key directory {} is not writable: {e}",
                path.display()
            ))
        })?;
        if meta.uid() != me {
            return Err(BackendError::Unusable(format!(
                "the TPM key directory {} is owned by uid {}, not by us (uid {me}); fix: chown it or choose another dir",
                path.display(),
                meta.uid()
            )));
        }
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn write_atomic(&self, file_name: &str, bytes: &[u8]) -> Result<()> {
        let target = self.path.join(file_name);
        let tmp = self
            .path
            .join(format!(".tmp-{file_name}-{}", random_name("t")?));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("cannot create", &tmp, e))?;
            f.write_all(bytes)
                .map_err(|e| io("cannot write", &tmp, e))?;
            f.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
            fs::rename(&tmp, &target).map_err(|e| io("cannot rename to", &target, e))?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync", &self.path, e))
    }

    /// Reads a file of the directory.
    pub fn read(&self, file_name: &str) -> Result<Vec<u8>> {
        let path = self.path.join(file_name);
        fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BackendError::NotFound(file_name.to_string()),
            _ => io("cannot read", &path, e),
        })
    }

    /// Removes a file; a missing file is not an error.
    pub fn remove(&self, file_name: &str) -> Result<()> {
        let path = self.path.join(file_name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &path, e)),
        }
    }

    /// Names (`<prefix>-<hex>`) that have a `.json` file, sorted.
    pub fn names(&self, prefix: &str) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.path).map_err(|e| io("cannot list", &self.path, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
            .filter(|n| valid_name(n, prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Writes a key: blob first, then the metadata that commits it.
    pub fn write_key(&self, name: &str, pem: &str, meta: &KeyMeta) -> Result<()> {
        self.write_atomic(&format!("{name}.pem"), pem.as_bytes())?;
        self.write_meta(name, meta)
    }

    /// Replaces the metadata of a key.
    pub fn write_meta(&self, name: &str, meta: &KeyMeta) -> Result<()> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| BackendError::Io(format!("cannot encode key metadata: {e}")))?;
        self.write_atomic(&format!("{name}.json"), &json)
    }

    /// Reads a key's metadata and PEM text.
    pub fn read_key(&self, name: &str) -> Result<(KeyMeta, String)> {
        if !valid_name(name, "key") {
            return Err(BackendError::NotFound(name.to_string()));
        }
        let meta: KeyMeta = serde_json::from_slice(&self.read(&format!("{name}.json"))?)
            .map_err(|e| BackendError::Io(format!("bad metadata for key {name}: {e}")))?;
        if meta.format != KeyMeta::FORMAT {
            return Err(BackendError::Io(format!(
                "{name}.json is not a devicekey TPM key"
            )));
        }
        let pem = String::from_utf8(self.read(&format!("{name}.pem"))?)
            .map_err(|_| BackendError::Io(format!("{name}.pem is not text")))?;
        Ok((meta, pem))
    }

    /// Removes a key: the metadata first (uncommits it), then the blob.
    pub fn remove_key(&self, name: &str) -> Result<()> {
        if !valid_name(name, "key") {
            return Err(BackendError::NotFound(name.to_string()));
        }
        if !self.path.join(format!("{name}.json")).exists() {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.remove(&format!("{name}.json"))?;
        self.remove(&format!("{name}.pem"))?;
        self.sync_dir()
    }

    /// Writes an object's attributes.
    pub fn write_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        let file = ObjectFile {
            format: OBJECT_FORMAT.into(),
            version: 1,
            attributes: attributes.iter().map(|(t, v)| (*t, hex(v))).collect(),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| BackendError::Io(format!("cannot encode object: {e}")))?;
        self.write_atomic(&format!("{name}.json"), &json)
    }

    /// Reads an object's attributes.
    pub fn read_object(&self, name: &str) -> Result<Vec<RawAttribute>> {
        if !valid_name(name, "obj") {
            return Err(BackendError::NotFound(name.to_string()));
        }
        let file: ObjectFile = serde_json::from_slice(&self.read(&format!("{name}.json"))?)
            .map_err(|e| BackendError::Io(format!("bad object file {name}: {e}")))?;
        if file.format != OBJECT_FORMAT {
            return Err(BackendError::Io(format!("{name}.json is not an object")));
        }
        file.attributes
            .into_iter()
            .map(|(t, v)| {
                unhex(&v)
                    .map(|v| (t, v))
                    .ok_or_else(|| BackendError::Io(format!("bad attribute value in {name}")))
            })
            .collect()
    }

    /// Removes an object.
    pub fn remove_object(&self, name: &str) -> Result<()> {
        if !valid_name(name, "obj") || !self.path.join(format!("{name}.json")).exists() {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.remove(&format!("{name}.json"))?;
        self.sync_dir()
    }

    /// The directory's modification time in nanoseconds (changes when a file is added or removed).
    pub fn change_marker(&self) -> Option<u128> {
        let meta = fs::metadata(&self.path).ok()?;
        let mtime = meta.modified().ok()?;
        mtime
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_owner_only_dir_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/tpm");
        let kd = KeyDir::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let name = random_name("key").unwrap();
        let meta = KeyMeta::new(&[1, 2, 0xab], "lbl", KeyPurpose::Proof);
        kd.write_key(&name, "PEM", &meta).unwrap();
        for ext in ["pem", "json"] {
            let m = fs::metadata(dir.join(format!("{name}.{ext}"))).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(kd.names("key").unwrap(), vec![name.clone()]);
        let (m, pem) = kd.read_key(&name).unwrap();
        assert_eq!(pem, "PEM");
        assert_eq!(m.id_bytes().unwrap(), vec![1, 2, 0xab]);
        assert_eq!(m.purpose, KeyPurpose::Proof);
        kd.remove_key(&name).unwrap();
        assert!(kd.names("key").unwrap().is_empty());
        assert!(matches!(
            kd.remove_key(&name),
            Err(BackendError::NotFound(_))
        ));
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn refuses_group_accessible_dir() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o770)).unwrap();
        let err = KeyDir::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn objects_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(&tmp.path().join("k")).unwrap();
        let name = random_name("obj").unwrap();
        let attrs = vec![(0u64, vec![1, 0, 0, 0]), (0x11, b"cert".to_vec())];
        kd.write_object(&name, &attrs).unwrap();
        assert_eq!(kd.names("obj").unwrap(), vec![name.clone()]);
        assert!(kd.names("key").unwrap().is_empty());
        assert_eq!(kd.read_object(&name).unwrap(), attrs);
        kd.remove_object(&name).unwrap();
        assert!(kd.read_object(&name).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name(&random_name("key").unwrap(), "key"));
        assert!(!valid_name("key-../../etc", "key"));
        assert!(!valid_name(&random_name("obj").unwrap(), "key"));
    }
}
