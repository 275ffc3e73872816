//! Canonical JSON: object keys sorted by their UTF-8 bytes at every depth, no whitespace,
//! non-ASCII and `/` unescaped.
//!
//! The writer sorts keys itself rather than relying on `serde_json::Map`'s order, so the bytes do
//! not change if some other crate in the build turns on serde_json's `preserve_order` feature.
//! Strings and numbers are written by serde_json (which escapes only `"`, `\` and control
//! characters), so the output matches any serde_json-based implementation byte for byte.
//!
//! The signed bytes of a proof ([`signing_bytes`]) are written straight from the payload types,
//! whose fields are declared in canonical order: the server writes them for every signature and
//! the token rebuilds them to check what it is asked to sign, so this path is kept short.

use serde_json::Value;

use super::payload::{SignPayload, SIGN_DOMAIN};
use super::ProofError;

/// Writes `value` canonically into `out`.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), ProofError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(s, out)?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out)?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) -> Result<(), ProofError> {
    serde_json::to_writer(&mut *out, s).map_err(|e| ProofError::Encoding(e.to_string()))
}

/// The canonical bytes of any serializable value.
pub fn to_canonical_vec<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ProofError> {
    let value = serde_json::to_value(value).map_err(|e| ProofError::Encoding(e.to_string()))?;
    let mut out = Vec::with_capacity(512);
    write_canonical(&value, &mut out)?;
    Ok(out)
}

/// The exact bytes that are signed for `payload`:
/// the canonical form of `{"domain": "codex-device-key-sign-payload/v1", "payload": payload}`.
///
/// Written straight from the types, without building a `Value` and sorting it: the payload
/// structs declare their fields in the byte order of their JSON names, and `type`, which sorts
/// after all of them, is written last. serde_json's compact writer escapes strings and writes
/// integers exactly as [`write_canonical`] does, so the output is the canonical form; a test
/// holds it to [`to_canonical_vec`] for both payload types.
pub fn signing_bytes(payload: &SignPayload) -> Result<Vec<u8>, ProofError> {
    #[derive(serde::Serialize)]
    struct Tagged<'a, P> {
        #[serde(flatten)]
        fields: &'a P,
        #[serde(rename = "type")]
        tag: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Envelope<P> {
        domain: &'static str,
        payload: P,
    }
    let tag = payload.type_tag();
    let mut out = Vec::with_capacity(512);
    match payload {
        SignPayload::RemoteControlClientConnection(fields) => serde_json::to_writer(
            &mut out,
            &Envelope {
                domain: SIGN_DOMAIN,
                payload: Tagged { fields, tag },
            },
        ),
        SignPayload::RemoteControlClientEnrollment(fields) => serde_json::to_writer(
            &mut out,
            &Envelope {
                domain: SIGN_DOMAIN,
                payload: Tagged { fields, tag },
            },
        ),
    }
    .map_err(|e| ProofError::Encoding(e.to_string()))?;
    Ok(out)
}
