//! The software signer: ECDSA P-256 over a caller-supplied digest with system OpenSSL.
//!
//! The private key is parsed into an OpenSSL `EC_KEY` once per key, on the first signature (so
//! loading many keys stays cheap), and then reused. The raw scalar bytes are wiped as soon as the
//! `EC_KEY` exists; OpenSSL frees its private `BIGNUM` with `BN_clear_free`. OpenSSL's P-256
//! code leaves scalar bytes in its dead stack frames, so building and generating a key are
//! followed by wiping the stack they used (see [`scrubbed`]).

use std::sync::{Mutex, OnceLock};

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Private;
use zeroize::{Zeroize, Zeroizing};

use crate::backend::{BackendError, Result, Signer};

fn crypto(what: &str, e: openssl::error::ErrorStack) -> BackendError {
    BackendError::Crypto(format!("{what}: {e}"))
}

/// The P-256 group, built once.
fn group() -> Result<&'static EcGroup> {
    static GROUP: OnceLock<EcGroup> = OnceLock::new();
    if let Some(g) = GROUP.get() {
        return Ok(g);
    }
    let g =
        EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(|e| crypto("P-256 group", e))?;
    Ok(GROUP.get_or_init(|| g))
}

/// Signs with one software key.
pub struct SoftwareSigner {
    public_point: [u8; 65],
    key: OnceLock<EcKey<Private>>,
    /// The scalar until `key` is built; `None` afterwards. Boxed (see [`Generated::scalar`]).
    scalar: Mutex<Option<Box<Zeroizing<[u8; 32]>>>>,
}

/// A freshly generated key pair.
pub struct Generated {
    /// The signer, with its key already parsed.
    pub signer: SoftwareSigner,
    /// SEC1 uncompressed public point.
    pub public_point: [u8; 65],
    /// The private scalar, for writing to the key file. Boxed: moving it moves a pointer, so no
    /// copy of the scalar is left in a dead stack frame.
    pub scalar: Box<Zeroizing<[u8; 32]>>,
}

impl SoftwareSigner {
    /// A signer that parses `scalar` on its first signature (and checks it against the point).
    pub fn deferred(public_point: [u8; 65], scalar: Box<Zeroizing<[u8; 32]>>) -> Self {
        Self {
            public_point,
            key: OnceLock::new(),
            scalar: Mutex::new(Some(scalar)),
        }
    }

    /// Generates a new P-256 key pair.
    pub fn generate() -> Result<Generated> {
        scrubbed(Self::generate_unscrubbed)
    }

    fn generate_unscrubbed() -> Result<Generated> {
        let group = group()?;
        let key = EcKey::generate(group).map_err(|e| crypto("generating a P-256 key", e))?;
        let mut scalar = Box::new(Zeroizing::new([0u8; 32]));
        {
            let bytes = Zeroizing::new(
                key.private_key()
                    .to_vec_padded(32)
                    .map_err(|e| crypto("encoding the private key", e))?,
            );
            scalar.copy_from_slice(&bytes);
        }
        let public_point = encode_point(group, &key)?;
        let signer = Self {
            public_point,
            key: OnceLock::from(key),
            scalar: Mutex::new(None),
        };
        Ok(Generated {
            signer,
            public_point,
            scalar,
        })
    }

    /// The parsed key, built on first use.
    fn key(&self) -> Result<&EcKey<Private>> {
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let mut slot = self
            .scalar
            .lock()
            .map_err(|_| BackendError::Crypto("signer lock poisoned".into()))?;
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let scalar = slot
            .as_ref()
            .ok_or_else(|| BackendError::Crypto("private key unavailable".into()))?;
        let key = build_checked(&self.public_point, scalar)?;
        *slot = None;
        Ok(self.key.get_or_init(|| key))
    }
}

/// Bytes of stack wiped after OpenSSL has worked with a private scalar: its P-256 code leaves
/// scalar bytes in dead stack frames (seen: the low 8 bytes of the scalar after
/// `EC_KEY_check_key`, until later calls happen to overwrite them). Building, checking, signing
/// with and generating a key use under 4 KiB of stack below the caller here.
const STACK_SCRUB: usize = 16 * 1024;

/// Runs `f`, then overwrites the stack that `f` and its callees used.
#[inline(never)]
fn scrubbed<T>(f: impl FnOnce() -> T) -> T {
    let out = f();
    scrub_stack();
    out
}

/// Zeroes `STACK_SCRUB` bytes just below the caller's frame, where the callee frames were.
#[inline(never)]
fn scrub_stack() {
    let mut area = [0u8; STACK_SCRUB];
    area.zeroize();
    std::hint::black_box(&area);
}

fn encode_point(group: &EcGroup, key: &EcKey<Private>) -> Result<[u8; 65]> {
    let mut ctx = BigNumContext::new().map_err(|e| crypto("BN_CTX", e))?;
    let bytes = key
        .public_key()
        .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)
        .map_err(|e| crypto("encoding the public point", e))?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| BackendError::Crypto("public point is not 65 bytes".into()))
}

/// Builds an `EC_KEY` from the scalar and checks that it matches the stored public point.
fn build_key(public_point: &[u8; 65], scalar: &[u8; 32]) -> Result<EcKey<Private>> {
    let group = group()?;
    let mut ctx = BigNumContext::new().map_err(|e| crypto("BN_CTX", e))?;
    let point = EcPoint::from_bytes(group, public_point, &mut ctx)
        .map_err(|e| crypto("stored public point is invalid", e))?;
    let mut d = BigNum::from_slice(scalar).map_err(|e| crypto("private scalar", e))?;
    // EC_KEY_set_private_key copies `d`; wipe our copy whatever happens.
    let key = EcKey::from_private_components(group, &d, &point);
    d.clear();
    let key = key.map_err(|e| crypto("private key is invalid", e))?;
    key.check_key()
        .map_err(|e| crypto("private key does not match its public point", e))?;
    Ok(key)
}

/// [`build_key`] with the stack it used wiped afterwards (for the store with a PIN, whose
/// scalars come out of their sealed form on first use).
pub(super) fn build_checked(public_point: &[u8; 65], scalar: &[u8; 32]) -> Result<EcKey<Private>> {
    scrubbed(|| build_key(public_point, scalar))
}

impl Signer for SoftwareSigner {
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        sign_with(self.key()?, digest)
    }
}

/// Signs a digest with a parsed key; raw `r‖s`, each half left-padded.
pub(super) fn sign_with(key: &EcKey<Private>, digest: &[u8; 32]) -> Result<[u8; 64]> {
    let sig = EcdsaSig::sign(digest, key).map_err(|e| crypto("ECDSA signing", e))?;
    let r = sig
        .r()
        .to_vec_padded(32)
        .map_err(|e| crypto("encoding r", e))?;
    let s = sig
        .s()
        .to_vec_padded(32)
        .map_err(|e| crypto("encoding s", e))?;
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&r);
    out[32..].copy_from_slice(&s);
    Ok(out)
}
