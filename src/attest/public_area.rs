//! `TPMT_PUBLIC`: parsing (through tss-esapi's `Public`), the object's name, its public key, and
//! the attribute rules the contract sets for AKs, device keys and EKs.

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public as PublicKeyKind};
use openssl::rsa::Rsa;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::algorithm::SymmetricMode;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::{AesKeyBits, RsaKeyBits};
use tss_esapi::structures::{Public, SymmetricDefinitionObject};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::{exactly_one, sha256};

/// The `TPM_ALG_SHA256` prefix of a name.
pub const NAME_ALG_SHA256: [u8; 2] = [0x00, 0x0b];

/// A parsed public area together with the exact bytes it came from.
#[derive(Debug, Clone)]
pub struct PublicArea {
    bytes: Vec<u8>,
    public: Public,
}

/// The EK's key and what MakeCredential needs of it.
#[derive(Debug)]
pub(crate) enum EkKey {
    /// RSA 2048: the OAEP-encrypted seed.
    Rsa(PKey<PublicKeyKind>),
    /// ECC P-256: the ECDH seed; the point's x as it is in the public area (KDFe's PartyVInfo).
    Ecc {
        key: PKey<PublicKeyKind>,
        x: Vec<u8>,
    },
}

impl PublicArea {
    /// Parses a marshalled `TPMT_PUBLIC` (no `TPM2B` size prefix). The bytes must be exactly one
    /// canonical structure: marshalling the parsed value again must give them back.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let public = Public::unmarshall(bytes)
            .map_err(|e| format!("not a TPMT_PUBLIC ({} bytes): {e}", bytes.len()))?;
        exactly_one("canonical TPMT_PUBLIC", bytes, public.marshall())?;
        Ok(Self {
            bytes: bytes.to_vec(),
            public,
        })
    }

    /// The marshalled bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The parsed structure.
    pub fn public(&self) -> &Public {
        &self.public
    }

    /// The object's name: `0x000b ‖ SHA-256(public area)` (only SHA-256 names exist here: every
    /// rule below refuses another nameAlg).
    pub fn name(&self) -> Vec<u8> {
        let mut name = NAME_ALG_SHA256.to_vec();
        name.extend_from_slice(&sha256(&self.bytes));
        name
    }

    /// The uncompressed SEC1 point of an ECC P-256 key, checked to be on the curve.
    pub fn p256_point(&self) -> Result<[u8; crate::encoding::POINT_LEN], String> {
        match &self.public {
            Public::Ecc {
                parameters, unique, ..
            } => {
                if parameters.ecc_curve() != EccCurve::NistP256 {
                    return Err(format!(
                        "the curve is {:?}, not NIST P-256",
                        parameters.ecc_curve()
                    ));
                }
                let (x, y) = (unique.x().value(), unique.y().value());
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!(
                        "the point's coordinates are {} and {} bytes, not 32",
                        x.len(),
                        y.len()
                    ));
                }
                let mut sec1 = vec![0x04];
                sec1.extend_from_slice(x);
                sec1.extend_from_slice(y);
                crate::encoding::p256_point(&sec1).map_err(|e| e.to_string())
            }
            other => Err(format!("the key is {}, not ECC", kind(other))),
        }
    }

    /// The public key of a P-256 key, for OpenSSL.
    pub(crate) fn p256_pkey(&self) -> Result<PKey<PublicKeyKind>, String> {
        let point = self.p256_point()?;
        let ossl = || -> Result<PKey<PublicKeyKind>, openssl::error::ErrorStack> {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
            let x = BigNum::from_slice(&point[1..33])?;
            let y = BigNum::from_slice(&point[33..])?;
            PKey::from_ec_key(EcKey::from_public_key_affine_coordinates(&group, &x, &y)?)
        };
        ossl().map_err(|e| format!("OpenSSL refuses the point: {e}"))
    }

    /// Checks the attributes every key here needs (`fixedTPM`, `fixedParent`,
    /// `sensitiveDataOrigin`, `sign` set, `decrypt` clear), with `restricted` as asked, plus
    /// nameAlg SHA-256 and ECC P-256.
    pub fn check_signing_key(&self, restricted: bool) -> Result<(), String> {
        if self.public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
            return Err(format!(
                "nameAlg is {:?}, not SHA-256",
                self.public.name_hashing_algorithm()
            ));
        }
        self.p256_point()?;
        let a = self.public.object_attributes();
        let mut problems = Vec::new();
        for (set, name) in [
            (a.fixed_tpm(), "fixedTPM"),
            (a.fixed_parent(), "fixedParent"),
            (a.sensitive_data_origin(), "sensitiveDataOrigin"),
            (a.sign_encrypt(), "sign"),
        ] {
            if !set {
                problems.push(format!("{name} is clear"));
            }
        }
        if a.decrypt() {
            problems.push("decrypt is set".into());
        }
        if a.restricted() != restricted {
            problems.push(format!(
                "restricted is {}",
                if a.restricted() { "set" } else { "clear" }
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join(", "))
        }
    }

    /// Checks that this is an EK MakeCredential can target (a restricted decryption key,
    /// nameAlg SHA-256, RSA 2048 or ECC P-256, AES-CFB protection) and returns its key.
    pub(crate) fn ek_key(&self) -> Result<(EkKey, usize), String> {
        if self.public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
            return Err(format!(
                "the EK's nameAlg is {:?}, not SHA-256",
                self.public.name_hashing_algorithm()
            ));
        }
        let a = self.public.object_attributes();
        if !a.restricted() || !a.decrypt() || a.sign_encrypt() {
            return Err("the EK is not a restricted decryption key".into());
        }
        let (symmetric, key) = match &self.public {
            Public::Rsa {
                parameters, unique, ..
            } => {
                if parameters.key_bits() != RsaKeyBits::Rsa2048 || unique.value().len() != 256 {
                    return Err("the EK's RSA key is not 2048 bits".into());
                }
                let e = match parameters.exponent().value() {
                    0 => 65537,
                    e => e,
                };
                let ossl = || -> Result<PKey<PublicKeyKind>, openssl::error::ErrorStack> {
                    PKey::from_rsa(Rsa::from_public_components(
                        BigNum::from_slice(unique.value())?,
                        BigNum::from_u32(e)?,
                    )?)
                };
                let key = ossl().map_err(|e| format!("OpenSSL refuses the EK's RSA key: {e}"))?;
                (parameters.symmetric_definition_object(), EkKey::Rsa(key))
            }
            Public::Ecc {
                parameters, unique, ..
            } => {
                let key = self.p256_pkey().map_err(|e| format!("the EK's key: {e}"))?;
                let x = unique.x().value().to_vec();
                (
                    parameters.symmetric_definition_object(),
                    EkKey::Ecc { key, x },
                )
            }
            other => return Err(format!("the EK is {}, not RSA or ECC", kind(other))),
        };
        let aes_key_len = match symmetric {
            SymmetricDefinitionObject::Aes {
                key_bits,
                mode: SymmetricMode::Cfb,
            } => match key_bits {
                AesKeyBits::Aes128 => 16,
                AesKeyBits::Aes256 => 32,
                other => return Err(format!("the EK's AES key size {other:?} is not supported")),
            },
            other => {
                return Err(format!(
                    "the EK's symmetric algorithm {other:?} is not AES-CFB"
                ))
            }
        };
        Ok((key, aes_key_len))
    }

    /// The EK's public key, for comparing with its certificate.
    pub(crate) fn ek_pkey(&self) -> Result<PKey<PublicKeyKind>, String> {
        Ok(match self.ek_key()?.0 {
            EkKey::Rsa(k) => k,
            EkKey::Ecc { key, .. } => key,
        })
    }
}

fn kind(public: &Public) -> &'static str {
    match public {
        Public::Rsa { .. } => "RSA",
        Public::Ecc { .. } => "ECC",
        Public::KeyedHash { .. } => "a keyed hash",
        Public::SymCipher { .. } => "a symmetric cipher",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AK's public area as tpm2_createak wrote it (swtpm), and the name tpm2-tools gave it.
    const AK: &str = "0023000b00050072000000100018000b000300100020450effad5cd998c04ec1fd6ee66cf4dd8f86a3fe5acc2cc695bfd78f5eed22730020bb648085e15a969669ea42a6d69ff5dbfab844b5bbff47d21b40236277ad290c";
    const AK_NAME: &str = "000b469e6eed427110fbbb85fa7d2f71f0448970abcf46f10cacffa83c82ae2bf5a7";

    fn ak_bytes() -> Vec<u8> {
        hex::decode(AK).unwrap()
    }

    #[test]
    fn name_matches_tpm2_tools() {
        let ak = PublicArea::parse(&ak_bytes()).unwrap();
        assert_eq!(hex::encode(ak.name()), AK_NAME);
        assert_eq!(ak.p256_point().unwrap()[0], 0x04);
        ak.check_signing_key(true).unwrap();
    }

    #[test]
    fn attribute_rules_name_what_is_wrong() {
        let ak = PublicArea::parse(&ak_bytes()).unwrap();
        assert_eq!(
            ak.check_signing_key(false).unwrap_err(),
            "restricted is set"
        );

        // objectAttributes is the big-endian u32 at offset 4: restricted is bit 16, decrypt 17,
        // sign 18, fixedTPM 1.
        // nameAlg is the big-endian u16 at offset 2 (0x000c: SHA-384).
        type Damage = fn(&mut Vec<u8>);
        let damaged: [(Damage, &str); 3] = [
            (|b| b[5] &= !0x01, "restricted is clear"),
            (
                |b| {
                    b[5] |= 0x02;
                    b[7] &= !0x02;
                },
                "fixedTPM is clear, decrypt is set",
            ),
            (|b| b[3] = 0x0c, "nameAlg is Sha384, not SHA-256"),
        ];
        for (damage, reason) in damaged {
            let mut bytes = ak_bytes();
            damage(&mut bytes);
            let err = PublicArea::parse(&bytes)
                .unwrap()
                .check_signing_key(true)
                .unwrap_err();
            assert_eq!(err, reason);
        }
    }

    #[test]
    fn trailing_and_truncated_bytes_refused() {
        let mut bytes = ak_bytes();
        bytes.push(0);
        let err = PublicArea::parse(&bytes).unwrap_err();
        assert!(err.contains("canonical"), "{err}");
        let bytes = ak_bytes();
        assert!(PublicArea::parse(&bytes[..bytes.len() - 1]).is_err());
        assert!(PublicArea::parse(&[]).is_err());
    }

    #[test]
    fn an_ak_is_not_an_ek() {
        let ak = PublicArea::parse(&ak_bytes()).unwrap();
        let err = ak.ek_key().unwrap_err();
        assert!(err.contains("restricted decryption"), "{err}");
    }
}
