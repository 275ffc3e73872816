//! On-disk formats of the software key store: one JSON document per key (`<name>.key`) and per
//! stored object (`<name>.obj`), each with a `format` name and a `version`.
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
/// The only version written and read so far.
pub const VERSION: u32 = 1;

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
    /// The private scalar.
    pub private_scalar: Scalar,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
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
        check_header(&k.format, k.version, KEY_FORMAT)?;
        if k.public_point.0.len() != 65 || k.public_point.0[0] != 4 {
            return Err("public point is not 65-byte uncompressed SEC1".into());
        }
        Ok(k)
    }
}

impl ObjectFile {
    /// The JSON text.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut v = serde_json::to_vec(self)?;
        v.push(b'\n');
        Ok(v)
    }

    /// Parses and checks an object file.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let o: ObjectFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        check_header(&o.format, o.version, OBJECT_FORMAT)?;
        Ok(o)
    }
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
            private_scalar: Scalar(Box::new(Zeroizing::new([0xab; 32]))),
            created: 1,
        };
        serde_json::from_slice(&file.to_bytes().unwrap()).unwrap()
    }

    #[test]
    fn hex_fields_round_trip_and_refuse_what_is_not_hex() {
        let good = key_json();
        let parsed = KeyFile::parse(good.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.id, Hex(vec![1, 2]));
        assert_eq!(**parsed.private_scalar.0, [0xab; 32]);
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
        ] {
            let mut v = good.clone();
            v[field] = value;
            let err = KeyFile::parse(v.to_string().as_bytes()).err().unwrap();
            assert!(err.contains(reason), "{field}: {err}");
        }
    }
}
