//! Sessions and their operation state machines: find, sign, verify, digest.
//!
//! Each session sits behind its own mutex, so two sessions sign in parallel. The rules here are
//! the ones consumers punish: a length query (no output buffer) answers the length and keeps the
//! operation; `CKR_BUFFER_TOO_SMALL` keeps it too; any other end, success or error, closes it.

use std::sync::Arc;

use cryptoki_sys::*;
use p256::ecdsa::signature::hazmat::PrehashVerifier;

use super::error::{fail, Error, Result};
use super::mechanism::{normalize_digest, Hasher, SIGNATURE_LEN};
use super::object::Object;
use crate::backend::KeyPurpose;

/// The most data a proof-only key accepts in one signature (the payload is validated whole).
pub const MAX_PROOF_BYTES: usize = 64 * 1024;

/// The state of one session.
pub struct Session {
    /// This session's handle.
    pub handle: CK_SESSION_HANDLE,
    /// Index of its slot.
    pub slot: usize,
    /// CKF_RW_SESSION.
    pub rw: bool,
    /// C_FindObjects state.
    pub find: Option<FindState>,
    /// C_Sign state.
    pub sign: Option<SignOp>,
    /// C_Verify state.
    pub verify: Option<VerifyOp>,
    /// C_Digest state.
    pub digest: Option<DigestOp>,
}

/// The results of C_FindObjectsInit, handed out by C_FindObjects.
pub struct FindState {
    /// The matching handles.
    pub results: Vec<CK_OBJECT_HANDLE>,
    /// How many were handed out.
    pub pos: usize,
}

/// A running signature or verification.
pub struct SignOp {
    mech: CK_MECHANISM_TYPE,
    key: Arc<Object>,
    hasher: Option<Hasher>,
    data: Vec<u8>,
    multipart: bool,
}

/// A running verification.
pub struct VerifyOp(SignOp);

/// A running digest.
pub struct DigestOp {
    hasher: Hasher,
    multipart: bool,
}

/// Checks proof-only signing input; provided by the token (it knows the policy).
pub type ProofCheck<'a> = &'a dyn Fn(&[u8]) -> Result<()>;

/// Writes `value` into `out` following the length-query rules; `None` means a length query.
fn deliver(value: &[u8], out: Option<&mut [u8]>) -> Result<usize> {
    match out {
        None => Ok(value.len()),
        Some(buf) if buf.len() < value.len() => Err(Error::buffer_too_small(value.len())),
        Some(buf) => {
            buf[..value.len()].copy_from_slice(value);
            Ok(value.len())
        }
    }
}

/// True when the caller's output cannot take a signature (a length query or a short buffer);
/// in that case the answer is given without signing.
fn length_only(out: &Option<&mut [u8]>) -> Option<Result<usize>> {
    match out {
        None => Some(Ok(SIGNATURE_LEN)),
        Some(buf) if buf.len() < SIGNATURE_LEN => Some(Err(Error::buffer_too_small(SIGNATURE_LEN))),
        Some(_) => None,
    }
}

impl SignOp {
    /// Starts signing (or verifying, with `for_verify`) with a key.
    pub fn new(mech: CK_MECHANISM_TYPE, key: Arc<Object>, for_verify: bool) -> Result<Self> {
        let allowed = if for_verify {
            key.attrs.get_bool(CKA_VERIFY) || key.class == CKO_PRIVATE_KEY
        } else {
            key.class == CKO_PRIVATE_KEY && key.attrs.get_bool(CKA_SIGN)
        };
        if !allowed || key.public_point.is_none() {
            return fail(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        if !matches!(
            mech,
            CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 | CKM_ECDSA_SHA512
        ) {
            return fail(CKR_MECHANISM_INVALID);
        }
        if !for_verify && key.purpose == KeyPurpose::Proof && mech != CKM_ECDSA_SHA256 {
            log::info!("a proof-only key signs only with CKM_ECDSA_SHA256");
            return fail(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        Ok(Self {
            mech,
            hasher: Hasher::for_mechanism(mech),
            key,
            data: Vec::new(),
            multipart: false,
        })
    }

    fn keeps_data(&self, for_verify: bool) -> bool {
        self.hasher.is_none() || (!for_verify && self.key.purpose == KeyPurpose::Proof)
    }

    fn feed(&mut self, data: &[u8], for_verify: bool) -> Result<()> {
        if self.keeps_data(for_verify) {
            let limit = if self.hasher.is_none() {
                64
            } else {
                MAX_PROOF_BYTES
            };
            if self.data.len() + data.len() > limit {
                return fail(CKR_DATA_LEN_RANGE);
            }
            self.data.extend_from_slice(data);
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(data);
        }
        Ok(())
    }

    /// The 32-byte value to sign or verify, after the proof check for proof-only keys.
    fn digest(&mut self, proof: ProofCheck<'_>, for_verify: bool) -> Result<[u8; 32]> {
        if !for_verify && self.key.purpose == KeyPurpose::Proof {
            proof(&self.data)?;
        }
        match self.hasher.take() {
            Some(h) => normalize_digest(&h.finish()),
            None => normalize_digest(&self.data),
        }
    }

    fn sign_now(&mut self, proof: ProofCheck<'_>, out: &mut [u8]) -> Result<usize> {
        let digest = self.digest(proof, false)?;
        let signer = match &self.key.signer {
            Some(s) => s,
            None => return fail(CKR_KEY_FUNCTION_NOT_PERMITTED),
        };
        let sig = signer.sign_digest(&digest)?;
        out[..SIGNATURE_LEN].copy_from_slice(&sig);
        Ok(SIGNATURE_LEN)
    }

    fn verify_now(&mut self, signature: &[u8]) -> Result<()> {
        if signature.len() != SIGNATURE_LEN {
            return fail(CKR_SIGNATURE_LEN_RANGE);
        }
        let digest = self.digest(&|_| Ok(()), true)?;
        let point = match self.key.public_point {
            Some(p) => p,
            None => return fail(CKR_KEY_HANDLE_INVALID),
        };
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
            .map_err(|_| Error::rv(CKR_KEY_HANDLE_INVALID))?;
        let sig = p256::ecdsa::Signature::from_slice(signature)
            .map_err(|_| Error::rv(CKR_SIGNATURE_INVALID))?;
        key.verify_prehash(&digest, &sig)
            .map_err(|_| Error::rv(CKR_SIGNATURE_INVALID))
    }

    /// The mechanism.
    pub fn mechanism(&self) -> CK_MECHANISM_TYPE {
        self.mech
    }
}

/// Ends an operation unless the result says it must stay alive.
fn settle<T>(slot: &mut Option<T>, result: &Result<usize>, length_query: bool) {
    let keep = length_query || matches!(result, Err(e) if e.rv == CKR_BUFFER_TOO_SMALL);
    if !keep {
        *slot = None;
    }
}

impl Session {
    /// A new session.
    pub fn new(handle: CK_SESSION_HANDLE, slot: usize, rw: bool) -> Self {
        Self {
            handle,
            slot,
            rw,
            find: None,
            sign: None,
            verify: None,
            digest: None,
        }
    }

    /// C_SignInit.
    pub fn sign_init(&mut self, mech: CK_MECHANISM_TYPE, key: Arc<Object>) -> Result<()> {
        if self.sign.is_some() {
            return fail(CKR_OPERATION_ACTIVE);
        }
        self.sign = Some(SignOp::new(mech, key, false)?);
        Ok(())
    }

    /// C_Sign. `out = None` asks for the length only.
    pub fn sign(
        &mut self,
        data: &[u8],
        out: Option<&mut [u8]>,
        proof: ProofCheck<'_>,
    ) -> Result<usize> {
        let op = self
            .sign
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.multipart {
            self.sign = None;
            return fail(CKR_FUNCTION_FAILED);
        }
        let length_query = out.is_none();
        let result = match length_only(&out) {
            Some(r) => r,
            None => {
                let buf = out.unwrap_or_default();
                op.feed(data, false).and_then(|_| op.sign_now(proof, buf))
            }
        };
        settle(&mut self.sign, &result, length_query);
        result
    }

    /// C_SignUpdate.
    pub fn sign_update(&mut self, data: &[u8]) -> Result<()> {
        let op = self
            .sign
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        op.multipart = true;
        let r = op.feed(data, false);
        if r.is_err() {
            self.sign = None;
        }
        r
    }

    /// C_SignFinal. `out = None` asks for the length only.
    pub fn sign_final(&mut self, out: Option<&mut [u8]>, proof: ProofCheck<'_>) -> Result<usize> {
        let op = self
            .sign
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let length_query = out.is_none();
        let result = match length_only(&out) {
            Some(r) => r,
            None => op.sign_now(proof, out.unwrap_or_default()),
        };
        settle(&mut self.sign, &result, length_query);
        result
    }

    /// C_VerifyInit.
    pub fn verify_init(&mut self, mech: CK_MECHANISM_TYPE, key: Arc<Object>) -> Result<()> {
        if self.verify.is_some() {
            return fail(CKR_OPERATION_ACTIVE);
        }
        self.verify = Some(VerifyOp(SignOp::new(mech, key, true)?));
        Ok(())
    }

    /// C_Verify. Always ends the operation.
    pub fn verify(&mut self, data: &[u8], signature: &[u8]) -> Result<()> {
        let mut op = self
            .verify
            .take()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.0.multipart {
            return fail(CKR_FUNCTION_FAILED);
        }
        op.0.feed(data, true)?;
        op.0.verify_now(signature)
    }

    /// C_VerifyUpdate.
    pub fn verify_update(&mut self, data: &[u8]) -> Result<()> {
        let op = self
            .verify
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        op.0.multipart = true;
        let r = op.0.feed(data, true);
        if r.is_err() {
            self.verify = None;
        }
        r
    }

    /// C_VerifyFinal. Always ends the operation.
    pub fn verify_final(&mut self, signature: &[u8]) -> Result<()> {
        let mut op = self
            .verify
            .take()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        op.0.verify_now(signature)
    }

    /// C_DigestInit.
    pub fn digest_init(&mut self, mech: CK_MECHANISM_TYPE) -> Result<()> {
        if self.digest.is_some() {
            return fail(CKR_OPERATION_ACTIVE);
        }
        let hasher = match mech {
            CKM_SHA256 | CKM_SHA384 | CKM_SHA512 => Hasher::for_mechanism(mech),
            _ => None,
        };
        let hasher = hasher.ok_or(Error::rv(CKR_MECHANISM_INVALID))?;
        self.digest = Some(DigestOp {
            hasher,
            multipart: false,
        });
        Ok(())
    }

    /// C_Digest. `out = None` asks for the length only.
    pub fn digest(&mut self, data: &[u8], out: Option<&mut [u8]>) -> Result<usize> {
        let op = self
            .digest
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.multipart {
            self.digest = None;
            return fail(CKR_FUNCTION_FAILED);
        }
        let length_query = out.is_none();
        let len = op.hasher.output_len();
        let result = match out {
            None => Ok(len),
            Some(buf) if buf.len() < len => Err(Error::buffer_too_small(len)),
            Some(buf) => {
                let mut h = op.hasher.clone();
                h.update(data);
                deliver(&h.finish(), Some(buf))
            }
        };
        settle(&mut self.digest, &result, length_query);
        result
    }

    /// C_DigestUpdate.
    pub fn digest_update(&mut self, data: &[u8]) -> Result<()> {
        let op = self
            .digest
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        op.multipart = true;
        op.hasher.update(data);
        Ok(())
    }

    /// C_DigestFinal. `out = None` asks for the length only.
    pub fn digest_final(&mut self, out: Option<&mut [u8]>) -> Result<usize> {
        let op = self
            .digest
            .as_mut()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let length_query = out.is_none();
        let len = op.hasher.output_len();
        let result = match out {
            None => Ok(len),
            Some(buf) if buf.len() < len => Err(Error::buffer_too_small(len)),
            Some(buf) => deliver(&op.hasher.clone().finish(), Some(buf)),
        };
        settle(&mut self.digest, &result, length_query);
        result
    }
}
