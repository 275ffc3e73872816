//! The TPM store's keys and objects as its index lists them (see the `index` module): which
//! files commit keys and objects, how a key's files become an index entry (blob parsed, purpose
//! binding checked, public point and public area kept), and the one signer of a TPM key, which
//! reads and checks the key's files on its first signature, takes the blob under the PIN
//! generation of the login (see the `pin` module) and reads it again after a PIN change.

use std::sync::{Arc, Mutex};

use super::check_purpose;
use super::device::{Device, TpmKey};
use super::pin::{self, TpmPin};
use super::store::{name_of, KeyFiles, KeyMeta};
use crate::backend::index::{self, IndexedFiles, IndexedKey, IndexedObject};
use crate::backend::{BackendError, Result, Signer};

/// The generation to read a key's own blob under, whatever PIN generation it is under: what the
/// index and a relabel read (a PIN change alters neither the public area nor the sidecar's
/// CKA_ID, label and purpose).
pub(super) const OWN_BLOB: u32 = 0;

/// Reads a key's sidecar and its blob under PIN generation `generation` (the side file of an
/// unfinished PIN change when there is one, else its own blob: see [`pin::resolve_blob`]),
/// parses the blob and checks the purpose binding. The metadata's `pin_generation` says which
/// generation the blob returned is under.
pub(super) fn load_key_file(
    files: &KeyFiles,
    name: &str,
    generation: u32,
) -> Result<(TpmKey, KeyMeta)> {
    index::count_key_file_parse(name);
    let (meta, blob) = pin::resolve_blob(files, name, generation)?;
    let key =
        TpmKey::from_blob(name, &blob).map_err(|e| BackendError::Io(format!("{name}: {e}")))?;
    check_purpose(&files.path().join(name), &key, &meta)?;
    Ok((key, meta))
}

/// What the index keeps of a key.
pub(super) fn indexed_key(key: &TpmKey, meta: &KeyMeta) -> Result<IndexedKey> {
    use tss_esapi::traits::Marshall;
    let public_point = key
        .public_point()
        .ok_or_else(|| BackendError::Crypto(format!("{} is not a P-256 signing key", key.name)))?;
    Ok(IndexedKey {
        name: key.name.clone(),
        id: meta.id_bytes()?,
        label: meta.label.clone(),
        purpose: meta.purpose,
        public_point,
        created: 0,
        tpm_public: key.public.marshall().ok(),
    })
}

impl IndexedFiles for KeyFiles {
    fn key_name<'a>(&self, file: &'a str) -> Option<&'a str> {
        name_of(file, "key")
    }

    fn object_name<'a>(&self, file: &'a str) -> Option<&'a str> {
        name_of(file, "obj")
    }

    fn stale_temp_age(&self) -> Option<std::time::Duration> {
        Some(KeyFiles::stale_temp_age())
    }

    fn parse_key(&self, name: &str) -> Result<Option<IndexedKey>> {
        match load_key_file(self, name, OWN_BLOB).and_then(|(key, meta)| indexed_key(&key, &meta)) {
            Ok(k) => Ok(Some(k)),
            // Removed meanwhile by another process, or refused (logged once).
            Err(BackendError::NotFound(_) | BackendError::Refused(_)) => Ok(None),
            Err(e) => {
                log::warn!("tpm: skipping key {name}: {e}");
                Ok(None)
            }
        }
    }

    fn parse_object(&self, name: &str) -> Result<Option<IndexedObject>> {
        match self.read_object(name) {
            Ok(attributes) => Ok(Some(IndexedObject {
                name: name.to_string(),
                created: 0,
                attributes,
            })),
            Err(BackendError::NotFound(_)) => Ok(None),
            Err(e) => {
                log::warn!("tpm: skipping object {name}: {e}");
                Ok(None)
            }
        }
    }
}

/// Signs with one TPM key. A listed key's files are read, parsed and checked against its index
/// entry (public point, purpose binding) on its first signature, under the PIN generation of the
/// login (0, an empty authValue, on a slot without a PIN); the blob is kept, and read again when
/// a later login is under another generation (the PIN was changed).
pub(super) struct TpmSigner {
    device: Arc<Device>,
    files: Arc<KeyFiles>,
    /// The slot's PIN (`login = "pin"`).
    pin: Option<Arc<TpmPin>>,
    entry: IndexedKey,
    /// The blob read last, with the PIN generation it is under.
    key: Mutex<Option<(u32, Arc<TpmKey>)>>,
}

impl TpmSigner {
    /// The signer of the key `entry`; `loaded` is its blob when the caller has it (a key just
    /// created), with its PIN generation.
    pub(super) fn new(
        device: Arc<Device>,
        files: Arc<KeyFiles>,
        pin: Option<Arc<TpmPin>>,
        entry: IndexedKey,
        loaded: Option<(u32, TpmKey)>,
    ) -> Self {
        Self {
            device,
            files,
            pin,
            entry,
            key: Mutex::new(loaded.map(|(g, k)| (g, Arc::new(k)))),
        }
    }

    /// The key's blob under PIN generation `generation`: the one kept, else read from the
    /// key's files ([`pin::key_under`]) and checked against the entry.
    fn key_under(&self, generation: u32) -> Result<Arc<TpmKey>> {
        let mut kept = self
            .key
            .lock()
            .map_err(|_| BackendError::Unusable("a TPM key's lock is poisoned".into()))?;
        if let Some((g, key)) = kept.as_ref() {
            if *g == generation {
                return Ok(Arc::clone(key));
            }
        }
        let name = &self.entry.name;
        let (key, meta) = pin::key_under(&self.files, name, generation).map_err(|e| match e {
            BackendError::NotFound(_) if name.starts_with(super::SESSION_PREFIX) => {
                BackendError::NotLoggedIn(format!(
                    "the session key {name} was made under another PIN than this login's"
                ))
            }
            BackendError::NotFound(_) => BackendError::Io(format!(
                "the files of TPM key {name} in {} are missing",
                self.files.path().display()
            )),
            e => e,
        })?;
        if key.public_point() != Some(self.entry.public_point) || meta.purpose != self.entry.purpose
        {
            return Err(BackendError::Io(format!(
                "the files of TPM key {name} in {} hold another key than the one listed \
                 (changed outside devicekey); the store index is rebuilt when it is removed",
                self.files.path().display()
            )));
        }
        let key = Arc::new(key);
        *kept = Some((generation, Arc::clone(&key)));
        Ok(key)
    }
}

impl Signer for TpmSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        pin::sign(&self.device, self.pin.as_deref(), digest, |g| {
            self.key_under(g)
        })
    }

    fn tpm_public_area(&self) -> Option<Vec<u8>> {
        self.entry.tpm_public.clone()
    }
}
