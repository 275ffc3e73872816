//! A check that a signature a device returned was made by the key we think it was.
//!
//! Backends that sign in a device (a TPM, a wrapped token) check signatures before they leave, to
//! catch a handle that names another key. The check uses OpenSSL with the public key parsed once:
//! on this path it costs a fraction of what a pure-Rust verification does.

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Public;

/// Verifies raw `r‖s` P-256 signatures with one public key.
pub struct PointVerifier(EcKey<Public>);

impl std::fmt::Debug for PointVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PointVerifier")
    }
}

impl PointVerifier {
    /// The verifier of a SEC1 uncompressed point; `None` if the point is not on P-256.
    pub fn new(point: &[u8; 65]) -> Option<Self> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).ok()?;
        let mut ctx = openssl::bn::BigNumContext::new().ok()?;
        let p = EcPoint::from_bytes(&group, point, &mut ctx).ok()?;
        let key = EcKey::from_public_key(&group, &p).ok()?;
        key.check_key().ok()?;
        Some(Self(key))
    }

    /// True when `rs` is a valid signature of `digest`.
    pub fn verify(&self, digest: &[u8; 32], rs: &[u8; 64]) -> bool {
        let sig = BigNum::from_slice(&rs[..32])
            .and_then(|r| BigNum::from_slice(&rs[32..]).map(|s| (r, s)))
            .and_then(|(r, s)| EcdsaSig::from_private_components(r, s));
        match sig {
            Ok(sig) => sig.verify(digest, &self.0).unwrap_or(false),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashSigner;

    #[test]
    fn accepts_good_and_refuses_bad_signatures() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let point: [u8; 65] = sk
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .try_into()
            .unwrap();
        let digest = [9u8; 32];
        let sig: p256::ecdsa::Signature = sk.sign_prehash(&digest).unwrap();
        let mut rs: [u8; 64] = sig.to_bytes().into();
        let v = PointVerifier::new(&point).unwrap();
        assert!(v.verify(&digest, &rs));
        rs[10] ^= 1;
        assert!(!v.verify(&digest, &rs));
        assert!(!v.verify(&[8u8; 32], &sig.to_bytes().into()));
        assert!(PointVerifier::new(&[4u8; 65]).is_none());
    }
}
