//! The device-key logic of `devicekey serve` over PKCS#11: which tokens are candidate stores,
//! key ids, bindings and the proof policy. Modules, tokens, logins and session pools come from
//! the client layer ([`crate::p11`]); our own module is the default, any module named in
//! `[server]` may be added.
//!
//! Each token is one candidate store. On our module the token's `model` names its protection class;
//! on a foreign module the operator declares the class in the config and may name a PIN. A key made
//! by `create` is a P-256 key pair labelled with the key id, whose CKA_ID is the id's 32 random
//! bytes; its `(accountUserId, clientId)` binding is a token data object
//! (`CKA_APPLICATION = "devicekey-binding"`, `CKA_LABEL` = key id, `CKA_VALUE` = JSON). On our
//! module `public` and `sign` also require the private key to be proof-only
//! (`CKA_DEVICEKEY_PURPOSE` = proof), so a general key labelled like a device key is refused.
//!
//! `public` and `sign` run on the token's pooled sessions and look every object up on the token
//! each time, so a key deleted anywhere is gone at once. What a lookup read (the binding's value,
//! the public key) is cached by key id together with the object's handle, and used only while the
//! same lookup finds the same handle. A session or token that went away is re-established once by
//! the pool; a call that still fails with a recoverable answer ([`crate::p11::Recovery`], e.g. a
//! stale object handle) forgets the cache and the request is tried once more from scratch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use sha2::{Digest, Sha256};

use super::error::DeviceKeyError;
use super::server::KeyService;
use super::types::{
    Algorithm, Binding, CreateParams, KeyInfo, KeyListing, ProtectionPolicy, PublicParams,
    SignParams, SignResult,
};
use crate::backend::{KeyPurpose, ProtectionClass};
use crate::config::{Config, ServerConfig};
use crate::encoding::{self, P256_EC_PARAMS};
use crate::p11::{self, ModuleClient, Pin, Recovery, Token, TokenSpec};
use crate::proof::{self, ProofPolicy};

/// `CKA_APPLICATION` of binding data objects.
pub const BINDING_APPLICATION: &str = "devicekey-binding";

/// Key ids whose lookups are remembered, at most (the cache starts over past it).
const MAX_CACHED_KEYS: usize = 4096;

type Result<T> = std::result::Result<T, DeviceKeyError>;

/// One attempt at an operation on a token: a module error (perhaps recoverable) or the answer.
type Attempt<T> = std::result::Result<T, p11::OpError<DeviceKeyError>>;

impl From<p11::Error> for DeviceKeyError {
    fn from(e: p11::Error) -> Self {
        Self::Platform(e.to_string())
    }
}

impl From<DeviceKeyError> for p11::OpError<DeviceKeyError> {
    fn from(e: DeviceKeyError) -> Self {
        Self::Fail(e)
    }
}

/// One PKCS#11 module to use, with what the config says about it.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    /// The module's path.
    pub path: PathBuf,
    /// Only this token (by label); any when `None`.
    pub token: Option<String>,
    /// The class a foreign module declares for its tokens.
    pub declared_class: Option<ProtectionClass>,
    /// Where the PIN is.
    pub pin: p11::pin::PinSource,
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
        path: config.module.clone().unwrap_or_else(p11::our_module_path),
        token: None,
        declared_class: parse_class(&config.protection_class)?,
        pin: p11::pin::PinSource {
            env: config.pin_env.clone(),
            file: config.pin_file.clone(),
        },
    }];
    for m in &config.modules {
        specs.push(ModuleSpec {
            path: m.module.clone(),
            token: m.token.clone(),
            declared_class: parse_class(&Some(m.protection_class.clone()))?,
            pin: p11::pin::PinSource {
                env: m.pin_env.clone(),
                file: m.pin_file.clone(),
            },
        });
    }
    Ok(specs)
}

/// A token that may hold device keys, with its pool of logged-in sessions.
struct TokenSlot {
    label: String,
    class: ProtectionClass,
    ours: bool,
    /// The token reports CKF_LOGIN_REQUIRED (the pool logs in with the `[server]` PIN).
    login_required: bool,
    ecdsa_sha256: bool,
    token: Token,
}

struct Inventory {
    /// The modules in use (kept loaded while the inventory lives).
    _modules: Vec<Arc<ModuleClient>>,
    slots: Vec<TokenSlot>,
    cache: Mutex<KeyCache>,
}

/// What a lookup read from a token (a binding, a public key): which slot, which object, the
/// value.
#[derive(Clone)]
struct Cached<T> {
    slot: usize,
    object: ObjectHandle,
    value: T,
}

/// What lookups read, by key id; valid only while a fresh lookup finds the same object.
#[derive(Default)]
struct KeyCache {
    bindings: HashMap<String, Cached<Binding>>,
    publics: HashMap<String, Cached<KeyInfo>>,
}

/// One slot searched for a key: its place in the inventory, and whether what the cache holds
/// may be used (not on the second attempt after a stale object handle).
struct SlotSearch<'a> {
    inv: &'a Inventory,
    index: usize,
    slot: &'a TokenSlot,
    use_cache: bool,
}

impl SlotSearch<'_> {
    /// The cached value, when the cache may be used and `entry` is for this slot's `object`.
    fn still_valid<T>(&self, entry: Option<Cached<T>>, object: ObjectHandle) -> Option<T> {
        entry
            .filter(|c| self.use_cache && c.slot == self.index && c.object == object)
            .map(|c| c.value)
    }

    /// Caches `value`, read from `object` in this slot.
    fn cached<T>(&self, object: ObjectHandle, value: T) -> Cached<T> {
        Cached {
            slot: self.index,
            object,
            value,
        }
    }
}

/// Inserts into a cache map that never grows past [`MAX_CACHED_KEYS`]: a full map is emptied
/// first.
fn insert_bounded<V>(map: &mut HashMap<String, V>, key_id: &str, entry: V) {
    if map.len() >= MAX_CACHED_KEYS {
        map.clear();
    }
    map.insert(key_id.to_string(), entry);
}

impl Inventory {
    fn cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_binding(&self, key_id: &str) -> Option<Cached<Binding>> {
        self.cache().bindings.get(key_id).cloned()
    }

    fn remember_binding(&self, key_id: &str, entry: Cached<Binding>) {
        insert_bounded(&mut self.cache().bindings, key_id, entry);
    }

    fn cached_public(&self, key_id: &str) -> Option<Cached<KeyInfo>> {
        self.cache().publics.get(key_id).cloned()
    }

    fn remember_public(&self, key_id: &str, entry: Cached<KeyInfo>) {
        insert_bounded(&mut self.cache().publics, key_id, entry);
    }

    fn forget(&self, key_id: &str) {
        let mut cache = self.cache();
        cache.bindings.remove(key_id);
        cache.publics.remove(key_id);
    }
}

/// The device-key operations over PKCS#11; implements [`KeyService`] for the server.
pub struct TokenClient {
    specs: Vec<ModuleSpec>,
    policy: ProofPolicy,
    inventory: Mutex<Option<Arc<Inventory>>>,
}

crate::redact::debug_shows!(TokenClient: specs);

fn rank(class: ProtectionClass) -> u8 {
    match class {
        ProtectionClass::HardwareSecureEnclave => 0,
        ProtectionClass::HardwareTpm => 1,
        ProtectionClass::OsProtectedNonextractable => 2,
    }
}

fn platform(context: &str, e: cryptoki::error::Error) -> DeviceKeyError {
    DeviceKeyError::Platform(format!("{context}: {}", p11::describe(&e)))
}

/// The usable tokens of one module: P-256 capable, of a known class, with a PIN when they need
/// a login.
fn load_module(spec: &ModuleSpec) -> Result<(Arc<ModuleClient>, Vec<TokenSlot>)> {
    let path = &spec.path;
    if !path.exists() {
        return Err(DeviceKeyError::Platform(format!(
            "PKCS#11 module {} not found; build it or set [server].module in the config",
            path.display()
        )));
    }
    let client = p11::registry::open(path)?;
    let pin = spec.pin.read("[server]")?;
    let mut slots = Vec::new();
    for entry in p11::token::tokens(&client)? {
        let info = &entry.info;
        let label = entry.label.clone();
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
        let mechanisms = client
            .context()
            .get_mechanism_list(entry.slot)
            .unwrap_or_default();
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
        if info.login_required() && pin.is_none() {
            return Err(DeviceKeyError::Platform(format!(
                "token {label:?} needs a login; set pin_env or pin_file in [server]"
            )));
        }
        slots.push(TokenSlot {
            token: Token::new(TokenSpec {
                who: format!("[server] token {label:?}"),
                module: path.clone(),
                token: label.clone(),
                pin: pin.as_ref().map(|p| Pin {
                    secret: p.secret.clone(),
                    source: p.source.clone(),
                }),
            }),
            label,
            class,
            ours,
            login_required: info.login_required(),
            ecdsa_sha256: mechanisms.contains(&MechanismType::ECDSA_SHA256),
        });
    }
    Ok((client, slots))
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
fn spki_from_ec_point(ec_point: &[u8]) -> Result<Vec<u8>> {
    encoding::spki_from_ec_point(ec_point)
        .map_err(|e| DeviceKeyError::Crypto(format!("CKA_EC_POINT: {e}")))
}

/// DER `SEQUENCE { r, s }` from a raw 64-byte `r‖s`.
fn der_signature(raw: &[u8]) -> Result<Vec<u8>> {
    encoding::signature_to_der(raw).map_err(|e| {
        DeviceKeyError::Crypto(format!("the token returned an invalid signature: {e}"))
    })
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

    /// A client for `devicekey serve`: as [`TokenClient::new`], then loads the modules and logs in
    /// to every token of our module that wants a login (a `login = "pin"` slot), so that a
    /// missing or wrong PIN stops the server before it answers anything. The error names where
    /// the PIN came from, never the PIN. A module that is missing is left to the first request,
    /// which reports it; a foreign token's PIN is tried at its first use, as before.
    pub fn for_server(config: &ServerConfig) -> Result<Self> {
        let client = Self::new(config)?;
        if client.specs.iter().any(|s| !s.path.exists()) {
            return Ok(client);
        }
        let inv = client.inventory()?;
        for slot in inv.slots.iter().filter(|s| s.ours && s.login_required) {
            Self::on_token(slot, "login", |_| Ok(()))?;
            log::info!("token {:?}: logged in", slot.label);
        }
        Ok(client)
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
            let (module, found) = load_module(spec)?;
            log::info!(
                "module {}: {} usable token(s)",
                module.path().display(),
                found.len()
            );
            modules.push(module);
            slots.extend(found);
        }
        // Hardware first; within a class, config order.
        slots.sort_by_key(|s| rank(s.class));
        let inv = Arc::new(Inventory {
            _modules: modules,
            slots,
            cache: Mutex::new(KeyCache::default()),
        });
        *guard = Some(Arc::clone(&inv));
        Ok(inv)
    }

    /// Runs `f` on a pooled session of `slot` (one reconnect-and-retry when the session or the
    /// token went away); any error is final.
    fn on_token<T>(slot: &TokenSlot, what: &str, f: impl Fn(&Session) -> Attempt<T>) -> Result<T> {
        slot.token
            .run(&format!("token {:?} {what}", slot.label), &|| {}, f)
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
            let random = proof::random_key_id_bytes()?;
            let _write = slot.token.write_lock();
            let created = Self::on_token(slot, "key generation", |session| {
                Ok(Self::create_in(
                    session, slot, &random, binding, purpose, label,
                )?)
            });
            match created {
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
        session: &Session,
        slot: &TokenSlot,
        random: &[u8; 32],
        binding: Option<&Binding>,
        purpose: KeyPurpose,
        label: Option<&str>,
    ) -> Result<KeyInfo> {
        let key_id = proof::key_id_for(slot.class, random);
        let label = label.unwrap_or(&key_id).to_string();
        let public_template = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
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
                attribute_bytes(session, public, AttributeType::EcPoint)?.ok_or_else(|| {
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
                            p11::describe(&de)
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

    /// The first object matching `template` (a module error stays recoverable).
    fn find_first(session: &Session, template: &[Attribute]) -> Attempt<Option<ObjectHandle>> {
        Ok(session
            .iter_objects(template)
            .and_then(|mut objects| objects.next().transpose())?)
    }

    /// An object's single attribute as bytes, if present (a module error stays recoverable).
    fn attribute(
        session: &Session,
        object: ObjectHandle,
        kind: AttributeType,
    ) -> Attempt<Option<Vec<u8>>> {
        Ok(attribute_value(session.get_attributes(object, &[kind])?))
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

    /// Looks for a key in each slot of its class, in order: `find` runs in a session of the slot
    /// and answers `None` when the key is not there. When a cached object handle went stale (the
    /// pool already re-established a dropped session or token once), the whole search runs once
    /// more without the cache.
    fn find_key<T>(
        &self,
        key_id: &str,
        class: ProtectionClass,
        what: &str,
        find: impl Fn(&SlotSearch<'_>, &Session) -> Attempt<Option<T>>,
    ) -> Result<T> {
        let inv = self.inventory()?;
        let attempt = |use_cache: bool| -> Attempt<T> {
            for (index, slot) in inv.slots.iter().enumerate() {
                if slot.class != class {
                    continue;
                }
                let search = SlotSearch {
                    inv: &inv,
                    index,
                    slot,
                    use_cache,
                };
                if let Some(found) = slot.token.try_run(what, &|| {}, |s| find(&search, s))? {
                    return Ok(found);
                }
            }
            Err(DeviceKeyError::KeyNotFound.into())
        };
        let context = format!("key {key_id}");
        match attempt(true) {
            Ok(v) => Ok(v),
            Err(p11::OpError::Ck(e)) if p11::error::recovery(&e) != Recovery::None => {
                log::debug!("{}; looking key {key_id} up again", p11::describe(&e));
                inv.forget(key_id);
                attempt(false).map_err(|e| e.into_final(&context))
            }
            Err(e) => Err(e.into_final(&context)),
        }
    }

    /// `device/key/public`.
    pub fn public_key(&self, key_id: &str) -> Result<KeyInfo> {
        let id = proof::parse_key_id(key_id)?;
        let template = Self::key_template(ObjectClass::PUBLIC_KEY, key_id, &id.random);
        self.find_key(key_id, id.class, "public", |search, session| {
            let Some(public) = Self::find_first(session, &template)? else {
                return Ok(None);
            };
            if search.slot.ours {
                let private_template =
                    Self::key_template(ObjectClass::PRIVATE_KEY, key_id, &id.random);
                let Some(private) = Self::find_first(session, &private_template)? else {
                    return Err(DeviceKeyError::KeyNotFound.into());
                };
                Self::require_proof_purpose(session, private)?;
            }
            if let Some(info) = search.still_valid(search.inv.cached_public(key_id), public) {
                return Ok(Some(info));
            }
            let point =
                Self::attribute(session, public, AttributeType::EcPoint)?.ok_or_else(|| {
                    DeviceKeyError::Crypto("the public key has no CKA_EC_POINT".into())
                })?;
            let info = KeyInfo {
                key_id: key_id.to_string(),
                public_key_spki_der_base64: STANDARD.encode(spki_from_ec_point(&point)?),
                algorithm: Algorithm::EcdsaP256Sha256,
                protection_class: search.slot.class,
            };
            search
                .inv
                .remember_public(key_id, search.cached(public, info.clone()));
            Ok(Some(info))
        })
    }

    /// On our module, a device key is a proof-only key: refuses a private key whose
    /// `CKA_DEVICEKEY_PURPOSE` is not proof (a general key labelled like a device key).
    fn require_proof_purpose(session: &Session, private: ObjectHandle) -> Attempt<()> {
        let kind = AttributeType::VendorDefined(crate::vendor::CKA_DEVICEKEY_PURPOSE);
        let attrs = session.get_attributes(private, &[kind])?;
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
        let key_id = params.key_id.as_str();
        let (account, client) = params.payload.binding();
        let binding_template = Self::binding_template(key_id);
        self.find_key(key_id, id.class, "signing", |search, session| {
            let Some(object) = Self::find_first(session, &binding_template)? else {
                return Ok(None);
            };
            let binding = match search.still_valid(search.inv.cached_binding(key_id), object) {
                Some(binding) => binding,
                None => {
                    let Some(value) = Self::attribute(session, object, AttributeType::Value)?
                    else {
                        return Ok(None);
                    };
                    let binding: Binding = serde_json::from_slice(&value).map_err(|e| {
                        DeviceKeyError::Platform(format!("stored binding is unreadable: {e}"))
                    })?;
                    search
                        .inv
                        .remember_binding(key_id, search.cached(object, binding.clone()));
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
            let Some(private) = Self::find_first(session, &template)? else {
                return Err(DeviceKeyError::KeyNotFound.into());
            };
            if search.slot.ours {
                Self::require_proof_purpose(session, private)?;
            }
            let bytes = proof::signing_bytes(&params.payload).map_err(DeviceKeyError::from)?;
            let raw = if search.slot.ecdsa_sha256 {
                session.sign(&Mechanism::EcdsaSha256, private, &bytes)?
            } else {
                session.sign(&Mechanism::Ecdsa, private, &Sha256::digest(&bytes))?
            };
            Ok(Some(SignResult {
                signature_der_base64: STANDARD.encode(der_signature(&raw)?),
                signed_payload_base64: STANDARD.encode(&bytes),
                algorithm: Algorithm::EcdsaP256Sha256,
            }))
        })
    }

    /// Every key on every usable token, with its binding when it has one.
    pub fn list(&self) -> Result<Vec<KeyListing>> {
        let inv = self.inventory()?;
        let mut out = Vec::new();
        for slot in &inv.slots {
            let keys = Self::on_token(slot, "listing keys", |session| {
                let keys = session
                    .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                    .map_err(|e| platform("C_FindObjects", e))?;
                let mut out = Vec::new();
                for key in keys {
                    let label = attribute_bytes(session, key, AttributeType::Label)?
                        .map(|l| String::from_utf8_lossy(&l).into_owned())
                        .unwrap_or_default();
                    let binding = if proof::parse_key_id(&label).is_ok() {
                        Self::read_binding(session, &label)?
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
                Ok(out)
            })?;
            out.extend(keys);
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
            let _write = slot.token.write_lock();
            found |= Self::on_token(slot, "deleting a key", |session| {
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
                let any = !objects.is_empty();
                for object in objects {
                    session
                        .destroy_object(object)
                        .map_err(|e| platform("C_DestroyObject", e))?;
                }
                Ok(any)
            })?;
        }
        if found {
            Ok(())
        } else {
            Err(DeviceKeyError::KeyNotFound)
        }
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
