//! Fuzz harness (c): device-key payload validation and canonicalization.
//!
//! Properties checked on any input:
//! - bytes the token accepts for a proof-only key (`validate_signing_bytes`) are exactly the
//!   canonical signing bytes of a payload that passes `validate_payload`;
//! - a payload that parses has canonical bytes that parse back to the same canonical bytes, and
//!   the server's check (`validate_payload`) and the token's check (`validate_signing_bytes`) on
//!   those bytes agree;
//! - the canonical writer's output is JSON equal to its input, and canonicalizing it again
//!   changes nothing;
//! - key ids and origins parse without panicking; an accepted origin has no user info, query,
//!   fragment, path or whitespace.

use devicekey_pkcs11::proof::{self, ProofPolicy, SignPayload};
use serde_json::Value;

/// The clock every run uses, so results do not depend on when the fuzzer runs.
pub const NOW: u64 = 1_750_000_000;

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

fn policy() -> ProofPolicy {
    ProofPolicy::default()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let policy = policy();

    // 1. As the bytes a caller asks a proof-only key to sign.
    if proof::validate_signing_bytes(data, &policy, NOW).is_ok() {
        let envelope: Value = serde_json::from_slice(data).expect("accepted bytes are JSON");
        let payload: SignPayload = serde_json::from_value(envelope["payload"].clone())
            .expect("accepted bytes hold a payload");
        proof::validate_payload(&payload, &policy, NOW).expect("accepted payload validates");
        assert_eq!(
            proof::signing_bytes(&payload).expect("encodes"),
            data,
            "accepted bytes are canonical"
        );
    }

    // 2. As a payload on the wire (`device/key/sign` params).
    if let Ok(payload) = serde_json::from_slice::<SignPayload>(data) {
        let bytes = proof::signing_bytes(&payload).expect("a parsed payload encodes");
        let envelope: Value = serde_json::from_slice(&bytes).expect("canonical bytes are JSON");
        let again: SignPayload = serde_json::from_value(envelope["payload"].clone())
            .expect("canonical bytes parse back");
        assert_eq!(
            proof::signing_bytes(&again).expect("encodes"),
            bytes,
            "canonicalization is stable"
        );
        let server = proof::validate_payload(&payload, &policy, NOW);
        if bytes.len() <= proof::MAX_SIGNING_BYTES {
            let token = proof::validate_signing_bytes(&bytes, &policy, NOW);
            assert_eq!(
                server.is_ok(),
                token.is_ok(),
                "server and token disagree: server {server:?}, token {token:?}"
            );
        }
    }

    // 3. Any JSON value through the canonical writer. Values with floats are left out:
    // serde_json's default float parsing is best-effort (1 ULP off at times, e.g. a 34-digit
    // integer), so re-parsing may differ; payloads hold only strings and integers.
    if let Some(value) = serde_json::from_slice::<Value>(data)
        .ok()
        .filter(|v| !has_float(v))
    {
        let mut out = Vec::new();
        proof::write_canonical(&value, &mut out).expect("any value encodes");
        let back: Value = serde_json::from_slice(&out).expect("canonical output is JSON");
        assert_eq!(back, value, "canonical output means the same");
        let mut again = Vec::new();
        proof::write_canonical(&back, &mut again).expect("encodes");
        assert_eq!(again, out, "canonical output is a fixed point");
    }

    // 4. Key ids and origins.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = proof::parse_key_id(text) {
            assert_eq!(
                proof::key_id_for(id.class, &id.random),
                text,
                "key ids round-trip"
            );
        }
        if proof::is_allowed_origin(text, &policy.allowed_origin_hosts) {
            let rest = text.split_once("://").map(|(_, r)| r).unwrap_or("");
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            assert!(
                !authority.contains(['/', '@', '?', '#', '\\'])
                    && !text.chars().any(char::is_whitespace),
                "accepted origin {text:?}"
            );
        }
    }
}
