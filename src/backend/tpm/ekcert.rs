//! Endorsement-key certificates as the TPM keeps them in NV memory (TCG EK Credential Profile).
//!
//! - [`RSA_2048_INDEX`] (`0x01c00002`, template L-1) and [`ECC_P256_INDEX`] (`0x01c0000a`,
//!   template L-2) are the two EK certificates attestation uses; P-256 is preferred. Higher
//!   profiles (such as swtpm's P-384 certificate at `0x01c00016`) are never used: their EKs have
//!   nameAlg SHA-384, which an AK would inherit.
//! - [`CHAIN_FIRST`]..=[`CHAIN_LAST`] hold CA certificates of the EK's chain, when a vendor puts
//!   them there.
//!
//! An NV index is often larger than the certificate in it, padded with zeros or 0xff:
//! [`exact_der`] cuts the DER at its own length. [`key_matches`] compares a certificate's
//! public key with an EK's public area.

use der::asn1::UintRef;
use der::{Decode, Reader, SliceReader};
use tss_esapi::structures::Public;

/// The RSA 2048 EK certificate (low range, template L-1).
pub const RSA_2048_INDEX: u32 = 0x01c0_0002;
/// The ECC NIST P-256 EK certificate (low range, template L-2).
pub const ECC_P256_INDEX: u32 = 0x01c0_000a;
/// The first NV index of the EK's CA chain.
pub const CHAIN_FIRST: u32 = 0x01c0_0100;
/// The last NV index of the EK's CA chain.
pub const CHAIN_LAST: u32 = 0x01c0_01ff;

/// OID 1.2.840.113549.1.1.1, rsaEncryption.
const OID_RSA: &str = "1.2.840.113549.1.1.1";
/// OID 1.2.840.10045.2.1, id-ecPublicKey.
const OID_EC: &str = "1.2.840.10045.2.1";

/// The DER of the one certificate at the start of `nv`, without the padding after it.
pub fn exact_der(nv: &[u8]) -> Result<&[u8], String> {
    if nv.len() < 2 || nv[0] != 0x30 {
        return Err("the NV data does not start with a DER SEQUENCE".into());
    }
    let (len, header) = match nv[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81..=0x84 => {
            let n = usize::from(nv[1] & 0x7f);
            let bytes = nv
                .get(2..2 + n)
                .ok_or("the NV data ends inside the DER length")?;
            if bytes[0] == 0 {
                return Err("the DER length is not minimal".into());
            }
            (
                bytes
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
                2 + n,
            )
        }
        _ => return Err("the DER length form is not supported".into()),
    };
    let end = header
        .checked_add(len)
        .filter(|end| *end <= nv.len())
        .ok_or("the DER length runs past the NV data")?;
    let der = &nv[..end];
    x509_cert::Certificate::from_der(der)
        .map_err(|e| format!("the NV data is not an X.509 certificate: {e}"))?;
    Ok(der)
}

/// Whether the certificate's public key is the key of `ek` (RSA modulus and exponent, or the
/// P-256 point). Errors when the certificate does not parse or holds another kind of key.
pub fn key_matches(cert_der: &[u8], ek: &Public) -> Result<bool, String> {
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| format!("the EK certificate does not parse: {e}"))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the EK certificate's key is not a whole number of bytes")?;
    let oid = spki.algorithm.oid.to_string();
    match (oid.as_str(), ek) {
        (
            OID_RSA,
            Public::Rsa {
                parameters, unique, ..
            },
        ) => {
            let (n, e) = rsa_public_key(key)?;
            let exponent = match parameters.exponent().value() {
                0 => 65537,
                e => e,
            };
            Ok(strip(n) == strip(unique.value()) && be_u32(e) == Some(exponent))
        }
        (OID_EC, Public::Ecc { unique, .. }) => {
            let params = spki
                .algorithm
                .parameters
                .as_ref()
                .map(der::Encode::to_der)
                .transpose()
                .map_err(|e| format!("the EK certificate's curve does not encode: {e}"))?
                .unwrap_or_default();
            if !crate::encoding::is_p256_params(&params) {
                return Err("the EK certificate's curve is not P-256".into());
            }
            let (Some(x), Some(y)) = (
                super::device::fixed32(unique.x().value()),
                super::device::fixed32(unique.y().value()),
            ) else {
                return Ok(false);
            };
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(key == point.as_slice())
        }
        (OID_RSA | OID_EC, _) => Ok(false),
        (other, _) => Err(format!("the EK certificate has a key of type {other}")),
    }
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn rsa_public_key(der: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let mut reader =
        SliceReader::new(der).map_err(|e| format!("bad RSA key in the certificate: {e}"))?;
    let (n, e) = reader
        .sequence(|r| {
            let n = UintRef::decode(r)?;
            let e = UintRef::decode(r)?;
            Ok((n.as_bytes(), e.as_bytes()))
        })
        .map_err(|e| format!("bad RSA key in the certificate: {e}"))?;
    reader
        .finish(())
        .map_err(|e| format!("bad RSA key in the certificate: {e}"))?;
    Ok((n, e))
}

fn strip(v: &[u8]) -> &[u8] {
    let skip = v.iter().take_while(|b| **b == 0).count();
    &v[skip..]
}

fn be_u32(v: &[u8]) -> Option<u32> {
    let v = strip(v);
    (v.len() <= 4).then(|| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_der_refuses_what_is_not_a_certificate() {
        assert!(exact_der(&[]).is_err());
        assert!(exact_der(&[0x30]).is_err());
        assert!(exact_der(&[0x30, 0x03, 1, 2]).is_err());
        assert!(exact_der(&[0x30, 0x82, 0x00, 0x10]).is_err());
        assert!(exact_der(&[0x30, 0x02, 0x05, 0x00, 0xff, 0xff]).is_err());
    }

    #[test]
    fn integers() {
        assert_eq!(be_u32(&[0x01, 0x00, 0x01]), Some(65537));
        assert_eq!(be_u32(&[0, 0, 0, 0, 0, 1]), Some(1));
        assert_eq!(be_u32(&[1, 0, 0, 0, 0]), None);
        assert_eq!(strip(&[0, 0, 5]), &[5]);
    }
}
