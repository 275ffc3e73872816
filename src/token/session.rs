//! Sessions and their operation state machines: find, sign, verify, digest.
//!
//! Each session sits behind its own mutex, so two sessions sign in parallel. The rules here are
//! the ones consumers punish: a length query (no output buffer) answers the length and keeps the
//! operation; `CKR_BUFFER_TOO_SMALL` keeps it too; any other end, success or error, closes it.
//! An operation is single-part or multi-part from its first call on (a length query counts): a
//! call of the other style gets `CKR_OPERATION_ACTIVE` and leaves the operation as it was.
//! `CKM_ECDSA` is single-part only.
//!
//! Output is never written here: a call gets the caller's capacity and answers an [`Output`],
//! which the C ABI copies into exactly as many bytes as it holds.

use std::sync::Arc;

use cryptoki_sys::*;
use p256::ecdsa::signature::hazmat::PrehashVerifier;

use super::error::{fail, Error, Result};
use super::mechanism::{normalize_digest, Hasher, SIGNATURE_LEN};
use super::object::Object;
use super::op_state::{SavedDigest, MAX_SAVED_INPUT};
use crate::backend::KeyPurpose;

/// The most data a proof-only key accepts in one signature (the payload is validated whole).
pub const MAX_PROOF_BYTES: usize = 64 * 1024;

/// The mutable state of one session (its slot and RW flag never change and live outside the
/// session's lock, in the token's session table).
#[derive(Default)]
pub struct Session {
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
    style: Style,
}

/// A running verification.
pub struct VerifyOp(SignOp);

/// A running digest.
pub struct DigestOp {
    mech: CK_MECHANISM_TYPE,
    hasher: Hasher,
    style: Style,
    /// The input so far, for C_GetOperationState; `None` once longer than [`MAX_SAVED_INPUT`].
    input: Option<zeroize::Zeroizing<Vec<u8>>>,
}

impl DigestOp {
    fn new(mech: CK_MECHANISM_TYPE) -> Result<Self> {
        let hasher = match mech {
            CKM_SHA256 | CKM_SHA384 | CKM_SHA512 => Hasher::for_mechanism(mech),
            _ => None,
        };
        Ok(Self {
            mech,
            hasher: hasher.ok_or(Error::rv(CKR_MECHANISM_INVALID))?,
            style: Style::Undecided,
            input: Some(zeroize::Zeroizing::new(Vec::new())),
        })
    }

    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        if let Some(input) = self.input.as_mut() {
            if input.len() + data.len() <= MAX_SAVED_INPUT {
                input.extend_from_slice(data);
            } else {
                self.input = None;
            }
        }
    }

    fn save(&self) -> Result<SavedDigest> {
        let input = self.input.as_ref().ok_or(Error::rv(CKR_STATE_UNSAVEABLE))?;
        Ok(SavedDigest {
            mechanism: self.mech,
            style: match self.style {
                Style::Undecided => 0,
                Style::Single => 1,
                Style::Multi => 2,
            },
            input: input.clone(),
        })
    }

    fn restore(saved: &SavedDigest) -> Result<Self> {
        let mut op = Self::new(saved.mechanism).or(fail(CKR_SAVED_STATE_INVALID))?;
        op.update(&saved.input);
        op.style = match saved.style {
            0 => Style::Undecided,
            1 => Style::Single,
            2 => Style::Multi,
            _ => return fail(CKR_SAVED_STATE_INVALID),
        };
        Ok(op)
    }
}

/// Whether an operation has been driven single-part (C_Sign, C_Digest, C_Verify: a length
/// query included) or multi-part (*Update, *Final), or not yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Undecided,
    Single,
    Multi,
}

impl Style {
    /// Commits an operation to a style; the other style gets `CKR_OPERATION_ACTIVE`.
    fn enter(&mut self, wanted: Style) -> Result<()> {
        match *self {
            Style::Undecided => {
                *self = wanted;
                Ok(())
            }
            current if current == wanted => Ok(()),
            _ => fail(CKR_OPERATION_ACTIVE),
        }
    }
}

/// The caller's output buffer: `None` asks for the length only, `Some(n)` holds `n` bytes.
pub type Capacity = Option<usize>;

/// The answer of a call with variable-length output: the length the caller is told, and the
/// bytes to copy when its buffer takes them (`None` for a length query).
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    /// The length of the result.
    pub len: usize,
    /// The result, when delivered; never longer than the caller's capacity.
    pub bytes: Option<Vec<u8>>,
}

/// Checks proof-only signing input; provided by the token (it knows the policy).
pub type ProofCheck<'a> = &'a dyn Fn(&[u8]) -> Result<()>;

/// The answer when the caller's output cannot take a result of `len` bytes (a length query or a
/// short buffer): given without computing the result. `None` when the buffer is big enough.
/// The running operation in `slot`, or `CKR_OPERATION_NOT_INITIALIZED`.
fn running<T>(slot: &mut Option<T>) -> Result<&mut T> {
    slot.as_mut()
        .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))
}

fn length_only(capacity: Capacity, len: usize) -> Option<Result<Output>> {
    match capacity {
        None => Some(Ok(Output { len, bytes: None })),
        Some(n) if n < len => Some(Err(Error::buffer_too_small(len))),
        Some(_) => None,
    }
}

/// A delivered result.
fn delivered(bytes: Vec<u8>) -> Output {
    Output {
        len: bytes.len(),
        bytes: Some(bytes),
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
            style: Style::Undecided,
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

    fn sign_now(&mut self, proof: ProofCheck<'_>) -> Result<Output> {
        let digest = self.digest(proof, false)?;
        let signer = match &self.key.signer {
            Some(s) => s,
            None => return fail(CKR_KEY_FUNCTION_NOT_PERMITTED),
        };
        let sig = signer.sign_digest(&digest)?;
        Ok(delivered(sig[..SIGNATURE_LEN].to_vec()))
    }

    /// Refuses the multi-part calls for a single-part-only mechanism (CKM_ECDSA).
    fn check_multipart(&self) -> Result<()> {
        if self.mech == CKM_ECDSA {
            log::debug!("CKM_ECDSA is single-part only: use C_Sign / C_Verify");
            return fail(CKR_FUNCTION_NOT_SUPPORTED);
        }
        Ok(())
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
}

/// Ends an operation unless the result says it must stay alive.
fn settle<T>(slot: &mut Option<T>, result: &Result<Output>, length_query: bool) {
    let keep = length_query || matches!(result, Err(e) if e.rv == CKR_BUFFER_TOO_SMALL);
    if !keep {
        *slot = None;
    }
}

impl Session {
    /// A new session with no operation running.
    pub fn new() -> Self {
        Self::default()
    }

    /// C_SignInit.
    pub fn sign_init(&mut self, mech: CK_MECHANISM_TYPE, key: Arc<Object>) -> Result<()> {
        if self.sign.is_some() {
            return fail(CKR_OPERATION_ACTIVE);
        }
        self.sign = Some(SignOp::new(mech, key, false)?);
        Ok(())
    }

    /// C_Sign. A multi-part operation gets `CKR_OPERATION_ACTIVE` and stays as it was.
    pub fn sign(
        &mut self,
        data: &[u8],
        capacity: Capacity,
        proof: ProofCheck<'_>,
    ) -> Result<Output> {
        let op = running(&mut self.sign)?;
        op.style.enter(Style::Single)?;
        let result = match length_only(capacity, SIGNATURE_LEN) {
            Some(r) => r,
            None => op.feed(data, false).and_then(|_| op.sign_now(proof)),
        };
        settle(&mut self.sign, &result, capacity.is_none());
        result
    }

    /// C_SignUpdate. A single-part operation gets `CKR_OPERATION_ACTIVE` and stays as it was;
    /// a single-part-only mechanism ends the operation with `CKR_FUNCTION_NOT_SUPPORTED`.
    pub fn sign_update(&mut self, data: &[u8]) -> Result<()> {
        let op = running(&mut self.sign)?;
        op.style.enter(Style::Multi)?;
        let r = op.check_multipart().and_then(|_| op.feed(data, false));
        if r.is_err() {
            self.sign = None;
        }
        r
    }

    /// C_SignFinal, with the same rules as C_SignUpdate.
    pub fn sign_final(&mut self, capacity: Capacity, proof: ProofCheck<'_>) -> Result<Output> {
        let op = running(&mut self.sign)?;
        op.style.enter(Style::Multi)?;
        let result = match op.check_multipart() {
            Err(e) => Err(e),
            Ok(()) => match length_only(capacity, SIGNATURE_LEN) {
                Some(r) => r,
                None => op.sign_now(proof),
            },
        };
        let length_query = capacity.is_none() && result.is_ok();
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

    /// C_Verify. Ends the operation, except on a multi-part one, which gets
    /// `CKR_OPERATION_ACTIVE` and stays as it was.
    pub fn verify(&mut self, data: &[u8], signature: &[u8]) -> Result<()> {
        let op = running(&mut self.verify)?;
        op.0.style.enter(Style::Single)?;
        let mut op = self.verify.take().ok_or(Error::rv(CKR_GENERAL_ERROR))?;
        op.0.feed(data, true)?;
        op.0.verify_now(signature)
    }

    /// C_VerifyUpdate. A single-part-only mechanism ends the operation with
    /// `CKR_FUNCTION_NOT_SUPPORTED`.
    pub fn verify_update(&mut self, data: &[u8]) -> Result<()> {
        let op = running(&mut self.verify)?;
        op.0.style.enter(Style::Multi)?;
        let r = op.0.check_multipart().and_then(|_| op.0.feed(data, true));
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
        op.0.style.enter(Style::Multi)?;
        op.0.check_multipart()?;
        op.0.verify_now(signature)
    }

    /// C_DigestInit.
    pub fn digest_init(&mut self, mech: CK_MECHANISM_TYPE) -> Result<()> {
        if self.digest.is_some() {
            return fail(CKR_OPERATION_ACTIVE);
        }
        self.digest = Some(DigestOp::new(mech)?);
        Ok(())
    }

    /// C_Digest. A multi-part operation gets `CKR_OPERATION_ACTIVE` and stays as it was.
    pub fn digest(&mut self, data: &[u8], capacity: Capacity) -> Result<Output> {
        let op = running(&mut self.digest)?;
        op.style.enter(Style::Single)?;
        let result = match length_only(capacity, op.hasher.output_len()) {
            Some(r) => r,
            None => {
                let mut h = op.hasher.clone();
                h.update(data);
                Ok(delivered(h.finish()))
            }
        };
        settle(&mut self.digest, &result, capacity.is_none());
        result
    }

    /// C_DigestUpdate. A single-part operation gets `CKR_OPERATION_ACTIVE`.
    pub fn digest_update(&mut self, data: &[u8]) -> Result<()> {
        let op = running(&mut self.digest)?;
        op.style.enter(Style::Multi)?;
        op.update(data);
        Ok(())
    }

    /// C_DigestFinal. A single-part operation gets `CKR_OPERATION_ACTIVE`.
    pub fn digest_final(&mut self, capacity: Capacity) -> Result<Output> {
        let op = running(&mut self.digest)?;
        op.style.enter(Style::Multi)?;
        let result = match length_only(capacity, op.hasher.output_len()) {
            Some(r) => r,
            None => Ok(delivered(op.hasher.clone().finish())),
        };
        settle(&mut self.digest, &result, capacity.is_none());
        result
    }

    /// C_GetOperationState: only a digest is saved. With a sign or verify operation running,
    /// or a digest whose input outgrew [`MAX_SAVED_INPUT`], the state is unsaveable.
    pub fn operation_state(&self, capacity: Capacity) -> Result<Output> {
        if self.sign.is_some() || self.verify.is_some() {
            return fail(CKR_STATE_UNSAVEABLE);
        }
        let op = self
            .digest
            .as_ref()
            .ok_or(Error::rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let bytes = op.save()?.encode()?;
        match length_only(capacity, bytes.len()) {
            Some(r) => r,
            None => Ok(delivered(bytes.to_vec())),
        }
    }

    /// C_SetOperationState: the session's operations become the saved one (a digest); any
    /// operation it was running ends. A digest needs no keys (`CKR_KEY_NOT_NEEDED`).
    pub fn set_operation_state(
        &mut self,
        state: &[u8],
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let saved = SavedDigest::decode(state)?;
        if encryption_key != CK_INVALID_HANDLE || authentication_key != CK_INVALID_HANDLE {
            return fail(CKR_KEY_NOT_NEEDED);
        }
        let op = DigestOp::restore(&saved)?;
        self.sign = None;
        self.verify = None;
        self.digest = Some(op);
        Ok(())
    }
}
