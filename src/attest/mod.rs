//! The relying party's side of TPM key attestation: the reference verifier.
//!
//! A device answers `device/key/attest` with evidence (the JSON of [`Evidence`]); this module
//! checks it the way the attestation contract lists it, six checks, each failure naming its
//! check:
//!
//! 1. the EK certificate chains to a trusted root and holds the key of `ekPublicArea`
//!    ([`ek_chain`]);
//! 2. the AK is a restricted P-256 signing key that never leaves its TPM ([`public_area`]);
//! 3. the AK lives in the EK's TPM: a credential made for the EK and the AK's name
//!    ([`credential`]) is released by the device, through a callback the caller provides, so
//!    this module does no I/O;
//! 4. the AK signed `certifyInfo`;
//! 5. `certifyInfo` is a TPM2_Certify of the key's name, qualified by the verifier's nonce and
//!    the SPKI ([`certify`]);
//! 6. the certified key is a P-256 signing key that never leaves the TPM, and its point is the
//!    SPKI's.
//!
//! It depends on no TPM: a relying party runs it on a server. The TPM structures
//! (`TPMT_PUBLIC`, `TPMS_ATTEST`) are parsed with tss-esapi's marshalling types, so this module
//! exists only where tss-esapi does (Linux, the `tpm` feature). Every parse is checked by
//! marshalling the result again and comparing it with the input bytes: trailing or
//! non-canonical bytes are refused, and names are computed over exactly the bytes received.
//! The cryptography (RSA-OAEP, ECDH, AES-CFB, HMAC, ECDSA, X.509 chains) is OpenSSL's.

pub mod certify;
pub mod credential;
pub mod ek_chain;
pub mod evidence;
pub mod public_area;
pub mod verify;

pub use credential::{make_credential, CredentialChallenge};
pub use ek_chain::TrustAnchors;
pub use evidence::{Evidence, TpmEvidence};
pub use public_area::PublicArea;
pub use verify::{verify, verify_json, verify_pinned, Activate, CheckResult, Report};

/// One of the six checks of the attestation contract, numbered as it numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// 1: the EK certificate chains to a trusted root and holds `ekPublicArea`'s key.
    EkCertificate,
    /// 2: `akPublicArea` is a restricted P-256 signing key bound to its TPM.
    AkPublicArea,
    /// 3: the device released a credential made for the EK and the AK's name.
    Activation,
    /// 4: the AK's signature over `certifyInfo`.
    Signature,
    /// 5: `certifyInfo`'s magic, type, extraData and attested name.
    CertifyInfo,
    /// 6: `keyPublicArea` is a P-256 signing key bound to the TPM, with the SPKI's point.
    KeyPublicArea,
}

impl Check {
    /// The six checks in order.
    pub const ALL: [Check; 6] = [
        Check::EkCertificate,
        Check::AkPublicArea,
        Check::Activation,
        Check::Signature,
        Check::CertifyInfo,
        Check::KeyPublicArea,
    ];

    /// The check's number in the contract (1 to 6).
    pub fn number(self) -> u8 {
        match self {
            Check::EkCertificate => 1,
            Check::AkPublicArea => 2,
            Check::Activation => 3,
            Check::Signature => 4,
            Check::CertifyInfo => 5,
            Check::KeyPublicArea => 6,
        }
    }

    /// A short name: what the check looks at.
    pub fn subject(self) -> &'static str {
        match self {
            Check::EkCertificate => "EK certificate",
            Check::AkPublicArea => "akPublicArea",
            Check::Activation => "credential activation",
            Check::Signature => "AK signature",
            Check::CertifyInfo => "certifyInfo",
            Check::KeyPublicArea => "keyPublicArea",
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "check {} ({})", self.number(), self.subject())
    }
}

/// Why attestation evidence was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The evidence is not well-formed JSON of the contract's shape.
    #[error("the evidence is malformed: {0}")]
    Evidence(String),
    /// The device says the key is not in a TPM: nothing to verify.
    #[error("the evidence has format \"none\": the key is not in a TPM (protection class {0}), so nothing proves where it lives")]
    NotInTpm(String),
    /// The verifier's own inputs (nonce, roots, pinned AK) are unusable.
    #[error("{0}")]
    Input(String),
    /// One of the six checks failed.
    #[error("{check}: {reason}")]
    Check {
        /// Which check.
        check: Check,
        /// Why, in words.
        reason: String,
    },
}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, AttestError>;

/// The smallest and largest nonce the contract allows, in bytes.
pub const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

pub(crate) fn fail(check: Check, reason: impl Into<String>) -> AttestError {
    AttestError::Check {
        check,
        reason: reason.into(),
    }
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Checks that `again`, the parsed structure encoded again, is exactly `given`: one `what`, with
/// nothing after it and no non-canonical encoding.
pub(crate) fn exactly_one<E: std::fmt::Display>(
    what: &str,
    given: &[u8],
    again: std::result::Result<Vec<u8>, E>,
) -> std::result::Result<(), String> {
    let again = again.map_err(|e| format!("cannot encode the parsed {what} again: {e}"))?;
    if again != given {
        return Err(format!(
            "not exactly one {what} ({} bytes given, the {what} is {} bytes)",
            given.len(),
            again.len()
        ));
    }
    Ok(())
}
