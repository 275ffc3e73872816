//! The software key store (`os_protected_nonextractable`): P-256 keys in an owner-only directory.
//!
//! The directory is a [`KeyDir`]: owner-only (0700), safe ancestors, every file reached through
//! the directory's descriptor and loaded only when it is a regular 0600 file of the user's (see
//! the `keydir` module for the whole policy). Layout:
//! - `<name>.key`: one key pair (JSON, see [`format::KeyFile`]), mode 0600;
//! - `<name>.obj`: one stored non-key object (JSON, see [`format::ObjectFile`]), mode 0600;
//! - `.lock`: held with `flock` around every change; its first 8 bytes count the changes;
//! - `.<name>.<ext>.<random>.tmp`: a file being written; never loaded, removed when stale.
//!
//! `<name>` is 32 lowercase hex digits (16 random bytes). Writes are atomic (temporary file,
//! fsync, rename, fsync of the directory) and made holding the lock. Session keys
//! (`persistent = false`) live only in memory.

mod format;
mod signer;
mod slot;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use self::format::{Hex, KeyFile, ObjectFile, Scalar};
pub use self::signer::SoftwareSigner;
use crate::backend::keydir::KeyDir;
use crate::backend::{
    Backend, BackendError, KeyRecord, NewKey, ObjectRecord, ProtectionClass, RawAttribute, Result,
    StoreInfo,
};
use crate::encoding;

const KEY_EXT: &str = "key";
const OBJ_EXT: &str = "obj";
const SESSION_PREFIX: &str = "session-";
/// Key files are small; anything larger is not one of ours.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// Objects hold certificates; allow generous sizes.
const MAX_OBJ_FILE: u64 = 16 * 1024 * 1024;

/// A session key: in memory only.
struct SessionKey {
    record: KeyRecord,
}

/// The software key store.
pub struct SoftwareStore {
    info: StoreInfo,
    dir: KeyDir,
    sessions: Mutex<HashMap<String, SessionKey>>,
}

impl std::fmt::Debug for SoftwareStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareStore")
            .field("label", &self.info.label)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

fn poisoned() -> BackendError {
    BackendError::Io("software store lock poisoned".into())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_name() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)
        .map_err(|e| BackendError::Crypto(format!("random number generator failed: {e}")))?;
    Ok(encoding::hex(&b))
}

/// True for the names this store gives out: 32 lowercase hex digits.
fn valid_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<name>` when `file_name` is `<name>.<ext>` with a valid name.
fn stem_with_ext<'a>(file_name: &'a str, ext: &str) -> Option<&'a str> {
    let stem = file_name.strip_suffix(ext)?.strip_suffix('.')?;
    valid_name(stem).then_some(stem)
}

impl SoftwareStore {
    /// Opens (creating it if missing) the store in `dir`, or in
    /// [`crate::config::default_data_dir`] when `dir` is `None`.
    pub fn open(label: &str, dir: Option<&Path>) -> Result<SoftwareStore> {
        let wanted = match dir {
            Some(d) => d.to_path_buf(),
            None => crate::config::default_data_dir(),
        };
        let dir = KeyDir::open(&wanted)?;
        let digest = Sha256::digest(dir.path().as_os_str().as_encoded_bytes());
        let serial = encoding::hex(&digest[..8]);
        let store = SoftwareStore {
            info: StoreInfo {
                label: label.to_string(),
                backend: crate::config::BackendKind::Software,
                manufacturer: "devicekey".to_string(),
                serial,
                protection_class: ProtectionClass::OsProtectedNonextractable,
            },
            dir,
            sessions: Mutex::new(HashMap::new()),
        };
        // Every writer holds the lock while its temporary file exists, so any temporary file
        // seen under the lock is stale. Cleaning up changes nothing visible, so it leaves the
        // change counter alone.
        let lock = store.dir.lock()?;
        store.dir.remove_stale_temp_files(None);
        drop(lock);
        log::debug!(
            "software store {:?} opened in {}",
            label,
            store.dir.path().display()
        );
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `f` holding the store's lock, then bumps the change counter, so other processes
    /// reload.
    fn with_lock<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let lock = self.dir.lock()?;
        let result = f();
        lock.bump();
        result
    }

    /// Writes `<name>.<ext>` atomically. Call with the lock held.
    fn write_atomic(&self, name: &str, ext: &str, contents: &[u8]) -> Result<()> {
        self.dir.write_atomic(&format!("{name}.{ext}"), contents)
    }

    /// Removes `<name>.<ext>`; `NotFound` when absent. Call with the lock held.
    fn remove(&self, name: &str, ext: &str) -> Result<()> {
        self.dir.remove(&format!("{name}.{ext}"))
    }

    /// Names of the `<name>.<ext>` files in the directory.
    fn list(&self, ext: &str) -> Result<Vec<String>> {
        Ok(self
            .dir
            .list()?
            .iter()
            .filter_map(|f| stem_with_ext(f, ext))
            .map(str::to_string)
            .collect())
    }

    /// Reads a file of the store: `None` when absent, refused (logged once by the key
    /// directory) or unreadable (logged).
    fn read_file(&self, name: &str, ext: &str, max: u64) -> Option<Zeroizing<Vec<u8>>> {
        let file = format!("{name}.{ext}");
        match self.dir.read_limited(&file, max) {
            Ok(bytes) => bytes,
            Err(e) => {
                log::warn!("skipping {}: {e}", self.dir.path().join(&file).display());
                None
            }
        }
    }

    /// Reads and parses a key file; `Ok(None)` (with a warning) when it is damaged.
    fn read_key(&self, name: &str) -> Result<Option<KeyFile>> {
        let Some(bytes) = self.read_file(name, KEY_EXT, MAX_KEY_FILE) else {
            return Ok(None);
        };
        match KeyFile::parse(&bytes) {
            Ok(k) => Ok(Some(k)),
            Err(e) => {
                let path = self.dir.path().join(format!("{name}.{KEY_EXT}"));
                log::warn!("skipping damaged key file {}: {e}", path.display());
                Ok(None)
            }
        }
    }

    fn read_object(&self, name: &str) -> Option<ObjectFile> {
        let bytes = self.read_file(name, OBJ_EXT, MAX_OBJ_FILE)?;
        match ObjectFile::parse(&bytes) {
            Ok(o) => Some(o),
            Err(e) => {
                let path = self.dir.path().join(format!("{name}.{OBJ_EXT}"));
                log::warn!("skipping damaged object file {}: {e}", path.display());
                None
            }
        }
    }

    fn record_of(name: String, file: KeyFile) -> KeyRecord {
        let mut public_point = [0u8; 65];
        public_point.copy_from_slice(&file.public_point.0);
        KeyRecord {
            name,
            id: file.id.0,
            label: file.label,
            public_point,
            purpose: file.purpose,
            persistent: true,
            signer: Arc::new(SoftwareSigner::deferred(
                public_point,
                file.private_scalar.0,
            )),
        }
    }
}

impl Backend for SoftwareStore {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn load_keys(&self) -> Result<Vec<KeyRecord>> {
        let mut keys = Vec::new();
        for name in self.list(KEY_EXT)? {
            if let Some(file) = self.read_key(&name)? {
                keys.push((file.created, Self::record_of(name, file)));
            }
        }
        keys.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
        Ok(keys.into_iter().map(|(_, k)| k).collect())
    }

    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord> {
        let generated = SoftwareSigner::generate()?;
        let name = random_name()?;
        if !request.persistent {
            let name = format!("{SESSION_PREFIX}{name}");
            let record = KeyRecord {
                name: name.clone(),
                id: request.id.clone(),
                label: request.label.clone(),
                public_point: generated.public_point,
                purpose: request.purpose,
                persistent: false,
                signer: Arc::new(generated.signer),
            };
            self.sessions.lock().map_err(|_| poisoned())?.insert(
                name,
                SessionKey {
                    record: record.clone(),
                },
            );
            return Ok(record);
        }
        let file = KeyFile {
            format: format::KEY_FORMAT.to_string(),
            version: format::VERSION,
            id: Hex(request.id.clone()),
            label: request.label.clone(),
            purpose: request.purpose,
            public_point: Hex(generated.public_point.to_vec()),
            private_scalar: Scalar(generated.scalar),
            created: now(),
        };
        let bytes = file
            .to_bytes()
            .map_err(|e| BackendError::Io(format!("cannot encode a key file: {e}")))?;
        self.with_lock(|| self.write_atomic(&name, KEY_EXT, &bytes))?;
        log::info!("created key {name} ({:?})", request.label);
        Ok(KeyRecord {
            name,
            id: request.id.clone(),
            label: request.label.clone(),
            public_point: generated.public_point,
            purpose: request.purpose,
            persistent: true,
            signer: Arc::new(generated.signer),
        })
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        if name.starts_with(SESSION_PREFIX) {
            let mut sessions = self.sessions.lock().map_err(|_| poisoned())?;
            let key = sessions
                .get_mut(name)
                .ok_or_else(|| BackendError::NotFound(name.to_string()))?;
            key.record.label = label.to_string();
            key.record.id = id.to_vec();
            return Ok(());
        }
        if !valid_name(name) {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.with_lock(|| {
            let mut file = self
                .read_key(name)?
                .ok_or_else(|| BackendError::NotFound(name.to_string()))?;
            file.label = label.to_string();
            file.id = Hex(id.to_vec());
            let bytes = file
                .to_bytes()
                .map_err(|e| BackendError::Io(format!("cannot encode a key file: {e}")))?;
            self.write_atomic(name, KEY_EXT, &bytes)
        })
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        if name.starts_with(SESSION_PREFIX) {
            return match self.sessions.lock().map_err(|_| poisoned())?.remove(name) {
                Some(_) => Ok(()),
                None => Err(BackendError::NotFound(name.to_string())),
            };
        }
        if !valid_name(name) {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.with_lock(|| self.remove(name, KEY_EXT))?;
        log::info!("destroyed key {name}");
        Ok(())
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        let mut objects = Vec::new();
        for name in self.list(OBJ_EXT)? {
            if let Some(file) = self.read_object(&name) {
                let attributes = file.attributes.into_iter().map(|(t, v)| (t, v.0)).collect();
                objects.push((file.created, ObjectRecord { name, attributes }));
            }
        }
        objects.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
        Ok(objects.into_iter().map(|(_, o)| o).collect())
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let name = random_name()?;
        let bytes = object_bytes(attributes, now())?;
        self.with_lock(|| self.write_atomic(&name, OBJ_EXT, &bytes))?;
        Ok(name)
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        if !valid_name(name) {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.with_lock(|| {
            let old = self
                .read_object(name)
                .ok_or_else(|| BackendError::NotFound(name.to_string()))?;
            let bytes = object_bytes(attributes, old.created)?;
            self.write_atomic(name, OBJ_EXT, &bytes)
        })
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        if !valid_name(name) {
            return Err(BackendError::NotFound(name.to_string()));
        }
        self.with_lock(|| self.remove(name, OBJ_EXT))
    }

    fn change_marker(&self) -> Option<u128> {
        self.dir.change_marker()
    }
}

fn object_bytes(attributes: &[RawAttribute], created: u64) -> Result<Vec<u8>> {
    ObjectFile {
        format: format::OBJECT_FORMAT.to_string(),
        version: format::VERSION,
        created,
        attributes: attributes
            .iter()
            .map(|(t, v)| (*t, Hex(v.clone())))
            .collect(),
    }
    .to_bytes()
    .map_err(|e| BackendError::Io(format!("cannot encode an object file: {e}")))
}
