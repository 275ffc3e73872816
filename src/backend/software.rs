//! The software key store (`os_protected_nonextractable`): P-256 keys in an owner-only directory.
//!
//! The directory is a [`KeyDir`]: owner-only (0700), safe ancestors, every file reached through
//! the directory's descriptor and loaded only when it is a regular 0600 file of the user's (see
//! the `keydir` module for the whole policy). Layout:
//! - `<name>.key`: one key pair (JSON, see [`format::KeyFile`]), mode 0600;
//! - `<name>.obj`: one stored non-key object (JSON, see [`format::ObjectFile`]), mode 0600;
//! - `store.index`: what listing the keys and objects needs, so opening the store parses no key
//!   file (a cache of the files, checked against the directory listing on every load: see the
//!   `index` module); a key file is read when its key first signs;
//! - `store.hint.XX`: lookup hints, which names may hold a given label or CKA_ID (see the
//!   `index` module), so a search by either reads one of these and the candidates' key files;
//! - `.lock`: held with `flock` around every change; its first 8 bytes count the changes, the
//!   next 32 hold the stamp that vouches for the index and hints (see the `keydir` module);
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
use crate::backend::file_store::{
    self, check_name, existing, now, random_name, NamedFiles, SessionKeys,
};
use crate::backend::index::{self, IndexedKey, IndexedObject, SignerCache, StoreIndex};
use crate::backend::keydir::{KeyDir, KeyDirLock};
use crate::backend::{
    pin::PinGuard, Backend, BackendError, Found, KeyRecord, LookupAttribute, NewKey, ObjectRecord,
    ProtectionClass, RawAttribute, Result, Signer, StoreInfo,
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
    index: StoreIndex,
    signers: SignerCache,
    pin: Option<SoftwarePin>,
}

/// Where a listed key's private scalar is: its key file. The signer keeps one and reads the
/// scalar through it on the key's first signature.
pub struct KeyFileRef {
    dir: Arc<KeyDir>,
    name: String,
}

impl KeyFileRef {
    /// The key's name (its file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the key file, checking that it still holds the key with `public_point` (the one
    /// the key was listed with).
    pub fn read(&self, public_point: &[u8; 65]) -> Result<KeyFile> {
        let path = self
            .dir
            .path()
            .join(file_store::file_name(&self.name, KEY_EXT));
        let Some(file) = read_key(&self.dir, &self.name)? else {
            return Err(BackendError::Io(format!(
                "the key file {} is missing, refused or damaged",
                path.display()
            )));
        };
        if file.public_point.0 != public_point[..] {
            return Err(BackendError::Io(format!(
                "the key file {} holds another key than the one listed (changed outside \
                 devicekey); the store index is rebuilt when it is removed",
                path.display()
            )));
        }
        Ok(file)
    }

    /// Reads the key file and returns its private scalar in the clear (a store without a PIN).
    pub fn read_scalar(&self, public_point: &[u8; 65]) -> Result<Box<Zeroizing<[u8; 32]>>> {
        match self.read(public_point)?.private_scalar {
            Some(scalar) => Ok(scalar.0),
            None => Err(BackendError::NotLoggedIn(format!(
                "key {} is sealed under a PIN and its slot has none (login = \"none\")",
                self.name
            ))),
        }
    }
}

crate::redact::debug_shows!(SoftwareStore: |s| label = s.info.label, dir = s.dir.path());

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
            index: StoreIndex::default(),
            signers: SignerCache::default(),
            pin,
        };
        // Temporary files left by a crash are removed by the index's full check, which the
        // crash makes the next lookup run (the temporary file changed the directory).
        if let Err(e) = store.index.create_if_missing(&store.dir, &store) {
            log::warn!("no index for {}: {e}", store.dir.path().display());
        }
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
    fn with_lock<T>(&self, f: impl FnOnce(&KeyDirLock) -> Result<T>) -> Result<T> {
        let lock = self.dir.lock()?;
        let result = f(&lock);
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

    /// Drops a removed file's name from the index (call with the lock held). A failure is only
    /// logged: the file is gone, so the next load drops the name anyway.
    fn forget_removed(&self, lock: &KeyDirLock, name: &str) {
        self.index.removed(&self.dir, lock, name);
    }

    fn read_key(&self, name: &str) -> Result<Option<KeyFile>> {
        read_key(&self.dir, name)
    }

    fn read_object(&self, name: &str) -> Option<ObjectFile> {
        let bytes = read_file(&self.dir, name, OBJ_EXT, MAX_OBJ_FILE)?;
        match ObjectFile::parse(&bytes) {
            Ok(o) => Some(o),
            Err(e) => {
                let path = self.dir.path().join(format!("{name}.{OBJ_EXT}"));
                log::warn!("skipping damaged object file {}: {e}", path.display());
                None
            }
        }
    }

    /// The signer of a listed key: it reads the key file on the first signature (and is kept
    /// across reloads, so a key's file is read once per process). In a store with a PIN it
    /// signs only while the store is logged in.
    fn new_signer(&self, key: &IndexedKey) -> Arc<dyn Signer> {
        let file = KeyFileRef {
            dir: Arc::clone(&self.dir),
            name: key.name.clone(),
        };
        match &self.pin {
            None => Arc::new(SoftwareSigner::from_file(key.public_point, file)),
            Some(p) => Arc::new(SealedSigner::new(
                &key.name,
                key.public_point,
                ScalarSource::File(file),
                p.session().clone(),
            )),
        }
    }
}

/// What the index keeps of a key file.
fn indexed_key(name: &str, file: &KeyFile) -> Option<IndexedKey> {
    let point = file.public_point.0.as_slice().try_into().ok()?;
    let (id, label) = (&file.id.0, &file.label);
    Some(IndexedKey::new(
        name,
        id,
        label,
        file.purpose,
        point,
        file.created,
    ))
}

fn indexed_object(name: &str, file: ObjectFile) -> IndexedObject {
    IndexedObject {
        name: name.to_string(),
        created: file.created,
        attributes: file.attributes.into_iter().map(|(t, v)| (t, v.0)).collect(),
    }
}

/// Reads a file of the store: `None` when absent, refused (logged once by the key directory)
/// or unreadable (logged).
fn read_file(dir: &KeyDir, name: &str, ext: &str, max: u64) -> Option<Zeroizing<Vec<u8>>> {
    let file = file_store::file_name(name, ext);
    match dir.read_limited(&file, max) {
        Ok(bytes) => bytes,
        Err(e) => {
            log::warn!("skipping {}: {e}", dir.path().join(&file).display());
            None
        }
    }
}

/// Reads and parses a key file; `Ok(None)` (with a warning) when it is damaged.
fn read_key(dir: &KeyDir, name: &str) -> Result<Option<KeyFile>> {
    index::count_key_file_parse(name);
    let Some(bytes) = read_file(dir, name, KEY_EXT, MAX_KEY_FILE) else {
        return Ok(None);
    };
    match KeyFile::parse(&bytes) {
        Ok(k) => Ok(Some(k)),
        Err(e) => {
            let path = dir.path().join(format!("{name}.{KEY_EXT}"));
            log::warn!("skipping damaged key file {}: {e}", path.display());
            Ok(None)
        }
    }
}

impl NamedFiles for SoftwareStore {
    const KEY_EXT: &'static str = KEY_EXT;
    const OBJECT_EXT: &'static str = OBJ_EXT;

    fn key_entry(&self, name: &str) -> Result<Option<IndexedKey>> {
        Ok(self.read_key(name)?.and_then(|f| indexed_key(name, &f)))
    }

    fn object_entry(&self, name: &str) -> Result<Option<IndexedObject>> {
        Ok(self.read_object(name).map(|f| indexed_object(name, f)))
    }
}

impl Backend for SoftwareStore {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn load_keys(&self) -> Result<Vec<KeyRecord>> {
        let contents = self.index.load(&self.dir, self)?;
        Ok(self.signers.records(&contents.keys, |k| self.new_signer(k)))
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
        let indexed = indexed_key(&record.name, &file);
        self.with_lock(|lock| {
            self.write_atomic(&record.name, KEY_EXT, &bytes)?;
            index::crash_point("create");
            if let Some(k) = indexed {
                self.index.put_key(&self.dir, lock, k);
            }
            Ok(())
        })?;
        self.signers
            .get_or_make(&record.name, &record.public_point, || record.signer.clone());
        log::info!("created key {} ({:?})", record.name, request.label);
        Ok(record)
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        if SessionKeys::is_session(name) {
            return self.sessions.update(name, label, id);
        }
        check_name(name)?;
        self.with_lock(|lock| {
            let mut file = existing(name, self.read_key(name)?)?;
            file.label = label.to_string();
            file.id = Hex(id.to_vec());
            let bytes = file
                .to_bytes()
                .map_err(|e| BackendError::Io(format!("cannot encode a key file: {e}")))?;
            self.index.forget(&self.dir, lock, name)?;
            index::crash_point("relabel-forgotten");
            self.write_atomic(name, KEY_EXT, &bytes)?;
            index::crash_point("relabel");
            if let Some(k) = indexed_key(name, &file) {
                self.index.put_key(&self.dir, lock, k);
            }
            Ok(())
        })
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        if SessionKeys::is_session(name) {
            return self.sessions.remove(name);
        }
        check_name(name)?;
        self.with_lock(|lock| {
            self.remove(name, KEY_EXT)?;
            index::crash_point("delete");
            self.forget_removed(lock, name);
            Ok(())
        })?;
        self.signers.forget(name);
        if let Some(p) = &self.pin {
            p.session().forget(name);
        }
        log::info!("destroyed key {name}");
        Ok(())
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        self.index.load_objects(&self.dir, self)
    }

    fn lookup(&self, attribute: LookupAttribute, value: &[u8]) -> Result<Option<Found>> {
        let make = |k: &IndexedKey| self.new_signer(k);
        let query = (attribute, value);
        let found = self
            .index
            .found(&self.dir, self, &self.signers, make, query)?;
        Ok(Some(found))
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let name = random_name()?;
        let created = now();
        let bytes = object_bytes(attributes, created)?;
        self.with_lock(|lock| {
            self.write_atomic(&name, OBJ_EXT, &bytes)?;
            self.index.put_object(
                &self.dir,
                lock,
                IndexedObject::new(&name, created, attributes),
            );
            Ok(())
        })?;
        Ok(name)
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        check_name(name)?;
        self.with_lock(|lock| {
            let old = existing(name, self.read_object(name))?;
            let bytes = object_bytes(attributes, old.created)?;
            self.index.forget(&self.dir, lock, name)?;
            self.write_atomic(name, OBJ_EXT, &bytes)?;
            self.index.put_object(
                &self.dir,
                lock,
                IndexedObject::new(name, old.created, attributes),
            );
            Ok(())
        })
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.with_lock(|lock| {
            self.remove(name, OBJ_EXT)?;
            self.forget_removed(lock, name);
            Ok(())
        })
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
