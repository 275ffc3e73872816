//! The TPM 2.0 key store (`backend = "tpm"`, cargo feature `tpm`, through `tss-esapi`).
//!
//! Keys are P-256 signing keys (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, sign)
//! created under the storage root key (SRK) of the owner hierarchy. Their blobs live in an
//! owner-only directory as TSS2 PRIVATE KEY PEM files (`key-<hex>.pem`, readable by the tpm2
//! OpenSSL provider and engines), each with a JSON sidecar (`key-<hex>.json`) holding CKA_ID,
//! label and purpose. The purpose is also bound into the TPM object's public area, and that
//! binding is what counts: a sidecar that disagrees marks the key damaged (see the `purpose`
//! module). A blob is useless without this TPM: its private area is encrypted by the SRK.
//! The store lists its keys from its index (`store.index`, the `index` module), which keeps each
//! key's CKA_ID, label, purpose (as bound into the TPM object), public point and public area:
//! opening the store reads no blob, and a key's files are read, parsed and checked on its first
//! signature (`listed`), under the PIN generation of the login.
//!
//! **The SRK is derived, not persisted.** Each connection runs TPM2_CreatePrimary with the TCG
//! standard ECC P-256 storage template. The TPM derives the same key from the owner seed every
//! time, so nothing is written to TPM NV memory, no owner password or persistent handle is
//! needed (0x81000001 may belong to someone else), nothing is left behind on uninstall, and the
//! blobs name their parent as `0x40000001` exactly as other TPM tools expect. The cost is one
//! CreatePrimary per connection (per process), not per signature.
//!
//! **Speed.** The TPM context has one owner ([`device::Device`], a mutex): callers queue.
//! A key is loaded once and its handle cached (a 2-entry LRU besides the SRK, because a TPM
//! without a resource manager has three object slots); everything is flushed on eviction,
//! deletion and disconnect. The backend signs only when asked: length queries are the token's.
//!
//! **Honesty.** The store's class is `hardware_tpm` only for a real TPM. A simulator (swtpm and
//! the reference simulator report manufacturer `IBM`, vendor `SW TPM`) is
//! `os_protected_nonextractable` unless the config sets `allow_simulator = true` (tests).
//!
//! **Processes.** After `fork()` the child opens its own connection and never flushes the
//! parent's objects; a dropped connection is reopened once by the next call.
//!
//! **PIN** (`login = "pin"`): the PIN becomes each key's authValue, so the TPM refuses to sign
//! without it and counts wrong PINs in its dictionary-attack counter (see the `pin` module).
//! Without it, keys have an empty authValue, as before. A PIN change gives each key a new blob
//! and changes nothing the index keeps (the public area stays the same), so the index is left
//! as it is and no key file is parsed again at the next load; a key's signer reads its new blob
//! at its next signature under the new login.
//!
//! **Attestation** (ATTESTATION.md): [`TpmBackend::attest`] has a key certified (TPM2_Certify)
//! by the store's attestation key (AK), a restricted P-256 signing key under the TPM's
//! endorsement key (EK), created once and kept in the key directory (`attestation-key.json`,
//! never listed as a token key); [`TpmBackend::activate_credential`] answers a verifier's
//! MakeCredential challenge with the AK and the EK. The EK is the one whose certificate is in NV
//! (see the `ekcert` module); both connections' object slots are given back after each call.
//! Each half of a key also carries its public area as `CKA_DEVICEKEY_TPM_PUBLIC_AREA`.
//!
//! The TCTI comes from the slot's `tcti`, else `$DEVICEKEY_TPM_TCTI`, else `device:/dev/tpmrm0`
//! (the kernel resource manager). swtpm (`swtpm:host=127.0.0.1,port=P`) serves one TCP connection
//! at a time, but the swtpm TCTI opens one per command, so several processes share it; with no
//! resource manager they see (and, when the TPM is full, flush) each other's objects, and the
//! process that loses its objects reconnects (see the `device` module).

mod device;
mod ekcert;
mod keyfile;
mod listed;
mod pin;
mod purpose;
mod slot;
mod store;

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::index::{self, IndexedKey, IndexedObject, SignerCache, StoreIndex};
use crate::backend::keydir::KeyDirLock;
use crate::backend::pin::PinGuard;
use crate::backend::{
    Backend, BackendError, Found, KeyRecord, LookupAttribute, NewKey, ObjectRecord,
    ProtectionClass, RawAttribute, Result, Signer, StoreInfo,
};
use crate::config::{LoginMode, TpmSlot};

pub use device::{
    is_simulator, name_of, Identity, Lockout, PersistOutcome, SrkSource, CACHE_SIZE, PERSISTENT_EK,
    PERSISTENT_SRK,
};
pub use keyfile::{KeyBlob, KeyFileError};
pub use pin::{derive_auth, ABORT_AFTER_ENV, PIN_FILE};
pub use purpose::{policy_digest, policy_text};

use device::{ak_from_blobs, AkParts, Device, TpmKey};
use listed::{indexed_key, load_key_file, TpmSigner, OWN_BLOB};
use pin::TpmPin;
use purpose::Binding;
use store::{random_name, AkFile, KeyFiles, KeyMeta};

/// The TCTI used when neither the config nor `DEVICEKEY_TPM_TCTI` names one.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The environment variable that names the TCTI when the config does not.
pub const TCTI_ENV: &str = "DEVICEKEY_TPM_TCTI";

/// The TCTI to use: the configured one, else `$DEVICEKEY_TPM_TCTI`, else [`DEFAULT_TCTI`].
pub fn resolve_tcti(configured: Option<&str>) -> String {
    configured
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .or_else(|| std::env::var(TCTI_ENV).ok().filter(|t| !t.is_empty()))
        .unwrap_or_else(|| DEFAULT_TCTI.to_string())
}

/// The default key directory: `<data dir>/tpm`.
pub fn default_dir() -> PathBuf {
    crate::config::default_data_dir().join("tpm")
}

/// Everything the TPM store needs to open.
#[derive(Clone, Debug)]
pub struct TpmConfig {
    /// The token label.
    pub label: String,
    /// The key directory (owner-only).
    pub dir: PathBuf,
    /// The TCTI string.
    pub tcti: String,
    /// Let a simulator report `hardware_tpm` (tests only).
    pub allow_simulator: bool,
}

impl TpmConfig {
    /// The config of a `[[slot]] backend = "tpm"`, defaults filled in.
    pub fn from_slot(slot: &TpmSlot) -> Self {
        Self {
            label: slot.label.clone(),
            dir: slot.dir.clone().unwrap_or_else(default_dir),
            tcti: resolve_tcti(slot.tcti.as_deref()),
            allow_simulator: slot.allow_simulator,
        }
    }
}

/// The class a TPM earns.
fn class_for(identity: &Identity, allow_simulator: bool) -> ProtectionClass {
    if identity.simulator && !allow_simulator {
        ProtectionClass::OsProtectedNonextractable
    } else {
        ProtectionClass::HardwareTpm
    }
}

/// What `devicekey doctor` shows about a TPM.
#[derive(Clone, Debug)]
pub struct TpmProbe {
    /// The TCTI tried.
    pub tcti: String,
    /// What the TPM said about itself, when it answered.
    pub identity: Option<Identity>,
    /// The class keys of this TPM get, when it answered.
    pub class: Option<ProtectionClass>,
    /// Why it did not answer, with the fix.
    pub error: Option<String>,
}

impl TpmProbe {
    /// True when the TPM answered.
    pub fn reachable(&self) -> bool {
        self.identity.is_some()
    }
}

impl std::fmt::Display for TpmProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "TPM at {}", self.tcti)?;
        match (&self.identity, self.class) {
            (Some(id), Some(class)) => {
                writeln!(f, "  manufacturer: {} ({})", id.manufacturer, id.vendor)?;
                writeln!(f, "  firmware:     {}", id.firmware)?;
                writeln!(
                    f,
                    "  simulator:    {}",
                    if id.simulator { "yes" } else { "no" }
                )?;
                match &id.srk {
                    SrkSource::Persistent => {
                        writeln!(f, "  SRK:          persistent at {PERSISTENT_SRK:#x}")?
                    }
                    SrkSource::Derived(why) => {
                        writeln!(f, "  SRK:          derived per connection ({why})")?
                    }
                }
                write!(f, "  class:        {}", class.as_str())?;
                if id.simulator && class == ProtectionClass::OsProtectedNonextractable {
                    write!(f, " (a simulator; allow_simulator = true makes it hardware_tpm, for tests only)")?;
                }
                Ok(())
            }
            _ => write!(
                f,
                "  not reachable: {}",
                self.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}

/// Connects to the TPM at `tcti`, reads who it is and disconnects. Needs no key directory.
pub fn probe(tcti: &str, allow_simulator: bool) -> TpmProbe {
    let device = Device::new(tcti);
    let result = device.identity();
    device.disconnect();
    match result {
        Ok(identity) => TpmProbe {
            tcti: tcti.to_string(),
            class: Some(class_for(&identity, allow_simulator)),
            identity: Some(identity),
            error: None,
        },
        Err(e) => TpmProbe {
            tcti: tcti.to_string(),
            identity: None,
            class: None,
            error: Some(e.to_string()),
        },
    }
}

/// Makes the SRK persistent at [`PERSISTENT_SRK`] on the TPM at `tcti`, with the owner
/// hierarchy's authorization (empty when the owner has none); refuses when another object holds
/// the handle. Later connections use it instead of TPM2_CreatePrimary.
pub fn persist_srk(tcti: &str, owner_auth: &[u8]) -> Result<PersistOutcome> {
    Device::persist_srk(tcti, owner_auth)
}

/// The TPM's part of a key's attestation evidence (ATTESTATION.md): everything but the SPKI.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// The key's public area (TPMT_PUBLIC, marshalled).
    pub key_public_area: Vec<u8>,
    /// What TPM2_Certify returned (TPMS_ATTEST, marshalled).
    pub certify_info: Vec<u8>,
    /// The AK's signature over SHA-256(certify_info), raw `r‖s`.
    pub signature: [u8; 64],
    /// The AK's public area.
    pub ak_public_area: Vec<u8>,
    /// The EK's public area.
    pub ek_public_area: Vec<u8>,
    /// The EK certificate (DER) first, then the CA certificates the TPM holds.
    pub ek_certificates: Vec<Vec<u8>>,
}

/// The TPM key store.
pub struct TpmBackend {
    info: StoreInfo,
    dir: Arc<KeyFiles>,
    device: Arc<Device>,
    /// The user PIN, for a slot with `login = "pin"`.
    pin: Option<Arc<TpmPin>>,
    identity: Identity,
    allow_simulator: bool,
    index: StoreIndex,
    signers: SignerCache,
}

crate::redact::debug_shows!(TpmBackend: |b|
    label = b.info.label,
    dir = b.dir.path(),
    tcti = b.device.tcti(),
);

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

impl TpmBackend {
    /// Opens the store of a `[[slot]] backend = "tpm"`.
    pub fn from_slot(slot: &TpmSlot) -> Result<Self> {
        Self::open_with_login(&TpmConfig::from_slot(slot), slot.login)
    }

    /// Opens the key directory (creating it owner-only) and connects to the TPM, which must
    /// answer: its identity decides the class. No user PIN (`login = "none"`).
    pub fn open(config: &TpmConfig) -> Result<Self> {
        Self::open_with_login(config, LoginMode::None)
    }

    /// [`TpmBackend::open`], with a user PIN when `login` is [`LoginMode::Pin`]: it becomes
    /// each key's authValue (see the `pin` module).
    pub fn open_with_login(config: &TpmConfig, login: LoginMode) -> Result<Self> {
        let dir = Arc::new(KeyFiles::open(&config.dir)?);
        let device = Arc::new(Device::new(&config.tcti));
        let identity = device.identity()?;
        let class = class_for(&identity, config.allow_simulator);
        if identity.simulator && class == ProtectionClass::OsProtectedNonextractable {
            log::warn!(
                "tpm: {} is a simulator ({} {}); its keys are reported as os_protected_nonextractable (allow_simulator = true changes that, for tests only)",
                config.tcti,
                identity.manufacturer,
                identity.vendor
            );
        }
        let manufacturer = format!("{} {}", identity.manufacturer, identity.vendor);
        let info = StoreInfo {
            label: truncate(&config.label, 32),
            backend: crate::config::BackendKind::Tpm,
            manufacturer: truncate(manufacturer.trim(), 32),
            serial: crate::encoding::hex(&identity.srk_fingerprint),
            protection_class: class,
        };
        log::info!(
            "tpm: store {:?} at {} on {} (class {})",
            info.label,
            dir.path().display(),
            config.tcti,
            class.as_str()
        );
        let pin = (login == LoginMode::Pin)
            .then(|| Arc::new(TpmPin::new(Arc::clone(&dir), Arc::clone(&device))));
        let store = Self {
            info,
            dir,
            device,
            pin,
            identity,
            allow_simulator: config.allow_simulator,
            index: StoreIndex::default(),
            signers: SignerCache::default(),
        };
        if let Err(e) = store
            .index
            .create_if_missing(store.dir.key_dir(), store.dir.as_ref())
        {
            log::warn!("tpm: no index for {}: {e}", store.dir.path().display());
        }
        Ok(store)
    }

    /// What `devicekey doctor` shows, over this store's own connection.
    pub fn probe(&self) -> TpmProbe {
        match self.device.identity() {
            Ok(identity) => TpmProbe {
                tcti: self.device.tcti().to_string(),
                class: Some(class_for(&identity, self.allow_simulator)),
                identity: Some(identity),
                error: None,
            },
            Err(e) => TpmProbe {
                tcti: self.device.tcti().to_string(),
                identity: None,
                class: None,
                error: Some(e.to_string()),
            },
        }
    }

    /// The identity the TPM reported when the store opened.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// How many TPM2_Sign commands this store has sent (for tests and benchmarks).
    pub fn signatures_made(&self) -> u64 {
        self.device.signatures()
    }

    /// Finds the persistent key with this CKA_ID whose public point is `point` (looked up in
    /// the index, only its files read), with the blob under the store's current PIN generation
    /// when it has one, and the generation that blob is under.
    fn find_key(&self, id: &[u8], point: &[u8; 65]) -> Result<Option<(TpmKey, u32)>> {
        let contents = self.index.load(self.dir.key_dir(), self.dir.as_ref())?;
        let mut current = None;
        for entry in &contents.keys {
            if entry.id != id || entry.public_point != *point {
                continue;
            }
            let generation = match current {
                Some(g) => g,
                None => *current.insert(pin::current_generation(&self.dir)?),
            };
            let (key, meta) = match load_key_file(&self.dir, &entry.name, generation) {
                Ok(found) => found,
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if key.public_point().as_ref() == Some(point) {
                return Ok(Some((key, meta.pin_generation)));
            }
        }
        Ok(None)
    }

    /// Whether this store holds the persistent key with this CKA_ID and public point.
    pub fn holds_key(&self, id: &[u8], point: &[u8; 65]) -> Result<bool> {
        Ok(self.find_key(id, point)?.is_some())
    }

    /// The store's attestation key, created under the EK on first use (under the directory's
    /// lock, so that concurrent processes make one). One made under another EK is replaced.
    fn attestation_key(&self) -> Result<(Vec<u8>, AkParts)> {
        let ek_name = self.device.endorsement()?.name();
        let usable = |file: &AkFile| -> Result<Option<(Vec<u8>, AkParts)>> {
            if file.ek_name != crate::encoding::hex(&ek_name) {
                log::warn!(
                    "tpm: the stored attestation key belongs to another EK; making a new one"
                );
                return Ok(None);
            }
            let bad = |e: String| BackendError::Io(format!("{}: {e}", store::AK_FILE));
            let public =
                crate::encoding::hex_decode(&file.public).ok_or_else(|| bad("hex".into()))?;
            let private =
                crate::encoding::hex_decode(&file.private).ok_or_else(|| bad("hex".into()))?;
            Ok(Some((
                ek_name.clone(),
                ak_from_blobs(&public, &private).map_err(bad)?,
            )))
        };
        let stored = || -> Result<_> {
            Ok(self
                .dir
                .read_ak()?
                .as_ref()
                .map(usable)
                .transpose()?
                .flatten())
        };
        if let Some(found) = stored()? {
            return Ok(found);
        }
        let _lock = self.dir.lock()?;
        if let Some(found) = stored()? {
            return Ok(found);
        }
        let parts = self.device.create_ak()?;
        let key = TpmKey::new(
            "attestation-key",
            parts.public.clone(),
            parts.private.clone(),
        );
        let blob = key.to_blob().map_err(BackendError::Crypto)?;
        self.dir.write_ak(&AkFile {
            format: AkFile::FORMAT.into(),
            version: 1,
            ek_name: crate::encoding::hex(&ek_name),
            public: crate::encoding::hex(&blob.public),
            private: crate::encoding::hex(&blob.private),
        })?;
        log::info!("tpm: created the store's attestation key");
        Ok((ek_name, parts))
    }

    /// Attests the key with this CKA_ID and public point: TPM2_Certify by the store's AK with
    /// `qualifying` as qualifying data. `None` when this store has no such key.
    pub fn attest(
        &self,
        id: &[u8],
        point: &[u8; 65],
        qualifying: &[u8; 32],
    ) -> Result<Option<Evidence>> {
        let Some((key, generation)) = self.find_key(id, point)? else {
            return Ok(None);
        };
        // TPM2_Certify needs the key's authValue.
        let auth = pin::auth_for(self.pin.as_deref(), &key.name, generation)?;
        let (ek_name, ak) = self.attestation_key()?;
        let certified = self.device.certify(
            &ek_name,
            &ak,
            &key,
            auth.as_ref().map(|a| &a[..]),
            qualifying,
        );
        // Give the TPM's object slots back (without a resource manager they are shared with
        // the module's own connection).
        self.device.disconnect();
        let (ek, certified) = certified?;
        let marshal = |p: &tss_esapi::structures::Public| {
            use tss_esapi::traits::Marshall;
            p.marshall()
                .map_err(|e| BackendError::Crypto(format!("cannot marshal a public area: {e}")))
        };
        Ok(Some(Evidence {
            key_public_area: marshal(&key.public)?,
            certify_info: certified.certify_info,
            signature: certified.signature,
            ak_public_area: marshal(&ak.public)?,
            ek_public_area: ek.public_area,
            ek_certificates: ek.certificates,
        }))
    }

    /// TPM2_ActivateCredential with the store's AK and the EK: the secret a verifier sealed to
    /// them with MakeCredential. `id_object` and `encrypted_secret` are TPM2B contents.
    pub fn activate_credential(
        &self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let (_, ak) = self.attestation_key()?;
        let secret = self.device.activate(&ak, id_object, encrypted_secret);
        self.device.disconnect();
        secret
    }

    /// Closes the TPM connection (flushing every object we loaded); the next call reconnects.
    pub fn disconnect(&self) {
        self.device.disconnect();
    }

    /// The one signer of a TPM key (see [`TpmSigner`]); `loaded` is its blob when the caller
    /// has it (a key just created), with the PIN generation it is under.
    fn new_signer(&self, entry: &IndexedKey, loaded: Option<(u32, TpmKey)>) -> Arc<dyn Signer> {
        Arc::new(TpmSigner::new(
            Arc::clone(&self.device),
            Arc::clone(&self.dir),
            self.pin.clone(),
            entry.clone(),
            loaded,
        ))
    }

    /// The signer of a stored key, kept across reloads (by name and public point), so that
    /// its files are read once, not at every reload.
    fn kept_signer(&self, entry: &IndexedKey, loaded: Option<(u32, TpmKey)>) -> Arc<dyn Signer> {
        self.signers
            .get_or_make(&entry.name, &entry.public_point, || {
                self.new_signer(entry, loaded)
            })
    }

    /// The record of a key listed from the index (or just created, with its blob).
    fn record(&self, entry: IndexedKey, signer: Arc<dyn Signer>, persistent: bool) -> KeyRecord {
        KeyRecord {
            name: entry.name,
            id: entry.id,
            label: entry.label,
            public_point: entry.public_point,
            purpose: entry.purpose,
            persistent,
            signer,
        }
    }

    /// Runs `f` holding the key directory's lock, then counts the change so other processes
    /// reload.
    fn with_lock<T>(&self, f: impl FnOnce(&KeyDirLock) -> Result<T>) -> Result<T> {
        let lock = self.dir.lock()?;
        let result = f(&lock);
        lock.bump();
        result
    }

    /// Drops a removed file's name from the index (call with the lock held); a failure is only
    /// logged: the file is gone, so the next load drops the name anyway.
    fn forget_removed(&self, lock: &KeyDirLock, name: &str) {
        self.index.removed(self.dir.key_dir(), lock, name);
    }
}

/// Checks that the purpose in the key's sidecar is the one bound into its TPM public area.
fn check_purpose(path: &std::path::Path, key: &TpmKey, meta: &KeyMeta) -> Result<()> {
    let problem = match key.binding() {
        Binding::Bound(p) if p == meta.purpose => return Ok(()),
        Binding::Bound(p) => format!(
            "refusing the TPM key {}: its sidecar says purpose {:?} but the TPM object is bound \
             to {p:?}; the sidecar was changed, the key is treated as damaged. Fix: restore the \
             sidecar, or delete the key",
            path.display(),
            meta.purpose
        ),
        Binding::Unbound => format!(
            "refusing the TPM key {}: it was created before key purposes were bound into TPM \
             objects, so its purpose rests only on an editable sidecar. Fix: create a new key",
            path.display()
        ),
        Binding::Foreign => format!(
            "refusing the TPM key {}: its TPM object carries an authPolicy that is not one of \
             devicekey's purpose bindings. Fix: delete it, it was not made by devicekey",
            path.display()
        ),
    };
    crate::backend::keydir::log_once(&problem);
    Err(BackendError::Refused(problem))
}

/// Session keys (CKA_TOKEN = false) are never written; their names say so.
const SESSION_PREFIX: &str = "ses-";

impl Backend for TpmBackend {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn load_keys(&self) -> Result<Vec<KeyRecord>> {
        let contents = self.index.load(self.dir.key_dir(), self.dir.as_ref())?;
        Ok(self
            .signers
            .records(&contents.keys, |k| self.new_signer(k, None)))
    }

    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord> {
        let name = if request.persistent {
            random_name("key")?
        } else {
            random_name("ses")?
        };
        // A PIN slot's key gets the logged-in PIN's authValue (TPM2_Create runs outside the
        // directory's lock).
        let (generation, auth) = match &self.pin {
            Some(pin) => pin.for_new_key()?,
            None => (0, None),
        };
        let key = self
            .device
            .create(&name, request.purpose, auth.as_ref().map(|a| &a[..]))?;
        let mut meta = KeyMeta::new(&request.id, &request.label, request.purpose);
        meta.pin_generation = generation;
        let entry = indexed_key(&key, &meta)?;
        if request.persistent {
            let mut blob = key.to_blob().map_err(BackendError::Crypto)?;
            blob.empty_auth = generation == 0;
            // Written under the lock, and only while that PIN generation is the store's: a PIN
            // change holds the lock while it re-protects the keys it lists. The same lock
            // covers the key's files and its index record.
            self.with_lock(|lock| {
                if let Some(pin) = &self.pin {
                    pin.check_generation(generation)?;
                }
                self.dir.write_key(&name, &blob.to_pem(), &meta)?;
                index::crash_point("create");
                self.index.put_key(self.dir.key_dir(), lock, entry.clone());
                Ok(())
            })?;
        }
        log::info!("tpm: created key {name}");
        let loaded = Some((generation, key));
        let signer = if request.persistent {
            self.kept_signer(&entry, loaded)
        } else {
            self.new_signer(&entry, loaded)
        };
        Ok(self.record(entry, signer, request.persistent))
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        if name.starts_with(SESSION_PREFIX) {
            return Ok(());
        }
        self.with_lock(|lock| {
            let (key, mut meta) = load_key_file(&self.dir, name, OWN_BLOB)?;
            meta.label = label.to_string();
            meta.id = crate::encoding::hex(id);
            self.index.forget(self.dir.key_dir(), lock, name)?;
            index::crash_point("relabel-forgotten");
            self.dir.write_meta(name, &meta)?;
            index::crash_point("relabel");
            self.index
                .put_key(self.dir.key_dir(), lock, indexed_key(&key, &meta)?);
            Ok(())
        })
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        if !name.starts_with(SESSION_PREFIX) {
            self.with_lock(|lock| {
                self.dir.remove_key(name)?;
                index::crash_point("delete");
                self.forget_removed(lock, name);
                Ok(())
            })?;
            self.signers.forget(name);
        }
        self.device.forget(name);
        Ok(())
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        self.index
            .load_objects(self.dir.key_dir(), self.dir.as_ref())
    }

    fn lookup(&self, attribute: LookupAttribute, value: &[u8]) -> Result<Option<Found>> {
        let (dir, files) = (self.dir.key_dir(), self.dir.as_ref());
        let make = |k: &IndexedKey| self.new_signer(k, None);
        let found = (self.index).found(dir, files, &self.signers, make, (attribute, value))?;
        Ok(Some(found))
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let name = random_name("obj")?;
        self.with_lock(|lock| {
            self.dir.write_object(&name, attributes)?;
            self.index.put_object(
                self.dir.key_dir(),
                lock,
                IndexedObject::new(&name, 0, attributes),
            );
            Ok(())
        })?;
        Ok(name)
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        self.with_lock(|lock| {
            self.dir.read_object(name)?;
            self.index.forget(self.dir.key_dir(), lock, name)?;
            self.dir.write_object(name, attributes)?;
            self.index.put_object(
                self.dir.key_dir(),
                lock,
                IndexedObject::new(name, 0, attributes),
            );
            Ok(())
        })
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        self.with_lock(|lock| {
            self.dir.remove_object(name)?;
            self.forget_removed(lock, name);
            Ok(())
        })
    }

    fn change_marker(&self) -> Option<u128> {
        self.dir.change_marker()
    }

    fn pin(&self) -> Option<&dyn PinGuard> {
        self.pin.as_deref().map(|p| p as &dyn PinGuard)
    }
}
