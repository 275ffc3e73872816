//! The byte encodings every layer shares, written once: the P-256 curve OID, the EC point as
//! PKCS#11 carries it, SubjectPublicKeyInfo, ECDSA signatures (raw `r‖s` and DER), and hex.
//!
//! The token answers C_GetAttributeValue with these bytes, the pkcs11 store reads them back from a
//! wrapped token, and the JSON-RPC server turns them into what the protocol sends. The DER work is
//! done by `der`, `spki` and `p256`; this module only names the forms and checks the curve.

use der::Decode;
use p256::pkcs8::EncodePublicKey;

/// DER of the prime256v1 OID (1.2.840.10045.3.1.7): the CKA_EC_PARAMS of every key we serve.
pub const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// CKA_EC_PARAMS as some callers spell P-256: a DER PrintableString of the curve's name.
pub const P256_EC_PARAMS_PRINTABLE: &[u8] = b"\x13\x0aprime256v1";

/// Length of a SEC1 uncompressed P-256 point (`04‖X‖Y`).
pub const POINT_LEN: usize = 65;

/// Length of a raw P-256 ECDSA signature (`r‖s`, 32 bytes each).
pub const SIGNATURE_LEN: usize = 64;

/// An encoding that did not hold what it claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EncodingError(String);

/// The result type of this module.
pub type Result<T> = std::result::Result<T, EncodingError>;

fn err(what: impl Into<String>) -> EncodingError {
    EncodingError(what.into())
}

/// True when `params` names P-256 (the OID, or the PrintableString some callers send).
pub fn is_p256_params(params: &[u8]) -> bool {
    params == P256_EC_PARAMS || params == P256_EC_PARAMS_PRINTABLE
}

/// Checks that `sec1` is an uncompressed point on P-256 and returns it as an array.
pub fn p256_point(sec1: &[u8]) -> Result<[u8; POINT_LEN]> {
    let point: [u8; POINT_LEN] = sec1.try_into().map_err(|_| {
        err(format!(
            "a {}-byte point is not uncompressed P-256",
            sec1.len()
        ))
    })?;
    if point[0] != 0x04 {
        return Err(err("the point is not in uncompressed form"));
    }
    p256::PublicKey::from_sec1_bytes(&point)
        .map_err(|e| err(format!("the point is not on P-256: {e}")))?;
    Ok(point)
}

/// CKA_EC_POINT: the point wrapped in a DER OCTET STRING.
pub fn ec_point_der(point: &[u8; POINT_LEN]) -> Vec<u8> {
    let mut v = Vec::with_capacity(POINT_LEN + 2);
    v.extend_from_slice(&[0x04, POINT_LEN as u8]);
    v.extend_from_slice(point);
    v
}

/// Reads CKA_EC_POINT: a DER OCTET STRING holding `04‖X‖Y` or, from lenient tokens, the bare 65
/// bytes. The point must lie on P-256.
pub fn decode_ec_point(value: &[u8]) -> Result<[u8; POINT_LEN]> {
    if value.len() == POINT_LEN && value[0] == 0x04 {
        return p256_point(value);
    }
    let inner = der::asn1::OctetString::from_der(value)
        .map_err(|e| err(format!("CKA_EC_POINT is not a DER OCTET STRING: {e}")))?;
    p256_point(inner.as_bytes())
}

/// SubjectPublicKeyInfo DER of a P-256 point.
pub fn spki_der(point: &[u8; POINT_LEN]) -> Result<Vec<u8>> {
    let key = p256::PublicKey::from_sec1_bytes(point)
        .map_err(|e| err(format!("the point is not on P-256: {e}")))?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| err(format!("cannot encode the public key: {e}")))
}

/// SubjectPublicKeyInfo DER from a CKA_EC_POINT value (either form [`decode_ec_point`] reads).
pub fn spki_from_ec_point(value: &[u8]) -> Result<Vec<u8>> {
    spki_der(&decode_ec_point(value)?)
}

/// DER `SEQUENCE { r, s }` of a raw 64-byte `r‖s`.
pub fn signature_to_der(raw: &[u8]) -> Result<Vec<u8>> {
    let sig = p256::ecdsa::Signature::from_slice(raw)
        .map_err(|e| err(format!("not a P-256 signature ({} bytes): {e}", raw.len())))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// Raw `r‖s` of a DER `SEQUENCE { r, s }`.
pub fn signature_from_der(der: &[u8]) -> Result<[u8; SIGNATURE_LEN]> {
    let sig = p256::ecdsa::Signature::from_der(der)
        .map_err(|e| err(format!("not a DER P-256 signature: {e}")))?;
    Ok(sig.to_bytes().into())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Decodes hex (either case); `None` for odd lengths or non-hex characters.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    hex::decode(text).ok()
}

/// Decodes hex into `out`, which must be exactly half as long as `text` (for secrets that must
/// not pass through an intermediate buffer). False on any mismatch or non-hex character.
pub fn hex_decode_into(text: &[u8], out: &mut [u8]) -> bool {
    text.len() == out.len() * 2 && hex::decode_to_slice(text, out).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point() -> [u8; POINT_LEN] {
        let key = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        key.public_key()
            .to_sec1_bytes()
            .as_ref()
            .try_into()
            .unwrap()
    }

    #[test]
    fn ec_point_round_trips_in_both_forms() {
        let p = point();
        assert_eq!(decode_ec_point(&ec_point_der(&p)).unwrap(), p);
        assert_eq!(decode_ec_point(&p).unwrap(), p);
        let mut off_curve = p;
        off_curve[64] ^= 1;
        assert!(decode_ec_point(&ec_point_der(&off_curve)).is_err());
        assert!(decode_ec_point(&p[..64]).is_err());
    }

    #[test]
    fn spki_names_p256() {
        let spki = spki_der(&point()).unwrap();
        let oid = &P256_EC_PARAMS[2..];
        assert!(spki.windows(oid.len()).any(|w| w == oid));
        assert_eq!(spki_from_ec_point(&ec_point_der(&point())).unwrap(), spki);
    }

    #[test]
    fn signatures_round_trip() {
        let mut raw = [0u8; 64];
        raw[31] = 1;
        raw[63] = 2;
        let der = signature_to_der(&raw).unwrap();
        assert_eq!(der, [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02]);
        assert_eq!(signature_from_der(&der).unwrap(), raw);
        assert!(signature_to_der(&[0u8; 64]).is_err());
        assert!(signature_to_der(&raw[..63]).is_err());
    }

    #[test]
    fn hex_both_ways() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(hex_decode("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
        let mut out = [0u8; 2];
        assert!(hex_decode_into(b"beef", &mut out));
        assert_eq!(out, [0xbe, 0xef]);
        assert!(!hex_decode_into(b"bee", &mut out));
        assert!(params_accepted());
    }

    fn params_accepted() -> bool {
        is_p256_params(&P256_EC_PARAMS)
            && is_p256_params(P256_EC_PARAMS_PRINTABLE)
            && !is_p256_params(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22])
    }
}
