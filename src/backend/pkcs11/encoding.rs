//! Byte-level helpers of the pkcs11 backend that are its own: signatures as wrapped tokens return
//! them, raw attributes, stable names. The P-256 OID, EC points and hex are [`crate::encoding`]'s.
//!
//! The token layer speaks in raw attributes `(type, bytes)` encoded as a C caller would see them
//! (CK_ULONG as 8 native-endian bytes, CK_BBOOL as one byte). `cryptoki` 0.12 speaks in typed
//! [`Attribute`]s. This module translates between the two without raw pointers.

use cryptoki::object::{Attribute, AttributeType};
use cryptoki_sys::{CK_ATTRIBUTE_TYPE, CK_CERTIFICATE_TYPE, CK_DATE, CK_OBJECT_CLASS};
use sha2::{Digest, Sha256};

use crate::backend::{BackendError, RawAttribute, Result};
use crate::encoding::{self, hex};

/// The CKA_APPLICATION of our key metadata objects in the wrapped token (reserved).
pub(super) const META_APPLICATION: &[u8] = b"devicekey";

/// The CKA_LABEL prefix of our key metadata objects; the key's name follows.
pub(super) const META_LABEL_PREFIX: &str = "devicekey-key:";

/// The attributes read back from certificates and data objects (only those an object has are
/// reported). CKA_CERTIFICATE_CATEGORY and other types that `cryptoki` does not model are not read.
pub(super) const OBJECT_ATTRIBUTES: &[AttributeType] = &[
    AttributeType::Class,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Destroyable,
    AttributeType::Label,
    AttributeType::Id,
    AttributeType::Value,
    AttributeType::CertificateType,
    AttributeType::Trusted,
    AttributeType::CheckValue,
    AttributeType::StartDate,
    AttributeType::EndDate,
    AttributeType::Subject,
    AttributeType::Issuer,
    AttributeType::SerialNumber,
    AttributeType::Url,
    AttributeType::HashOfSubjectPublicKey,
    AttributeType::HashOfIssuerPublicKey,
    AttributeType::PublicKeyInfo,
    AttributeType::Application,
    AttributeType::ObjectId,
];

/// Brings a CKM_ECDSA signature to raw `r‖s`, 32 bytes each. Tokens should answer 64 bytes; some
/// strip leading zeros, a few answer DER. Anything that is not a valid P-256 signature is an error.
pub(super) fn normalize_signature(sig: &[u8]) -> Result<[u8; 64]> {
    let mut out = [0u8; 64];
    if sig.len() == 64 {
        out.copy_from_slice(sig);
    } else if sig.first() == Some(&0x30) {
        out = encoding::signature_from_der(sig).map_err(|e| {
            BackendError::Crypto(format!("wrapped token returned a bad DER signature: {e}"))
        })?;
    } else if !sig.is_empty() && sig.len() % 2 == 0 {
        let half = sig.len() / 2;
        for (i, part) in sig.chunks(half).enumerate() {
            let significant = if half > 32 {
                let (pad, rest) = part.split_at(half - 32);
                if pad.iter().any(|&b| b != 0) {
                    return Err(BackendError::Crypto(format!(
                        "wrapped token returned a {}-byte signature that is not P-256",
                        sig.len()
                    )));
                }
                rest
            } else {
                part
            };
            let start = i * 32 + (32 - significant.len());
            out[start..(i + 1) * 32].copy_from_slice(significant);
        }
    } else {
        return Err(BackendError::Crypto(format!(
            "wrapped token returned a {}-byte signature",
            sig.len()
        )));
    }
    p256::ecdsa::Signature::from_slice(&out).map_err(|e| {
        BackendError::Crypto(format!("wrapped token returned an invalid signature: {e}"))
    })?;
    Ok(out)
}

/// The stable name of a key pair: derived from its public point, which never changes (CKA_ID and
/// CKA_LABEL can, and SoftHSM has no CKA_UNIQUE_ID).
pub(super) fn key_name(point: &[u8; 65]) -> String {
    format!("ec-{}", &hex(&Sha256::digest(point))[..32])
}

/// The name of a stored object: derived from its content, so it is the same in every process and
/// after a reconnect as long as the object is unchanged.
pub(super) fn object_name(attributes: &[RawAttribute]) -> String {
    let mut sorted: Vec<&RawAttribute> = attributes.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for (t, v) in sorted {
        h.update(t.to_le_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    format!("obj-{}", &hex(&h.finalize())[..24])
}

/// A raw attribute as `cryptoki` passes it to C_CreateObject / C_SetAttributeValue.
///
/// `cryptoki` 0.12 has no raw constructor; its `VendorDefined` variant carries `(type, bytes)`
/// verbatim into the CK_ATTRIBUTE it builds, which is exactly the encoding the token layer gives us.
pub(super) fn raw_to_attribute((t, value): &RawAttribute) -> Attribute {
    Attribute::VendorDefined((
        AttributeType::VendorDefined(*t as CK_ATTRIBUTE_TYPE),
        value.clone(),
    ))
}

fn ulong(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// A typed attribute read from the wrapped token, encoded as the token layer expects. `None` for
/// types outside [`OBJECT_ATTRIBUTES`].
pub(super) fn attribute_to_raw(a: &Attribute) -> Option<RawAttribute> {
    let t = CK_ATTRIBUTE_TYPE::from(a.attribute_type());
    let v = match a {
        Attribute::Token(b)
        | Attribute::Private(b)
        | Attribute::Modifiable(b)
        | Attribute::Copyable(b)
        | Attribute::Destroyable(b)
        | Attribute::Trusted(b) => vec![u8::from(*b)],
        Attribute::Class(c) => ulong(CK_OBJECT_CLASS::from(*c)),
        Attribute::CertificateType(c) => ulong(CK_CERTIFICATE_TYPE::from(*c)),
        Attribute::Label(v)
        | Attribute::Id(v)
        | Attribute::Value(v)
        | Attribute::CheckValue(v)
        | Attribute::Subject(v)
        | Attribute::Issuer(v)
        | Attribute::SerialNumber(v)
        | Attribute::Url(v)
        | Attribute::HashOfSubjectPublicKey(v)
        | Attribute::HashOfIssuerPublicKey(v)
        | Attribute::PublicKeyInfo(v)
        | Attribute::Application(v)
        | Attribute::ObjectId(v) => v.clone(),
        Attribute::StartDate(d) | Attribute::EndDate(d) => {
            if d.is_empty() {
                Vec::new()
            } else {
                let c = CK_DATE::from(*d);
                [&c.year[..], &c.month[..], &c.day[..]].concat()
            }
        }
        _ => return None,
    };
    Some((t, v))
}

/// The value of a raw CK_ULONG attribute.
pub(super) fn raw_ulong(attributes: &[RawAttribute], t: u64) -> Option<u64> {
    let (_, v) = attributes.iter().find(|(at, _)| *at == t)?;
    let bytes: [u8; 8] = v.as_slice().try_into().ok()?;
    Some(u64::from_ne_bytes(bytes))
}

/// The bytes of a raw attribute.
pub(super) fn raw_bytes(attributes: &[RawAttribute], t: u64) -> Option<&[u8]> {
    attributes
        .iter()
        .find(|(at, _)| *at == t)
        .map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_normalized() {
        let mut sig = [0u8; 64];
        sig[0] = 0; // r with a leading zero byte
        sig[1..32].fill(0x11);
        sig[32..].fill(0x22);
        assert_eq!(normalize_signature(&sig).unwrap(), sig);
        // stripped leading zero of r: 31 + 32 bytes is odd, refused
        assert!(normalize_signature(&sig[1..]).is_err());
        // both halves 31 bytes
        let mut short = [0u8; 62];
        short[..31].fill(0x11);
        short[31..].fill(0x22);
        let n = normalize_signature(&short).unwrap();
        assert_eq!(n[0], 0);
        assert_eq!(n[32], 0);
        assert_eq!(&n[1..32], &short[..31]);
        // DER
        let parsed = p256::ecdsa::Signature::from_slice(&sig).unwrap();
        let der = parsed.to_der();
        assert_eq!(normalize_signature(der.as_bytes()).unwrap(), sig);
        // zero is not a signature
        assert!(normalize_signature(&[0u8; 64]).is_err());
    }

    #[test]
    fn names_are_stable_and_order_free() {
        let a = vec![(0u64, vec![1u8]), (3, b"x".to_vec())];
        let b = vec![(3u64, b"x".to_vec()), (0, vec![1u8])];
        assert_eq!(object_name(&a), object_name(&b));
        assert!(object_name(&a).starts_with("obj-"));
        assert_eq!(key_name(&[4u8; 65]).len(), 35);
    }

    #[test]
    fn raw_round_trip_of_typed_values() {
        let (t, v) = attribute_to_raw(&Attribute::Class(
            cryptoki::object::ObjectClass::CERTIFICATE,
        ))
        .unwrap();
        assert_eq!(t, 0);
        assert_eq!(v, 1u64.to_ne_bytes().to_vec());
        let (t, v) = attribute_to_raw(&Attribute::Token(true)).unwrap();
        assert_eq!((t, v), (1, vec![1]));
    }
}
