//! `devicekey serve` over pipes: framing, handshake, errors, validation rules, concurrency.
//! The server uses a throwaway SoftHSM token as a foreign module declared `hardware_tpm`.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::rpc::*;

const KEY_ID_MESSAGE: &str = "invalid device key payload: keyId must be dk_hse_, dk_tpm_, or dk_osn_ followed by unpadded base64url-encoded 32 bytes";
const UNKNOWN_KEY: &str = "dk_tpm_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

fn started(env: &Env) -> Server {
    let mut server = env.serve();
    server.initialize();
    server
}

fn invalid(reason: &str) -> String {
    format!("invalid device key payload: {reason}")
}

#[test]
fn handshake() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = env.serve();
    // jsonrpc member accepted on input, string ids echoed.
    server.send(
        &json!({"jsonrpc": "2.0", "id": "init-1", "method": "initialize",
        "params": {"clientInfo": {"name": "t", "version": "0"}}}),
    );
    let r = server.recv();
    assert_eq!(r["id"], json!("init-1"));
    let res = result(&r);
    for field in ["userAgent", "codexHome", "platformFamily", "platformOs"] {
        assert!(res[field].is_string(), "{field} in {res}");
    }
    assert_eq!(res["platformOs"], json!(std::env::consts::OS));
    server.send(&json!({"jsonrpc": "2.0", "method": "initialized"}));
    let again = server.request(
        "initialize",
        json!({"clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_error(&again, -32600, "Already initialized");
    // Still serving.
    let r = server.request("device/key/public", json!({"keyId": "x"}));
    assert_error(&r, -32600, KEY_ID_MESSAGE);
    assert_eq!(server.finish(), 0);
}

#[test]
fn requests_before_initialize() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = env.serve();
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "Not initialized");
    let r = server.request("no/such/method", json!({}));
    assert_error(&r, -32600, "Not initialized");
    // Notifications are never answered.
    server.send(&json!({"method": "initialized"}));
    assert!(server.silent_for(Duration::from_millis(300)));
    // initialize with bad params fails and leaves the server uninitialized.
    let r = server.request("initialize", json!({"clientInfo": {"name": "t"}}));
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Invalid request: "));
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "Not initialized");
    server.initialize();
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "device key not found");
    assert_eq!(server.finish(), 0);
}

#[test]
fn malformed_messages_and_unknown_methods() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = started(&env);
    server.send_raw(b"{not json\n");
    let r = server.recv();
    assert_eq!(r["id"], Value::Null);
    assert_eq!(r["error"]["code"], json!(-32700), "{r}");
    server.send_raw(b"[1,2]\n");
    let r = server.recv();
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    server.send_raw(b"{\"id\": 5}\n");
    let r = server.recv();
    assert_eq!(r["id"], json!(5));
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    server.send_raw(b"{\"id\": {\"a\":1}, \"method\": \"device/key/public\"}\n");
    let r = server.recv();
    assert_eq!(r["id"], Value::Null);
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    // Blank lines are skipped; CRLF is fine.
    server.send_raw(b"\n\r\n");
    server.send_raw(b"{\"id\":7,\"method\":\"device/key/nope\",\"params\":{}}\r\n");
    let r = server.recv();
    assert_eq!(r["id"], json!(7));
    assert_eq!(r["error"]["code"], json!(-32601), "{r}");
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "device key not found");
    // Params that do not deserialize.
    for (method, params) in [
        ("device/key/create", json!({"accountUserId": "a"})),
        ("device/key/create", Value::Null),
        (
            "device/key/create",
            json!({"accountUserId": "a", "clientId": "c", "protectionPolicy": "best"}),
        ),
        ("device/key/public", json!({})),
        ("device/key/sign", json!({"keyId": UNKNOWN_KEY})),
    ] {
        let r = server.request(method, params);
        assert_eq!(r["error"]["code"], json!(-32600), "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("Invalid request: "), "{message}");
    }
    assert_eq!(server.finish(), 0);
}

#[test]
fn line_too_long_is_answered_and_the_stream_goes_on() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = started(&env);
    let mut line = br#"{"id":1,"method":"device/key/public","params":{"keyId":""#.to_vec();
    line.extend_from_slice(&vec![b'x'; (1 << 20) + 100]);
    line.extend_from_slice(b"\"}}\n");
    server.send_raw(&line);
    let r = server.recv();
    assert_eq!(r["id"], Value::Null, "{r}");
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    // A line just under the limit is still read (and rejected on its merits).
    let mut line = br#"{"id":2,"method":"device/key/public","params":{"keyId":""#.to_vec();
    let pad = (1 << 20) - line.len() - 3;
    line.extend_from_slice(&vec![b'x'; pad]);
    line.extend_from_slice(b"\"}}\n");
    assert_eq!(line.len(), (1 << 20) + 1);
    server.send_raw(&line);
    let r = server.recv();
    assert_eq!(r["id"], json!(2));
    assert_error(&r, -32600, KEY_ID_MESSAGE);
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "device key not found");
    assert_eq!(server.finish(), 0);
}

#[test]
fn configured_line_limit() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("max_line_bytes = 200");
    let mut server = started(&env);
    server.send(&json!({"id": 1, "method": "device/key/sign",
        "params": {"keyId": UNKNOWN_KEY, "payload": connection_payload()}}));
    let r = server.recv();
    assert_eq!(r["id"], Value::Null, "{r}");
    assert_eq!(r["error"]["code"], json!(-32600), "{r}");
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "device key not found");
    assert_eq!(server.finish(), 0);
}

#[test]
fn key_id_validation() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = started(&env);
    let good_suffix = &UNKNOWN_KEY[7..];
    let bad = [
        String::new(),
        "dk_tpm_".to_string(),
        format!("dk_abc_{good_suffix}"),
        format!("dk_tpm_{good_suffix}A"),
        format!("dk_tpm_{}", &good_suffix[..42]),
        format!("dk_tpm_{}B", &"A".repeat(42)),
        format!("dk_tpm_{}/", &"A".repeat(42)),
        format!("dk_tpm_{}=", &"A".repeat(42)),
        format!("DK_TPM_{good_suffix}"),
        "../../etc/passwd".to_string(),
    ];
    for key_id in &bad {
        let r = server.request("device/key/public", json!({"keyId": key_id}));
        assert_error(&r, -32600, KEY_ID_MESSAGE);
        // The key id is checked before the payload.
        let mut payload = connection_payload();
        payload["nonce"] = json!("short");
        let r = server.request(
            "device/key/sign",
            json!({"keyId": key_id, "payload": payload}),
        );
        assert_error(&r, -32600, KEY_ID_MESSAGE);
    }
    for prefix in ["dk_hse_", "dk_tpm_", "dk_osn_"] {
        let r = server.request(
            "device/key/public",
            json!({"keyId": format!("{prefix}{good_suffix}")}),
        );
        assert_error(&r, -32600, "device key not found");
    }
    assert_eq!(server.finish(), 0);
}

#[test]
fn create_binding_fields_must_not_be_empty() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = started(&env);
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": "", "clientId": "c"}),
    );
    assert_error(&r, -32600, &invalid("accountUserId must not be empty"));
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": "a", "clientId": "", "protectionPolicy": null}),
    );
    assert_error(&r, -32600, &invalid("clientId must not be empty"));
    assert_eq!(server.finish(), 0);
}

/// Sends sign for an unknown (well-formed) key with `payload`; valid payloads reach the store
/// and get "device key not found".
fn sign_unknown(server: &mut Server, payload: &Value) -> Value {
    server.request(
        "device/key/sign",
        json!({"keyId": UNKNOWN_KEY, "payload": payload}),
    )
}

fn with(base: &Value, field: &str, value: Value) -> Value {
    let mut p = base.clone();
    p[field] = value;
    p
}

#[test]
fn every_sign_rule_positive_and_negative() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = started(&env);
    let conn = connection_payload();
    let enroll = enrollment_payload();
    let ok = |server: &mut Server, p: &Value| {
        let r = sign_unknown(server, p);
        assert_error(&r, -32600, "device key not found");
    };
    let bad = |server: &mut Server, p: &Value, reason: &str| {
        let r = sign_unknown(server, p);
        assert_error(&r, -32600, &invalid(reason));
    };
    ok(&mut server, &conn);
    ok(&mut server, &enroll);

    // nonce
    let nonce = "nonce must be at least 32 random bytes encoded as unpadded base64url";
    for base in [&conn, &enroll] {
        bad(&mut server, &with(base, "nonce", json!("AAAA")), nonce);
        bad(
            &mut server,
            &with(base, "nonce", json!(format!("{NONCE}="))),
            nonce,
        );
        bad(
            &mut server,
            &with(base, "nonce", json!("A".repeat(42))),
            nonce,
        );
        bad(&mut server, &with(base, "nonce", json!("")), nonce);
        ok(&mut server, &with(base, "nonce", json!("_-".repeat(32))));
    }

    // targetOrigin
    let origin = "targetOrigin must be an allowed remote-control backend origin";
    for good in [
        "https://chatgpt.com",
        "https://ab.chatgpt.com",
        "https://chatgpt-staging.com",
        "https://x.chatgpt-staging.com:444",
        "http://[::1]:8080",
        "http://localhost:1234",
        "https://localhost",
        "http://127.0.0.1",
        "https://chatgpt.com/",
    ] {
        ok(&mut server, &with(&conn, "targetOrigin", json!(good)));
        ok(&mut server, &with(&enroll, "targetOrigin", json!(good)));
    }
    for rejected in [
        "http://chatgpt.com",
        "https://chat.openai.com",
        "https://chatgpt.com.evil.com",
        "https://foo.localhost",
        "https://192.168.1.2",
        "https://chatgpt.com/backend-api",
        "https://chatgpt.com?query=1",
        "https://chatgpt.com#x",
        "https://user@chatgpt.com",
        "wss://chatgpt.com",
        "chatgpt.com",
        "",
    ] {
        bad(
            &mut server,
            &with(&conn, "targetOrigin", json!(rejected)),
            origin,
        );
        bad(
            &mut server,
            &with(&enroll, "targetOrigin", json!(rejected)),
            origin,
        );
    }

    // targetPath
    let path = "targetPath must match the signed payload type's remote-control endpoint";
    ok(
        &mut server,
        &with(&conn, "targetPath", json!("/wham/remote/control/client")),
    );
    ok(
        &mut server,
        &with(
            &conn,
            "targetPath",
            json!("/api/codex/remote/control/client"),
        ),
    );
    ok(
        &mut server,
        &with(
            &enroll,
            "targetPath",
            json!("/api/codex/remote/control/client/enroll"),
        ),
    );
    ok(
        &mut server,
        &with(
            &enroll,
            "targetPath",
            json!("/wham/remote/control/client/enroll"),
        ),
    );
    for p in [
        "/wham/remote/control/client/enroll",
        "/api/codex/remote/control/client/enroll",
        "/api/codex/remote/control/client/",
        "",
    ] {
        bad(&mut server, &with(&conn, "targetPath", json!(p)), path);
    }
    for p in [
        "/wham/remote/control/client",
        "/api/codex/remote/control/client",
        "/wham/remote/control/client/enroll/",
    ] {
        bad(&mut server, &with(&enroll, "targetPath", json!(p)), path);
    }

    // non-empty ids
    bad(
        &mut server,
        &with(&conn, "sessionId", json!("")),
        "sessionId must not be empty",
    );
    bad(
        &mut server,
        &with(&enroll, "challengeId", json!("")),
        "challengeId must not be empty",
    );
    for base in [&conn, &enroll] {
        bad(
            &mut server,
            &with(base, "accountUserId", json!("")),
            "accountUserId must not be empty",
        );
        bad(
            &mut server,
            &with(base, "clientId", json!("")),
            "clientId must not be empty",
        );
    }

    // digests
    let token = "tokenSha256Base64url must be a SHA-256 digest encoded as unpadded base64url";
    let ident =
        "deviceIdentitySha256Base64url must be a SHA-256 digest encoded as unpadded base64url";
    for v in [
        "",
        "AAAA",
        &format!("{HASH}="),
        &format!("{HASH}A"),
        &HASH.replace('-', "+"),
    ] {
        bad(
            &mut server,
            &with(&conn, "tokenSha256Base64url", json!(v)),
            token,
        );
        bad(
            &mut server,
            &with(&enroll, "deviceIdentitySha256Base64url", json!(v)),
            ident,
        );
    }

    // scopes
    let scopes = "scopes must contain exactly remote_control_controller_websocket";
    for v in [
        json!([]),
        json!([
            "remote_control_controller_websocket",
            "remote_control_controller_websocket"
        ]),
        json!(["other"]),
        json!(["remote_control_controller_websocket", "x"]),
    ] {
        bad(&mut server, &with(&conn, "scopes", v), scopes);
    }

    // expiry
    let t = now();
    for (base, field, expired, too_far) in [
        (
            &conn,
            "tokenExpiresAt",
            "remote-control token is expired",
            "remote-control token expires too far in the future",
        ),
        (
            &enroll,
            "challengeExpiresAt",
            "enrollment challenge is expired",
            "enrollment challenge expires too far in the future",
        ),
    ] {
        bad(&mut server, &with(base, field, json!(t - 1)), expired);
        bad(&mut server, &with(base, field, json!(t - 3600)), expired);
        bad(&mut server, &with(base, field, json!(0)), expired);
        bad(&mut server, &with(base, field, json!(t + 1000)), too_far);
        bad(&mut server, &with(base, field, json!(i64::MAX)), too_far);
        ok(&mut server, &with(base, field, json!(t + 900)));
        ok(&mut server, &with(base, field, json!(t + 5)));
    }

    // Order: the first broken rule wins.
    let mut p = with(&conn, "nonce", json!("x"));
    p["targetOrigin"] = json!("http://evil.com");
    p["scopes"] = json!([]);
    bad(&mut server, &p, nonce);
    let mut p = with(&conn, "targetPath", json!("/x"));
    p["sessionId"] = json!("");
    bad(&mut server, &p, path);
    let mut p = with(&conn, "scopes", json!([]));
    p["tokenExpiresAt"] = json!(0);
    bad(&mut server, &p, scopes);
    let mut p = with(&enroll, "targetOrigin", json!("http://evil.com"));
    p["challengeId"] = json!("");
    bad(&mut server, &p, origin);

    // Shape errors are "Invalid request".
    for p in [
        with(&conn, "audience", json!("remote_control_client_enrollment")),
        with(&conn, "type", json!("somethingElse")),
        with(&conn, "tokenExpiresAt", json!("soon")),
        with(&conn, "tokenExpiresAt", json!(1.5)),
        {
            let mut p = conn.clone();
            p.as_object_mut().unwrap().remove("scopes");
            p
        },
        {
            let mut p = conn.clone();
            p.as_object_mut().unwrap().remove("type");
            p
        },
    ] {
        let r = sign_unknown(&mut server, &p);
        assert_eq!(r["error"]["code"], json!(-32600), "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid request: "),
            "{r}"
        );
    }
    assert_eq!(server.finish(), 0);
}

#[test]
fn configured_origins_and_ttl() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("allowed_origin_hosts = [\"example.org\"]\nmax_proof_ttl_seconds = 60");
    let mut server = started(&env);
    let conn = connection_payload();
    let r = sign_unknown(
        &mut server,
        &with(&conn, "targetOrigin", json!("https://chatgpt.com")),
    );
    assert_error(
        &r,
        -32600,
        &invalid("targetOrigin must be an allowed remote-control backend origin"),
    );
    let mut p = with(&conn, "targetOrigin", json!("https://api.example.org"));
    p["tokenExpiresAt"] = json!(now() + 30);
    let r = sign_unknown(&mut server, &p);
    assert_error(&r, -32600, "device key not found");
    p["tokenExpiresAt"] = json!(now() + 120);
    let r = sign_unknown(&mut server, &p);
    assert_error(
        &r,
        -32600,
        &invalid("remote-control token expires too far in the future"),
    );
    assert_eq!(server.finish(), 0);
}

#[test]
fn notifications_are_not_answered() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("");
    let mut server = started(&env);
    server.send(
        &json!({"method": "device/key/create", "params": {"accountUserId": "a", "clientId": "c"}}),
    );
    server.send(&json!({"method": "whatever"}));
    assert!(server.silent_for(Duration::from_millis(300)));
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "device key not found");
    assert_eq!(server.finish(), 0);
}

#[test]
fn hundred_pipelined_requests_get_matching_ids() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("max_concurrent_requests = 200");
    let mut server = started(&env);
    let mut batch = Vec::new();
    let mut expected: HashMap<Value, &str> = HashMap::new();
    for i in 0..100 {
        let id = if i % 2 == 0 {
            json!(i)
        } else {
            json!(format!("req-{i}"))
        };
        let (message, kind) = match i % 4 {
            0 => (
                json!({"id": id, "method": "device/key/public", "params": {"keyId": UNKNOWN_KEY}}),
                "not_found",
            ),
            1 => (
                json!({"id": id, "method": "device/key/public", "params": {"keyId": "bad"}}),
                "bad_id",
            ),
            2 => (
                json!({"id": id, "method": "device/key/sign", "params": {"keyId": UNKNOWN_KEY, "payload": connection_payload()}}),
                "not_found",
            ),
            _ => (json!({"id": id, "method": "device/key/nope"}), "no_method"),
        };
        batch.extend(serde_json::to_vec(&message).unwrap());
        batch.push(b'\n');
        expected.insert(id, kind);
    }
    server.send_raw(&batch);
    for _ in 0..100 {
        let r = server.recv();
        let kind = expected
            .remove(&r["id"])
            .unwrap_or_else(|| panic!("unexpected or repeated id: {r}"));
        match kind {
            "not_found" => assert_error(&r, -32600, "device key not found"),
            "bad_id" => assert_error(&r, -32600, KEY_ID_MESSAGE),
            _ => assert_eq!(r["error"]["code"], json!(-32601), "{r}"),
        }
    }
    assert!(expected.is_empty());
    assert!(server.silent_for(Duration::from_millis(200)));
    assert_eq!(server.finish(), 0);
}

#[test]
fn eof_lets_in_flight_requests_finish() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("max_concurrent_requests = 100");
    let mut server = started(&env);
    let mut batch = Vec::new();
    for i in 0..20 {
        let message = json!({"id": i, "method": "device/key/create",
            "params": {"accountUserId": format!("acct-{i}"), "clientId": "c"}});
        batch.extend(serde_json::to_vec(&message).unwrap());
        batch.push(b'\n');
    }
    server.send_raw(&batch);
    drop(server.stdin.take());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = server.recv();
        let key_id = result(&r)["keyId"].as_str().unwrap().to_string();
        assert!(key_id.starts_with("dk_tpm_"), "{r}");
        assert!(seen.insert(r["id"].clone()), "{r}");
    }
    assert_eq!(server.finish(), 0);
}

#[test]
fn overload_answers_32001() {
    if !have_softhsm() {
        return;
    }
    let env = Env::softhsm("max_concurrent_requests = 1");
    let mut server = started(&env);
    let mut batch = Vec::new();
    let n = 40;
    for i in 0..n {
        let message = json!({"id": i, "method": "device/key/create",
            "params": {"accountUserId": "a", "clientId": "c"}});
        batch.extend(serde_json::to_vec(&message).unwrap());
        batch.push(b'\n');
    }
    server.send_raw(&batch);
    let (mut overloaded, mut created) = (0, 0);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..n {
        let r = server.recv();
        assert!(ids.insert(r["id"].clone()), "{r}");
        if r.get("error").is_some() {
            assert_eq!(r["error"]["code"], json!(-32001), "{r}");
            overloaded += 1;
        } else {
            created += 1;
        }
    }
    assert!(
        overloaded > 0 && created > 0,
        "{overloaded} overloaded, {created} created"
    );
    // The server is still usable.
    let r = server.request("device/key/public", json!({"keyId": UNKNOWN_KEY}));
    assert_error(&r, -32600, "device key not found");
    assert_eq!(server.finish(), 0);
}

#[test]
fn stdout_carries_only_responses() {
    if !have_softhsm() {
        return;
    }
    let mut env = Env::softhsm("");
    env.vars.push(("DEVICEKEY_LOG".into(), "trace".into()));
    let mut server = started(&env);
    let r = server.request(
        "device/key/create",
        json!({"accountUserId": "a", "clientId": "c"}),
    );
    result(&r);
    server.send_raw(b"garbage\n");
    server.recv();
    drop(server.stdin.take());
    // Every stdout line was JSON (recv checks); nothing else follows.
    assert!(server.silent_for(Duration::from_millis(300)));
    assert_eq!(server.finish(), 0);
    assert!(!env.log().is_empty(), "logs go to stderr");
}
