//! The device-key operations as a PKCS#11 client (through `cryptoki`), against our own module by
//! default or against any module named in `[server]`.
//!
//! Each token is one candidate store. On our module the token's `model` names its protection class;
//! on a foreign module the operator declares the class in the config and may name a PIN. A key made
//! by `create` is a P-256 key pair labelled with the key id, whose CKA_ID is the id's 32 random
//! bytes; its `(accountUserId, clientId)` binding is a token data object
//! (`CKA_APPLICATION = "devicekey-binding"`, `CKA_LABEL` = key id, `CKA_VALUE` = JSON).
//!
//! `public` and `sign` run on sessions kept open between requests (a pool per token) and look
//! every object up on the token each time, so a key deleted anywhere is gone at once. What a
//! lookup read (the binding's value, the public key) is cached by key id together with the
//! object's handle, and used only while the same lookup finds the same handle. A handle or a
//! reused session that went stale (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`,
//! `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`) forgets the cache and pooled sessions and
//! the request is tried once more from scratch.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p256::pkcs8::EncodePublicKey;
use sha2::{Digest, Sha256};

use super::error::{describe_cryptoki_error, DeviceKeyError};
use super::server::KeyService;
use super::types::{
    Algorithm, Binding, CreateParams, KeyInfo, KeyListing, ProtectionPolicy, PublicParams,
    SignParams, SignResult,
};
use crate::backend::{KeyPurpose, ProtectionClass};
use crate::config::{Config, ServerConfig};
use crate::proof::{self, ProofPolicy};

/// `CKA_APPLICATION` of binding data objects.
pub const BINDING_APPLICATION: &str = "devicekey-binding";

/// DER of the prime256v1 OID, the CKA_EC_PARAMS of every key.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Open sessions kept per token between requests, at most.
const MAX_POOLED_SESSIONS: usize = 16;

/// Key ids whose lookups are remembered, at most (the cache starts over past it).
const MAX_CACHED_KEYS: usize = 4096;

/// The installed path of our module.
pub const INSTALLED_MODULE: &str = "/usr/local/lib/devicekey/libdevicekey_pkcs11.so";

type Result<T> = std::result::Result<T, DeviceKeyError>;

/// One PKCS#11 module to use, with what the config says about it.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    /// The module's path.
    pub path: PathBuf,
    /// Only this token (by label); any when `None`.
    pub token: Option<String>,
    /// The class a foreign module declares for its tokens.
    pub declared_class: Option<ProtectionClass>,
    /// Where the PIN is: an environment variable.
    pub pin_env: Option<String>,
    /// Where the PIN is: a file.
    pub pin_file: Option<PathBuf>,
}

/// The modules the `[server]` config names, the main one first.
pub fn module_specs(config: &ServerConfig) -> Result<Vec<ModuleSpec>> {
    let parse_class = |s: &Option<String>| -> Result<Option<ProtectionClass>> {
        match s {
            None => Ok(None),
            Some(s) => ProtectionClass::parse(s).map(Some).ok_or_else(|| {
                DeviceKeyError::Platform(format!(
                    "config: unknown protection_class {s:?} (use hardware_tpm, hardware_secure_enclave or os_protected_nonextractable)"
                ))
            }),
        }
    };
    let mut specs = vec![ModuleSpec {
        path: config.module.clone().unwrap_or_else(default_module_path),
        token: None,
        declared_class: parse_class(&config.protection_class)?,
        pin_env: config.pin_env.clone(),
        pin_file: config.pin_file.clone(),
    }];
    for m in &config.modules {
        specs.push(ModuleSpec {
            path: m.module.clone(),
            token: m.token.clone(),
            declared_class: parse_class(&Some(m.protection_class.clone()))?,
            pin_env: m.pin_env.clone(),
            pin_file: m.pin_file.clone(),
        });
    }
    Ok(specs)
}

/// Our own module: next to the running binary (a build tree), else the installed path.
pub fn default_module_path() -> PathBuf {
    let name = if cfg!(target_os = "macos") {
        "libdevicekey_pkcs11.dylib"
    } else {
        "libdevicekey_pkcs11.so"
    };
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for candidate in [dir.join(name), dir.join("..").join(name)] {
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
    }
    PathBuf::from(INSTALLED_MODULE)
}

/// A token that may hold device keys.
#[derive(Clone, Debug)]
struct TokenSlot {
    module: usize,
    slot: Slot,
    label: String,
    class: ProtectionClass,
    ours: bool,
    ecdsa_sha256: bool,
}

struct LoadedModule {
    path: PathBuf,
    ctx: Pkcs11,
    /// Sessions kept open so that a login lasts (PKCS#11 logs out when the last one closes).
    _anchors: Mutex<Vec<Session>>,
}

struct Inventory {
    modules: Vec<LoadedModule>,
    slots: Vec<TokenSlot>,
    /// Idle open sessions, per slot (same index as `slots`).
    sessions: Vec<Mutex<Vec<Session>>>,
    cache: Mutex<KeyCache>,
}

/// A binding as read from a token: which slot, which object, its value.
#[derive(Clone)]
struct CachedBinding {
    slot: usize,
    object: ObjectHandle,
    binding: Binding,
}

/// A public key as read from a token.
#[derive(Clone)]
struct CachedPublic {
    slot: usize,
    object: ObjectHandle,
    info: KeyInfo,
}

/// What lookups read, by key id; valid only while a fresh lookup finds the same object.
#[derive(Default)]
struct KeyCache {
    bindings: HashMap<String, CachedBinding>,
    publics: HashMap<String, CachedPublic>,
}

impl Inventory {
    fn cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_binding(&self, key_id: &str) -> Option<CachedBinding> {
        self.cache().bindings.get(key_id).cloned()
    }

    fn remember_binding(&self, key_id: &str, entry: CachedBinding) {
        let mut cache = self.cache();
        if cache.bindings.len() >= MAX_CACHED_KEYS {
            cache.bindings.clear();
        }
        cache.bindings.insert(key_id.to_string(), entry);
    }

    fn cached_public(&self, key_id: &str) -> Option<CachedPublic> {
        self.cache().publics.get(key_id).cloned()
    }

    fn remember_public(&self, key_id: &str, entry: CachedPublic) {
        let mut cache = self.cache();
        if cache.publics.len() >= MAX_CACHED_KEYS {
            cache.publics.clear();
        }
        cache.publics.insert(key_id.to_string(), entry);
    }

    fn forget(&self, key_id: &str) {
        let mut cache = self.cache();
        cache.bindings.remove(key_id);
        cache.publics.remove(key_id);
    }

    /// Closes every idle pooled session (after one was found dead).
    fn drop_pooled_sessions(&self) {
        for pool in &self.sessions {
            let idle = std::mem::take(&mut *pool.lock().unwrap_or_else(|e| e.into_inner()));
            drop(idle);
        }
    }

    /// An open session on slot `index`: an idle pooled one, else a new one.
    fn session(&self, index: usize) -> std::result::Result<PooledSession<'_>, Failure> {
        let slot = &self.slots[index];
        let pool = &self.sessions[index];
        let idle = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let session = match idle {
            Some(s) => s,
            None => self.modules[slot.module]
                .ctx
                .open_rw_session(slot.slot)
                .map_err(|e| {
                    Failure::Fatal(platform(
                        &format!("token {:?} C_OpenSession", slot.label),
                        e,
                    ))
                })?,
        };
        Ok(PooledSession {
            pool,
            session: Some(session),
            failed: Cell::new(false),
        })
    }
}

/// Why an attempt at `public` or `sign` failed.
enum Failure {
    /// A handle or a session went stale: forget what is cached and try once more.
    Stale(DeviceKeyError),
    /// The answer.
    Fatal(DeviceKeyError),
}

impl From<DeviceKeyError> for Failure {
    fn from(e: DeviceKeyError) -> Self {
        Self::Fatal(e)
    }
}

impl Failure {
    fn into_error(self) -> DeviceKeyError {
        match self {
            Self::Stale(e) | Self::Fatal(e) => e,
        }
    }
}

/// A session taken from a slot's pool; back to the pool when dropped, unless a call on it
/// failed (then it is closed, so no half-done operation is ever inherited).
struct PooledSession<'a> {
    pool: &'a Mutex<Vec<Session>>,
    session: Option<Session>,
    failed: Cell<bool>,
}

impl PooledSession<'_> {
    fn get(&self) -> std::result::Result<&Session, Failure> {
        self.session
            .as_ref()
            .ok_or_else(|| Failure::Fatal(DeviceKeyError::Platform("no session".into())))
    }

    /// Maps a cryptoki result, marking the session failed on error.
    fn check<T>(
        &self,
        context: &str,
        r: std::result::Result<T, CkError>,
    ) -> std::result::Result<T, Failure> {
        r.map_err(|e| {
            self.failed.set(true);
            let stale = matches!(
                e,
                CkError::Pkcs11(
                    RvError::ObjectHandleInvalid
                        | RvError::KeyHandleInvalid
                        | RvError::SessionHandleInvalid
                        | RvError::SessionClosed,
                    _
                )
            );
            let e = platform(context, e);
            if stale {
                Failure::Stale(e)
            } else {
                Failure::Fatal(e)
            }
        })
    }

    /// The first object matching `template`.
    fn find_first(
        &self,
        template: &[Attribute],
    ) -> std::result::Result<Option<ObjectHandle>, Failure> {
        let session = self.get()?;
        let found = session
            .iter_objects(template)
            .and_then(|mut objects| objects.next().transpose());
        self.check("C_FindObjects", found)
    }

    /// An object's single attribute as bytes, if present.
    fn attribute(
        &self,
        object: ObjectHandle,
        kind: AttributeType,
    ) -> std::result::Result<Option<Vec<u8>>, Failure> {
        let session = self.get()?;
        let attrs = self.check(
            "C_GetAttributeValue",
            session.get_attributes(object, &[kind]),
        )?;
        Ok(attribute_value(attrs))
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if self.failed.get() {
            return;
        }
        let Ok(mut pool) = self.pool.lock() else {
            return;
        };
        if pool.len() < MAX_POOLED_SESSIONS {
            pool.push(session);
        }
    }
}

/// The device-key operations over PKCS#11; implements [`KeyService`] for the server.
pub struct TokenClient {
    specs: Vec<ModuleSpec>,
    policy: ProofPolicy,
    inventory: Mutex<Option<Arc<Inventory>>>,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            .field("specs", &self.specs)
            .finish_non_exhaustive()
    }
}

fn rank(class: ProtectionClass) -> u8 {
    match class {
        ProtectionClass::HardwareSecureEnclave => 0,
        ProtectionClass::HardwareTpm => 1,
        ProtectionClass::OsProtectedNonextractable => 2,
    }
}

fn read_pin(spec: &ModuleSpec) -> Result<Option<AuthPin>> {
    if let Some(var) = &spec.pin_env {
        return match std::env::var(var) {
            Ok(pin) => Ok(Some(AuthPin::from(pin))),
            Err(_) => Err(DeviceKeyError::Platform(format!(
                "the PIN variable {var} named by the config is not set"
            ))),
        };
    }
    if let Some(file) = &spec.pin_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            DeviceKeyError::Platform(format!("cannot read the PIN file {}: {e}", file.display()))
        })?;
        let pin = text.trim_end_matches(['\r', '\n']).to_string();
        return Ok(Some(AuthPin::from(pin)));
    }
    Ok(None)
}

fn platform(context: &str, e: CkError) -> DeviceKeyError {
    DeviceKeyError::Platform(format!("{context}: {}", describe_cryptoki_error(&e)))
}

fn load_module(index: usize, spec: &ModuleSpec) -> Result<(LoadedModule, Vec<TokenSlot>)> {
    let path = &spec.path;
    if !path.exists() {
        return Err(DeviceKeyError::Platform(format!(
            "PKCS#11 module {} not found; build it or set [server].module in the config",
            path.display()
        )));
    }
    let ctx =
        Pkcs11::new(path).map_err(|e| platform(&format!("cannot load {}", path.display()), e))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(platform(&format!("{} C_Initialize", path.display()), e)),
    }
    let pin = read_pin(spec)?;
    let mut slots = Vec::new();
    let mut anchors = Vec::new();
    let all = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| platform("C_GetSlotList", e))?;
    for slot in all {
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(e) => {
                log::warn!("{}: token info of slot {slot}: {e}", path.display());
                continue;
            }
        };
        let label = info.label().trim_end().to_string();
        if spec.token.as_deref().is_some_and(|t| t != label) {
            continue;
        }
        let ours = info.manufacturer_id().trim_end() == crate::vendor::DEVICEKEY_MANUFACTURER
            && ProtectionClass::from_token_model(info.model()).is_some();
        let class = if ours {
            ProtectionClass::from_token_model(info.model())
        } else {
            spec.declared_class
        };
        let Some(class) = class else {
            log::warn!(
                "{}: token {label:?} is not a devicekey token and the config declares no protection_class for it; skipped",
                path.display()
            );
            continue;
        };
        let mechanisms = ctx.get_mechanism_list(slot).unwrap_or_default();
        if !mechanisms.contains(&MechanismType::ECC_KEY_PAIR_GEN)
            || !(mechanisms.contains(&MechanismType::ECDSA)
                || mechanisms.contains(&MechanismType::ECDSA_SHA256))
        {
            log::warn!(
                "{}: token {label:?} cannot make or use P-256 keys; skipped",
                path.display()
            );
            continue;
        }
        if info.login_required() || pin.is_some() {
            let session = ctx
                .open_rw_session(slot)
                .map_err(|e| platform(&format!("token {label:?} C_OpenSession"), e))?;
            match (&pin, info.login_required()) {
                (Some(pin), _) => match session.login(UserType::User, Some(pin)) {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                    Err(e) => return Err(platform(&format!("token {label:?} C_Login"), e)),
                },
                (None, true) => {
                    return Err(DeviceKeyError::Platform(format!(
                        "token {label:?} needs a login; set pin_env or pin_file in [server]"
                    )))
                }
                (None, false) => {}
            }
            anchors.push(session);
        }
        slots.push(TokenSlot {
            module: index,
            slot,
            label,
            class,
            ours,
            ecdsa_sha256: mechanisms.contains(&MechanismType::ECDSA_SHA256),
        });
    }
    Ok((
        LoadedModule {
            path: path.clone(),
            ctx,
            _anchors: Mutex::new(anchors),
        },
        slots,
    ))
}

/// Reads an object's single attribute as bytes, if present.
fn attribute_bytes(
    session: &Session,
    object: ObjectHandle,
    kind: AttributeType,
) -> Result<Option<Vec<u8>>> {
    let attrs = session
        .get_attributes(object, &[kind])
        .map_err(|e| platform("C_GetAttributeValue", e))?;
    Ok(attribute_value(attrs))
}

fn attribute_value(attrs: Vec<Attribute>) -> Option<Vec<u8>> {
    attrs.into_iter().find_map(|a| match a {
        Attribute::Label(v) | Attribute::Value(v) | Attribute::EcPoint(v) | Attribute::Id(v) => {
            Some(v)
        }
        _ => None,
    })
}

/// SubjectPublicKeyInfo DER from a CKA_EC_POINT (DER OCTET STRING, or raw SEC1 from lax modules).
pub fn spki_from_ec_point(ec_point: &[u8]) -> Result<Vec<u8>> {
    use der::Decode;
    let sec1 = if ec_point.len() == 65 && ec_point[0] == 0x04 {
        ec_point.to_vec()
    } else {
        der::asn1::OctetString::from_der(ec_point)
            .map_err(|e| DeviceKeyError::Crypto(format!("CKA_EC_POINT is not DER: {e}")))?
            .into_bytes()
    };
    let key = p256::PublicKey::from_sec1_bytes(&sec1)
        .map_err(|e| DeviceKeyError::Crypto(format!("CKA_EC_POINT is not a P-256 point: {e}")))?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| DeviceKeyError::Crypto(format!("cannot encode the public key: {e}")))
}

/// DER `SEQUENCE { r, s }` from a raw 64-byte `r‖s`.
pub fn der_signature(raw: &[u8]) -> Result<Vec<u8>> {
    let sig = p256::ecdsa::Signature::from_slice(raw).map_err(|e| {
        DeviceKeyError::Crypto(format!(
            "the token returned an invalid signature ({} bytes): {e}",
            raw.len()
        ))
    })?;
    Ok(sig.to_der().as_bytes().to_vec())
}

impl TokenClient {
    /// A client for the modules the `[server]` config names (loaded on first use).
    pub fn new(config: &ServerConfig) -> Result<Self> {
        Ok(Self {
            specs: module_specs(config)?,
            policy: ProofPolicy::from_config(config),
            inventory: Mutex::new(None),
        })
    }

    /// A client from the config found as the module finds it.
    pub fn from_env() -> Result<Self> {
        let config = Config::load().map_err(|e| DeviceKeyError::Platform(e.to_string()))?;
        Self::new(&config.server)
    }

    fn inventory(&self) -> Result<Arc<Inventory>> {
        let mut guard = self
            .inventory
            .lock()
            .map_err(|_| DeviceKeyError::Platform("internal lock poisoned".into()))?;
        if let Some(inv) = guard.as_ref() {
            return Ok(Arc::clone(inv));
        }
        let mut modules = Vec::new();
        let mut slots = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        for spec in &self.specs {
            let canonical = std::fs::canonicalize(&spec.path).unwrap_or(spec.path.clone());
            if seen.contains(&canonical) {
                log::warn!("module {} named twice; using it once", spec.path.display());
                continue;
            }
            seen.push(canonical);
            let (module, found) = load_module(modules.len(), spec)?;
            log::info!(
                "module {}: {} usable token(s)",
                module.path.display(),
                found.len()
            );
            modules.push(module);
            slots.extend(found);
        }
        // Hardware first; within a class, config order.
        slots.sort_by_key(|s| rank(s.class));
        let sessions = slots.iter().map(|_| Mutex::new(Vec::new())).collect();
        let inv = Arc::new(Inventory {
            modules,
            slots,
            sessions,
            cache: Mutex::new(KeyCache::default()),
        });
        *guard = Some(Arc::clone(&inv));
        Ok(inv)
    }

    fn open(&self, inv: &Inventory, slot: &TokenSlot) -> Result<Session> {
        inv.modules[slot.module]
            .ctx
            .open_rw_session(slot.slot)
            .map_err(|e| platform(&format!("token {:?} C_OpenSession", slot.label), e))
    }

    /// Creates a key; `binding` is `None` only for general-purpose keys.
    pub fn create_key(
        &self,
        policy: ProtectionPolicy,
        binding: Option<&Binding>,
        purpose: KeyPurpose,
        label: Option<&str>,
    ) -> Result<KeyInfo> {
        if let Some(b) = binding {
            proof::validate_binding_fields(&b.account_user_id, &b.client_id)?;
        }
        let inv = self.inventory()?;
        let candidates: Vec<&TokenSlot> = inv
            .slots
            .iter()
            .filter(|s| policy.allows(s.class))
            .collect();
        if candidates.is_empty() {
            return Err(match inv.slots.first() {
                Some(s) => DeviceKeyError::DegradedNotAllowed(s.class),
                None => DeviceKeyError::HardwareUnavailable,
            });
        }
        let mut first_error = None;
        for slot in candidates {
            match self.create_in(&inv, slot, binding, purpose, label) {
                Ok(info) => return Ok(info),
                Err(e) => {
                    log::warn!("creating a key in token {:?} failed: {e}", slot.label);
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(DeviceKeyError::HardwareUnavailable))
    }

    fn create_in(
        &self,
        inv: &Inventory,
        slot: &TokenSlot,
        binding: Option<&Binding>,
        purpose: KeyPurpose,
        label: Option<&str>,
    ) -> Result<KeyInfo> {
        let random = proof::random_key_id_bytes()?;
        let key_id = proof::key_id_for(slot.class, &random);
        let label = label.unwrap_or(&key_id).to_string();
        let session = self.open(inv, slot)?;
        let public_template = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(random.to_vec()),
        ];
        let mut private_template = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(random.to_vec()),
        ];
        if slot.ours {
            let value = cryptoki_sys::CK_ULONG::from(purpose.vendor_value()).to_ne_bytes();
            private_template.push(Attribute::VendorDefined((
                AttributeType::VendorDefined(crate::vendor::CKA_DEVICEKEY_PURPOSE),
                value.to_vec(),
            )));
        }
        let (public, private) = session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(|e| platform(&format!("token {:?} key generation", slot.label), e))?;
        let mut created = vec![private, public];
        let finish = (|| -> Result<KeyInfo> {
            if let Some(b) = binding {
                let value = proof::to_canonical_vec(b)?;
                let data = session
                    .create_object(&[
                        Attribute::Class(ObjectClass::DATA),
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Label(key_id.as_bytes().to_vec()),
                        Attribute::Application(BINDING_APPLICATION.as_bytes().to_vec()),
                        Attribute::Value(value),
                    ])
                    .map_err(|e| platform("storing the key binding", e))?;
                created.push(data);
            }
            let point =
                attribute_bytes(&session, public, AttributeType::EcPoint)?.ok_or_else(|| {
                    DeviceKeyError::Crypto("the public key has no CKA_EC_POINT".into())
                })?;
            Ok(KeyInfo {
                key_id: key_id.clone(),
                public_key_spki_der_base64: STANDARD.encode(spki_from_ec_point(&point)?),
                algorithm: Algorithm::EcdsaP256Sha256,
                protection_class: slot.class,
            })
        })();
        match finish {
            Ok(info) => Ok(info),
            Err(e) => {
                for object in created {
                    if let Err(de) = session.destroy_object(object) {
                        log::error!("cannot remove a half-created key object: {de}");
                        return Err(DeviceKeyError::Platform(format!(
                            "{e}; and removing the new key failed: {}",
                            describe_cryptoki_error(&de)
                        )));
                    }
                }
                Err(e)
            }
        }
    }

    /// Tokens whose class the key id names.
    fn slots_for(inv: &Inventory, class: ProtectionClass) -> Vec<&TokenSlot> {
        inv.slots.iter().filter(|s| s.class == class).collect()
    }

    fn find_one(session: &Session, template: &[Attribute]) -> Result<Option<ObjectHandle>> {
        let found = session
            .find_objects(template)
            .map_err(|e| platform("C_FindObjects", e))?;
        Ok(found.into_iter().next())
    }

    fn key_template(class: ObjectClass, key_id: &str, random: &[u8]) -> Vec<Attribute> {
        vec![
            Attribute::Class(class),
            Attribute::Label(key_id.as_bytes().to_vec()),
            Attribute::Id(random.to_vec()),
        ]
    }

    fn binding_template(key_id: &str) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(BINDING_APPLICATION.as_bytes().to_vec()),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ]
    }

    fn read_binding(session: &Session, key_id: &str) -> Result<Option<Binding>> {
        let Some(object) = Self::find_one(session, &Self::binding_template(key_id))? else {
            return Ok(None);
        };
        let Some(value) = attribute_bytes(session, object, AttributeType::Value)? else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| DeviceKeyError::Platform(format!("stored binding is unreadable: {e}")))
    }

    /// Runs `attempt` with the cache, and once more without it when a handle or a reused
    /// session went stale.
    fn with_retry<T>(
        inv: &Inventory,
        key_id: &str,
        attempt: impl Fn(bool) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        match attempt(true) {
            Ok(v) => Ok(v),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Stale(e)) => {
                log::debug!("{e}; looking key {key_id} up again");
                inv.forget(key_id);
                inv.drop_pooled_sessions();
                attempt(false).map_err(Failure::into_error)
            }
        }
    }

    /// `device/key/public`.
    pub fn public_key(&self, key_id: &str) -> Result<KeyInfo> {
        let id = proof::parse_key_id(key_id)?;
        let inv = self.inventory()?;
        Self::with_retry(&inv, key_id, |use_cache| {
            Self::public_attempt(&inv, key_id, &id, use_cache)
        })
    }

    fn public_attempt(
        inv: &Inventory,
        key_id: &str,
        id: &proof::KeyId,
        use_cache: bool,
    ) -> std::result::Result<KeyInfo, Failure> {
        let cached = if use_cache {
            inv.cached_public(key_id)
        } else {
            None
        };
        let template = Self::key_template(ObjectClass::PUBLIC_KEY, key_id, &id.random);
        for (index, slot) in inv.slots.iter().enumerate() {
            if slot.class != id.class {
                continue;
            }
            let session = inv.session(index)?;
            let Some(public) = session.find_first(&template)? else {
                continue;
            };
            if slot.ours {
                let private_template =
                    Self::key_template(ObjectClass::PRIVATE_KEY, key_id, &id.random);
                let Some(private) = session.find_first(&private_template)? else {
                    return Err(DeviceKeyError::KeyNotFound.into());
                };
                Self::require_proof_purpose(&session, private)?;
            }
            if let Some(c) = cached
                .as_ref()
                .filter(|c| c.slot == index && c.object == public)
            {
                return Ok(c.info.clone());
            }
            let point = session
                .attribute(public, AttributeType::EcPoint)?
                .ok_or_else(|| {
                    DeviceKeyError::Crypto("the public key has no CKA_EC_POINT".into())
                })?;
            let info = KeyInfo {
                key_id: key_id.to_string(),
                public_key_spki_der_base64: STANDARD.encode(spki_from_ec_point(&point)?),
                algorithm: Algorithm::EcdsaP256Sha256,
                protection_class: slot.class,
            };
            inv.remember_public(
                key_id,
                CachedPublic {
                    slot: index,
                    object: public,
                    info: info.clone(),
                },
            );
            return Ok(info);
        }
        Err(DeviceKeyError::KeyNotFound.into())
    }

    /// On our module, a device key is a proof-only key: refuses a private key whose
    /// `CKA_DEVICEKEY_PURPOSE` is not proof (a general key labelled like a device key).
    fn require_proof_purpose(
        session: &PooledSession<'_>,
        private: ObjectHandle,
    ) -> std::result::Result<(), Failure> {
        let kind = AttributeType::VendorDefined(crate::vendor::CKA_DEVICEKEY_PURPOSE);
        let attrs = session.check(
            "C_GetAttributeValue",
            session.get()?.get_attributes(private, &[kind]),
        )?;
        let purpose = attrs.into_iter().find_map(|a| match a {
            Attribute::VendorDefined((_, v)) => v
                .as_slice()
                .try_into()
                .ok()
                .map(cryptoki_sys::CK_ULONG::from_ne_bytes),
            _ => None,
        });
        // CK_ULONG is 32 bits on some targets.
        #[allow(clippy::useless_conversion)]
        if purpose.map(u64::from) == Some(crate::vendor::DEVICEKEY_PURPOSE_PROOF) {
            return Ok(());
        }
        Err(DeviceKeyError::InvalidRequest(
            "key is not a proof-only device key (its CKA_DEVICEKEY_PURPOSE is not proof); device/key/sign and device/key/public use only keys made by device/key/create".into(),
        )
        .into())
    }

    /// `device/key/sign`, checking in the protocol's order.
    pub fn sign_payload(&self, params: &SignParams) -> Result<SignResult> {
        let id = proof::parse_key_id(&params.key_id)?;
        proof::validate_payload(&params.payload, &self.policy, proof::unix_now()?)?;
        let inv = self.inventory()?;
        Self::with_retry(&inv, &params.key_id, |use_cache| {
            Self::sign_attempt(&inv, params, &id, use_cache)
        })
    }

    fn sign_attempt(
        inv: &Inventory,
        params: &SignParams,
        id: &proof::KeyId,
        use_cache: bool,
    ) -> std::result::Result<SignResult, Failure> {
        let key_id = params.key_id.as_str();
        let (account, client) = params.payload.binding();
        let cached = if use_cache {
            inv.cached_binding(key_id)
        } else {
            None
        };
        let binding_template = Self::binding_template(key_id);
        for (index, slot) in inv.slots.iter().enumerate() {
            if slot.class != id.class {
                continue;
            }
            let session = inv.session(index)?;
            let Some(object) = session.find_first(&binding_template)? else {
                continue;
            };
            let binding = match cached
                .as_ref()
                .filter(|c| c.slot == index && c.object == object)
            {
                Some(c) => c.binding.clone(),
                None => {
                    let Some(value) = session.attribute(object, AttributeType::Value)? else {
                        continue;
                    };
                    let binding: Binding = serde_json::from_slice(&value).map_err(|e| {
                        DeviceKeyError::Platform(format!("stored binding is unreadable: {e}"))
                    })?;
                    inv.remember_binding(
                        key_id,
                        CachedBinding {
                            slot: index,
                            object,
                            binding: binding.clone(),
                        },
                    );
                    binding
                }
            };
            if binding.account_user_id != account || binding.client_id != client {
                return Err(DeviceKeyError::InvalidPayload(
                    "payload accountUserId/clientId does not match device key binding".into(),
                )
                .into());
            }
            let template = Self::key_template(ObjectClass::PRIVATE_KEY, key_id, &id.random);
            let Some(private) = session.find_first(&template)? else {
                return Err(DeviceKeyError::KeyNotFound.into());
            };
            if slot.ours {
                Self::require_proof_purpose(&session, private)?;
            }
            let bytes = proof::signing_bytes(&params.payload).map_err(DeviceKeyError::from)?;
            let signed = if slot.ecdsa_sha256 {
                session
                    .get()?
                    .sign(&Mechanism::EcdsaSha256, private, &bytes)
            } else {
                session
                    .get()?
                    .sign(&Mechanism::Ecdsa, private, &Sha256::digest(&bytes))
            };
            let raw = session.check(&format!("token {:?} signing", slot.label), signed)?;
            return Ok(SignResult {
                signature_der_base64: STANDARD.encode(der_signature(&raw)?),
                signed_payload_base64: STANDARD.encode(&bytes),
                algorithm: Algorithm::EcdsaP256Sha256,
            });
        }
        Err(DeviceKeyError::KeyNotFound.into())
    }

    /// Every key on every usable token, with its binding when it has one.
    pub fn list(&self) -> Result<Vec<KeyListing>> {
        let inv = self.inventory()?;
        let mut out = Vec::new();
        for slot in &inv.slots {
            let session = self.open(&inv, slot)?;
            let keys = session
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .map_err(|e| platform("C_FindObjects", e))?;
            for key in keys {
                let label = attribute_bytes(&session, key, AttributeType::Label)?
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                let binding = if proof::parse_key_id(&label).is_ok() {
                    Self::read_binding(&session, &label)?
                } else {
                    None
                };
                out.push(KeyListing {
                    key_id: label,
                    protection_class: slot.class,
                    token: slot.label.clone(),
                    binding,
                });
            }
        }
        Ok(out)
    }

    /// Deletes a key made by `create` (both halves and its binding).
    pub fn delete(&self, key_id: &str) -> Result<()> {
        let id = proof::parse_key_id(key_id)?;
        let inv = self.inventory()?;
        inv.forget(key_id);
        let mut found = false;
        for slot in Self::slots_for(&inv, id.class) {
            let session = self.open(&inv, slot)?;
            let mut objects = Vec::new();
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                objects.extend(
                    session
                        .find_objects(&Self::key_template(class, key_id, &id.random))
                        .map_err(|e| platform("C_FindObjects", e))?,
                );
            }
            objects.extend(
                session
                    .find_objects(&Self::binding_template(key_id))
                    .map_err(|e| platform("C_FindObjects", e))?,
            );
            for object in objects {
                found = true;
                session
                    .destroy_object(object)
                    .map_err(|e| platform("C_DestroyObject", e))?;
            }
        }
        if found {
            Ok(())
        } else {
            Err(DeviceKeyError::KeyNotFound)
        }
    }

    /// The module paths in use (for messages).
    pub fn module_paths(&self) -> Vec<&Path> {
        self.specs.iter().map(|s| s.path.as_path()).collect()
    }
}

impl KeyService for TokenClient {
    fn create(&self, params: CreateParams) -> Result<KeyInfo> {
        let binding = Binding {
            account_user_id: params.account_user_id,
            client_id: params.client_id,
        };
        self.create_key(
            params.protection_policy.unwrap_or_default(),
            Some(&binding),
            KeyPurpose::Proof,
            None,
        )
    }

    fn public(&self, params: PublicParams) -> Result<KeyInfo> {
        self.public_key(&params.key_id)
    }

    fn sign(&self, params: SignParams) -> Result<SignResult> {
        self.sign_payload(&params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_and_der_helpers() {
        use p256::ecdsa::signature::Signer;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let point = sk.verifying_key().to_encoded_point(false);
        let mut der_point = vec![0x04, 0x41];
        der_point.extend_from_slice(point.as_bytes());
        let spki = spki_from_ec_point(&der_point).unwrap();
        assert_eq!(spki.len(), 91);
        assert!(STANDARD
            .encode(&spki)
            .starts_with("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE"));
        assert_eq!(spki_from_ec_point(point.as_bytes()).unwrap(), spki);
        assert!(spki_from_ec_point(&[1, 2, 3]).is_err());
        let sig: p256::ecdsa::Signature = sk.sign(b"hello");
        let der = der_signature(&sig.to_bytes()).unwrap();
        assert_eq!(der, sig.to_der().as_bytes());
        assert!(der_signature(&[0u8; 63]).is_err());
    }

    #[test]
    fn default_policy_needs_hardware() {
        assert!(!ProtectionPolicy::default().allows(ProtectionClass::OsProtectedNonextractable));
        assert!(ProtectionPolicy::AllowOsProtectedNonextractable
            .allows(ProtectionClass::OsProtectedNonextractable));
    }
}
