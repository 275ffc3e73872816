//! The software key store (`os_protected_nonextractable`): P-256 keys in an owner-only directory.
//!
//! The directory is a [`KeyDir`]: owner-only (0700), safe ancestors, every file reached through
//! the directory's descriptor and loaded only when it is a regular 0600 file of the user's (see
//! the `keydir` module for the whole policy). Layout:
//! - `<name>.key`: one key pair (JSON, see [`format::KeyFile`]), mode 0600;
//! - `<name>.obj`: one stored non-key object (JSON, see [`format::ObjectFile`]), mode 0600;
//! - `.lock`: held with `flock` around every change; its first 8 bytes count the changes;
//! - `pin`: the PIN file of a store with `login = "pin"` (see the `pin` module): the data key
//!   that seals every scalar, wrapped under an Argon2id key of the PIN, and the wrong-try count;
//! - `.<name>.<ext>.<random>.tmp`: a file being written; never loaded, removed when stale.
//!
//! `<name>` is 32 lowercase hex digits (16 random bytes). Writes are atomic (temporary file,
//! fsync, rename, fsync of the directory) and made holding the lock. Session keys
//! (`persistent = false`) live only in memory.

pub(crate) mod format;
pub mod pin;
mod signer;
mod slot;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use self::format::{Hex, KeyFile, ObjectFile, Scalar};
use self::pin::{PinVault, ScalarSource, SealedSigner, SoftwarePin};
pub use self::signer::SoftwareSigner;
use crate::backend::file_store::{self, check_name, existing, now, random_name, SessionKeys};
use crate::backend::keydir::KeyDir;
use crate::backend::{
    pin::PinGuard, Backend, BackendError, KeyRecord, NewKey, ObjectRecord, ProtectionClass,
    RawAttribute, Result, Signer, StoreInfo,
};

const KEY_EXT: &str = "key";
const OBJ_EXT: &str = "obj";
/// Key files are small; anything larger is not one of ours.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// Objects hold certificates; allow generous sizes.
const MAX_OBJ_FILE: u64 = 16 * 1024 * 1024;

/// The PIN options of a store with `login = "pin"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinOptions {
    /// Wrong tries allowed in a row before the PIN locks.
    pub max_tries: u32,
}

impl Default for PinOptions {
    fn default() -> Self {
        Self {
            max_tries: pin::DEFAULT_MAX_TRIES,
        }
    }
}

/// The software key store.
pub struct SoftwareStore {
    info: StoreInfo,
    dir: Arc<KeyDir>,
    sessions: SessionKeys,
    pin: Option<SoftwarePin>,
}

impl std::fmt::Debug for SoftwareStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareStore")
            .field("label", &self.info.label)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl SoftwareStore {
    /// Opens (creating it if missing) the store in `dir`, or in
    /// [`crate::config::default_data_dir`] when `dir` is `None`, without a PIN.
    pub fn open(label: &str, dir: Option<&Path>) -> Result<SoftwareStore> {
        Self::open_with(label, dir, None)
    }

    /// [`Self::open`], with a user PIN when `pin` is given (`login = "pin"`). A store without
    /// a PIN refuses a directory that has a PIN file: its keys are sealed under that PIN.
    pub fn open_with(
        label: &str,
        dir: Option<&Path>,
        pin: Option<PinOptions>,
    ) -> Result<SoftwareStore> {
        let wanted = match dir {
            Some(d) => d.to_path_buf(),
            None => crate::config::default_data_dir(),
        };
        let dir = Arc::new(KeyDir::open(&wanted)?);
        if pin.is_none() && PinVault::exists_in(&dir)? {
            return Err(BackendError::Unusable(format!(
                "slot {label:?}: {} has a PIN file, so its keys are sealed under a PIN, but the \
                 slot says login = \"none\"; fix: set login = \"pin\" on the slot",
                dir.path().join(pin::PIN_FILE).display()
            )));
        }
        let pin = pin.map(|o| SoftwarePin::new(dir.clone(), o.max_tries));
        let serial = file_store::serial_of(&dir);
        let store = SoftwareStore {
            info: StoreInfo {
                label: label.to_string(),
                backend: crate::config::BackendKind::Software,
                manufacturer: "devicekey".to_string(),
                serial,
                protection_class: ProtectionClass::OsProtectedNonextractable,
            },
            dir,
            sessions: SessionKeys::default(),
            pin,
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
        self.dir
            .write_atomic(&file_store::file_name(name, ext), contents)
    }

    /// Removes `<name>.<ext>`; `NotFound` when absent. Call with the lock held.
    fn remove(&self, name: &str, ext: &str) -> Result<()> {
        self.dir.remove(&file_store::file_name(name, ext))
    }

    /// Reads a file of the store: `None` when absent, refused (logged once by the key
    /// directory) or unreadable (logged).
    fn read_file(&self, name: &str, ext: &str, max: u64) -> Option<Zeroizing<Vec<u8>>> {
        let file = file_store::file_name(name, ext);
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

    /// The record of a key file; `None` (logged) for a sealed key in a store without a PIN.
    fn record_of(&self, name: String, file: KeyFile) -> Option<KeyRecord> {
        let mut public_point = [0u8; 65];
        public_point.copy_from_slice(&file.public_point.0);
        let signer: Arc<dyn Signer> = match (&self.pin, file.private_scalar, file.sealed_scalar) {
            (Some(p), clear, sealed) => {
                let source = match (clear, sealed) {
                    (_, Some(s)) => ScalarSource::Sealed(s),
                    (Some(c), None) => ScalarSource::Clear(c.0),
                    (None, None) => return None,
                };
                Arc::new(SealedSigner::new(
                    &name,
                    public_point,
                    source,
                    p.session().clone(),
                ))
            }
            (None, Some(clear), _) => Arc::new(SoftwareSigner::deferred(public_point, clear.0)),
            (None, None, _) => {
                log::warn!("skipping key {name}: it is sealed under a PIN and the slot has none");
                return None;
            }
        };
        Some(KeyRecord {
            name,
            id: file.id.0,
            label: file.label,
            public_point,
            purpose: file.purpose,
            persistent: true,
            signer,
        })
    }
}

impl Backend for SoftwareStore {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn load_keys(&self) -> Result<Vec<KeyRecord>> {
        file_store::load_all(&self.dir, KEY_EXT, |name| {
            let file = self.read_key(&name)?;
            Ok(file.and_then(|f| Some((f.created, self.record_of(name, f)?))))
        })
    }

    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord> {
        let generated = SoftwareSigner::generate()?;
        let name = random_name()?;
        // With a PIN the scalar is sealed at once, and the key signs only while logged in.
        let (sealed, signer): (_, Arc<dyn Signer>) = match &self.pin {
            None => (None, Arc::new(generated.signer)),
            Some(p) => {
                let sealed = p.session().seal_scalar(&name, &generated.scalar)?;
                let source = ScalarSource::Sealed(sealed.clone());
                let signer =
                    SealedSigner::new(&name, generated.public_point, source, p.session().clone());
                (Some(sealed), Arc::new(signer))
            }
        };
        let record = KeyRecord {
            name,
            id: request.id.clone(),
            label: request.label.clone(),
            public_point: generated.public_point,
            purpose: request.purpose,
            persistent: true,
            signer,
        };
        if !request.persistent {
            return self.sessions.add(record);
        }
        let file = KeyFile {
            format: format::KEY_FORMAT.to_string(),
            version: if sealed.is_some() {
                format::SEALED_VERSION
            } else {
                format::VERSION
            },
            id: Hex(request.id.clone()),
            label: request.label.clone(),
            purpose: request.purpose,
            public_point: Hex(generated.public_point.to_vec()),
            private_scalar: match sealed {
                Some(_) => None,
                None => Some(Scalar(generated.scalar)),
            },
            sealed_scalar: sealed,
            created: now(),
        };
        let bytes = file
            .to_bytes()
            .map_err(|e| BackendError::Io(format!("cannot encode a key file: {e}")))?;
        self.with_lock(|| self.write_atomic(&record.name, KEY_EXT, &bytes))?;
        log::info!("created key {} ({:?})", record.name, request.label);
        Ok(record)
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        if SessionKeys::is_session(name) {
            return self.sessions.update(name, label, id);
        }
        check_name(name)?;
        self.with_lock(|| {
            let mut file = existing(name, self.read_key(name)?)?;
            file.label = label.to_string();
            file.id = Hex(id.to_vec());
            let bytes = file
                .to_bytes()
                .map_err(|e| BackendError::Io(format!("cannot encode a key file: {e}")))?;
            self.write_atomic(name, KEY_EXT, &bytes)
        })
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        if SessionKeys::is_session(name) {
            return self.sessions.remove(name);
        }
        check_name(name)?;
        self.with_lock(|| self.remove(name, KEY_EXT))?;
        if let Some(p) = &self.pin {
            p.session().forget(name);
        }
        log::info!("destroyed key {name}");
        Ok(())
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        file_store::load_all(&self.dir, OBJ_EXT, |name| {
            Ok(self.read_object(&name).map(|file| {
                let attributes = file.attributes.into_iter().map(|(t, v)| (t, v.0)).collect();
                (file.created, ObjectRecord { name, attributes })
            }))
        })
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let name = random_name()?;
        let bytes = object_bytes(attributes, now())?;
        self.with_lock(|| self.write_atomic(&name, OBJ_EXT, &bytes))?;
        Ok(name)
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        check_name(name)?;
        self.with_lock(|| {
            let old = existing(name, self.read_object(name))?;
            let bytes = object_bytes(attributes, old.created)?;
            self.write_atomic(name, OBJ_EXT, &bytes)
        })
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.with_lock(|| self.remove(name, OBJ_EXT))
    }

    fn change_marker(&self) -> Option<u128> {
        self.dir.change_marker()
    }

    fn pin(&self) -> Option<&dyn PinGuard> {
        self.pin.as_ref().map(|p| p as &dyn PinGuard)
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
