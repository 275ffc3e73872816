//! The attestation extension of `devicekey serve` (ATTESTATION.md): `device/key/attest` and
//! `device/key/activateCredential`.
//!
//! The server reaches keys through PKCS#11, which has no way to ask a TPM for TPM2_Certify. So
//! [`WithAttestation`] wraps the server's [`KeyService`]: the three protocol methods pass
//! through untouched, and the two extensions first ask the wrapped service for the key
//! (`device/key/public`: the same key-id checks and errors), then look for a key with the same
//! CKA_ID (the id's 32 bytes) *and* the same public point in the TPM stores of this process's
//! config, opened in-process (the same files and TPM our module uses; each store is opened on
//! first use and keeps its own connection). A key found there is certified by the store's AK;
//! any other key answers `"format": "none"` with its class. A key is never reported as in a TPM
//! on the strength of its class or its label: only the TPM's own TPM2_Certify of the same public
//! point says so.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::DeviceKeyError;
use super::server::KeyService;
use super::types::{CreateParams, KeyInfo, PublicParams, SignParams, SignResult};
use crate::backend::ProtectionClass;
use crate::config::Config;

/// `device/key/attest`.
pub const METHOD_ATTEST: &str = "device/key/attest";
/// `device/key/activateCredential`.
pub const METHOD_ACTIVATE: &str = "device/key/activateCredential";
/// The extension methods, as `initialize` lists them.
pub const EXTENSIONS: [&str; 2] = [METHOD_ATTEST, METHOD_ACTIVATE];

/// The domain separator of the qualifying data.
pub const QUALIFYING_DATA_CONTEXT: &[u8] = b"devicekey-tpm-attestation/v1";

type Result<T> = std::result::Result<T, DeviceKeyError>;

#[cfg(all(feature = "tpm", target_os = "linux"))]
use crate::backend::tpm::Evidence;

/// What a TPM store certifies (a build without TPM support has no TPM stores).
#[cfg(not(all(feature = "tpm", target_os = "linux")))]
pub struct Evidence {
    key_public_area: Vec<u8>,
    certify_info: Vec<u8>,
    signature: [u8; 64],
    ak_public_area: Vec<u8>,
    ek_public_area: Vec<u8>,
    ek_certificates: Vec<Vec<u8>>,
}

/// `device/key/attest` params.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestParams {
    /// The key id.
    pub key_id: String,
    /// Unpadded base64url of 16 to 64 bytes.
    pub nonce: String,
}

/// `device/key/activateCredential` params.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivateParams {
    /// The key id (selects the TPM store, whose AK answers).
    pub key_id: String,
    /// The marshalled TPM2B_ID_OBJECT, size included, standard base64.
    pub credential_blob_base64: String,
    /// The marshalled TPM2B_ENCRYPTED_SECRET, size included, standard base64.
    pub encrypted_secret_base64: String,
}

/// `device/key/activateCredential` result.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivateResult {
    /// The released secret, standard base64.
    pub secret_base64: String,
}

/// The evidence of a key in a TPM (field order as in ATTESTATION.md).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmEvidence {
    /// `"tpm"`.
    pub format: &'static str,
    /// 1.
    pub version: u32,
    /// As `device/key/public` answers it.
    pub public_key_spki_der_base64: String,
    /// TPMT_PUBLIC of the key.
    pub key_public_area: String,
    /// TPMS_ATTEST from TPM2_Certify.
    pub certify_info: String,
    /// The AK's signature, ASN.1 DER.
    pub signature_der_base64: String,
    /// TPMT_PUBLIC of the AK.
    pub ak_public_area: String,
    /// TPMT_PUBLIC of the EK.
    pub ek_public_area: String,
    /// DER certificates, the EK's first.
    pub ek_certificates: Vec<String>,
}

/// The answer for a key that is not in a TPM.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NoEvidence {
    /// `"none"`.
    pub format: &'static str,
    /// 1.
    pub version: u32,
    /// The key's class.
    pub protection_class: ProtectionClass,
}

/// `SHA-256("devicekey-tpm-attestation/v1" ‖ 0x00 ‖ nonce ‖ SPKI DER)`.
pub fn qualifying_data(nonce: &[u8], spki_der: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(QUALIFYING_DATA_CONTEXT);
    h.update([0u8]);
    h.update(nonce);
    h.update(spki_der);
    h.finalize().into()
}

/// The nonce's bytes, or the contract's error.
pub fn decode_nonce(nonce: &str) -> Result<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(nonce)
        .ok()
        .filter(|n| (16..=64).contains(&n.len()))
        .ok_or_else(|| {
            DeviceKeyError::InvalidRequest(
                "nonce must be unpadded base64url of 16 to 64 bytes".into(),
            )
        })
}

/// A marshalled TPM2B (2-byte big-endian size, then exactly that many bytes): its contents.
fn tpm2b_contents<'a>(bytes: &'a [u8], field: &str, what: &str) -> Result<&'a [u8]> {
    match bytes {
        [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => {
            Ok(rest)
        }
        _ => Err(DeviceKeyError::InvalidRequest(format!(
            "{field} must be a marshalled {what}, size included, in standard base64"
        ))),
    }
}

fn decode_b64(text: &str, field: &str, what: &str) -> Result<Vec<u8>> {
    STANDARD.decode(text).map_err(|_| {
        DeviceKeyError::InvalidRequest(format!(
            "{field} must be a marshalled {what}, size included, in standard base64"
        ))
    })
}

/// The key's CKA_ID and public point, from what `device/key/public` answered.
fn key_identity(info: &KeyInfo) -> Result<(Vec<u8>, [u8; 65])> {
    use p256::pkcs8::DecodePublicKey;
    let suffix = info.key_id.get(7..).ok_or(DeviceKeyError::KeyNotFound)?;
    let id = URL_SAFE_NO_PAD
        .decode(suffix)
        .map_err(|_| DeviceKeyError::KeyNotFound)?;
    let spki = STANDARD
        .decode(&info.public_key_spki_der_base64)
        .map_err(|e| DeviceKeyError::Crypto(format!("the key's SPKI is not base64: {e}")))?;
    let key = p256::PublicKey::from_public_key_der(&spki)
        .map_err(|e| DeviceKeyError::Crypto(format!("the key's SPKI does not parse: {e}")))?;
    let point: [u8; 65] = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false)
        .as_bytes()
        .try_into()
        .map_err(|_| DeviceKeyError::Crypto("the key's point is not 65 bytes".into()))?;
    Ok((id, point))
}

/// A [`KeyService`] with the attestation extension.
pub struct WithAttestation<S> {
    inner: S,
    stores: TpmStores,
}

impl<S: KeyService> WithAttestation<S> {
    /// Wraps `inner`; the TPM stores are the `[[slot]] backend = "tpm"` of `config`.
    pub fn new(inner: S, config: &Config) -> Self {
        Self {
            inner,
            stores: TpmStores::new(config),
        }
    }

    /// `device/key/attest`.
    pub fn attest(&self, params: AttestParams) -> Result<Value> {
        let nonce = decode_nonce(&params.nonce)?;
        let info = self.inner.public(PublicParams {
            key_id: params.key_id,
        })?;
        let (id, point) = key_identity(&info)?;
        let spki = STANDARD
            .decode(&info.public_key_spki_der_base64)
            .map_err(|e| DeviceKeyError::Crypto(format!("the key's SPKI is not base64: {e}")))?;
        let qualifying = qualifying_data(&nonce, &spki);
        match self.stores.attest(&id, &point, &qualifying)? {
            Some(evidence) => to_value(&TpmEvidence {
                format: "tpm",
                version: 1,
                public_key_spki_der_base64: info.public_key_spki_der_base64,
                key_public_area: STANDARD.encode(&evidence.key_public_area),
                certify_info: STANDARD.encode(&evidence.certify_info),
                signature_der_base64: STANDARD.encode(
                    crate::encoding::signature_to_der(&evidence.signature)
                        .map_err(|e| DeviceKeyError::Crypto(e.to_string()))?,
                ),
                ak_public_area: STANDARD.encode(&evidence.ak_public_area),
                ek_public_area: STANDARD.encode(&evidence.ek_public_area),
                ek_certificates: evidence
                    .ek_certificates
                    .iter()
                    .map(|c| STANDARD.encode(c))
                    .collect(),
            }),
            None => to_value(&NoEvidence {
                format: "none",
                version: 1,
                protection_class: info.protection_class,
            }),
        }
    }

    /// `device/key/activateCredential`.
    pub fn activate(&self, params: ActivateParams) -> Result<Value> {
        const BLOB: (&str, &str) = ("credentialBlobBase64", "TPM2B_ID_OBJECT");
        const SECRET: (&str, &str) = ("encryptedSecretBase64", "TPM2B_ENCRYPTED_SECRET");
        let blob = decode_b64(&params.credential_blob_base64, BLOB.0, BLOB.1)?;
        let secret = decode_b64(&params.encrypted_secret_base64, SECRET.0, SECRET.1)?;
        let blob = tpm2b_contents(&blob, BLOB.0, BLOB.1)?;
        let secret = tpm2b_contents(&secret, SECRET.0, SECRET.1)?;
        let info = self.inner.public(PublicParams {
            key_id: params.key_id,
        })?;
        let (id, point) = key_identity(&info)?;
        let released = self.stores.activate(&id, &point, blob, secret)?;
        to_value(&ActivateResult {
            secret_base64: STANDARD.encode(&released),
        })
    }
}

fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| DeviceKeyError::Platform(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(params: Value) -> Result<T> {
    serde_json::from_value(params).map_err(|e| DeviceKeyError::InvalidRequest(e.to_string()))
}

impl<S: KeyService> KeyService for WithAttestation<S> {
    fn create(&self, params: CreateParams) -> Result<KeyInfo> {
        self.inner.create(params)
    }

    fn public(&self, params: PublicParams) -> Result<KeyInfo> {
        self.inner.public(params)
    }

    fn sign(&self, params: SignParams) -> Result<SignResult> {
        self.inner.sign(params)
    }

    fn extension(&self, method: &str, params: Value) -> Option<Result<Value>> {
        match method {
            METHOD_ATTEST => Some(parse(params).and_then(|p| self.attest(p))),
            METHOD_ACTIVATE => Some(parse(params).and_then(|p| self.activate(p))),
            _ => None,
        }
    }
}

/// The TPM stores of the config, opened on first use.
struct TpmStores {
    #[cfg(all(feature = "tpm", target_os = "linux"))]
    slots: Vec<(
        crate::config::TpmSlot,
        std::sync::Mutex<Option<std::sync::Arc<crate::backend::tpm::TpmBackend>>>,
    )>,
}

#[cfg(all(feature = "tpm", target_os = "linux"))]
impl TpmStores {
    fn new(config: &Config) -> Self {
        let slots = config
            .slots
            .iter()
            .filter_map(|s| match s {
                crate::config::SlotConfig::Tpm(t) => Some((t.clone(), std::sync::Mutex::new(None))),
                _ => None,
            })
            .collect();
        Self { slots }
    }

    /// Each TPM store, opening it if needed.
    fn each(
        &self,
    ) -> impl Iterator<Item = Result<std::sync::Arc<crate::backend::tpm::TpmBackend>>> + '_ {
        use std::sync::Arc;
        self.slots.iter().map(|(slot, cell)| {
            let mut guard = cell
                .lock()
                .map_err(|_| DeviceKeyError::Platform("a TPM store lock is poisoned".into()))?;
            if let Some(store) = guard.as_ref() {
                return Ok(Arc::clone(store));
            }
            let store = Arc::new(
                crate::backend::tpm::TpmBackend::from_slot(slot)
                    .map_err(|e| DeviceKeyError::Platform(e.to_string()))?,
            );
            *guard = Some(Arc::clone(&store));
            Ok(store)
        })
    }
}

#[cfg(not(all(feature = "tpm", target_os = "linux")))]
impl TpmStores {
    fn new(_: &Config) -> Self {
        Self {}
    }
}

/// A build without TPM support has no TPM stores, so it finds no key in them.
impl TpmStores {
    fn attest(
        &self,
        id: &[u8],
        point: &[u8; 65],
        qualifying: &[u8; 32],
    ) -> Result<Option<Evidence>> {
        #[cfg(all(feature = "tpm", target_os = "linux"))]
        for store in self.each() {
            if let Some(evidence) = store?
                .attest(id, point, qualifying)
                .map_err(|e| DeviceKeyError::Platform(e.to_string()))?
            {
                return Ok(Some(evidence));
            }
        }
        #[cfg(not(all(feature = "tpm", target_os = "linux")))]
        let _ = (id, point, qualifying);
        Ok(None)
    }

    fn activate(
        &self,
        id: &[u8],
        point: &[u8; 65],
        blob: &[u8],
        secret: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        #[cfg(all(feature = "tpm", target_os = "linux"))]
        for store in self.each() {
            let store = store?;
            if store
                .holds_key(id, point)
                .map_err(|e| DeviceKeyError::Platform(e.to_string()))?
            {
                return store
                    .activate_credential(blob, secret)
                    .map_err(|e| DeviceKeyError::Platform(e.to_string()));
            }
        }
        #[cfg(not(all(feature = "tpm", target_os = "linux")))]
        let _ = (id, point, blob, secret);
        Err(not_in_tpm())
    }
}

fn not_in_tpm() -> DeviceKeyError {
    DeviceKeyError::InvalidRequest(
        "the key is not in a TPM, so there is no attestation key to activate a credential".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_rules() {
        let ok = URL_SAFE_NO_PAD.encode([7u8; 16]);
        assert_eq!(decode_nonce(&ok).unwrap(), vec![7u8; 16]);
        assert!(decode_nonce(&URL_SAFE_NO_PAD.encode([7u8; 64])).is_ok());
        for bad in [
            URL_SAFE_NO_PAD.encode([7u8; 15]),
            URL_SAFE_NO_PAD.encode([7u8; 65]),
            STANDARD.encode([0xfbu8; 18]),
            format!("{ok}=="),
            String::new(),
        ] {
            let e = decode_nonce(&bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                "Invalid request: nonce must be unpadded base64url of 16 to 64 bytes"
            );
            assert_eq!(e.code(), super::super::error::INVALID_REQUEST);
        }
    }

    #[test]
    fn qualifying_data_is_the_contracts() {
        let mut m = b"devicekey-tpm-attestation/v1\0".to_vec();
        m.extend_from_slice(b"NONCE");
        m.extend_from_slice(b"SPKI");
        assert_eq!(
            qualifying_data(b"NONCE", b"SPKI"),
            <[u8; 32]>::from(Sha256::digest(&m))
        );
    }

    #[test]
    fn tpm2b_sizes_are_checked() {
        assert_eq!(tpm2b_contents(&[0, 2, 9, 9], "f", "X").unwrap(), &[9, 9]);
        assert!(tpm2b_contents(&[0, 3, 9, 9], "f", "X").is_err());
        assert!(tpm2b_contents(&[0], "f", "X").is_err());
    }
}
