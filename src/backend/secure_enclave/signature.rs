//! The Secure Enclave's ECDSA signature as PKCS#11 wants it.
//!
//! `kSecKeyAlgorithmECDSASignatureDigestX962SHA256` returns an X9.62 DER `SEQUENCE { r, s }`
//! whose integers are as short as their values (and carry a 0x00 byte when the top bit is set);
//! PKCS#11 wants exactly 64 bytes, each half left-padded to 32.

use crate::backend::{BackendError, Result};
use crate::encoding;

/// Raw `r‖s` of the enclave's DER signature; a `Crypto` error for anything else.
pub fn raw_signature(der: &[u8]) -> Result<[u8; encoding::SIGNATURE_LEN]> {
    encoding::signature_from_der(der).map_err(|e| {
        BackendError::Crypto(format!(
            "the Secure Enclave returned a {}-byte signature that is not DER ECDSA P-256: {e}",
            der.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER of `SEQUENCE { INTEGER r, INTEGER s }` from the integers' content bytes.
    fn der(r: &[u8], s: &[u8]) -> Vec<u8> {
        let mut body = vec![0x02, r.len() as u8];
        body.extend_from_slice(r);
        body.extend_from_slice(&[0x02, s.len() as u8]);
        body.extend_from_slice(s);
        let mut out = vec![0x30, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn full_length_halves_come_through() {
        let r = [0x11u8; 32];
        let s = [0x22u8; 32];
        let raw = raw_signature(&der(&r, &s)).unwrap();
        assert_eq!(&raw[..32], &r);
        assert_eq!(&raw[32..], &s);
    }

    #[test]
    fn a_high_bit_half_loses_its_sign_byte() {
        let mut r = vec![0x00];
        r.extend_from_slice(&[0x90u8; 32]);
        let s = [0x01u8; 32];
        let raw = raw_signature(&der(&r, &s)).unwrap();
        assert_eq!(&raw[..32], &[0x90u8; 32]);
        assert_eq!(&raw[32..], &s);
    }

    #[test]
    fn short_halves_are_left_padded() {
        let r = [0x05u8; 30];
        let s = [0x7fu8; 31];
        let raw = raw_signature(&der(&r, &s)).unwrap();
        assert_eq!(&raw[..2], &[0, 0]);
        assert_eq!(&raw[2..32], &r);
        assert_eq!(raw[32], 0);
        assert_eq!(&raw[33..], &s);
    }

    #[test]
    fn a_real_signature_round_trips() {
        let raw: Vec<u8> = (1..=64).collect();
        let der = encoding::signature_to_der(&raw).unwrap();
        assert_eq!(raw_signature(&der).unwrap().to_vec(), raw);
    }

    #[test]
    fn anything_else_is_a_crypto_error() {
        for bad in [
            vec![],
            vec![0x30, 0x00],
            raw_signature_like(),
            der(&[0x01; 33], &[0x01; 32]),
            der(&[0x00], &[0x01]),
        ] {
            assert!(
                matches!(raw_signature(&bad), Err(BackendError::Crypto(_))),
                "{bad:02x?}"
            );
        }
    }

    /// 64 raw bytes are not DER.
    fn raw_signature_like() -> Vec<u8> {
        vec![0x42; 64]
    }
}
