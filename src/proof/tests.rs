//! Unit tests of the proof layer: the protocol's two byte vectors and every validation rule.

use super::*;
use sha2::{Digest, Sha256};

const NONCE: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const HASH: &str = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";

const CONNECTION_VECTOR: &str = r#"{"domain":"codex-device-key-sign-payload/v1","payload":{"accountUserId":"account-user-1","audience":"remote_control_client_websocket","clientId":"cli_123","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","scopes":["remote_control_controller_websocket"],"sessionId":"wssess_123","targetOrigin":"https://chatgpt.com","targetPath":"/api/codex/remote/control/client","tokenExpiresAt":1700000000,"tokenSha256Base64url":"47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU","type":"remoteControlClientConnection"}}"#;
const ENROLLMENT_VECTOR: &str = r#"{"domain":"codex-device-key-sign-payload/v1","payload":{"accountUserId":"account-user-1","audience":"remote_control_client_enrollment","challengeExpiresAt":1700000060,"challengeId":"rch_123","clientId":"cli_123","deviceIdentitySha256Base64url":"47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","targetOrigin":"https://chatgpt.com","targetPath":"/wham/remote/control/client/enroll","type":"remoteControlClientEnrollment"}}"#;

fn connection(expires_at: i64) -> ConnectionPayload {
    ConnectionPayload {
        nonce: NONCE.into(),
        audience: ConnectionAudience::RemoteControlClientWebsocket,
        session_id: "wssess_123".into(),
        target_origin: "https://chatgpt.com".into(),
        target_path: "/api/codex/remote/control/client".into(),
        account_user_id: "account-user-1".into(),
        client_id: "cli_123".into(),
        token_sha256_base64url: HASH.into(),
        token_expires_at: expires_at,
        scopes: vec![CONTROLLER_WEBSOCKET_SCOPE.into()],
    }
}

fn enrollment(expires_at: i64) -> EnrollmentPayload {
    EnrollmentPayload {
        nonce: NONCE.into(),
        audience: EnrollmentAudience::RemoteControlClientEnrollment,
        challenge_id: "rch_123".into(),
        target_origin: "https://chatgpt.com".into(),
        target_path: "/wham/remote/control/client/enroll".into(),
        account_user_id: "account-user-1".into(),
        client_id: "cli_123".into(),
        device_identity_sha256_base64url: HASH.into(),
        challenge_expires_at: expires_at,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn vectors_byte_for_byte() {
    let cases = [
        (
            SignPayload::RemoteControlClientConnection(connection(1_700_000_000)),
            CONNECTION_VECTOR,
            505,
            "2eeb7cf9fd9a0ec59a85d2761af7467443dad792a400d684f0d3271c032052cc",
        ),
        (
            SignPayload::RemoteControlClientEnrollment(enrollment(1_700_000_060)),
            ENROLLMENT_VECTOR,
            471,
            "635bc6fcd31d88fa633de6ae6a1d0c24e133a8bf7874bd605541e539b7c40c42",
        ),
    ];
    for (payload, vector, len, digest) in cases {
        let bytes = signing_bytes(&payload).unwrap();
        assert_eq!(std::str::from_utf8(&bytes).unwrap(), vector);
        assert_eq!(bytes.len(), len);
        assert_eq!(sha256_hex(&bytes), digest);
    }
}

#[test]
fn payload_from_wire_json_round_trips_to_vector() {
    let wire: serde_json::Value = serde_json::from_str(CONNECTION_VECTOR).unwrap();
    let payload: SignPayload = serde_json::from_value(wire["payload"].clone()).unwrap();
    assert_eq!(
        signing_bytes(&payload).unwrap(),
        CONNECTION_VECTOR.as_bytes()
    );
}

/// `signing_bytes` writes the payload types directly; it must stay the generic canonical form of
/// the envelope (field order, the `type` tags, string escapes), also for odd strings.
#[test]
fn signing_bytes_is_the_generic_canonical_form() {
    let odd = "é/ü\u{1F600} \"q\" \\ \n\t\u{1}<>&\u{2028}";
    let mut c = connection(-1);
    c.session_id = odd.into();
    c.account_user_id = odd.into();
    let mut e = enrollment(i64::MAX);
    e.challenge_id = odd.into();
    e.client_id = odd.into();
    for payload in [
        SignPayload::RemoteControlClientConnection(connection(1_700_000_000)),
        SignPayload::RemoteControlClientEnrollment(enrollment(1_700_000_060)),
        SignPayload::RemoteControlClientConnection(c),
        SignPayload::RemoteControlClientEnrollment(e),
    ] {
        let generic =
            to_canonical_vec(&serde_json::json!({"domain": SIGN_DOMAIN, "payload": payload}))
                .unwrap();
        assert_eq!(
            std::str::from_utf8(&signing_bytes(&payload).unwrap()).unwrap(),
            std::str::from_utf8(&generic).unwrap()
        );
        assert_eq!(
            serde_json::to_value(&payload).unwrap()["type"],
            payload.type_tag()
        );
    }
}

#[test]
fn canonical_form_keeps_non_ascii_and_slash() {
    let value = serde_json::json!({"b": "é/ü\u{1F600}", "a": [{"z": 1, "y": "\"\\\n"}], "A": null});
    let bytes = to_canonical_vec(&value).unwrap();
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        "{\"A\":null,\"a\":[{\"y\":\"\\\"\\\\\\n\",\"z\":1}],\"b\":\"é/ü\u{1F600}\"}"
    );
}

#[test]
fn vectors_pass_validate_signing_bytes_at_their_time() {
    let policy = ProofPolicy::default();
    validate_signing_bytes(CONNECTION_VECTOR.as_bytes(), &policy, 1_700_000_000 - 60).unwrap();
    validate_signing_bytes(ENROLLMENT_VECTOR.as_bytes(), &policy, 1_700_000_000).unwrap();
    // Expired now.
    let err =
        validate_signing_bytes(CONNECTION_VECTOR.as_bytes(), &policy, 1_700_000_000).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid device key payload: remote-control token is expired"
    );
}

#[test]
fn validate_signing_bytes_refuses_non_canonical_and_foreign_bytes() {
    let policy = ProofPolicy::default();
    let now = 1_700_000_000 - 60;
    let not_canonical = [
        // Whitespace.
        CONNECTION_VECTOR.replacen(",", ", ", 1),
        // Keys out of order.
        CONNECTION_VECTOR.replacen(
            r#"{"domain":"codex-device-key-sign-payload/v1","payload":"#,
            r#"{"payload":"#,
            1,
        )[..CONNECTION_VECTOR.len() - 52]
            .to_string(),
        // Extra field in the payload.
        CONNECTION_VECTOR.replacen(r#""accountUserId""#, r#""extra":1,"accountUserId""#, 1),
        // Extra top-level field.
        CONNECTION_VECTOR.replacen(r#"{"domain""#, r#"{"a":1,"domain""#, 1),
        // A repeated key, in the payload and at the top.
        CONNECTION_VECTOR.replacen(
            r#""accountUserId""#,
            r#""accountUserId":"someone-else","accountUserId""#,
            1,
        ),
        CONNECTION_VECTOR.replacen(
            r#"{"domain""#,
            r#"{"domain":"codex-device-key-sign-payload/v1","domain""#,
            1,
        ),
        // Escaped slash.
        CONNECTION_VECTOR.replacen("https://", "https:\\/\\/", 1),
        // `type` first in the payload (the same length, not canonical).
        CONNECTION_VECTOR
            .replacen(r#","type":"remoteControlClientConnection""#, "", 1)
            .replacen(
                r#""payload":{"#,
                r#""payload":{"type":"remoteControlClientConnection","#,
                1,
            ),
        // The other payload type's tag.
        CONNECTION_VECTOR.replacen(CONNECTION_TYPE, ENROLLMENT_TYPE, 1),
        ENROLLMENT_VECTOR.replacen(ENROLLMENT_TYPE, CONNECTION_TYPE, 1),
        // Trailing newline.
        format!("{CONNECTION_VECTOR}\n"),
        // Wrong domain.
        CONNECTION_VECTOR.replacen("payload/v1", "payload/v2", 1),
        // Not JSON at all.
        "hello".to_string(),
        String::new(),
        // A bare SHA-256 digest.
        "0123456789abcdef0123456789abcdef".to_string(),
    ];
    for bytes in not_canonical {
        let err = validate_signing_bytes(bytes.as_bytes(), &policy, now).unwrap_err();
        assert!(
            matches!(err, ProofError::InvalidPayload(_)),
            "{bytes}: {err}"
        );
    }
    let huge = vec![b' '; MAX_SIGNING_BYTES + 1];
    assert!(validate_signing_bytes(&huge, &policy, now).is_err());
}

/// The time the rule tests validate at.
const CHECK_NOW: u64 = 1_800_000_000;

fn check(payload: SignPayload) -> Result<(), String> {
    validate_payload(&payload, &ProofPolicy::default(), CHECK_NOW).map_err(|e| e.to_string())
}

fn check_conn(f: impl FnOnce(&mut ConnectionPayload)) -> Result<(), String> {
    let mut p = connection(CHECK_NOW as i64 + 60);
    f(&mut p);
    check(SignPayload::RemoteControlClientConnection(p))
}

fn check_enroll(f: impl FnOnce(&mut EnrollmentPayload)) -> Result<(), String> {
    let mut p = enrollment(CHECK_NOW as i64 + 60);
    f(&mut p);
    check(SignPayload::RemoteControlClientEnrollment(p))
}

fn reason(r: &str) -> Result<(), String> {
    Err(format!("invalid device key payload: {r}"))
}

/// A mutation of a valid payload and the result it must give.
type Case<P> = (fn(&mut P), Result<(), String>);

/// Checks each case with `check`.
fn check_table<P>(check: impl Fn(fn(&mut P)) -> Result<(), String>, cases: Vec<Case<P>>) {
    for (i, (mutate, want)) in cases.into_iter().enumerate() {
        assert_eq!(check(mutate), want, "case {i}");
    }
}

#[test]
fn connection_rules() {
    const NOW: i64 = CHECK_NOW as i64;
    let nonce = reason("nonce must be at least 32 random bytes encoded as unpadded base64url");
    let origin = reason("targetOrigin must be an allowed remote-control backend origin");
    let path = reason("targetPath must match the signed payload type's remote-control endpoint");
    let scopes = reason("scopes must contain exactly remote_control_controller_websocket");
    let expired = reason("remote-control token is expired");
    let too_far = reason("remote-control token expires too far in the future");
    check_table::<ConnectionPayload>(
        |f| check_conn(f),
        vec![
            (|_| {}, Ok(())),
            (|p| p.nonce = "AAAA".into(), nonce.clone()),
            (|p| p.nonce = format!("{NONCE}="), nonce.clone()),
            (|p| p.nonce = NONCE.replace('A', "+"), nonce.clone()),
            (|p| p.nonce = "A".repeat(64), Ok(())),
            (|p| p.target_origin = "http://chatgpt.com".into(), origin),
            (
                |p| p.target_origin = "https://ab.chatgpt.com".into(),
                Ok(()),
            ),
            (
                |p| p.target_path = "/wham/remote/control/client/enroll".into(),
                path.clone(),
            ),
            (
                |p| p.target_path = "/wham/remote/control/client".into(),
                Ok(()),
            ),
            (
                |p| p.session_id.clear(),
                reason("sessionId must not be empty"),
            ),
            (
                |p| p.account_user_id.clear(),
                reason("accountUserId must not be empty"),
            ),
            (
                |p| p.client_id.clear(),
                reason("clientId must not be empty"),
            ),
            (
                |p| p.token_sha256_base64url = "AAAA".into(),
                reason(
                    "tokenSha256Base64url must be a SHA-256 digest encoded as unpadded base64url",
                ),
            ),
            (|p| p.scopes.clear(), scopes.clone()),
            (
                |p| p.scopes.push(CONTROLLER_WEBSOCKET_SCOPE.into()),
                scopes.clone(),
            ),
            (|p| p.scopes = vec!["x".into()], scopes.clone()),
            (|p| p.token_expires_at = NOW, expired.clone()),
            (|p| p.token_expires_at = -5, expired),
            (|p| p.token_expires_at = NOW + 1, Ok(())),
            (|p| p.token_expires_at = NOW + 900, Ok(())),
            (|p| p.token_expires_at = NOW + 901, too_far.clone()),
            (|p| p.token_expires_at = i64::MAX, too_far),
            // Order: the first broken rule wins.
            (
                |p| {
                    p.nonce.clear();
                    p.target_origin.clear();
                },
                nonce,
            ),
            (
                |p| {
                    p.session_id.clear();
                    p.target_path.clear();
                },
                path,
            ),
            (
                |p| {
                    p.scopes.clear();
                    p.token_expires_at = 0;
                },
                scopes,
            ),
        ],
    );
}

#[test]
fn enrollment_rules() {
    const NOW: i64 = CHECK_NOW as i64;
    check_table::<EnrollmentPayload>(
        |f| check_enroll(f),
        vec![
            (|_| {}, Ok(())),
            (
                |p| p.target_path = "/api/codex/remote/control/client/enroll".into(),
                Ok(()),
            ),
            (
                |p| p.target_path = "/api/codex/remote/control/client".into(),
                reason("targetPath must match the signed payload type's remote-control endpoint"),
            ),
            (
                |p| p.target_origin = "https://chatgpt.com/backend-api".into(),
                reason("targetOrigin must be an allowed remote-control backend origin"),
            ),
            (|p| p.challenge_id.clear(), reason("challengeId must not be empty")),
            (
                |p| p.device_identity_sha256_base64url = format!("{HASH}A"),
                reason(
                    "deviceIdentitySha256Base64url must be a SHA-256 digest encoded as unpadded base64url",
                ),
            ),
            (
                |p| p.challenge_expires_at = NOW - 1,
                reason("enrollment challenge is expired"),
            ),
            (
                |p| p.challenge_expires_at = NOW + 901,
                reason("enrollment challenge expires too far in the future"),
            ),
        ],
    );
}

#[test]
fn policy_comes_from_config() {
    let config = crate::config::Config::from_toml(
        "[server]\nallowed_origin_hosts = [\"example.org\"]\nmax_proof_ttl_seconds = 60\n",
    )
    .unwrap();
    let policy = ProofPolicy::from_config(&config.server);
    assert_eq!(policy.max_ttl_seconds, 60);
    let now = 1_800_000_000u64;
    let mut p = connection(now as i64 + 61);
    p.target_origin = "https://x.example.org".into();
    let payload = SignPayload::RemoteControlClientConnection(p.clone());
    assert!(validate_payload(&payload, &policy, now).is_err());
    p.token_expires_at = now as i64 + 60;
    let payload = SignPayload::RemoteControlClientConnection(p);
    assert_eq!(validate_payload(&payload, &policy, now), Ok(()));
    assert_eq!(
        ProofPolicy::from_config(&Default::default()),
        ProofPolicy::default()
    );
}

#[test]
fn a_payload_parsed_straight_from_text_refuses_a_repeated_field() {
    // `devicekey sign --payload` parses the file into SignPayload directly: serde's derived
    // structs (and the `type` tag) already refuse a repeated key there.
    let wire: serde_json::Value = serde_json::from_str(CONNECTION_VECTOR).unwrap();
    let text = wire["payload"].to_string();
    for (field, first) in [
        ("targetOrigin", "\"https://evil.example\""),
        ("type", "\"remoteControlClientEnrollment\""),
    ] {
        let doubled = format!("{{\"{field}\":{first},{}", &text[1..]);
        let e = serde_json::from_str::<SignPayload>(&doubled).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("duplicate field `{field}`")),
            "{e}"
        );
    }
}
