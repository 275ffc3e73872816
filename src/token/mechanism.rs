//! The mechanisms we offer, their info, digest normalization, and the hash functions.

use cryptoki_sys::*;
use sha2::Digest;

use super::error::{fail, Result};

/// Every mechanism of every slot, in the order C_GetMechanismList reports them.
pub const MECHANISMS: &[CK_MECHANISM_TYPE] = &[
    CKM_EC_KEY_PAIR_GEN,
    CKM_ECDSA,
    CKM_ECDSA_SHA256,
    CKM_ECDSA_SHA384,
    CKM_ECDSA_SHA512,
    CKM_SHA256,
    CKM_SHA384,
    CKM_SHA512,
];

/// CKA_ALLOWED_MECHANISMS of a general private key.
pub const PRIVATE_KEY_MECHANISMS: &[CK_MECHANISM_TYPE] = &[
    CKM_ECDSA,
    CKM_ECDSA_SHA256,
    CKM_ECDSA_SHA384,
    CKM_ECDSA_SHA512,
];

/// CKA_ALLOWED_MECHANISMS of a public key.
pub const PUBLIC_KEY_MECHANISMS: &[CK_MECHANISM_TYPE] = PRIVATE_KEY_MECHANISMS;

/// The length of a P-256 signature, raw `r‖s`.
pub const SIGNATURE_LEN: usize = 64;

/// C_GetMechanismInfo.
pub fn info(mech: CK_MECHANISM_TYPE, hardware: bool) -> Result<CK_MECHANISM_INFO> {
    let ec = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
    let hw = if hardware { CKF_HW } else { 0 };
    let (min, max, flags) = match mech {
        CKM_EC_KEY_PAIR_GEN => (256, 256, CKF_GENERATE_KEY_PAIR | ec | hw),
        CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 | CKM_ECDSA_SHA512 => {
            (256, 256, CKF_SIGN | CKF_VERIFY | ec | hw)
        }
        CKM_SHA256 | CKM_SHA384 | CKM_SHA512 => (0, 0, CKF_DIGEST),
        _ => return fail(CKR_MECHANISM_INVALID),
    };
    Ok(CK_MECHANISM_INFO {
        ulMinKeySize: min,
        ulMaxKeySize: max,
        flags,
    })
}

/// A running hash.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-384.
    Sha384(sha2::Sha384),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// The hash of a digest or ECDSA-with-hash mechanism; `None` for plain CKM_ECDSA.
    pub fn for_mechanism(mech: CK_MECHANISM_TYPE) -> Option<Self> {
        match mech {
            CKM_SHA256 | CKM_ECDSA_SHA256 => Some(Self::Sha256(sha2::Sha256::new())),
            CKM_SHA384 | CKM_ECDSA_SHA384 => Some(Self::Sha384(sha2::Sha384::new())),
            CKM_SHA512 | CKM_ECDSA_SHA512 => Some(Self::Sha512(sha2::Sha512::new())),
            _ => None,
        }
    }

    /// The digest length.
    pub fn output_len(&self) -> usize {
        match self {
            Self::Sha256(_) => 32,
            Self::Sha384(_) => 48,
            Self::Sha512(_) => 64,
        }
    }

    /// Feeds data.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha384(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    /// The digest.
    pub fn finish(self) -> Vec<u8> {
        match self {
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::Sha384(h) => h.finalize().to_vec(),
            Self::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// Turns a CKM_ECDSA input into the 32-byte value a P-256 key signs.
///
/// The input is a digest: 20, 28, 32, 48 or 64 bytes. As the spec says for a 256-bit key, a
/// longer digest keeps its leftmost 256 bits, and a shorter one is taken as a big-endian integer
/// (left-padded with zeros). Any other length is `CKR_DATA_LEN_RANGE`.
pub fn normalize_digest(input: &[u8]) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    match input.len() {
        20 | 28 | 32 => out[32 - input.len()..].copy_from_slice(input),
        48 | 64 => out.copy_from_slice(&input[..32]),
        _ => return fail(CKR_DATA_LEN_RANGE),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_normalized_as_the_spec_says() {
        let d20 = [0xabu8; 20];
        let n = normalize_digest(&d20).unwrap();
        assert_eq!(&n[..12], &[0u8; 12]);
        assert_eq!(&n[12..], &d20);
        let d64: Vec<u8> = (0..64).collect();
        assert_eq!(&normalize_digest(&d64).unwrap()[..], &d64[..32]);
        assert_eq!(
            normalize_digest(&[0u8; 31]).unwrap_err().rv,
            CKR_DATA_LEN_RANGE
        );
        assert_eq!(normalize_digest(&[]).unwrap_err().rv, CKR_DATA_LEN_RANGE);
    }
}
