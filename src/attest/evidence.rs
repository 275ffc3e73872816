//! The evidence JSON of `device/key/attest`, parsed strictly: unknown and duplicate fields are
//! refused, base64 must be standard with padding, and `version` must be 1.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use super::{AttestError, Result};

/// The evidence as the device sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// `"format": "tpm"`: a key in a TPM, with what proves it.
    Tpm(TpmEvidence),
    /// `"format": "none"`: any other key; carries only its protection class.
    None {
        /// The class the device reports.
        protection_class: String,
    },
}

/// The decoded fields of `"format": "tpm"` evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmEvidence {
    /// SubjectPublicKeyInfo DER of the device key.
    pub spki_der: Vec<u8>,
    /// The device key's marshalled `TPMT_PUBLIC`.
    pub key_public_area: Vec<u8>,
    /// The marshalled `TPMS_ATTEST` that TPM2_Certify returned.
    pub certify_info: Vec<u8>,
    /// ECDSA P-256 signature (DER) by the AK over SHA-256(`certify_info`).
    pub signature_der: Vec<u8>,
    /// The AK's marshalled `TPMT_PUBLIC`.
    pub ak_public_area: Vec<u8>,
    /// The EK's marshalled `TPMT_PUBLIC`.
    pub ek_public_area: Vec<u8>,
    /// DER X.509: the EK certificate first, then CA certificates of its chain.
    pub ek_certificates: Vec<Vec<u8>>,
}

#[derive(Deserialize)]
#[serde(tag = "format")]
enum Wire {
    #[serde(rename = "tpm")]
    Tpm(WireTpm),
    #[serde(rename = "none")]
    None(WireNone),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireTpm {
    version: u32,
    public_key_spki_der_base64: String,
    key_public_area: String,
    certify_info: String,
    signature_der_base64: String,
    ak_public_area: String,
    ek_public_area: String,
    ek_certificates: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireNone {
    version: u32,
    protection_class: String,
}

fn b64(field: &str, text: &str) -> Result<Vec<u8>> {
    STANDARD
        .decode(text)
        .map_err(|e| AttestError::Evidence(format!("{field} is not standard base64: {e}")))
}

fn check_version(version: u32) -> Result<()> {
    if version == 1 {
        Ok(())
    } else {
        Err(AttestError::Evidence(format!(
            "version {version} is not supported (only 1)"
        )))
    }
}

impl Evidence {
    /// Parses the evidence JSON (the `result` of `device/key/attest`).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| AttestError::Evidence(e.to_string()))?;
        match wire {
            Wire::None(n) => {
                check_version(n.version)?;
                Ok(Evidence::None {
                    protection_class: n.protection_class,
                })
            }
            Wire::Tpm(t) => {
                check_version(t.version)?;
                if t.ek_certificates.is_empty() {
                    return Err(AttestError::Evidence(
                        "ekCertificates is empty: the EK certificate must come first".into(),
                    ));
                }
                Ok(Evidence::Tpm(TpmEvidence {
                    spki_der: b64("publicKeySpkiDerBase64", &t.public_key_spki_der_base64)?,
                    key_public_area: b64("keyPublicArea", &t.key_public_area)?,
                    certify_info: b64("certifyInfo", &t.certify_info)?,
                    signature_der: b64("signatureDerBase64", &t.signature_der_base64)?,
                    ak_public_area: b64("akPublicArea", &t.ak_public_area)?,
                    ek_public_area: b64("ekPublicArea", &t.ek_public_area)?,
                    ek_certificates: t
                        .ek_certificates
                        .iter()
                        .enumerate()
                        .map(|(i, c)| b64(&format!("ekCertificates[{i}]"), c))
                        .collect::<Result<_>>()?,
                }))
            }
        }
    }

    /// The evidence of a key in a TPM, or [`AttestError::NotInTpm`].
    pub fn into_tpm(self) -> Result<TpmEvidence> {
        match self {
            Evidence::Tpm(t) => Ok(t),
            Evidence::None { protection_class } => Err(AttestError::NotInTpm(protection_class)),
        }
    }
}

impl TpmEvidence {
    /// The evidence as JSON, field for field as the contract spells it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "format": "tpm",
            "version": 1,
            "publicKeySpkiDerBase64": STANDARD.encode(&self.spki_der),
            "keyPublicArea": STANDARD.encode(&self.key_public_area),
            "certifyInfo": STANDARD.encode(&self.certify_info),
            "signatureDerBase64": STANDARD.encode(&self.signature_der),
            "akPublicArea": STANDARD.encode(&self.ak_public_area),
            "ekPublicArea": STANDARD.encode(&self.ek_public_area),
            "ekCertificates": self.ek_certificates.iter().map(|c| STANDARD.encode(c)).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        TpmEvidence {
            spki_der: vec![1],
            key_public_area: vec![2],
            certify_info: vec![3],
            signature_der: vec![4],
            ak_public_area: vec![5],
            ek_public_area: vec![6],
            ek_certificates: vec![vec![7]],
        }
        .to_json()
    }

    #[test]
    fn round_trip() {
        let e = Evidence::from_json(sample().to_string().as_bytes()).unwrap();
        let t = e.into_tpm().unwrap();
        assert_eq!(t.ek_certificates, vec![vec![7]]);
        assert_eq!(t.spki_der, vec![1]);
    }

    /// Why the sample with `field` set to `value` is refused (panics if it is accepted).
    fn refusal(field: &str, value: serde_json::Value) -> String {
        let mut v = sample();
        v[field] = value;
        Evidence::from_json(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_field_refused() {
        let err = refusal("extra", 1.into());
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn duplicate_field_refused() {
        let text = sample().to_string();
        let dup = text.replacen(
            "\"certifyInfo\":\"Aw==\"",
            "\"certifyInfo\":\"Aw==\",\"certifyInfo\":\"Aw==\"",
            1,
        );
        assert_ne!(dup, text);
        let err = Evidence::from_json(dup.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("duplicate field"), "{err}");
        let dup_tag = text.replacen(
            "\"format\":\"tpm\"",
            "\"format\":\"tpm\",\"format\":\"tpm\"",
            1,
        );
        assert!(Evidence::from_json(dup_tag.as_bytes()).is_err());
    }

    #[test]
    fn bad_base64_and_version_refused() {
        refusal("certifyInfo", "Aw".into());
        let err = refusal("version", 2.into());
        assert!(err.contains("version 2"), "{err}");
    }

    #[test]
    fn format_none_is_refused_as_not_in_tpm() {
        let e = Evidence::from_json(
            br#"{"format":"none","version":1,"protectionClass":"os_protected_nonextractable"}"#,
        )
        .unwrap();
        let err = e.into_tpm().unwrap_err();
        assert!(matches!(err, AttestError::NotInTpm(ref c) if c == "os_protected_nonextractable"));
        assert!(err.to_string().contains("format \"none\""));
        assert!(Evidence::from_json(br#"{"format":"other","version":1}"#).is_err());
    }
}
