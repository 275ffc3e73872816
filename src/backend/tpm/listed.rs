//! The TPM store's keys and objects as its index lists them (see the `index` module): which
//! files commit keys and objects, how a key's files become an index entry (blob parsed, purpose
//! binding checked, public point and public area kept), and the signer of a listed key, which
//! reads and checks the key's files on its first signature.

use std::sync::{Arc, OnceLock};

use super::device::{Device, TpmKey};
use super::store::{name_of, KeyFiles, KeyMeta};
use super::{check_purpose, KeyBlob};
use crate::backend::index::{self, IndexedFiles, IndexedKey, IndexedObject};
use crate::backend::{BackendError, Result, Signer};

/// Reads a key's sidecar and blob, parses the blob and checks the purpose binding.
pub(super) fn load_key_file(files: &KeyFiles, name: &str) -> Result<(TpmKey, KeyMeta)> {
    index::count_key_file_parse(name);
    let (meta, pem) = files.read_key(name)?;
    let blob = KeyBlob::from_pem(&pem).map_err(|e| BackendError::Io(format!("{name}: {e}")))?;
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

    fn parse_key(&self, name: &str) -> Result<Option<IndexedKey>> {
        match load_key_file(self, name).and_then(|(key, meta)| indexed_key(&key, &meta)) {
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

/// Signs with a TPM key that was listed from the index: its files are read, parsed and checked
/// against the entry (public point, purpose binding) on the first signature, then kept.
pub(super) struct ListedSigner {
    pub(super) device: Arc<Device>,
    pub(super) files: Arc<KeyFiles>,
    pub(super) entry: IndexedKey,
    pub(super) key: OnceLock<Arc<TpmKey>>,
}

impl ListedSigner {
    fn key(&self) -> Result<&Arc<TpmKey>> {
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let name = &self.entry.name;
        let (key, meta) = load_key_file(&self.files, name).map_err(|e| match e {
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
        Ok(self.key.get_or_init(|| Arc::new(key)))
    }
}

impl Signer for ListedSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        self.device.sign(self.key()?, digest)
    }

    fn tpm_public_area(&self) -> Option<Vec<u8>> {
        self.entry.tpm_public.clone()
    }
}
