//! `TPMS_ATTEST` of TPM2_Certify: parsing (through tss-esapi's `Attest`) and the qualifying data
//! the contract defines.

use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{Attest, AttestInfo};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::{exactly_one, sha256};

/// `TPM_GENERATED_VALUE`: the first four bytes of everything a TPM signs about itself.
pub const TPM_GENERATED_VALUE: [u8; 4] = [0xff, 0x54, 0x43, 0x47];

/// `TPM_ST_ATTEST_CERTIFY`.
pub const TPM_ST_ATTEST_CERTIFY: [u8; 2] = [0x80, 0x17];

/// The domain-separation label of the qualifying data.
pub const EXTRA_DATA_LABEL: &[u8] = b"devicekey-tpm-attestation/v1";

/// What a TPM2_Certify attests, as far as the verifier compares it (the qualified names of the
/// object and of the signer are checked for form only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifyInfo {
    /// `extraData`: the qualifying data the caller gave the TPM.
    pub extra_data: Vec<u8>,
    /// The certified object's name.
    pub name: Vec<u8>,
}

/// `SHA-256("devicekey-tpm-attestation/v1" ‖ 0x00 ‖ nonce ‖ SPKI DER)`: the `extraData` a device
/// must pass to TPM2_Certify.
pub fn expected_extra_data(nonce: &[u8], spki_der: &[u8]) -> [u8; 32] {
    let mut input = Vec::with_capacity(EXTRA_DATA_LABEL.len() + 1 + nonce.len() + spki_der.len());
    input.extend_from_slice(EXTRA_DATA_LABEL);
    input.push(0);
    input.extend_from_slice(nonce);
    input.extend_from_slice(spki_der);
    sha256(&input)
}

/// Parses a marshalled `TPMS_ATTEST` that must be a TPM2_Certify result. The magic and type are
/// checked on the raw bytes first (so their failures say so), and the bytes must be exactly one
/// canonical structure.
pub fn parse_certify_info(bytes: &[u8]) -> Result<CertifyInfo, String> {
    if bytes.len() < 6 {
        return Err(format!(
            "{} bytes are too short for a TPMS_ATTEST",
            bytes.len()
        ));
    }
    if bytes[..4] != TPM_GENERATED_VALUE {
        return Err(format!(
            "magic is {}, not TPM_GENERATED_VALUE (ff544347)",
            hex::encode(&bytes[..4])
        ));
    }
    if bytes[4..6] != TPM_ST_ATTEST_CERTIFY {
        return Err(format!(
            "type is {}, not TPM_ST_ATTEST_CERTIFY (8017)",
            hex::encode(&bytes[4..6])
        ));
    }
    let attest =
        Attest::unmarshall(bytes).map_err(|e| format!("not a well-formed TPMS_ATTEST: {e}"))?;
    exactly_one("canonical TPMS_ATTEST", bytes, attest.marshall())?;
    if attest.attestation_type() != AttestationType::Certify {
        return Err("the attestation is not of type certify".into());
    }
    let AttestInfo::Certify { info } = attest.attested() else {
        return Err("the attested information is not a TPMS_CERTIFY_INFO".into());
    };
    Ok(CertifyInfo {
        extra_data: attest.extra_data().value().to_vec(),
        name: info.name().value().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_data_is_the_hash_of_label_nonce_and_spki() {
        let mut manual = b"devicekey-tpm-attestation/v1\0".to_vec();
        manual.extend_from_slice(&[7; 16]);
        manual.extend_from_slice(b"spki");
        assert_eq!(expected_extra_data(&[7; 16], b"spki"), sha256(&manual));
        assert_ne!(expected_extra_data(&[8; 16], b"spki"), sha256(&manual));
    }

    #[test]
    fn wrong_magic_type_and_short_input_refused() {
        assert!(parse_certify_info(&[0xff, 0x54])
            .unwrap_err()
            .contains("too short"));
        let e = parse_certify_info(&[0, 0, 0, 0, 0x80, 0x17, 0, 0]).unwrap_err();
        assert!(e.contains("magic"), "{e}");
        let e = parse_certify_info(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x18, 0, 0]).unwrap_err();
        assert!(e.contains("type is 8018"), "{e}");
        let e = parse_certify_info(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x17, 0, 0]).unwrap_err();
        assert!(e.contains("TPMS_ATTEST"), "{e}");
    }
}
