//! On-disk formats of the software key store: one JSON document per key (`<name>.key`) and per
//! stored object (`<name>.obj`), each with a `format` name and a `version`, and the PIN file
//! (`pin`) of a store with `login = "pin"`.
//!
//! A key file of version 1 holds its scalar in the clear (`private_scalar`); one of version 2
//! (a store with a PIN) holds it sealed (`sealed_scalar`: AES-256-GCM under the store's data key,
//! see the `pin` module), and older code refuses it by its version instead of misreading it.
//!
//! Every buffer that holds private scalar bytes (the file contents, the hex text, the decoded
//! scalar) is a [`Zeroizing`] buffer.

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::backend::KeyPurpose;
use crate::encoding;

/// The `format` value of a key file.
pub const KEY_FORMAT: &str = "devicekey-software-key";
/// The `format` value of an object file.
pub const OBJECT_FORMAT: &str = "devicekey-software-object";
/// The version of object files and of key files with a clear scalar.
pub const VERSION: u32 = 1;
/// The version of key files with a sealed scalar.
pub const SEALED_VERSION: u32 = 2;
/// The `format` value of the PIN file.
pub const PIN_FORMAT: &str = "devicekey-software-pin";

/// A P-256 private scalar, big-endian, 32 bytes; hex in the file. It lives on the heap from the
/// moment it is decoded, so moving a `KeyFile` or a `Scalar` around moves a pointer and leaves no
/// copies of the scalar in dead stack frames (a move copies the bytes and wipes nothing).
pub struct Scalar(pub Box<Zeroizing<[u8; 32]>>);

/// Bytes written as lowercase hex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hex(pub Vec<u8>);

/// One key file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Always [`KEY_FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// CKA_ID.
    pub id: Hex,
    /// CKA_LABEL.
    pub label: String,
    /// What the key may be used for.
    pub purpose: KeyPurpose,
    /// SEC1 uncompressed public point (65 bytes).
    pub public_point: Hex,
    /// The private scalar in the clear (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_scalar: Option<Scalar>,
    /// The private scalar sealed under the store's data key (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_scalar: Option<Sealed>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

/// AES-256-GCM output: a 96-bit nonce and the ciphertext with its 128-bit tag.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The nonce (12 bytes, random).
    pub nonce: Hex,
    /// Ciphertext followed by the tag.
    pub ciphertext: Hex,
}

/// The Argon2id parameters and salt that turn a PIN into a key-encryption key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    /// Always `"argon2id"` (version 0x13).
    pub algorithm: String,
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub passes: u32,
    /// Lanes.
    pub lanes: u32,
    /// Random salt (16 bytes).
    pub salt: Hex,
}

/// The PIN file of a store with `login = "pin"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinFile {
    /// Always [`PIN_FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// How the key-encryption key is derived from the PIN.
    pub kdf: Kdf,
    /// The store's data key (32 bytes) sealed under the key-encryption key.
    pub wrapped_key: Sealed,
    /// Wrong PINs in a row (counted before each check finishes, reset by a right one).
    pub failures: u32,
    /// Key files may still hold their scalar in the clear (a first PIN was set and not every key
    /// was sealed yet): the next login seals them. Absent in older files, which means true.
    #[serde(default = "clear_keys_may_be_left")]
    pub clear_keys_left: bool,
}

fn clear_keys_may_be_left() -> bool {
    true
}

impl PinFile {
    /// The JSON text.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        json_line(self)
    }

    /// Parses and checks a PIN file.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let p: PinFile = parse_checked(bytes, |p: &PinFile| (&p.format, p.version), PIN_FORMAT)?;
        if p.kdf.algorithm != "argon2id" {
            return Err(format!(
                "key derivation {:?} is not argon2id",
                p.kdf.algorithm
            ));
        }
        Ok(p)
    }
}

/// One stored non-key object.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectFile {
    /// Always [`OBJECT_FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// `(attribute type, value)` pairs.
    pub attributes: Vec<(u64, Hex)>,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encoding::hex(&self.0))
    }
}

/// Reads a hex string in place (the text is never copied, which matters for the scalar) and
/// turns it into a `T` with `decode`.
struct HexVisitor<T> {
    expecting: &'static str,
    decode: fn(&str) -> Option<T>,
    invalid: &'static str,
}

impl<T> Visitor<'_> for HexVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.decode)(v).ok_or_else(|| E::custom(self.invalid))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(HexVisitor {
            expecting: "a hex string",
            decode: |v| encoding::hex_decode(v).map(Hex),
            invalid: "invalid hex",
        })
    }
}

impl Serialize for Scalar {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = Zeroizing::new([0u8; 64]);
        for (i, b) in self.0.iter().enumerate() {
            text[2 * i] = HEX[usize::from(b >> 4)];
            text[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        // Only hex digits were written, so this never fails.
        let r = match std::str::from_utf8(&text[..]) {
            Ok(t) => s.serialize_str(t),
            Err(_) => Err(serde::ser::Error::custom("hex is ASCII")),
        };
        text.zeroize();
        r
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(HexVisitor {
            expecting: "64 hex digits",
            decode: |v| {
                let mut out = Box::new(Zeroizing::new([0u8; 32]));
                encoding::hex_decode_into(v.as_bytes(), &mut out[..]).then(|| Scalar(out))
            },
            invalid: "private scalar is not 64 hex digits",
        })
    }
}

impl KeyFile {
    /// The JSON text, in a buffer that is wiped when dropped.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        // Reserve enough up front that the buffer never reallocates (a reallocation would leave
        // an unwiped copy of the scalar behind).
        let cap = 1024 + self.label.len() * 6 + self.id.0.len() * 2;
        let mut buf = Zeroizing::new(Vec::with_capacity(cap));
        serde_json::to_writer_pretty(&mut *buf, self)?;
        buf.push(b'\n');
        Ok(buf)
    }

    /// Parses and checks a key file.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let k: KeyFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if k.format != KEY_FORMAT {
            return Err(format!("format is {:?}, not {KEY_FORMAT:?}", k.format));
        }
        match (k.version, &k.private_scalar, &k.sealed_scalar) {
            (VERSION, Some(_), None) | (SEALED_VERSION, None, Some(_)) => {}
            (VERSION | SEALED_VERSION, _, _) => {
                return Err(format!(
                    "version {} needs exactly its {} field",
                    k.version,
                    if k.version == VERSION {
                        "private_scalar"
                    } else {
                        "sealed_scalar"
                    }
                ))
            }
            (v, _, _) => return Err(format!("unsupported version {v}")),
        }
        if k.public_point.0.len() != 65 || k.public_point.0[0] != 4 {
            return Err("public point is not 65-byte uncompressed SEC1".into());
        }
        Ok(k)
    }
}

impl ObjectFile {
    /// The JSON text.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        json_line(self)
    }

    /// Parses and checks an object file.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        parse_checked(
            bytes,
            |o: &ObjectFile| (&o.format, o.version),
            OBJECT_FORMAT,
        )
    }
}

/// A document as one line of JSON and a newline.
fn json_line<T: Serialize>(doc: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut v = serde_json::to_vec(doc)?;
    v.push(b'\n');
    Ok(v)
}

/// Parses a document and checks its `format` tag and `version` (read by `header`).
fn parse_checked<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    header: impl Fn(&T) -> (&String, u32),
    want: &str,
) -> Result<T, String> {
    let doc: T = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let (format, version) = header(&doc);
    check_header(format, version, want)?;
    Ok(doc)
}

/// Checks a file's `format` tag and `version`.
fn check_header(format: &str, version: u32, want: &str) -> Result<(), String> {
    if format != want {
        return Err(format!("format is {format:?}, not {want:?}"));
    }
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_json() -> serde_json::Value {
        let file = KeyFile {
            format: KEY_FORMAT.into(),
            version: VERSION,
            id: Hex(vec![1, 2]),
            label: "k".into(),
            purpose: KeyPurpose::General,
            public_point: Hex([4u8; 65].to_vec()),
            private_scalar: Some(Scalar(Box::new(Zeroizing::new([0xab; 32])))),
            sealed_scalar: None,
            created: 1,
        };
        serde_json::from_slice(&file.to_bytes().unwrap()).unwrap()
    }

    #[test]
    fn hex_fields_round_trip_and_refuse_what_is_not_hex() {
        let good = key_json();
        let parsed = KeyFile::parse(good.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.id, Hex(vec![1, 2]));
        assert_eq!(**parsed.private_scalar.unwrap().0, [0xab; 32]);
        for (field, value, reason) in [
            ("id", serde_json::json!("0g"), "invalid hex"),
            ("id", serde_json::json!(5), "a hex string"),
            (
                "private_scalar",
                serde_json::json!("ab"),
                "not 64 hex digits",
            ),
            (
                "private_scalar",
                serde_json::json!("zz".repeat(32)),
                "not 64 hex digits",
            ),
            ("private_scalar", serde_json::json!(5), "64 hex digits"),
            (
                "sealed_scalar",
                serde_json::json!({"nonce": "00", "ciphertext": "00"}),
                "exactly its private_scalar",
            ),
            ("version", serde_json::json!(2), "exactly its sealed_scalar"),
            ("version", serde_json::json!(3), "unsupported version 3"),
        ] {
            let mut v = good.clone();
            v[field] = value;
            let err = KeyFile::parse(v.to_string().as_bytes()).err().unwrap();
            assert!(err.contains(reason), "{field}: {err}");
        }
    }
}
