//! The `pkcs11` key store: keys live in another PKCS#11 token (an HSM; SoftHSM in tests), which we
//! reach as a client through `cryptoki`.
//!
//! ```toml
//! [[slot]]
//! label = "devicekey-hsm"
//! backend = "pkcs11"
//! module = "/usr/lib/softhsm/libsofthsm2.so"
//! token = "my-hsm-token"              # the wrapped token, by label (never by slot id)
//! pin_env = "HSM_PIN"                 # or pin_file = "..."; never the PIN itself
//! protection_class = "hardware_tpm"   # required: what the operator declares the device to be
//! ```
//!
//! * The module, the token, the login and the session pool come from the PKCS#11 client layer
//!   ([`crate::p11`]): one context per module per process, fork-safe; a dropped session or token
//!   is re-established once and the call retried once; anything else fails closed ([`errors`]
//!   maps its errors to ours).
//! * Keys: P-256, generated in the wrapped token (CKA_SENSITIVE, not extractable, CKA_PRIVATE when
//!   we log in), paired by CKA_ID, named by their public point. Signing is CKM_ECDSA on the
//!   32-byte digest; the result is normalized to `r‖s` and checked against the public point.
//! * Our metadata (the purpose) is a CKO_DATA object in the wrapped token (see [`keys`] for why).
//! * Certificates and data objects go to the wrapped token as token objects.
//! * With `login = "pin"`, our token asks for a PIN of its own before any key signs (see [`pin`]).

mod encoding;
mod errors;
mod keys;
mod objects;
mod pin;
mod pool;
mod settings;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::verify::PointVerifier;
use cryptoki::mechanism::{Mechanism, MechanismType};

pub use crate::p11::ModuleClient;

/// The process-wide client of the wrapped module at `path` (the one the slots use).
pub fn shared_module(path: &std::path::Path) -> Result<Arc<ModuleClient>> {
    crate::p11::registry::open(path).map_err(BackendError::from)
}
use crate::p11::{Error as P11Error, Kind};
use encoding::normalize_signature;
use pool::{lock, Inner};
use settings::Settings;

use crate::backend::{
    Backend, BackendError, Diagnosis, KeyRecord, NewKey, ObjectRecord, ProtectionClass,
    RawAttribute, Result, Signer, SlotStore, StoreInfo,
};
use crate::config::Pkcs11Slot;

/// A key store in another PKCS#11 token.
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
    info: StoreInfo,
    /// The count of our processes' changes to the wrapped token (the change marker).
    counter: Option<crate::p11::lock::ChangeCounter>,
    /// Our own PIN, with `login = "pin"`.
    pin: Option<Arc<pin::Pkcs11Pin>>,
}

crate::redact::debug_shows!(Pkcs11Backend: info);

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Pkcs11Backend {
    /// Opens the slot: loads the module (shared), finds the token by label, logs in, checks that
    /// the token can make and use P-256 keys. A failure is logged once at error level with its fix.
    ///
    /// Errors: `Unusable` (config incomplete, module missing or not loadable, token not usable),
    /// `NotFound` (no token with that label), `Auth` (PIN missing, wrong or locked),
    /// `Unreachable` (the device does not answer).
    pub fn open(config: &Pkcs11Slot) -> Result<Self> {
        let pin = pin::Pkcs11Pin::of_slot(config)?;
        let mut backend = Self::connect(config).map_err(|e| {
            log::error!("pkcs11 key store: {e}");
            BackendError::from(e)
        })?;
        backend.pin = pin;
        Ok(backend)
    }

    fn connect(config: &Pkcs11Slot) -> std::result::Result<Self, P11Error> {
        let settings = Settings::from_config(config)?;
        let inner = Arc::new(Inner::new(settings));
        let conn = inner.conn()?;
        let (_, token) = inner.find_token(&conn.client)?;
        let s = &inner.settings;
        let name = format!("slot '{}': token '{}'", s.slot_label, s.token);
        if !token.token_initialized() {
            return Err(P11Error::new(
                Kind::Unusable,
                format!("{name} is not initialized"),
                "initialize it (SoftHSM: softhsm2-util --init-token)",
            ));
        }
        if s.pin.is_none() && token.login_required() {
            return Err(P11Error::new(
                Kind::Auth,
                format!("{name} requires a login and the slot names no PIN"),
                "add `pin_env = \"VAR\"` or `pin_file = \"/path\"` to the slot",
            ));
        }
        if s.pin.is_some() && token.user_pin_locked() {
            return Err(P11Error::new(
                Kind::Auth,
                format!("{name}: the user PIN is locked"),
                "unlock it with the SO PIN (SoftHSM: softhsm2-util; an HSM: its admin tool)",
            ));
        }
        if token.user_pin_final_try() {
            log::warn!("{name}: one more wrong PIN locks the token");
        }
        let mechanisms = conn
            .client
            .context()
            .get_mechanism_list(conn.slot)
            .map_err(|e| {
                P11Error::from_ck(&e, "C_GetMechanismList").with_fix("check the device")
            })?;
        for (m, what) in [
            (MechanismType::ECC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN"),
            (MechanismType::ECDSA, "CKM_ECDSA"),
        ] {
            if !mechanisms.contains(&m) {
                return Err(P11Error::new(
                    Kind::Unusable,
                    format!("{name} does not offer {what}"),
                    "use a token that supports ECDSA on P-256",
                ));
            }
        }
        // Log in now, so that a wrong PIN shows when the slot opens.
        let logged_in: std::result::Result<(), P11Error> =
            inner.token().run("log in", &|| {}, |_| Ok(()));
        logged_in.map_err(|e| {
            let fix = match e.kind {
                Kind::Auth => format!("check the PIN in {}", inner.settings.pin_source),
                _ => "check that the device is connected and reachable".to_string(),
            };
            e.with_fix(fix)
        })?;
        let info = StoreInfo {
            label: truncate(&inner.settings.slot_label, 32),
            backend: crate::config::BackendKind::Pkcs11,
            manufacturer: truncate(token.manufacturer_id().trim_end(), 32),
            serial: truncate(token.serial_number().trim_end(), 16),
            protection_class: inner.settings.class,
        };
        drop(conn);
        let counter = crate::p11::lock::ChangeCounter::open(&s.module, &s.token);
        Ok(Self {
            inner,
            info,
            counter,
            pin: None,
        })
    }

    fn record(
        &self,
        name: String,
        id: Vec<u8>,
        label: String,
        entry: &pool::KeyEntry,
    ) -> KeyRecord {
        KeyRecord {
            name: name.clone(),
            id,
            label,
            public_point: entry.point,
            purpose: entry.purpose,
            persistent: entry.persistent,
            signer: Arc::new(Pkcs11Signer {
                inner: self.inner.clone(),
                name,
                point: entry.point,
                verified_with: AtomicU64::new(0),
                pin: self.pin.clone(),
            }),
        }
    }
}

impl Backend for Pkcs11Backend {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn load_keys(&self) -> Result<Vec<KeyRecord>> {
        let scanned = self
            .inner
            .run("list keys", |s| self.inner.refresh_keys(s))?;
        Ok(scanned
            .into_iter()
            .map(|k| self.record(k.name, k.entry.id.clone(), k.label, &k.entry))
            .collect())
    }

    fn generate_key(&self, request: &NewKey) -> Result<KeyRecord> {
        if let Some(pin) = &self.pin {
            pin.require_login()?;
        }
        // Writes to the wrapped token go one process at a time, and are counted (see p11::lock).
        let write = self.inner.token().write_lock();
        write.mark_changed();
        let entry = self
            .inner
            .run("generate a key pair", |s| self.inner.generate(s, request))?;
        let name = encoding::key_name(&entry.point);
        lock(&self.inner.keys)?.insert(name.clone(), entry.clone());
        log::info!(
            "slot '{}': generated key {name} ({:?}) in token '{}'",
            self.inner.settings.slot_label,
            request.purpose,
            self.inner.settings.token
        );
        Ok(self.record(name, request.id.clone(), request.label.clone(), &entry))
    }

    fn update_key(&self, name: &str, label: &str, id: &[u8]) -> Result<()> {
        self.inner
            .run_write("update a key", |s| self.inner.relabel(s, name, label, id))
    }

    fn destroy_key(&self, name: &str) -> Result<()> {
        self.inner
            .run_write("destroy a key", |s| self.inner.destroy(s, name))
    }

    fn load_objects(&self) -> Result<Vec<ObjectRecord>> {
        self.inner
            .run("list objects", |s| self.inner.scan_objects(s))
    }

    fn store_object(&self, attributes: &[RawAttribute]) -> Result<String> {
        let raw = objects::prepare(attributes)?;
        let template: Vec<_> = raw.iter().map(encoding::raw_to_attribute).collect();
        self.inner
            .run_write("store an object", |s| self.inner.create(s, &template))
    }

    fn update_object(&self, name: &str, attributes: &[RawAttribute]) -> Result<()> {
        self.inner.run_write("update an object", |s| {
            self.inner.update(s, name, attributes)
        })
    }

    fn destroy_object(&self, name: &str) -> Result<()> {
        self.inner
            .run_write("destroy an object", |s| self.inner.destroy_named(s, name))
    }

    /// The count of changes our processes made to the wrapped token (see p11::lock); changes
    /// made by programs that do not go through this module are not counted.
    fn change_marker(&self) -> Option<u128> {
        self.counter.as_ref().map(|c| u128::from(c.read()))
    }

    fn pin(&self) -> Option<&dyn crate::backend::pin::PinGuard> {
        self.pin
            .as_deref()
            .map(|p| p as &dyn crate::backend::pin::PinGuard)
    }
}

/// Signs with one key of the wrapped token.
struct Pkcs11Signer {
    inner: Arc<Inner>,
    name: String,
    point: [u8; 65],
    /// The private-key handle whose first signature verified (0: none yet). Each handle the key
    /// resolves to is checked once, which catches a mismatched pairing without paying a
    /// verification on every signature.
    verified_with: AtomicU64,
    /// Our own PIN, with `login = "pin"`: no signature before it was given.
    pin: Option<Arc<pin::Pkcs11Pin>>,
}

impl Signer for Pkcs11Signer {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        if let Some(pin) = &self.pin {
            pin.require_login()?;
        }
        let (raw, handle) = self.inner.run("sign", |s| {
            self.inner.with_key(s, &self.name, |private, _| {
                s.sign(&Mechanism::Ecdsa, private, digest)
                    // CK_ULONG is 32 bits on some targets.
                    .map(|sig| {
                        #[allow(clippy::unnecessary_cast)]
                        let handle = private.handle() as u64;
                        (sig, handle)
                    })
            })
        })?;
        let sig = normalize_signature(&raw)?;
        if self.verified_with.load(Ordering::Relaxed) != handle {
            // The public half was paired by CKA_ID; make sure it really is this key's.
            let ok = PointVerifier::new(&self.point).is_some_and(|v| v.verify(digest, &sig));
            if !ok {
                return Err(BackendError::Crypto(format!(
                    "key {}: the wrapped token's signature does not verify with the public key of the same CKA_ID (the pair is mismatched)",
                    self.name
                )));
            }
            self.verified_with.store(handle, Ordering::Relaxed);
        }
        Ok(sig)
    }
}

impl SlotStore for Pkcs11Slot {
    fn open(&self) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(Pkcs11Backend::open(self)?))
    }

    fn diagnose(&self) -> Diagnosis {
        diagnose(self)
    }
}

/// Opens the slot as the module would and says what is there or what is wrong, without logging
/// errors (what `devicekey doctor` prints for a pkcs11 slot).
pub fn diagnose(config: &Pkcs11Slot) -> Diagnosis {
    let declared = config
        .protection_class
        .as_deref()
        .and_then(ProtectionClass::parse);
    match Pkcs11Backend::connect(config) {
        Ok(backend) => {
            let keys = backend
                .load_keys()
                .map(|k| format!("{} key(s)", k.len()))
                .unwrap_or_else(|e| format!("keys not listed: {e}"));
            Diagnosis::reachable(
                backend.info.protection_class,
                format!(
                    "token '{}' in {} (manufacturer '{}', serial '{}'), {keys}",
                    backend.inner.settings.token,
                    backend.inner.settings.module.display(),
                    backend.info.manufacturer,
                    backend.info.serial
                ),
            )
        }
        Err(f) => Diagnosis {
            protection_class: declared,
            reachable: false,
            detail: f.problem,
            fix: f.fix,
        },
    }
}
