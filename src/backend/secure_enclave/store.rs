//! The Secure Enclave store as plain Rust: key and object files in the key directory, session
//! keys in memory, and an [`Enclave`] that does the Security-framework work (`platform` on macOS).
//!
//! Keys are opened lazily: the store lists its keys from its index (`store.index`, see the
//! `index` module) without reading a key file, and each [`KeyRecord`]'s signer reads its key file
//! and rebuilds the key from its handle on the first signature and keeps it, so loading a
//! directory never touches the enclave, and a key that cannot be rebuilt fails its own signatures
//! with the reason instead of hiding the other keys.

use std::sync::{Arc, Mutex};

use super::keyfile::{FormatError, KeyFile, ObjectFile, KEY_EXT, OBJECT_EXT};
use super::policy::{self, Route};
use crate::backend::file_store::{
    self, check_name, existing, file_name, now, random_name, NamedFiles, SessionKeys,
};
use crate::backend::index::{self, IndexedKey, IndexedObject, SignerCache, StoreIndex};
use crate::backend::keydir::{KeyDir, KeyDirLock};
use crate::backend::{
    Backend, BackendError, Found, KeyRecord, LookupAttribute, NewKey, ObjectRecord, RawAttribute,
    Result, Signer, StoreInfo,
};
use crate::encoding::POINT_LEN;

/// A key the enclave just made.
pub struct CreatedKey {
    /// What the key file keeps to find the key again (blob or keychain application label).
    pub handle: Vec<u8>,
    /// SEC1 uncompressed public point.
    pub public_point: [u8; POINT_LEN],
    /// Signs with the new key.
    pub signer: Arc<dyn Signer>,
}

/// A key the enclave rebuilt from its handle.
pub struct OpenedKey {
    /// Its SEC1 uncompressed public point, as the enclave reports it.
    pub public_point: [u8; POINT_LEN],
    /// Signs with it.
    pub signer: Arc<dyn Signer>,
}

/// The Security-framework side of the store.
pub trait Enclave: Send + Sync {
    /// Creates a P-256 key by `route`. `permanent` false makes a key that lives only as long as
    /// the returned signer (session keys), whatever the route.
    fn create(&self, route: Route, label: &str, permanent: bool) -> Result<CreatedKey>;

    /// Rebuilds a key from its handle. The store signs with it only when its public point is
    /// the stored one: without the token attributes the enclave may rebuild some other key.
    fn open(&self, route: Route, handle: &[u8]) -> Result<OpenedKey>;

    /// Deletes a keychain key (blob keys need nothing: deleting the file is enough).
    fn delete(&self, route: Route, handle: &[u8]) -> Result<()>;
}

/// A signer that reads its key file and rebuilds its key on first use.
struct DeferredSigner {
    enclave: Arc<dyn Enclave>,
    files: Arc<KeyFiles>,
    name: String,
    public_point: [u8; POINT_LEN],
    opened: Mutex<Option<Arc<dyn Signer>>>,
}

impl DeferredSigner {
    fn signer(&self) -> Result<Arc<dyn Signer>> {
        let mut opened = self.opened.lock().map_err(|_| poisoned())?;
        if let Some(s) = opened.as_ref() {
            return Ok(s.clone());
        }
        let path = self.files.dir.path().join(file_name(&self.name, KEY_EXT));
        let Some(file) = self.files.read_key(&self.name)? else {
            return Err(BackendError::Io(format!(
                "the key file {} is missing, refused or damaged",
                path.display()
            )));
        };
        if file.public_point != self.public_point {
            return Err(BackendError::Io(format!(
                "the key file {} holds another key than the one listed (changed outside \
                 devicekey); the store index is rebuilt when it is removed",
                path.display()
            )));
        }
        let key = self.enclave.open(file.route, &file.handle)?;
        if key.public_point != self.public_point {
            return Err(BackendError::Refused(
                "the rebuilt key is not the stored key (its public key differs); the key file does \
                 not belong to this Mac's Secure Enclave or keychain"
                    .to_string(),
            ));
        }
        *opened = Some(key.signer.clone());
        Ok(key.signer)
    }
}

impl Signer for DeferredSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        // The lock is released before signing: signatures with one key run in parallel.
        let signer = self.signer()?;
        signer.sign_digest(digest)
    }
}

fn poisoned() -> BackendError {
    BackendError::Io("a Secure Enclave store lock was poisoned by a panic".to_string())
}

/// The store's files: its key directory and the route whose keys it serves.
struct KeyFiles {
    dir: KeyDir,
    route: Route,
    class: crate::backend::ProtectionClass,
}

/// A Secure Enclave key store in one key directory.
pub struct EnclaveStore {
    info: StoreInfo,
    files: Arc<KeyFiles>,
    enclave: Arc<dyn Enclave>,
    sessions: SessionKeys,
    index: StoreIndex,
    signers: SignerCache,
}

impl EnclaveStore {
    /// A store whose new keys take `route`, with its files in `dir`.
    pub fn new(label: &str, route: Route, dir: KeyDir, enclave: Arc<dyn Enclave>) -> Self {
        let store = EnclaveStore {
            info: StoreInfo {
                label: label.to_string(),
                backend: crate::config::BackendKind::SecureEnclave,
                manufacturer: "Apple".to_string(),
                serial: file_store::serial_of(&dir),
                protection_class: route.protection_class(),
            },
            files: Arc::new(KeyFiles {
                dir,
                route,
                class: route.protection_class(),
            }),
            enclave,
            sessions: SessionKeys::default(),
            index: StoreIndex::default(),
            signers: SignerCache::default(),
        };
        if let Err(e) = store
            .index
            .create_if_missing(&store.files.dir, &*store.files)
        {
            log::warn!("no index for {}: {e}", store.files.dir.path().display());
        }
        store
    }

    /// The route new keys take.
    pub fn route(&self) -> Route {
        self.files.route
    }

    fn dir(&self) -> &KeyDir {
        &self.files.dir
    }

    /// Runs `f` holding the directory's lock.
    fn with_lock<T>(&self, f: impl FnOnce(&KeyDirLock) -> Result<T>) -> Result<T> {
        let lock = self.dir().lock()?;
        f(&lock)
    }

    /// Drops a removed file's name from the index (with the lock held); a failure is only
    /// logged: the file is gone, so the next load drops the name anyway.
    fn forget_removed(&self, lock: &KeyDirLock, name: &str) {
        self.index.removed(self.dir(), lock, name);
    }

    /// The signer of a listed key: it reads the key file and rebuilds the key on first use.
    fn new_signer(&self, key: &IndexedKey) -> Arc<dyn Signer> {
        Arc::new(DeferredSigner {
            enclave: self.enclave.clone(),
            files: Arc::clone(&self.files),
            name: key.name.clone(),
            public_point: key.public_point,
            opened: Mutex::new(None),
        })
    }
}

impl KeyFiles {
    /// Reads and decodes `<name>.<ext>`: `None` when it is absent, or (with a warning) damaged.
    fn read_decoded<T>(
        &self,
        name: &str,
        ext: &str,
        decode: impl FnOnce(&[u8]) -> std::result::Result<T, FormatError>,
    ) -> Result<Option<T>> {
        let Some(bytes) = self.dir.read(&file_name(name, ext))? else {
            return Ok(None);
        };
        match decode(&bytes) {
            Ok(file) => Ok(Some(file)),
            Err(e) => {
                log::warn!("skipping damaged file {name}.{ext}: {e}");
                Ok(None)
            }
        }
    }

    /// Writes `<name>.<ext>` atomically. Call with the lock held.
    fn write_encoded(
        &self,
        name: &str,
        ext: &str,
        encoded: std::result::Result<Vec<u8>, FormatError>,
    ) -> Result<()> {
        let bytes =
            encoded.map_err(|e| BackendError::Io(format!("cannot encode a .{ext} file: {e}")))?;
        self.dir.write_atomic(&file_name(name, ext), &bytes)
    }

    /// Reads a key file; `None` (with a warning) for a damaged file or a key of another class.
    fn read_key(&self, name: &str) -> Result<Option<KeyFile>> {
        index::count_key_file_parse(name);
        let file = self.read_decoded(name, KEY_EXT, KeyFile::decode)?;
        Ok(file.filter(|file| {
            let ours = policy::key_belongs(self.route, file.route);
            if !ours {
                log::warn!(
                    "skipping key {name}: made by the {} route ({}), but this store serves {}",
                    file.route.as_str(),
                    file.route.protection_class().as_str(),
                    self.class.as_str()
                );
            }
            ours
        }))
    }

    fn write_key(&self, name: &str, file: &KeyFile) -> Result<()> {
        self.write_encoded(name, KEY_EXT, file.encode())
    }

    fn read_object(&self, name: &str) -> Result<Option<ObjectFile>> {
        self.read_decoded(name, OBJECT_EXT, ObjectFile::decode)
    }

    fn write_object(&self, name: &str, file: &ObjectFile) -> Result<()> {
        self.write_encoded(name, OBJECT_EXT, file.encode())
    }
}

/// The index entry of a key file and of an object file.
impl NamedFiles for KeyFiles {
    const KEY_EXT: &'static str = KEY_EXT;
    const OBJECT_EXT: &'static str = OBJECT_EXT;

    fn key_entry(&self, name: &str) -> Result<Option<IndexedKey>> {
        let file = self.read_key(name)?;
        Ok(file.map(|f| indexed_key(name, &f)))
    }

    fn object_entry(&self, name: &str) -> Result<Option<IndexedObject>> {
        let file = self.read_object(name)?;
        Ok(file.map(|f| IndexedObject::new(name, f.created, &f.attributes)))
    }
}

fn indexed_key(name: &str, f: &KeyFile) -> IndexedKey {
    IndexedKey::new(name, &f.id, &f.label, f.purpose, f.public_point, f.created)
}

impl Backend for EnclaveStore {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn load_keys(&self) -> Result<Vec<KeyRecord>> {
        let contents = self.index.load(self.dir(), &*self.files)?;
        Ok(self.signers.records(&contents.keys, |k| self.new_signer(k)))
    }

    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord> {
        let name = random_name()?;
        let route = self.route();
        let created = self
            .enclave
            .create(route, &request.label, request.persistent)?;
        let record = KeyRecord {
            name,
            id: request.id.clone(),
            label: request.label.clone(),
            public_point: created.public_point,
            purpose: request.purpose,
            persistent: true,
            signer: created.signer,
        };
        if !request.persistent {
            return self.sessions.add(record);
        }
        let name = &record.name;
        let file = KeyFile {
            route,
            id: request.id.clone(),
            label: request.label.clone(),
            purpose: request.purpose,
            public_point: created.public_point,
            handle: created.handle,
            created: now(),
        };
        let written = self.with_lock(|lock| {
            self.files.write_key(name, &file)?;
            index::crash_point("create");
            self.index
                .put_key(self.dir(), lock, indexed_key(name, &file));
            Ok(())
        });
        if let Err(e) = written {
            // A keychain key without its file would be an orphan nobody can find again.
            if route.uses_keychain() {
                if let Err(d) = self.enclave.delete(route, &file.handle) {
                    log::warn!("cannot delete the keychain key of unwritten key {name}: {d}");
                }
            }
            return Err(e);
        }
        log::info!(
            "created {} key {name} ({:?})",
            route.as_str(),
            request.label
        );
        Ok(record)
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        if SessionKeys::is_session(name) {
            return self.sessions.update(name, label, id);
        }
        check_name(name)?;
        self.with_lock(|lock| {
            let mut file = existing(name, self.files.read_key(name)?)?;
            file.label = label.to_string();
            file.id = id.to_vec();
            self.index.forget(self.dir(), lock, name)?;
            self.files.write_key(name, &file)?;
            self.index
                .put_key(self.dir(), lock, indexed_key(name, &file));
            Ok(())
        })
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        if SessionKeys::is_session(name) {
            return self.sessions.remove(name);
        }
        check_name(name)?;
        self.with_lock(|lock| {
            let file = existing(name, self.files.read_key(name)?)?;
            if file.route.uses_keychain() {
                match self.enclave.delete(file.route, &file.handle) {
                    Ok(()) | Err(BackendError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            self.dir().remove(&file_name(name, KEY_EXT))?;
            self.forget_removed(lock, name);
            Ok(())
        })?;
        self.signers.forget(name);
        log::info!("destroyed key {name}");
        Ok(())
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        self.index.load_objects(self.dir(), &*self.files)
    }

    fn lookup(&self, attribute: LookupAttribute, value: &[u8]) -> Result<Option<Found>> {
        let make = |k: &IndexedKey| self.new_signer(k);
        let query = (attribute, value);
        let found = (self.index).found(self.dir(), &*self.files, &self.signers, make, query)?;
        Ok(Some(found))
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let name = random_name()?;
        let file = ObjectFile {
            created: now(),
            attributes: attributes.to_vec(),
        };
        self.with_lock(|lock| {
            self.files.write_object(&name, &file)?;
            let entry = IndexedObject::new(&name, file.created, attributes);
            self.index.put_object(self.dir(), lock, entry);
            Ok(())
        })?;
        Ok(name)
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        check_name(name)?;
        self.with_lock(|lock| {
            let mut file = existing(name, self.files.read_object(name)?)?;
            file.attributes = attributes.to_vec();
            self.index.forget(self.dir(), lock, name)?;
            self.files.write_object(name, &file)?;
            let entry = IndexedObject::new(name, file.created, attributes);
            self.index.put_object(self.dir(), lock, entry);
            Ok(())
        })
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.with_lock(|lock| {
            self.dir().remove(&file_name(name, OBJECT_EXT))?;
            self.forget_removed(lock, name);
            Ok(())
        })
    }

    fn change_marker(&self) -> Option<u128> {
        self.dir().change_marker()
    }
}

#[cfg(test)]
mod tests;
