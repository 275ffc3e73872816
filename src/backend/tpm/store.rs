//! The TPM store's owner-only key directory: key blobs (`key-<hex>.pem`, TSS2 PRIVATE KEY), their
//! metadata (`key-<hex>.json`) and non-key objects (`obj-<hex>.json`).
//!
//! The directory is a [`KeyDir`] (owner-only, safe ancestors, files reached through its
//! descriptor and loaded only when they are regular 0600 files of the user's); files are written
//! atomically. Names are random, so processes creating keys at the same time never collide. A
//! key is committed when its metadata file exists: the blob is written first, and a crash in
//! between leaves an orphan blob that listings ignore. The store lists keys and objects from its
//! index (`store.index`, see the `index` module), updated under the directory's lock with every
//! change; this module only names and reads the files.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::backend::keydir::{KeyDir, KeyDirLock};
use crate::backend::{BackendError, KeyPurpose, RawAttribute, Result};
use crate::encoding::{hex, hex_decode as unhex};

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
    /// The PIN generation the blob (`<name>.pem`) is protected under: 0 for an empty
    /// authValue (no PIN), else the generation in the store's `pin.json` (see the `pin`
    /// module). Written only when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pin_generation: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
            pin_generation: 0,
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

/// A random name with a prefix: `key-<32 hex>` or `obj-<32 hex>`.
pub fn random_name(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| BackendError::Io(format!("no randomness for a file name: {e}")))?;
    Ok(format!("{prefix}-{}", hex(&bytes)))
}

/// `<prefix>-<hex>` when `file_name` is that name's `.json` file.
pub fn name_of<'a>(file_name: &'a str, prefix: &str) -> Option<&'a str> {
    file_name
        .strip_suffix(".json")
        .filter(|n| valid_name(n, prefix))
}

fn valid_name(name: &str, prefix: &str) -> bool {
    name.len() == prefix.len() + 33
        && name.starts_with(prefix)
        && name.as_bytes()[prefix.len()] == b'-'
        && name[prefix.len() + 1..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

/// The TPM store's files, in a [`KeyDir`].
#[derive(Debug)]
pub struct KeyFiles {
    dir: KeyDir,
}

/// The file of the store's attestation key.
pub const AK_FILE: &str = "attestation-key.json";

/// The store's attestation key (AK): its blob and the EK it was made under. Not a key of the
/// token: listings never show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AkFile {
    /// Always `devicekey-tpm-attestation-key`.
    pub format: String,
    /// Format version, 1.
    pub version: u32,
    /// The name of the EK (its parent), hex.
    pub ek_name: String,
    /// TPM2B_PUBLIC, hex.
    pub public: String,
    /// TPM2B_PRIVATE (encrypted by the EK), hex.
    pub private: String,
}

impl AkFile {
    pub const FORMAT: &'static str = "devicekey-tpm-attestation-key";
}

/// How old a temporary file must be before it counts as left by a crash. Key, object and index
/// writes take the directory's lock, but this module does not require it of every writer, and
/// a write takes milliseconds.
const STALE_TEMP: Duration = Duration::from_secs(600);

impl KeyFiles {
    /// Opens the key directory (see [`KeyDir::open`] for what is refused). Temporary files
    /// left by a crash are removed by the store index's full check.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = KeyDir::open(path)?;
        Ok(Self { dir })
    }

    /// How old a temporary file must be before it counts as left by a crash.
    pub fn stale_temp_age() -> Duration {
        STALE_TEMP
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Reads a file; `NotFound` when it is absent or refused (the key directory logs why).
    fn read(&self, file_name: &str) -> Result<Zeroizing<Vec<u8>>> {
        self.dir
            .read(file_name)?
            .ok_or_else(|| BackendError::NotFound(file_name.to_string()))
    }

    /// Removes a file; a missing file is not an error.
    fn remove(&self, file_name: &str) -> Result<()> {
        match self.dir.remove(file_name) {
            Err(BackendError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// Names (`<prefix>-<hex>`) that have a `.json` file, sorted.
    #[cfg(test)]
    pub fn names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .dir
            .list()?
            .iter()
            .filter_map(|f| name_of(f, prefix))
            .map(str::to_string)
            .collect())
    }

    /// The key directory (for the store index).
    pub fn key_dir(&self) -> &KeyDir {
        &self.dir
    }

    /// Writes a key: blob first, then the metadata that commits it.
    pub fn write_key(&self, name: &str, pem: &str, meta: &KeyMeta) -> Result<()> {
        self.dir
            .write_atomic(&format!("{name}.pem"), pem.as_bytes())?;
        self.write_meta(name, meta)
    }

    /// Replaces the metadata of a key.
    pub fn write_meta(&self, name: &str, meta: &KeyMeta) -> Result<()> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| BackendError::Io(format!("cannot encode key metadata: {e}")))?;
        self.dir.write_atomic(&format!("{name}.json"), &json)
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
        let pem = String::from_utf8(self.read(&format!("{name}.pem"))?.to_vec())
            .map_err(|_| BackendError::Io(format!("{name}.pem is not text")))?;
        Ok((meta, pem))
    }

    /// Removes a key: the metadata first (uncommits it), then the blob.
    pub fn remove_key(&self, name: &str) -> Result<()> {
        if !valid_name(name, "key") {
            return Err(BackendError::NotFound(name.to_string()));
        }
        // The metadata first: it commits the key.
        self.dir.remove(&format!("{name}.json"))?;
        self.remove(&format!("{name}.pem"))
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
        self.dir.write_atomic(&format!("{name}.json"), &json)
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
        if !valid_name(name, "obj") {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.dir.remove(&format!("{name}.json"))
    }

    /// The attestation key, when the store has one.
    pub fn read_ak(&self) -> Result<Option<AkFile>> {
        let Some(bytes) = self.dir.read(AK_FILE)? else {
            return Ok(None);
        };
        let file: AkFile = serde_json::from_slice(&bytes)
            .map_err(|e| BackendError::Io(format!("bad {AK_FILE}: {e}")))?;
        if file.format != AkFile::FORMAT || file.version != 1 {
            return Err(BackendError::Io(format!(
                "{AK_FILE} is not a devicekey attestation key"
            )));
        }
        Ok(Some(file))
    }

    /// Writes the attestation key.
    pub fn write_ak(&self, file: &AkFile) -> Result<()> {
        let json = serde_json::to_vec_pretty(file)
            .map_err(|e| BackendError::Io(format!("cannot encode the attestation key: {e}")))?;
        self.dir.write_atomic(AK_FILE, &json)
    }

    /// An exclusive lock on the directory (creating the attestation key once).
    pub fn lock(&self) -> Result<KeyDirLock> {
        self.dir.lock()
    }

    /// See [`KeyDir::change_marker`].
    pub fn change_marker(&self) -> Option<u128> {
        self.dir.change_marker()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::assert_not_found;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_owner_only_dir_and_files() {
        let (_tmp, dir) = crate::test_support::scratch("a/b/tpm");
        let kd = KeyFiles::open(&dir).unwrap();
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
        assert_not_found(kd.remove_key(&name));
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn refuses_group_accessible_dir() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o770)).unwrap();
        let err = KeyFiles::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn objects_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyFiles::open(&tmp.path().join("k")).unwrap();
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
