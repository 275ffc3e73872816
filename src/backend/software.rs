//! The software key store (`os_protected_nonextractable`): P-256 keys in an owner-only directory.
//!
//! Layout of the directory (0700, owned by the user; a directory owned by someone else or
//! writable by group or others is refused):
//! - `<name>.key`: one key pair (JSON, see [`format::KeyFile`]), mode 0600;
//! - `<name>.obj`: one stored non-key object (JSON, see [`format::ObjectFile`]), mode 0600;
//! - `.lock`: held with `flock` around every change; its first 8 bytes count the changes;
//! - `.<name>.<ext>.<random>.tmp`: a file being written; never loaded, removed when stale.
//!
//! `<name>` is 32 lowercase hex digits (16 random bytes). Writes are atomic: temporary file,
//! fsync, rename, fsync of the directory. Session keys (`persistent = false`) live only in memory.

mod format;
mod signer;
mod slot;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use self::format::{Hex, KeyFile, ObjectFile, Scalar};
pub use self::signer::SoftwareSigner;
use crate::backend::{
    Backend, BackendError, KeyRecord, NewKey, ObjectRecord, ProtectionClass, RawAttribute, Result,
    StoreInfo,
};

const KEY_EXT: &str = "key";
const OBJ_EXT: &str = "obj";
const TMP_EXT: &str = "tmp";
const LOCK_FILE: &str = ".lock";
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
    dir: PathBuf,
    /// A handle on `.lock` to read the change counter without taking the lock.
    counter: File,
    sessions: Mutex<HashMap<String, SessionKey>>,
}

impl std::fmt::Debug for SoftwareStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareStore")
            .field("label", &self.info.label)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> BackendError {
    let msg = format!("{what} {}: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => BackendError::Full(msg),
        _ => BackendError::Io(msg),
    }
}

fn unusable(msg: String) -> BackendError {
    log::error!("{msg}");
    BackendError::Unusable(msg)
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
    Ok(format::hex_encode(&b))
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

/// Creates the directory (0700) if missing and checks its owner and mode.
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    match fs::metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    unusable(format!(
                        "cannot create the key directory {}: {e}; create it (mode 0700) or set \
                         the slot's `dir` to a writable place",
                        dir.display()
                    ))
                })?;
            // The umask may have removed bits, never added any; make it exactly 0700.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| io_err("cannot set the mode of", dir, &e))?;
            log::info!("created key directory {}", dir.display());
        }
        Err(e) => {
            return Err(unusable(format!(
                "cannot use the key directory {}: {e}",
                dir.display()
            )))
        }
    }
    let meta = fs::metadata(dir).map_err(|e| {
        unusable(format!(
            "cannot use the key directory {}: {e}",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(unusable(format!(
            "the key directory {} is not a directory; remove it or set the slot's `dir` elsewhere",
            dir.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unusable(format!(
            "the key directory {} is owned by uid {}, not by this user (uid {me}); refusing it. \
             Fix: `chown {me} {}` if it is yours, or set the slot's `dir` to a directory you own",
            dir.display(),
            meta.uid(),
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unusable(format!(
            "the key directory {} is writable by group or others (mode {mode:04o}); refusing it. \
             Fix: `chmod 700 {}`",
            dir.display(),
            dir.display()
        )));
    }
    if mode & 0o077 != 0 {
        log::warn!(
            "the key directory {} is readable by others (mode {mode:04o}); `chmod 700` it",
            dir.display()
        );
    }
    fs::canonicalize(dir).map_err(|e| io_err("cannot resolve", dir, &e))
}

/// Reads a whole file into a buffer wiped on drop; refuses files larger than `max`.
fn read_limited(path: &Path, max: u64) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is {len} bytes, more than {max}"),
        ));
    }
    let cap = usize::try_from(len).unwrap_or(0).saturating_add(1);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    Read::by_ref(&mut f).take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "file grew while being read",
        ));
    }
    Ok(buf)
}

/// Opens (creating it 0600 if missing) the lock file. On a read-only file system an existing
/// lock file is opened read-only: `flock` works on it, so the store can still be read (writes
/// then fail with a clear "Read-only file system").
fn open_lock_file(path: &Path) -> Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            File::open(path).map_err(|_| io_err("cannot open the lock file", path, &e))
        }
        Err(e) => Err(io_err("cannot open the lock file", path, &e)),
    }
}

fn flock(file: &File, op: rustix::fs::FlockOperation) -> std::io::Result<()> {
    loop {
        match rustix::fs::flock(file, op) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(std::io::Error::from),
        }
    }
}

impl SoftwareStore {
    /// Opens (creating it if missing) the store in `dir`, or in
    /// [`crate::config::default_data_dir`] when `dir` is `None`.
    pub fn open(label: &str, dir: Option<&Path>) -> Result<SoftwareStore> {
        let wanted = match dir {
            Some(d) => d.to_path_buf(),
            None => crate::config::default_data_dir(),
        };
        let dir = prepare_dir(&wanted)?;
        let lock_path = dir.join(LOCK_FILE);
        // The long-lived handle only reads the counter: a handle open for writing would keep
        // the file system from being remounted read-only for as long as the module is loaded.
        drop(open_lock_file(&lock_path)?);
        let counter = File::open(&lock_path)
            .map_err(|e| io_err("cannot open the lock file", &lock_path, &e))?;
        let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
        let serial = format::hex_encode(&digest[..8]);
        let store = SoftwareStore {
            info: StoreInfo {
                label: label.to_string(),
                backend: crate::config::BackendKind::Software,
                manufacturer: "devicekey".to_string(),
                serial,
                protection_class: ProtectionClass::OsProtectedNonextractable,
            },
            dir,
            counter,
            sessions: Mutex::new(HashMap::new()),
        };
        // Cleaning up changes nothing visible, so it leaves the change counter alone.
        store.locked(false, || {
            store.remove_stale_temp_files();
            Ok(())
        })?;
        log::debug!(
            "software store {:?} opened in {}",
            label,
            store.dir.display()
        );
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` holding the store's lock, then bumps the change counter. The lock file is
    /// opened afresh each time, so the `flock` excludes other threads of this process, other
    /// processes and forked children alike (they never share the open file description).
    fn with_lock<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.locked(true, f)
    }

    /// Runs `f` holding the store's lock; bumps the change counter when `bump`.
    fn locked<T>(&self, bump: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = open_lock_file(&lock_path)?;
        flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err("cannot lock", &lock_path, &e))?;
        let result = f();
        if bump {
            let mut count = [0u8; 8];
            let n = lock.read_at(&mut count, 0).unwrap_or(0);
            let next = if n == 8 { u64::from_le_bytes(count) } else { 0 }.wrapping_add(1);
            if let Err(e) = lock.write_all_at(&next.to_le_bytes(), 0) {
                log::warn!(
                    "cannot update the change counter {}: {e}",
                    lock_path.display()
                );
            }
        }
        // Closing the file releases the lock.
        drop(lock);
        result
    }

    /// Removes temporary files left by a crash. Call with the lock held: every writer holds the
    /// lock while its temporary file exists, so any temporary file seen now is stale.
    fn remove_stale_temp_files(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') && name.ends_with(&format!(".{TMP_EXT}")) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => log::warn!("removed a stale temporary file {}", path.display()),
                    Err(e) => log::warn!("cannot remove stale {}: {e}", path.display()),
                }
            }
        }
    }

    fn path_of(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{name}.{ext}"))
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync the directory", &self.dir, &e))
    }

    /// Writes `<name>.<ext>` atomically: temporary file (0600), fsync, rename, fsync directory.
    /// Call with the lock held.
    fn write_atomic(&self, name: &str, ext: &str, contents: &[u8]) -> Result<()> {
        let tmp = self
            .dir
            .join(format!(".{name}.{ext}.{}.{TMP_EXT}", random_name()?));
        let target = self.path_of(name, ext);
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            fs::rename(&tmp, &target)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot write", &target, &e));
        }
        self.sync_dir()
    }

    /// Removes `<name>.<ext>`; `NotFound` when absent. Call with the lock held.
    fn remove(&self, name: &str, ext: &str) -> Result<()> {
        let path = self.path_of(name, ext);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(BackendError::NotFound(format!("{name}.{ext}")))
            }
            Err(e) => Err(io_err("cannot remove", &path, &e)),
        }
    }

    /// Names of the `<name>.<ext>` files in the directory.
    fn list(&self, ext: &str) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_err("cannot list", &self.dir, &e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("cannot list", &self.dir, &e))?;
            if let Some(file_name) = entry.file_name().to_str() {
                if let Some(stem) = stem_with_ext(file_name, ext) {
                    names.push(stem.to_string());
                }
            }
        }
        Ok(names)
    }

    /// Reads and parses a key file; `Ok(None)` (with a warning) when it is damaged.
    fn read_key(&self, name: &str) -> Result<Option<KeyFile>> {
        let path = self.path_of(name, KEY_EXT);
        let bytes = match read_limited(&path, MAX_KEY_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                log::warn!("skipping key file {}: {e}", path.display());
                return Ok(None);
            }
        };
        match KeyFile::parse(&bytes) {
            Ok(k) => Ok(Some(k)),
            Err(e) => {
                log::warn!("skipping damaged key file {}: {e}", path.display());
                Ok(None)
            }
        }
    }

    fn read_object(&self, name: &str) -> Option<ObjectFile> {
        let path = self.path_of(name, OBJ_EXT);
        let bytes = match read_limited(&path, MAX_OBJ_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!("skipping object file {}: {e}", path.display());
                return None;
            }
        };
        match ObjectFile::parse(&bytes) {
            Ok(o) => Some(o),
            Err(e) => {
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
        let meta = fs::metadata(&self.dir).ok()?;
        let mtime_ns =
            (i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())) as u64;
        let mut count = [0u8; 8];
        let n = self.counter.read_at(&mut count, 0).unwrap_or(0);
        let count = if n == 8 { u64::from_le_bytes(count) } else { 0 };
        Some((u128::from(mtime_ns) << 64) | u128::from(count))
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
