//! Key attestation on the TPM connection: the endorsement key (EK) and its certificate, the
//! attestation key (AK), TPM2_Certify and TPM2_ActivateCredential.
//!
//! - **EK**: the certificate is read from NV (P-256 at `0x01c0000a` preferred, else RSA 2048 at
//!   `0x01c00002`); the EK is the persistent `0x81010001` when its public area is the TCG
//!   default template's with the certificate's key, else it is derived with TPM2_CreatePrimary
//!   from the default template each time it is needed and flushed after. Either way its key
//!   must be the certificate's.
//! - **AK**: ECC P-256, ECDSA/SHA-256, restricted signing key under the EK
//!   (`tss_esapi::abstraction::ak`); the store keeps its blob and it is loaded under the EK
//!   (which takes a `PolicySecret(TPM_RH_ENDORSEMENT)` session) for each use, then flushed.
//! - Without a resource manager the TPM has three object slots: before the EK or the AK is
//!   loaded, the connection's cached signing keys are flushed, and the EK is flushed as soon as
//!   the AK is loaded, so at most three objects (SRK, AK, and the EK or the certified key) are
//!   ever loaded.
//!
//! Every TPM2_CreatePrimary, TPM2_Create of an AK and TPM2_Certify is logged at debug level, one
//! line each (tests count them).

use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection, DefaultKey};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{
    AuthHandle, KeyHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, SessionHandle,
    TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    AttestInfo, Data, EncryptedSecret, IdObject, Private, Public, SignatureScheme,
    SymmetricDefinition,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use super::{fixed32, is_out_of_memory, raw_rc, tpm_code, tss, Conn, Fail, Op, RC_REFERENCE_H0};
use crate::backend::tpm::ekcert;
use crate::backend::verify::PointVerifier;
use crate::backend::BackendError;

/// Where TCG-aware provisioning (swtpm_setup, Windows) persists the EK.
pub const PERSISTENT_EK: u32 = 0x8101_0001;

/// The EK attestation uses, as found on this connection.
#[derive(Clone, Debug)]
pub struct Endorsement {
    /// The EK's algorithm (P-256 or RSA 2048).
    alg: AsymmetricAlgorithmSelection,
    /// The EK's public area (TPMT_PUBLIC).
    public: Public,
    /// The marshalled public area.
    pub public_area: Vec<u8>,
    /// The EK certificate first, then the CA certificates the TPM holds.
    pub certificates: Vec<Vec<u8>>,
    /// Whether the EK is the persistent [`PERSISTENT_EK`].
    persistent: bool,
}

impl Endorsement {
    /// The EK's name: `0x000b ‖ SHA-256(public area)`.
    pub fn name(&self) -> Vec<u8> {
        name_of(&self.public_area)
    }
}

/// The AK's loadable parts.
#[derive(Clone, Debug)]
pub struct AkParts {
    /// TPMT_PUBLIC.
    pub public: Public,
    /// TPM2B_PRIVATE contents (encrypted by the EK).
    pub private: Private,
}

/// What TPM2_Certify returned, checked.
#[derive(Clone, Debug)]
pub struct Certified {
    /// The marshalled TPMS_ATTEST.
    pub certify_info: Vec<u8>,
    /// The AK's ECDSA signature over SHA-256(certify_info), raw `r‖s`.
    pub signature: [u8; 64],
}

/// `0x000b ‖ SHA-256(public area)`: the name of an object whose nameAlg is SHA-256.
pub fn name_of(public_area: &[u8]) -> Vec<u8> {
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(&Sha256::digest(public_area));
    name
}

fn marshall(public: &Public) -> Op<Vec<u8>> {
    public.marshall().map_err(|e| {
        Fail::Other(BackendError::Crypto(format!(
            "cannot marshal a public area: {e}"
        )))
    })
}

fn other(msg: impl Into<String>) -> Fail {
    Fail::Other(BackendError::Refused(msg.into()))
}

/// A TPM error that is about the request (a blob for another AK or EK...), not about the
/// connection: no reconnect, no retry. Handle and memory errors keep their usual treatment
/// (another client may have flushed our objects).
fn refusal(what: &'static str, e: tss_esapi::Error) -> Fail {
    let rc = raw_rc(&e);
    let code = tpm_code(rc);
    if super::layer(rc) != 0 || is_out_of_memory(&e) || code == 0x8b || code == RC_REFERENCE_H0 {
        Fail::Tss(what, e)
    } else {
        Fail::Refused(what, e)
    }
}

/// The AK's public point, when it is the P-256 key the contract asks for.
fn ak_point(public: &Public) -> Option<[u8; 65]> {
    let Public::Ecc {
        parameters, unique, ..
    } = public
    else {
        return None;
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return None;
    }
    let mut point = [0u8; 65];
    point[0] = 4;
    point[1..33].copy_from_slice(&fixed32(unique.x().value())?);
    point[33..].copy_from_slice(&fixed32(unique.y().value())?);
    Some(point)
}

/// The size of the `unique` field at the end of the default template's marshalled public area.
fn template_unique_len(alg: AsymmetricAlgorithmSelection) -> usize {
    match alg {
        AsymmetricAlgorithmSelection::Rsa(_) => 2 + 256,
        AsymmetricAlgorithmSelection::Ecc(_) => 2 + 32 + 2 + 32,
    }
}

impl Conn {
    /// Flushes the cached signing keys, making room for the EK and the AK.
    fn make_room(&mut self) {
        while let Some((_, h)) = self.loaded.pop_back() {
            self.flush(h);
        }
    }

    /// Also flushes the SRK (derived again when a key is next loaded): creating the AK and
    /// activating a credential do not need it, and a TPM without a resource manager may hold
    /// another client's SRK besides the EK and the AK.
    fn release_srk(&mut self) {
        self.make_room();
        self.drop_srk();
    }

    /// NV indices from `first` on that the TPM lists.
    fn nv_indices(&mut self, first: u32) -> Op<Vec<u32>> {
        let list = self.handles("listing NV indices", first, 254)?;
        Ok(list
            .iter()
            .filter_map(|h| match h {
                TpmHandle::NvIndex(i) => Some(u32::from(*i)),
                _ => None,
            })
            .collect())
    }

    /// The exact DER of the certificate at an NV index.
    fn read_certificate(&mut self, index: u32) -> Op<Vec<u8>> {
        let handle = NvIndexTpmHandle::new(index)
            .map_err(|_| other(format!("{index:#x} is not an NV index")))?;
        let ctx = self.ctx()?;
        let object = tss(
            "opening an NV index",
            ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(handle))),
        )?;
        // read_full closes the ESYS handle itself.
        let data = tss(
            "reading a certificate from NV (TPM2_NV_Read)",
            ctx.execute_with_nullauth_session(|c| {
                tss_esapi::abstraction::nv::read_full(c, NvAuth::NvIndex(object.into()), handle)
            }),
        )?;
        ekcert::exact_der(&data)
            .map(<[u8]>::to_vec)
            .map_err(|e| other(format!("NV index {index:#x}: {e}")))
    }

    /// Derives the EK of `alg` from the TCG default template (TPM2_CreatePrimary in the
    /// endorsement hierarchy); the caller flushes it.
    fn create_ek(&mut self, alg: AsymmetricAlgorithmSelection) -> Op<(KeyHandle, Public)> {
        let template = tss(
            "building the EK template",
            ek::create_ek_public_from_default_template_2(alg, None),
        )?;
        let ctx = self.ctx()?;
        log::debug!("tpm: TPM2_CreatePrimary (endorsement hierarchy, the EK)");
        let result = tss(
            "creating the EK (TPM2_CreatePrimary, endorsement hierarchy)",
            ctx.execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            }),
        )?;
        Ok((result.key_handle, result.out_public))
    }

    /// The persistent EK's public area, when [`PERSISTENT_EK`] holds the default-template EK of
    /// `alg`.
    fn persistent_ek(&mut self, alg: AsymmetricAlgorithmSelection) -> Op<Option<Public>> {
        if !self.persistent_present(PERSISTENT_EK)? {
            return Ok(None);
        }
        let mut object = self.open_persistent_ek()?;
        let ctx = self.ctx()?;
        let read = ctx.execute_without_session(|c| c.read_public(object.into()));
        let _ = ctx.tr_close(&mut object);
        let (public, _, _) = tss("reading the persistent EK (TPM2_ReadPublic)", read)?;
        let template = tss(
            "building the EK template",
            ek::create_ek_public_from_default_template_2(alg, None),
        )?;
        let (have, want) = (marshall(&public)?, marshall(&template)?);
        let prefix = want.len().saturating_sub(template_unique_len(alg));
        if have.len() == want.len() && have[..prefix] == want[..prefix] {
            Ok(Some(public))
        } else {
            Ok(None)
        }
    }

    fn open_persistent_ek(&mut self) -> Op<ObjectHandle> {
        let handle = PersistentTpmHandle::new(PERSISTENT_EK)
            .map_err(|_| other("0x81010001 is not a persistent handle"))?;
        let ctx = self.ctx()?;
        tss(
            "opening the persistent EK",
            ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(handle))),
        )
    }

    /// Finds the EK and its certificates (cached for the connection).
    pub(super) fn endorsement(&mut self) -> Op<Endorsement> {
        if let Some(e) = &self.endorsement {
            return Ok(e.clone());
        }
        self.release_srk();
        let indices = self.nv_indices(ekcert::RSA_2048_INDEX)?;
        let candidates = [
            (
                ekcert::ECC_P256_INDEX,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            ),
            (
                ekcert::RSA_2048_INDEX,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            ),
        ];
        let mut problems = Vec::new();
        for (index, alg) in candidates {
            if !indices.contains(&index) {
                continue;
            }
            match self.endorsement_at(index, alg, &indices) {
                Ok(found) => {
                    log::info!(
                        "tpm: attestation EK: certificate at {index:#x}, {} EK",
                        if found.persistent {
                            "persistent 0x81010001"
                        } else {
                            "derived"
                        }
                    );
                    self.endorsement = Some(found.clone());
                    return Ok(found);
                }
                Err(Fail::Other(e)) => problems.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(other(if problems.is_empty() {
            "this TPM holds no EK certificate at 0x01c0000a (ECC P-256) or 0x01c00002 (RSA 2048), \
             so its keys cannot be attested; fix: a TPM provisioned by its maker has one (for \
             swtpm, run swtpm_setup --create-ek-cert)"
                .to_string()
        } else {
            problems.join("; ")
        }))
    }

    fn endorsement_at(
        &mut self,
        index: u32,
        alg: AsymmetricAlgorithmSelection,
        indices: &[u32],
    ) -> Op<Endorsement> {
        let cert = self.read_certificate(index)?;
        let matches = |public: &Public| -> Op<bool> {
            ekcert::key_matches(&cert, public)
                .map_err(|e| other(format!("NV index {index:#x}: {e}")))
        };
        let (public, persistent) = match self.persistent_ek(alg)? {
            Some(public) if matches(&public)? => (public, true),
            _ => {
                let (handle, public) = self.create_ek(alg)?;
                self.flush(handle);
                (public, false)
            }
        };
        if !matches(&public)? {
            return Err(other(format!(
                "the EK this TPM derives from the default template is not the key of the EK \
                 certificate at {index:#x}; refusing to attest with it"
            )));
        }
        let mut certificates = vec![cert];
        for chain in indices
            .iter()
            .copied()
            .filter(|i| (ekcert::CHAIN_FIRST..=ekcert::CHAIN_LAST).contains(i))
        {
            match self.read_certificate(chain) {
                Ok(c) => certificates.push(c),
                Err(Fail::Other(e)) => log::warn!("tpm: skipping EK chain certificate: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(Endorsement {
            alg,
            public_area: marshall(&public)?,
            public,
            certificates,
            persistent,
        })
    }

    /// Runs `op` with the EK loaded (the persistent one, or derived and flushed afterwards).
    fn with_ek<T>(
        &mut self,
        ek: &Endorsement,
        op: impl FnOnce(&mut Self, KeyHandle) -> Op<T>,
    ) -> Op<T> {
        if ek.persistent {
            let mut object = self.open_persistent_ek()?;
            let result = op(self, KeyHandle::from(object));
            if let Ok(ctx) = self.ctx() {
                let _ = ctx.tr_close(&mut object);
            }
            return result;
        }
        let (handle, public) = self.create_ek(ek.alg)?;
        let result = if public == ek.public {
            op(self, handle)
        } else {
            Err(other(
                "the TPM derived another EK than before; was it cleared?",
            ))
        };
        self.flush(handle);
        result
    }

    /// Creates an AK under the EK.
    pub(super) fn create_ak(&mut self, ek: &Endorsement) -> Op<AkParts> {
        self.release_srk();
        self.with_ek(ek, |conn, ek_handle| {
            let ctx = conn.ctx()?;
            log::debug!("tpm: TPM2_Create of the AK (under the EK)");
            let result = tss(
                "creating the attestation key (TPM2_Create under the EK)",
                ak::create_ak_2(
                    ctx,
                    ek_handle,
                    HashingAlgorithm::Sha256,
                    AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                    SignatureSchemeAlgorithm::EcDsa,
                    None,
                    DefaultKey,
                ),
            )?;
            Ok(AkParts {
                public: result.out_public,
                private: result.out_private,
            })
        })
    }

    /// Loads the AK under the EK (the EK is flushed again before this returns).
    fn load_ak(&mut self, ek: &Endorsement, ak_parts: &AkParts) -> Op<KeyHandle> {
        self.make_room();
        self.with_ek(ek, |conn, ek_handle| {
            let ctx = conn.ctx()?;
            log::debug!("tpm: TPM2_Load of the AK");
            ak::load_ak(
                ctx,
                ek_handle,
                None,
                ak_parts.private.clone(),
                ak_parts.public.clone(),
            )
            .map_err(|e| refusal("loading the attestation key (TPM2_Load under the EK)", e))
        })
    }

    /// TPM2_Certify of `key` (whose authValue is `auth`, `None`: empty) by the AK, with
    /// `qualifying` as qualifying data; the result is checked (attested name, signature) before
    /// it is returned.
    pub(super) fn certify(
        &mut self,
        ek: &Endorsement,
        ak_parts: &AkParts,
        key: &super::TpmKey,
        auth: Option<&[u8]>,
        qualifying: &[u8; 32],
    ) -> Op<Certified> {
        let ak_verifier = ak_point(&ak_parts.public)
            .and_then(|p| PointVerifier::new(&p))
            .ok_or_else(|| other("the stored attestation key is not a P-256 key"))?;
        let key_name = name_of(&marshall(&key.public)?);
        let data = tss(
            "preparing the qualifying data",
            Data::try_from(qualifying.to_vec()),
        )?;
        let ak_handle = self.load_ak(ek, ak_parts)?;
        let result = (|| {
            let key_handle = self.ensure_loaded(key)?;
            log::debug!("tpm: TPM2_Certify of {} by the AK", key.name);
            let what = "certifying the key (TPM2_Certify)";
            let certify = |c: &mut tss_esapi::Context| {
                c.certify(key_handle.into(), ak_handle, data, SignatureScheme::Null)
            };
            match auth {
                Some(auth) => self.with_auth_and(
                    key_handle.into(),
                    auth,
                    false,
                    Some(AuthSession::Password),
                    what,
                    certify,
                ),
                None => tss(
                    what,
                    self.ctx()?.execute_with_sessions(
                        (
                            Some(AuthSession::Password),
                            Some(AuthSession::Password),
                            None,
                        ),
                        certify,
                    ),
                ),
            }
        })();
        self.flush(ak_handle);
        let (attest, signature) = result?;
        let AttestInfo::Certify { info } = attest.attested() else {
            return Err(other("TPM2_Certify returned another kind of attestation"));
        };
        if info.name().value() != key_name.as_slice() {
            // A stale handle named another client's object (no resource manager).
            return Err(Fail::WrongKey);
        }
        let certify_info = attest.marshall().map_err(|e| {
            Fail::Other(BackendError::Crypto(format!(
                "cannot marshal TPMS_ATTEST: {e}"
            )))
        })?;
        let tss_esapi::structures::Signature::EcDsa(sig) = signature else {
            return Err(other("the AK returned a non-ECDSA signature"));
        };
        let (Some(r), Some(s)) = (
            fixed32(sig.signature_r().value()),
            fixed32(sig.signature_s().value()),
        ) else {
            return Err(other("the AK returned an oversized signature"));
        };
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&r);
        raw[32..].copy_from_slice(&s);
        let digest: [u8; 32] = Sha256::digest(&certify_info).into();
        if !ak_verifier.verify(&digest, &raw) {
            return Err(Fail::WrongKey);
        }
        Ok(Certified {
            certify_info,
            signature: raw,
        })
    }

    /// TPM2_ActivateCredential: the AK as activateHandle, the EK (under a
    /// `PolicySecret(TPM_RH_ENDORSEMENT)` session) as keyHandle.
    pub(super) fn activate(
        &mut self,
        ek: &Endorsement,
        ak_parts: &AkParts,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Op<Zeroizing<Vec<u8>>> {
        let id_object = IdObject::try_from(id_object.to_vec())
            .map_err(|_| other("the credential blob is too large for a TPM2B_ID_OBJECT"))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(|_| other("the encrypted secret is too large for a TPM2B_ENCRYPTED_SECRET"))?;
        self.release_srk();
        self.with_ek(ek, |conn, ek_handle| {
            let ctx = conn.ctx()?;
            log::debug!("tpm: TPM2_Load of the AK");
            let ak_handle = ak::load_ak(
                ctx,
                ek_handle,
                None,
                ak_parts.private.clone(),
                ak_parts.public.clone(),
            )
            .map_err(|e| refusal("loading the attestation key (TPM2_Load under the EK)", e))?;
            let result = conn.activate_loaded(ek_handle, ak_handle, id_object, secret);
            conn.flush(ak_handle);
            result
        })
    }

    fn activate_loaded(
        &mut self,
        ek_handle: KeyHandle,
        ak_handle: KeyHandle,
        id_object: IdObject,
        secret: EncryptedSecret,
    ) -> Op<Zeroizing<Vec<u8>>> {
        let ctx = self.ctx()?;
        let session = tss(
            "starting the EK policy session",
            ctx.start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            ),
        )?
        .ok_or_else(|| other("the TPM started no policy session"))?;
        let result = ctx.execute_with_temporary_object(
            ObjectHandle::from(SessionHandle::from(session)),
            |c, _| {
                let policy = PolicySession::try_from(session)?;
                c.execute_with_nullauth_session(|c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                log::debug!("tpm: TPM2_ActivateCredential");
                c.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                    c.activate_credential(ak_handle, ek_handle, id_object, secret)
                })
            },
        );
        let digest = result
            .map_err(|e| refusal("activating the credential (TPM2_ActivateCredential)", e))?;
        Ok(Zeroizing::new(digest.value().to_vec()))
    }
}

/// Reads an AK's parts from its marshalled TPM2B_PUBLIC and TPM2B_PRIVATE.
pub fn ak_from_blobs(public: &[u8], private: &[u8]) -> std::result::Result<AkParts, String> {
    let public = public
        .get(2..)
        .ok_or("short public area")
        .and_then(|b| Public::unmarshall(b).map_err(|_| "bad public area"))?;
    let private = private
        .get(2..)
        .ok_or("short private area")
        .and_then(|b| Private::try_from(b.to_vec()).map_err(|_| "bad private area"))?;
    Ok(AkParts { public, private })
}
