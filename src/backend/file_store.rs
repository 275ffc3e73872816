//! What the software and Secure Enclave stores do the same way: the names they give key and
//! object files (32 random lowercase hex digits) and session keys (CKA_TOKEN false) that live
//! only in memory. Both list their files through the store index (the `index` module).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::index::{IndexedFiles, IndexedKey, IndexedObject};
use crate::backend::keydir::KeyDir;
use crate::backend::{BackendError, KeyRecord, Result};
use crate::encoding;

/// Session keys have names with this prefix; no file name has it.
pub const SESSION_PREFIX: &str = "session-";

/// Seconds since the Unix epoch (0 when the clock is before it).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new name: 16 random bytes as 32 lowercase hex digits.
pub fn random_name() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)
        .map_err(|e| BackendError::Crypto(format!("random number generator failed: {e}")))?;
    Ok(encoding::hex(&b))
}

/// True for the names these stores give keys and objects (32 lowercase hex digits).
pub fn valid_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<name>` when `file_name` is `<name>.<ext>` with a valid name.
pub fn stem<'a>(file_name: &'a str, ext: &str) -> Option<&'a str> {
    let stem = file_name.strip_suffix(ext)?.strip_suffix('.')?;
    valid_name(stem).then_some(stem)
}

/// The token serial number of a store in `dir`: 16 hex digits of the SHA-256 of its path, so it
/// stays the same across restarts and differs between directories.
pub fn serial_of(dir: &KeyDir) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.path().as_os_str().as_encoded_bytes());
    encoding::hex(&digest[..8])
}

/// `<name>.<ext>`.
pub fn file_name(name: &str, ext: &str) -> String {
    format!("{name}.{ext}")
}

/// The files of these stores, `<name>.<KEY_EXT>` and `<name>.<OBJECT_EXT>`, as the store index
/// reads them.
pub trait NamedFiles {
    /// The extension of key files.
    const KEY_EXT: &'static str;
    /// The extension of object files.
    const OBJECT_EXT: &'static str;
    /// Parses the key file of `name` into its index entry; `None` when absent or damaged.
    fn key_entry(&self, name: &str) -> Result<Option<IndexedKey>>;
    /// Parses the object file of `name` into its index entry; `None` when absent or damaged.
    fn object_entry(&self, name: &str) -> Result<Option<IndexedObject>>;
}

impl<T: NamedFiles> IndexedFiles for T {
    fn key_name<'a>(&self, file: &'a str) -> Option<&'a str> {
        stem(file, T::KEY_EXT)
    }

    fn object_name<'a>(&self, file: &'a str) -> Option<&'a str> {
        stem(file, T::OBJECT_EXT)
    }

    fn parse_key(&self, name: &str) -> Result<Option<IndexedKey>> {
        self.key_entry(name)
    }

    fn parse_object(&self, name: &str) -> Result<Option<IndexedObject>> {
        self.object_entry(name)
    }
}

/// `NotFound` unless `name` is one these stores give out.
pub fn check_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(BackendError::NotFound(name.to_string()))
    }
}

/// The file `read` found, or `NotFound` naming `name`.
pub fn existing<T>(name: &str, found: Option<T>) -> Result<T> {
    found.ok_or_else(|| BackendError::NotFound(name.to_string()))
}

/// Session keys: in memory only, named `session-<name>`.
#[derive(Default)]
pub struct SessionKeys {
    keys: Mutex<HashMap<String, KeyRecord>>,
}

fn poisoned() -> BackendError {
    BackendError::Io("the session key table lock was poisoned by a panic".into())
}

impl SessionKeys {
    /// True when `name` names a session key (whether or not it still exists).
    pub fn is_session(name: &str) -> bool {
        name.starts_with(SESSION_PREFIX)
    }

    /// Keeps `record` as a session key: renamed `session-<its name>`, not persistent. Returns
    /// what it keeps.
    pub fn add(&self, mut record: KeyRecord) -> Result<KeyRecord> {
        record.name = format!("{SESSION_PREFIX}{}", record.name);
        record.persistent = false;
        self.keys
            .lock()
            .map_err(|_| poisoned())?
            .insert(record.name.clone(), record.clone());
        Ok(record)
    }

    /// Sets the label and CKA_ID of a session key.
    pub fn update(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        let mut keys = self.keys.lock().map_err(|_| poisoned())?;
        let key = keys
            .get_mut(name)
            .ok_or_else(|| BackendError::NotFound(name.to_string()))?;
        key.label = label.to_string();
        key.id = id.to_vec();
        Ok(())
    }

    /// Forgets a session key.
    pub fn remove(&self, name: &str) -> Result<()> {
        match self.keys.lock().map_err(|_| poisoned())?.remove(name) {
            Some(_) => Ok(()),
            None => Err(BackendError::NotFound(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::assert_not_found;
    use crate::backend::{KeyPurpose, Signer};

    struct NoSigner;
    impl Signer for NoSigner {
        fn sign_digest(&self, _: &[u8; 32]) -> Result<[u8; 64]> {
            Err(BackendError::Crypto("no".into()))
        }
    }

    #[test]
    fn names_are_32_hex_digits() {
        let n = random_name().unwrap();
        assert!(valid_name(&n));
        assert_ne!(n, random_name().unwrap());
        for bad in ["", "../x", "ZZ", &n.to_uppercase(), &format!("{n}0")] {
            assert!(!valid_name(bad), "{bad:?}");
            assert_not_found(check_name(bad));
        }
        assert_eq!(stem(&file_name(&n, "key"), "key"), Some(n.as_str()));
        assert_eq!(stem(&file_name(&n, "key"), "obj"), None);
        assert_eq!(stem(".lock", "lock"), None);
    }

    #[test]
    fn session_keys_live_in_memory() {
        let keys = SessionKeys::default();
        let k = keys
            .add(KeyRecord {
                name: "n".into(),
                id: vec![1],
                label: "l".into(),
                public_point: [4; 65],
                purpose: KeyPurpose::default(),
                persistent: true,
                signer: Arc::new(NoSigner),
            })
            .unwrap();
        assert_eq!(k.name, "session-n");
        assert!(!k.persistent);
        assert!(SessionKeys::is_session(&k.name));
        keys.update(&k.name, "l2", b"id").unwrap();
        assert_eq!(keys.keys.lock().unwrap()[&k.name].label, "l2");
        assert_eq!(keys.keys.lock().unwrap()[&k.name].id, b"id");
        keys.remove(&k.name).unwrap();
        assert_not_found(keys.remove(&k.name));
        assert_not_found(keys.update(&k.name, "x", b""));
    }
}
