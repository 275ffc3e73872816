//! Any PKCS#11 module by path: loaded, initialized and logged in to through the library's client
//! layer (`devicekey_pkcs11::p11`); finding and making keys, reading the public point, and
//! checking signatures against it with the `p256` crate. The timed loops call `cryptoki` directly.

use std::path::PathBuf;
use std::sync::Arc;

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use devicekey_pkcs11::encoding::{self, P256_EC_PARAMS};
use devicekey_pkcs11::p11::{self as client, ModuleClient};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};

use crate::{BenchError, Ctx, Result};

/// Which module and token to measure.
#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// The PKCS#11 module (shared object) to load.
    #[arg(long)]
    pub module: PathBuf,
    /// The token label to use; the first token when absent.
    #[arg(long)]
    pub token: Option<String>,
    /// The environment variable that holds the user PIN; no login when absent.
    #[arg(long)]
    pub pin_env: Option<String>,
    /// The name of this subject in the output (`ours`, `softhsm`...).
    #[arg(long)]
    pub name: String,
}

/// An initialized module with its token's slot (and a logged-in session when a PIN is given:
/// PKCS#11 keeps the login while one session of the application is open).
pub struct Module {
    /// The session that holds the login. Declared first so that it closes before the context.
    _login: Option<Session>,
    /// The context.
    pub ctx: Pkcs11,
    /// The token's slot.
    pub slot: Slot,
    /// The process-wide client that owns the context (finalized when the last user goes).
    _client: Arc<ModuleClient>,
}

impl Module {
    /// Loads and initializes the module, finds the token, logs in when asked.
    pub fn open(t: &Target) -> Result<Module> {
        let p11_err = |e: client::Error| BenchError::Other(e.to_string());
        let module = client::registry::open(&t.module).map_err(p11_err)?;
        let ctx = module.context().clone();
        let slot = match t.token.as_deref() {
            Some(label) => {
                client::token::find_by_label(&module, label)
                    .map_err(p11_err)?
                    .0
            }
            None => find_slot(&ctx, None)?,
        };
        let pin = client::pin::read("the bench", t.pin_env.as_deref(), None).map_err(p11_err)?;
        let login = match pin {
            Some(pin) => {
                let s = ctx.open_rw_session(slot).ctx("C_OpenSession")?;
                s.login(UserType::User, Some(&AuthPin::from(pin.secret.to_string())))
                    .ctx("C_Login")?;
                Some(s)
            }
            None => None,
        };
        Ok(Module {
            _login: login,
            ctx,
            slot,
            _client: module,
        })
    }

    /// A new read-write session.
    pub fn session(&self) -> Result<Session> {
        self.ctx.open_rw_session(self.slot).ctx("C_OpenSession")
    }
}

/// The slot of the token labelled `token`, or the first slot with a token.
pub fn find_slot(ctx: &Pkcs11, token: Option<&str>) -> Result<Slot> {
    let slots = ctx.get_slots_with_token().ctx("C_GetSlotList")?;
    match token {
        None => slots
            .first()
            .copied()
            .ok_or_else(|| BenchError::Other("the module lists no token".into())),
        Some(label) => {
            for slot in slots {
                let info = ctx.get_token_info(slot).ctx("C_GetTokenInfo")?;
                if info.label().trim_end() == label {
                    return Ok(slot);
                }
            }
            Err(BenchError::Other(format!("no token labelled {label:?}")))
        }
    }
}

/// The one object of `class` labelled `label`.
pub fn find_labelled(s: &Session, class: ObjectClass, label: &str) -> Result<Option<ObjectHandle>> {
    let found = s
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .ctx("C_FindObjects")?;
    Ok(found.first().copied())
}

/// The private and public key labelled `label`.
pub fn key_pair(s: &Session, label: &str) -> Result<(ObjectHandle, ObjectHandle)> {
    let private = find_labelled(s, ObjectClass::PRIVATE_KEY, label)?;
    let public = find_labelled(s, ObjectClass::PUBLIC_KEY, label)?;
    match (private, public) {
        (Some(p), Some(q)) => Ok((p, q)),
        _ => Err(BenchError::Other(format!(
            "no key pair labelled {label:?} (run the keygen step)"
        ))),
    }
}

/// Makes a persistent P-256 key pair labelled `label` unless one exists; returns its CKA_ID.
pub fn ensure_key(m: &Module, label: &str) -> Result<Vec<u8>> {
    let s = m.session()?;
    if let Ok((_, public)) = key_pair(&s, label) {
        return Ok(attribute_bytes(&s, public, AttributeType::Id)?.unwrap_or_default());
    }
    let mut id = vec![0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| BenchError::Other(format!("getrandom: {e}")))?;
    let common = [
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let mut public = common.to_vec();
    public.push(Attribute::EcParams(P256_EC_PARAMS.to_vec()));
    public.push(Attribute::Verify(true));
    let mut private = common.to_vec();
    private.push(Attribute::Sign(true));
    private.push(Attribute::Sensitive(true));
    s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .ctx("C_GenerateKeyPair")?;
    Ok(id)
}

/// The raw bytes of one attribute, `None` when the object has none.
pub fn attribute_bytes(s: &Session, h: ObjectHandle, t: AttributeType) -> Result<Option<Vec<u8>>> {
    let attrs = s.get_attributes(h, &[t]).ctx("C_GetAttributeValue")?;
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::Id(v) | Attribute::EcPoint(v) | Attribute::Label(v) => Some(v),
        _ => None,
    }))
}

/// The SEC1 point (`04‖X‖Y`) of a CKA_EC_POINT value (DER OCTET STRING or bare).
pub fn decode_point(value: &[u8]) -> Result<Vec<u8>> {
    encoding::decode_ec_point(value)
        .map(|p| p.to_vec())
        .map_err(|e| BenchError::Other(format!("CKA_EC_POINT: {e}")))
}

/// Checks signatures of one key.
pub struct Verifier(VerifyingKey);

impl Verifier {
    /// A verifier for the SEC1 point `point`.
    pub fn from_point(point: &[u8]) -> Result<Self> {
        VerifyingKey::from_sec1_bytes(point)
            .map(Verifier)
            .map_err(|e| BenchError::Other(format!("bad public point: {e}")))
    }

    /// A verifier for the key whose public half is `public`.
    pub fn from_object(s: &Session, public: ObjectHandle) -> Result<Self> {
        let value = attribute_bytes(s, public, AttributeType::EcPoint)?
            .ok_or_else(|| BenchError::Other("the public key has no CKA_EC_POINT".into()))?;
        Self::from_point(&decode_point(&value)?)
    }

    /// Checks a raw `r‖s` signature over a 32-byte digest.
    pub fn check_raw(&self, digest: &[u8; 32], sig: &[u8]) -> Result<()> {
        let sig = Signature::from_slice(sig).map_err(|e| {
            BenchError::Invalid(format!(
                "not a 64-byte r||s signature ({} bytes): {e}",
                sig.len()
            ))
        })?;
        self.0
            .verify_prehash(digest, &sig)
            .map_err(|_| BenchError::Invalid("a signature does not verify".into()))
    }

    /// Checks a DER signature over `message` (hashed with SHA-256).
    pub fn check_der(&self, message: &[u8], der: &[u8]) -> Result<()> {
        use p256::ecdsa::signature::Verifier as _;
        let sig = Signature::from_der(der)
            .map_err(|e| BenchError::Invalid(format!("not a DER ECDSA signature: {e}")))?;
        self.0
            .verify(message, &sig)
            .map_err(|_| BenchError::Invalid("a signature does not verify".into()))
    }
}
