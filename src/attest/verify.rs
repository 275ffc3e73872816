//! The six checks of the attestation contract, run in order on one piece of evidence.
//!
//! Every check runs, even after another failed, so a report says everything that is wrong; the
//! evidence passes only when all six pass. Check 3 calls the caller's `activate` callback with
//! the two blobs (for `device/key/activateCredential`) and expects the secret back.

use openssl::hash::MessageDigest;
use openssl::sign::Verifier;

use super::certify::{expected_extra_data, parse_certify_info};
use super::credential::{make_credential, CredentialChallenge};
use super::ek_chain::{verify_ek_certificate, TrustAnchors};
use super::evidence::{Evidence, TpmEvidence};
use super::public_area::PublicArea;
use super::{fail, AttestError, Check, Result, NONCE_LEN};

/// Length of the secret check 3 sends (the contract allows 16 to 32 bytes).
pub const SECRET_LEN: usize = 32;

/// One check's outcome: what was found when it passed, why when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Which check.
    pub check: Check,
    /// `Ok(what was verified)` or `Err(why not)`.
    pub outcome: std::result::Result<String, String>,
}

impl CheckResult {
    /// True when the check passed.
    pub fn passed(&self) -> bool {
        self.outcome.is_ok()
    }

    /// The failure as an error naming the check.
    pub fn error(&self) -> Option<AttestError> {
        self.outcome
            .as_ref()
            .err()
            .map(|r| fail(self.check, r.clone()))
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(what) => write!(f, "{}: pass: {what}", self.check),
            Err(why) => write!(f, "{}: FAIL: {why}", self.check),
        }
    }
}

/// The verdict on one piece of evidence.
#[derive(Debug, Clone)]
pub struct Report {
    /// The six checks, in order.
    pub checks: Vec<CheckResult>,
    /// The attested SPKI (DER): what the relying party may trust once [`Report::passed`].
    pub spki_der: Vec<u8>,
    /// The AK's public area: what to pin (see [`verify_pinned`]) once [`Report::passed`].
    pub ak_public_area: Vec<u8>,
}

impl Report {
    /// True when all six checks passed.
    pub fn passed(&self) -> bool {
        self.checks.len() == Check::ALL.len() && self.checks.iter().all(CheckResult::passed)
    }

    /// The first failed check, as an error naming it.
    pub fn first_failure(&self) -> Option<AttestError> {
        self.checks.iter().find_map(CheckResult::error)
    }

    /// `Ok(self)` when all six passed, else the first failure.
    pub fn into_result(self) -> Result<Report> {
        match self.first_failure() {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }

    /// The outcome of one check.
    pub fn check(&self, check: Check) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == check)
    }
}

fn check_nonce(nonce: &[u8]) -> Result<()> {
    if NONCE_LEN.contains(&nonce.len()) {
        Ok(())
    } else {
        Err(AttestError::Input(format!(
            "the nonce is {} bytes; it must be 16 to 64",
            nonce.len()
        )))
    }
}

/// Check 3's way to the device: it gets the credential challenge and returns the secret the
/// device's TPM released, or why it could not. Any such closure is one.
pub trait Activate: FnOnce(&CredentialChallenge) -> std::result::Result<Vec<u8>, String> {}

impl<F> Activate for F where F: FnOnce(&CredentialChallenge) -> std::result::Result<Vec<u8>, String> {}

/// Parses evidence JSON and verifies it with [`verify`]. `"format": "none"` evidence is refused
/// with [`AttestError::NotInTpm`].
pub fn verify_json(
    evidence_json: &[u8],
    nonce: &[u8],
    anchors: &TrustAnchors,
    activate: impl Activate,
) -> Result<Report> {
    let evidence = Evidence::from_json(evidence_json)?.into_tpm()?;
    verify(&evidence, nonce, anchors, activate)
}

/// Runs the six checks on `evidence`, for the `nonce` this verifier sent with the attest
/// request. `activate` is check 3's way to the device: it gets the two blobs and must return the
/// secret the device's TPM released (or why it could not). `Err` only when the verifier's own
/// inputs are unusable (a nonce of the wrong length); failed checks are in the [`Report`].
pub fn verify(
    evidence: &TpmEvidence,
    nonce: &[u8],
    anchors: &TrustAnchors,
    activate: impl Activate,
) -> Result<Report> {
    check_nonce(nonce)?;
    let ek = PublicArea::parse(&evidence.ek_public_area).map_err(|e| format!("ekPublicArea: {e}"));
    let ak = PublicArea::parse(&evidence.ak_public_area).map_err(|e| format!("akPublicArea: {e}"));

    let check1 = ek.as_ref().map_err(Clone::clone).and_then(|ek| {
        let chain = verify_ek_certificate(&evidence.ek_certificates, anchors, ek)?;
        Ok(format!(
            "the EK certificate chains to a trusted root ({}) and holds ekPublicArea's key",
            chain.join(" <- ")
        ))
    });
    let check3 = match (&ek, &ak) {
        (Ok(ek), Ok(ak)) => activation(ek, ak, activate),
        (Err(e), _) | (_, Err(e)) => Err(format!("no credential can be made: {e}")),
    };
    let mut checks = vec![CheckResult {
        check: Check::EkCertificate,
        outcome: check1,
    }];
    checks.push(CheckResult {
        check: Check::AkPublicArea,
        outcome: check_ak(&ak),
    });
    checks.push(CheckResult {
        check: Check::Activation,
        outcome: check3,
    });
    checks.extend(checks_4_to_6(evidence, nonce, &ak));
    Ok(Report {
        checks,
        spki_der: evidence.spki_der.clone(),
        ak_public_area: evidence.ak_public_area.clone(),
    })
}

/// Verification for a relying party that verified this device's AK before (all six checks)
/// and pinned its public area: checks 2, 4, 5 and 6 run; checks 1 and 3, which prove where
/// the AK lives, are replaced by "`akPublicArea` is byte for byte the pinned one", so no EK
/// roots and no activation round trip are needed.
pub fn verify_pinned(
    evidence: &TpmEvidence,
    nonce: &[u8],
    pinned_ak_public_area: &[u8],
) -> Result<Report> {
    check_nonce(nonce)?;
    PublicArea::parse(pinned_ak_public_area)
        .map_err(|e| AttestError::Input(format!("the pinned AK: {e}")))?;
    let ak = PublicArea::parse(&evidence.ak_public_area).map_err(|e| format!("akPublicArea: {e}"));
    let pinned = if evidence.ak_public_area == pinned_ak_public_area {
        Ok(
            "not run: akPublicArea is the pinned AK, whose EK certificate was verified before"
                .into(),
        )
    } else {
        Err("akPublicArea is not the pinned AK".to_string())
    };
    let mut checks = vec![CheckResult {
        check: Check::EkCertificate,
        outcome: pinned.clone(),
    }];
    checks.push(CheckResult {
        check: Check::AkPublicArea,
        outcome: check_ak(&ak),
    });
    checks.push(CheckResult {
        check: Check::Activation,
        outcome: pinned.map(|_| {
            "not run: akPublicArea is the pinned AK, whose activation was verified before".into()
        }),
    });
    checks.extend(checks_4_to_6(evidence, nonce, &ak));
    Ok(Report {
        checks,
        spki_der: evidence.spki_der.clone(),
        ak_public_area: evidence.ak_public_area.clone(),
    })
}

fn check_ak(ak: &std::result::Result<PublicArea, String>) -> std::result::Result<String, String> {
    let ak = ak.as_ref().map_err(Clone::clone)?;
    ak.check_signing_key(true)?;
    Ok("the AK is a restricted ECC P-256 signing key (nameAlg SHA-256, fixedTPM, fixedParent, sensitiveDataOrigin, no decrypt)".into())
}

fn activation(
    ek: &PublicArea,
    ak: &PublicArea,
    activate: impl Activate,
) -> std::result::Result<String, String> {
    let mut secret = zeroize::Zeroizing::new([0u8; SECRET_LEN]);
    openssl::rand::rand_bytes(&mut secret[..]).map_err(|e| format!("no random secret: {e}"))?;
    let challenge = make_credential(ek, &ak.name(), &secret[..])
        .map_err(|e| format!("no credential can be made for ekPublicArea: {e}"))?;
    let released = zeroize::Zeroizing::new(
        activate(&challenge)
            .map_err(|e| format!("the device did not activate the credential: {e}"))?,
    );
    if released.len() == SECRET_LEN && openssl::memcmp::eq(&released, &secret[..]) {
        Ok("the device released the secret made for the EK and the AK's name: the AK is in the EK's TPM".into())
    } else {
        Err("the device returned a secret that is not the one sent".into())
    }
}

fn checks_4_to_6(
    evidence: &TpmEvidence,
    nonce: &[u8],
    ak: &std::result::Result<PublicArea, String>,
) -> Vec<CheckResult> {
    let key =
        PublicArea::parse(&evidence.key_public_area).map_err(|e| format!("keyPublicArea: {e}"));

    let check4 = ak.as_ref().map_err(Clone::clone).and_then(|ak| {
        let pkey = ak.p256_pkey().map_err(|e| format!("the AK's key: {e}"))?;
        let ok = Verifier::new(MessageDigest::sha256(), &pkey)
            .and_then(|mut v| v.verify_oneshot(&evidence.signature_der, &evidence.certify_info))
            .unwrap_or(false);
        if ok {
            Ok("the AK's ECDSA P-256 signature over SHA-256(certifyInfo) verifies".into())
        } else {
            Err("signatureDerBase64 is not the AK's signature over SHA-256(certifyInfo)".into())
        }
    });

    let check5 = parse_certify_info(&evidence.certify_info).and_then(|info| {
        let expected = expected_extra_data(nonce, &evidence.spki_der);
        let mut problems = Vec::new();
        if info.extra_data != expected {
            problems.push("extraData does not match the nonce and SPKI".to_string());
        }
        match &key {
            Ok(key) if info.name == key.name() => {}
            Ok(_) => problems.push("the attested name is not the name of keyPublicArea".into()),
            Err(e) => problems.push(format!("the attested name cannot be compared: {e}")),
        }
        if problems.is_empty() {
            Ok(
                "a TPM2_Certify of keyPublicArea's name, qualified by this nonce and the SPKI"
                    .into(),
            )
        } else {
            Err(problems.join("; "))
        }
    });

    let check6 = key.as_ref().map_err(Clone::clone).and_then(|key| {
        key.check_signing_key(false)?;
        let point = key.p256_point()?;
        let spki_point = spki_point(&evidence.spki_der)?;
        if spki_point != point {
            return Err("the key's point is not the SPKI's point".into());
        }
        Ok("an unrestricted ECC P-256 signing key that cannot leave the TPM (fixedTPM, fixedParent, sensitiveDataOrigin), with the SPKI's point".into())
    });

    vec![
        CheckResult {
            check: Check::Signature,
            outcome: check4,
        },
        CheckResult {
            check: Check::CertifyInfo,
            outcome: check5,
        },
        CheckResult {
            check: Check::KeyPublicArea,
            outcome: check6,
        },
    ]
}

/// The SPKI's uncompressed point, for comparing.
fn spki_point(der: &[u8]) -> std::result::Result<[u8; crate::encoding::POINT_LEN], String> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::DecodePublicKey;
    let key = p256::PublicKey::from_public_key_der(der)
        .map_err(|e| format!("the SPKI is not a P-256 public key: {e}"))?;
    crate::encoding::p256_point(key.to_encoded_point(false).as_bytes()).map_err(|e| e.to_string())
}
