//! The one owner of the TPM connection.
//!
//! A [`Device`] holds an ESAPI context behind a mutex: callers queue for it, and the TPM sees one
//! command at a time. Each connection derives the storage root key (SRK) once, from the standard
//! ECC P-256 storage template in the owner hierarchy, and keeps a small LRU of loaded signing
//! keys. Every transient object we create is flushed: on eviction, on `destroy`, and when the
//! connection is dropped. Without a resource manager (swtpm, `/dev/tpm0`) the TPM has only three
//! object slots, so the cache holds at most [`CACHE_SIZE`] keys besides the SRK.
//!
//! The SRK is the persistent object at [`PERSISTENT_SRK`] (`0x81000001`, where tpm2-tools and
//! tpm2-pkcs11 keep it) when its public area is the standard ECC P-256 storage template; it is
//! then never created nor flushed. Otherwise (nothing there, or another object, which is not
//! used and is logged once) the connection derives it with TPM2_CreatePrimary from that template
//! in the owner hierarchy. Both are the same key: the primary seed and the template decide it.
//!
//! The connection belongs to the process that opened it: after `fork()` the child never touches
//! (or flushes) the parent's objects, it opens its own connection. When the connection drops (a
//! TCTI error), the next call reconnects once and retries.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::verify::PointVerifier;
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCode;
use tss_esapi::constants::tss::{
    TPM2_LOADED_SESSION_FIRST, TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST,
};
use tss_esapi::constants::{CapabilityType, PropertyTag, StartupType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::resource_handles::Provision;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket,
    KeyDerivationFunctionScheme, Private, Public, PublicBuilder, PublicEccParameters,
    PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

mod attest;
mod auth;

pub use attest::{ak_from_blobs, name_of, AkParts, Certified, Endorsement, PERSISTENT_EK};
pub use auth::Lockout;

use super::keyfile::KeyBlob;
use super::purpose::{binding, policy_digest, Binding};
use crate::backend::{BackendError, KeyPurpose, Result};

/// Signing keys kept loaded besides the SRK (swtpm without a resource manager has 3 slots).
pub const CACHE_SIZE: usize = 2;

/// Where the persistent SRK lives (the TCG provisioning guidance's SRK handle).
pub const PERSISTENT_SRK: u32 = 0x8100_0001;

/// TPM_RC_OBJECT_MEMORY: out of object slots.
const RC_OBJECT_MEMORY: u32 = 0x902;
/// TPM_RC_SESSION_MEMORY and TPM_RC_MEMORY.
const RC_SESSION_MEMORY: u32 = 0x903;
const RC_MEMORY: u32 = 0x904;
/// TPM_RC_INITIALIZE: TPM2_Startup has not been run.
const RC_INITIALIZE: u32 = 0x100;
/// TPM_RC_LOCKOUT: dictionary-attack lockout.
const RC_LOCKOUT: u32 = 0x921;
/// TPM_RC_REFERENCE_H0: the handle references no loaded object.
const RC_REFERENCE_H0: u32 = 0x910;
/// The TCTI layer of TSS2 return codes (bits 16..24).
const LAYER_TCTI: u32 = 0x0A;
/// The resource-manager layers (tabrmd).
const LAYER_RESMGR: u32 = 0x0B;

/// A key the TPM can load: its public and (parent-encrypted) private areas.
#[derive(Debug)]
pub struct TpmKey {
    /// The store's name of the key; the cache is keyed by it.
    pub name: String,
    /// TPMT_PUBLIC.
    pub public: Public,
    /// TPM2B_PRIVATE contents.
    pub private: Private,
    /// The public key, to check every signature before it leaves (`None`: not a P-256 key).
    verifying: Option<PointVerifier>,
    /// What the connection's cache knows the loaded object by: the name and a hash of the
    /// private area, so that a blob re-protected under another authValue is loaded anew.
    cache_id: String,
}

impl TpmKey {
    /// A key from its parts.
    pub fn new(name: &str, public: Public, private: Private) -> Self {
        let verifying = public_point(&public).and_then(|p| PointVerifier::new(&p));
        let private_hash = Sha256::digest(private.value());
        Self {
            name: name.to_string(),
            cache_id: format!("{name}@{}", crate::encoding::hex(&private_hash[..8])),
            public,
            private,
            verifying,
        }
    }

    /// Reads a key from its blob.
    pub fn from_blob(name: &str, blob: &KeyBlob) -> std::result::Result<Self, String> {
        let public = blob
            .public
            .get(2..)
            .ok_or("short public area")
            .and_then(|b| Public::unmarshall(b).map_err(|_| "bad public area"))?;
        let private = blob
            .private
            .get(2..)
            .ok_or("short private area")
            .and_then(|b| Private::try_from(b.to_vec()).map_err(|_| "bad private area"))?;
        Ok(Self::new(name, public, private))
    }

    /// The key's blob (TPM2B_PUBLIC, TPM2B_PRIVATE).
    pub fn to_blob(&self) -> std::result::Result<KeyBlob, String> {
        let public = self
            .public
            .marshall()
            .map_err(|e| format!("cannot marshal the public area: {e}"))?;
        Ok(KeyBlob {
            public: tpm2b(&public)?,
            private: tpm2b(self.private.value())?,
            empty_auth: true,
        })
    }

    /// What the public area's `authPolicy` says about the key's purpose.
    pub fn binding(&self) -> Binding {
        binding(self.public.auth_policy().value())
    }

    /// The public point `04‖X‖Y` of a P-256 signing key; `None` for any other kind of key.
    pub fn public_point(&self) -> Option<[u8; 65]> {
        public_point(&self.public)
    }
}

fn tpm2b(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let len = u16::try_from(bytes.len()).map_err(|_| "TPM structure too large".to_string())?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(out)
}

fn public_point(public: &Public) -> Option<[u8; 65]> {
    let Public::Ecc {
        object_attributes,
        parameters,
        unique,
        ..
    } = public
    else {
        return None;
    };
    if parameters.ecc_curve() != EccCurve::NistP256
        || !object_attributes.sign_encrypt()
        || object_attributes.restricted()
    {
        return None;
    }
    let mut point = [0u8; 65];
    point[0] = 4;
    point[1..33].copy_from_slice(&fixed32(unique.x().value())?);
    point[33..].copy_from_slice(&fixed32(unique.y().value())?);
    p256::PublicKey::from_sec1_bytes(&point).ok()?;
    Some(point)
}

/// A big-endian integer as exactly 32 bytes: leading zeros stripped, then left-padded.
pub fn fixed32(v: &[u8]) -> Option<[u8; 32]> {
    let skip = v.iter().take_while(|b| **b == 0).count();
    let v = &v[skip..];
    if v.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Some(out)
}

/// What the TPM says about itself.
#[derive(Clone, Debug)]
pub struct Identity {
    /// TPM2_PT_MANUFACTURER as text (`IFX`, `STM`, `IBM`...).
    pub manufacturer: String,
    /// The four vendor strings, blanks collapsed (`SW TPM` for swtpm).
    pub vendor: String,
    /// TPM2_PT_FIRMWARE_VERSION_1/2 as four 16-bit numbers.
    pub firmware: String,
    /// A simulator (swtpm, the reference simulator, or a simulator TCTI).
    pub simulator: bool,
    /// The first 8 bytes of SHA-256 over the SRK's public point: stable while the owner
    /// hierarchy is not cleared.
    pub srk_fingerprint: [u8; 8],
    /// What the store uses as its SRK.
    pub srk: SrkSource,
}

/// Where the connection's SRK comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SrkSource {
    /// The persistent SRK at [`PERSISTENT_SRK`].
    Persistent,
    /// Derived with TPM2_CreatePrimary on each connection; the text says why the persistent
    /// handle was not used (empty, or holding another object).
    Derived(String),
}

/// What `persist_srk` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistOutcome {
    /// The SRK was made persistent at [`PERSISTENT_SRK`].
    Persisted,
    /// The standard SRK was there already.
    AlreadyThere,
}

/// Why a TPM operation failed, before it becomes a [`BackendError`].
enum Fail {
    Tss(&'static str, tss_esapi::Error),
    /// The TPM signed, but not with our key: the handle named another object.
    WrongKey,
    /// The TPM refused this request (a credential for another AK or EK): the connection is
    /// fine, nothing is retried.
    Refused(&'static str, tss_esapi::Error),
    Other(BackendError),
}

type Op<T> = std::result::Result<T, Fail>;

fn tss<T>(what: &'static str, r: tss_esapi::Result<T>) -> Op<T> {
    r.map_err(|e| Fail::Tss(what, e))
}

/// The raw TSS2 return code of an error (0 for wrapper errors).
fn raw_rc(e: &tss_esapi::Error) -> u32 {
    let tss_esapi::Error::Tss2Error(code) = e else {
        return 0;
    };
    // The crate keeps the raw value private; its Display is "Response code value: 0x...".
    let text = match code {
        Tss2ResponseCode::FormatZero(c) => c.to_string(),
        Tss2ResponseCode::FormatOne(c) => c.to_string(),
        Tss2ResponseCode::Success => return 0,
    };
    text.rsplit("0x")
        .next()
        .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0)
}

fn layer(rc: u32) -> u32 {
    (rc >> 16) & 0xff
}

/// The TPM-level code (format-zero codes whole, format-one codes without parameter bits).
fn tpm_code(rc: u32) -> u32 {
    if layer(rc) != 0 {
        return 0;
    }
    if rc & 0x80 != 0 {
        0x80 | (rc & 0x3f)
    } else {
        rc & 0xfff
    }
}

/// A TCTI or resource-manager error: the connection is gone; send it nothing more.
fn is_transport_error(e: &Fail) -> bool {
    match e {
        Fail::Tss(_, err) => matches!(layer(raw_rc(err)), LAYER_TCTI | LAYER_RESMGR),
        Fail::Other(BackendError::Unreachable(_)) => true,
        Fail::WrongKey | Fail::Refused(..) | Fail::Other(_) => false,
    }
}

/// The TPM is out of object memory even after we flushed our own cache.
fn is_full(e: &Fail) -> bool {
    matches!(e, Fail::Tss(_, err) if is_out_of_memory(err))
}

/// Whether a new connection may succeed where this one failed: the transport failed; the TPM
/// is full; the TPM was reset or another client flushed our objects, so our handles name
/// nothing (TPM_RC_HANDLE, TPM_RC_REFERENCE_H0) or another object (the signature does not
/// verify: without a resource manager, handle numbers are reused across clients, and swtpm's
/// TCTI lets several clients in). On a connection that served earlier calls, any TPM error
/// counts, since its state may be stale.
fn worth_reconnecting(e: &Fail, fresh: bool) -> bool {
    match e {
        Fail::Tss(_, err) => {
            let rc = raw_rc(err);
            let code = tpm_code(rc);
            matches!(layer(rc), LAYER_TCTI | LAYER_RESMGR)
                || is_out_of_memory(err)
                || code == 0x8b
                || code == RC_REFERENCE_H0
                || (!fresh && layer(rc) == 0 && rc != 0)
        }
        Fail::WrongKey => true,
        Fail::Other(BackendError::Unreachable(_)) => true,
        Fail::Refused(..) | Fail::Other(_) => false,
    }
}

fn is_out_of_memory(e: &tss_esapi::Error) -> bool {
    matches!(
        tpm_code(raw_rc(e)),
        RC_OBJECT_MEMORY | RC_SESSION_MEMORY | RC_MEMORY
    )
}

/// The object attributes every key we make shares: it never leaves this TPM or its parent, the
/// TPM made its private part, and it is used with its (empty) auth value.
fn bound_attributes() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
}

/// The start of every template we build: an object of `algorithm` with SHA-256 names and
/// `attributes`.
fn public_builder(
    algorithm: PublicAlgorithm,
    attributes: ObjectAttributesBuilder,
) -> tss_esapi::Result<PublicBuilder> {
    Ok(PublicBuilder::new()
        .with_public_algorithm(algorithm)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes.build()?))
}

/// The public template of the SRK: the TCG standard ECC P-256 storage key (AES-128-CFB, no
/// unique data), the same that the tpm2 OpenSSL provider and engine derive for parent 0x40000001.
fn srk_template() -> tss_esapi::Result<Public> {
    let attributes = bound_attributes()
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true);
    public_builder(PublicAlgorithm::Ecc, attributes)?
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Why a persistent object's public area is not the SRK template's (`None`: it is). Compared
/// field by field; only the unique point (the key itself) may differ.
fn srk_mismatch(public: &Public) -> Option<String> {
    let Ok(Public::Ecc {
        object_attributes: want_attributes,
        parameters: want_parameters,
        ..
    }) = srk_template()
    else {
        return Some("the SRK template does not build".into());
    };
    let Public::Ecc {
        object_attributes,
        name_hashing_algorithm,
        auth_policy,
        parameters,
        ..
    } = public
    else {
        return Some("it is not an ECC key".into());
    };
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Some(format!(
            "its name algorithm is {name_hashing_algorithm:?}, not SHA-256"
        ));
    }
    if *object_attributes != want_attributes {
        return Some(format!(
            "its attributes are {:#x}, not {:#x} (restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda)",
            u32::from(*object_attributes),
            u32::from(want_attributes)
        ));
    }
    if *parameters != want_parameters {
        return Some(format!(
            "its parameters are {parameters:?}, not AES-128-CFB, no scheme, NIST P-256, no KDF"
        ));
    }
    if !auth_policy.value().is_empty() {
        return Some("it has an authPolicy".into());
    }
    None
}

/// Runs `op` with the owner hierarchy's authorization set in the ESYS context (a password
/// session), and empties it again afterwards.
fn with_owner_auth<T>(
    ctx: &mut Context,
    auth: Auth,
    op: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
) -> tss_esapi::Result<T> {
    if !auth.value().is_empty() {
        ctx.tr_set_auth(Hierarchy::Owner.into(), auth)?;
    }
    let result = ctx.execute_with_session(Some(AuthSession::Password), op);
    let _ = ctx.tr_set_auth(Hierarchy::Owner.into(), Auth::default());
    result
}

/// The public template of a signing key: P-256, unrestricted, no fixed scheme (the scheme is
/// named at each TPM2_Sign), fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, sign, and
/// the purpose bound as its `authPolicy` (see the `purpose` module).
fn key_template(purpose: KeyPurpose) -> tss_esapi::Result<Public> {
    let attributes = bound_attributes().with_sign_encrypt(true);
    public_builder(PublicAlgorithm::Ecc, attributes)?
        .with_ecc_parameters(PublicEccParameters::new(
            SymmetricDefinitionObject::Null,
            EccScheme::Null,
            EccCurve::NistP256,
            KeyDerivationFunctionScheme::Null,
        ))
        .with_ecc_unique_identifier(EccPoint::default())
        .with_auth_policy(Digest::try_from(policy_digest(purpose).to_vec())?)
        .build()
}

/// One connection, owned by the process that opened it.
struct Conn {
    pid: u32,
    ctx: Option<Context>,
    srk: Option<KeyHandle>,
    /// Where `srk` came from (a persistent SRK is closed, never flushed).
    srk_source: SrkSource,
    srk_fingerprint: [u8; 8],
    /// Loaded signing keys by [`TpmKey::cache_id`], most recently used first.
    loaded: VecDeque<(String, KeyHandle)>,
    /// The HMAC session of PIN-protected keys, once started (see the `auth` module).
    pin_session: Option<AuthSession>,
    /// False when that session could not be salted (see `Conn::pin_session`).
    pin_session_salted: bool,
    /// The connection failed: do not send it anything more.
    dead: bool,
    /// The EK attestation uses, once found.
    endorsement: Option<Endorsement>,
    /// The owner hierarchy's authorization (empty unless `persist_srk` runs).
    owner_auth: Zeroizing<Vec<u8>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut ctx) = self.ctx.take() else {
            return;
        };
        if self.pid != std::process::id() {
            // A forked child: the objects and the socket are the parent's. Dropping the context
            // would flush the parent's keys and end its TPM session, so leak it instead.
            std::mem::forget(ctx);
            return;
        }
        if self.dead {
            // Forget the handles locally so that dropping the context sends no flush to a dead
            // connection (a persistent SRK is only closed either way).
            let handles = self
                .srk
                .take()
                .into_iter()
                .map(ObjectHandle::from)
                .chain(self.loaded.drain(..).map(|(_, h)| ObjectHandle::from(h)))
                .chain(
                    self.pin_session
                        .take()
                        .map(|s| ObjectHandle::from(SessionHandle::from(s))),
                );
            for mut object in handles {
                let _ = ctx.tr_close(&mut object);
            }
        }
        // Dropping the context flushes the SRK and every loaded key.
        drop(ctx);
    }
}

impl Conn {
    fn ctx(&mut self) -> Op<&mut Context> {
        self.ctx
            .as_mut()
            .ok_or_else(|| Fail::Other(BackendError::Unreachable("TPM connection closed".into())))
    }

    /// The SRK, found (or derived) again if attestation released it to make room.
    fn srk(&mut self) -> Op<KeyHandle> {
        if self.srk.is_none() {
            self.create_srk()?;
        }
        self.srk
            .ok_or_else(|| Fail::Other(BackendError::Unreachable("no storage root key".into())))
    }

    /// Lets go of the SRK: a derived one is flushed, the persistent one only closed.
    fn drop_srk(&mut self) {
        let Some(h) = self.srk.take() else {
            return;
        };
        if self.srk_source == SrkSource::Persistent {
            if let Ok(ctx) = self.ctx() {
                let mut object = ObjectHandle::from(h);
                let _ = ctx.tr_close(&mut object);
            }
        } else {
            self.flush(h);
        }
    }

    fn flush(&mut self, handle: KeyHandle) {
        if let Ok(ctx) = self.ctx() {
            if let Err(e) = ctx.flush_context(handle.into()) {
                log::warn!("tpm: flushing a transient object failed: {e}");
            }
        }
    }

    /// Flushes every transient object and loaded session the TPM lists, before we load
    /// anything of our own. Only used when the TPM is out of object or session memory: behind a
    /// resource manager we see only our own (none); on swtpm or a bare TPM the ones there were
    /// leaked by processes that died, or belong to another client, which reconnects when its
    /// handles go stale.
    fn flush_transient(&mut self) -> Op<()> {
        if self.srk.is_some() || !self.loaded.is_empty() {
            return Ok(());
        }
        let mut list = self.handles("listing transient objects", TPM2_TRANSIENT_FIRST, 64)?;
        // Sessions too (the salted sessions of PIN slots): without a resource manager, those of
        // a process that died stay loaded.
        if self.pin_session.is_none() {
            list.extend(self.handles("listing loaded sessions", TPM2_LOADED_SESSION_FIRST, 64)?);
        }
        let ctx = self.ctx()?;
        for handle in list {
            if !matches!(
                handle,
                TpmHandle::Transient(_) | TpmHandle::HmacSession(_) | TpmHandle::PolicySession(_)
            ) {
                continue;
            }
            let result = ctx
                .tr_from_tpm_public(handle)
                .and_then(|object| ctx.flush_context(object));
            let what = match handle {
                TpmHandle::Transient(_) => "transient object",
                _ => "session",
            };
            let raw = u32::from(handle);
            match result {
                Ok(()) => log::warn!("tpm: TPM full; flushed {what} {raw:#x}"),
                Err(e) => log::warn!("tpm: cannot flush {what} {raw:#x}: {e}"),
            }
        }
        Ok(())
    }

    /// Whether a persistent object sits at `handle`.
    fn persistent_present(&mut self, handle: u32) -> Op<bool> {
        let list = self.handles("listing persistent objects", handle, 1)?;
        Ok(list
            .iter()
            .any(|h| matches!(h, TpmHandle::Persistent(p) if u32::from(*p) == handle)))
    }

    /// The handles the TPM lists from `first` on, at most `count` (TPM2_GetCapability);
    /// `what` names the listing in errors.
    fn handles(&mut self, what: &'static str, first: u32, count: u32) -> Op<Vec<TpmHandle>> {
        let ctx = self.ctx()?;
        let (data, _) = tss(
            what,
            ctx.execute_without_session(|c| {
                c.get_capability(CapabilityType::Handles, first, count)
            }),
        )?;
        Ok(match data {
            CapabilityData::Handles(list) => list.iter().copied().collect(),
            _ => Vec::new(),
        })
    }

    /// The persistent SRK, opened, with its public area, when [`PERSISTENT_SRK`] holds the
    /// standard SRK; otherwise why not.
    fn open_persistent_srk(&mut self) -> Op<std::result::Result<(KeyHandle, Public), String>> {
        if !self.persistent_present(PERSISTENT_SRK)? {
            return Ok(Err(format!("no persistent object at {PERSISTENT_SRK:#x}")));
        }
        let handle = PersistentTpmHandle::new(PERSISTENT_SRK).map_err(|_| {
            Fail::Other(BackendError::Unusable(
                "0x81000001 is not a persistent handle".into(),
            ))
        })?;
        let ctx = self.ctx()?;
        let mut object = tss(
            "opening the persistent SRK",
            ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(handle))),
        )?;
        let read = ctx.execute_without_session(|c| c.read_public(object.into()));
        let public = match read {
            Ok((public, _, _)) => public,
            Err(e) => {
                let _ = ctx.tr_close(&mut object);
                return Err(Fail::Tss("reading the persistent SRK (TPM2_ReadPublic)", e));
            }
        };
        match srk_mismatch(&public) {
            None => Ok(Ok((KeyHandle::from(object), public))),
            Some(why) => {
                let _ = ctx.tr_close(&mut object);
                Ok(Err(format!(
                    "the object at {PERSISTENT_SRK:#x} is not the standard ECC P-256 SRK: {why}"
                )))
            }
        }
    }

    /// Finds the SRK: the persistent one when it is the standard SRK, else derived with
    /// TPM2_CreatePrimary.
    fn create_srk(&mut self) -> Op<()> {
        let (handle, public) = match self.open_persistent_srk()? {
            Ok((handle, public)) => {
                log::debug!("tpm: using the persistent SRK at {PERSISTENT_SRK:#x}");
                self.srk_source = SrkSource::Persistent;
                (handle, public)
            }
            Err(why) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                if why.starts_with("no persistent object") {
                    log::debug!("tpm: {why}; deriving the SRK");
                } else {
                    LOGGED.call_once(|| log::warn!("tpm: {why}; not using it, deriving the SRK"));
                }
                self.srk_source = SrkSource::Derived(why);
                self.create_primary_srk()?
            }
        };
        let mut hasher = Sha256::new();
        if let Public::Ecc { unique, .. } = &public {
            hasher.update(unique.x().value());
            hasher.update(unique.y().value());
        }
        let digest = hasher.finalize();
        self.srk_fingerprint.copy_from_slice(&digest[..8]);
        self.srk = Some(handle);
        Ok(())
    }

    /// TPM2_CreatePrimary of the SRK from the standard template; the caller flushes it.
    fn create_primary_srk(&mut self) -> Op<(KeyHandle, Public)> {
        let template = tss("building the SRK template", srk_template())?;
        let auth = tss(
            "preparing the owner authorization",
            Auth::try_from(self.owner_auth.to_vec()),
        )?;
        let ctx = self.ctx()?;
        log::debug!("tpm: TPM2_CreatePrimary (owner hierarchy, the SRK)");
        let result = with_owner_auth(ctx, auth, |c| {
            c.create_primary(Hierarchy::Owner, template, None, None, None, None)
        });
        let result = tss(
            "creating the storage root key (TPM2_CreatePrimary, owner hierarchy)",
            result,
        )?;
        Ok((result.key_handle, result.out_public))
    }

    /// Makes the SRK persistent at [`PERSISTENT_SRK`] (TPM2_EvictControl with owner
    /// authorization), unless the standard SRK is there already; refuses when another object
    /// holds the handle.
    fn persist_srk(&mut self) -> Op<PersistOutcome> {
        if self.srk_source == SrkSource::Persistent {
            return Ok(PersistOutcome::AlreadyThere);
        }
        if self.persistent_present(PERSISTENT_SRK)? {
            return Err(Fail::Other(BackendError::Refused(match &self.srk_source {
                SrkSource::Derived(why) => format!("{why}; remove it first (tpm2_evictcontrol -C o -c {PERSISTENT_SRK:#x}) if it is not needed"),
                SrkSource::Persistent => format!("{PERSISTENT_SRK:#x} is taken"),
            })));
        }
        let srk = self.srk()?;
        let auth = tss(
            "preparing the owner authorization",
            Auth::try_from(self.owner_auth.to_vec()),
        )?;
        let persistent = PersistentTpmHandle::new(PERSISTENT_SRK).map_err(|_| {
            Fail::Other(BackendError::Unusable(
                "0x81000001 is not a persistent handle".into(),
            ))
        })?;
        let ctx = self.ctx()?;
        log::debug!("tpm: TPM2_EvictControl of the SRK to {PERSISTENT_SRK:#x}");
        let result = with_owner_auth(ctx, auth, |c| {
            c.evict_control(
                Provision::Owner,
                srk.into(),
                Persistent::Persistent(persistent),
            )
        });
        let mut object = result.map_err(|e| match tpm_code(raw_rc(&e)) {
            // TPM_RC_AUTH_FAIL, TPM_RC_BAD_AUTH: the owner authorization is wrong.
            0x8e | 0xa2 => Fail::Other(BackendError::Auth(format!(
                "the TPM refused the owner authorization ({e}); set the slot's owner_auth_env \
                 or owner_auth_file to the owner hierarchy's password"
            ))),
            _ => Fail::Tss("making the SRK persistent (TPM2_EvictControl)", e),
        })?;
        let _ = ctx.tr_close(&mut object);
        Ok(PersistOutcome::Persisted)
    }

    fn identity(&mut self, tcti: &str) -> Op<Identity> {
        let ctx = self.ctx()?;
        let (data, _) = tss(
            "reading TPM properties",
            ctx.execute_without_session(|c| {
                c.get_capability(
                    CapabilityType::TpmProperties,
                    tss_esapi::constants::tss::TPM2_PT_MANUFACTURER,
                    8,
                )
            }),
        )?;
        let CapabilityData::TpmProperties(props) = data else {
            return Err(Fail::Other(BackendError::Refused(
                "the TPM answered GetCapability with the wrong kind of data".into(),
            )));
        };
        let get = |tag| props.find(tag).map(|p| p.value()).unwrap_or(0);
        let manufacturer = ascii4(get(PropertyTag::Manufacturer)).trim().to_string();
        let vendor_raw: String = [
            PropertyTag::VendorString1,
            PropertyTag::VendorString2,
            PropertyTag::VendorString3,
            PropertyTag::VendorString4,
        ]
        .into_iter()
        .map(|t| ascii4(get(t)))
        .collect();
        let vendor = vendor_raw.split_whitespace().collect::<Vec<_>>().join(" ");
        let fw1 = get(PropertyTag::FirmwareVersion1);
        let fw2 = get(PropertyTag::FirmwareVersion2);
        let firmware = format!(
            "{}.{}.{}.{}",
            fw1 >> 16,
            fw1 & 0xffff,
            fw2 >> 16,
            fw2 & 0xffff
        );
        Ok(Identity {
            simulator: is_simulator(&manufacturer, &vendor, tcti),
            manufacturer,
            vendor,
            firmware,
            srk_fingerprint: self.srk_fingerprint,
            srk: self.srk_source.clone(),
        })
    }

    /// The handle of a loaded key, loading it (and evicting the least recently used) if needed.
    fn ensure_loaded(&mut self, key: &TpmKey) -> Op<KeyHandle> {
        if let Some(pos) = self.loaded.iter().position(|(n, _)| *n == key.cache_id) {
            if let Some(entry) = self.loaded.remove(pos) {
                let handle = entry.1;
                self.loaded.push_front(entry);
                return Ok(handle);
            }
        }
        while self.loaded.len() >= CACHE_SIZE {
            match self.loaded.pop_back() {
                Some((_, h)) => self.flush(h),
                None => break,
            }
        }
        let srk = self.srk()?;
        let load = |ctx: &mut Context| {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk, key.private.clone(), key.public.clone())
            })
        };
        let handle = match load(self.ctx()?) {
            Ok(h) => h,
            Err(e) if is_out_of_memory(&e) => {
                // Someone else's objects fill the TPM: drop all of ours and try once more.
                log::warn!("tpm: out of object memory while loading a key; flushing the cache");
                while let Some((_, h)) = self.loaded.pop_back() {
                    self.flush(h);
                }
                tss("loading the key (TPM2_Load)", load(self.ctx()?))?
            }
            Err(e) => return Err(Fail::Tss("loading the key (TPM2_Load)", e)),
        };
        self.loaded.push_front((key.cache_id.clone(), handle));
        Ok(handle)
    }

    /// Flushes every loaded object of the key `name` (whatever its private area).
    fn forget(&mut self, name: &str) {
        while let Some(pos) = self
            .loaded
            .iter()
            .position(|(id, _)| id.split('@').next() == Some(name))
        {
            if let Some((_, h)) = self.loaded.remove(pos) {
                self.flush(h);
            }
        }
    }

    /// TPM2_Sign; `auth` is the key's authValue (through the salted session), `None` for a
    /// key with an empty one (a password session, as ever).
    fn sign(&mut self, key: &TpmKey, digest_bytes: &[u8; 32], auth: Option<&[u8]>) -> Op<[u8; 64]> {
        let handle = self.ensure_loaded(key)?;
        let digest = tss(
            "preparing the digest",
            Digest::try_from(digest_bytes.to_vec()),
        )?;
        let ticket = tss(
            "preparing the null ticket",
            HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
                tag: TPM2_ST_HASHCHECK,
                hierarchy: TPM2_RH_NULL,
                digest: Default::default(),
            }),
        )?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        // One line per command sent (tests count them: a length query must send none).
        log::debug!("tpm: TPM2_Sign with {}", key.name);
        let signature = match auth {
            Some(auth) => {
                self.with_auth(handle.into(), auth, false, "signing (TPM2_Sign)", |c| {
                    c.sign(handle, digest, scheme, ticket)
                })?
            }
            None => tss(
                "signing (TPM2_Sign)",
                self.ctx()?
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.sign(handle, digest, scheme, ticket)
                    }),
            )?,
        };
        let Signature::EcDsa(sig) = signature else {
            return Err(Fail::Other(BackendError::Crypto(
                "the TPM returned a non-ECDSA signature".into(),
            )));
        };
        let (Some(r), Some(s)) = (
            fixed32(sig.signature_r().value()),
            fixed32(sig.signature_s().value()),
        ) else {
            return Err(Fail::Other(BackendError::Crypto(
                "the TPM returned an oversized signature".into(),
            )));
        };
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&r);
        out[32..].copy_from_slice(&s);
        // Check before the signature leaves: a TPM shared without a resource manager (swtpm)
        // reuses handle numbers, so a stale handle can name another client's key; a check also
        // catches a faulty TPM.
        let verifying = key.verifying.as_ref().ok_or_else(|| {
            Fail::Other(BackendError::Crypto(format!(
                "{} is not a P-256 signing key",
                key.name
            )))
        })?;
        if !verifying.verify(digest_bytes, &out) {
            return Err(Fail::WrongKey);
        }
        Ok(out)
    }

    /// TPM2_Create of a signing key; `auth` is its authValue (sent encrypted, through the
    /// salted session), `None` for an empty one.
    fn create(&mut self, purpose: KeyPurpose, auth: Option<&[u8]>) -> Op<(Public, Private)> {
        let template = tss("building the key template", key_template(purpose))?;
        let srk = self.srk()?;
        let result = match auth {
            Some(auth) => {
                let auth = tss("preparing the key's authorization", Auth::try_from(auth))?;
                self.with_auth(srk.into(), &[], true, "creating a key (TPM2_Create)", |c| {
                    c.create(srk, template, Some(auth), None, None, None)
                })?
            }
            None => tss(
                "creating a key (TPM2_Create)",
                self.ctx()?
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.create(srk, template, None, None, None, None)
                    }),
            )?,
        };
        Ok((result.out_public, result.out_private))
    }
}

fn ascii4(v: u32) -> String {
    v.to_be_bytes()
        .iter()
        .filter(|b| **b != 0)
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                char::from(*b)
            } else {
                '?'
            }
        })
        .collect()
}

/// True for TPMs that are software: swtpm and the reference simulator report manufacturer
/// "IBM" (no TPM chip carries it) and vendor "SW TPM"; the swtpm and mssim TCTIs only talk to
/// simulators.
pub fn is_simulator(manufacturer: &str, vendor: &str, tcti: &str) -> bool {
    let tcti_kind = tcti.split(':').next().unwrap_or("");
    manufacturer.eq_ignore_ascii_case("IBM")
        || vendor.eq_ignore_ascii_case("SW TPM")
        || matches!(tcti_kind, "swtpm" | "mssim")
}

/// The TPM, shared by every key of one store.
pub struct Device {
    tcti: String,
    conn: Mutex<Option<Conn>>,
    signatures: AtomicU64,
    /// The owner hierarchy's authorization, for TPM2_CreatePrimary and TPM2_EvictControl
    /// (only `persist_srk` sets it; the store itself runs with an empty one).
    owner_auth: Zeroizing<Vec<u8>>,
}

crate::redact::debug_shows!(Device: tcti);

impl Device {
    /// A device for a TCTI string; connects on first use.
    pub fn new(tcti: &str) -> Self {
        Self {
            tcti: tcti.to_string(),
            conn: Mutex::new(None),
            signatures: AtomicU64::new(0),
            owner_auth: Zeroizing::new(Vec::new()),
        }
    }

    /// The TCTI string.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// How many TPM2_Sign commands this device sent.
    pub fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }

    /// Opens a connection and derives the SRK; `flush_first` empties the TPM's transient
    /// objects first (after it ran out of object memory).
    fn connect(&self, flush_first: bool) -> Result<Conn> {
        // OpenSSL is initialised fully (once per process) before the TSS library first uses
        // it (it makes and frees OpenSSL library contexts of its own). Without this, after
        // opening a persistent SRK, the host process could no longer build an EC public key
        // (`pkcs11-tool --read-object --type pubkey`: "cannot create EVP_PKEY").
        openssl::init();
        let conf = TctiNameConf::from_str(&self.tcti).map_err(|_| {
            BackendError::Unusable(format!(
                "bad TPM TCTI {:?}; use device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321 or tabrmd",
                self.tcti
            ))
        })?;
        if let Some(path) = self.tcti.strip_prefix("device:") {
            let path = if path.is_empty() { "/dev/tpm0" } else { path };
            if let Err(e) = std::fs::metadata(path) {
                return Err(BackendError::Unreachable(format!(
                    "TPM not reachable at {}: {path}: {e}; fix: enable the TPM in the firmware setup and load the kernel driver (tpm_crb or tpm_tis), or set tcti / DEVICEKEY_TPM_TCTI",
                    self.tcti
                )));
            }
        }
        let ctx = Context::new(conf).map_err(|e| {
            let hint = if self.tcti.starts_with("device:") {
                "fix: check that you may open the device (add the user to the tss group)"
            } else if self.tcti.starts_with("swtpm") || self.tcti.starts_with("mssim") {
                "fix: start the simulator (scripts/swtpm.sh start) and check host and port"
            } else {
                "fix: check that the resource manager runs"
            };
            BackendError::Unreachable(format!("TPM not reachable at {}: {e}; {hint}", self.tcti))
        })?;
        let mut conn = Conn {
            pid: std::process::id(),
            ctx: Some(ctx),
            srk: None,
            srk_source: SrkSource::Derived(String::new()),
            srk_fingerprint: [0; 8],
            loaded: VecDeque::new(),
            pin_session: None,
            pin_session_salted: false,
            dead: false,
            endorsement: None,
            owner_auth: self.owner_auth.clone(),
        };
        let setup = |conn: &mut Conn| -> Op<()> {
            let (mut started, mut flushed) = (false, flush_first);
            if flush_first {
                conn.flush_transient()?;
            }
            loop {
                match conn.create_srk() {
                    Ok(()) => return Ok(()),
                    Err(Fail::Tss(_, e)) if tpm_code(raw_rc(&e)) == RC_INITIALIZE && !started => {
                        // A TPM that was never started (a bare simulator): start it.
                        log::info!("tpm: running TPM2_Startup(CLEAR)");
                        started = true;
                        tss("TPM2_Startup", conn.ctx()?.startup(StartupType::Clear))?;
                    }
                    Err(Fail::Tss(_, e)) if is_out_of_memory(&e) && !flushed => {
                        flushed = true;
                        conn.flush_transient()?;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match setup(&mut conn) {
            Ok(()) => Ok(conn),
            Err(e) => {
                conn.dead = is_transport_error(&e);
                Err(self.error(e))
            }
        }
    }

    fn error(&self, e: Fail) -> BackendError {
        let (what, e) = match e {
            Fail::Other(e) => return e,
            Fail::WrongKey => {
                return BackendError::Crypto(
                    "the TPM's signature does not verify with the key's public point".into(),
                )
            }
            Fail::Refused(what, e) => {
                return BackendError::Refused(format!("{what}: {e} ({:#x})", raw_rc(&e)))
            }
            Fail::Tss(what, e) => (what, e),
        };
        let rc = raw_rc(&e);
        let code = tpm_code(rc);
        match layer(rc) {
            LAYER_TCTI | LAYER_RESMGR => {
                return BackendError::Unreachable(format!(
                    "TPM not reachable at {}: {what}: {e} ({rc:#x})",
                    self.tcti
                ))
            }
            _ => {}
        }
        let msg = format!("{what}: {e} ({rc:#x})");
        match code {
            RC_OBJECT_MEMORY | RC_SESSION_MEMORY | RC_MEMORY => BackendError::Full(msg),
            RC_LOCKOUT => BackendError::Refused(format!(
                "{msg}; the TPM is in dictionary-attack lockout, wait or reset it (tpm2_dictionarylockout)"
            )),
            // TPM_RC_AUTH_FAIL, TPM_RC_BAD_AUTH (format one).
            0x8e | 0xa2 => BackendError::Auth(format!(
                "{msg}; the owner hierarchy has a password: persist the SRK once with \
                 `devicekey tpm persist-srk` (owner_auth_env or owner_auth_file in the slot), \
                 then the store needs no owner authorization"
            )),
            // TPM_RC_INTEGRITY: the blob was made under another SRK (another TPM, or a cleared one).
            0x9f => BackendError::Refused(format!(
                "{msg}; the key blob does not belong to this TPM (was the TPM cleared?)"
            )),
            _ => BackendError::Refused(msg),
        }
    }

    /// Runs `op` on the connection, connecting first if needed; a dropped connection is
    /// reopened once and `op` retried.
    fn with_conn<T>(&self, mut op: impl FnMut(&mut Conn) -> Op<T>) -> Result<T> {
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| BackendError::Unusable("the TPM connection lock is poisoned".into()))?;
        let pid = std::process::id();
        if guard.as_ref().is_some_and(|c| c.pid != pid) {
            log::info!("tpm: new process after fork; opening a new TPM connection");
            *guard = None;
        }
        // Up to three tries: a stale connection, then a TPM full of other clients' objects.
        let mut attempt = 0;
        let mut flush_first = false;
        loop {
            attempt += 1;
            let fresh = guard.is_none();
            let conn = match guard.as_mut() {
                Some(conn) => conn,
                None => guard.insert(self.connect(flush_first)?),
            };
            let e = match op(conn) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retry = attempt < 3 && worth_reconnecting(&e, fresh);
            if retry || is_transport_error(&e) {
                // Drop the connection; a dead transport gets no flushes.
                conn.dead = is_transport_error(&e);
                *guard = None;
            }
            if !retry {
                return Err(self.error(e));
            }
            flush_first = is_full(&e);
            let why = match &e {
                Fail::Tss(what, err) | Fail::Refused(what, err) => format!("{what}: {err}"),
                Fail::WrongKey => "a signature did not verify: a handle named another key".into(),
                Fail::Other(err) => err.to_string(),
            };
            if flush_first {
                log::warn!("tpm: TPM out of object memory ({why}); reconnecting to an emptied TPM");
            } else {
                log::warn!(
                    "tpm: connection to {} lost or stale ({why}); reconnecting",
                    self.tcti
                );
            }
        }
    }

    /// What the TPM says about itself (connects if needed).
    pub fn identity(&self) -> Result<Identity> {
        let tcti = self.tcti.clone();
        self.with_conn(|c| c.identity(&tcti))
    }

    /// Creates a P-256 signing key under the SRK, its purpose bound into its public area and
    /// `auth` as its authValue (`None`: empty).
    pub fn create(&self, name: &str, purpose: KeyPurpose, auth: Option<&[u8]>) -> Result<TpmKey> {
        let (public, private) = self.with_conn(|c| c.create(purpose, auth))?;
        Ok(TpmKey::new(name, public, private))
    }

    /// Signs a digest (ECDSA, SHA-256 scheme) with a key whose authValue is empty; returns raw
    /// `r‖s`.
    pub fn sign(&self, key: &TpmKey, digest: &[u8; 32]) -> Result<[u8; 64]> {
        self.sign_with_auth(key, digest, None)
    }

    /// Signs a digest with a key whose authValue is `auth` (`None`: empty). A wrong authValue
    /// is `PinIncorrect`, a TPM in lockout `PinLocked`; neither is retried.
    pub fn sign_with_auth(
        &self,
        key: &TpmKey,
        digest: &[u8; 32],
        auth: Option<&[u8]>,
    ) -> Result<[u8; 64]> {
        let start = Instant::now();
        let sig = self.with_conn(|c| c.sign(key, digest, auth))?;
        self.signatures.fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "tpm: signed with {} in {:.1} ms",
            key.name,
            start.elapsed().as_secs_f64() * 1e3
        );
        Ok(sig)
    }

    /// The key's private area re-protected under the authValue `new` (TPM2_ObjectChangeAuth,
    /// authorized with `old`); the same key, another blob.
    pub fn change_auth(&self, key: &TpmKey, old: &[u8], new: &[u8]) -> Result<TpmKey> {
        let private = self.with_conn(|c| c.change_auth(key, old, new))?;
        Ok(TpmKey::new(&key.name, key.public.clone(), private))
    }

    /// Creates a PIN check object with authValue `auth` (see the `auth` module).
    pub fn create_check(&self, name: &str, auth: &[u8]) -> Result<TpmKey> {
        let (public, private) = self.with_conn(|c| c.create_check(auth))?;
        Ok(TpmKey::new(name, public, private))
    }

    /// Proves `auth` against a PIN check object, under the TPM's dictionary-attack counter.
    pub fn verify_check(&self, check: &TpmKey, auth: &[u8]) -> Result<()> {
        self.with_conn(|c| c.verify_check(check, auth))
    }

    /// The TPM's dictionary-attack state.
    pub fn lockout(&self) -> Result<Lockout> {
        self.with_conn(Conn::lockout)
    }

    /// The EK attestation uses and its certificates (found once per connection).
    pub fn endorsement(&self) -> Result<Endorsement> {
        self.with_conn(|c| c.endorsement())
    }

    /// Creates an attestation key under the EK.
    pub fn create_ak(&self) -> Result<AkParts> {
        self.with_conn(|c| {
            let ek = c.endorsement()?;
            c.create_ak(&ek)
        })
    }

    /// TPM2_Certify of `key` (authValue `auth`, `None`: empty) by the AK, with `qualifying` as
    /// qualifying data. `ek_name` is the name of the EK the AK was made under; the call fails if
    /// the TPM's EK is another.
    pub fn certify(
        &self,
        ek_name: &[u8],
        ak: &AkParts,
        key: &TpmKey,
        auth: Option<&[u8]>,
        qualifying: &[u8; 32],
    ) -> Result<(Endorsement, Certified)> {
        self.with_conn(|c| {
            let ek = c.endorsement()?;
            if ek.name() != ek_name {
                return Err(Fail::Other(BackendError::Refused(
                    "the attestation key was made under another EK".into(),
                )));
            }
            let certified = c.certify(&ek, ak, key, auth, qualifying)?;
            Ok((ek, certified))
        })
    }

    /// TPM2_ActivateCredential with the AK and the EK; returns the secret.
    pub fn activate(
        &self,
        ak: &AkParts,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        self.with_conn(|c| {
            let ek = c.endorsement()?;
            c.activate(&ek, ak, id_object, encrypted_secret)
        })
    }

    /// Makes the SRK persistent at [`PERSISTENT_SRK`] with the owner hierarchy's
    /// authorization (empty when the owner has none), then disconnects so that the next
    /// connection uses it.
    pub fn persist_srk(tcti: &str, owner_auth: &[u8]) -> Result<PersistOutcome> {
        let device = Self {
            owner_auth: Zeroizing::new(owner_auth.to_vec()),
            ..Self::new(tcti)
        };
        let outcome = device.with_conn(Conn::persist_srk);
        device.disconnect();
        outcome
    }

    /// Flushes a key from the cache, if it is loaded; never connects.
    pub fn forget(&self, name: &str) {
        if let Ok(mut guard) = self.conn.lock() {
            if let Some(conn) = guard.as_mut() {
                if conn.pid == std::process::id() && !conn.dead {
                    conn.forget(name);
                }
            }
        }
    }

    /// Closes the connection (flushing our objects); the next call reconnects.
    pub fn disconnect(&self) {
        if let Ok(mut guard) = self.conn.lock() {
            *guard = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed32_pads_and_strips() {
        assert_eq!(fixed32(&[1]).unwrap()[31], 1);
        let mut long = vec![0, 0];
        long.extend([9u8; 32]);
        assert_eq!(fixed32(&long).unwrap(), [9u8; 32]);
        assert!(fixed32(&[1u8; 33]).is_none());
    }

    #[test]
    fn simulator_detection() {
        assert!(is_simulator("IBM", "SW TPM", "device:/dev/tpmrm0"));
        assert!(is_simulator("XYZ", "", "swtpm:port=1"));
        assert!(!is_simulator("IFX", "SLB9670", "device:/dev/tpmrm0"));
        assert!(!is_simulator("MSFT", "", "tabrmd"));
    }

    #[test]
    fn codes() {
        assert_eq!(tpm_code(0x902), RC_OBJECT_MEMORY);
        assert_eq!(tpm_code(0x18b), 0x8b);
        assert_eq!(tpm_code(0x9a2), 0xa2);
        assert_eq!(tpm_code(0xa000a), 0);
        assert_eq!(layer(0xa000a), LAYER_TCTI);
        assert_eq!(ascii4(0x4942_4D00), "IBM");
    }

    #[test]
    fn srk_template_is_recognised_and_others_are_not() {
        assert_eq!(srk_mismatch(&srk_template().unwrap()), None);
        let signing = key_template(KeyPurpose::Proof).unwrap();
        let why = srk_mismatch(&signing).unwrap();
        assert!(why.contains("attributes"), "{why}");
    }

    #[test]
    fn templates_build() {
        srk_template().unwrap();
        let t = key_template(KeyPurpose::Proof).unwrap();
        assert!(t.object_attributes().sign_encrypt());
        assert_eq!(
            binding(t.auth_policy().value()),
            Binding::Bound(KeyPurpose::Proof)
        );
        assert!(t.object_attributes().fixed_tpm());
    }
}
