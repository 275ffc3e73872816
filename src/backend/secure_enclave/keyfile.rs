//! The Secure Enclave store's files: one JSON document per key (`<name>.sekey`) and per stored
//! object (`<name>.seobj`), each with a `format` name and a `version`.
//!
//! A key file (format `devicekey-secure-enclave-key`, version 1):
//!
//! ```json
//! {
//!   "format": "devicekey-secure-enclave-key",
//!   "version": 1,
//!   "route": "enclave_blob",
//!   "id": "<CKA_ID, hex>",
//!   "label": "<CKA_LABEL>",
//!   "purpose": "general",
//!   "public_point": "<04‖X‖Y, 65 bytes, hex>",
//!   "handle": "<hex>",
//!   "created": 1767225600
//! }
//! ```
//!
//! `route` is `enclave_blob`, `enclave_keychain` or `os_keychain` (see `policy`). For
//! `enclave_blob`, `handle` is the Secure Enclave's token-object blob (`kSecAttrTokenOID`): the
//! private key wrapped by this Mac's enclave, useless anywhere else. For the keychain routes it is
//! the key's `kSecAttrApplicationLabel` (the SHA-1 of its public key), by which the keychain finds
//! it. `purpose` is `general` or `proof`. No file holds private key bytes in the clear.
//!
//! An object file (format `devicekey-secure-enclave-object`, version 1) holds `created` and
//! `attributes`, a list of `[type, "<value hex>"]` pairs.
//!
//! Reading checks everything: unknown fields, another format or version, bad hex, a point that is
//! not on P-256, an empty or oversized handle are all errors naming the problem.

use serde::{Deserialize, Serialize};

use super::policy::Route;
use crate::backend::{KeyPurpose, RawAttribute};
use crate::encoding::{self, POINT_LEN};

/// The `format` value of a key file.
pub const KEY_FORMAT: &str = "devicekey-secure-enclave-key";
/// The `format` value of an object file.
pub const OBJECT_FORMAT: &str = "devicekey-secure-enclave-object";
/// The only version written and read so far.
pub const VERSION: u32 = 1;
/// The extension of key files.
pub const KEY_EXT: &str = "sekey";
/// The extension of object files.
pub const OBJECT_EXT: &str = "seobj";
/// The largest handle accepted (enclave blobs are a few hundred bytes).
pub const MAX_HANDLE: usize = 16 * 1024;
/// The largest CKA_ID accepted.
pub const MAX_ID: usize = 1024;
/// The largest label accepted, in bytes.
pub const MAX_LABEL: usize = 1024;

/// A file that does not hold what it should.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(String);

fn bad(msg: impl Into<String>) -> FormatError {
    FormatError(msg.into())
}

/// One key of the store, as its file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    /// How the key was made and is found again.
    pub route: Route,
    /// CKA_ID.
    pub id: Vec<u8>,
    /// CKA_LABEL.
    pub label: String,
    /// What the key may be used for.
    pub purpose: KeyPurpose,
    /// SEC1 uncompressed public point.
    pub public_point: [u8; POINT_LEN],
    /// The token-object blob or the keychain application label.
    pub handle: Vec<u8>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyFile {
    format: String,
    version: u32,
    route: Route,
    id: String,
    label: String,
    purpose: KeyPurpose,
    public_point: String,
    handle: String,
    created: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjectFile {
    format: String,
    version: u32,
    created: u64,
    attributes: Vec<(u64, String)>,
}

fn check_header(format: &str, version: u32, expected: &str) -> Result<(), FormatError> {
    if format != expected {
        return Err(bad(format!("format is {format:?}, not {expected:?}")));
    }
    if version != VERSION {
        return Err(bad(format!(
            "version {version} is not {VERSION} (written by another devicekey version)"
        )));
    }
    Ok(())
}

fn unhex(field: &str, text: &str) -> Result<Vec<u8>, FormatError> {
    encoding::hex_decode(text).ok_or_else(|| bad(format!("{field} is not hex")))
}

impl KeyFile {
    fn check(&self) -> Result<(), FormatError> {
        if self.id.len() > MAX_ID {
            return Err(bad(format!(
                "id is {} bytes (at most {MAX_ID})",
                self.id.len()
            )));
        }
        if self.label.len() > MAX_LABEL {
            return Err(bad(format!(
                "label is {} bytes (at most {MAX_LABEL})",
                self.label.len()
            )));
        }
        if self.handle.is_empty() || self.handle.len() > MAX_HANDLE {
            return Err(bad(format!(
                "handle is {} bytes (1 to {MAX_HANDLE})",
                self.handle.len()
            )));
        }
        encoding::p256_point(&self.public_point).map_err(|e| bad(format!("public_point: {e}")))?;
        Ok(())
    }

    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.check()?;
        let raw = RawKeyFile {
            format: KEY_FORMAT.to_string(),
            version: VERSION,
            route: self.route,
            id: encoding::hex(&self.id),
            label: self.label.clone(),
            purpose: self.purpose,
            public_point: encoding::hex(&self.public_point),
            handle: encoding::hex(&self.handle),
            created: self.created,
        };
        pretty_json(&raw)
    }

    /// Parses and checks a key file.
    pub fn decode(bytes: &[u8]) -> Result<KeyFile, FormatError> {
        let raw: RawKeyFile =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a key file: {e}")))?;
        check_header(&raw.format, raw.version, KEY_FORMAT)?;
        let point = unhex("public_point", &raw.public_point)?;
        let public_point =
            encoding::p256_point(&point).map_err(|e| bad(format!("public_point: {e}")))?;
        let file = KeyFile {
            route: raw.route,
            id: unhex("id", &raw.id)?,
            label: raw.label,
            purpose: raw.purpose,
            public_point,
            handle: unhex("handle", &raw.handle)?,
            created: raw.created,
        };
        file.check()?;
        Ok(file)
    }
}

/// `raw` as pretty JSON with a final newline.
fn pretty_json<T: serde::Serialize>(raw: &T) -> Result<Vec<u8>, FormatError> {
    let mut bytes = serde_json::to_vec_pretty(raw).map_err(|e| bad(e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// One stored non-key object (a certificate, a data object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectFile {
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The object's attributes.
    pub attributes: Vec<RawAttribute>,
}

impl ObjectFile {
    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let raw = RawObjectFile {
            format: OBJECT_FORMAT.to_string(),
            version: VERSION,
            created: self.created,
            attributes: self
                .attributes
                .iter()
                .map(|(t, v)| (*t, encoding::hex(v)))
                .collect(),
        };
        pretty_json(&raw)
    }

    /// Parses and checks an object file.
    pub fn decode(bytes: &[u8]) -> Result<ObjectFile, FormatError> {
        let raw: RawObjectFile =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not an object file: {e}")))?;
        check_header(&raw.format, raw.version, OBJECT_FORMAT)?;
        let attributes = raw
            .attributes
            .into_iter()
            .map(|(t, v)| Ok((t, unhex("attribute value", &v)?)))
            .collect::<Result<Vec<_>, FormatError>>()?;
        Ok(ObjectFile {
            created: raw.created,
            attributes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::file_store::stem;

    fn point() -> [u8; POINT_LEN] {
        let key = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let sec1 = key.public_key().to_sec1_bytes();
        sec1.as_ref().try_into().unwrap()
    }

    fn sample() -> KeyFile {
        KeyFile {
            route: Route::EnclaveBlob,
            id: vec![1, 2, 3],
            label: "ssh key é".into(),
            purpose: KeyPurpose::Proof,
            public_point: point(),
            handle: (0..=255u8).cycle().take(570).collect(),
            created: 1_767_225_600,
        }
    }

    fn json(file: &KeyFile) -> serde_json::Value {
        serde_json::from_slice(&file.encode().unwrap()).unwrap()
    }

    fn decode_value(v: &serde_json::Value) -> Result<KeyFile, FormatError> {
        KeyFile::decode(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn key_files_round_trip_for_every_route() {
        for route in [
            Route::EnclaveBlob,
            Route::EnclaveKeychain,
            Route::OsKeychain,
        ] {
            let file = KeyFile { route, ..sample() };
            let bytes = file.encode().unwrap();
            assert_eq!(KeyFile::decode(&bytes).unwrap(), file);
        }
    }

    #[test]
    fn the_documented_fields_are_what_is_written() {
        let v = json(&sample());
        assert_eq!(v["format"], KEY_FORMAT);
        assert_eq!(v["version"], 1);
        assert_eq!(v["route"], "enclave_blob");
        assert_eq!(v["id"], "010203");
        assert_eq!(v["purpose"], "proof");
        assert_eq!(v["public_point"].as_str().unwrap().len(), 130);
        assert_eq!(v["handle"].as_str().unwrap().len(), 1140);
        assert_eq!(v.as_object().unwrap().len(), 9);
    }

    type Damage = fn(&mut serde_json::Value);

    #[test]
    fn damaged_key_files_are_rejected_with_the_reason() {
        let good = json(&sample());
        let cases: Vec<(&str, Damage, &str)> = vec![
            (
                "format",
                |v| v["format"] = "devicekey-software-key".into(),
                "format",
            ),
            ("version", |v| v["version"] = 2.into(), "version 2"),
            ("route", |v| v["route"] = "tpm".into(), "not a key file"),
            ("id hex", |v| v["id"] = "0g".into(), "id is not hex"),
            (
                "odd hex",
                |v| v["handle"] = "abc".into(),
                "handle is not hex",
            ),
            (
                "empty handle",
                |v| v["handle"] = "".into(),
                "handle is 0 bytes",
            ),
            (
                "huge handle",
                |v| v["handle"] = "00".repeat(MAX_HANDLE + 1).into(),
                "handle is",
            ),
            (
                "short point",
                |v| v["public_point"] = "04aa".into(),
                "public_point",
            ),
            (
                "point off the curve",
                |v| v["public_point"] = format!("04{}", "11".repeat(64)).into(),
                "public_point",
            ),
            ("unknown field", |v| v["extra"] = 1.into(), "unknown field"),
            (
                "missing field",
                |v| {
                    v.as_object_mut().unwrap().remove("label");
                },
                "missing field",
            ),
            ("purpose", |v| v["purpose"] = "any".into(), "not a key file"),
            (
                "huge id",
                |v| v["id"] = "00".repeat(MAX_ID + 1).into(),
                "id is",
            ),
        ];
        for (what, damage, expected) in cases {
            let mut v = good.clone();
            damage(&mut v);
            match decode_value(&v) {
                Err(e) => assert!(e.to_string().contains(expected), "{what}: {e}"),
                Ok(_) => panic!("{what}: a damaged file was accepted"),
            }
        }
    }

    #[test]
    fn truncated_and_garbage_bytes_are_rejected() {
        let bytes = sample().encode().unwrap();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 3] {
            assert!(KeyFile::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(KeyFile::decode(b"\xff\xfe\x00garbage").is_err());
        assert!(KeyFile::decode(b"[]").is_err());
    }

    #[test]
    fn an_invalid_key_is_not_written() {
        let mut file = sample();
        file.handle.clear();
        assert!(file.encode().is_err());
    }

    #[test]
    fn object_files_round_trip_and_reject_damage() {
        let file = ObjectFile {
            created: 5,
            attributes: vec![(0, vec![1]), (0x102, vec![]), (0x8000_0001, vec![9; 40])],
        };
        let bytes = file.encode().unwrap();
        assert_eq!(ObjectFile::decode(&bytes).unwrap(), file);
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["attributes"][0][1] = "zz".into();
        assert!(ObjectFile::decode(&serde_json::to_vec(&v).unwrap()).is_err());
        v = serde_json::from_slice(&bytes).unwrap();
        v["format"] = KEY_FORMAT.into();
        assert!(ObjectFile::decode(&serde_json::to_vec(&v).unwrap()).is_err());
        assert!(KeyFile::decode(&bytes).is_err());
    }

    #[test]
    fn only_store_made_names_are_stems() {
        let name = "0123456789abcdef0123456789abcdef";
        assert_eq!(stem(&format!("{name}.sekey"), KEY_EXT), Some(name));
        assert_eq!(stem(&format!("{name}.seobj"), KEY_EXT), None);
        assert_eq!(stem("x.sekey", KEY_EXT), None);
        assert_eq!(
            stem(&format!("{}.sekey", name.to_uppercase()), KEY_EXT),
            None
        );
        assert_eq!(stem(&format!("{name}sekey"), KEY_EXT), None);
    }
}
