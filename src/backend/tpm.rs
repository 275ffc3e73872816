//! The TPM 2.0 key store (`backend = "tpm"`, cargo feature `tpm`, through `tss-esapi`).
//!
//! Keys are P-256 signing keys (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, sign)
//! created under the storage root key (SRK) of the owner hierarchy. Their blobs live in an
//! owner-only directory as TSS2 PRIVATE KEY PEM files (`key-<hex>.pem`, readable by the tpm2
//! OpenSSL provider and engines), each with a JSON sidecar (`key-<hex>.json`) holding CKA_ID,
//! label and purpose. The purpose is also bound into the TPM object's public area, and that
//! binding is what counts: a sidecar that disagrees marks the key damaged (see the `purpose`
//! module). A blob is useless without this TPM: its private area is encrypted by the SRK.
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
//! Without it, keys have an empty authValue, as before.
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
mod pin;
mod purpose;
mod slot;
mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::backend::pin::PinGuard;
use crate::backend::{
    Backend, BackendError, KeyRecord, NewKey, ObjectRecord, ProtectionClass, RawAttribute, Result,
    Signer, StoreInfo,
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

/// Signs with one TPM key.
struct TpmSigner {
    device: Arc<Device>,
    /// The PIN generation of the blob, and the blob.
    key: Mutex<(u32, Arc<TpmKey>)>,
    /// The store's key directory, to find the key's blob after a PIN change.
    dir: Arc<KeyFiles>,
    /// The slot's PIN (`login = "pin"`).
    pin: Option<Arc<TpmPin>>,
}

impl TpmSigner {
    fn cached(&self) -> Result<(u32, Arc<TpmKey>)> {
        let guard = self
            .key
            .lock()
            .map_err(|_| BackendError::Unusable("a TPM key's lock is poisoned".into()))?;
        Ok((guard.0, Arc::clone(&guard.1)))
    }

    /// The key's blob under `generation`, read again from the store when the cached one is
    /// under another (the PIN was changed since the key was loaded).
    fn key_under(&self, generation: u32) -> Result<Arc<TpmKey>> {
        let (cached, key) = self.cached()?;
        if cached == generation {
            return Ok(key);
        }
        let fresh = Arc::new(pin::key_under(&self.dir, &key.name, generation)?);
        if let Ok(mut guard) = self.key.lock() {
            *guard = (generation, Arc::clone(&fresh));
        }
        Ok(fresh)
    }
}

impl Signer for TpmSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        pin::sign(&self.device, self.pin.as_deref(), digest, |g| {
            self.key_under(g)
        })
    }

    fn tpm_public_area(&self) -> Option<Vec<u8>> {
        use tss_esapi::traits::Marshall;
        self.cached().ok()?.1.public.marshall().ok()
    }
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
}

impl std::fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBackend")
            .field("label", &self.info.label)
            .field("dir", &self.dir.path())
            .field("tcti", &self.device.tcti())
            .finish_non_exhaustive()
    }
}

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
        Ok(Self {
            info,
            dir,
            device,
            pin,
            identity,
            allow_simulator: config.allow_simulator,
        })
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

    /// Finds the persistent key with this CKA_ID whose public point is `point`, with the PIN
    /// generation of its blob (the blob under the store's current one, when it has one).
    fn find_key(&self, id: &[u8], point: &[u8; 65]) -> Result<Option<(TpmKey, u32)>> {
        let id_hex = crate::encoding::hex(id);
        let current = pin::current_generation(&self.dir)?;
        for name in self.dir.names("key")? {
            let (meta, blob) = match pin::resolve_blob(&self.dir, &name, current) {
                Ok(found) => found,
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if meta.id != id_hex {
                continue;
            }
            let key = TpmKey::from_blob(&name, &blob)
                .map_err(|e| BackendError::Io(format!("{name}: {e}")))?;
            check_purpose(&self.dir.path().join(&name), &key, &meta)?;
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
        // TPM2_Certify needs the key's authValue: a PIN key is attested only after login
        // (trying without it would cost a try against the dictionary-attack counter).
        let auth = match (&self.pin, generation) {
            (_, 0) => None,
            (None, _) => {
                return Err(BackendError::Refused(format!(
                    "the TPM key {} is protected by a PIN; set login = \"pin\" on its slot",
                    key.name
                )))
            }
            (Some(pin), _) => {
                let (logged_in, auth) = pin.logged_in()?;
                if logged_in != generation {
                    return Err(BackendError::NotLoggedIn(format!(
                        "the TPM key {} is under another PIN than this login's",
                        key.name
                    )));
                }
                Some(auth)
            }
        };
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

    fn record(&self, key: TpmKey, meta: &KeyMeta, persistent: bool) -> Result<KeyRecord> {
        let generation = meta.pin_generation;
        let public_point = key.public_point().ok_or_else(|| {
            BackendError::Crypto(format!("{} is not a P-256 signing key", key.name))
        })?;
        Ok(KeyRecord {
            name: key.name.clone(),
            id: meta.id_bytes()?,
            label: meta.label.clone(),
            public_point,
            purpose: meta.purpose,
            persistent,
            signer: Arc::new(TpmSigner {
                device: Arc::clone(&self.device),
                key: Mutex::new((generation, Arc::new(key))),
                dir: Arc::clone(&self.dir),
                pin: self.pin.clone(),
            }),
        })
    }

    fn load_key(&self, name: &str) -> Result<KeyRecord> {
        let current = pin::current_generation(&self.dir)?;
        let (meta, blob) = pin::resolve_blob(&self.dir, name, current)?;
        let key =
            TpmKey::from_blob(name, &blob).map_err(|e| BackendError::Io(format!("{name}: {e}")))?;
        check_purpose(&self.dir.path().join(name), &key, &meta)?;
        self.record(key, &meta, true)
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
        let mut keys = Vec::new();
        for name in self.dir.names("key")? {
            match self.load_key(&name) {
                Ok(record) => keys.push(record),
                // A key removed meanwhile by another process, or refused (logged once).
                Err(BackendError::NotFound(_) | BackendError::Refused(_)) => {}
                Err(e) => log::warn!("tpm: skipping key {name}: {e}"),
            }
        }
        Ok(keys)
    }

    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord> {
        let name = if request.persistent {
            random_name("key")?
        } else {
            random_name("ses")?
        };
        // A PIN slot's key gets the PIN's authValue, under the directory's lock so that no
        // PIN change runs meanwhile.
        let _lock = match &self.pin {
            Some(_) if request.persistent => Some(self.dir.lock()?),
            _ => None,
        };
        let (generation, auth) = match &self.pin {
            Some(pin) => pin.for_new_key()?,
            None => (0, None),
        };
        let key = self
            .device
            .create(&name, request.purpose, auth.as_ref().map(|a| &a[..]))?;
        let mut meta = KeyMeta::new(&request.id, &request.label, request.purpose);
        meta.pin_generation = generation;
        if request.persistent {
            let mut blob = key.to_blob().map_err(BackendError::Crypto)?;
            blob.empty_auth = generation == 0;
            self.dir.write_key(&name, &blob.to_pem(), &meta)?;
        }
        log::info!("tpm: created key {name}");
        self.record(key, &meta, request.persistent)
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        if name.starts_with(SESSION_PREFIX) {
            return Ok(());
        }
        let (mut meta, _) = self.dir.read_key(name)?;
        meta.label = label.to_string();
        meta.id = crate::encoding::hex(id);
        self.dir.write_meta(name, &meta)
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        if !name.starts_with(SESSION_PREFIX) {
            self.dir.remove_key(name)?;
        }
        self.device.forget(name);
        Ok(())
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        let mut objects = Vec::new();
        for name in self.dir.names("obj")? {
            match self.dir.read_object(&name) {
                Ok(attributes) => objects.push(ObjectRecord { name, attributes }),
                Err(BackendError::NotFound(_)) => {}
                Err(e) => log::warn!("tpm: skipping object {name}: {e}"),
            }
        }
        Ok(objects)
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let name = random_name("obj")?;
        self.dir.write_object(&name, attributes)?;
        Ok(name)
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        self.dir.read_object(name)?;
        self.dir.write_object(name, attributes)
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        self.dir.remove_object(name)
    }

    fn change_marker(&self) -> Option<u128> {
        self.dir.change_marker()
    }

    fn pin(&self) -> Option<&dyn PinGuard> {
        self.pin.as_deref().map(|p| p as &dyn PinGuard)
    }
}
